"""SelectiveBatchLoader under torch.distributed: 2 processes, gloo on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from sbdata import SelectiveBatchLoader
from sbdata.distributed import all_gather_variable, all_reduce_int

from .conftest import Echo, IndexedPairs, id_loss, loss_from_x
from .distributed_helpers import run_on_two_ranks

N = 96


def make(rank: int, world: int, **kw):
    sampler = DistributedSampler(IndexedPairs(N), num_replicas=world, rank=rank, shuffle=True, seed=4)
    loader = DataLoader(IndexedPairs(N), batch_size=8, sampler=sampler)
    kw.setdefault("keep", 0.5)
    return SelectiveBatchLoader(loader, Echo(), loss_fn=loss_from_x, **kw)


def epochs_of(sb, count: int) -> list[dict]:
    out = []
    for _ in range(count):
        expected = len(sb)
        ids = [idx.tolist() for _, _, idx in sb]
        out.append({"ids": ids, "len": expected, "mode": sb.stats.history[-1].mode})
    return out


def _counts_worker(policy: str, stale):
    def work(rank: int, world: int):
        torch.manual_seed(rank)  # ranks see different data anyway; make threshold draws differ too
        sb = make(rank, world, policy=policy, stale=stale, seed=rank)
        return epochs_of(sb, 3)

    return work


@pytest.mark.parametrize("policy", ["rank", "threshold"])
@pytest.mark.parametrize("stale", [None, 2])
def test_every_rank_yields_the_same_number_of_batches(policy, stale):
    ranks = run_on_two_ranks(_counts_worker(policy, stale))
    for e in range(3):
        counts = [len(r[e]["ids"]) for r in ranks]
        assert counts[0] == counts[1], f"epoch {e}: ranks yielded {counts} batches"
        assert counts[0] > 0
        if policy == "rank":
            assert counts[0] == ranks[0][e]["len"] == ranks[1][e]["len"]
        else:
            assert counts[0] <= min(ranks[0][e]["len"], ranks[1][e]["len"])


def _stale_worker(rank: int, world: int):
    sb = make(rank, world, policy="rank", stale=3)
    epochs = epochs_of(sb, 2)
    loss, seen = sb.cache.lookup(torch.arange(N))
    return {"epochs": epochs, "cache": loss, "known": seen, "stats": sb.stats.history[-1].as_dict()}


def test_stale_epochs_split_one_global_selection_between_the_ranks():
    r0, r1 = run_on_two_ranks(_stale_worker)
    assert r0["epochs"][1]["mode"] == "stale"
    a = [i for b in r0["epochs"][1]["ids"] for i in b]
    b = [i for b in r1["epochs"][1]["ids"] for i in b]
    assert not set(a) & set(b), "ranks must train on disjoint examples in a stale epoch"
    assert len(a) == len(b) == N // 4
    assert len(set(a) | set(b)) == N // 2, "together they cover keep * N"
    chosen = id_loss(torch.tensor(a + b))
    assert chosen.mean() > id_loss(torch.arange(N)).mean() + 10, "favours high cached losses"
    assert r0["stats"]["scored"] == 0 and r1["stats"]["scored"] == 0


def test_every_rank_ends_an_epoch_with_the_same_cache():
    r0, r1 = run_on_two_ranks(_stale_worker)
    assert bool(r0["known"].all()) and bool(r1["known"].all()), "losses scored on one rank reach the other"
    assert torch.equal(r0["cache"], r1["cache"])
    assert torch.equal(r0["cache"], id_loss(torch.arange(N)))


def _record_worker(rank: int, world: int):
    sb = make(rank, world, policy="topk", stale=100)
    for _, _, idx in sb:  # epoch 0 scores
        sb.record(torch.full((len(idx),), 500.0 + rank))
    loss, _ = sb.cache.lookup(torch.arange(N))
    return loss


def test_recorded_losses_reach_every_rank():
    c0, c1 = run_on_two_ranks(_record_worker)
    assert torch.equal(c0, c1)
    assert int((c0 == 500.0).sum()) == N // 4 and int((c0 == 501.0).sum()) == N // 4


def _rank0_saves_worker(path: str, config: dict):
    def work(rank: int, world: int):
        reference = make(rank, world, **config)
        for _, _, idx in reference:  # epoch 0, recording every batch as a training loop would
            reference.record(idx.float() + rank)
        if rank == 0:  # the plain DDP habit: only rank 0 checkpoints; state_dict() is local
            torch.save(reference.state_dict(), path)
        torch.distributed.barrier()
        expected = epochs_of(reference, 2)
        resumed = make(rank, world, **config)
        resumed.load_state_dict(torch.load(path, weights_only=True))
        return {"resumed": epochs_of(resumed, 2), "expected": expected}

    return work


@pytest.mark.parametrize(
    "config",
    [
        dict(policy="threshold", stale=2),
        dict(policy="infobatch", stale="once"),
        dict(policy="rank", epochs=4, start=0.25, interrupt=3, last_batch="carry", batch_size=6),
    ],
)
def test_rank_0_alone_saves_and_every_rank_resumes_exactly(tmp_path, config):
    path = str(tmp_path / "sb.pt")
    for r in run_on_two_ranks(_rank0_saves_worker(path, config)):
        assert r["resumed"] == r["expected"]
        assert [e["mode"] for e in r["expected"]] != ["plain", "plain"]


def _collectives_worker(rank: int, world: int):
    ids = torch.arange(rank * 10, rank * 10 + 3 + rank, dtype=torch.int64) + 2**40
    return {
        "min": all_reduce_int(rank + 5, "min"),
        "sum": all_reduce_int(rank + 5, "sum"),
        "gathered": all_gather_variable(ids),
    }


def test_gathered_ids_stay_exact_64_bit_integers():
    r0, r1 = run_on_two_ranks(_collectives_worker)
    assert r0["min"] == 5 and r0["sum"] == 11
    g = r1["gathered"]
    assert [t.dtype for t in g] == [torch.int64, torch.int64]
    assert g[0].tolist() == [2**40, 2**40 + 1, 2**40 + 2]
    assert g[1].tolist() == [2**40 + 10 + k for k in range(4)]


def _uneven_worker(rank: int, world: int):
    data = IndexedPairs(40 if rank == 0 else 56)  # shards of different sizes: counts differ
    sb = SelectiveBatchLoader(DataLoader(data, batch_size=8), Echo(), keep=0.5, loss_fn=loss_from_x)
    own = len(sb)
    batches = sum(1 for _ in sb)
    return {"own_len": own, "batches": batches, "dropped": sb.stats.history[-1].dropped}


def test_ranks_with_uneven_shards_stop_together_and_count_the_surplus():
    r0, r1 = run_on_two_ranks(_uneven_worker)
    assert (r0["own_len"], r1["own_len"]) == (3, 4)
    assert r0["batches"] == r1["batches"] == 3
    assert r0["dropped"] == 0 and r1["dropped"] > 0


def _per_rank_dataset_worker(rank: int, world: int):
    loader = DataLoader(IndexedPairs(40), batch_size=8)  # each rank its own dataset, ids 0..39 on both
    sb = SelectiveBatchLoader(loader, Echo(), keep=0.5, loss_fn=loss_from_x, stale=2)
    try:
        next(iter(sb))  # the first epoch that would write the shared loss cache
    except ValueError as e:
        return {"message": str(e), "cache": sb.cache.known_count()}
    return {"message": "no error"}


def test_per_rank_datasets_with_local_ids_are_refused_before_they_mix_up_the_shared_cache():
    for r in run_on_two_ranks(_per_rank_dataset_worker):
        message = r["message"]
        assert "40 example ids" in message and "DistributedSampler" in message and "index_key=" in message
        assert r["cache"] == 0, "refused before any loss was cached"
