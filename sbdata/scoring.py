"""The scoring pass: per-example losses without gradients, leaving the model as it was.

NOTE [ Scoring leaves the model untouched ]
Scoring runs under ``torch.no_grad()``. In the default ``"eval"`` mode the model is switched
to eval (BatchNorm uses its running statistics, dropout is off) and every module's own
``training`` flag is restored afterwards. In ``"train"`` mode the forward pass sees batch
statistics, and the BatchNorm running statistics it would update are saved before and
copied back after, so the training run sees exactly the buffers it would have seen without
scoring.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import flatten, get_field

__all__ = [
    "INTERPOLATION_MODES",
    "LossFn",
    "NONFINITE_MODES",
    "check_losses",
    "downsample",
    "per_example_loss",
    "preserved_model_state",
    "replace_nonfinite",
    "score_batch",
    "score_inputs",
]

LossFn = Callable[..., Tensor]
INTERPOLATION_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}


def per_example_loss(loss_fn: LossFn | None) -> LossFn:
    """Return ``loss_fn`` arranged to give one loss per example.

    ``None`` means cross-entropy. A loss module with a ``reduction`` attribute (``nn.CrossEntropyLoss()``)
    is copied with ``reduction="none"``; a function taking a ``reduction`` argument is called
    with ``reduction="none"``; anything else is called as it is and must already return [N].
    """
    if loss_fn is None:
        return lambda outputs, targets: F.cross_entropy(outputs, targets, reduction="none")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> losses, got {loss_fn!r}")
    if isinstance(loss_fn, nn.Module) and isinstance(getattr(loss_fn, "reduction", None), str):
        import copy

        unreduced = copy.copy(loss_fn)
        object.__setattr__(unreduced, "reduction", "none")
        return unreduced
    try:
        takes_reduction = "reduction" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        takes_reduction = False
    if takes_reduction:
        return lambda outputs, targets: loss_fn(outputs, targets, reduction="none")
    return loss_fn


def downsample(inputs: Tensor, scale_factor: float) -> Tensor:
    """Shrink ``inputs`` for the scoring pass only: linear for 3-D, bilinear for 4-D, trilinear for 5-D."""
    if scale_factor == 1.0:
        return inputs
    mode = INTERPOLATION_MODES.get(inputs.dim())
    if mode is None:
        raise ValueError(
            f"scale_factor={scale_factor} needs 3-D, 4-D or 5-D inputs (N, C, ...), got inputs of "
            f"shape {tuple(inputs.shape)}; use scale_factor=1.0 for other inputs"
        )
    return F.interpolate(
        inputs.float() if not inputs.is_floating_point() else inputs,
        scale_factor=scale_factor,
        mode=mode,
        align_corners=False,
        recompute_scale_factor=False,
    )


def _norm_buffers(model: nn.Module) -> list[Tensor]:
    return [
        buf
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        for buf in module.buffers(recurse=False)
    ]


@contextlib.contextmanager
def preserved_model_state(
    model: nn.Module, mode: str, modules: Sequence[nn.Module] | None = None, *, always_buffers: bool = False
) -> Iterator[None]:
    """Put ``model`` in ``mode`` ("eval" or "train") for scoring; afterwards restore every
    module's training flag and every normalisation buffer exactly.

    ``modules`` is ``list(model.modules())`` if the caller has it already (the loader keeps it
    for an epoch: walking the module tree for every batch is a measurable cost).
    ``always_buffers``: save and restore the normalisation buffers in eval mode too (a user's
    ``score_fn`` may switch modules back to train mode).
    """
    wanted = mode == "train"
    modules = list(model.modules()) if modules is None else modules
    flags = [m.training for m in modules]
    saved = [(buf, buf.clone()) for buf in _norm_buffers(model)] if wanted or always_buffers else []
    switch = any(flag != wanted for flag in flags)
    if switch and wanted:
        model.train(True)  # through train(), so modules that override it still see the call
    elif switch:
        for module in modules:  # what eval() does, without its recursion per batch
            object.__setattr__(module, "training", False)
    try:
        yield
    finally:
        if switch:
            for module, flag in zip(modules, flags):  # nn.Module.__setattr__ is slow
                object.__setattr__(module, "training", flag)
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _autocast(inputs: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return contextlib.nullcontext()
    device_type = inputs.device.type if isinstance(inputs, Tensor) else "cpu"
    return torch.autocast(device_type=device_type, dtype=dtype)


def score_inputs(
    model: nn.Module,
    inputs: Any,
    targets: Any,
    loss_fn: LossFn,
    *,
    scale_factor: float = 1.0,
    mode: str = "eval",
    autocast_dtype: torch.dtype | None = None,
    modules: Sequence[nn.Module] | None = None,
) -> Tensor:
    """Per-example losses of ``model`` on ``(inputs, targets)``, under ``no_grad``."""
    with torch.no_grad(), preserved_model_state(model, mode, modules), _autocast(inputs, autocast_dtype):
        small = downsample(inputs, scale_factor) if isinstance(inputs, Tensor) else inputs
        outputs = model(small)
        if not isinstance(outputs, Tensor):
            raise TypeError(
                f"the model returned a {type(outputs).__name__}, not a tensor of logits, so the built-in "
                "loss cannot use it; pass loss_fn=(outputs, targets) -> per-example losses that reads "
                "it, or score_fn=(model, batch) -> per-example losses"
            )
        return loss_fn(outputs, targets)


def score_batch(
    model: nn.Module, batch: Any, config: Any, loss_fn: LossFn | None, modules: Sequence[nn.Module]
) -> tuple[Any, str]:
    """Raw per-example losses of ``batch`` and what produced them (``"score_fn"`` or
    ``"loss_fn"``, for error messages). ``score_fn`` runs under the same guarantees as the
    built-in pass: no gradients, the configured scoring mode, model mode and BatchNorm buffers
    restored, and autocast (NOTE [ Scoring leaves the model untouched ])."""
    if config.score_fn is not None:
        with torch.no_grad(), preserved_model_state(model, config.scoring_mode, modules, always_buffers=True), _autocast(
            _first_tensor(batch), config.autocast_dtype
        ):
            return config.score_fn(model, batch), "score_fn"
    inputs = get_field(batch, config.input_key, argument="input_key")
    targets = get_field(batch, config.target_key, argument="target_key")
    losses = score_inputs(
        model,
        inputs,
        targets,
        loss_fn,  # type: ignore[arg-type]
        scale_factor=config.scale_factor,
        mode=config.scoring_mode,
        autocast_dtype=config.autocast_dtype,
        modules=modules,
    )
    return losses, "loss_fn"


def _first_tensor(batch: Any) -> Tensor | None:
    return next((leaf for leaf in flatten(batch)[0] if isinstance(leaf, Tensor)), None)


NONFINITE_MODES = ("raise", "lowest", "highest")


def replace_nonfinite(losses: Tensor, mode: str) -> Tensor:
    """Rank NaN and infinite losses below (``"lowest"``) or above (``"highest"``) every finite one."""
    bad = ~torch.isfinite(losses)
    if not bool(bad.any()):
        return losses
    finite = losses[~bad]
    low = float(finite.min()) if finite.numel() else 0.0
    high = float(finite.max()) if finite.numel() else 0.0
    fill = low - 1.0 if mode == "lowest" else high + 1.0
    return torch.where(bad, torch.full_like(losses, fill), losses)


def check_losses(
    losses: Any, n: int, *, source: str, ids: Tensor | None = None, nonfinite: str = "raise"
) -> Tensor:
    """Validate per-example losses: a tensor of shape ``[n]`` with finite values.

    ``source`` names what produced them (``"loss_fn"``, ``"score_fn"``, ``"record()"``) so the
    message points at the culprit. ``nonfinite`` other than ``"raise"`` is the explicit opt-in
    to rank NaN and infinite losses lowest or highest instead of failing.
    """
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"{source} must return a tensor of per-example losses of shape [{n}], got "
            f"{type(losses).__name__}"
        )
    if losses.shape != (n,):
        hint = (
            "it returned a scalar: use reduction='none'"
            if losses.dim() == 0
            else "reduce any extra dimensions per example (e.g. losses.mean(dim=1))"
        )
        raise ValueError(
            f"{source} must return one loss per example, shape [{n}], got shape "
            f"{list(losses.shape)}; {hint}"
        )
    if bool(torch.isfinite(losses.detach()).all()):
        return losses.detach()
    if nonfinite != "raise":
        return replace_nonfinite(losses.detach(), nonfinite)
    where = torch.nonzero(~torch.isfinite(losses.detach().cpu())).flatten()
    named = f"example ids {ids.cpu()[where].tolist()[:10]}" if ids is not None else f"batch positions {where.tolist()[:10]}"
    raise ValueError(
        f"{source} returned {where.numel()} non-finite (NaN or infinite) losses at {named}; "
        "fix the model or data (a diverged model, a bad label) before selecting on them, or "
        "pass nonfinite='lowest' or 'highest' to rank them instead"
    )
