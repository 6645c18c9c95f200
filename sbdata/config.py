"""The loader's configuration: one frozen, validated dataclass.

:class:`LoaderConfig` holds every option of :class:`~sbdata.SelectiveBatchLoader` except the
wrapped loader and the scorer model. It is validated when it is built, each check naming the
argument, echoing the value and saying the fix, and it cannot change afterwards: the loader
computes lengths, plans and checkpoints from it, so a later change would be silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from .batches import Key
from .scoring import NONFINITE_MODES, LossFn

__all__ = [
    "LAST_BATCH_MODES",
    "STATE_VERSION",
    "LoaderConfig",
    "ScoreFn",
    "Stale",
    "check_fraction",
    "check_keeps_rows",
    "check_state",
    "resolve",
]

ScoreFn = Callable[[nn.Module, Any], Tensor]
#: ``None``: score every selective epoch; ``n``: rescore every n-th; ``"once"``: score once,
#: then rely on ``record()`` to keep the cached losses current.
Stale = Union[None, int, str]  # noqa: UP007 (a runtime alias, kept readable on 3.10)
LAST_BATCH_MODES = ("yield", "drop", "carry")
SCORING_MODES = ("eval", "train")


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a training fraction in [0, 1], got {name}={value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LoaderConfig:
    """Every option of :class:`~sbdata.SelectiveBatchLoader` (see its docstring for each).

    ``batch_size``, ``last_batch`` and ``device`` may be ``None`` here; the loader resolves
    them from the wrapped loader and the model (:meth:`resolved`).
    """

    keep: float = 0.5
    loss_fn: LossFn | None = None
    score_fn: ScoreFn | None = None
    policy: Any = "rank"
    batch_size: int | None = None
    epochs: int | None = None
    start: float = 0.0
    end: float = 1.0
    interrupt: int = 0
    scale_factor: float = 1.0
    stale: Stale = None
    input_key: Key = 0
    target_key: Key = 1
    index_key: Key | None = None
    device: torch.device | None = None
    last_batch: str | None = None
    scoring_mode: str = "eval"
    autocast_dtype: torch.dtype | None = None
    nonfinite: str = "raise"
    seed: int = 0
    shard_cache: bool = False

    def __post_init__(self) -> None:
        self._check_keep()
        self._check_schedule()
        self._check_modes()
        self._check_numbers()

    def _check_keep(self) -> None:
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise ValueError(
                f"keep must be in (0, 1], got keep={keep!r}; keep=1 disables selection"
                + (" (pass a Python float, e.g. keep=float(t))" if isinstance(keep, Tensor) else "")
            )
        object.__setattr__(self, "keep", float(keep))

    def _check_schedule(self) -> None:
        check_fraction("start", self.start)
        check_fraction("end", self.end)
        if self.epochs is not None and (not _is_int(self.epochs) or self.epochs < 1):
            raise ValueError(f"epochs must be a positive int, got epochs={self.epochs!r}")
        if self.epochs is None and (self.start > 0.0 or self.end < 1.0):
            raise ValueError(
                f"start={self.start} and end={self.end} are fractions of training, so epochs= is "
                "needed to know where they fall; pass epochs=<total training epochs>"
            )
        if self.start > self.end:
            raise ValueError(f"start must be <= end, got start={self.start}, end={self.end}")
        if not _is_int(self.interrupt) or self.interrupt < 0:
            raise ValueError(f"interrupt must be an int >= 0 (0: never), got interrupt={self.interrupt!r}")
        if self.interrupt == 1:
            raise ValueError(
                "interrupt=1 would pass every batch through and never select; use interrupt=0 "
                "(never interrupt) or >= 2"
            )
        stale = self.stale
        if not (stale is None or stale == "once" or (_is_int(stale) and stale >= 1)):  # type: ignore[operator]
            raise ValueError(
                f"stale must be None or an int >= 1 (rescore every n epochs), or 'once' (score once, "
                f"then keep losses current with record()); got stale={stale!r}"
            )

    def _check_modes(self) -> None:
        if self.last_batch is not None and self.last_batch not in LAST_BATCH_MODES:
            raise ValueError(
                f"last_batch must be one of {LAST_BATCH_MODES}, got last_batch={self.last_batch!r} "
                "(or None: follow the wrapped loader's drop_last)"
            )
        if self.scoring_mode not in SCORING_MODES:
            raise ValueError(f"scoring_mode must be 'eval' or 'train', got scoring_mode={self.scoring_mode!r}")
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got nonfinite={self.nonfinite!r}")
        if self.score_fn is not None and not callable(self.score_fn):
            raise TypeError(f"score_fn must be callable (model, batch) -> losses, got score_fn={self.score_fn!r}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, targets) -> losses, got loss_fn={self.loss_fn!r}")
        if self.autocast_dtype is not None and not isinstance(self.autocast_dtype, torch.dtype):
            raise TypeError(
                f"autocast_dtype must be a torch.dtype such as torch.bfloat16, got autocast_dtype={self.autocast_dtype!r}"
            )

    def _check_numbers(self) -> None:
        scale = self.scale_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale <= 1.0:
            raise ValueError(f"scale_factor must be in (0, 1], got scale_factor={scale!r}")
        if self.score_fn is not None and scale != 1.0:
            raise ValueError(
                f"scale_factor={scale} only applies to the built-in scoring pass; with score_fn, "
                "downsample inside score_fn and leave scale_factor=1.0"
            )
        size = self.batch_size
        if size is not None and (not _is_int(size) or size < 1):
            raise ValueError(f"batch_size must be a positive int, got batch_size={size!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got seed={self.seed!r}")
        if not isinstance(self.shard_cache, bool):
            raise TypeError(f"shard_cache must be True or False, got shard_cache={self.shard_cache!r}")
        if self.shard_cache and self.stale is None:
            raise ValueError(
                "shard_cache=True shards the loss cache of stale mode, but stale=None keeps no cache; "
                "pass stale= (e.g. stale=3) or drop shard_cache="
            )

    def fingerprint(self, num_examples: int | None, policy: Any) -> dict[str, Any]:
        """What a checkpoint must agree on to resume this configuration."""
        return {
            "keep": self.keep,
            "batch_size": self.batch_size,
            "num_examples": num_examples,
            "policy": type(policy).__name__,
            "stale": self.stale,
            "last_batch": self.last_batch,
            "interrupt": self.interrupt,
            "schedule": (self.epochs, self.start, self.end),
            "seed": self.seed,
            "shard_cache": self.shard_cache,
        }


def resolve(config: LoaderConfig, source: Any, model_device: torch.device, loader_name: str) -> LoaderConfig:
    """``config`` with ``batch_size``, ``last_batch`` and ``device`` taken from the wrapped
    loader and the model where they were left ``None``; refuses what the source cannot do."""
    batch_size = config.batch_size or source.batch_size()
    if batch_size is None:
        raise ValueError(
            f"batch_size is needed: {loader_name} has no batch_size attribute to copy; "
            "pass batch_size=<size of the batches to yield>"
        )
    if config.stale is not None and config.index_key is None and not source.loads_ids:
        raise ValueError(
            f"stale={config.stale!r} needs example ids, and {loader_name} does not provide them; return "
            "each example's index from the dataset and pass index_key= (e.g. index_key=2 for "
            "(x, y, idx) batches), or wrap a plain map-style torch.utils.data.DataLoader"
        )
    if config.shard_cache and not (source.loads_ids and source.num_examples()):
        raise ValueError(
            f"shard_cache=True splits the ids 0..N-1 of a dataset between the ranks, and {loader_name} does not "
            "load examples by dataset index; wrap a map-style DataLoader, an FFCV Loader or a torchdata.nodes "
            "pipeline, or leave shard_cache=False (a replicated cache)"
        )
    last_batch = config.last_batch or ("drop" if source.drop_last() else "yield")
    return dataclasses.replace(config, batch_size=batch_size, last_batch=last_batch, device=config.device or model_device)


def check_keeps_rows(policy: Any, source_batch_size: int, keep: float) -> None:
    """Refuse a ``keep`` that keeps no row of a full source batch."""
    size = source_batch_size
    if size and policy.exact and policy.count(size) == 0:
        raise ValueError(
            f"keep={keep} keeps int({keep} * {size}) = 0 rows of each source batch of {size}; "
            f"raise keep to at least 1/{size} = {1 / size:.4f}, or use larger source batches"
        )


STATE_VERSION = 3


def check_state(state: Any, fingerprint: dict[str, Any], world_size: int) -> None:
    """Refuse a ``state_dict`` of another format version or configuration, naming the difference."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"state_dict has format version {found!r}, this sbdata reads version {STATE_VERSION}; "
            "pass a dict from SelectiveBatchLoader.state_dict() of this sbdata version"
        )
    for key, saved in state["fingerprint"].items():
        if fingerprint.get(key) != saved:
            raise ValueError(
                f"state_dict was saved with {key}={saved!r} but this loader has {key}={fingerprint.get(key)!r}; "
                "resume with the same configuration (or start fresh without load_state_dict)"
            )
    if state["position"] is not None and state["world_size"] != world_size:
        raise ValueError(
            f"a mid-epoch state_dict saved on {state['world_size']} ranks cannot resume on {world_size}; "
            "resume from an epoch-boundary checkpoint instead"
        )


#: names of the options, for the loader's read-only attributes
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LoaderConfig))
