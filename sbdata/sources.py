"""Sources: what the loader needs from the thing it wraps.

A source iterates one epoch of batches, says which example ids each batch holds when it
can, and, when it can filter loading, loads only a given list of id batches (stale epochs).

* :class:`IterableSource`: any re-iterable of batches. Ids only from the batch (``index_key``).
* :class:`DataLoaderSource`: a map-style ``torch.utils.data.DataLoader`` (exactly that type, or
  torchdata's ``StatefulDataLoader``), rebuilt once with a :class:`PlannedBatchSampler` that
  records the ids it draws and, in stale epochs, draws a given plan instead.
* ``sbdata.ffcv.FFCVSource``: an FFCV ``Loader`` (in its own module, imported only when used).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from .batches import batch_length

__all__ = [
    "DataLoaderSource",
    "IterableSource",
    "PlannedBatchSampler",
    "Source",
    "default_batch_sizes",
    "forward_set_epoch",
    "make_source",
]


def forward_set_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader, its batch sampler, sampler and dataset, once each."""
    seen: set[int] = set()
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = [
        loader,
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
        getattr(loader, "sampler", None),
        getattr(loader, "dataset", None),
    ]
    for obj in candidates:
        fn = getattr(obj, "set_epoch", None)
        if obj is None or id(obj) in seen or not callable(fn):
            continue
        seen.add(id(obj))
        fn(epoch)


def default_batch_sizes(num_examples: int, batch_size: int, drop_last: bool) -> list[int]:
    """Sizes of the batches a ``BatchSampler`` makes from ``num_examples`` examples."""
    full, rest = divmod(num_examples, batch_size)
    return [batch_size] * full + ([rest] if rest and not drop_last else [])


class Source:
    """Base class: a source that streams whole epochs and knows no ids."""

    can_filter = False  # stale epochs can load only the selected ids
    provides_ids = False  # batches come with their example ids

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._observed_sizes: list[int] | None = None

    def set_epoch(self, epoch: int) -> None:
        forward_set_epoch(self.loader, epoch)

    def batch_size(self) -> int | None:
        """The loader's ``batch_size``, or its batch sampler's (``DataLoader(batch_sampler=...)``,
        Accelerate's ``DataLoaderShard``)."""
        for owner in (self.loader, getattr(self.loader, "batch_sampler", None)):
            size = getattr(owner, "batch_size", None)
            if isinstance(size, int) and size > 0:
                return size
        return None

    def num_examples(self) -> int | None:
        """Examples in the dataset, when the loader exposes a sized ``dataset``."""
        dataset = getattr(self.loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset):
            return None
        try:
            return len(dataset)
        except TypeError:
            return None

    def batch_sizes(self) -> list[int] | None:
        """Sizes of one epoch's source batches, or ``None`` while unknown."""
        computed = _dataloader_batch_sizes(self.loader)
        return computed if computed is not None else self._observed_sizes

    def observe_sizes(self, sizes: list[int]) -> None:
        """Remember the batch sizes of a complete epoch (used when they cannot be computed)."""
        self._observed_sizes = list(sizes)

    @contextlib.contextmanager
    def epoch(self) -> Iterator[Iterator[tuple[Any, Tensor | None]]]:
        """An iterator of ``(batch, ids or None)`` over a whole epoch; closed on exit."""
        it = iter(self.loader)
        try:
            yield ((batch, None) for batch in it)
        finally:
            _close_iterator(it)

    def candidates(self) -> list[Tensor]:
        """This epoch's id batches before loading; only sources with ``can_filter``."""
        raise RuntimeError(f"{type(self).__name__} cannot list an epoch's ids before loading it")

    @contextlib.contextmanager
    def load(self, plan: Sequence[Tensor]) -> Iterator[Iterator[tuple[Any, Tensor]]]:
        """Load exactly ``plan``'s id batches; only sources with ``can_filter``."""
        raise RuntimeError(f"{type(self).__name__} cannot load a chosen subset of ids")
        yield iter(())  # unreachable: makes this a generator for contextmanager


