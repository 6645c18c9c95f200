"""sbdata.integrations.transformers: SelectiveTrainer under a real ``transformers.Trainer``, on a CPU.

The task: token sequences over a 40-token vocabulary (no tokenizer download), label 1 when the
marker token appears; a one-layer BERT built from a config. Every sequence is distinct, so a
training batch's example ids are read back from its ``input_ids``; the tests check what was
trained on, in which order, and what the loader cached for each example.

Shapes used below: 96 examples in batches of 16 (6 source batches an epoch); 3 epochs with
selection (keep=0.5) from epoch 1 on, so the epochs run 6, 3 and 3 batches, and with
``gradient_accumulation_steps=2`` 3 + 2 + 2 = 7 optimizer steps (each selective epoch ends
with a one-batch step).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import sbdata

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from sbdata.integrations.transformers import (  # noqa: E402
    LOADER_STATE_NAME,
    SelectiveTrainer,
    sequence_losses,
    token_losses,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB, LENGTH, MARKER, PAD = 40, 12, 3, 0
N, BATCH = 96, 16
SELECTIVE = dict(keep=0.5, start=0.3)  # with 3 epochs: epoch 0 plain, epochs 1-2 selective
LENGTHS = [6, 3, 3]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread_and_quiet():
    """A tiny model runs several times faster on one thread (and the CI machine is shared)."""
    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(verbosity)


class MarkerTexts(Dataset):
    """Distinct token sequences of 6-12 tokens (padded with 0), label: the marker occurs."""

    def __init__(self, n: int = N, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
        self.y = (torch.rand(n, generator=g) < 0.5).long()
        lengths = torch.randint(6, LENGTH + 1, (n,), generator=g)
        for i in range(n):
            if self.y[i]:
                self.x[i, torch.randint(1, int(lengths[i]), (1,), generator=g)] = MARKER
            self.x[i, lengths[i] :] = PAD
        self.x[:, 0] = 1  # [CLS]
        self.mask = (self.x != PAD).long()
        self.index = {tuple(row.tolist()): i for i, row in enumerate(self.x)}
        assert len(self.index) == n, "sequences must be distinct"

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "attention_mask": self.mask[i], "labels": self.y[i]}

    def ids_of(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.index[tuple(row.tolist())] for row in input_ids.cpu()])


def tiny_bert(dropout: float = 0.1, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def training_args(out: Path, **kw) -> TrainingArguments:
    kw = {
        "per_device_train_batch_size": BATCH, "num_train_epochs": 3, "learning_rate": 2e-3, "seed": 0,
        "report_to": "none", "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True, "use_cpu": True,
        **kw,
    }  # fmt: skip
    return TrainingArguments(output_dir=str(out), **kw)


class Recording(SelectiveTrainer):
    """Records the example ids of every trained micro-batch, with the optimizer step it belongs to;
    optionally checks that the loader cached each example's own training loss."""

    def __init__(self, *args, check_cache: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trained: list[tuple[int, list[int]]] = []
        self.check_cache = check_cache

    def training_step(self, model, inputs, num_items_in_batch=None):
        data: MarkerTexts = self.train_dataset
        ids = data.ids_of(inputs["input_ids"])
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.trained.append((self.state.global_step, ids.tolist()))
        if self.check_cache:  # parameters are unchanged until the optimizer step
            order = ids.sort().values
            cached, known = self.selective_loader.cache.lookup(order)
            was_training = model.training
            model.eval()  # dropout is 0 here: eval losses are the training losses
            with torch.no_grad():
                logits = model(input_ids=data.x[order], attention_mask=data.mask[order]).logits
            model.train(was_training)
            assert known.all()
            torch.testing.assert_close(cached.float(), F.cross_entropy(logits, data.y[order], reduction="none"))
        return loss


def forward_sizes(model) -> list[int]:
    """Batch sizes of the model's training-mode forward passes (scoring runs in eval mode)."""
    sizes: list[int] = []

    def hook(module, args, kwargs, output):
        if module.training:
            sizes.append(len(kwargs["input_ids"]))

    model.register_forward_hook(hook, with_kwargs=True)
    return sizes


# ---------------------------------------------------------------- selection and step counting


def test_plain_trains_every_example_and_selective_the_kept_half_in_full_batches(tmp_path):
    data = MarkerTexts()
    plain_model, selective_model = tiny_bert(), tiny_bert()
    plain_sizes, selective_sizes = forward_sizes(plain_model), forward_sizes(selective_model)
    plain = SelectiveTrainer(model=plain_model, args=training_args(tmp_path), train_dataset=data)
    plain.train()
    assert plain.selective_loader is None and plain_sizes == [BATCH] * (3 * N // BATCH)

    trainer = SelectiveTrainer(model=selective_model, args=training_args(tmp_path), train_dataset=data, selective=SELECTIVE)
    trainer.train()
    sb = trainer.selective_loader
    assert selective_sizes == [BATCH] * sum(LENGTHS)  # full batches: 6 plain, then 3 + 3 of the kept half
    assert [(s.mode, s.yielded, s.recorded) for s in sb.stats.history] == [
        ("plain", N, N), ("fresh", N // 2, N // 2), ("fresh", N // 2, N // 2),
    ]  # fmt: skip
    assert trainer.state.global_step == trainer.state.max_steps == sum(LENGTHS) == sb.total_steps()
    assert trainer.state.epoch == pytest.approx(3.0)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)  # linear decay ends at the last step


@pytest.mark.parametrize("accumulation", [1, 2])
def test_each_loss_reaches_its_own_example_and_accumulation_steps_per_epoch(tmp_path, accumulation):
    data = MarkerTexts()
    trainer = Recording(
        model=tiny_bert(dropout=0.0), args=training_args(tmp_path, gradient_accumulation_steps=accumulation),
        train_dataset=data, selective=dict(SELECTIVE, stale="once"), check_cache=True,
    )  # fmt: skip
    trainer.train()
    steps = [math.ceil(n / accumulation) for n in LENGTHS]  # accumulation 2: [3, 2, 2]
    assert trainer.state.global_step == trainer.state.max_steps == sum(steps)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    # micro-batches per optimizer step: full groups, and a one-batch step closing each short epoch
    per_step = [sum(1 for step, _ in trainer.trained if step == s) for s in range(sum(steps))]
    expected = [min(accumulation, n - k * accumulation) for n, m in zip(LENGTHS, steps) for k in range(m)]
    assert per_step == expected
    epochs = [set(), set(), set()]
    at = 0
    for e, n in enumerate(LENGTHS):
        for _, ids in trainer.trained[at : at + n]:
            epochs[e].update(ids)
        at += n
    assert len(epochs[0]) == N and len(epochs[1]) == len(epochs[2]) == N // 2  # each kept example once
    assert [s.mode for s in trainer.selective_loader.stats.history] == ["plain", "stale", "stale"]


def test_a_recipe_runs_end_to_end_with_its_epochs_weights_and_no_scoring_pass(tmp_path):
    data = MarkerTexts()
    args = training_args(tmp_path, num_train_epochs=3, gradient_accumulation_steps=2, eval_strategy="epoch")
    evaluation = MarkerTexts(32, seed=1)
    trainer = SelectiveTrainer(model=tiny_bert(), args=args, train_dataset=data, eval_dataset=evaluation, selective="lossless")
    trainer.train()
    sb = trainer.selective_loader
    history = sb.stats.history
    epochs = sbdata.recipe("lossless", 3)["epochs"]  # the recipe's own budget, not the Trainer's 3
    assert epochs > 3 and sb.epochs == epochs and len(history) == epochs
    assert history[0].mode == "plain" and all(s.mode == "stale" and s.scored == 0 for s in history[1:])
    assert all(s.recorded == s.yielded for s in history)  # record() ran for every trained example
    steps = sum(math.ceil(sb.epoch_length(e) / 2) for e in range(epochs))
    assert trainer.state.global_step == trainer.state.max_steps == steps
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    assert sum(1 for h in trainer.state.log_history if "eval_loss" in h) == epochs  # evaluation: Trainer's own loss


def test_record_returns_the_weighted_losses_the_trainer_backpropagates(tmp_path):
    seen = []

    class Spy(SelectiveTrainer):
        def per_example_loss(self, outputs, labels):
            losses = super().per_example_loss(outputs, labels)
            if self._in_training_step:
                seen.append(losses.detach().clone())
            return losses

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self._in_training_step:
                seen.append(loss.detach().clone())
            return loss

    selective = dict(keep=0.5, policy="infobatch", start=0.3, stale="once")
    trainer = Spy(model=tiny_bert(), args=training_args(tmp_path), train_dataset=MarkerTexts(), selective=selective)
    trainer.train()
    pairs = list(zip(seen[::2], seen[1::2]))
    assert len(pairs) == trainer.state.global_step
    ratios = [float(loss / losses.mean()) for losses, loss in pairs]
    assert ratios[:6] == pytest.approx([1.0] * 6)  # the plain epoch: unweighted
    assert any(r > 1.01 for r in ratios[6:])  # selective epochs: kept low-loss rows weighted up


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "save_steps", [1, 3, 5, 6], ids=["mid-plain-epoch", "end-of-plain-epoch", "end-of-selective-epoch", "mid-stale-epoch"]
)
def test_a_checkpoint_resumes_exactly_where_the_run_stopped(tmp_path, save_steps):
    # accumulation 2: optimizer steps 1-3 are epoch 0 (checkpoint-3 ends it), 4-5 epoch 1, 6-7 epoch 2;
    # a micro-batch is recorded with the steps done before it, so the tail after checkpoint-s is step >= s
    data = MarkerTexts()
    selective = dict(SELECTIVE, stale="once")
    args = dict(gradient_accumulation_steps=2, save_strategy="steps", save_steps=save_steps, logging_steps=1)
    args.update(logging_strategy="steps")
    full = Recording(model=tiny_bert(), args=training_args(tmp_path / "full", **args), train_dataset=data, selective=selective)
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{save_steps}"
    assert (checkpoint / LOADER_STATE_NAME).is_file()
    torch.load(checkpoint / LOADER_STATE_NAME, weights_only=True)  # plain, safe to load

    again = training_args(tmp_path / "resumed", **args)
    resumed = Recording(model=tiny_bert(seed=1), args=again, train_dataset=data, selective=selective)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    tail = [(step, ids) for step, ids in full.trained if step >= save_steps]
    assert resumed.trained == tail
    assert resumed.state.global_step == full.state.global_step == 7
    assert resumed.state.epoch == pytest.approx(3.0)
    assert resumed.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    logs = [[h for h in t.state.log_history if "loss" in h][-7 + save_steps :] for t in (full, resumed)]
    for key in ("step", "epoch", "learning_rate", "loss"):  # epoch: a resumed epoch counts its earlier batches
        assert [h[key] for h in logs[1]] == pytest.approx([h[key] for h in logs[0]]), key
    assert len(logs[1]) == 7 - save_steps
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b)  # same batches, same dropout masks (RNG restored), same weights
    assert [s.mode for s in resumed.selective_loader.stats.history][-1] == "stale"


