"""A map-style ``torch.utils.data.DataLoader`` as a source that loads chosen ids.

The user's DataLoader is rebuilt once, every argument kept, with a :class:`PlannedBatchSampler`
in place of its batch sampler. Each epoch, sbdata first draws the epoch's id batches from the
user's own batch sampler (:meth:`DataLoaderSource.candidates`), then has the rebuilt loader
load exactly the id batches it chose: all of them in plain and fresh epochs, only the selected
ids in stale epochs. Batch ``k`` of a pass holds plan ``k``'s ids, so ids never need probing.

NOTE [ One worker pool ]
Only the rebuilt loader is ever iterated. If the user's loader already has a persistent worker
pool (it was iterated before being wrapped), that pool is shut down at wrapping time, so a job
never holds two pools of workers (and two copies of the dataset per worker).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from .base import Source, close_iterator, dataloader_batch_sizes, forward_set_epoch

__all__ = ["DataLoaderSource", "PlannedBatchSampler", "rebuildable"]


class PlannedBatchSampler:
    """A batch sampler that yields the id batches it was last given (one pass per plan).

    It looks like the user's batch sampler (``batch_size``, ``drop_last``, ``sampler``), which
    ``inner`` keeps; ``set_epoch`` is forwarded to it.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batch_size = getattr(inner, "batch_size", None)
        self.drop_last = getattr(inner, "drop_last", False)
        self.sampler = getattr(inner, "sampler", None)
        self._plan: list[list[int]] = []

    def set_plan(self, plan: Sequence[Tensor]) -> None:
        self._plan = [torch.as_tensor(p, dtype=torch.long).tolist() for p in plan]

    def set_epoch(self, epoch: int) -> None:
        forward_set_epoch(self.inner, epoch)

    def __iter__(self) -> Iterator[list[int]]:
        plan, self._plan = self._plan, []
        yield from plan

    def __len__(self) -> int:
        return len(self._plan)


_BATCHING_ARGS = {"dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"}


def rebuildable(loader: Any) -> bool:
    """A map-style ``DataLoader`` (exactly that type) or torchdata's ``StatefulDataLoader``."""
    types: list[type] = [DataLoader]
    with contextlib.suppress(ImportError):
        from torchdata.stateful_dataloader import StatefulDataLoader

        types.append(StatefulDataLoader)
    return type(loader) in types and not isinstance(loader.dataset, IterableDataset)


def _rebuild(loader: DataLoader, batch_sampler: PlannedBatchSampler) -> DataLoader:
    """The same loader with ``batch_sampler`` swapped in; every other argument is kept."""
    cls = type(loader)
    kwargs: dict[str, Any] = {}
    for name in inspect.signature(cls.__init__).parameters:
        if name in _BATCHING_ARGS or name == "self" or not hasattr(loader, name):
            continue
        kwargs[name] = getattr(loader, name)
    if kwargs.get("num_workers", 0) == 0:
        kwargs.pop("prefetch_factor", None)
        kwargs["persistent_workers"] = False
    if kwargs.get("in_order") is False:
        # Batch k of a pass must hold plan k's ids; out-of-order delivery would break that.
        warnings.warn(
            "in_order=False reorders batches, so their ids could not be known; sbdata rebuilds "
            "the loader with in_order=True",
            stacklevel=5,
        )
        kwargs["in_order"] = True
    return cls(loader.dataset, batch_sampler=batch_sampler, **kwargs)


def release_workers(loader: DataLoader) -> None:
    """Shut down a DataLoader's persistent worker pool, if it has one (NOTE [ One worker pool ])."""
    it = getattr(loader, "_iterator", None)  # torch keeps the persistent iterator here
    shutdown = getattr(it, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    if it is not None:
        loader._iterator = None


class DataLoaderSource(Source):
    """A map-style DataLoader, rebuilt with a :class:`PlannedBatchSampler`."""

    loads_ids = True

    def __init__(self, loader: DataLoader) -> None:
        super().__init__(loader)
        self._original = loader
        self.sampler = PlannedBatchSampler(loader.batch_sampler)
        self.loader = _rebuild(loader, self.sampler)
        release_workers(loader)

    @property
    def original(self) -> Any:
        return self._original

    def batch_sizes(self) -> list[int] | None:
        computed = dataloader_batch_sizes(self._original)
        return computed if computed is not None else self._observed_sizes

    def candidates(self) -> list[Tensor]:
        """This epoch's id batches, as the user's own batch sampler draws them."""
        return [torch.as_tensor(b, dtype=torch.long) for b in self.sampler.inner]

    @contextlib.contextmanager
    def epoch(self) -> Iterator[Iterator[tuple[Any, Tensor | None]]]:
        with self.load(self.candidates()) as pairs:
            yield pairs  # type: ignore[misc]

    @contextlib.contextmanager
    def load(self, plan: Sequence[Tensor]) -> Iterator[Iterator[tuple[Any, Tensor]]]:
        plan = [torch.as_tensor(p, dtype=torch.long) for p in plan]
        if not plan:
            yield iter(())
            return
        self.sampler.set_plan(plan)
        it = iter(self.loader)
        try:
            yield zip(it, plan)
        finally:
            close_iterator(it)