def _dataloader_batch_sizes(loader: Any) -> list[int] | None:
    """Batch sizes of a DataLoader epoch when its batch sampler is torch's own ``BatchSampler``."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    inner = loader.batch_sampler
    if type(inner) is not BatchSampler:
        return None
    try:
        return default_batch_sizes(len(inner.sampler), inner.batch_size, inner.drop_last)  # type: ignore[arg-type]
    except TypeError:
        return None


class IterableSource(Source):
    """Any re-iterable of batches (a list, a generator-producing class, airbench-style loaders)."""

    def batch_sizes(self) -> list[int] | None:
        if isinstance(self.loader, (list, tuple)):  # batches already in memory: just count
            return [batch_length(batch) for batch in self.loader]
        return super().batch_sizes()


def _close_iterator(it: Any) -> None:
    """End an abandoned iterator now: worker processes and threads must not outlive the epoch.

    torch's multi-process iterator shuts its workers down in ``_shutdown_workers`` (also called
    from ``__del__``); calling it here does not wait for garbage collection. Persistent workers
    are left to the DataLoader, which resets them on the next ``iter()``.
    """
    close = getattr(it, "close", None)
    if callable(close):
        close()
        return
    shutdown = getattr(it, "_shutdown_workers", None)  # torch private; the only place we use it
    if callable(shutdown) and not getattr(it, "_persistent_workers", False):
        shutdown()


class PlannedBatchSampler:
    """Wraps a DataLoader's batch sampler: records the id batches it draws (FIFO, paired with
    yielded batches in order) and, when given a plan, draws that plan instead for one pass."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batch_size = getattr(inner, "batch_size", None)
        self.drop_last = getattr(inner, "drop_last", False)
        self.sampler = getattr(inner, "sampler", None)
        self.drawn: collections.deque[Tensor] = collections.deque()
        self._plan: list[Tensor] | None = None

    def set_plan(self, plan: Sequence[Tensor] | None) -> None:
        self._plan = None if plan is None else [torch.as_tensor(p, dtype=torch.long) for p in plan]

    def set_epoch(self, epoch: int) -> None:
        forward_set_epoch(self.inner, epoch)

    def __iter__(self) -> Iterator[list[int]]:
        self.drawn.clear()
        plan, self._plan = self._plan, None
        batches: Iterable[Any] = plan if plan is not None else self.inner
        for batch in batches:
            ids = torch.as_tensor(batch, dtype=torch.long)
            self.drawn.append(ids)
            yield ids.tolist()

    def __len__(self) -> int:
        return len(self._plan) if self._plan is not None else len(self.inner)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["drawn"] = collections.deque()
        return state

    def state_dict(self) -> dict[str, Any]:
        fn = getattr(self.inner, "state_dict", None)
        return fn() if callable(fn) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fn = getattr(self.inner, "load_state_dict", None)
        if callable(fn) and state:
            fn(state)


def _rebuildable_types() -> tuple[type, ...]:
    types: list[type] = [DataLoader]
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader

        types.append(StatefulDataLoader)
    except ImportError:
        pass
    return tuple(types)


_BATCHING_ARGS = {"dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"}


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
        # NOTE [ in_order ] recorded ids pair with batches by position; out-of-order delivery
        # would give losses to the wrong examples.
        warnings.warn(
            "in_order=False reorders batches, so recorded ids could not be matched to them; "
            "sbdata rebuilds the loader with in_order=True (or return ids from the dataset and "
            "pass index_key=... to keep in_order=False)",
            stacklevel=4,
        )
        kwargs["in_order"] = True
    return cls(loader.dataset, batch_sampler=batch_sampler, **kwargs)


class DataLoaderSource(Source):
    """A map-style DataLoader rebuilt with a :class:`PlannedBatchSampler`."""

    can_filter = True
    provides_ids = True
    plans_every_epoch = True  # fresh epochs too: ids drawn up front, so resume is exact

    def __init__(self, loader: DataLoader) -> None:
        super().__init__(loader)
        self.original = loader
        self.sampler = PlannedBatchSampler(loader.batch_sampler)
        self.loader = _rebuild(loader, self.sampler)

    def set_epoch(self, epoch: int) -> None:
        forward_set_epoch(self.original, epoch)

    def batch_sizes(self) -> list[int] | None:
        computed = _dataloader_batch_sizes(self.original)
        return computed if computed is not None else self._observed_sizes

    @contextlib.contextmanager
    def epoch(self) -> Iterator[Iterator[tuple[Any, Tensor | None]]]:
        self.sampler.set_plan(None)
        with self._paired() as pairs:
            yield pairs

    def candidates(self) -> list[Tensor]:
        """This epoch's id batches, as the user's own batch sampler draws them."""
        return [torch.as_tensor(b, dtype=torch.long) for b in self.sampler.inner]

    @contextlib.contextmanager
    def load(self, plan: Sequence[Tensor]) -> Iterator[Iterator[tuple[Any, Tensor]]]:
        self.sampler.set_plan(plan)
        with self._paired() as pairs:
            yield pairs  # type: ignore[misc]

    @contextlib.contextmanager
    def _paired(self) -> Iterator[Iterator[tuple[Any, Tensor]]]:
        it = iter(self.loader)

        def pairs() -> Iterator[tuple[Any, Tensor]]:
            for batch in it:
                yield batch, self.sampler.drawn.popleft()

        try:
            yield pairs()
        finally:
            _close_iterator(it)


def make_source(loader: Any, *, need_ids: bool) -> Source:
    """Pick the source for ``loader``. ``need_ids``: stale mode wants filterable loading."""
    if not isinstance(loader, Iterable):
        raise TypeError(
            f"loader must be a DataLoader, an FFCV Loader or a re-iterable of batches, got "
            f"{type(loader).__name__}"
        )
    if isinstance(loader, Iterator):
        raise TypeError(
            f"loader is a one-shot iterator ({type(loader).__name__}); it would be empty after the "
            "first epoch. Pass a re-iterable (a DataLoader, a list, or an object whose __iter__ "
            "starts a new pass)"
        )
    if _is_ffcv_loader(loader):
        from .ffcv import FFCVSource

        return FFCVSource(loader)
    if need_ids and type(loader) in _rebuildable_types():
        if not isinstance(loader.dataset, IterableDataset):
            return DataLoaderSource(loader)
    return IterableSource(loader)


def _is_ffcv_loader(loader: Any) -> bool:
    return any(
        cls.__module__.startswith("ffcv.") and cls.__name__ == "Loader" for cls in type(loader).__mro__
    )
