"""``SelectiveBatchLoader``: a loader wrapper that yields fixed-size batches of high-loss examples.

The class holds a frozen configuration (:class:`~sbdata.config.LoaderConfig`) and the state
that lives across epochs: the loss cache, the policy, statistics, and the queue of yielded
batches that ``record()`` pairs with. ``iter()`` claims the next epoch and returns an
:class:`~sbdata._epoch.EpochIterator`, which owns everything that lives for one epoch.
Decisions are pure functions elsewhere: :mod:`~sbdata.policies` (which rows),
:mod:`~sbdata.schedule` (when), :mod:`~sbdata.planning` (stale epochs), :mod:`~sbdata.repack`.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from ._epoch import FRESH, PLAIN, STALE, Carried, EpochIterator, EpochRun, carried_meta, carried_rows
from .batches import Key
from .cache import LossCache, Update, concat_ids
from .config import OPTION_NAMES, STATE_VERSION, LoaderConfig, ScoreFn, Stale, check_keeps_rows, check_state, resolve
from .handouts import Handout, HandoutQueue
from .policies import SelectionPolicy, make_policy
from .schedule import (
    carried_after,
    epoch_length,
    first_active_epoch,
    selection_active,
    training_progress,
)
from .scoring import LossFn, check_losses, per_example_loss
from .sharded import ShardedLossCache, check_own_shard
from .sources import make_source
from .stats import LoaderStats, SelectionLog

__all__ = ["SelectiveBatchLoader"]

_FIXED = frozenset(OPTION_NAMES) | {"model", "loader", "config"}


def _keep_for(keep: float | None, policy: Any) -> Any:
    """``keep``, defaulting to 0.5 or a policy object's own ``keep``; the two must not disagree."""
    own = None if isinstance(policy, str) else getattr(policy, "keep", None)
    if keep is None:
        return 0.5 if own is None else own
    if own is not None and keep != own:
        raise ValueError(
            f"keep={keep!r} but policy={policy!r} keeps {own!r}; the policy object decides how many rows "
            "are kept, so leave keep= out (or pass the same value to both)"
        )
    return keep


def _device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device or a name such as 'cuda:0', got device={device!r}") from e


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


