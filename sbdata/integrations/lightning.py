r"""Lightning support for :class:`~sbdata.SelectiveBatchLoader`: whole epochs and exact resume.

Return the loader from ``train_dataloader()`` and add :class:`SelectiveBackprop` to the trainer::

    from sbdata.integrations.lightning import SelectiveBackprop

    class Module(lightning.LightningModule):
        def train_dataloader(self):
            source = DataLoader(dataset, batch_size=64, shuffle=True)
            return SelectiveBatchLoader(source, self, keep=0.5, epochs=10, end=0.8)

    trainer = lightning.Trainer(max_epochs=10, callbacks=[SelectiveBackprop()])
    trainer.fit(Module())  # resume later with trainer.fit(Module(), ckpt_path=...)

NOTE -- how Lightning 2.6.6 drives a train loader that is not a ``torch.utils.data.DataLoader``
(files under ``lightning/pytorch/``):

1. ``len()``: read in ``_FitLoop.setup_data`` into ``combined_loader.limits`` (loops/fit_loop.py:264-270),
   ``fit_loop.max_batches`` (= ``trainer.num_training_batches``, fit_loop.py:277-278,
   trainer/trainer.py:1618-1620) and ``trainer.val_check_batch`` (fit_loop.py:317). ``setup_data``
   runs once per ``fit`` (early return at fit_loop.py:227) unless ``reload_dataloaders_every_n_epochs``
   is set. Each ``iter()`` of the fetcher re-reads ``min(len(loader), limit)`` (loops/fetchers.py:72-77,
   utilities/combined_loader.py:96-101): a longer epoch is cut to the setup length, a shorter one
   ends on time.
2. ``iter()``: ``setup_data`` calls ``iter(loader)`` twice before ``on_train_start``: a probe that only
   checks iterability (fit_loop.py:253 -> trainer/connectors/data_connector.py:395, skipped for real
   ``DataLoader``\ s) and the first epoch's iterator (fit_loop.py:276). Later epochs call it in
   ``_TrainingEpochLoop.on_run_start`` (loops/training_epoch_loop.py:245-246), *after*
   ``on_train_epoch_start`` (fit_loop.py:451); never again for the first epoch of a run, resumed or
   not. So a loader whose ``iter()`` claims an epoch at once starts ``fit`` one epoch late, unless
   an iterator dropped before its first ``next()`` gives its epoch back.
3. ``done``: an epoch ends by count, when ``batch_progress.current.ready == trainer.num_training_batches``
   or the fetcher has fetched its length (``is_last_batch``; training_epoch_loop.py:316, 442-445,
   fetchers.py:68-69); no ``next()`` follows the last batch. ``StopIteration`` also ends it (:155-156).
4. Save: ``dump_checkpoint`` (trainer/connectors/checkpoint_connector.py:415-511) stores the loops,
   which include ``loader.state_dict()`` of every train loader with ``state_dict``/``load_state_dict``
   (``_Stateful``; fit_loop.py:520-525, combined_loader.py:378-380), then each callback's
   ``state_dict()`` (:459) and ``on_save_checkpoint`` (:509). Load: ``fit(ckpt_path=...)`` restores
   callbacks first (``on_load_checkpoint`` then ``load_state_dict``, checkpoint_connector.py:322-329,
   trainer.py:1044-1046): before ``on_fit_start``, before the loops (trainer.py:1070) and before
   ``train_dataloader()`` is called (trainer.py:1123).
5. Lightning calls ``loader.load_state_dict()`` itself only when the fit loop is ``restarting``
   (fit_loop.py:552-555), i.e. the saved epoch had not reached ``on_train_epoch_end``
   (fit_loop.py:133-140) or ``max_steps`` is set; it does so in ``setup_data`` after the probe
   ``iter()`` and before the first epoch's (fit_loop.py:253, 272, 276). An end-of-epoch checkpoint
   never restores the loader.
6. Mid-epoch resume: Lightning does not skip batches; it makes one new iterator and only counts those
   already done (``data_fetcher.fetched += batch_progress.current.ready``, training_epoch_loop.py:249),
   so the loader must resume its own position (it warns when the loader is not ``_Stateful``,
   :218-230). After an epoch's last batch: a checkpoint taken in ``on_train_batch_end`` counts that
   epoch as done (fit_loop.py:398-404), restarts the batch counters only if
   ``completed >= trainer.num_training_batches`` (training_epoch_loop.py:203-207) and runs the next
   epoch on the iterator ``setup_data`` made; one taken later in the epoch (``on_validation_end``:
   "restarted on last") resumes the finished epoch, which fetches nothing since ``is_last_batch`` is
   restored (progress.py:231-233, training_epoch_loop.py:286-289), and the next epoch calls ``iter()``.
7. ``reload_dataloaders_every_n_epochs=n`` re-runs all of ``setup_data`` every n epochs in
   ``on_advance_start``, before ``on_train_epoch_start`` (fit_loop.py:166-170, 440): it re-reads
   ``len()``, but calls ``train_dataloader()`` again (a new loader starts from scratch) and ``iter()``
   twice more, and the epoch loop then calls ``iter()`` a third time. Not a way to follow a changing
   length; :class:`SelectiveBackprop` resizes the epoch itself and refuses it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.data import sized_len
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage
except ImportError as error:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "sbdata.integrations.lightning needs Lightning 2.x: pip install lightning (or pip install 'sbdata[integrations]')"
    ) from error

__all__ = ["SelectiveBackprop", "SelectiveLoader"]


@runtime_checkable
class SelectiveLoader(Protocol):
    """What :class:`SelectiveBackprop` uses of a :class:`~sbdata.SelectiveBatchLoader`."""

    @property
    def epoch(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


class SelectiveBackprop(Callback):
    """Run a :class:`~sbdata.SelectiveBatchLoader` under ``Trainer.fit`` with whole epochs and exact resume.

    * Every epoch runs ``len(loader)`` batches, also when the length changes between epochs
      (selection switching on or off): at each ``on_train_epoch_start`` the trainer's batch count
      (``trainer.num_training_batches``, the fetcher's limit and, for a fractional
      ``val_check_interval``, ``trainer.val_check_batch``) is re-read from ``len(loader)``, with
      ``limit_train_batches`` applied.
    * The loader's epoch follows ``trainer.current_epoch``. In a fresh run, if the ``iter()`` calls
      Lightning makes in ``setup_data`` moved it, ``on_train_start`` sets it back (``set_epoch``)
      and makes the first epoch's iterator again. After an epoch Lightning cut short
      (``limit_train_batches``, -1 from ``on_train_batch_start``) the unfinished iterator still sets
      ``len(loader)``, so the next epoch is sized at its first batch instead.
    * ``loader.state_dict()`` is stored in every checkpoint, under ``checkpoint["callbacks"]
      ["SelectiveBackprop"]["loader"]``. On ``fit(ckpt_path=...)`` it is loaded at ``on_train_start``,
      after Lightning's own mid-epoch ``load_state_dict`` (the same state, so loading it again changes
      nothing) and before the resumed epoch's iterator is made, for end-of-epoch and mid-epoch
      checkpoints alike (and for one saved after an epoch's last batch but before its end, e.g. by
      ``ModelCheckpoint`` after validation, no iterator is made: Lightning fetches nothing more for
      that epoch). A checkpoint without this callback's state falls back to the copy Lightning
      keeps of a single stateful train loader.

    Args:
        loader: the loader Lightning trains on. ``None`` (default): found at ``on_train_start`` among
            the train dataloaders, which must hold exactly one (anything with ``epoch``,
            ``set_epoch``, ``state_dict``, ``load_state_dict`` and ``len``), so ``train_dataloader()``
            may build it. If given, it must be the very object Lightning iterates.

    Raises:
        ValueError: with ``Trainer(reload_dataloaders_every_n_epochs=n)``, which re-requests the loader
            and calls ``iter()`` on it twice more at each reload; and at ``on_train_start`` when the
            loader cannot be found.

    Needs ``len(loader)`` (without it Lightning prefetches a batch, so a mid-epoch state would be one
    batch ahead). ``trainer.estimated_stepping_batches`` still uses the first epoch's length (size LR
    schedules from ``loader.total_steps()``). Under DDP the checkpoint file holds rank 0's state, as it
    does for Lightning's own copy, which resumes every rank exactly only at epoch boundaries.
    """

    def __init__(self, loader: SelectiveLoader | None = None) -> None:
        super().__init__()
        self.loader = loader
        self._given = loader is not None
        self._pending: dict[str, Any] | None = None  # a checkpoint's loader state, applied at on_train_start
        self._resize_at_first_batch = False

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """``{"loader": loader.state_dict()}``; the state not applied yet if a resume is under way."""
        if self._pending is not None:
            return {"loader": self._pending}
        return {} if self.loader is None else {"loader": self.loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the loader's state until ``on_train_start`` (the loader may not exist yet)."""
        self._pending = state_dict.get("loader")

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Fall back to Lightning's copy of the loader's state; :meth:`load_state_dict` (called next,
        if the checkpoint has this callback's state) overrides it."""
        loops = checkpoint.get("loops") or {}
        states = loops.get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or []
        self._pending = copy.deepcopy(states[0]) if len(states) == 1 else None

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and getattr(trainer, "reload_dataloaders_every_n_epochs", None):
            raise ValueError(
                "SelectiveBackprop needs Trainer(reload_dataloaders_every_n_epochs=0): each reload calls "
                "train_dataloader() and iter() twice more, and every iter() of a SelectiveBatchLoader "
                "claims an epoch; a rebuilt loader would also lose its state. The callback already "
                "re-reads len(loader) every epoch."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the loader (or realign a fresh run's), then remake and size the first epoch's iterator."""
        loader = self._find(trainer)
        reset = False
        if self._pending is not None:
            loader.load_state_dict(self._pending)
            self._pending, reset = None, True
        elif loader.epoch != trainer.current_epoch:  # setup_data's iter() calls claimed an epoch
            loader.set_epoch(trainer.current_epoch)
            reset = True
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop.restarted_on_last and epoch_loop.batch_progress.is_last_batch:
            return  # saved after the epoch's last batch, before its end: nothing more is fetched (NOTE 6)
        fetcher = trainer.fit_loop._data_fetcher
        assert fetcher is not None
        if reset:
            iter(fetcher)  # replaces the iterator setup_data made before the loader was restored
        self._resize(trainer)
        fetcher.reset()  # re-reads its length, now from len(loader); nothing was fetched yet
        if epoch_loop.restarted_on_train_batch_end and epoch_loop.batch_progress.is_last_batch:
            # Saved at the last batch of an epoch: Lightning restarts its counters for the next
            # epoch only if they reached num_training_batches (NOTE 6), which may have grown.
            trainer.fit_loop.max_batches = epoch_loop.batch_progress.current.ready
            self._resize_at_first_batch = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Size the coming epoch from ``len(loader)`` (Lightning calls ``iter()`` right after)."""
        if self._find(trainer).epoch == trainer.current_epoch:
            self._resize(trainer)
        else:  # Lightning cut the last epoch short: its iterator sets len(loader) until the next
            self._resize_at_first_batch = True  # iter() claims the next epoch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Size the epoch now running when its length was not known at ``on_train_epoch_start``."""
        if not self._resize_at_first_batch:
            return
        self._resize_at_first_batch = False
        self._resize(trainer)
        fetcher = trainer.fit_loop._data_fetcher
        assert fetcher is not None
        fetcher.length = sized_len(fetcher.combined_loader)
        fetcher.done = fetcher.length is not None and fetcher.fetched >= fetcher.length
        trainer.fit_loop.epoch_loop.batch_progress.is_last_batch = fetcher.done

    # ------------------------------------------------------------------ helpers

    def _find(self, trainer: pl.Trainer) -> SelectiveLoader:
        combined = trainer.fit_loop._combined_loader
        flattened = [] if combined is None else combined.flattened
        if self._given:
            if not any(dl is self.loader for dl in flattened):
                raise ValueError(
                    "SelectiveBackprop(loader): that loader is not the one Lightning trains on; return "
                    "the same object from train_dataloader(), or pass no loader to find it there"
                )
        else:
            found = [dl for dl in flattened if isinstance(dl, SelectiveLoader)]
            if len(found) != 1:
                raise ValueError(
                    f"SelectiveBackprop() found {len(found)} selective loaders among the train dataloaders; "
                    "it needs exactly one, or pass it as SelectiveBackprop(loader)"
                )
            self.loader = found[0]
        assert self.loader is not None
        return self.loader

    def _resize(self, trainer: pl.Trainer) -> None:
        """Set the batch counts of the epoch ``iter(loader)`` runs next (or runs now) from ``len(loader)``."""
        fit_loop = trainer.fit_loop
        combined = fit_loop._combined_loader
        assert combined is not None
        length = sized_len(self.loader)
        own = (
            float("inf")
            if length is None
            else _parse_num_batches(RunningStage.TRAINING, length, trainer.limit_train_batches)
        )
        old = combined.limits or [float("inf")] * len(combined.flattened)
        combined.limits = [own if dl is self.loader else limit for dl, limit in zip(combined.flattened, old)]
        if combined._iterator is not None:
            combined._iterator.limits = combined.limits  # the live epoch's, read by len(combined)
        batches = sized_len(combined)
        fit_loop.max_batches = float("inf") if batches is None else batches
        interval = trainer.val_check_interval
        time_based = getattr(trainer, "_val_check_time_interval", None) is not None
        if isinstance(interval, float) and not time_based and fit_loop.max_batches != float("inf"):
            trainer.val_check_batch = max(1, int(fit_loop.max_batches * interval))