def test_resuming_a_checkpoint_without_loader_state_is_refused(tmp_path):
    data = MarkerTexts()
    args = training_args(tmp_path, save_strategy="steps", save_steps=4, num_train_epochs=1)
    SelectiveTrainer(model=tiny_bert(), args=args, train_dataset=data).train()  # a plain run
    trainer = SelectiveTrainer(model=tiny_bert(), args=args, train_dataset=data, selective=SELECTIVE)
    with pytest.raises(FileNotFoundError, match=LOADER_STATE_NAME):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


# ---------------------------------------------------------------- per-example losses and errors


def _per_example_matches_the_models_own_loss(model, batch, labels, out):
    trainer = SelectiveTrainer(model=model, args=training_args(out), selective=dict(keep=0.5))
    model.eval()
    with torch.no_grad():
        losses = trainer.per_example_loss(model(**batch), labels)
        own = [model(**{k: v[i : i + 1] for k, v in batch.items()}, labels=labels[i : i + 1]).loss for i in range(len(labels))]
    torch.testing.assert_close(losses, torch.stack(own), rtol=1e-5, atol=1e-6)


def test_per_example_losses_equal_the_models_own_loss_example_by_example(tmp_path):
    from transformers import BertForTokenClassification, GPT2Config, GPT2LMHeadModel

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (5, 8), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    config = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.update(max_position_embeddings=32)
    torch.manual_seed(0)
    check = _per_example_matches_the_models_own_loss
    check(BertForSequenceClassification(BertConfig(**config, num_labels=3)), batch, torch.randint(0, 3, (5,)), tmp_path)
    check(BertForSequenceClassification(BertConfig(**config, num_labels=1)), batch, torch.randn(5), tmp_path)  # regression
    multi = BertConfig(**config, num_labels=4, problem_type="multi_label_classification")
    check(BertForSequenceClassification(multi), batch, (torch.rand(5, 4) < 0.5).float(), tmp_path)
    tags = torch.randint(0, 3, (5, 8))
    tags[:, 5:] = -100  # masked positions
    check(BertForTokenClassification(BertConfig(**config, num_labels=3)), batch, tags, tmp_path)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    lm_labels = ids.clone()
    lm_labels[:, 6:] = -100
    check(gpt2, batch, lm_labels, tmp_path)  # shifted, masked


