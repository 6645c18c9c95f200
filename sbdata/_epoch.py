"""One epoch of a :class:`~sbdata.SelectiveBatchLoader`: the iterator ``iter(sb)`` returns.

The loader holds what lives across epochs (configuration, loss cache, policy, statistics);
an :class:`EpochIterator` holds what lives for one epoch: its position in the source, the
epoch's plan of id batches, the re-pack buffer and the full batches not yet handed out.

A batch flows one way: source -> ids -> schedule -> score or look up -> policy -> re-pack ->
yield. Whether a source batch passes through whole or is selected from is decided by the
epoch's mode (plain, fresh, stale) and the ``interrupt`` schedule.

NOTE [ The epoch ends with its last batch ]
When the epoch's length is known exactly (every built-in policy), the iterator finishes the
epoch as it hands out the last batch: the rest of the source is consumed (its rows go to the
``carry`` buffer or are dropped), statistics close, and ``len(sb)`` and ``sb.epoch`` already
describe the next epoch. So a loop that stops after ``len(sb)`` batches without asking for one
more (Lightning, ``islice(sb, len(sb))``) sees the next epoch correctly, and a checkpoint taken
right after the last batch is an epoch-boundary checkpoint.

NOTE [ Positions, not rows ]
A checkpoint names rows waiting to be handed out by where they came from (epoch, source batch,
row) and their ids, never by their data. Resuming reloads them: by id from a source that loads
ids, otherwise by replaying the source up to their batch.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from . import distributed as dist_utils
from .batches import batch_length, get_field, to_device
from .cache import as_ids, concat_ids
from .planning import CandidatePlanner, PlanEntry, StalePlanner
from .policies import Selection
from .repack import Repacker
from .schedule import is_interrupt_batch
from .scoring import check_losses, score_batch
from .sharded import ShardedLossCache
from .stats import EpochStats

if TYPE_CHECKING:
    from .loader import SelectiveBatchLoader

__all__ = ["FRESH", "PLAIN", "STALE", "EpochIterator", "EpochRun", "epoch_generator"]

logger = logging.getLogger("sbdata")

PLAIN, FRESH, STALE = "plain", "fresh", "stale"
_META = ("origin", "ids", "weights")  # per-row fields that travel with the data through re-packing


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The selection generator of one epoch on one rank: a pure function of its inputs, so an
    epoch-boundary checkpoint needs no generator state (``rank=-1``: shared by every rank)."""
    mixed = (seed * 1_000_003 + epoch * 7_919 + (rank + 1) * 104_729) % (2**63)
    return torch.Generator().manual_seed(mixed)


def _origin(epoch: int, index: int, n: int) -> Tensor:
    """Per-row origin ``(epoch, source batch index, row)`` of a source batch of ``n`` rows."""
    out = torch.empty(n, 3, dtype=torch.long)
    out[:, 0], out[:, 1] = epoch, index
    out[:, 2] = torch.arange(n)
    return out


def _meta(packed: dict[str, Any]) -> dict[str, Any]:
    return {k: packed[k] for k in _META if k in packed}


#: rows carried into the next epoch: the re-pack buffer itself, or their meta from a checkpoint
Carried = Union[Repacker, dict[str, Any], None]  # noqa: UP007 (a runtime alias)


def carried_rows(carried: Carried) -> int:
    """How many rows ``carried`` holds."""
    if isinstance(carried, Repacker):
        return len(carried)
    return int(carried["origin"].shape[0]) if carried else 0


def carried_meta(carried: Carried) -> dict[str, Any] | None:
    """``carried`` as checkpoint meta (origins, ids, weights on the CPU), never rows of data."""
    if not isinstance(carried, Repacker):
        return carried
    pending = carried.pending()
    return None if pending is None else {k: v.cpu() for k, v in _meta(pending).items()}


def _cat_meta(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    parts = [p for p in parts if p]
    if not parts:
        return None
    return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}


