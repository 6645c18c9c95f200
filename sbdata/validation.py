"""Argument checks for :class:`~sbdata.SelectiveBatchLoader`: each names the argument, echoes
the value and says the fix."""

from __future__ import annotations

from .repack import LAST_BATCH_MODES
from .scoring import NONFINITE_MODES

__all__ = ["check_fraction", "validate_options"]


def check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a training fraction in [0, 1], got {name}={value!r}")


def validate_options(
    keep: float,
    epochs: int | None,
    start: float,
    end: float,
    interrupt: int,
    scale_factor: float,
    stale: int | None,
    last_batch: str,
    scoring_mode: str,
    batch_size: int | None,
    nonfinite: str,
) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got keep={keep!r}; keep=1 disables selection")
    check_fraction("start", start)
    check_fraction("end", end)
    if epochs is None and (start > 0.0 or end < 1.0):
        raise ValueError(
            f"start={start} and end={end} are fractions of training, so epochs= is needed to "
            "know where they fall; pass epochs=<total training epochs>"
        )
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be a positive int, got epochs={epochs!r}")
    if start > end:
        raise ValueError(f"start must be <= end, got start={start}, end={end}")
    if not isinstance(interrupt, int) or interrupt < 0:
        raise ValueError(f"interrupt must be an int >= 0 (0: never), got interrupt={interrupt!r}")
    if interrupt == 1:
        raise ValueError(
            "interrupt=1 would pass every batch through and never select; use interrupt=0 "
            "(never interrupt) or >= 2"
        )
    if not isinstance(scale_factor, (int, float)) or not 0.0 < scale_factor <= 1.0:
        raise ValueError(f"scale_factor must be in (0, 1], got scale_factor={scale_factor!r}")
    if stale is not None and (isinstance(stale, bool) or not isinstance(stale, int) or stale < 1):
        raise ValueError(f"stale must be None or an int >= 1 (rescore every n epochs), got stale={stale!r}")
    if last_batch not in LAST_BATCH_MODES:
        raise ValueError(f"last_batch must be one of {LAST_BATCH_MODES}, got last_batch={last_batch!r}")
    if scoring_mode not in ("eval", "train"):
        raise ValueError(f"scoring_mode must be 'eval' or 'train', got scoring_mode={scoring_mode!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got nonfinite={nonfinite!r}")
