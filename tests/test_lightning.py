"""sbdata.integrations.lightning: whole epochs and exact resume of a selective loader under Trainer.fit.

Each test runs twice: on ``FakeSelectiveLoader`` (below), which implements exactly the loader
contract the callback relies on and so proves the Lightning mechanics, and on the real
``sbdata.SelectiveBatchLoader`` (param id ``real``; select with ``-k real``).

Both train 4 epochs on 64 examples in batches of 8 with selection (keep=0.5) on for the first half,
so the epochs yield 4, 4, 8 and 8 batches. A run records, per training step, Lightning's epoch and
the example ids it trained on; a resumed run must record exactly the uninterrupted run's tail.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint

from sbdata.integrations.lightning import SelectiveBackprop, SelectiveLoader

N, BATCH, EPOCHS = 64, 8, 4
LENGTHS = [4, 4, 8, 8]  # batches per epoch: selective (keep=0.5) for epochs 0-1, plain for 2-3

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec"),  # inside Lightning, with this torch
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),  # resumes drop the ModelCheckpoint
]


# ---------------------------------------------------------------- the contract, as a fake loader


class _FakeEpoch:
    """One epoch's iterator; it stops when abandoned (by a later ``iter()`` or ``load_state_dict``)."""

    def __init__(self, owner: FakeSelectiveLoader, epoch: int, pos: int, perm: Tensor | None) -> None:
        self.owner, self.epoch, self.pos, self.perm = owner, epoch, pos, perm

    def __iter__(self) -> _FakeEpoch:
        return self

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        owner = self.owner
        if owner._live is not self:
            raise StopIteration
        if self.perm is None:  # drawn by the first batch, so an unconsumed iter() draws nothing
            self.perm = torch.randperm(owner.n, generator=owner.generator).roll(self.epoch)
        ids = self.perm[self.pos * owner.batch_size : (self.pos + 1) * owner.batch_size]
        self.pos += 1
        if self.pos == owner.length(self.epoch):
            owner._live = None  # the epoch is complete: len() and epoch now refer to the next one
        owner.yielded.append((self.epoch, ids.tolist()))
        return ids.float()[:, None].repeat(1, 4) / owner.n, ids % 3, ids


