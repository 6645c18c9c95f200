"""A ``torchdata.nodes`` pipeline as a source that loads chosen ids.

What sbdata recognises is the map-style shape of a ``torchdata.nodes`` graph: id batches first,
loading after. The bottom of the graph draws **id batches**, either
``Batcher(SamplerWrapper(sampler), batch_size, drop_last)`` or ``SamplerWrapper(batch_sampler)``;
above it sit one or more ``ParallelMapper``/``Mapper`` nodes (the lowest loads an id batch, as
``lambda ids: collate([dataset[i] for i in ids])``; any above it transform whole batches), and
optionally ``Prefetcher``/``PinMemory`` nodes; the ``torchdata.nodes.Loader`` wraps the root.
:func:`nodes_pipeline` builds exactly that graph from a map-style dataset.

The graph is rebuilt once, every node's arguments kept, with a :class:`PlannedIds` node in
place of the id-batch node. Each epoch sbdata draws the epoch's id batches from the user's own
sampler (:meth:`NodesSource.candidates`) and feeds the rebuilt graph only the id batches it
chose (all of them in plain and fresh epochs, only the selected ids in stale epochs), so the
mapping function is never called for a skipped example. The plan is read lazily, in the main
thread, a few id batches ahead of the batch being returned (as many as the graph has in flight:
its mappers' ``max_concurrent`` and prefetch factors), never from the graph's own threads.
Every mapper is rebuilt with ``in_order=True``, so batch ``k`` holds id batch ``k``.

Orders follow NOTE [ Orders that resume ] in :mod:`sbdata.sources.dataloader`: where the
sampler draws from a ``generator``, each epoch's draw uses one seeded from the sampler's seed
and the epoch, and ``set_epoch`` reaches the sampler (a ``DistributedSampler``) each epoch;
``SamplerWrapper``'s own epoch counter is not used. A mid-epoch position is sbdata's plan and
the count of id batches consumed, like a ``DataLoader``'s; the ``Loader``'s own ``state_dict``
is what sbdata saves for a ``torchdata.nodes.Loader`` of any other shape, which it streams as it
is (every example loaded).
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    default_collate,
)
from torchdata import nodes

from .base import Source, default_batch_sizes
from .dataloader import drawn_with, epoch_order_generator, order_seed

__all__ = ["LoadBatch", "NodesSource", "PlannedIds", "nodes_pipeline", "nodes_source"]

_END = object()  # the plan is exhausted
_POLL = 0.1  # seconds between checks of a closed feed while waiting for an id batch
_NOT_ONE_TO_ONE = (
    "the torchdata.nodes graph yielded {} batches than it was given id batches: every node above the "
    "id batches must turn one batch into one batch"
)


# ---------------------------------------------------------------------- building a pipeline


class LoadBatch:
    """Load one id batch from a map-style dataset: ``collate_fn([dataset[i] for i in ids])``
    (``dataset.__getitems__(ids)`` where the dataset has it, as a ``DataLoader`` does).
    A plain class, so ``method="process"`` can pickle it."""

    def __init__(self, dataset: Any, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn if collate_fn is not None else default_collate

    def __call__(self, ids: list[int]) -> Any:
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(list(ids)) if callable(getitems) else [self.dataset[i] for i in ids]
        return self.collate_fn(items)


def nodes_pipeline(
    dataset: Any,
    *,
    batch_size: int,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    method: str = "thread",
    collate_fn: Callable[[list[Any]], Any] | None = None,
    prefetch_factor: int | None = None,
    generator: torch.Generator | None = None,
) -> Any:
    """A ``torchdata.nodes.Loader`` over a map-style dataset, shaped so sbdata can filter it:
    ``Batcher(SamplerWrapper(sampler)) -> ParallelMapper(LoadBatch(dataset, collate_fn))
    [-> Prefetcher] -> Loader``. The arguments mean what they mean for a ``DataLoader``
    (``method``: ``"thread"`` or ``"process"`` workers, as ``ParallelMapper`` takes it).

    The result is an ordinary ``torchdata.nodes.Loader``: iterate it, checkpoint it with its
    ``state_dict``, or wrap it in :class:`~sbdata.SelectiveBatchLoader`, whose stale epochs then
    call ``dataset[i]`` only for the selected ids.
    """
    if sampler is not None and shuffle:
        raise ValueError("give either sampler= or shuffle=True, not both (as for a DataLoader)")
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    node: Any = nodes.Batcher(nodes.SamplerWrapper(sampler), batch_size=batch_size, drop_last=drop_last)
    node = nodes.ParallelMapper(node, LoadBatch(dataset, collate_fn), num_workers=num_workers, method=method)
    if prefetch_factor:
        node = nodes.Prefetcher(node, prefetch_factor=prefetch_factor)
    return nodes.Loader(node)


# ---------------------------------------------------------------------- reading a pipeline


class _Graph:
    """The parts of a recognised graph: the nodes above the id batches (root first), and where
    the id batches come from (a sampler cut by ``batch_size``, or a batch sampler)."""

    def __init__(self, above: list[Any], sampler: Any, batch_size: int | None, drop_last: bool) -> None:
        self.above = above
        self.sampler = sampler  # a sampler of ids (batch_size set) or a batch sampler (batch_size None)
        self.batch_size = batch_size
        self.drop_last = drop_last


def _read_graph(loader: Any) -> _Graph | None:
    above: list[Any] = []
    node: Any = getattr(loader, "root", None)
    while type(node) in (nodes.ParallelMapper, nodes.Prefetcher, nodes.PinMemory):
        if type(node) is nodes.ParallelMapper and node.prebatch is not None:
            return None  # maps single examples of pre-batched chunks: not one call per id batch
        above.append(node)
        node = node.source
    if type(node) is nodes.Batcher and type(node.source) is nodes.SamplerWrapper:
        return _Graph(above, node.source.sampler, int(node.batch_size), bool(node.drop_last))
    if type(node) is nodes.SamplerWrapper:
        inner = node.sampler
        return _Graph(above, inner, None, bool(getattr(inner, "drop_last", False)))
    return None


class PlannedIds(nodes.BaseNode):
    """The node that replaces the user's id batches: it yields the id batches it is fed (one
    pass per :meth:`begin`), then ends. It is fed from the main thread and may be read from the
    graph's own threads; a closed feed ends at once, so no thread waits on it forever."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._ended = False
        self._given = 0

    def begin(self) -> None:
        self._queue, self._closed, self._ended, self._given = queue.Queue(), threading.Event(), False, 0

    def put(self, ids: list[int]) -> None:
        self._queue.put(ids)

    def end(self) -> None:
        self._queue.put(_END)

    def close(self) -> None:
        self._closed.set()
        self._queue.put(_END)

    def reset(self, initial_state: dict[str, Any] | None = None) -> None:
        super().reset(initial_state)

    def next(self) -> list[int]:
        feed, closed = self._queue, self._closed
        while not self._ended:
            try:
                item = feed.get(timeout=_POLL)
            except queue.Empty:
                if closed.is_set():
                    break
                continue
            if item is _END:
                break
            self._given += 1
            return item
        self._ended = True
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"given": self._given}


