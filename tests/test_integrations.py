"""sbdata inside other training stacks: Lightning, Accelerate, torch.compile, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sbdata import SelectiveBatchLoader


def blobs(n: int = 128, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) + 2.0 * F.one_hot(y, 4).float()
    return TensorDataset(x, y)


def test_lightning_trains_on_a_selective_loader_without_rewrapping_it():
    lightning = pytest.importorskip("lightning.pytorch")

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
            self.loader: SelectiveBatchLoader | None = None
            self.seen = 0

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            assert len(x) == 16, "every selected batch is full-size"
            self.seen += len(x)
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            # Not a DataLoader, so Lightning leaves it alone (no sampler injection, no rebuild).
            self.loader = SelectiveBatchLoader(DataLoader(blobs(), batch_size=16, shuffle=True), self, keep=0.5)
            return self.loader

    model = Classifier()
    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(model)
    assert model.seen == 2 * 64, "Lightning ran every selected batch of both epochs"
    assert [s.selected for s in model.loader.stats.history] == [64, 64]
    assert trainer.num_training_batches == len(model.loader) == 4


def test_accelerate_prepared_loader_can_be_wrapped_with_dict_batches():
    accelerate = pytest.importorskip("accelerate")

    class DictSet(Dataset):
        def __init__(self) -> None:
            self.data = blobs()

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i):
            x, y = self.data[i]
            return {"features": x, "label": y}

    accelerator = accelerate.Accelerator(cpu=True)
    net = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = DataLoader(DictSet(), batch_size=16)
    net, optimizer, prepared = accelerator.prepare(net, optimizer, loader)  # prepare first, then wrap
    scores = []

    def score_fn(model, batch):
        losses = F.cross_entropy(model(batch["features"]), batch["label"], reduction="none")
        scores.append(losses)
        return losses

    sb = SelectiveBatchLoader(prepared, net, keep=0.25, score_fn=score_fn, policy="topk")
    batches = list(sb)
    assert [len(b["label"]) for b in batches] == [16, 16]
    kept = torch.cat([b["features"] for b in batches])
    all_losses = torch.cat(scores)
    assert kept.shape == (32, 4) and len(all_losses) == 128
    for batch in batches:  # the usual Accelerate step runs on them
        loss = F.cross_entropy(net(batch["features"]), batch["label"])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def test_a_compiled_model_scores_and_keeps_its_mode_and_buffers():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    compiled = torch.compile(net, backend="eager")
    compiled.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sb = SelectiveBatchLoader(DataLoader(blobs(), batch_size=16), compiled, keep=0.5)
    assert sum(1 for _ in sb) == len(sb) == 4
    assert compiled.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bf16_autocast_scoring_runs_the_model_in_bfloat16():
    net = nn.Linear(4, 3)
    dtypes = []
    net.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    sb = SelectiveBatchLoader(DataLoader(blobs(), batch_size=16), net, keep=0.5, autocast_dtype=torch.bfloat16)
    batches = list(sb)
    assert set(dtypes) == {torch.bfloat16}
    assert all(b[0].dtype == torch.float32 for b in batches), "the yielded batch keeps its dtype"
