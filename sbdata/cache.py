"""The loss cache of stale mode: the last loss of every example and the epoch it was measured.

Storage is two flat tensors indexed by example id, ``float32`` loss and ``int32`` epoch: 8
bytes per example (10 MB for ImageNet-1k). Reads and writes touch only the ids of one batch,
never the whole table. The table grows (doubling) when an id beyond its end arrives, so the
dataset size need not be known up front.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["LossCache", "grown"]

_NEVER = -1  # epoch stored for ids that were never measured


def grown(table: Tensor, needed: int, fill: float | int = 0) -> Tensor:
    """``table`` itself if it holds ``needed`` entries, else a copy at least twice as long
    (and at least 1024), the new tail set to ``fill``: amortised O(1) growth per id."""
    if needed <= table.numel():
        return table
    out = torch.full((max(needed, 2 * table.numel(), 1024),), fill, dtype=table.dtype)
    out[: table.numel()] = table
    return out


class LossCache:
    """Per-example losses keyed by integer example id (``0 <= id``)."""

    def __init__(self, size: int = 0) -> None:
        self._loss = torch.zeros(size, dtype=torch.float32)
        self._epoch = torch.full((size,), _NEVER, dtype=torch.int32)

    def __len__(self) -> int:
        """Capacity: ids below this are stored (measured or not)."""
        return self._loss.numel()

    @property
    def nbytes(self) -> int:
        return self._loss.element_size() * self._loss.numel() + self._epoch.element_size() * self._epoch.numel()

    def _grow(self, needed: int) -> None:
        self._loss, self._epoch = grown(self._loss, needed), grown(self._epoch, needed, _NEVER)

    @staticmethod
    def _as_ids(ids: Tensor) -> Tensor:
        ids = torch.as_tensor(ids).flatten()
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"example ids must be integers, got dtype {ids.dtype}")
        ids = ids.cpu().long()
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"example ids must be >= 0, got {int(ids.min())}")
        return ids

    def update(self, ids: Tensor, losses: Tensor, epoch: int) -> None:
        """Store ``losses[i]`` as the loss of example ``ids[i]``, measured in ``epoch``."""
        ids = self._as_ids(ids)
        if ids.numel() == 0:
            return
        self._grow(int(ids.max()) + 1)
        self._loss[ids] = losses.detach().float().cpu().flatten()
        self._epoch[ids] = epoch

    def lookup(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(losses, known)`` for ``ids``; ``known`` is False where no loss was ever stored."""
        ids = self._as_ids(ids)
        inside = ids < len(self)
        losses = torch.zeros(ids.numel(), dtype=torch.float32)
        epochs = torch.full((ids.numel(),), _NEVER, dtype=torch.int32)
        losses[inside] = self._loss[ids[inside]]
        epochs[inside] = self._epoch[ids[inside]]
        return losses, epochs != _NEVER

    def measured_epoch(self, ids: Tensor) -> Tensor:
        """The epoch each id's loss was measured in (-1: never)."""
        ids = self._as_ids(ids)
        out = torch.full((ids.numel(),), _NEVER, dtype=torch.int32)
        inside = ids < len(self)
        out[inside] = self._epoch[ids[inside]]
        return out

    def known_count(self) -> int:
        return int((self._epoch != _NEVER).sum())

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self._loss.clone(), "epoch": self._epoch.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loss = state["loss"].float().clone()
        self._epoch = state["epoch"].to(torch.int32).clone()