class FakeSelectiveLoader:
    """The ``SelectiveBatchLoader`` contract, with batches ``(x, y, ids)`` known in advance.

    ``iter()`` claims the next epoch at once. Epoch ``e`` draws a permutation of the ids from the
    loader's own generator at its first batch and yields the first half of it while
    ``e < end * epochs`` (``len`` = 4), all of it afterwards (``len`` = 8); the permutation is rolled
    by ``e``, so batches depend on the epoch too. ``state_dict`` holds the
    generator and, mid-epoch, the permutation and the batches already yielded, so the next ``iter()``
    after ``load_state_dict`` yields only the rest; losing the state changes every later batch.
    """

    def __init__(self, n: int = N, batch_size: int = BATCH, epochs: int = EPOCHS, end: float = 0.5) -> None:
        self.n, self.batch_size, self.epochs, self.end = n, batch_size, epochs, end
        self.generator = torch.Generator().manual_seed(0)
        self._next = 0
        self._live: _FakeEpoch | None = None
        self._resume: dict[str, Any] | None = None
        self.yielded: list[tuple[int, list[int]]] = []  # (epoch, ids) of every batch handed out
        self.iter_calls = 0

    def length(self, epoch: int) -> int:
        full = self.n // self.batch_size
        return full // 2 if epoch < self.end * self.epochs else full

    @property
    def epoch(self) -> int:
        if self._live is not None:
            return self._live.epoch
        return self._resume["epoch"] if self._resume is not None else self._next

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch the next ``iter()`` claims; a live iterator keeps its own (and ``len``)."""
        if self._resume is not None and epoch != self._resume["epoch"]:
            raise ValueError("a mid-epoch state continues its own epoch")
        self._next = epoch

    def __len__(self) -> int:
        return self.length(self.epoch)

    def __iter__(self) -> _FakeEpoch:
        self.iter_calls += 1
        if self._resume is not None:
            epoch, pos, perm = self._resume["epoch"], self._resume["pos"], self._resume["perm"]
        else:
            epoch, pos, perm = self._next, 0, None
        self._next, self._resume = epoch + 1, None
        self._live = _FakeEpoch(self, epoch, pos, perm)
        return self._live

    def state_dict(self) -> dict[str, Any]:
        live, position = self._live, self._resume
        if live is not None:
            position = {"epoch": live.epoch, "pos": live.pos, "perm": live.perm}
        return {"epoch": self.epoch, "generator": self.generator.get_state(), "position": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._next, self._live, self._resume = int(state["epoch"]), None, state["position"]


# ---------------------------------------------------------------- a run


def blobs(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) + 2.0 * F.one_hot(y, 4).float()
    return TensorDataset(x, y, torch.arange(n))


def make_loader(kind: str, model: nn.Module) -> Any:
    if kind == "fake":
        return FakeSelectiveLoader()
    from sbdata import SelectiveBatchLoader

    # shuffle=True: the loader makes each epoch's order a function of a saved seed and the epoch
    source = DataLoader(blobs(), batch_size=BATCH, shuffle=True)
    return SelectiveBatchLoader(source, model, keep=0.5, epochs=EPOCHS, end=0.5, index_key=2)


class Recorder(L.LightningModule):
    """Trains on ``(x, y, ids)`` batches and records ``(current_epoch, ids)`` per training step."""

    def __init__(self, kind: str, build_loader_now: bool = False) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)
        self.kind = kind
        self.seen: list[tuple[int, list[int]]] = []
        self.loader = make_loader(kind, self) if build_loader_now else None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, ids = batch
        self.seen.append((self.current_epoch, ids.tolist()))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> Any:
        if self.loader is None:  # built here, after a checkpoint's callbacks were restored
            self.loader = make_loader(self.kind, self)
        return self.loader


def fit(
    kind: str,
    root: Path,
    *,
    callback: bool = True,
    callbacks: list[Any] | None = None,
    ckpt_path: Path | None = None,
    build_loader_now: bool = False,
    module: type[Recorder] | None = None,
    **trainer_kwargs: Any,
) -> Recorder:
    L.seed_everything(0, verbose=False)
    model = (module or Recorder)(kind, build_loader_now)
    extra = list(callbacks or [])
    if callback:
        extra.insert(0, SelectiveBackprop(model.loader if build_loader_now else None))
    trainer_kwargs.setdefault("max_epochs", EPOCHS)
    trainer = L.Trainer(
        callbacks=extra,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra),
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    model.trainer_ = trainer
    if callback and kind == "fake":  # the loader's epoch e made every batch of Lightning's epoch e
        assert [e for e, _ in model.loader.yielded] == [e for e, _ in model.seen]
    return model


def per_epoch(seen: list[tuple[int, list[int]]]) -> list[int]:
    counts = collections.Counter(epoch for epoch, _ in seen)
    return [counts[e] for e in sorted(counts)]


@pytest.fixture(params=["fake", "real"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


# ---------------------------------------------------------------- (i) whole epochs


@pytest.mark.parametrize("build_loader_now", [False, True], ids=["found", "given"])
def test_every_epoch_runs_its_full_length(kind: str, build_loader_now: bool, tmp_path: Path) -> None:
    model = fit(kind, tmp_path, build_loader_now=build_loader_now)
    assert per_epoch(model.seen) == LENGTHS
    assert model.trainer_.global_step == sum(LENGTHS)
    for epoch, length in enumerate(LENGTHS):
        ids = [i for e, batch in model.seen if e == epoch for i in batch]
        assert len(ids) == len(set(ids)) == length * BATCH, "each example at most once per epoch"
    if kind == "fake":  # (fit() checked that the loader's epoch e made Lightning's epoch e)
        assert isinstance(model.loader, SelectiveLoader)
        assert [ids for _, ids in model.loader.yielded] == [ids for _, ids in model.seen]


@pytest.mark.parametrize("limit", [0.5, 0.25])
def test_limit_train_batches_keeps_the_loader_on_lightnings_epochs(kind: str, limit: float, tmp_path: Path) -> None:
    """Epochs Lightning cuts short leave the loader's iterator unfinished; the next is still whole."""
    model = fit(kind, tmp_path, limit_train_batches=limit)
    assert per_epoch(model.seen) == [int(n * limit) for n in LENGTHS]


# ---------------------------------------------------------------- (ii) end-of-epoch resume


