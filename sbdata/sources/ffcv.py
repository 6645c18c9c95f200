"""FFCV adapter: :class:`FFCVSource` lets ``SelectiveBatchLoader`` wrap an ``ffcv.loader.Loader``.

What it does, and the FFCV 1.0.2 behaviour each point works around (details in ``docs/ffcv.md``):

* **Ids.** Batch ``k`` of an FFCV epoch holds the examples ``it.order[k*bs:(k+1)*bs]`` of the
  epoch iterator ``it``: that slice is each batch's ids (row ids in the ``.beton``).
* **Stale epochs load only the selected examples.** :class:`FilteredOrder` replaces the
  Loader's traversal order (after construction: 1.0.2's ``order=`` cannot take a custom class)
  and wraps the user's own order (SEQUENTIAL, RANDOM, QUASI_RANDOM, distributed sharding), so
  the candidates of a stale epoch come in the user's order; the plan sbdata selects from them
  is handed back to FFCV as one flat order, so only planned examples are read and decoded.
  The base order is sampled once per epoch and cached (QUASI_RANDOM shuffles in place: two
  calls give two orders). An empty plan never reaches FFCV (``os_cache=False`` crashes on it).
* **Buffers are recycled.** Every FFCV batch is a view into a slot buffer that the producer
  thread overwrites a few batches later, so ``recycles_buffers`` tells the loader to copy rows
  before the next batch is requested, even when a whole batch is kept.
* **Abandoned epochs.** ``EpochIterator.close()`` alone can leave the producer thread blocked
  forever on its final ``put``; :func:`_shutdown` stops it and waits for it.
* **Lengths.** ``len(loader)`` is frozen at construction; batch sizes are computed here from
  the order length and FFCV's own slicing rule, so ``len(sb)`` stays exact.

ffcv is imported when this module is (``sbdata`` itself never imports it).
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:
    from ffcv.loader import Loader
    from ffcv.traversal_order.base import TraversalOrder
except ImportError as e:  # pragma: no cover - exercised only without ffcv
    raise ImportError(
        "sbdata's FFCV support needs ffcv (1.0.2), which is not installed or does not import: "
        "pip install 'sbdata[ffcv]' (ffcv builds from source and needs OpenCV and libjpeg-turbo "
        "headers, e.g. apt-get install libopencv-dev libturbojpeg0-dev pkg-config)"
    ) from e

from ..repack import Repacker
from .base import Source, default_batch_sizes

__all__ = ["FFCVSource", "FilteredOrder"]


class FilteredOrder(TraversalOrder):
    """A traversal order that wraps the Loader's own order and, on request, loads a given
    sub-order of it instead.

    ``base_order(epoch)`` is the user's order for ``epoch``, sampled once and cached, so the
    wrapper can read an epoch's order before loading it without changing it (QUASI_RANDOM
    shuffles its pages in place on every call). ``plan`` (a flat array of ids), when set, is
    what the next ``sample_order`` returns instead, once. Install it on a constructed Loader
    before the next ``iter()``::

        loader.traversal_order = FilteredOrder(loader, loader.traversal_order)
    """

    def __init__(self, loader: Loader, base: TraversalOrder) -> None:
        super().__init__(loader)
        self.base = base
        self.plan: np.ndarray | None = None
        self.dtype = np.dtype(loader.indices.dtype)
        self._cached_epoch: int | None = None
        self._cached: np.ndarray | None = None

    def base_order(self, epoch: int) -> np.ndarray:
        if self._cached_epoch != epoch or self._cached is None:
            order = np.asarray(self.base.sample_order(epoch))
            self._cached = order.copy()  # SEQUENTIAL returns loader.indices itself
            self._cached_epoch = epoch
            self.dtype = order.dtype  # plans use it too: another dtype would recompile the pipeline
        return self._cached

    def sample_order(self, epoch: int) -> np.ndarray:
        if self.plan is not None:
            plan, self.plan = self.plan, None
            return plan
        return self.base_order(epoch)


class FFCVSource(Source):
    """An FFCV ``Loader`` as a source of ``(batch, ids)``; filters loading in stale epochs.

    Installs a :class:`FilteredOrder` on the Loader (once; a second wrapper reuses it). The
    wrapper's epoch drives FFCV's: ``set_epoch(e)`` sets ``loader.next_epoch = e``, so RANDOM
    reshuffles and distributed shards follow ``sb.set_epoch`` and resume exactly.
    """

    loads_ids = True  # every epoch loads its id batches drawn up front: exact resume
    recycles_buffers = True  # yielded tensors are views into buffers FFCV overwrites

    def __init__(self, loader: Loader) -> None:
        super().__init__(loader)
        current = loader.traversal_order
        if isinstance(current, FilteredOrder):
            self.order = current
        else:
            self.order = FilteredOrder(loader, current)
            loader.traversal_order = self.order

    # ------------------------------------------------------------------ sizes

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def batch_size(self) -> int | None:
        return int(self.loader.batch_size)

    def num_examples(self) -> int | None:
        return int(self.loader.reader.num_samples)

    def _limit(self) -> int:
        """Most examples one FFCV epoch loads: ``Loader.__iter__`` cuts the order there."""
        return len(self.loader) * self.loader.batch_size

    def batch_sizes(self) -> list[int] | None:
        n = min(len(self.loader.first_traversal_order), self._limit())
        return default_batch_sizes(n, self.loader.batch_size, drop_last=False)

    # ------------------------------------------------------------------ epochs

    @contextlib.contextmanager
    def epoch(self) -> Iterator[Iterator[tuple[Any, Tensor | None]]]:
        self.order.plan = None
        it = iter(self.loader)
        try:
            yield self._batches(it)
        finally:
            _shutdown(it)

    def _batches(self, it: Any) -> Iterator[tuple[Any, Tensor]]:
        ids = _ids_tensor(it.order)
        bs = self.loader.batch_size
        for k, batch in enumerate(it):
            chunk = ids[k * bs : (k + 1) * bs]
            yield _unsqueeze_singleton(batch, chunk.numel()), chunk

    def candidates(self) -> list[Tensor]:
        """This epoch's id batches in the user's order, as a plain FFCV epoch would load them."""
        order = self.order.base_order(self.loader.next_epoch)[: self._limit()]
        return list(_ids_tensor(order).split(self.loader.batch_size))

    @contextlib.contextmanager
    def load(self, plan: Iterable[Tensor]) -> Iterator[Iterator[tuple[Any, Tensor]]]:
        """Load exactly ``plan``'s id batches, in order, in one FFCV pass over their concatenation.

        FFCV takes a whole epoch's order before its first batch, so a lazy ``plan`` is drawn
        to its end here (a stale FFCV epoch plans its whole selection when it starts)."""
        plan = list(plan)
        sizes = [int(p.numel()) for p in plan]
        if any(n == 0 for n in sizes):
            raise ValueError(f"a load plan must not contain empty batches, got sizes {sizes}")
        total = sum(sizes)
        if total == 0:  # never hand FFCV an empty order (os_cache=False crashes on it)
            self.loader.next_epoch += 1
            yield iter(())
            return
        if total > self._limit():
            raise ValueError(
                f"the load plan has {total} examples but this FFCV Loader loads at most "
                f"{self._limit()} per epoch (len(loader) * batch_size) and would cut the rest"
            )
        flat = torch.cat([torch.as_tensor(p).long().cpu() for p in plan])
        self.order.plan = flat.numpy().astype(self.order.dtype)
        try:
            it = iter(self.loader)
        finally:
            self.order.plan = None
        try:
            loaded = _ids_tensor(it.order)
            if not torch.equal(loaded, flat):
                raise RuntimeError(
                    "FFCV did not load the planned order; was loader.traversal_order replaced "
                    "after the Loader was wrapped?"
                )
            yield self._rebatched(it, loaded, sizes)
        finally:
            _shutdown(it)

    def _rebatched(self, it: Any, ids: Tensor, sizes: list[int]) -> Iterator[tuple[Any, Tensor]]:
        """FFCV's batches re-cut to ``sizes``. A plan batch that is exactly one FFCV batch is
        yielded as it is (the usual case: sbdata plans full batches of the loader's size); any
        other is assembled by copying rows, before the next FFCV batch is requested."""
        chunks = iter(it)
        chunk: Any = None
        chunk_len = offset = at = 0

        def advance() -> None:
            nonlocal chunk, chunk_len, offset
            chunk = next(chunks)
            chunk_len = len(ids[at : at + self.loader.batch_size])
            chunk = _unsqueeze_singleton(chunk, chunk_len)
            offset = 0

        for m in sizes:
            if chunk is None or offset == chunk_len:
                advance()
            if offset == 0 and chunk_len == m:
                yield chunk, ids[at : at + m]
                at += m
                offset = chunk_len
                continue
            repacker = Repacker(m)
            start, out = at, None
            while out is None:
                if offset == chunk_len:
                    advance()
                take = min(m - (at - start), chunk_len - offset)
                done = repacker.add(chunk, torch.arange(offset, offset + take))
                offset += take
                at += take
                out = done[0] if done else None
            yield out, ids[start : start + m]

    def __repr__(self) -> str:
        return f"FFCVSource({self.loader.fname!r}, batch_size={self.loader.batch_size})"


def _ids_tensor(order: Any) -> Tensor:
    """An FFCV order (uint64 or int64 numpy array) as a fresh int64 tensor."""
    return torch.from_numpy(np.array(order, dtype=np.int64, copy=True))


def _unsqueeze_singleton(batch: Any, n: int) -> Any:
    """FFCV's ``Squeeze()`` turns the ``[1, 1]`` field of a one-example batch into a 0-d tensor;
    give it back its batch dimension."""
    if n != 1 or not isinstance(batch, tuple):
        return batch
    return tuple(t.reshape(1) if isinstance(t, Tensor) and t.dim() == 0 else t for t in batch)


def _shutdown(it: Any, timeout: float = 30.0) -> None:
    """Stop an FFCV ``EpochIterator``'s producer thread and wait for it; then release its memory.

    ``EpochIterator.close()`` only sets an event the producer checks when its output queue stays
    full, and a producer that reached the end of the epoch blocks forever putting its final
    ``None`` into a full queue. So: give it no further batches, drain the queue until the thread
    ends (it finishes at most the batch it is decoding), then ``close()`` (which frees the
    memory context; with ``os_cache=False`` doing that while a batch is loading could hang it).
    """
    if hasattr(it, "iter_ixes"):
        it.iter_ixes = iter(())
    event = getattr(it, "terminate_event", None)
    if event is not None:
        event.set()
    out = getattr(it, "output_queue", None)
    deadline = time.monotonic() + timeout
    while callable(getattr(it, "is_alive", None)) and it.is_alive() and time.monotonic() < deadline:
        if out is not None:
            with contextlib.suppress(queue.Empty):
                while True:
                    out.get_nowait()
        it.join(0.01)
    it.close()
    it.closed = True  # 1.0.2 never sets it, so __del__ would release the memory context again
