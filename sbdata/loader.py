"""``SelectiveBatchLoader``: a loader wrapper that yields fixed-size batches of high-loss examples.

The class is a thin stateful shell around pure pieces: :mod:`~sbdata.policies` decide which
rows to keep, :mod:`~sbdata.schedule` decides when, :mod:`~sbdata.scoring` measures losses,
:mod:`~sbdata.repack` builds the output batches, :mod:`~sbdata.cache` remembers losses for
stale mode and :mod:`~sbdata.sources` adapts the wrapped loader.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .batches import Key, batch_length, get_field, to_device
from . import distributed as dist_utils
from .cache import LossCache
from .policies import SelectionPolicy, make_policy, select_each
from .planning import EpochPlan, cut_plan, share_selection
from .repack import Repacker, count_output_batches
from .schedule import is_interrupt_batch, selection_active, training_progress
from .scoring import LossFn, check_losses, per_example_loss, score_inputs
from .sources import Source, make_source
from .stats import EpochStats, LoaderStats, SelectionLog
from .validation import validate_options

__all__ = ["SelectiveBatchLoader"]

logger = logging.getLogger("sbdata")

ScoreFn = Callable[[nn.Module, Any], Tensor]

PLAIN, FRESH, STALE = "plain", "fresh", "stale"
STATE_VERSION = 1


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class SelectiveBatchLoader:
    """Wrap a loader so that it yields full-size batches of the examples with the highest loss.

    Each source batch is scored by ``model`` (a forward pass without gradients), a policy keeps
    about ``keep`` of its examples, favouring high losses, and the kept rows are re-packed into
    batches of ``batch_size``. The training loop does not change::

        for x, y in SelectiveBatchLoader(train_loader, model, keep=0.5):
            loss = F.cross_entropy(model(x), y)
            ...

    Args:
        loader: a ``torch.utils.data.DataLoader``, an FFCV ``Loader`` or any re-iterable of
            batches. Batches are tensors, tuples, lists, dicts or nested mixes of them.
        model: the scorer, usually the model being trained.
        keep: fraction of examples kept while selection is active, in (0, 1].
        loss_fn: ``(outputs, targets) -> losses[N]``; default cross-entropy. A loss module with a
            ``reduction`` attribute, or a function with a ``reduction`` argument, is used with
            ``reduction="none"``.
        score_fn: ``(model, batch) -> losses[N]`` for batches that are not ``(inputs, targets)``.
        policy: ``"rank"`` (default, Composer), ``"threshold"`` (the paper), ``"topk"``,
            ``"random"`` (the control), or a :class:`~sbdata.policies.SelectionPolicy`.
        batch_size: size of the yielded batches; default the source loader's ``batch_size``.
        epochs: total training epochs; needed when ``start > 0`` or ``end < 1``.
        start: selection is active while ``epoch / epochs`` is in ``[start, end)``.
        end: see ``start``; from ``end`` on, batches pass through unchanged.
        interrupt: source batch ``i`` of an epoch passes through unchanged when
            ``(i + 1) % interrupt == 0``; ``0`` never.
        scale_factor: downsample inputs for the scoring pass only (``<= 1``).
        stale: ``None`` scores every active epoch; ``n`` scores every n-th active epoch (the
            first included) and selects from cached losses in between, loading only what it keeps.
        input_key: where the inputs live in a batch (index, key or callable).
        target_key: where the targets live in a batch (index, key or callable).
        index_key: where example ids live in a batch, if it carries them.
        device: scoring device; default the model's. Selected batches are yielded there.
        last_batch: ``"yield"`` the epoch's partial last batch, ``"drop"`` it, or ``"carry"`` its
            rows into the next epoch.
        scoring_mode: ``"eval"`` (default) or ``"train"``; the model's mode and BatchNorm buffers
            are restored either way.
        autocast_dtype: run the scoring pass under ``torch.autocast`` with this dtype.
        nonfinite: ``"raise"`` (default) on NaN or infinite losses, naming the example ids; or the
            explicit opt-in ``"lowest"`` / ``"highest"`` to rank them below or above every finite loss.
        seed: seed of the loader's own ``torch.Generator``.

    .. warning::
        ``len(loader)`` is exact for the exact-count policies (``rank``, ``topk``, ``random``).
        For ``threshold`` it is an upper bound the epoch never exceeds.
    """

    def __init__(
        self,
        loader: Any,
        model: nn.Module,
        keep: float = 0.5,
        *,
        loss_fn: LossFn | None = None,
        score_fn: ScoreFn | None = None,
        policy: str | SelectionPolicy = "rank",
        batch_size: int | None = None,
        epochs: int | None = None,
        start: float = 0.0,
        end: float = 1.0,
        interrupt: int = 0,
        scale_factor: float = 1.0,
        stale: int | None = None,
        input_key: Key = 0,
        target_key: Key = 1,
        index_key: Key | None = None,
        device: torch.device | str | None = None,
        last_batch: str = "yield",
        scoring_mode: str = "eval",
        autocast_dtype: torch.dtype | None = None,
        nonfinite: str = "raise",
        seed: int = 0,
    ) -> None:
        validate_options(
            keep, epochs, start, end, interrupt, scale_factor, stale, last_batch, scoring_mode, batch_size, nonfinite
        )
        self.nonfinite = nonfinite
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the scorer), got {type(model).__name__}")
        if score_fn is not None and not callable(score_fn):
            raise TypeError(f"score_fn must be callable (model, batch) -> losses, got {score_fn!r}")
        if score_fn is not None and scale_factor != 1.0:
            raise ValueError(
                f"scale_factor={scale_factor} only applies to the built-in scoring pass; with "
                "score_fn, downsample inside score_fn and leave scale_factor=1.0"
            )
        self.keep = float(keep)
        self.model = model
        self.policy = make_policy(policy, self.keep)
        self.epochs, self.start, self.end, self.interrupt = epochs, float(start), float(end), interrupt
        self.scale_factor = float(scale_factor)
        self.stale = stale
        self.input_key, self.target_key, self.index_key = input_key, target_key, index_key
        self.last_batch = last_batch
        self.scoring_mode = scoring_mode
        self.autocast_dtype = autocast_dtype
        self.device = torch.device(device) if device is not None else _model_device(model)
        self._loss_fn = per_example_loss(loss_fn) if score_fn is None else None
        self._score_fn = score_fn
        self._source: Source = make_source(loader, need_ids=stale is not None)
        if stale is not None and index_key is None and not self._source.provides_ids:
            raise ValueError(
                f"stale={stale} needs example ids, and {type(loader).__name__} does not provide "
                "them; return each example's index from the dataset and pass index_key= (e.g. "
                "index_key=2 for (x, y, idx) batches), or wrap a plain map-style "
                "torch.utils.data.DataLoader"
            )
        source_batch_size = self._source.batch_size()
        if batch_size is None and source_batch_size is None:
            raise ValueError(
                f"batch_size is needed: {type(loader).__name__} has no batch_size attribute to copy; "
                "pass batch_size=<size of the batches to yield>"
            )
        self.batch_size: int = batch_size if batch_size is not None else source_batch_size  # type: ignore[assignment]
        self.seed = seed
        # Each rank draws its own fresh-mode selections; stale plans use a per-epoch generator
        # that is the same on every rank (see _global_candidates).
        self.generator = torch.Generator().manual_seed(seed + 1_000_003 * dist_utils.rank())
        self.cache = LossCache(self._source.num_examples() or 0)
        self.stats = LoaderStats()
        #: samples of losses selected and skipped, and per-example selection counts, for
        #: :func:`sbdata.plot.selection_report`
        self.selection_log = SelectionLog(seed=seed)
        self._repacker = Repacker(self.batch_size)
        self._ready: collections.deque[dict[str, Any]] = collections.deque()  # full, not yet yielded
        self._position: dict[str, Any] | None = None  # where the epoch in progress is
        self._resume: dict[str, Any] | None = None  # a mid-epoch position to continue from
        self._epoch = 0
        self._last_ids: Tensor | None = None
        self._last_size: int | None = None
        self._last_recorded = True
        self._current_epoch = 0
        self._scorer_modules: list[nn.Module] | None = None
        self._pending: list[tuple[Tensor, Tensor, int]] = []  # cache updates not yet sent to other ranks
        #: per-example loss weights of the batch just yielded, for policies that reweight
        #: (``InfoBatchPolicy``); ``None`` otherwise. Use ``(weights * losses).mean()``.
        self.batch_weights: Tensor | None = None

    # ------------------------------------------------------------------ public surface

    @property
    def loader(self) -> Any:
        """The wrapped loader, as the user passed it."""
        return getattr(self._source, "original", self._source.loader)

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    @property
    def sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self) -> Any:
        return getattr(self.loader, "batch_sampler", None)

    @property
    def epoch(self) -> int:
        """The epoch the next (or current) ``iter()`` runs."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next ``iter()`` runs; forwarded to the source's sampler."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got epoch={epoch!r}")
        self._epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: plain Python and tensors, readable with
        ``torch.load(..., weights_only=True)``.

        Taken between epochs, the next ``iter()`` after :meth:`load_state_dict` runs the next
        epoch exactly as the uninterrupted run would have. Taken in the middle of an epoch (the
        state "as yielded": after the last batch the training loop received), it continues
        that epoch exactly when the epoch's order is replayable: a map-style ``DataLoader`` in
        stale mode (sbdata fixes the epoch's id batches itself), any stale epoch, or a source
        with its own ``state_dict`` (torchdata's ``StatefulDataLoader``). Other sources are
        fast-forwarded by loading and discarding the batches already consumed, which is exact
        only if they replay the same batches.

        Under ``torch.distributed`` this is a collective (call it on every rank, as Lightning and
        Accelerate do): the cache is the same on every rank and stored once, and each rank's own
        part is gathered under ``"per_rank"``, so rank 0's file resumes every rank.
        """
        own = {
            "generator": self.generator.get_state(),
            "policy": self.policy.state_dict(),
            "pending": self._repacker.pending(),
            "ready": list(self._ready),
            "position": self._position_state(),
            "stats": self.stats.state_dict(),
            "selection_log": self.selection_log.state_dict(),
        }
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "epoch": self._epoch,
            "cache": self.cache.state_dict(),
        }
        if dist_utils.is_distributed():
            gathered: list[Any] = [None] * dist_utils.world_size()
            torch.distributed.all_gather_object(gathered, own)
            state["per_rank"] = gathered
        else:
            state["per_rank"] = [own]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the next ``iter()`` continues where it was taken.

        Raises:
            ValueError: the state came from another format version or configuration (keep,
                batch size, dataset size, world size, policy, stale).
        """
        if not state:
            return
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"state_dict has format version {state.get('version')!r}, this sbdata reads "
                f"version {STATE_VERSION}; resume with the sbdata version that saved it"
            )
        mine = self._fingerprint()
        for key, saved in state["fingerprint"].items():
            if mine.get(key) != saved:
                raise ValueError(
                    f"state_dict was saved with {key}={saved!r} but this loader has {key}={mine.get(key)!r}; "
                    f"resume with the same configuration (or start fresh without load_state_dict)"
                )
        own = state["per_rank"][dist_utils.rank()]
        self._epoch = int(state["epoch"])
        self.cache.load_state_dict(state["cache"])
        self.stats.load_state_dict(own["stats"])
        self.selection_log.load_state_dict(own["selection_log"])
        self.generator.set_state(own["generator"])
        self.policy.load_state_dict(own["policy"])
        self._repacker.clear()
        if own["pending"] is not None:
            self._repacker.add(own["pending"], torch.arange(batch_length(own["pending"]["batch"])))
        self._ready = collections.deque(own["ready"])
        self._resume = own["position"]
        if self._resume is not None:
            self._epoch = int(self._resume["epoch"])
            stateful_source = self._resume.get("source_state")
            if stateful_source is not None:
                self.loader.load_state_dict(stateful_source)

    def _position_state(self) -> dict[str, Any] | None:
        if self._position is None:
            return None
        position = dict(self._position)
        if isinstance(position.get("plan"), EpochPlan):
            position["plan"] = position["plan"].state_dict()
        if position["kind"] == "stream" and "candidates" not in position and _is_stateful(self.loader):
            position["source_state"] = self.loader.state_dict()
        return position

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "batch_size": self.batch_size,
            "num_examples": self._source.num_examples(),
            "world_size": dist_utils.world_size(),
            "policy": type(self.policy).__name__,
            "stale": self.stale,
        }

    def mode(self, epoch: int | None = None) -> str:
        """``"plain"``, ``"fresh"`` or ``"stale"``: what ``epoch`` (default: the next) does.

        With ``stale=n``, every n-th selective epoch (the first included) is due a rescoring,
        and runs ``"fresh"`` unless every example's cached loss is younger than ``n`` epochs
        (kept up to date by :meth:`record`), in which case it needs no scoring pass either.
        """
        epoch = self._epoch if epoch is None else epoch
        progress = training_progress(epoch, self.epochs)
        if self.keep >= 1.0 or not selection_active(progress, self.start, self.end):
            return PLAIN
        if self.stale is None:
            return FRESH
        due = (epoch - self._first_active_epoch()) % self.stale == 0
        return FRESH if due and not self._cache_is_recent(epoch) else STALE

    def _cache_is_recent(self, epoch: int) -> bool:
        """Every example has a cached loss measured less than ``stale`` epochs before ``epoch``."""
        n = self._source.num_examples()
        if not n:
            return False
        measured = self.cache.measured_epoch(torch.arange(n))
        return bool((measured > epoch - self.stale).all()) and bool((measured >= 0).all())

    def __len__(self) -> int:
        sizes = self._source.batch_sizes()
        if sizes is None:
            raise TypeError(
                f"len() is unknown for a {type(self.loader).__name__} source until one epoch has "
                "been iterated (its batch sizes are not known); wrap a torch DataLoader to get it upfront"
            )
        mode = self.mode()
        if mode == PLAIN:
            return len(sizes)
        selective = [n for i, n in enumerate(sizes) if not is_interrupt_batch(i, self.interrupt)]
        passed = len(sizes) - len(selective)
        kept = [self.policy.count(n) for n in selective]
        return passed + count_output_batches(kept, self.batch_size, self.last_batch, len(self._repacker))

    def __iter__(self) -> Iterator[Any]:
        return self._run_epoch()

    def record(self, losses: Tensor) -> None:
        """Feed the per-example training losses of the batch just yielded into the loss cache.

        Call it once per batch, in any epoch (plain, fresh or stale). It is checked in every
        mode; it changes something only where losses are cached (``stale=n``) or example ids
        are known (``index_key=``). Without either it is a checked no-op, so a training loop
        can call it unconditionally.

        Raises:
            RuntimeError: no batch was yielded yet, or ``record()`` was already called for it.
            ValueError: ``losses`` is not one finite loss per example of that batch.
        """
        if self._last_size is None:
            raise RuntimeError("record() was called before any batch was yielded; call it after each batch")
        if self._last_recorded:
            raise RuntimeError(
                "record() was already called for the batch just yielded; call it once per batch"
            )
        ids = self._last_ids
        losses = check_losses(losses, self._last_size, source="record()", ids=ids, nonfinite=self.nonfinite)
        self._last_recorded = True
        if ids is None:
            if self.stale is not None:
                raise RuntimeError(
                    "record() needs the example ids of the batch just yielded, and none are known; "
                    "return each example's index from the dataset and pass index_key="
                )
            return
        self._cache_update(ids, losses)
        self.stats.current.recorded += ids.numel()

    # ------------------------------------------------------------------ epochs

    def _first_active_epoch(self) -> int:
        if not self.epochs:
            return 0
        for epoch in range(self.epochs):
            if selection_active(training_progress(epoch, self.epochs), self.start, self.end):
                return epoch
        return 0

    def _run_epoch(self) -> Iterator[Any]:
        # Nothing happens until the first next(): a set_epoch() after iter() still counts.
        resume, self._resume = self._resume, None
        epoch = self._current_epoch = self._epoch
        mode = resume["mode"] if resume else self.mode(epoch)
        stats = self.stats.current if resume else self.stats.begin(epoch, mode)
        self._source.set_epoch(epoch)
        self._scorer_modules = list(self.model.modules())  # walked once per epoch, not per batch
        self._position = {"epoch": epoch, "mode": mode, "consumed": 0}
        completed = False
        try:
            stream = self._epoch_stream(mode, stats, resume)
            if dist_utils.is_distributed():
                stream = self._equal_counts(stream, stats)
            yield from stream
            self._sync_cache()
            completed = True
        finally:
            if not completed:  # an abandoned epoch leaves nothing behind
                self._repacker.clear()
                self._ready.clear()
            self._position = None
            self.stats.end()
            _log_epoch(stats, completed)
            self._epoch = epoch + 1

    def _epoch_stream(self, mode: str, stats: EpochStats, resume: dict[str, Any] | None) -> Iterator[Any]:
        yield from self._drain_ready(stats)  # batches completed before a checkpoint
        if mode == STALE and self._source.can_filter:
            yield from self._stale_epoch(stats, resume)
        else:
            yield from self._streamed_epoch(mode, stats, resume)
        yield from self._epoch_tail(stats)

    def _equal_counts(self, stream: Iterator[Any], stats: EpochStats) -> Iterator[Any]:
        """Yield the same number of batches on every rank (NOTE [ Equal batches on every rank ])."""
        try:
            exact = self.policy.exact or stats.mode == PLAIN
            local = len(self) - stats.batches if exact else None  # a resumed epoch yielded some
        except TypeError:
            local = None

        def drop_surplus(batch: Any | None) -> None:
            stats.dropped += (batch_length(batch) if batch is not None else 0) + len(self._repacker)
            self._repacker.clear()

        yield from dist_utils.equal_batch_counts(stream, local, drop_surplus)

    def _sync_cache(self) -> None:
        """Send this epoch's cache updates to every rank and apply all of them in rank order."""
        pending, self._pending = self._pending, []
        if dist_utils.is_distributed():
            dist_utils.share_cache_updates(self.cache, pending)

    def _cache_update(self, ids: Tensor, losses: Tensor) -> None:
        self.cache.update(ids, losses, self._current_epoch)
        if dist_utils.is_distributed():
            self._pending.append((ids.cpu().long(), losses.detach().float().cpu(), self._current_epoch))

    def _streamed_epoch(self, mode: str, stats: EpochStats, resume: dict[str, Any] | None) -> Iterator[Any]:
        """Load every batch; score (fresh) or look up (stale, ids in the batch) and select."""
        opened, first, skip_until = self._open_stream(resume)
        sizes = []
        with opened as batches:
            for i, (batch, source_ids) in enumerate(batches, first):
                if i < skip_until:  # fast-forward a source that cannot restore its position
                    continue
                self._position["consumed"] = i + 1  # type: ignore[index]
                n = batch_length(batch)
                sizes.append(n)
                stats.loaded += n
                stats.source_batches += 1
                ids = self._ids_of(batch, source_ids, n)
                if mode == PLAIN or is_interrupt_batch(i, self.interrupt):
                    yield from self._pass_through(batch, ids, n, stats)
                    continue
                batch = to_device(batch, self.device)
                if mode == STALE:
                    losses = self._cached_losses(ids)  # type: ignore[arg-type]
                else:
                    losses = self._score(batch, ids, n, stats)
                rows = self.policy.select(losses, self.generator)
                stats.selected += rows.numel()
                self.selection_log.observe(stats.epoch, losses, rows, ids)
                yield from self._emit(batch, n, ids, rows, stats, self._weights(losses, rows, n))
        if resume is None and self._source.batch_sizes() is None:
            self._source.observe_sizes(sizes)

    def _open_stream(self, resume: dict[str, Any] | None) -> tuple[Any, int, int]:
        """The epoch's ``(batch, ids)`` stream, the index of its first batch, and how many
        batches to skip. A source that loads given id batches gets the epoch's ids drawn up
        front, so a checkpoint can name exactly what is left."""
        consumed = resume["consumed"] if resume else 0
        self._position["kind"] = "stream"  # type: ignore[index]
        if getattr(self._source, "plans_every_epoch", False):
            candidates = resume["candidates"] if resume else self._source.candidates()
            self._position["candidates"] = candidates  # type: ignore[index]
            return self._source.load(candidates[consumed:]), consumed, 0
        if resume and resume.get("source_state") is not None:
            return self._source.epoch(), consumed, 0  # the source restored its own position
        return self._source.epoch(), 0, consumed

    def _stale_epoch(self, stats: EpochStats, resume: dict[str, Any] | None) -> Iterator[Any]:
        """Select from cached losses first, then load only what was selected."""
        plan = EpochPlan.from_state(resume["plan"]) if resume else self._stale_plan(stats)
        start = resume["consumed"] if resume else 0
        self._position.update(kind="stale", plan=plan)  # type: ignore[union-attr]
        todo = slice(start, None)
        with self._source.load(plan.batches[todo]) as batches:
            steps = zip(batches, plan.passes[todo], plan.weights[todo])
            for k, ((batch, ids), passed, weight) in enumerate(steps, start):
                self._position["consumed"] = k + 1  # type: ignore[index]
                n = batch_length(batch)
                stats.loaded += n
                stats.source_batches += 1
                if passed:
                    yield from self._pass_through(batch, ids, n, stats)
                    continue
                batch = to_device(batch, self.device)
                weight = None if weight is None else weight.to(self.device)
                yield from self._emit(batch, n, ids, torch.arange(n), stats, weight)

    def _stale_plan(self, stats: EpochStats) -> EpochPlan:
        """The id batches to load this stale epoch (see :mod:`sbdata.planning`).

        Under ``torch.distributed`` every rank gathers all ranks' candidate batches, makes the
        same global selection (same cache, same per-epoch generator, rank 0's policy state),
        and takes an equal, disjoint share.
        """
        local = self._source.candidates()
        per_rank, generator = self._global_candidates(local)
        weigh = getattr(self.policy, "weigh", None)

        def pick(batches: list[Tensor]) -> list[tuple[Tensor, Tensor | None]]:
            if not batches:
                return []
            sizes = [b.numel() for b in batches]
            ids = torch.cat(batches)
            losses = self._cached_losses(ids, sizes)
            parts = list(torch.split(losses, sizes))
            if callable(weigh):  # weigh() reads state select() just set: one batch at a time
                rows, weights = [], []
                for part in parts:
                    rows.append(self.policy.select(part, generator))
                    weights.append(weigh(part, rows[-1]).float().cpu())
            else:
                rows, weights = select_each(self.policy, parts, generator), [None] * len(parts)
            offsets = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
            flat = torch.cat([r + offset for r, offset in zip(rows, offsets)])
            self.selection_log.observe(stats.epoch, losses, flat, ids)
            return list(zip(rows, weights))

        shares, equal = share_selection(per_rank, pick, self.interrupt)
        stats.selected += sum(part.numel() for share in shares for _, part, _ in share) // len(shares)
        plan = cut_plan(
            local,
            shares[dist_utils.rank()],
            limit=equal,
            batch_size=self.batch_size,
            waiting=len(self._repacker),
            interrupt=self.interrupt,
            last_batch=self.last_batch,
        )
        stats.loads_skipped = sum(c.numel() for c in local) - plan.examples()
        return plan

    def _global_candidates(self, local: list[Tensor]) -> tuple[list[list[Tensor]], torch.Generator]:
        if not dist_utils.is_distributed():
            return [local], self.generator
        sizes = dist_utils.all_gather_variable(torch.tensor([c.numel() for c in local], dtype=torch.long))
        flat = dist_utils.all_gather_variable(torch.cat(local) if local else torch.empty(0, dtype=torch.long))
        per_rank = [list(torch.split(f, s.tolist())) for f, s in zip(flat, sizes)]
        self._share_policy_state()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * self._current_epoch)
        return per_rank, generator

    def _share_policy_state(self) -> None:
        """Give every rank rank 0's policy state, so a stateful policy decides alike everywhere."""
        state = [self.policy.state_dict()]
        torch.distributed.broadcast_object_list(state, src=0)
        self.policy.load_state_dict(state[0])

    def _epoch_tail(self, stats: EpochStats) -> Iterator[Any]:
        if self.last_batch == "yield":
            tail = self._repacker.flush()
            if tail is not None:
                yield self._hand_out(tail, stats)
        elif self.last_batch == "drop":
            self._repacker.clear()

    # ------------------------------------------------------------------ per batch

    def _ids_of(self, batch: Any, source_ids: Tensor | None, n: int) -> Tensor | None:
        if self.index_key is not None:
            ids = torch.as_tensor(get_field(batch, self.index_key, argument="index_key"))
            if ids.shape != (n,):
                raise ValueError(
                    f"index_key={self.index_key!r} must give one integer id per example, shape [{n}], "
                    f"got shape {list(ids.shape)}"
                )
            return ids.cpu().long()
        if source_ids is not None and source_ids.numel() != n:
            raise RuntimeError(
                f"the source drew {source_ids.numel()} ids for a batch of {n} examples; a custom "
                "collate_fn must keep one row per drawn index (or return ids and pass index_key=)"
            )
        return source_ids

    def _score(self, batch: Any, ids: Tensor | None, n: int, stats: EpochStats) -> Tensor:
        began = time.perf_counter()
        if self._score_fn is not None:
            losses = self._score_fn(self.model, batch)
            source = "score_fn"
        else:
            inputs = get_field(batch, self.input_key, argument="input_key")
            targets = get_field(batch, self.target_key, argument="target_key")
            losses = score_inputs(
                self.model,
                inputs,
                targets,
                self._loss_fn,  # type: ignore[arg-type]
                scale_factor=self.scale_factor,
                mode=self.scoring_mode,
                autocast_dtype=self.autocast_dtype,
                modules=self._scorer_modules,
            )
            source = "loss_fn"
        losses = check_losses(losses, n, source=source, ids=ids, nonfinite=self.nonfinite)
        stats.scoring_seconds += time.perf_counter() - began
        stats.scored += n
        if self.stale is not None and ids is not None:
            self._cache_update(ids, losses)
        return losses

    def _weights(self, losses: Tensor, rows: Tensor, n: int) -> Tensor | None:
        """Per-example loss weights for the whole source batch, if the policy sets any."""
        weigh = getattr(self.policy, "weigh", None)
        if not callable(weigh):
            return None
        weights = torch.ones(n, dtype=torch.float32)
        weights[rows] = weigh(losses, rows).float().cpu()
        return weights.to(self.device)

    def _cached_losses(self, ids: Tensor, sizes: list[int] | None = None) -> Tensor:
        """Cached losses of ``ids`` (source batches of ``sizes``, default one batch); ids never
        measured rank above every measured one of their batch."""
        losses, known = self.cache.lookup(ids)
        if bool(known.all()):
            return losses
        sizes = sizes or [ids.numel()]
        for part, seen in zip(torch.split(losses, sizes), torch.split(known, sizes)):
            top = float(part[seen].max()) if bool(seen.any()) else 0.0
            part[~seen] = top + 1.0  # a view: fills ``losses``
        return losses

    def _emit(
        self, batch: Any, n: int, ids: Tensor | None, rows: Tensor, stats: EpochStats, weights: Tensor | None = None
    ) -> Iterator[Any]:
        """Hand out the selected ``rows`` of ``batch``: as they are if they make exactly one
        full batch, else through the re-pack buffer (NOTE [ One copy, no views ])."""
        packed = {"batch": batch}
        if ids is not None:
            packed["ids"] = ids
        if weights is not None:
            packed["weights"] = weights
        whole = rows.numel() == self.batch_size == n and len(self._repacker) == 0
        recycled = getattr(self._source, "recycles_buffers", False)  # FFCV: a view into its buffers
        if whole and not recycled and bool((rows == torch.arange(rows.numel())).all()):
            yield self._hand_out(packed, stats, n)  # already one full batch: no copy
            return
        self._ready.extend(self._repacker.add(packed, rows))
        yield from self._drain_ready(stats)

    def _drain_ready(self, stats: EpochStats) -> Iterator[Any]:
        while self._ready:
            yield self._hand_out(self._ready.popleft(), stats, self.batch_size)  # full ones only

    def _pass_through(self, batch: Any, ids: Tensor | None, n: int, stats: EpochStats) -> Iterator[Any]:
        stats.passed_through += n
        packed = {"batch": batch} if ids is None else {"batch": batch, "ids": ids}
        if getattr(self._source, "recycles_buffers", False):  # FFCV reuses its buffers: copy
            packed = Repacker(n).add(packed, torch.arange(n))[0]
        yield self._hand_out(packed, stats, n)

    def _hand_out(self, packed: dict[str, Any], stats: EpochStats, size: int | None = None) -> Any:
        batch = packed["batch"]
        self._last_ids = packed.get("ids")
        self._last_size = size = batch_length(batch) if size is None else size
        self.batch_weights = packed.get("weights")
        self._last_recorded = False
        stats.yielded += size
        stats.batches += 1
        return batch


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


def _is_stateful(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