def _rebuild(above: list[Any], bottom: Any) -> Any:
    """The nodes ``above`` (root first) rebuilt over ``bottom``, every argument kept;
    mappers with ``in_order=True``."""
    node = bottom
    for old in reversed(above):
        if type(old) is nodes.ParallelMapper:
            if not old.in_order:
                warnings.warn(
                    "ParallelMapper(in_order=False) reorders batches, so their ids could not be known; "
                    "sbdata rebuilds the pipeline with in_order=True",
                    stacklevel=5,
                )
            node = nodes.ParallelMapper(
                node,
                old.map_fn,
                num_workers=old.num_workers,
                in_order=True,
                method=old.method,
                multiprocessing_context=old.multiprocessing_context,
                max_concurrent=old.max_concurrent,
                snapshot_frequency=old.snapshot_frequency,
            )
        elif type(old) is nodes.Prefetcher:
            node = nodes.Prefetcher(node, prefetch_factor=old.prefetch_factor, snapshot_frequency=old.snapshot_frequency)
        else:  # PinMemory
            device = getattr(old, "_pin_memory_device", None) or ""
            node = nodes.PinMemory(node, pin_memory_device=device, snapshot_frequency=old.snapshot_frequency)
    return node


def _in_flight(above: list[Any]) -> int:
    """How many id batches the graph can hold at once: what the plan is read ahead by."""
    total = 0
    for node in above:
        if type(node) is nodes.ParallelMapper and node.num_workers > 0:
            total += node.max_concurrent or 2 * node.num_workers
        elif type(node) is nodes.Prefetcher:
            total += node.prefetch_factor
        elif type(node) is nodes.PinMemory:
            total += 1
    return max(1, total)


