"""Scale: per-step work in proportion to the batch, small checkpoints, per-rank planning.

"Touches the table" is checked by recording every tensor operation (a TorchDispatchMode): a
step may index a table-sized tensor at a batch's ids, never compute over all of it.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, DistributedSampler

from sbdata import SelectiveBatchLoader
from sbdata.cache import LossCache
from sbdata.policies import RankPolicy
from sbdata.stats import SelectionLog

from .conftest import Echo, IndexedPairs, id_loss, loss_from_x
from .distributed_helpers import run_on_two_ranks

#: operations allowed on a table-sized tensor: reading or writing it at given ids
INDEXING = {"aten.index.Tensor", "aten.index_put_.default", "aten._index_put_impl_.default", "aten.index_add_.default"}


class TableOps(TorchDispatchMode):
    """Records the operations that take or make a tensor of at least ``size`` elements."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.large = size, []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, Tensor)]
        if any(t.numel() >= self.size for t in tensors):
            self.large.append(str(func))
        return out

    def scans(self) -> list[str]:
        return [op for op in self.large if op not in INDEXING]


N = 200_000


def test_cache_writes_and_reads_touch_only_the_batch_ids():
    cache = LossCache(N)
    cache.update(torch.arange(N), torch.rand(N), epoch=0)
    ids = torch.randperm(N)[:128]
    with TableOps(N // 2) as ops:
        cache.update(ids, torch.rand(128), epoch=1)
        cache.lookup(ids)
        oldest, known = cache.oldest_epoch(), cache.known_count()
    assert ops.scans() == [], f"a batch update scanned the table: {ops.scans()}"
    assert (oldest, known) == (0, N)


def test_the_selection_log_folds_a_batch_in_by_its_ids_alone():
    log = SelectionLog(size=N)
    log.observe(0, torch.rand(N), torch.arange(0, N, 2), torch.arange(N))
    ids = torch.randperm(N)[:128]
    with TableOps(N // 2) as ops:
        for _ in range(3):
            log.observe(1, torch.rand(128), torch.arange(64), ids)
    assert ops.scans() == [], f"the log fold scanned its table: {ops.scans()}"
    assert int(log.candidates[ids].min()) == 4 and int(log.kept[ids[:64]].min()) >= 3


class Sized(torch.utils.data.Dataset):
    """Example i is ``(x = [i, i], y = 0, i)``, made on the fly; no per-example storage."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i), float(i)]), 0, i


class CountingRank(RankPolicy):
    """The rank policy, counting the candidate batches it decided."""

    def __init__(self, keep: float) -> None:
        super().__init__(keep)
        self.decided = 0

    def select(self, losses: Tensor, generator: torch.Generator):
        self.decided += 1
        return super().select(losses, generator)


def _stale_loader(n: int, batch_size: int = 100) -> SelectiveBatchLoader:
    loader = DataLoader(Sized(n), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    sb = SelectiveBatchLoader(loader, Echo(), policy=CountingRank(0.5), loss_fn=loss_from_x, stale=3, seed=1)
    cache = LossCache(n)  # the losses a fresh epoch would have measured
    cache.update(torch.arange(n), id_loss(torch.arange(n)).float(), epoch=0)
    sb.load_state_dict(_with_cache(sb.state_dict(), cache.state_dict(), epoch=1))
    return sb


def _with_cache(state: dict, cache: dict, epoch: int) -> dict:
    return {**state, "cache": cache, "epoch": epoch}


def test_a_stale_epoch_decides_batch_by_batch_and_steps_never_scan_the_tables():
    sb = _stale_loader(N)
    assert sb.mode() == "stale"
    it = iter(sb)
    next(it)
    assert sb.policy.decided == 2, "the first batch of keep=0.5 needs two candidate batches, not the epoch"
    with TableOps(N // 2) as ops:
        for _ in range(20):
            next(it)
        len(sb), sb.mode(sb.epoch + 1)
    assert ops.scans() == [], f"a stale step or len()/mode() scanned a table: {sorted(set(ops.scans()))}"
    assert sb.policy.decided == 42
    assert sb.stats.current.scored == 0 and sb.stats.current.loads_skipped == 42 * 50


def test_a_rescoring_due_epoch_answers_len_and_mode_from_counters():
    sb = _stale_loader(N)
    with TableOps(N // 2) as ops:
        modes = [sb.mode(e) for e in range(1, 5)]
        lengths = [len(sb) for _ in range(3)]
    assert ops.scans() == [] and ops.large == [], f"mode()/len() touched a table: {ops.large}"
    assert modes == ["stale", "stale", "fresh", "stale"] and lengths == [N // 200] * 3


def _saved_bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def test_a_checkpoint_holds_at_most_9_bytes_per_example():
    n = 100_000
    loader = DataLoader(IndexedPairs(n), batch_size=500, shuffle=True, generator=torch.Generator().manual_seed(0))
    sb = SelectiveBatchLoader(loader, Echo(), keep=0.5, loss_fn=loss_from_x, stale=3, epochs=6, seed=0)
    for _ in range(3):  # fresh, stale, stale: every loss measured, selection counts > 1
        for _, _, idx in sb:
            sb.record(id_loss(idx).float())
    at_boundary = _saved_bytes(sb.state_dict()) / n
    it = iter(sb)  # a rescoring epoch, stopped half way
    for _ in range(len(sb) // 2):
        _, _, idx = next(it)
        sb.record(id_loss(idx).float())
    mid_epoch = _saved_bytes(sb.state_dict()) / n
    assert at_boundary <= 9 and mid_epoch <= 9, f"{at_boundary:.2f} / {mid_epoch:.2f} bytes per example"
    resumed = SelectiveBatchLoader(
        DataLoader(IndexedPairs(n), batch_size=500, shuffle=True, generator=torch.Generator().manual_seed(0)),
        Echo(), keep=0.5, loss_fn=loss_from_x, stale=3, epochs=6, seed=0,
    )  # fmt: skip
    resumed.load_state_dict(torch.load(io.BytesIO(_bytes(sb.state_dict())), weights_only=True))
    assert torch.equal(resumed.cache.lookup(torch.arange(n))[0], sb.cache.lookup(torch.arange(n))[0])
    assert torch.equal(resumed.cache.measured_epoch(torch.arange(n)), sb.cache.measured_epoch(torch.arange(n)))
    assert torch.equal(resumed.selection_log.candidates[:n], sb.selection_log.candidates[:n])
    assert [b[2].tolist() for b in it] == [b[2].tolist() for b in resumed]


def _bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------- two ranks

M = 960


class Traffic:
    """Counts the bytes this rank hands to torch.distributed's collectives."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "broadcast")

    def __init__(self) -> None:
        self.bytes, self._saved = 0, {}

    def __enter__(self) -> Traffic:
        for name in self.NAMES:
            original = self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._counted(original))
        return self

    def _counted(self, original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(args) if isinstance(t, Tensor))
            return original(*args, **kwargs)

        return call

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _per_rank_worker(rank: int, world: int) -> dict:
    sampler = DistributedSampler(IndexedPairs(M), num_replicas=world, rank=rank, shuffle=True, seed=4)
    loader = DataLoader(IndexedPairs(M), batch_size=16, sampler=sampler)
    sb = SelectiveBatchLoader(loader, Echo(), keep=0.5, loss_fn=loss_from_x, stale=3, seed=2)
    list(sb)  # fresh: every loss measured, shared with the other rank
    before = sb.selection_log.candidates[:M].clone()
    with Traffic() as traffic:
        batches = [idx.tolist() for _, _, idx in sb]
    sampler.set_epoch(1)
    return {
        "mode": sb.stats.history[-1].mode,
        "batches": batches,
        "len": sb.epoch_length(1),
        "own": list(sampler),
        "planned": torch.nonzero(sb.selection_log.candidates[:M] - before).flatten().tolist(),
        "traffic": traffic.bytes,
    }


@pytest.mark.slow
def test_each_rank_plans_only_its_own_share_of_a_stale_epoch():
    r0, r1 = run_on_two_ranks(_per_rank_worker)
    assert r0["mode"] == r1["mode"] == "stale"
    for r in (r0, r1):
        assert sorted(r["planned"]) == sorted(r["own"]), "a rank decides about its own candidates only"
    a = [i for b in r0["batches"] for i in b]
    b = [i for b in r1["batches"] for i in b]
    assert len(r0["batches"]) == len(r1["batches"]) == r0["len"] == M // 2 // 2 // 16
    assert not set(a) & set(b) and set(a) <= set(r0["own"]) and set(b) <= set(r1["own"])
    assert len(set(a) | set(b)) == M // 2, "together they cover the whole selection: keep * N"
    assert max(r0["traffic"], r1["traffic"]) <= 256, "no ids cross between ranks, only a few counts"


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(
    "make_sampler",
    [
        lambda data, g: torch.utils.data.SequentialSampler(data),
        lambda data, g: torch.utils.data.RandomSampler(data, generator=g),
        lambda data, g: torch.utils.data.RandomSampler(data, num_samples=2 * len(data) + 7, generator=g),
        lambda data, g: torch.utils.data.RandomSampler(data, num_samples=5, generator=g),
        lambda data, g: DistributedSampler(data, num_replicas=3, rank=2, shuffle=True, seed=5),
        lambda data, g: DistributedSampler(data, num_replicas=4, rank=1, shuffle=False, drop_last=True),
        lambda data, g: DistributedSampler(data, num_replicas=7, rank=6, shuffle=True, seed=1),
    ],
)
@pytest.mark.parametrize("n", [1, 3, 50])
def test_orders_drawn_in_one_tensor_are_exactly_what_the_samplers_yield(make_sampler, drop_last, n):
    from sbdata.sources.dataloader import drawn_in_one

    data = list(range(n))
    sampler = make_sampler(data, torch.Generator().manual_seed(11))
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(3)
    batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size=4, drop_last=drop_last)
    fast = drawn_in_one(batch_sampler, torch.Generator().manual_seed(11))
    assert fast is not None
    assert [b.tolist() for b in fast] == [list(b) for b in batch_sampler]
