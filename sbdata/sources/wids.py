"""WebDataset's map-style ``wids`` in a ``DataLoader``: its shard-aware samplers, made to resume.

A ``DataLoader`` over a ``wids.ShardListDataset`` is an ordinary map-style ``DataLoader``: ids
are dataset indices, and :class:`~sbdata.sources.dataloader.DataLoaderSource` loads (opens,
reads and decodes) only the selected samples in stale epochs. What needs care is wids' own
samplers, ``ChunkedSampler`` (and ``DistributedChunkedSampler``, which returns one) and
``ShardListSampler``: they seed each pass from ``seed`` and their ``epoch`` attribute, and add
one to ``epoch`` at the end of every pass. ``ShardListSampler`` has no ``set_epoch``, so its
order would depend on how many passes it made (a resumed process would start again from its
first order), and a second pass in one epoch would draw the next epoch's order. It has no
``__len__`` either, so a ``DataLoader`` over it cannot compute its batch sizes.

:class:`WidsSource` pins the sampler's ``epoch`` to sbdata's epoch while it draws an epoch's id
batches, so every epoch's order is a pure function of the sampler's ``seed`` and the epoch
(NOTE [ Orders that resume ] in :mod:`sbdata.sources.dataloader`), as for ``RandomSampler``;
where the sampler has no length it counts the batch sizes from one epoch's id batches.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .dataloader import DataLoaderSource

__all__ = ["WidsSource", "wids_sampler"]

_SAMPLERS = ("ChunkedSampler", "ShardListSampler")


def wids_sampler(loader: Any) -> Any:
    """The wids sampler a ``DataLoader`` draws from (directly or inside its batch sampler), if any."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (getattr(batch_sampler, "sampler", None), batch_sampler, getattr(loader, "sampler", None)):
        cls = type(obj)
        if cls.__module__.split(".")[0] == "wids" and cls.__name__ in _SAMPLERS and hasattr(obj, "epoch"):
            return obj
    return None


class WidsSource(DataLoaderSource):
    """A map-style ``DataLoader`` drawing from a wids sampler, its ``epoch`` pinned per epoch."""

    def __init__(self, loader: Any) -> None:
        super().__init__(loader)
        self._wids = wids_sampler(loader)

    @property
    def reproducible_order(self) -> bool:  # type: ignore[override]
        """Always: the pinned ``epoch`` and the sampler's ``seed`` decide each epoch's order."""
        return True

    def batch_sizes(self) -> list[int] | None:
        """Computed where the sampler has a length; else counted from one epoch's id batches
        (``ShardListSampler`` has no ``__len__``; drawing ids loads nothing)."""
        computed = super().batch_sizes()
        if computed is None:
            computed = self._observed_sizes = [c.numel() for c in self.candidates()]
        return computed

    def candidates(self) -> list[Tensor]:
        sampler = self._wids
        sampler.epoch = self._epoch  # the pass draws this epoch's order ...
        try:
            return super().candidates()
        finally:
            sampler.epoch = self._epoch  # ... and leaves it there (a pass adds one)
