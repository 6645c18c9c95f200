r"""Hugging Face ``transformers.Trainer`` support: Selective Backprop without rewriting the loop.

:class:`SelectiveTrainer` is a drop-in ``Trainer`` with one more argument::

    from sbdata.integrations.transformers import SelectiveTrainer

    trainer = SelectiveTrainer(
        model=model, args=TrainingArguments(...), train_dataset=train_set,
        selective=dict(keep=0.5, stale="once"),   # SelectiveBatchLoader options, or a recipe name
    )
    trainer.train()   # or trainer.train(resume_from_checkpoint=True)

``selective=None`` (the default) is a plain ``Trainer``. What changes at each seam:

* data: :meth:`SelectiveTrainer.get_train_dataloader` builds the training ``DataLoader`` as
  ``Trainer`` does (collator, unused columns removed, sampler, workers) but does not pass it
  through ``accelerator.prepare``, and wraps it in a :class:`~sbdata.SelectiveBatchLoader`
  (:attr:`SelectiveTrainer.selective_loader`) scored by the model itself.
* loss: ``compute_loss`` of a training step computes one loss per example from the logits
  (:meth:`SelectiveTrainer.per_example_loss`) and returns ``sb.record(losses).mean()``: each
  loss refreshes its example's cached loss (stale modes, recipes) and is weighted by the policy
  (``"infobatch"`` / the ``"lossless"`` recipe).
* step counting: ``max_steps`` (hence the LR schedule) is the sum over the loader's epochs of
  their optimizer steps, and every epoch runs its own ``len()``.
* checkpoints: every Trainer checkpoint gets ``sbdata_loader.pt`` (the loader's state);
  ``train(resume_from_checkpoint=...)`` loads it and continues the epoch where it stopped,
  without Trainer's batch skipping.

NOTE -- what this relies on in transformers 5.24.0 (``transformers/trainer.py``):

1. ``_inner_training_loop`` (:1583-1676) calls ``get_train_dataloader()`` once (:1597), sizes the
   whole run from ``len(train_dataloader)`` in ``set_initial_training_values`` (:1602-1610,
   :2495-2563: ``num_update_steps_per_epoch = ceil(len / gradient_accumulation_steps)``,
   ``max_steps = ceil(num_train_epochs * num_update_steps_per_epoch)``), builds the LR schedule
   over ``max_steps`` (``create_scheduler``, :1778) and hands the same ``steps_in_epoch`` and
   ``num_update_steps_per_epoch`` to every ``_run_epoch`` (:1658-1674). So a loader whose length
   changes between epochs would have long epochs cut and short ones end without their last
   optimizer step (``do_sync_step`` waits for ``step + 1 == steps_in_epoch``, :1897), with a
   schedule that ends at the wrong step. :meth:`~SelectiveTrainer.set_initial_training_values`
   returns the loader's epochs and the exact ``max_steps``; :meth:`~SelectiveTrainer._run_epoch`
   passes each epoch's own ``len(loader)`` (and ``ceil(len / accumulation)``).
2. ``_run_epoch`` (:1827-1999) calls ``train_dataloader.set_epoch(epoch)`` then
   ``iter(train_dataloader)`` once per epoch (:1859-1867) and takes exactly ``num_batches``
   batches per optimizer step through ``get_batch_samples`` (:1877-1881, :2289-2304): all the
   micro-batches of a step are fetched before the first one is trained on, then each runs
   ``training_step`` -> ``compute_loss`` in order (:1895-1917). ``record()`` pairs each loss with
   the oldest unrecorded batch, so that read-ahead is harmless. No ``next()`` follows an epoch's
   last batch; sbdata ends the epoch at its last batch anyway.
3. Resume: ``_init_training_state`` (:1678-1713) restores ``TrainerState`` and computes
   ``epochs_trained = global_step // num_update_steps_per_epoch`` (:1706), wrong when epochs
   differ in length, and, unless ``ignore_data_skip``, the batches to skip (:1707-1709), which
   ``_run_epoch`` skips with accelerate's ``skip_first_batches`` (:1851-1855): that rebuilds a
   plain ``DataLoader`` from ``dataloader.dataset`` and would bypass selection altogether. The
   override returns the loader's own epoch and no batches to skip (whatever ``ignore_data_skip``
   says); the loader's state resumes its position. The resumed epoch then runs only its
   remaining batches, with ``_load_rng_state`` (:3849) called first as Trainer does for its
   own resumes, and ``state.epoch`` corrected after each step (``_EpochProgress``).
4. Checkpoints: ``_save_checkpoint`` (:3363-3430) writes ``<output_dir>/checkpoint-<global_step>``
   (``_get_output_dir``, :3344) after an optimizer step (``_maybe_log_save_evaluate``,
   :2238-2286). All micro-batches of that step were fetched and recorded, so the loader's
   state at that moment is exactly "as trained".
5. ``accelerator.prepare`` (:1051) turns the DataLoader into an accelerate ``DataLoaderShard``,
   which sbdata could only stream (no ids, no exact resume). Built without it, batches reach
   the device through the loader (``device=args.device``) and ``_prepare_inputs`` (:2387);
   gradient sync is set by ``_run_epoch`` itself (:1897-1899), not from the dataloader. Hence a
   single process only (no DDP, FSDP, DeepSpeed).
6. ``training_step`` (:2051-2128) divides the loss by ``current_gradient_accumulation_steps``
   (the micro-batches of this optimizer step) unless ``loss_is_scaled_for_ga`` says otherwise
   (:2111-2119); :class:`SelectiveTrainer` sets it to ``False`` (its loss is a per-batch mean).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

try:
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length, seed_worker
    from transformers.utils import is_datasets_available
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "sbdata.integrations.transformers needs Hugging Face transformers: pip install transformers "
        "(or pip install 'sbdata[transformers]')"
    ) from error

from .. import recipes
from ..loader import SelectiveBatchLoader
from ..schedule import carried_after

__all__ = ["LOADER_STATE_NAME", "SelectiveTrainer", "sequence_losses", "token_losses"]

#: File name of the loader's state inside each Trainer checkpoint folder.
LOADER_STATE_NAME = "sbdata_loader.pt"

_HOOKS = {  # the Trainer internals SelectiveTrainer overrides, and the parameters it relies on
    "_run_epoch": ("model", "epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch", "trial",
                   "ignore_keys_for_eval", "start_time", "resume_from_checkpoint", "epochs_trained",
                   "steps_trained_in_current_epoch"),
    "_init_training_state": ("max_steps", "num_update_steps_per_epoch", "num_train_epochs", "resume_from_checkpoint"),
    "_save_checkpoint": ("model", "trial"),
    "_load_rng_state": ("checkpoint",),
    "_get_output_dir": ("trial",),
    "_get_train_sampler": ("train_dataset",),
    "_get_collator_with_removed_columns": ("data_collator", "description"),
    "set_initial_training_values": ("args", "dataloader"),
}  # fmt: skip
for _name, _params in _HOOKS.items():
    _found = inspect.signature(getattr(Trainer, _name, lambda: None)).parameters
    if not all(p in _found for p in _params):  # pragma: no cover - another transformers
        raise ImportError(
            f"sbdata.integrations.transformers needs the Trainer of transformers 5.x (it overrides "
            f"Trainer.{_name}{_params}); found transformers {transformers.__version__}"
        )

_CLASSIFICATION = {"ForSequenceClassification", "ForImageClassification", "ForVideoClassification", "ForAudioClassification"}
_TOKENS = {"ForTokenClassification", "ForMaskedLM"}
_SHIFTED = {"ForCausalLM", "ForConditionalGeneration"}


# ---------------------------------------------------------------- per-example losses


def sequence_losses(
    logits: Tensor, labels: Tensor, problem_type: str = "single_label_classification", label_smoothing: float = 0.0
) -> Tensor:
    """One loss per example of a sequence (or image, audio) classification or regression head.

    The per-example form of what ``*ForSequenceClassification`` models compute
    (``transformers/loss/loss_utils.py``, ``ForSequenceClassificationLoss``): cross-entropy for
    ``"single_label_classification"``, mean squared error over the outputs for ``"regression"``,
    binary cross-entropy averaged over the labels for ``"multi_label_classification"``. Their
    mean is the model's own loss.
    """
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.float(), labels.long(), reduction="none", label_smoothing=label_smoothing)
    if problem_type == "regression":
        diff = logits.float().reshape(len(labels), -1) - labels.float().reshape(len(labels), -1)
        return diff.pow(2).mean(dim=1)
    if problem_type == "multi_label_classification":
        losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        return losses.reshape(len(labels), -1).mean(dim=1)
    raise ValueError(f"unknown problem_type={problem_type!r}")


def token_losses(
    logits: Tensor, labels: Tensor, *, shift: bool = False, label_smoothing: float = 0.0, ignore_index: int = -100
) -> Tensor:
    """One loss per example of a token-level head: the mean cross-entropy over the example's
    labelled tokens (labels equal to ``ignore_index`` are masked out; an example without any
    labelled token has loss 0).

    ``shift=True`` is the causal-LM form: the logits at position ``i`` predict label ``i + 1``.
    The per-example mean weighs every example equally, whatever its number of tokens; the
    models' own loss averages over all tokens of the batch instead.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
        ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing,
    ).reshape(labels.shape[0], -1)  # fmt: skip
    counts = (labels != ignore_index).reshape(labels.shape[0], -1).sum(dim=1)
    return flat.sum(dim=1) / counts.clamp(min=1)


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # DataParallel, DDP
    inner = getattr(model, "_orig_mod", inner)  # torch.compile
    return _unwrap(inner) if isinstance(inner, nn.Module) else model