class EpochIterator(Iterator[Any]):
    """The batches of one epoch. Created by ``iter(sb)``, which claims the epoch at once.

    A new ``iter(sb)`` closes an unfinished iterator, and using a closed one raises, so two
    iterators never mix one loader's state. ``close()`` (also when the iterator is dropped, e.g.
    by a ``break``) ends an abandoned epoch: the source's workers and threads stop and buffered
    rows are dropped. The work is done by an :class:`EpochRun` that never refers back to this
    handle, so dropping the handle frees it at once (no reference cycle waits for the GC).
    """

    def __init__(self, sb: SelectiveBatchLoader, epoch: int, resume: dict[str, Any] | None) -> None:
        self._run = EpochRun(sb, epoch, resume)
        stream = self._run.batches()
        self._stream: Any = self._run.equal_counts(stream) if dist_utils.is_distributed() else stream
        self.closed_reason: str | None = None

    @property
    def epoch(self) -> int:
        return self._run.epoch

    @property
    def length(self) -> int | None:
        """Batches this epoch yields in all (exact for exact policies, a bound otherwise;
        ``None`` while the source's batch sizes are unknown)."""
        return self._run.length

    @property
    def finished(self) -> bool:
        return self._run.finished

    def __iter__(self) -> EpochIterator:
        return self

    def __len__(self) -> int:
        if self._run.length is None:
            return self._run._sb.epoch_length(self.epoch)  # raises the TypeError that explains why
        return self._run.length

    def __next__(self) -> Any:
        run = self._run
        if self.closed_reason is not None:
            raise RuntimeError(
                f"this iterator of epoch {run.epoch} was {self.closed_reason}; a SelectiveBatchLoader "
                "runs one epoch at a time: finish (or abandon) an epoch before calling iter() again"
            )
        if run.finished:
            raise StopIteration
        try:
            batch = next(self._stream)
        except StopIteration:
            run.finish()
            raise
        except BaseException:
            self.close("ended by an error")
            raise
        run.yielded += 1
        if run.exact and run.yielded >= run.length:  # type: ignore[operator]  # NOTE [ The epoch ends with its last batch ]
            for _ in self._stream:
                raise RuntimeError(f"epoch {run.epoch} yielded more batches than len()={run.length}")
            run.finish()
        return batch

    def close(self, reason: str = "closed") -> None:
        """Abandon the epoch (idempotent): stop the source now and drop buffered rows."""
        if self._run.finished or self.closed_reason is not None:
            return
        self.closed_reason = reason
        self._stream.close()
        self._run.abandon()

    def __del__(self) -> None:
        try:
            self.close("garbage-collected")
        except Exception:  # interpreter shutdown: nothing left to release
            pass

    def state_dict(self) -> dict[str, Any] | None:
        """The position "as yielded" (``None`` once the epoch is finished)."""
        return None if self._run.finished else self._run.state_dict()


