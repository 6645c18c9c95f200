"""SelectiveBatchLoader over an FFCV Loader with ``distributed=True``: 2 processes, gloo."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

if os.environ.get("CI"):
    import ffcv  # noqa: F401  (CI must run these tests)
else:
    pytest.importorskip("ffcv", reason="needs ffcv: pip install 'sbdata[ffcv]' (see README)")

from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import Squeeze, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter

from sbdata import SelectiveBatchLoader

from .distributed_helpers import run_on_two_ranks

pytestmark = pytest.mark.ffcv

N = 128


class IdImages:
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return np.full((4, 4, 3), i, np.uint8), i % 4, i


def id_loss(ids: torch.Tensor) -> torch.Tensor:
    return ((ids.long() * 7919) % 10007).double() + 1.0


def _worker(path: str):
    def work(rank: int, world: int):
        pipelines = {
            "image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()],
            "label": [IntDecoder(), ToTensor(), Squeeze()],
            "index": [IntDecoder(), ToTensor(), Squeeze()],
        }
        loader = Loader(
            path, batch_size=8, num_workers=1, order=OrderOption.RANDOM, seed=3, drop_last=True,
            distributed=True, pipelines=pipelines,
        )
        calls = []

        def score_fn(model, batch):
            calls.append(1)
            return id_loss(batch[2])

        sb = SelectiveBatchLoader(loader, nn.Linear(1, 1), keep=0.5, score_fn=score_fn, stale=2)
        epochs = []
        for _ in range(2):
            expected = len(sb)
            ids = []
            for x, y, index in sb:
                assert torch.equal(x.float().amax(dim=(1, 2, 3)), index.float()), "rows match ids"
                ids.append(index.tolist())
            epochs.append({"ids": ids, "len": expected, "mode": sb.stats.history[-1].mode})
        cache, known = sb.cache.lookup(torch.arange(N))
        return {"epochs": epochs, "scorer_calls": len(calls), "cache": cache, "known": known}

    return work


def test_ffcv_distributed_loader_gives_equal_disjoint_shards_and_one_cache(tmp_path):
    path = str(tmp_path / "ids.beton")
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()}
    DatasetWriter(path, fields, page_size=1 << 21, num_workers=1).from_indexed_dataset(IdImages())
    r0, r1 = run_on_two_ranks(_worker(path), timeout=240)
    for e in range(2):
        assert len(r0["epochs"][e]["ids"]) == len(r1["epochs"][e]["ids"]) == r0["epochs"][e]["len"]
    fresh = [i for b in r0["epochs"][0]["ids"] + r1["epochs"][0]["ids"] for i in b]
    assert len(fresh) == len(set(fresh)) == N // 2, "each rank selects from its own FFCV shard"
    assert r0["epochs"][1]["mode"] == "stale"
    a = {i for b in r0["epochs"][1]["ids"] for i in b}
    b = {i for b in r1["epochs"][1]["ids"] for i in b}
    assert not a & b and len(a) == len(b) == N // 4
    assert id_loss(torch.tensor(sorted(a | b))).mean() > id_loss(torch.arange(N)).mean()
    assert r0["scorer_calls"] == r1["scorer_calls"] == N // 2 // 8, "stale epochs never score"
    assert bool(r0["known"].all()) and torch.equal(r0["cache"], r1["cache"])
