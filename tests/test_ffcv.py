"""FFCV support: SelectiveBatchLoader over an ``ffcv.loader.Loader``, on tiny .beton files.

Image ``i`` of the test .beton is filled with the value ``i`` (N < 256) and also carries
``label = i % 4`` and ``index = i``, so every yielded row can be checked against its id.

These tests need ffcv (``pip install 'sbdata[ffcv]'``). Without it they are skipped, except
when the ``CI`` environment variable is set: then a missing ffcv is an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

if os.environ.get("CI"):
    import ffcv  # noqa: F401  (CI must run these tests: a missing ffcv fails, it is not skipped)
else:
    pytest.importorskip("ffcv", reason="needs ffcv: pip install 'sbdata[ffcv]' (see README)")

from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import NormalizeImage, Squeeze, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter

from sbdata import SelectiveBatchLoader
from sbdata.ffcv import FFCVSource, FilteredOrder

pytestmark = pytest.mark.ffcv

N = 64  # examples in the test .beton
SIDE = 8  # image side
REPO = Path(__file__).resolve().parents[1]


class IdImages:
    """Example i: an 8x8 RGB image filled with i, label i % 4, index i."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return np.full((SIDE, SIDE, 3), i, np.uint8), i % 4, i


@pytest.fixture(scope="module")
def beton(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("ffcv") / "ids.beton")
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()}
    # page_size: the 2 MiB minimum keeps the file small; several pages would need more data
    DatasetWriter(path, fields, page_size=1 << 21, num_workers=1).from_indexed_dataset(IdImages())
    return path


# Loaders live until the interpreter exits. FFCV 1.0.2 sets ``mutable`` on numba's interned
# array types (``OSCacheManager.state_type``), which corrupts the keys of numba's overload
# tables; a Loader collected mid-session then makes numba's dispatcher finalizers raise
# (``KeyError`` "Exception ignored in: <finalize object>"), which can even break the test run.
_LOADERS: list[Loader] = []


def make_loader(path: str, order=OrderOption.RANDOM, *, batch_size: int = 16, image=None, **kwargs) -> Loader:
    """A CPU Loader; JIT ops come before torch ops in every pipeline (FFCV hangs otherwise)."""
    kwargs.setdefault("drop_last", True)
    kwargs.setdefault("os_cache", order != OrderOption.QUASI_RANDOM)  # QUASI_RANDOM: process cache
    pipelines = {
        "image": image or [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage()],
        "label": [IntDecoder(), ToTensor(), Squeeze()],
        "index": [IntDecoder(), ToTensor(), Squeeze()],
    }
    loader = Loader(path, batch_size=batch_size, num_workers=1, order=order, seed=7, pipelines=pipelines, **kwargs)
    _LOADERS.append(loader)
    return loader


ORDERS = [OrderOption.SEQUENTIAL, OrderOption.RANDOM, OrderOption.QUASI_RANDOM]


@pytest.fixture(scope="module")
def loaders(beton: str) -> dict:
    """One Loader per order, shared by the tests (each new Loader costs a JIT compile)."""
    return {order: make_loader(beton, order) for order in ORDERS}


# ---------------------------------------------------------------- helpers


def id_loss(ids: Tensor) -> Tensor:
    """A known, distinct, scrambled loss per example id."""
    return ((ids.long() * 7919) % 10007).double() + 1.0


class IdScorer:
    """``score_fn`` whose loss of each example is :func:`id_loss` of its index field; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: nn.Module, batch) -> Tensor:
        self.calls += 1
        return id_loss(batch[2])


class PixelModel(nn.Module):
    """Logits from the mean pixel: a real forward pass whose loss depends on the image."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.05, -0.03, 0.02, 0.0]))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x.float().mean(dim=(1, 2, 3))[:, None] * self.weight


def check_batch(batch, ids: Tensor, size: int | None = 16) -> None:
    """Every row of ``batch`` belongs to ``ids`` (pixels, label and index field)."""
    x, y, index = batch
    if size is not None:
        assert x.shape[0] == size
    assert torch.equal(index, ids), "the ids sbdata reports are not the examples in the batch"
    assert torch.equal(x.float().mean(dim=(1, 2, 3)), ids.float()), "images do not match their ids"
    assert torch.equal(x.float().amax(dim=(1, 2, 3)), ids.float())
    assert torch.equal(y, ids % 4)