def _stop_threads(root: Any) -> None:
    """Stop the threads and worker processes of a graph's current pass now (torchdata stops
    them in ``_shutdown``, also called from ``__del__``; this does not wait for the GC)."""
    node, seen = root, 0
    while node is not None and seen < 64:
        seen += 1
        it = getattr(node, "_it", None)
        for inner in (it, getattr(it, "_it", None)):
            shutdown = getattr(inner, "_shutdown", None)  # torchdata private; guarded
            if callable(shutdown):
                shutdown()
        node = getattr(node, "source", None)


# ---------------------------------------------------------------------- the source


class NodesSource(Source):
    """A recognised ``torchdata.nodes.Loader`` (see the module docstring), rebuilt to load
    chosen id batches."""

    loads_ids = True

    def __init__(self, loader: Any, graph: _Graph) -> None:
        super().__init__(loader)
        self._original = loader
        self._graph = graph
        self._ids = PlannedIds()
        self._root = _rebuild(graph.above, self._ids)
        self._ahead = _in_flight(graph.above)
        _stop_threads(loader.root)  # a pass of the user's own graph that was started: one pool of workers
        self._random = _random_sampler(graph.sampler)
        self.order_seed = order_seed(self._random)
        self._epoch = 0

    @property
    def original(self) -> Any:
        return self._original

    @property
    def reproducible_order(self) -> bool:  # type: ignore[override]
        """Random samplers draw from a per-epoch generator (NOTE [ Orders that resume ]); torch's
        sequential and distributed samplers are pure functions of their seed and epoch."""
        sampler = self._graph.sampler
        inner = [sampler, getattr(sampler, "sampler", None)]
        return self._random is not None or any(type(s) in (SequentialSampler, DistributedSampler) for s in inner)

    def set_epoch(self, epoch: int) -> None:
        seen: set[int] = set()
        for obj in (self._graph.sampler, getattr(self._graph.sampler, "sampler", None)):
            fn = getattr(obj, "set_epoch", None)
            if obj is not None and id(obj) not in seen and callable(fn):
                seen.add(id(obj))
                fn(epoch)
        self._epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"order_seed": self.order_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order_seed = int(state["order_seed"])

    def batch_size(self) -> int | None:
        graph = self._graph
        size = graph.batch_size if graph.batch_size is not None else getattr(graph.sampler, "batch_size", None)
        return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None

    def drop_last(self) -> bool:
        return self._graph.drop_last

    def num_examples(self) -> int | None:
        """The dataset's size: from :class:`LoadBatch`'s dataset, else the sampler's."""
        owners = [getattr(node, "map_fn", None) for node in self._graph.above]
        sampler = self._graph.sampler
        owners += [sampler, getattr(sampler, "sampler", None)]
        for owner in owners:
            for name in ("dataset", "data_source"):
                data = getattr(owner, name, None)
                if data is None or isinstance(data, IterableDataset):
                    continue
                try:
                    return len(data)
                except TypeError:
                    continue
        return None

    def batch_sizes(self) -> list[int] | None:
        graph = self._graph
        try:
            if graph.batch_size is not None:
                return default_batch_sizes(len(graph.sampler), graph.batch_size, graph.drop_last)
            if type(graph.sampler) is BatchSampler:
                inner = graph.sampler
                return default_batch_sizes(len(inner.sampler), inner.batch_size, inner.drop_last)  # type: ignore[arg-type]
        except TypeError:
            pass
        if self._observed_sizes is None:  # an unsized sampler: draw the epoch's ids (no loading) to count
            self._observed_sizes = [c.numel() for c in self.candidates()]
        return self._observed_sizes

    def _draw(self) -> Iterator[Tensor]:
        graph = self._graph
        if graph.batch_size is None:
            for batch in graph.sampler:
                yield torch.as_tensor(batch, dtype=torch.long).reshape(-1)
            return
        chunk: list[int] = []
        for i in graph.sampler:
            chunk.append(int(i))
            if len(chunk) == graph.batch_size:
                yield torch.tensor(chunk, dtype=torch.long)
                chunk = []
        if chunk and not graph.drop_last:
            yield torch.tensor(chunk, dtype=torch.long)

    def candidates(self) -> list[Tensor]:
        """This epoch's id batches, as the user's sampler draws them (``Batcher``'s cut), from a
        generator seeded by the epoch where it draws at random (NOTE [ Orders that resume ])."""
        return drawn_with(self._random, epoch_order_generator(self.order_seed, self._epoch), lambda: list(self._draw()))

    @contextlib.contextmanager
    def epoch(self) -> Iterator[Iterator[tuple[Any, Tensor | None]]]:
        with self.load(self.candidates()) as pairs:
            yield pairs

    @contextlib.contextmanager
    def load(self, plan: Iterable[Tensor]) -> Iterator[Iterator[tuple[Any, Tensor]]]:
        """Load ``plan``'s id batches in order; ``plan`` is read lazily, in this thread."""
        ids = self._ids
        ids.begin()
        root = self._root
        started = False

        def pairs() -> Generator[tuple[Any, Tensor], None, None]:
            nonlocal started
            planned = iter(plan)
            waiting: collections.deque[Tensor] = collections.deque()
            exhausted = False
            started = True
            root.reset()  # starts the graph's threads; they wait for what is fed
            while True:
                while not exhausted and len(waiting) < self._ahead:
                    try:
                        batch_ids = torch.as_tensor(next(planned), dtype=torch.long).reshape(-1)
                    except StopIteration:
                        exhausted = True
                        ids.end()
                        break
                    waiting.append(batch_ids)
                    ids.put(batch_ids.tolist())
                if not waiting:
                    break
                try:
                    batch = next(root)
                except StopIteration:
                    raise RuntimeError(_NOT_ONE_TO_ONE.format("fewer")) from None
                yield batch, waiting.popleft()
            for _ in _drain(root):  # lets the graph finish its pass and stop its threads
                raise RuntimeError(_NOT_ONE_TO_ONE.format("more"))

        stream = pairs()
        try:
            yield stream
        finally:
            stream.close()
            ids.close()
            if started:
                _stop_threads(root)


def _drain(root: Any) -> Iterator[Any]:
    while True:
        try:
            yield next(root)
        except StopIteration:
            return


def _random_sampler(sampler: Any) -> Any:
    """The sampler (or a batch sampler's sampler) that draws from a ``generator``, if any."""
    for candidate in (sampler, getattr(sampler, "sampler", None)):
        if candidate is not None and hasattr(candidate, "generator"):
            return candidate
    return None




def nodes_source(loader: Any) -> NodesSource | None:
    """A :class:`NodesSource` for a ``torchdata.nodes.Loader`` of the recognised shape, else
    ``None`` (the caller streams it as it is, with the ``Loader``'s own ``state_dict``)."""
    graph = _read_graph(loader)
    return None if graph is None else NodesSource(loader, graph)
