"""What the loader needs from the thing it wraps: the :class:`Source` interface.

A source iterates one epoch of batches and says which example ids each batch holds when it
can. A source that ``loads_ids`` also lists an epoch's id batches before loading them
(:meth:`Source.candidates`) and loads any given list of id batches (:meth:`Source.load`):
that is what lets a stale epoch skip loading the examples it does not select, and what makes
every epoch's position a list of ids a checkpoint can name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

__all__ = ["Source", "close_iterator", "default_batch_sizes", "forward_set_epoch"]

#: ``(batch, ids)`` pairs; ids is ``None`` where the source does not know them
Pairs = Iterator[tuple[Any, "Tensor | None"]]


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


def dataloader_batch_sizes(loader: Any) -> list[int] | None:
    """Batch sizes of a DataLoader epoch when its batch sampler is torch's own ``BatchSampler``."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    inner: Any = loader.batch_sampler
    try:
        if type(inner) is BatchSampler:
            return default_batch_sizes(len(inner.sampler), inner.batch_size, inner.drop_last)  # type: ignore[arg-type]
        if _full_batches_only(inner):
            return [inner.batch_size] * len(inner)
    except TypeError:
        return None
    return None


def _full_batches_only(batch_sampler: Any) -> bool:
    """Accelerate's ``BatchSamplerShard`` with ``even_batches`` (its default) or ``drop_last``
    and no ``split_batches`` gives every rank ``len()`` full batches."""
    return (
        type(batch_sampler).__name__ == "BatchSamplerShard"
        and not getattr(batch_sampler, "split_batches", True)
        and bool(getattr(batch_sampler, "even_batches", False) or getattr(batch_sampler, "drop_last", False))
    )


def close_iterator(it: Any) -> None:
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


class Source:
    """A source that streams whole epochs; subclasses declare what more they can do.

    Declared capabilities (class attributes, read by the loader; nothing else is probed):

    * ``loads_ids``: :meth:`candidates` and :meth:`load` work, and every batch comes with its ids.
    * ``recycles_buffers``: yielded tensors are views into buffers the source overwrites on a
      later ``next()`` (FFCV), so rows are copied before the next batch is requested.
    * ``stateful``: the wrapped loader has its own ``state_dict``/``load_state_dict`` position
      (torchdata's ``StatefulDataLoader`` streamed as it is).
    * ``reproducible_order``: :meth:`candidates` draws the same id batches for an epoch again
      after a restart (with the same :meth:`state_dict`), so a checkpoint names the position
      in them instead of saving them.
    """

    loads_ids = False
    recycles_buffers = False
    stateful = False
    reproducible_order = False

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._observed_sizes: list[int] | None = None

    @property
    def original(self) -> Any:
        """The loader as the user passed it."""
        return self.loader

    def set_epoch(self, epoch: int) -> None:
        forward_set_epoch(self.original, epoch)

    def batch_size(self) -> int | None:
        """The loader's ``batch_size``, or its batch sampler's (``DataLoader(batch_sampler=...)``,
        Accelerate's ``DataLoaderShard``)."""
        for owner in (self.original, getattr(self.original, "batch_sampler", None)):
            size = getattr(owner, "batch_size", None)
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                return size
        return None

    def drop_last(self) -> bool:
        """Whether the wrapped loader drops its partial last batch."""
        for owner in (self.original, getattr(self.original, "batch_sampler", None)):
            value = getattr(owner, "drop_last", None)
            if isinstance(value, bool):
                return value
        return False

    def num_examples(self) -> int | None:
        """Examples in the dataset, when the loader exposes a sized map-style ``dataset``."""
        dataset = getattr(self.original, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset):
            return None
        try:
            return len(dataset)
        except TypeError:
            return None

    def batch_sizes(self) -> list[int] | None:
        """Sizes of one epoch's source batches, or ``None`` while unknown."""
        computed = dataloader_batch_sizes(self.original)
        return computed if computed is not None else self._observed_sizes

    def observe_sizes(self, sizes: list[int]) -> None:
        """Remember the batch sizes of a complete epoch (used when they cannot be computed)."""
        self._observed_sizes = list(sizes)

    @contextlib.contextmanager
    def epoch(self) -> Iterator[Pairs]:
        """``(batch, ids or None)`` over a whole epoch; the underlying iterator is closed on exit."""
        it = iter(self.loader)
        try:
            yield ((batch, None) for batch in it)
        finally:
            close_iterator(it)

    def candidates(self) -> list[Tensor]:
        """This epoch's id batches before loading (``loads_ids`` sources only)."""
        raise RuntimeError(f"{type(self).__name__} cannot list an epoch's ids before loading it")

    @contextlib.contextmanager
    def load(self, plan: Iterable[Tensor]) -> Iterator[Iterator[tuple[Any, Tensor]]]:
        """Load exactly ``plan``'s id batches, in order (``loads_ids`` sources only). ``plan``
        may be lazy (each id batch is decided when it is asked for): consume it as you load."""
        raise RuntimeError(f"{type(self).__name__} cannot load a chosen list of ids")
        yield iter(())  # unreachable: makes this a generator for contextmanager

    def state_dict(self) -> dict[str, Any]:
        """What the source keeps across epochs (a seed), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def position(self) -> dict[str, Any]:
        """The wrapped loader's own position in the epoch (``stateful`` sources only)."""
        return {}

    def load_position(self, state: dict[str, Any]) -> None:
        """Restore :meth:`position` before the next :meth:`epoch` (``stateful`` sources only)."""