def test_loss_helpers_weigh_examples_not_tokens():
    logits = torch.zeros(2, 4, 3)
    labels = torch.tensor([[0, 1, 2, 0], [0, -100, -100, -100]])
    torch.testing.assert_close(token_losses(logits, labels), torch.full((2,), math.log(3)))
    torch.testing.assert_close(token_losses(logits, torch.full((2, 4), -100)), torch.zeros(2))  # nothing labelled
    assert sequence_losses(torch.zeros(3, 2), torch.tensor([0, 1, 1])).shape == (3,)
    with pytest.raises(ValueError, match="problem_type"):
        sequence_losses(torch.zeros(3, 2), torch.tensor([0, 1, 1]), "ranking")


def test_configuration_errors_name_the_fix(tmp_path):
    data, args = MarkerTexts(), training_args(tmp_path)
    with pytest.raises(ValueError, match="name must be one of"):
        SelectiveTrainer(model=tiny_bert(), args=args, train_dataset=data, selective="fastest")
    with pytest.raises(ValueError, match="per_example_loss.*override"):
        SelectiveTrainer(model=tiny_bert(), args=args, train_dataset=data, selective=dict(loss_fn=F.cross_entropy))
    with pytest.raises(ValueError, match="compute_loss_func"):
        SelectiveTrainer(model=tiny_bert(), args=args, train_dataset=data, selective=SELECTIVE, compute_loss_func=F.mse_loss)

    class Unlabelled(MarkerTexts):
        def __getitem__(self, i):
            return {"input_ids": self.x[i], "attention_mask": self.mask[i], "target": self.y[i]}

    args = training_args(tmp_path, remove_unused_columns=False)
    trainer = SelectiveTrainer(model=tiny_bert(), args=args, train_dataset=Unlabelled(), selective=SELECTIVE)
    with pytest.raises(KeyError, match="'labels' field"):
        trainer.train()


def test_batches_padded_to_their_own_length_are_refused_with_the_fix(tmp_path):
    data = MarkerTexts()

    def pad_to_longest(rows):  # what DataCollatorWithPadding does by default
        width = max(int(r["attention_mask"].sum()) for r in rows)
        return {k: torch.stack([r[k][:width] for r in rows]) for k in ("input_ids", "attention_mask")} | {
            "labels": torch.stack([r["labels"] for r in rows])
        }

    args = training_args(tmp_path)
    trainer = SelectiveTrainer(
        model=tiny_bert(), args=args, train_dataset=data, data_collator=pad_to_longest, selective=dict(keep=0.5)
    )
    with pytest.raises(ValueError, match='padding="max_length"'):
        trainer.train()


# ---------------------------------------------------------------- the example


def test_the_example_smoke_run_trains_plain_and_selective_and_prints_both(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_text_classification.py"), "--smoke", "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, f"the example failed:\n{result.stdout}\n{result.stderr}"
    lines = result.stdout.splitlines()
    assert any(line.startswith("plain") and "accuracy" in line for line in lines), result.stdout
    assert any(line.startswith("selective") and "accuracy" in line for line in lines), result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written outside --output-dir