class EpochRun:
    """The work of one epoch: position, plan, re-pack buffer and ready batches."""

    def __init__(self, sb: SelectiveBatchLoader, epoch: int, resume: dict[str, Any] | None) -> None:
        self._sb = sb
        self.epoch = epoch
        cfg = sb.config
        self.mode: str = resume["mode"] if resume else sb.mode(epoch)
        carried = self._carried = sb._take_carried()
        self._resume = resume
        self.length: int | None = resume["length"] if resume else self._length(carried)
        self.exact = self.length is not None and (self.mode == PLAIN or sb.policy.exact)
        self.yielded: int = resume["yielded"] if resume else 0
        self.consumed: int = resume["consumed"] if resume else 0
        self._saved_plan: dict[str, Any] | None = resume["plan"] if resume else None
        self._order_checksum: int | None = None  # of this epoch's candidates, once a checkpoint needed it
        self.planner: CandidatePlanner | StalePlanner | None = None
        self.window: collections.deque[PlanEntry] = collections.deque(
            PlanEntry.from_state(e) for e in (self._saved_plan["window"] if self._saved_plan else [])
        )  # planned, not yet loaded
        self.generator = epoch_generator(cfg.seed, epoch, dist_utils.rank())
        if resume and resume["generator"] is not None:
            self.generator.set_state(resume["generator"])
        self._source_state = resume.get("source_state") if resume else None
        self.repacker = carried if isinstance(carried, Repacker) else Repacker(sb.batch_size)
        self._queued = resume["queued"] if resume else (carried if isinstance(carried, dict) else None)
        self.ready: collections.deque[dict[str, Any]] = collections.deque()
        self.stats = EpochStats(epoch=epoch, mode=self.mode)  # the loader's, from the first next()
        self._resumed = resume is not None and resume["started"]
        self._started = False
        self.finished = False
        self._scorer_modules = list(sb.model.modules())  # walked once per epoch, not per batch

    def _length(self, carried: Carried) -> int | None:
        try:
            return self._sb.epoch_length(self.epoch, carried=carried_rows(carried))
        except TypeError:  # batch sizes unknown until the source has been iterated once
            return None

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._sb._epoch_ended(self, completed=True)
        _log_epoch(self.stats, completed=True)

    def abandon(self) -> None:
        if not self._started:  # iter() without next() (a probe, as Lightning makes): give the epoch back
            self._sb._epoch_given_back(self.epoch, self._resume, self._carried)
            return
        self.repacker.clear()
        self.ready.clear()
        self._sb._epoch_ended(self, completed=False)
        _log_epoch(self.stats, completed=False)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        """The position "as yielded": what the next ``next()`` would continue from."""
        source = self._sb._source
        if self._started and not source.loads_ids and not source.stateful:
            self._sb._warn_replay_once()
        return {
            "started": self._started,
            "epoch": self.epoch,
            "mode": self.mode,
            "length": self.length,
            "yielded": self.yielded,
            "consumed": self.consumed,
            "plan": self._plan_state(),
            "generator": self.generator.get_state(),
            "source_state": source.position() if source.stateful and self._started else self._source_state,
            "queued": self._queued if not self._started and self._queued is not None else self.queued(),
        }

    def queued(self) -> dict[str, Any] | None:
        """Origins, ids and weights of the rows not yet handed out, in the order they will be."""
        pending = self.repacker.pending()
        return _cat_meta([_meta(b) for b in self.ready] + ([_meta(pending)] if pending is not None else []))

    # ------------------------------------------------------------------ the epoch

    def batches(self) -> Iterator[Any]:
        sb = self._sb
        self._started = True
        sb._source.set_epoch(self.epoch)  # before anything draws this epoch's order
        candidates = None
        if not self._resumed and self.mode != PLAIN:  # fresh or stale: decided from the cache as it is now
            if sb._source.loads_ids:
                candidates = sb._source.candidates()
                self.mode = sb.mode(self.epoch, candidates)
                if self.mode != PLAIN and sb.config.stale is not None:
                    dist_utils.check_shared_id_space(sum(c.numel() for c in candidates), sb._source.num_examples())
            else:
                self.mode = sb.mode(self.epoch)
        self.stats = sb.stats.current if self._resumed else sb.stats.begin(self.epoch, self.mode)
        yield from self._restore(self._queued)
        if sb._source.loads_ids:
            yield from self._planned(candidates)
        else:
            yield from self._streamed()
        yield from self._tail()

    def _planned(self, candidates: list[Tensor] | None) -> Iterator[Any]:
        """Load the id batches the epoch's planner hands out (NOTE [ Planning batch by batch ]
        in :mod:`sbdata.planning`), continuing a checkpoint's plan where there is one."""
        sb = self._sb
        saved = self._saved_plan
        offset = 0
        if saved is not None and saved["candidates"] is not None:  # a source whose order cannot be drawn again
            candidates, offset = list(saved["candidates"]), int(saved["planner"]["next"])
        elif candidates is None:
            candidates = sb._source.candidates()
            if saved is not None and saved["checksum"] != self._checksum_of(candidates):
                raise RuntimeError(
                    f"resuming epoch {self.epoch}: the source drew another order of id batches than the run "
                    "that saved the checkpoint, so the rest of the epoch would skip or repeat examples; "
                    "keep the loader's sampler, its seed and the dataset as they were when it was saved"
                )
        if not offset and sb._source.batch_sizes() is None:  # a sampler without len(): now its sizes are known
            sb._source.observe_sizes([c.numel() for c in candidates])
        planner = self._planner(candidates, offset)
        if saved is not None:
            planner.load_state_dict(saved["planner"])
        self.planner, window = planner, self.window

        def id_batches() -> Iterator[Tensor]:
            for entry in list(window):  # restored from a checkpoint: already in the window
                yield entry.ids
            for entry in planner:
                window.append(entry)
                yield entry.ids

        with sb._source.load(id_batches()) as pairs:
            for k, (batch, ids) in enumerate(pairs, self.consumed):
                entry = window.popleft()
                self.consumed = k + 1
                n = self._loaded(batch)
                if sb.config.index_key is not None:  # checked, but the loaded indices key the cache
                    self._ids_of(batch, None, n)
                if entry.passed:
                    yield from self._pass_through(batch, ids, n, k)
                elif entry.preselected:
                    yield from self._emit(to_device(batch, sb.device), n, ids, Selection(torch.arange(n), entry.weights), k)
                else:
                    yield from self._select(batch, n, ids, k)

    def _planner(self, candidates: list[Tensor], offset: int) -> CandidatePlanner | StalePlanner:
        sb = self._sb
        if self.mode != STALE:
            return CandidatePlanner(candidates, plain=self.mode == PLAIN, interrupt=sb.config.interrupt, offset=offset)

        # the closures must not refer to this run: the planner is kept by the run (no cycle)
        stats, generator, epoch = self.stats, self.generator, self.epoch

        cache: Any = sb.cache
        if isinstance(cache, ShardedLossCache):  # collective: this rank's candidates, from their owners
            cache = cache.fetch(concat_ids(candidates))

        def select(ids: Tensor) -> Selection:
            losses, _ = cache.lookup(ids)  # every candidate was measured (see SelectiveBatchLoader.mode)
            selection = sb.policy.select(losses, generator)
            stats.selected += selection.rows.numel()
            sb.selection_log.observe(epoch, losses, selection.rows, ids)
            return selection

        def skipped(n: int) -> None:
            stats.loads_skipped += n

        return StalePlanner(
            candidates, select, batch_size=sb.batch_size, waiting=len(self.repacker), interrupt=sb.config.interrupt,
            last_batch=sb.last_batch, skipped=skipped, offset=offset,
        )  # fmt: skip

    def _plan_state(self) -> dict[str, Any] | None:
        """The planner's position and the batches planned but not yet loaded (``None`` for a
        streamed source); the candidates themselves only where the source cannot draw them again."""
        planner = self.planner
        if planner is None:
            return self._saved_plan if not self._started else None
        redrawn = self._sb._source.reproducible_order and not planner.offset  # resume draws the order again
        return {
            "planner": planner.state_dict(),
            "window": [e.state_dict() for e in self.window],
            "checksum": self._checksum_of(planner.candidates) if redrawn else None,
            "candidates": None if redrawn else [c.clone() for c in planner.candidates[planner.next - planner.offset :]],
        }

    def _checksum_of(self, candidates: list[Tensor]) -> int:
        """:func:`_checksum` of this epoch's candidates, computed once per epoch (O(N))."""
        if self._order_checksum is None:
            self._order_checksum = _checksum(candidates)
        return self._order_checksum

    def _streamed(self) -> Iterator[Any]:
        """Iterate the source; ids only from the batch (``index_key``)."""
        sb = self._sb
        skip = self.consumed
        if self._source_state is not None:  # the source restores its own position
            sb._source.load_position(self._source_state)
            skip = 0
        sizes: list[int] = []
        with sb._source.epoch() as pairs:
            for i, (batch, source_ids) in enumerate(pairs, self.consumed - skip):
                if i < skip:  # fast-forward a source that cannot restore its position
                    continue
                self.consumed = i + 1
                n = self._loaded(batch)
                sizes.append(n)
                ids = self._ids_of(batch, source_ids, n)
                if self.mode == PLAIN or is_interrupt_batch(i, sb.config.interrupt):
                    yield from self._pass_through(batch, ids, n, i)
                else:
                    yield from self._select(batch, n, ids, i)
        if not self._resumed and sb._source.batch_sizes() is None:
            sb._source.observe_sizes(sizes)

    def _loaded(self, batch: Any) -> int:
        n = batch_length(batch)
        self.stats.loaded += n
        self.stats.source_batches += 1
        return n

    def _select(self, batch: Any, n: int, ids: Tensor | None, index: int) -> Iterator[Any]:
        sb = self._sb
        batch = to_device(batch, sb.device)
        losses, known = sb.cache.lookup(ids) if self.mode == STALE and ids is not None else (None, None)
        if losses is None or known is None or not bool(known.all()):  # a stale batch with a never-measured example is scored
            losses = self._score(batch, ids, n)
        selection = sb.policy.select(losses, self.generator)
        self.stats.selected += selection.rows.numel()
        sb.selection_log.observe(self.epoch, losses, selection.rows, ids)
        yield from self._emit(batch, n, ids, selection, index)

    def _tail(self) -> Iterator[Any]:
        yield from self._drain()
        last_batch = self._sb.last_batch
        if last_batch == "yield":
            tail = self.repacker.flush()
            if tail is not None:
                yield self._hand_out(tail)
        elif last_batch == "drop":
            self.repacker.clear()

    # ------------------------------------------------------------------ rows to batches

    def _packed(self, batch: Any, n: int, ids: Tensor | None, index: int, weights: Tensor | None) -> dict[str, Any]:
        packed: dict[str, Any] = {"batch": batch, "origin": _origin(self.epoch, index, n)}
        if ids is not None:
            packed["ids"] = ids
        if weights is not None:
            packed["weights"] = weights
        return packed

    def _emit(self, batch: Any, n: int, ids: Tensor | None, selection: Selection, index: int) -> Iterator[Any]:
        """Hand out the selected rows: as they are if they make exactly one full batch, else
        through the re-pack buffer (NOTE [ One copy, no views ] in :mod:`sbdata.repack`)."""
        rows, kept_weights = selection
        weights = None
        if kept_weights is not None:
            weights = torch.ones(n, dtype=torch.float32)
            weights[rows] = kept_weights.float().cpu()
        packed = self._packed(batch, n, ids, index, weights)
        whole = rows.numel() == n == self._sb.batch_size and len(self.repacker) == 0 and not self.ready
        if whole and not self._sb._source.recycles_buffers and bool((rows == torch.arange(n)).all()):
            yield self._hand_out(packed)  # already one full batch: no copy
            return
        self.ready.extend(self.repacker.add(packed, rows))
        yield from self._drain()

    def _drain(self) -> Iterator[Any]:
        while self.ready:
            yield self._hand_out(self.ready.popleft())

    def _pass_through(self, batch: Any, ids: Tensor | None, n: int, index: int) -> Iterator[Any]:
        self.stats.passed_through += n
        if self.mode == FRESH and self._sb.config.stale is not None and ids is not None:
            batch = to_device(batch, self._sb.device)
            self._score(batch, ids, n)  # a rescoring epoch measures every example it loads
        packed = self._packed(batch, n, ids, index, None)
        if self._sb._source.recycles_buffers:  # FFCV reuses its buffers: copy
            packed = Repacker(n).add(packed, torch.arange(n))[0]
        yield self._hand_out(packed)

    def _hand_out(self, packed: dict[str, Any]) -> Any:
        batch = to_device(packed["batch"], self._sb.device)
        size = batch_length(batch)
        self.stats.yielded += size
        self.stats.batches += 1
        self._sb._handed_out(size, packed.get("ids"), packed.get("weights"), self.epoch)
        return batch

    # ------------------------------------------------------------------ resume

    def _restore(self, queued: dict[str, Any] | None) -> Iterator[Any]:
        """Reload rows that were waiting at a checkpoint (NOTE [ Positions, not rows ]) into
        the re-pack buffer; the full batches among them are handed out first."""
        if not queued or queued["origin"].numel() == 0:
            return
        for batch, rows, meta in self._reload(queued):
            packed = {"batch": to_device(batch, self._sb.device), **meta}
            self.ready.extend(self.repacker.add(packed, rows))
        yield from self._drain()

    def _reload(self, queued: dict[str, Any]) -> Iterator[tuple[Any, Tensor, dict[str, Any]]]:
        """``(batch, rows, per-row meta)`` holding the queued rows, in their queued order."""
        source = self._sb._source
        if source.loads_ids:  # one batch of exactly these ids
            with source.load([queued["ids"]]) as pairs:
                for batch, _ in pairs:
                    yield batch, torch.arange(batch_length(batch)), queued
            return
        origin = queued["origin"]
        for epoch in torch.unique(origin[:, 0]).tolist():  # ascending, as they were queued
            in_epoch = torch.nonzero(origin[:, 0] == epoch).flatten()
            indices = origin[in_epoch, 1]
            last = int(indices.max())
            source.set_epoch(int(epoch))
            with source.epoch() as pairs:
                for i, (batch, _) in enumerate(pairs):
                    mine = in_epoch[indices == i]
                    if mine.numel():  # just those rows, copied: the meta fields are theirs alone
                        rows = Repacker(mine.numel()).add(batch, origin[mine, 2])[0]
                        yield rows, torch.arange(mine.numel()), {k: v[mine] for k, v in queued.items()}
                    if i >= last:
                        break
        source.set_epoch(self.epoch)

    # ------------------------------------------------------------------ per batch

    def _ids_of(self, batch: Any, source_ids: Tensor | None, n: int) -> Tensor | None:
        key = self._sb.config.index_key
        if key is None:
            return source_ids
        ids = torch.as_tensor(get_field(batch, key, argument="index_key"))
        if ids.shape != (n,) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(
                f"index_key={key!r} must give one integer id per example, shape [{n}], got "
                f"{ids.dtype} of shape {list(ids.shape)}"
            )
        return as_ids(ids, argument=f"index_key={key!r}")

    def _score(self, batch: Any, ids: Tensor | None, n: int) -> Tensor:
        sb = self._sb
        began = time.perf_counter()
        losses, source = score_batch(sb.model, batch, sb.config, sb._loss_fn, self._scorer_modules)
        losses = check_losses(losses, n, source=source, ids=ids, nonfinite=sb.config.nonfinite)
        self.stats.scoring_seconds += time.perf_counter() - began
        self.stats.scored += n
        if sb.config.stale is not None and ids is not None:
            sb._cache_update(ids, losses, self.epoch)
        return losses

    # ------------------------------------------------------------------ distributed

    def equal_counts(self, stream: Iterator[Any]) -> Iterator[Any]:
        """Yield the same number of batches on every rank (NOTE [ Equal batches on every rank ])."""
        local = self.length - self.yielded if self.exact and self.length is not None else None

        def drop_surplus(batch: Any | None) -> None:
            self.stats.dropped += (batch_length(batch) if batch is not None else 0) + len(self.repacker)
            self.repacker.clear()

        yield from dist_utils.equal_batch_counts(stream, local, drop_surplus)


def _checksum(batches: list[Tensor]) -> int:
    """A fingerprint of an epoch's order of id batches (O(N), taken only at checkpoints)."""
    if not batches:
        return 0
    ids = concat_ids(batches)
    position = (torch.arange(ids.numel(), dtype=torch.long) * 2_654_435_761) % 2_147_483_647 + 1
    sizes = torch.tensor([b.numel() for b in batches], dtype=torch.long)
    return int((ids * position).sum()) ^ int((sizes * torch.arange(1, sizes.numel() + 1)).sum()) ^ ids.numel()


def _log_epoch(stats: EpochStats, completed: bool) -> None:
    logger.info(
        "epoch %d (%s%s): loaded %d, skipped %d, scored %d in %.2fs, selected %d, yielded %d in %d batches",
        stats.epoch,
        stats.mode,
        "" if completed else ", abandoned",
        stats.loaded,
        stats.loads_skipped,
        stats.scored,
        stats.scoring_seconds,
        stats.selected,
        stats.yielded,
        stats.batches,
    )
