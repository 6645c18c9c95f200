"""Resume checks: run a loader uninterrupted and again with chained checkpoints, compare.

Used by the test suite (a small grid) and by ``python -m sbdata.bench.resume`` (a larger one).
A run is a list of yielded batches' example ids. The interrupted run, at each chosen step,
saves the loader's state, round-trips it through ``torch.save``/``torch.load(weights_only=True)``,
builds a brand-new loader (a new ``DataLoader`` and model too, with the global RNG reseeded to
something else, as a new process would have), loads the state, saves and loads it once more
(a checkpoint taken right after a resume), and goes on. Exact means the same ids in the same
batches, in the same order.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["chained_run", "roundtrip", "uninterrupted_run"]

Make = Callable[[], Any]  # builds a fresh SelectiveBatchLoader over a fresh source


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train_step(sb: Any, batch: Any, ids_of: Callable[[Any], torch.Tensor], step: int) -> list[int]:
    ids = ids_of(batch)
    sb.record((ids.double() * 7919 % 10007 + step).float())  # a known loss that changes over time
    return ids.tolist()


def uninterrupted_run(make: Make, epochs: int, ids_of: Callable[[Any], torch.Tensor]) -> list[list[int]]:
    sb, out = make(), []
    for _ in range(epochs):
        for batch in sb:
            out.append(_train_step(sb, batch, ids_of, len(out)))
    return out


def chained_run(
    make: Make, epochs: int, ids_of: Callable[[Any], torch.Tensor], cuts: Sequence[int], reseed: int = 12345
) -> list[list[int]]:
    """The same run, checkpointed and resumed in a new loader after each step in ``cuts``
    (0: before the first batch)."""
    cuts = sorted(set(cuts))
    sb, out = make(), []

    def resume(sb: Any) -> Any:
        state = roundtrip(sb.state_dict())
        torch.manual_seed(reseed + len(out))  # a new process has other global random state
        fresh = make()
        fresh.load_state_dict(state)
        again = make()  # a checkpoint right after a resume, resumed once more
        again.load_state_dict(roundtrip(fresh.state_dict()))
        return again

    if cuts and cuts[0] == 0:
        sb = resume(sb)
    while sb.epoch < epochs:
        for batch in sb:
            out.append(_train_step(sb, batch, ids_of, len(out)))
            if len(out) in cuts:
                sb = resume(sb)
                break
    return out