class SelectiveBatchLoader:
    """Wrap a loader so that it yields full-size batches of the examples with the highest loss.

    Each source batch is scored by ``model`` (a forward pass without gradients), a policy keeps
    ``keep`` of its examples, favouring high losses, and the kept rows are re-packed into
    batches of ``batch_size``. The training loop does not change::

        for x, y in SelectiveBatchLoader(train_loader, model, keep=0.5):
            loss = F.cross_entropy(model(x), y)
            ...

    Args:
        loader: a ``torch.utils.data.DataLoader``, an FFCV ``Loader`` or any re-iterable of
            batches. Batches are tensors, tuples, lists, dicts or nested mixes of them.
        model: the scorer, usually the model being trained.
        keep: fraction of each source batch kept while selection is active, in (0, 1]; default
            0.5, or the ``keep`` of a policy object passed as ``policy``.
        loss_fn: ``(outputs, targets) -> losses[N]``; default cross-entropy. A loss module with a
            ``reduction`` attribute, or a function with a ``reduction`` argument, is used with
            ``reduction="none"``.
        score_fn: ``(model, batch) -> losses[N]`` for batches that are not ``(inputs, targets)``;
            it runs under ``torch.no_grad()``, ``scoring_mode`` and ``autocast_dtype``, and the
            model's modes and BatchNorm buffers are restored afterwards, as for the built-in pass.
        policy: ``"rank"`` (default, Composer), ``"threshold"`` (the paper), ``"topk"``,
            ``"infobatch"`` (count-exact), ``"infobatch-prune"`` (InfoBatch's published draw: a
            variable count), ``"random"`` (the control), or a :class:`~sbdata.policies.SelectionPolicy`.
        batch_size: size of the yielded batches; default the source loader's ``batch_size``.
        epochs: total training epochs; needed for ``start``/``end`` and :meth:`total_steps`.
        start: selection is active while ``epoch / epochs`` is in ``[start, end)``.
        end: see ``start``; from ``end`` on, batches pass through unchanged.
        interrupt: source batch ``i`` of an epoch passes through unchanged when
            ``(i + 1) % interrupt == 0``; ``0`` never.
        scale_factor: downsample inputs for the scoring pass only (``<= 1``).
        stale: ``None`` scores every selective epoch; ``n`` scores every n-th selective epoch
            (the first included) and selects from cached losses in between, loading only what
            it keeps; ``"once"`` scores once, then relies on :meth:`record` to keep losses current.
        input_key: where the inputs live in a batch (index, key or callable).
        target_key: where the targets live in a batch (index, key or callable).
        index_key: where example ids live in a batch, if it carries them.
        device: where every yielded batch is put (plain or selected) and where scoring runs;
            default the model's device.
        last_batch: ``"yield"`` the epoch's partial last batch, ``"drop"`` it, or ``"carry"`` its
            rows into the next epoch; default ``"drop"`` if the wrapped loader drops its last
            batch (``drop_last=True``), else ``"yield"``.
        scoring_mode: ``"eval"`` (default) or ``"train"``; the model's mode and BatchNorm buffers
            are restored either way.
        autocast_dtype: run the scoring pass under ``torch.autocast`` with this dtype.
        nonfinite: ``"raise"`` (default) on NaN or infinite losses, naming the example ids; or the
            explicit opt-in ``"lowest"`` / ``"highest"`` to rank them below or above every finite loss.
        seed: seed of the loader's own random draws (never the global RNG).
        shard_cache: under ``torch.distributed``, shard the stale-mode loss cache across the
            ranks (each holds ``1 / world`` of it) instead of keeping a copy on every rank.
            Checkpoint it with :func:`sbdata.checkpoint.save` (every rank's shard, through
            ``torch.distributed.checkpoint``); see the distributed docs for when it pays.

    The options are fixed after construction: setting one raises.
    """

    def __init__(
        self,
        loader: Any,
        model: nn.Module,
        keep: float | None = None,
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
        stale: Stale = None,
        input_key: Key = 0,
        target_key: Key = 1,
        index_key: Key | None = None,
        device: torch.device | str | None = None,
        last_batch: str | None = None,
        scoring_mode: str = "eval",
        autocast_dtype: torch.dtype | None = None,
        nonfinite: str = "raise",
        seed: int = 0,
        shard_cache: bool = False,
    ) -> None:
        keep = _keep_for(keep, policy)
        config = LoaderConfig(
            keep, loss_fn, score_fn, policy, batch_size, epochs, start, end, interrupt, scale_factor,
            stale, input_key, target_key, index_key, _device(device),
            last_batch, scoring_mode, autocast_dtype, nonfinite, seed, shard_cache,
        )  # fmt: skip
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the scorer), got {type(model).__name__}")
        source = make_source(loader)
        config = resolve(config, source, _model_device(model), type(loader).__name__)
        self.__dict__.update(
            config=config,
            model=model,
            _source=source,
            _policy=make_policy(config.policy, config.keep),
            _loss_fn=per_example_loss(loss_fn) if score_fn is None else None,
        )
        check_keeps_rows(self._policy, source.batch_size() or max(source.batch_sizes() or [0]), config.keep)
        #: per-example losses and the epoch each was measured in (stale mode)
        self.cache: LossCache | ShardedLossCache = (
            ShardedLossCache(source.num_examples() or 0)
            if config.shard_cache
            else LossCache(source.num_examples() or 0 if config.stale is not None else 0)
        )
        #: counters per epoch: loaded, scored, selected, yielded, ... (``sb.stats.current``)
        self.stats = LoaderStats()
        #: samples of losses selected and skipped, for :func:`sbdata.plot.selection_report`;
        #: per-example counts only with a replicated cache (they would be O(N) on every rank)
        self.selection_log = SelectionLog(seed=seed, size=source.num_examples() or 0, per_example=not config.shard_cache)
        self._handouts = HandoutQueue()
        self._epoch = 0
        self._live_ref: weakref.ref[EpochIterator] | None = None
        self._resume: dict[str, Any] | None = None  # a mid-epoch position to continue from
        self._carried: Carried = None  # rows carried into the next epoch
        self._pending: list[Update] = []  # cache updates not yet sent to other ranks
        self._warned_replay = False  # the replay warning is given once
        self._last_finished = -1  # the last epoch that ended on every rank (distributed only)

    # ------------------------------------------------------------------ configuration

    def __getattr__(self, name: str) -> Any:
        if name in OPTION_NAMES and "config" in self.__dict__:  # keep, batch_size, ...: read-only
            return getattr(self.__dict__["config"], name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIXED:
            raise AttributeError(
                f"{name} is fixed when a SelectiveBatchLoader is built (lengths, plans and checkpoints "
                f"depend on it); build a new SelectiveBatchLoader(..., {name}=...) instead"
            )
        super().__setattr__(name, value)

    @property
    def policy(self) -> SelectionPolicy:
        """The selection policy object (built from ``policy=`` and ``keep=``)."""
        return self._policy

    @property
    def loader(self) -> Any:
        """The wrapped loader, as the user passed it."""
        return self._source.original

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    @property
    def sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self) -> Any:
        return getattr(self.loader, "batch_sampler", None)

    # ------------------------------------------------------------------ epochs and lengths

    @property
    def epoch(self) -> int:
        """The epoch the current iterator runs, or the next ``iter()`` will."""
        live = self._live()
        return live.epoch if live is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next ``iter()`` runs (like ``DistributedSampler.set_epoch``);
        the source's sampler follows it."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got epoch={epoch!r}")
        if self._resume is not None and epoch != self._resume["epoch"]:
            raise ValueError(
                f"the loaded state is in the middle of epoch {self._resume['epoch']}, so set_epoch({epoch}) "
                f"would silently skip or repeat data; call set_epoch({self._resume['epoch']}) (or none) to "
                "finish that epoch, or load a state taken at an epoch boundary"
            )
        self._epoch = epoch

    def selective(self, epoch: int) -> bool:
        """Whether selection is active in ``epoch`` (the ``start``/``end`` schedule and ``keep``)."""
        cfg = self.config
        return cfg.keep < 1.0 and selection_active(training_progress(epoch, cfg.epochs), cfg.start, cfg.end)

    def mode(self, epoch: int | None = None, candidates: Tensor | list[Tensor] | None = None) -> str:
        """``"plain"``, ``"fresh"`` or ``"stale"``: what ``epoch`` (default: the current or next) does.

        With ``stale=n`` every n-th selective epoch (the first included) is due a rescoring, and
        runs ``"fresh"`` unless every cached loss it needs is younger than ``n`` epochs (kept
        current by :meth:`record`); with ``stale="once"`` only the first is. Without
        ``candidates`` this is the schedule's prediction. When an epoch starts, the decision is
        made again from its ``candidates`` (the ids it will load, where the source can list
        them): an epoch with a never-measured candidate runs ``"fresh"``, so a stale epoch never
        selects from made-up losses (a streamed stale epoch scores such batches instead).
        """
        epoch = self.epoch if epoch is None else epoch
        cfg = self.config
        if not self.selective(epoch):
            return PLAIN
        if cfg.stale is None:
            return FRESH
        n = self._source.num_examples()
        every_one = bool(n) and self.cache.known_count() >= n  # every example has a loss: the counts answer, O(1)
        if candidates is None or every_one:
            oldest = self.cache.oldest_epoch() if every_one else -1
        else:
            flat = candidates if isinstance(candidates, Tensor) else concat_ids(candidates)
            if isinstance(self.cache, ShardedLossCache):  # collective: the owners answer
                measured = self.cache.fetch(flat).epochs
            else:
                measured = self.cache.measured_epoch(flat)
            oldest = int(measured.min()) if flat.numel() else -1
        first = first_active_epoch(cfg.epochs, cfg.start, cfg.end)
        due = epoch <= first if cfg.stale == "once" else (epoch - first) % cfg.stale == 0
        recent = oldest >= 0 and (cfg.stale == "once" or oldest > epoch - cfg.stale)
        if candidates is None:  # a prediction from the schedule (earlier epochs fill the cache)
            return FRESH if due and not recent else STALE
        fresh = oldest < 0 or (due and not recent)
        fresh = bool(dist_utils.all_reduce_int(int(fresh), "max"))  # every rank sees its own candidates
        return FRESH if fresh else STALE

    def _epoch_shape(self, epoch: int, carried: int) -> dict[str, Any]:
        sizes = self._source.batch_sizes()
        if sizes is None:
            raise TypeError(
                f"len() is unknown for a {type(self.loader).__name__} source until one epoch has "
                "been iterated (its batch sizes are not known); wrap a torch DataLoader to get it upfront"
            )
        cfg = self.config
        return dict(
            sizes=sizes, plain=not self.selective(epoch), interrupt=cfg.interrupt, count=self._policy.count,
            batch_size=cfg.batch_size, last_batch=cfg.last_batch, carried=carried,
        )  # fmt: skip

    def epoch_length(self, epoch: int, carried: int = 0) -> int:
        """Batches ``epoch`` yields when it starts with ``carried`` rows in the re-pack buffer:
        exact for every policy whose ``exact`` is true (all built-ins by default), an upper
        bound otherwise (:func:`sbdata.schedule.epoch_length`)."""
        return epoch_length(**self._epoch_shape(epoch, carried))

    def __len__(self) -> int:
        """Batches the current epoch yields (or the next, between epochs): what a scheduler or
        progress bar should be sized from. See :meth:`epoch_length`."""
        live = self._live()
        if live is not None:
            return len(live)
        if self._resume is not None and self._resume["length"] is not None:
            return int(self._resume["length"])
        return self.epoch_length(self._epoch, self._carried_rows())

    def total_steps(self) -> int:
        """Batches yielded over the configured ``epochs`` (epoch 0 to ``epochs - 1``): size LR
        schedules with it, e.g. ``OneCycleLR(opt, max_lr, total_steps=sb.total_steps())``."""
        if self.epochs is None:
            raise ValueError("total_steps() needs the number of training epochs; pass epochs= to SelectiveBatchLoader")
        total = carried = 0
        for epoch in range(self.epochs):
            shape = self._epoch_shape(epoch, carried)
            total += epoch_length(**shape)
            carried = carried_after(**shape)
        return total

    def __iter__(self) -> EpochIterator:
        """Claim the next epoch and return its iterator; an unfinished previous one is closed."""
        live = self._live()
        if live is not None:
            live.close("closed by a newer iter() of the same loader")
        self._handouts.new_epoch()
        resume, self._resume = self._resume, None
        epoch = int(resume["epoch"]) if resume else self._epoch
        it = EpochIterator(self, epoch, resume)
        self._epoch = epoch + 1
        self._live_ref = weakref.ref(it)
        return it

    def _live(self) -> EpochIterator | None:
        it = self._live_ref() if self._live_ref is not None else None
        return it if it is not None and not it.finished and it.closed_reason is None else None

    def _epoch_ended(self, run: EpochRun, completed: bool) -> None:
        """Called once by the epoch's run when it finishes or is abandoned."""
        self._carried = run.repacker if completed and self.last_batch == "carry" and len(run.repacker) else None
        if completed and dist_utils.is_distributed():
            self._last_finished = run.epoch
            self._share_cache_updates()
            dist_utils.share_policy_state(self._policy)
        self.stats.end()
        live = self._live_ref() if self._live_ref is not None else None
        if live is None or live._run is run:
            self._live_ref = None

    def _epoch_given_back(self, epoch: int, resume: dict[str, Any] | None, carried: Any) -> None:
        """An iterator closed before its first ``next()`` returns its epoch, unless another
        ``iter()`` has claimed a later one since."""
        if self._epoch == epoch + 1:
            self._epoch, self._resume, self._carried = epoch, resume, carried
        live = self._live_ref() if self._live_ref is not None else None
        if live is None or live._run.epoch == epoch:
            self._live_ref = None

    def _take_carried(self) -> Carried:
        carried, self._carried = self._carried, None
        return carried

    def _carried_rows(self) -> int:
        return carried_rows(self._carried)

    # ------------------------------------------------------------------ record and weights

    def _warn_replay_once(self) -> None:
        if self._warned_replay or isinstance(self.loader, (list, tuple)):
            return  # a list replays itself exactly
        self._warned_replay = True
        warnings.warn(
            f"sbdata resumes a mid-epoch checkpoint of a {type(self.loader).__name__} by iterating it again "
            "and skipping what was consumed: exact only if, after set_epoch(), it yields the same batches "
            "again. For an exact resume, wrap a map-style torch DataLoader (sbdata then draws each epoch's "
            "ids itself), a StatefulDataLoader, or an object with its own state_dict()/load_state_dict()",
            stacklevel=4,
        )

    def _handed_out(self, size: int, ids: Tensor | None, weights: Tensor | None, epoch: int) -> None:
        self._handouts.push(Handout(size, ids, weights, epoch))

    def record(self, losses: Tensor, *, ids: Tensor | None = None) -> Tensor:
        """Feed the per-example training losses of a yielded batch back, and weigh them.

        The losses belong to the oldest yielded batch not yet recorded (NOTE [ Per-batch
        information travels with the batch order ] in :mod:`sbdata.handouts`), so a wrapper that
        reads ahead still pairs correctly as long as the loop records once per batch, in order;
        ``ids=`` pairs with the batch holding exactly those example ids instead.

        With ``stale`` set the losses refresh the loss cache (ids must be known: a
        ``DataLoader`` or FFCV source, or ``index_key=``). Call it in every epoch, plain ones
        included; in other configurations it only checks and weighs.

        Returns:
            ``losses`` multiplied by that batch's per-example weights (ones unless the policy
            reweights, in which case it is ``losses`` itself): ``loss = sb.record(losses).mean()``.

        Raises:
            RuntimeError: no batch is waiting to be recorded, or the pairing is unknown.
            ValueError: ``losses`` is not one finite loss per example of that batch.
        """
        handout = self._handouts.peek(ids)
        checked = check_losses(losses, handout.size, source="record()", ids=handout.ids, nonfinite=self.nonfinite)
        if self.stale is not None and handout.ids is None:
            raise RuntimeError(
                "record() needs the example ids of the batch, and none are known; return each "
                "example's index from the dataset and pass index_key="
            )
        self._handouts.remove(handout)
        if handout.ids is not None:
            self.stats.current.recorded += handout.size
        if self.stale is not None:
            self._cache_update(handout.ids, checked, handout.epoch)  # type: ignore[arg-type]
            if handout.epoch == self._last_finished and not self._handouts.has_epoch(handout.epoch):
                self._share_cache_updates()  # the ended epoch's last batch: NOTE [ Cache updates reach every rank ]
        if handout.weights is None:
            return losses
        return losses * handout.weights.to(device=losses.device, dtype=losses.dtype)

    @property
    def batch_weights(self) -> Tensor | None:
        """Per-example loss weights of the batch waiting to be recorded (or, if none is, the
        last one yielded), for policies that reweight; ``None`` for the others.

        Raises RuntimeError when several yielded batches are unrecorded (a wrapper reads
        ahead): use ``sb.record(losses)``, which returns the weighted losses of the right batch.
        """
        if not self._policy.reweights:
            return None
        waiting = self._handouts.only_waiting()
        handout = waiting or self._handouts.last
        return None if handout is None or handout.weights is None else handout.weights.to(self.device)

    def _share_cache_updates(self) -> None:
        """NOTE [ Cache updates reach every rank ] Under ``torch.distributed`` every rank sends
        its cache updates (scores and ``record()`` losses) to the others when an epoch ends, and
        once more when ``record()`` takes the last batch of an ended epoch (the training step of
        the last batch runs after the epoch ended), so every rank starts the next epoch, and
        rank 0 saves it, with the same cache."""
        if isinstance(self.cache, ShardedLossCache):  # NOTE [ Sharded loss cache ]
            self.cache.share()
            return
        pending, self._pending = self._pending, []
        dist_utils.share_cache_updates(self.cache, pending)

    def _cache_update(self, ids: Tensor, losses: Tensor, epoch: int) -> None:
        self.cache.update(ids, losses, epoch)
        if dist_utils.is_distributed() and not isinstance(self.cache, ShardedLossCache):
            self._pending.append((ids.cpu().long(), losses.detach().float().cpu(), epoch))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: positions and ids (never rows of data), plain
        containers and CPU tensors, readable with ``torch.load(..., weights_only=True)``.

        Taken between epochs (or right after an epoch's last batch), the next ``iter()`` after
        :meth:`load_state_dict` runs the next epoch as the uninterrupted run would have. Taken
        in the middle of an epoch, it is the state "as yielded": the resumed iterator yields the
        rest of that epoch. Local to the calling rank (no collectives): under
        ``torch.distributed`` rank 0's state at an epoch boundary resumes every rank, and a
        mid-epoch state resumes the rank that saved it.
        """
        live = self._live()
        position = live.state_dict() if live is not None else self._resume
        carried = carried_meta(self._carried)
        return {
            "version": STATE_VERSION,
            "fingerprint": self.config.fingerprint(self._source.num_examples(), self._policy),
            "world_size": dist_utils.world_size(),
            "epoch": position["epoch"] if position else self._epoch,
            "position": position,
            "carried": None if position else carried,
            "source": self._source.state_dict(),
            "cache": self.cache.state_dict() if self.stale is not None else None,
            "policy": self._policy.state_dict(),
            "stats": self.stats.state_dict(),
            "selection_log": self.selection_log.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the next ``iter()`` continues where it was taken.

        Raises:
            ValueError: the state came from another format version or configuration.
        """
        check_state(state, self.config.fingerprint(self._source.num_examples(), self._policy), dist_utils.world_size())
        live = self._live()
        if live is not None:
            live.close("closed by load_state_dict()")
        self._epoch = int(state["epoch"])
        self._resume = state["position"]
        self._carried = state["carried"]
        self._source.load_state_dict(state["source"])
        if state["cache"] is not None:
            if isinstance(self.cache, ShardedLossCache):
                check_own_shard(state["cache"]["shard"])
            self.cache.load_state_dict(state["cache"])
        self._policy.load_state_dict(state["policy"])
        self.stats.load_state_dict(state["stats"])
        self.selection_log.load_state_dict(state["selection_log"])
        self._handouts = HandoutQueue()

    def __repr__(self) -> str:
        return (
            f"SelectiveBatchLoader({type(self.loader).__name__}, keep={self.keep}, policy={self._policy!r}, "
            f"batch_size={self.batch_size}, stale={self.stale!r}, epoch={self.epoch})"
        )