def test_resume_from_end_of_epoch_checkpoints(kind: str, tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    full = fit(kind, tmp_path, callbacks=[saver])
    assert per_epoch(full.seen) == LENGTHS
    ckpt = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    assert ckpt["callbacks"]["SelectiveBackprop"]["loader"], "the loader's state is in the checkpoint"
    for epoch in range(EPOCHS - 1):  # after epoch 1 the next epoch is longer (4 -> 8 batches)
        resumed = fit(kind, tmp_path, ckpt_path=tmp_path / f"epoch={epoch}.ckpt")
        done = sum(LENGTHS[: epoch + 1])
        assert resumed.seen == full.seen[done:], f"resumed after epoch {epoch}"


# ---------------------------------------------------------------- (iii) mid-epoch resume

# steps 3, 11, 21: mid-epoch; 4, 8, 16: at an epoch's last batch (8: the next epoch is longer)
MID_EPOCH_STEPS = [3, 4, 8, 11, 16, 21]


def test_resume_from_mid_epoch_checkpoints(kind: str, tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=1)
    full = fit(kind, tmp_path, callbacks=[saver])
    assert per_epoch(full.seen) == LENGTHS
    for step in MID_EPOCH_STEPS:
        resumed = fit(kind, tmp_path, ckpt_path=tmp_path / f"step={step}.ckpt")
        assert resumed.seen == full.seen[step:], f"resumed after step {step}"


def test_resume_from_a_checkpoint_without_the_callbacks_state(kind: str, tmp_path: Path) -> None:
    """Lightning keeps its own copy of the loader's state in every checkpoint; the callback falls back to it."""
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    full = fit(kind, tmp_path, callbacks=[saver])
    ckpt = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    del ckpt["callbacks"]["SelectiveBackprop"]
    torch.save(ckpt, tmp_path / "stripped.ckpt")
    resumed = fit(kind, tmp_path, ckpt_path=tmp_path / "stripped.ckpt")
    assert resumed.seen == full.seen[sum(LENGTHS[:2]) :]


class Validated(Recorder):
    """Also validates, recording the training steps done at each validation."""

    def __init__(self, kind: str, build_loader_now: bool = False) -> None:
        super().__init__(kind, build_loader_now)
        self.validated_at: list[int] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def val_dataloader(self) -> DataLoader:
        return DataLoader(blobs(16), batch_size=BATCH)

    def on_validation_start(self) -> None:
        self.validated_at.append(len(self.seen))


def test_validation_twice_an_epoch_and_resume_from_its_checkpoints(kind: str, tmp_path: Path) -> None:
    """val_check_interval=0.5 follows each epoch's length; ModelCheckpoint then saves after each
    validation, at mid-epoch and at epoch-end positions of Lightning's loops."""
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_epochs=1)
    full = fit(kind, tmp_path, callbacks=[saver], module=Validated, val_check_interval=0.5, num_sanity_val_steps=0)
    assert isinstance(full, Validated)
    assert per_epoch(full.seen) == LENGTHS
    assert full.validated_at == [2, 4, 6, 8, 12, 16, 20, 24]
    for step in (2, 4, 8, 12, 16):
        resumed = fit(
            kind, tmp_path, ckpt_path=tmp_path / f"step={step}.ckpt", module=Validated, val_check_interval=0.5
        )
        assert resumed.seen == full.seen[step:], f"resumed after step {step}"


# ---------------------------------------------------------------- (iv) why the callback exists


def test_without_the_callback_lightning_cuts_epochs(kind: str, tmp_path: Path) -> None:
    model = fit(kind, tmp_path, callback=False)
    # Lightning read len() once at setup (4) and runs every epoch with it: the plain epochs are cut.
    assert per_epoch(model.seen) == [4, 4, 4, 4]
    if kind == "fake":
        # and its probe iter() in setup_data claimed epoch 0: training starts at the loader's epoch 1
        assert [e for e, _ in model.loader.yielded][:1] == [1]


def test_without_the_callback_end_of_epoch_resume_drops_the_loader_state(kind: str, tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    full = fit(kind, tmp_path, callback=False, callbacks=[saver])
    resumed = fit(kind, tmp_path, callback=False, ckpt_path=tmp_path / "epoch=1.ckpt")
    done = sum(per_epoch(full.seen)[:2])
    assert len(resumed.seen) == len(full.seen[done:])
    assert resumed.seen != full.seen[done:]
    if kind == "fake":
        # The resumed loader started from scratch: the run continued with the first permutation drawn.
        assert resumed.loader.yielded[0][1] == full.loader.yielded[0][1]


# ---------------------------------------------------------------- configuration


def test_reload_dataloaders_every_n_epochs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=0"):
        fit("fake", tmp_path, reload_dataloaders_every_n_epochs=1)


def test_a_given_loader_must_be_the_one_lightning_trains_on(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = Recorder("fake")
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[SelectiveBackprop(FakeSelectiveLoader())],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="not the one Lightning trains on"):
        trainer.fit(model)


def test_lightning_is_imported_by_the_lightning_module_only() -> None:
    code = """
import sys
import sbdata, sbdata.integrations
assert "lightning" not in sys.modules, "sbdata.integrations imported lightning"
sys.modules["lightning"] = None  # as if it were not installed
try:
    import sbdata.integrations.lightning
except ImportError as error:
    assert "pip install lightning" in str(error), error
else:
    raise AssertionError("imported without lightning")
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