# ---------------------------------------------------------------- the trainer


class _EpochProgress(TrainerCallback):
    """Keeps ``state.epoch`` = epoch + batches trained / the epoch's length (NOTE 3): ``_run_epoch``
    counts only the batches it ran, which for a resumed epoch are its remaining ones."""

    def __init__(self, trainer: SelectiveTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        progress = self.trainer._progress
        if progress is not None:
            epoch, trained, length = progress
            state.epoch = epoch + trained / max(length, 1)


class SelectiveTrainer(Trainer):
    """A ``transformers.Trainer`` that trains on the high-loss examples of each batch.

    Args:
        *args: as for ``Trainer``.
        selective: ``None`` (plain ``Trainer``); a recipe name (``"fast"``, ``"lossless"``,
            ``"balanced"``: ``sbdata.recipe(name, plain_epochs=ceil(args.num_train_epochs))``,
            which sets the number of epochs); or a dict of
            :class:`~sbdata.SelectiveBatchLoader` options, e.g. ``dict(keep=0.5, stale="once")``
            or ``dict(sbdata.recipe("lossless", 3), keep=0.4)``. Defaults filled in:
            ``epochs=ceil(args.num_train_epochs)``, ``seed=args.seed``, ``device=args.device``,
            and ``score_fn`` (the model's per-example losses, :meth:`per_example_loss`).
            ``loss_fn`` is refused: override :meth:`per_example_loss` instead.
        **kwargs: as for ``Trainer``; ``compute_loss_func`` is refused with ``selective``.

    The number of epochs is the loader's (``selective["epochs"]``), not ``args.num_train_epochs``;
    ``args.max_steps > 0`` stops training early (and spans the LR schedule) as usual.

    Batches are dicts with a ``labels`` field; every other field is passed to the model. The
    built-in losses cover sequence classification / regression and token-level heads
    (token classification, masked and causal LM, ignoring ``-100`` labels), chosen from the
    model's ``loss_type``; override :meth:`per_example_loss` for anything else.

    Raises:
        ValueError: ``selective`` names no recipe or holds ``loss_fn``; ``compute_loss_func`` is set.
        NotImplementedError: at ``train()``, under more than one process, or with a dataset without
            ``len`` (an ``IterableDataset``) or ``train_sampling_strategy="batch_rebalance"``.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean (NOTE 6)

    def __init__(self, *args: Any, selective: str | dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(selective, str):
            selective = recipes.recipe(selective, plain_epochs=max(1, math.ceil(self.args.num_train_epochs)))
        elif selective is not None:
            selective = dict(selective)
            if "loss_fn" in selective:
                raise ValueError(
                    "selective=dict(loss_fn=...) is not used by SelectiveTrainer: scoring and training both "
                    "use SelectiveTrainer.per_example_loss(outputs, labels); override that method instead"
                )
        if selective is not None and self.compute_loss_func is not None:
            raise ValueError(
                "SelectiveTrainer(selective=...) computes per-example losses itself (per_example_loss), so "
                "compute_loss_func= cannot be used with it; override per_example_loss(outputs, labels) instead"
            )
        self.selective = selective
        #: the SelectiveBatchLoader of the current ``train()`` (``None`` before it, or without ``selective``)
        self.selective_loader: SelectiveBatchLoader | None = None
        self._in_training_step = False
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches already trained in it)
        self._progress: tuple[int, int, int] | None = None  # (epoch, batches trained, epoch length)
        if selective is not None:
            self.add_callback(_EpochProgress(self))

    # ------------------------------------------------------------------ data

    def get_train_dataloader(self) -> Any:
        """Without ``selective``: ``Trainer``'s. With it: a new :class:`~sbdata.SelectiveBatchLoader`
        over :meth:`selective_source_dataloader`, also kept in :attr:`selective_loader`."""
        if self.selective is None:
            return super().get_train_dataloader()
        if self.args.world_size > 1:
            raise NotImplementedError(
                "SelectiveTrainer runs in a single process; under DDP/FSDP/DeepSpeed (world_size="
                f"{self.args.world_size}) the selective loader would bypass accelerate's sharding"
            )
        options = dict(self.selective)
        options.setdefault("epochs", max(1, math.ceil(self.args.num_train_epochs)))
        options.setdefault("seed", self.args.seed)
        options.setdefault("device", self.args.device)
        options.setdefault("score_fn", self._score)
        assert self.model is not None
        self.selective_loader = SelectiveBatchLoader(self.selective_source_dataloader(), self.model, **options)
        self._resume_at = self._progress = None
        return self.selective_loader

    def selective_source_dataloader(self) -> DataLoader:
        """The training ``DataLoader`` that ``Trainer.get_train_dataloader`` would build, before
        ``accelerator.prepare`` (NOTE 5): same collator (unused columns removed), sampler, batch
        size and worker settings. A random sampler without a generator gets one seeded with
        ``args.data_seed`` (or ``args.seed``), so the data order does not depend on global RNG
        state. Override to train from another map-style ``DataLoader``."""
        dataset: Any = self.train_dataset
        collator = self.data_collator
        if dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if isinstance(dataset, IterableDataset) or not has_length(dataset):
            raise NotImplementedError(
                "SelectiveTrainer needs a map-style train_dataset with len(); an IterableDataset gives "
                "no example ids and no epoch length"
            )
        if is_datasets_available():
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        sampler = self._get_train_sampler(dataset)
        if type(sampler).__name__ == "BatchRebalanceSampler":
            raise NotImplementedError("SelectiveTrainer does not support train_sampling_strategy='batch_rebalance'")
        if sampler is not None and hasattr(sampler, "generator") and sampler.generator is None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler.generator = torch.Generator().manual_seed(seed)
        args = self.args
        return DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            sampler=sampler,
            collate_fn=collator,
            drop_last=args.dataloader_drop_last,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        )

    # ------------------------------------------------------------------ losses

    def per_example_loss(self, outputs: Any, labels: Tensor) -> Tensor:
        """One loss per example, ``[N]``, from the model's ``outputs`` (without labels passed in);
        used for scoring and for training. Override for other heads or losses.

        By the model's ``loss_type``: classification heads use :func:`sequence_losses` with the
        config's ``problem_type`` (inferred as the models do when unset); token classification and
        masked LM use :func:`token_losses`; causal LMs (``loss_type`` ``"ForCausalLM"``, decoder-only
        ``ForConditionalGeneration``, or a class registered for causal LM such as ``GPT2LMHeadModel``)
        use :func:`token_losses` with ``shift=True``. ``args.label_smoothing_factor`` applies to
        the cross-entropies.
        """
        assert self.model is not None
        model = _unwrap(self.model)
        loss_type = getattr(model, "loss_type", None)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        smoothing = float(self.args.label_smoothing_factor)
        config = getattr(model, "config", None)
        if loss_type in _CLASSIFICATION:
            problem = getattr(config, "problem_type", None)
            if problem is None:
                num_labels = getattr(config, "num_labels", logits.shape[-1])
                problem = (
                    "regression" if num_labels == 1
                    else "single_label_classification" if labels.dtype in (torch.long, torch.int)
                    else "multi_label_classification"
                )  # fmt: skip
            return sequence_losses(logits, labels, problem, label_smoothing=smoothing if "single" in problem else 0.0)
        causal = type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()  # GPT2LMHeadModel: no loss_type
        if loss_type in _TOKENS or loss_type in _SHIFTED or causal:
            shift = (loss_type in _SHIFTED or causal) and not getattr(config, "is_encoder_decoder", False)
            return token_losses(logits, labels, shift=shift, label_smoothing=smoothing)
        raise NotImplementedError(
            f"SelectiveTrainer has no per-example loss for {type(model).__name__} (loss_type={loss_type!r}); "
            "override SelectiveTrainer.per_example_loss(outputs, labels) -> losses of shape [batch]"
        )

    def _score(self, model: nn.Module, batch: Any) -> Tensor:
        """The loader's ``score_fn``: per-example losses of a batch (sbdata runs it under no_grad)."""
        inputs, labels = _split_labels(batch)
        return self.per_example_loss(model(**inputs), labels)

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> Tensor:
        """``Trainer.training_step``; marks the ``compute_loss`` call inside it as a training one."""
        if self.selective_loader is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._in_training_step = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False
        if self._progress is not None:
            epoch, trained, length = self._progress
            self._progress = (epoch, trained + 1, length)
        return loss

    def compute_loss(
        self, model: nn.Module, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """In a training step: ``sb.record(per_example_loss(outputs, labels)).mean()``, i.e. the
        per-example losses handed back to the loader (cache refresh) and weighted by the policy.
        Elsewhere (evaluation): ``Trainer.compute_loss``."""
        if not self._in_training_step:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        assert self.selective_loader is not None
        inputs, labels = _split_labels(inputs)
        outputs = model(**inputs)
        loss = self.selective_loader.record(self.per_example_loss(outputs, labels)).mean()
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ step counting (NOTE 1-3)

    def epoch_lengths(self) -> list[int]:
        """Batches per epoch of :attr:`selective_loader` (their sum is ``total_steps()``)."""
        sb = self.selective_loader
        if sb is None:
            raise RuntimeError("epoch_lengths() needs the selective loader; call get_train_dataloader() first")
        lengths, carried = [], 0
        for epoch in range(sb.epochs):
            lengths.append(sb.epoch_length(epoch, carried))
            carried = carried_after(**sb._epoch_shape(epoch, carried))
        return lengths

    def set_initial_training_values(self, args: Any, dataloader: Any) -> tuple:
        """``Trainer``'s values for a plain loader. For the selective loader: its epochs, and
        ``max_steps`` = the sum over epochs of ``ceil(len(epoch) / gradient_accumulation_steps)``
        (unless ``args.max_steps > 0``), so the LR schedule ends at the last optimizer step."""
        if dataloader is not self.selective_loader or dataloader is None:
            return super().set_initial_training_values(args, dataloader)
        accumulation = args.gradient_accumulation_steps
        lengths = self.epoch_lengths()
        updates = [max(1, math.ceil(n / accumulation)) for n in lengths]
        total = sum(updates)
        max_steps = args.max_steps if args.max_steps > 0 else total
        if max_steps > total:
            warnings.warn(
                f"max_steps={max_steps} exceeds the {total} optimizer steps of the selective loader's "
                f"{len(lengths)} epochs: training ends at step {total}, before the LR schedule does",
                stacklevel=2,
            )
        examples = sum(lengths) * dataloader.batch_size
        return (
            len(lengths), updates[0], len(dataloader.dataset), examples,
            self.get_total_train_batch_size(args), lengths[0], max_steps,
        )  # fmt: skip

    def _init_training_state(
        self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int, resume_from_checkpoint: Any, trial: Any
    ) -> tuple[int, int]:
        """On resume, load the loader's state from the checkpoint and continue from its epoch
        and position; Trainer skips no batches (NOTE 3)."""
        epochs_trained, skip = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        sb = self.selective_loader
        if sb is None or resume_from_checkpoint is None:
            return epochs_trained, skip
        path = os.path.join(resume_from_checkpoint, LOADER_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was not saved by a SelectiveTrainer with selective=..., so "
                "the selective loader cannot resume from it (start a new run, or resume with the trainer that saved it)"
            )
        sb.load_state_dict(torch.load(path, weights_only=True))
        state = sb.state_dict()
        epoch = int(state["epoch"])
        trained = int(state["position"]["yielded"]) if state["position"] else 0
        accumulation = self.args.gradient_accumulation_steps
        lengths = self.epoch_lengths()
        expected = sum(math.ceil(n / accumulation) for n in lengths[:epoch]) + math.ceil(trained / accumulation)
        if expected != self.state.global_step:
            raise ValueError(
                f"{path} is at epoch {epoch}, batch {trained}, which is optimizer step {expected}, but the "
                f"checkpoint's trainer state is at step {self.state.global_step}: they come from different runs "
                "or settings (gradient_accumulation_steps, batch size, selective options)"
            )
        self._resume_at = (epoch, trained)
        return epoch, 0

    def _run_epoch(
        self, model: Any, epoch: Any, train_dataloader: Any, steps_in_epoch: Any, num_update_steps_per_epoch: Any,
        trial: Any, ignore_keys_for_eval: Any, start_time: Any, resume_from_checkpoint: Any, epochs_trained: Any,
        steps_trained_in_current_epoch: Any,
    ) -> Any:  # fmt: skip
        """Run the epoch with its own length; a resumed epoch runs its remaining batches (NOTE 1-3)."""
        rest = dict(trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, start_time=start_time, epochs_trained=epochs_trained)
        sb = self.selective_loader
        if sb is None or train_dataloader is not sb:
            return super()._run_epoch(
                model=model, epoch=epoch, train_dataloader=train_dataloader, steps_in_epoch=steps_in_epoch,
                num_update_steps_per_epoch=num_update_steps_per_epoch, resume_from_checkpoint=resume_from_checkpoint,
                steps_trained_in_current_epoch=steps_trained_in_current_epoch, **rest,
            )  # fmt: skip
        sb.set_epoch(epoch)
        length = len(sb)
        trained = 0
        if self._resume_at is not None and self._resume_at[0] == epoch:
            trained = self._resume_at[1]
        self._resume_at = None
        if trained:  # Trainer would skip batches here; restore RNG as it does, then run the rest
            self._load_rng_state(resume_from_checkpoint)
            resume_from_checkpoint = None
        remaining = length - trained
        self._progress = (epoch, trained, length)
        try:
            return super()._run_epoch(
                model=model, epoch=epoch, train_dataloader=sb, steps_in_epoch=remaining,
                num_update_steps_per_epoch=max(1, math.ceil(remaining / self.args.gradient_accumulation_steps)),
                resume_from_checkpoint=resume_from_checkpoint, steps_trained_in_current_epoch=0, **rest,
            )  # fmt: skip
        except ValueError as error:
            if "re-packed" not in str(error):
                raise
            raise ValueError(
                "SelectiveTrainer re-packs the kept rows of several batches into one, so every batch needs the "
                "same shapes, but the collator pads each batch to its own longest sequence. Pad to one length: "
                'data_collator=DataCollatorWithPadding(tokenizer, padding="max_length", max_length=...), or '
                'tokenize with padding="max_length"'
            ) from error
        finally:
            self._progress = None

    # ------------------------------------------------------------------ checkpoints (NOTE 4)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``Trainer``'s checkpoint, plus the loader's state in ``sbdata_loader.pt``."""
        sb = self.selective_loader
        if sb is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(sb.state_dict(), os.path.join(folder, LOADER_STATE_NAME))
        super()._save_checkpoint(model, trial)


def _split_labels(batch: Any) -> tuple[dict[str, Any], Tensor]:
    if not isinstance(batch, Mapping) or "labels" not in batch:
        keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"SelectiveTrainer needs dict batches with a 'labels' field (the default collators make them), got {keys}"
        )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]
