"""Odd loaders and bad losses: nothing leaks, nothing is silent."""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sbdata import SelectiveBatchLoader


class IdDataset(Dataset):
    def __init__(self, n: int = 64) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i), 1.0]), i % 2, i


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        gc.collect()
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("stale", [None, 2])
def test_an_abandoned_epoch_leaves_no_worker_process_or_thread(stale):
    threads = threading.active_count()
    loader = DataLoader(IdDataset(), batch_size=8, num_workers=2)
    sb = SelectiveBatchLoader(loader, nn.Linear(2, 2), keep=0.5, stale=stale)
    for epoch in range(3):  # fresh and stale epochs, each abandoned after one batch
        for _ in sb:
            assert multiprocessing.active_children(), "workers run during the epoch"
            break
        assert wait_until(lambda: not multiprocessing.active_children()), f"epoch {epoch} left workers"
        assert wait_until(lambda: threading.active_count() <= threads)
    assert [s.batches for s in sb.stats.history] == [1, 1, 1]
    assert len(list(sb)) == len(sb) == 4, "the next epoch starts clean"


def test_an_empty_loader_yields_nothing():
    empty = DataLoader(TensorDataset(torch.empty(0, 2), torch.empty(0, dtype=torch.long)), batch_size=4)
    for stale in (None, 2):
        sb = SelectiveBatchLoader(empty, nn.Linear(2, 2), keep=0.5, stale=stale)
        for _ in range(2):
            assert len(sb) == 0 and list(sb) == []


def test_nan_losses_raise_an_error_naming_the_example_ids():
    def loss_fn(outputs, targets):
        losses = outputs[:, 0].clone()
        losses[outputs[:, 0] == 13] = float("nan")
        return losses

    class Echo(nn.Module):
        def forward(self, x):
            return x

    sb = SelectiveBatchLoader(DataLoader(IdDataset(), batch_size=8), Echo(), keep=0.5, loss_fn=loss_fn, stale=2)
    with pytest.raises(ValueError, match=r"non-finite.*example ids \[13\]"):
        list(sb)


@pytest.mark.parametrize("mode, kept", [("lowest", False), ("highest", True)])
def test_nonfinite_losses_can_be_ranked_by_explicit_opt_in(mode, kept):
    def loss_fn(outputs, targets):
        losses = outputs[:, 0].clone()
        losses[outputs[:, 0] % 8 == 3] = float("inf") if mode == "lowest" else float("nan")
        return losses

    class Echo(nn.Module):
        def forward(self, x):
            return x

    sb = SelectiveBatchLoader(
        DataLoader(IdDataset(), batch_size=8), Echo(), keep=0.5, loss_fn=loss_fn, policy="topk", nonfinite=mode
    )
    ids = torch.cat([x[:, 0] for x, _, _ in sb]).long()
    assert bool(((ids % 8) == 3).any()) is kept


def test_a_one_shot_generator_is_refused_for_multi_epoch_use():
    batches = ((torch.randn(4, 2), torch.zeros(4, dtype=torch.long)) for _ in range(3))
    with pytest.raises(TypeError, match="one-shot"):
        SelectiveBatchLoader(batches, nn.Linear(2, 2), keep=0.5, batch_size=4)


def test_an_iterable_dataset_loader_gets_len_after_one_epoch():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(20):
                yield torch.tensor([float(i), 0.0]), i % 2

    sb = SelectiveBatchLoader(DataLoader(Stream(), batch_size=4), nn.Linear(2, 2), keep=0.5)
    with pytest.raises(TypeError, match="len"):
        len(sb)
    assert len(list(sb)) == 3
    assert len(sb) == 3 and len(list(sb)) == 3
