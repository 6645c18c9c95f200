"""shard_cache=True: the loss cache split between ranks, and its torch.distributed.checkpoint."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from sbdata import SelectiveBatchLoader
from sbdata import checkpoint as sb_checkpoint
from sbdata.sharded import shard_range

from .conftest import Echo, IndexedPairs, id_loss, loss_from_x
from .distributed_helpers import run_on_two_ranks

N = 480
CONFIG = dict(keep=0.5, policy="threshold", stale=2, epochs=6, seed=3)


def make(rank: int, world: int, shard: bool) -> SelectiveBatchLoader:
    sampler = DistributedSampler(IndexedPairs(N), num_replicas=world, rank=rank, shuffle=True, seed=4)
    loader = DataLoader(IndexedPairs(N), batch_size=16, sampler=sampler)
    return SelectiveBatchLoader(loader, Echo(), loss_fn=loss_from_x, shard_cache=shard, **CONFIG)


def train(sb: SelectiveBatchLoader, epochs: int, rank: int) -> list[list[int]]:
    """Epochs of a loop that records a loss per example (its id plus the epoch: it changes)."""
    out = []
    for _ in range(epochs):
        epoch = sb.epoch
        ids = []
        for _, _, idx in sb:
            sb.record(id_loss(idx).float() + 50 * epoch + rank)
            ids.append(idx.tolist())
        out.append(ids)
    return out


def _bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def _per_example_entries(state: dict) -> int:
    """Entries of the parts of a state that grow with the dataset: cached losses and
    per-example selection counts."""
    cache = state["cache"]["local"] if "local" in state["cache"] else state["cache"]
    return cache["loss"].numel() + state["selection_log"]["counts"]["candidates"].numel()


def test_shard_cache_needs_stale_mode_and_dataset_indices():
    loader = DataLoader(IndexedPairs(8), batch_size=4)
    with pytest.raises(ValueError, match="shard_cache=True shards the loss cache of stale mode"):
        SelectiveBatchLoader(loader, Echo(), shard_cache=True)
    with pytest.raises(TypeError, match="shard_cache must be True or False"):
        SelectiveBatchLoader(loader, Echo(), stale=2, shard_cache="yes")
    batches = [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.arange(4))]
    with pytest.raises(ValueError, match="does not load examples by dataset index"):
        SelectiveBatchLoader(batches, Echo(), stale=2, index_key=2, batch_size=4, shard_cache=True)


def test_one_process_with_a_sharded_cache_selects_as_a_replicated_one(tmp_path):
    a, b = make(0, 1, shard=False), make(0, 1, shard=True)
    assert train(a, 4, 0) == train(b, 4, 0)
    assert [s.mode for s in b.stats.history] == ["fresh", "stale", "fresh", "stale"]
    sb_checkpoint.save(b, tmp_path / "ckpt")
    c = make(0, 1, shard=True)
    sb_checkpoint.load(c, tmp_path / "ckpt")
    assert train(c, 2, 0) == train(b, 2, 0)


def _two_rank_worker(path: str):
    def work(rank: int, world: int) -> dict:
        replicated, sharded = make(rank, world, shard=False), make(rank, world, shard=True)
        same = train(replicated, 3, rank) == train(sharded, 3, rank)
        states = {name: _per_example_entries(sb.state_dict()) for name, sb in [("replicated", replicated), ("sharded", sharded)]}
        sb_checkpoint.save(sharded, path)
        expected = train(sharded, 2, rank)  # epochs 3, 4 uninterrupted
        resumed = make(rank, world, shard=True)
        sb_checkpoint.load(resumed, path)
        got = train(resumed, 2, rank)
        alone = make(rank, world, shard=True)  # the DDP habit: rank 0's state_dict() for every rank
        if rank == 0:
            torch.save(sharded.state_dict(), path + ".rank0.pt")
        torch.distributed.barrier()
        try:
            alone.load_state_dict(torch.load(path + ".rank0.pt", weights_only=True))
            refused = "no error"
        except ValueError as e:
            refused = str(e)
        cache = replicated.cache.lookup(torch.arange(N))[0]
        return {"same": same, "states": states, "resumed": got == expected, "refused": refused,
                "reference": train(replicated, 0, rank), "full_cache": cache}  # fmt: skip

    return work


@pytest.mark.slow
def test_two_ranks_with_a_sharded_cache_select_alike_save_with_dcp_and_resume_on_1_or_2(tmp_path):
    path = str(tmp_path / "dcp")
    r0, r1 = run_on_two_ranks(_two_rank_worker(path))
    for r in (r0, r1):
        assert r["same"], "sharding the cache must not change what any rank selects"
        assert r["resumed"], "a DCP checkpoint resumes both ranks exactly"
        assert "holds rank 0's shard" in r["refused"] and "sbdata.checkpoint.save" in r["refused"]
        # a rank's state: its half of the cache, not the whole (and no per-example counts)
        assert r["states"]["sharded"] == N // 2 and r["states"]["replicated"] > 1.9 * N, r["states"]
    # the same checkpoint on one process: the whole cache, resharded
    one = make(0, 1, shard=True)
    sb_checkpoint.load(one, path)
    assert one.cache.known_count() == N and one.epoch == 3
    losses, epochs = one.cache.dense()
    assert torch.equal(losses, r0["full_cache"]) or torch.equal(losses, r1["full_cache"])
    assert shard_range(N, 1, 0) == (0, N)
    batches = [idx for _, _, idx in one]
    assert sum(b.numel() for b in batches) == N // 2 and one.stats.history[-1].mode == "stale"


def _built_before_init_worker(rank: int, world: int) -> str:
    import torch.distributed as dist

    group = dist.group.WORLD
    dist.destroy_process_group()  # build the loader as a single process would
    loader = DataLoader(IndexedPairs(32), batch_size=8)
    sb = SelectiveBatchLoader(loader, Echo(), keep=0.5, loss_fn=loss_from_x, stale=2, shard_cache=True)
    del group
    import datetime
    import os

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30),
                            init_method=f"tcp://127.0.0.1:{int(os.environ['MASTER_PORT']) + 1}")  # fmt: skip
    try:
        next(iter(sb))
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
def test_a_sharded_loader_built_before_init_process_group_is_refused():
    for message in run_on_two_ranks(_built_before_init_worker):
        assert "build the SelectiveBatchLoader after" in message and "rank 0 of 1" in message


def test_sbdata_checkpoint_refuses_a_replicated_cache_and_a_mid_epoch_position(tmp_path):
    replicated = make(0, 1, shard=False)
    with pytest.raises(ValueError, match="is for SelectiveBatchLoader\\(..., shard_cache=True\\)"):
        sb_checkpoint.save(replicated, tmp_path / "a")
    sharded = make(0, 1, shard=True)
    it = iter(sharded)
    next(it)
    with pytest.raises(ValueError, match="takes epoch-boundary checkpoints, and epoch 0 is in progress"):
        sb_checkpoint.save(sharded, tmp_path / "b")
    for _ in it:  # the rest of the epoch: now it saves
        pass
    sb_checkpoint.save(sharded, tmp_path / "b")
    other = SelectiveBatchLoader(
        DataLoader(IndexedPairs(N), batch_size=16), Echo(), loss_fn=loss_from_x, shard_cache=True, **{**CONFIG, "keep": 0.25}
    )
    with pytest.raises(ValueError, match="keep=0.5 but this loader has keep=0.25"):
        sb_checkpoint.load(other, tmp_path / "b")