def run_epoch(sb: SelectiveBatchLoader, size: int | None = 16) -> list[Tensor]:
    """Iterate one epoch, checking each batch; return the ids of each batch."""
    expected_len = len(sb)
    out = []
    for batch in sb:
        ids = sb._handouts.last.ids.clone()
        check_batch(batch, ids, size)
        out.append(ids)
    assert len(out) == expected_len, "len(sb) must equal the number of batches yielded"
    return out


def expected_selection(order: np.ndarray, batch_size: int, keep: float) -> list[int]:
    """topk of :func:`id_loss` within each batch of ``order``, in order."""
    out: list[int] = []
    ids = torch.from_numpy(np.asarray(order, dtype=np.int64))
    for chunk in ids.split(batch_size):
        k = int(keep * chunk.numel())
        best = torch.argsort(id_loss(chunk), descending=True, stable=True)[:k]
        out += chunk[torch.sort(best).values].tolist()
    return out


def user_order(order, epoch: int) -> np.ndarray | None:
    """The order FFCV itself would use (None where it is not a pure function of the epoch)."""
    if order == OrderOption.SEQUENTIAL:
        return np.arange(N)
    if order == OrderOption.RANDOM:
        return np.random.default_rng(7 + epoch).permutation(N)
    return None


def wait_for_threads(count: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while threading.active_count() > count and time.monotonic() < deadline:
        time.sleep(0.05)
    return threading.active_count()


# ---------------------------------------------------------------- tests


def test_wraps_ffcv_loader_and_installs_filtered_order(loaders: dict) -> None:
    loader = loaders[OrderOption.RANDOM]
    base = loader.traversal_order if not isinstance(loader.traversal_order, FilteredOrder) else loader.traversal_order.base
    sb = SelectiveBatchLoader(loader, PixelModel(), keep=0.5, stale=2)
    assert isinstance(sb._source, FFCVSource)
    assert isinstance(loader.traversal_order, FilteredOrder) and loader.traversal_order.base is base
    assert sb.loader is loader and sb.batch_size == 16 and len(sb.cache) == N
    SelectiveBatchLoader(loader, PixelModel(), keep=0.5)  # a second wrapper does not nest orders
    assert loader.traversal_order.base is base


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.name)
def test_fresh_mode_yields_full_batches_of_the_selected_examples(loaders: dict, order) -> None:
    scorer = IdScorer()
    sb = SelectiveBatchLoader(loaders[order], nn.Identity(), keep=0.5, policy="topk", score_fn=scorer)
    for epoch in range(2):
        batches = run_epoch(sb)
        yielded = torch.cat(batches).tolist()
        assert len(batches) == 2 and scorer.calls == 4 * (epoch + 1)
        base = sb._source.order.base_order(epoch)
        assert sorted(base.tolist()) == list(range(N))  # the user's order: every example once
        if user_order(order, epoch) is not None:
            assert base.tolist() == user_order(order, epoch).tolist()
        assert yielded == expected_selection(base, 16, 0.5)
        stats = sb.stats[epoch]
        assert (stats.loaded, stats.scored, stats.yielded) == (N, N, N // 2)


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.name)
def test_stale_epochs_load_only_selected_examples_without_scoring(loaders: dict, order) -> None:
    scorer = IdScorer()
    sb = SelectiveBatchLoader(loaders[order], nn.Identity(), keep=0.5, policy="topk", stale=2, score_fn=scorer)
    modes = []
    for epoch in range(4):
        modes.append(sb.mode())
        calls = scorer.calls
        batches = run_epoch(sb)
        stats = sb.stats[epoch]
        assert len(batches) == 2 and stats.yielded == N // 2
        if modes[-1] == "stale":
            assert scorer.calls == calls, "a stale epoch called the scorer"
            assert (stats.loaded, stats.loads_skipped, stats.scored) == (N // 2, N // 2, 0)
            # cached losses are the scored ones, so the selection is topk over this epoch's order
            assert torch.cat(batches).tolist() == expected_selection(sb._source.order.base_order(epoch), 16, 0.5)
        else:
            assert stats.loaded == N and scorer.calls == calls + 4
    assert modes == ["fresh", "stale", "fresh", "stale"]


def test_stale_plans_that_do_not_match_ffcv_batches(beton: str) -> None:
    """FFCV batches of 24 (partial last batch kept) re-cut into other sizes, with carried rows."""
    loader = make_loader(beton, OrderOption.RANDOM, batch_size=24, drop_last=False)
    cases = [(24, "yield"), (16, "yield"), (10, "drop"), (10, "carry"), (40, "yield")]
    for batch_size, last_batch in cases:
        scorer = IdScorer()
        sb = SelectiveBatchLoader(
            loader, nn.Identity(), keep=0.5, policy="topk", stale=3, score_fn=scorer,
            batch_size=batch_size, last_batch=last_batch,
        )
        for epoch in range(3):
            batches = run_epoch(sb, size=None)
            sizes = [b.numel() for b in batches]
            full = [s == batch_size for s in sizes]
            assert all(full[:-1]) and (full[-1] or last_batch == "yield"), (batch_size, last_batch, sizes)
            if epoch > 0:
                assert sb.stats[epoch].mode == "stale" and scorer.calls == 3  # [24, 24, 16] scored once
            if last_batch != "carry":
                expected = expected_selection(sb._source.order.base_order(epoch), 24, 0.5)
                if last_batch == "drop":
                    expected = expected[: len(expected) // batch_size * batch_size]
                assert torch.cat(batches).tolist() == expected


def test_quasi_random_stale_epochs_follow_one_order_per_epoch(loaders: dict) -> None:
    """QUASI_RANDOM (os_cache=False) shuffles pages in place: the order is sampled once per epoch."""
    loader = loaders[OrderOption.QUASI_RANDOM]
    assert not loader._args["os_cache"]
    sb = SelectiveBatchLoader(loader, nn.Identity(), keep=0.25, policy="topk", stale=5, score_fn=IdScorer())
    run_epoch(sb)
    order = sb._source.order
    for epoch in range(1, 3):
        batches = run_epoch(sb)
        assert len(batches) == 1 and sb.stats[epoch].loaded == 16
        assert torch.cat(batches).tolist() == expected_selection(order.base_order(epoch), 16, 0.25)


def test_an_empty_stale_epoch_never_reaches_ffcv(loaders: dict) -> None:
    """A stale epoch whose selection fills no batch loads nothing; an empty order would crash
    FFCV with os_cache=False. (keep 1/16 keeps one row of each of the epoch's few source
    batches: fewer than the 64 rows of one output batch, which is dropped.)"""
    loader = loaders[OrderOption.QUASI_RANDOM]
    sb = SelectiveBatchLoader(loader, nn.Identity(), keep=1 / 16, stale=2, score_fn=IdScorer(), batch_size=64, last_batch="drop")
    assert len(loader) * 1 < 64
    assert run_epoch(sb) == []
    assert sb.mode() == "stale" and len(sb) == 0
    assert run_epoch(sb) == [] and sb.stats[1].loaded == 0


def test_yielded_batches_are_copies_with_dtype_and_memory_format(beton: str) -> None:
    """FFCV recycles its buffers: batches kept past next() must stay intact, even whole batches
    (plain epochs and stale epochs yield whole batches); float16 channels_last survives."""
    image = [
        SimpleRGBImageDecoder(),
        NormalizeImage(np.zeros(3), np.ones(3), np.float16),  # CPU mode: a JIT op, before ToTensor
        ToTensor(),
        ToTorchImage(),
    ]
    loader = make_loader(beton, OrderOption.RANDOM, batch_size=8, image=image, batches_ahead=1)
    model = PixelModel()
    sb = SelectiveBatchLoader(loader, model, keep=0.5, stale=2, epochs=6, start=1 / 6)
    for epoch in range(4):
        kept = []
        calls = model.calls
        for batch in sb:
            x = batch[0]
            assert x.dtype == torch.float16 and x.shape[1:] == (3, SIDE, SIDE)
            assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            kept.append((batch, sb._handouts.last.ids.clone()))
        assert [b.numel() for _, b in kept] == [8] * len(kept) and len(kept) == sb.stats[epoch].batches
        for batch, ids in kept:  # checked after the epoch: every buffer slot was reused meanwhile
            check_batch(batch, ids, 8)
        ptrs = {batch[0].data_ptr() for batch, _ in kept}
        assert len(ptrs) == len(kept), "two yielded batches share memory"
        mode = sb.stats[epoch].mode
        assert mode == ["plain", "fresh", "stale", "fresh"][epoch]
        assert len(kept) == (8 if mode == "plain" else 4)
        assert (model.calls == calls) == (mode != "fresh")


def test_progressive_resizing_through_the_wrapper(beton: str) -> None:
    decoder = RandomResizedCropRGBImageDecoder((SIDE, SIDE))
    loader = make_loader(beton, OrderOption.RANDOM, image=[decoder, ToTensor(), ToTorchImage()])
    sb = SelectiveBatchLoader(loader, PixelModel(), keep=0.5, stale=2)
    for epoch, res in enumerate([8, 12, 16, 12]):
        decoder.output_size = (res, res)  # as ffcv-imagenet does before each epoch
        batches = 0
        for batch in sb:
            assert batch[0].shape == (16, 3, res, res)
            check_batch(batch, sb._handouts.last.ids)
            batches += 1
        assert batches == 2 and sb.stats[epoch].mode == ["fresh", "stale"][epoch % 2]


def test_abandoned_epochs_leave_no_thread(loaders: dict) -> None:
    for order in (OrderOption.RANDOM, OrderOption.QUASI_RANDOM):
        sb = SelectiveBatchLoader(loaders[order], PixelModel(), keep=0.5, stale=2)
        before = wait_for_threads(threading.active_count())
        for _ in range(4):  # fresh and stale epochs, each abandoned after one batch
            for batch in sb:
                break
            del batch
        assert wait_for_threads(before) <= before, f"{order.name}: an abandoned epoch left a thread"
        run_epoch(sb)  # the next epoch starts clean
        assert sb.stats.current.batches == 2
        assert wait_for_threads(before) <= before


def test_set_epoch_drives_the_ffcv_epoch(loaders: dict) -> None:
    sb = SelectiveBatchLoader(loaders[OrderOption.RANDOM], nn.Identity(), keep=0.5, policy="topk", score_fn=IdScorer())
    sb.set_epoch(5)
    assert torch.cat(run_epoch(sb)).tolist() == expected_selection(user_order(OrderOption.RANDOM, 5), 16, 0.5)
    assert loaders[OrderOption.RANDOM].next_epoch == 6


def test_source_streams_epochs_with_ids_from_the_iterator_order(loaders: dict) -> None:
    """The Source interface directly: epoch() pairs each FFCV batch with its slice of it.order."""
    source = FFCVSource(loaders[OrderOption.QUASI_RANDOM])
    assert source.batch_sizes() == [16] * 4 and source.num_examples() == N and source.batch_size() == 16
    source.set_epoch(3)
    with source.epoch() as batches:
        seen = [ids for batch, ids in batches if check_batch(batch, ids) is None]
    assert sorted(torch.cat(seen).tolist()) == list(range(N))
    assert torch.equal(torch.cat(seen), torch.from_numpy(source.order.base_order(3).astype(np.int64)))
    with source.load([]) as batches:  # an empty plan never calls iter() on the Loader
        assert list(batches) == []


def test_missing_ffcv_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.delitem(sys.modules, "sbdata.ffcv")
    monkeypatch.delitem(sys.modules, "sbdata.sources.ffcv")
    monkeypatch.setitem(sys.modules, "ffcv.loader", None)
    with pytest.raises(ImportError, match=r"pip install 'sbdata\[ffcv\]'"):
        importlib.import_module("sbdata.ffcv")


@pytest.mark.slow
def test_imagenet_example_smoke() -> None:
    pytest.importorskip("torchvision", reason="the example needs torchvision")
    script = REPO / "examples" / "ffcv_imagenet.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=240, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "epoch 1" in proc.stdout and "val top-1" in proc.stdout


@pytest.mark.parametrize("stale_epoch", [False, True], ids=["fresh", "stale"])
def test_resume_mid_epoch_continues_exactly(loaders: dict, stale_epoch: bool) -> None:
    """A checkpoint taken mid-epoch resumes with exactly the batches that were still to come."""
    loader = loaders[OrderOption.QUASI_RANDOM]  # its order differs on every call: resume must not resample it

    def make() -> SelectiveBatchLoader:
        return SelectiveBatchLoader(loader, nn.Identity(), keep=0.5, stale=2, score_fn=IdScorer(), batch_size=8)

    sb = make()
    if stale_epoch:
        run_epoch(sb, size=8)
    it = iter(sb)
    first = [next(it)[2].clone() for _ in range(2)]
    state = sb.state_dict()
    rest = [b[2].clone() for b in it]
    resumed = make()
    resumed.load_state_dict(state)
    again = [b[2].clone() for b in resumed]
    assert len(first) + len(rest) == 4 and len(again) == len(rest)
    assert all(torch.equal(a, b) for a, b in zip(again, rest))
