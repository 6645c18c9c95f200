"""Exact resume from any checkpoint, any number of times (issue: exact resume).

Each case runs a loader uninterrupted, then again with chained checkpoints at random steps
(each resumed in a brand-new loader, with a checkpoint taken right after every resume), and
compares the batch-id streams. ``python -m sbdata.bench.resume`` runs a larger grid.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch.utils.data import DataLoader

from sbdata import SelectiveBatchLoader
from sbdata.bench.resume import chained_run, uninterrupted_run

from .conftest import Echo, IndexedPairs, loss_from_x

EPOCHS = 4
POLICIES = ["rank", "topk", "random", "threshold", "infobatch"]
STALE = [None, 2, "once"]
SCHEDULES = {"none": {}, "window": {"epochs": EPOCHS, "start": 0.25, "end": 0.75}, "interrupt": {"interrupt": 3}}
LAST = ["yield", "drop", "carry"]


def dataloader(kind: str, n: int = 45) -> object:
    data = IndexedPairs(n)
    if kind == "generator":
        return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    if kind == "global":
        return DataLoader(data, batch_size=8, shuffle=True)
    if kind in ("workers", "persistent"):
        return DataLoader(data, batch_size=8, shuffle=True, num_workers=2, persistent_workers=kind == "persistent")
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(data, batch_size=8, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(3))
    if kind == "list":  # a re-iterable sbdata cannot load ids from: replayed on resume
        return [tuple(data[i] for i in range(k, min(k + 8, n))) for k in range(0, n, 8)]
    raise AssertionError(kind)


def collate_list(batches):
    return [
        (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), torch.tensor([b[2] for b in batch]))
        for batch in batches
    ]


def maker(kind: str, **config):
    def make():
        loader = dataloader(kind)
        extra = {}
        if kind == "list":
            loader, extra = collate_list(loader), {"index_key": 2}
        config.setdefault("batch_size", 8)
        return SelectiveBatchLoader(loader, Echo(), keep=0.5, loss_fn=loss_from_x, **config, **extra)

    return make


def check(make, cuts_seed: int, count: int = 3) -> None:
    torch.manual_seed(0)
    expected = uninterrupted_run(make, EPOCHS, lambda b: b[2])
    rng = random.Random(cuts_seed)
    cuts = rng.sample(range(len(expected) + 1), k=min(count, len(expected) + 1))
    torch.manual_seed(0)
    got = chained_run(make, EPOCHS, lambda b: b[2], cuts)
    assert got == expected, f"cuts at {sorted(cuts)}"


KINDS = ["generator", "global", "list"]
GRID = [(*c, KINDS[i % 3], i) for i, c in enumerate(itertools.product(POLICIES, STALE, SCHEDULES, LAST))]


@pytest.mark.parametrize("policy, stale, schedule, last_batch, kind, seed", GRID, ids=["-".join(map(str, c[:5])) for c in GRID])
def test_chained_resume_is_exact(policy, stale, schedule, last_batch, kind, seed):
    config = dict(policy=policy, stale=stale, last_batch=last_batch, batch_size=6, **SCHEDULES[schedule])
    check(maker(kind, **config), cuts_seed=seed)


@pytest.mark.parametrize("kind", ["workers", "persistent", "stateful", "global", "list"])
@pytest.mark.parametrize("stale", [None, 2])
def test_chained_resume_is_exact_for_every_kind_of_loader(kind, stale):
    check(maker(kind, policy="threshold", stale=stale, last_batch="carry", batch_size=6, interrupt=3), cuts_seed=7, count=4)


def test_a_checkpoint_on_every_step_resumes_exactly():
    make = maker("generator", policy="infobatch", stale=2, last_batch="carry", batch_size=5)
    expected = uninterrupted_run(make, EPOCHS, lambda b: b[2])
    assert chained_run(make, EPOCHS, lambda b: b[2], range(len(expected) + 1)) == expected


# ---------------------------------------------------------------- what the state holds


def _state_bytes(sb) -> int:
    import io

    buffer = io.BytesIO()
    torch.save(sb.state_dict(), buffer)
    return buffer.tell()


@pytest.mark.parametrize("stale", [None, 2])
def test_the_state_stays_bounded_over_200_epochs(stale):
    sb = SelectiveBatchLoader(
        DataLoader(IndexedPairs(512), batch_size=32, shuffle=True), Echo(), keep=0.5, loss_fn=loss_from_x,
        policy="threshold", stale=stale,
    )  # fmt: skip
    sizes = []
    for _ in range(200):
        for _, _, ids in sb:
            sb.record(ids.float())
        sizes.append(_state_bytes(sb))
    settled = sizes[40]  # the kept history (32 epochs of stats, 8 of loss samples) is full by then
    assert max(sizes[40:]) <= settled * 1.02, f"state grew from {settled} to {max(sizes[40:])} bytes"
    assert len(sb.stats.history) == 32


def test_fresh_mode_stores_no_per_example_cache():
    sb = SelectiveBatchLoader(DataLoader(IndexedPairs(4096), batch_size=64), Echo(), loss_fn=loss_from_x)
    for _, _, ids in sb:
        sb.record(ids.float())
    state = sb.state_dict()
    assert state["cache"] is None and sb.cache.nbytes == 0


def test_sparse_ids_take_memory_by_examples_not_by_the_largest_id():
    ids = torch.arange(24) * 40_000_000 + 11  # up to ~1e9
    batches = [(ids[i : i + 8, None].float(), torch.zeros(8, dtype=torch.long), ids[i : i + 8]) for i in range(0, 24, 8)]
    sb = SelectiveBatchLoader(batches, Echo(), keep=0.5, loss_fn=lambda o, y: o[:, 0] % 1000, stale=2, index_key=2, batch_size=4)
    for _ in range(3):
        list(sb)
    assert sb.cache.sparse and sb.cache.nbytes < 1024
    losses, known = sb.cache.lookup(ids)
    assert bool(known.all()) and torch.equal(losses, (ids.float() % 1000))
    assert [s.mode for s in sb.stats.history] == ["fresh", "stale", "fresh"]
    resumed = SelectiveBatchLoader(batches, Echo(), keep=0.5, loss_fn=lambda o, y: o[:, 0] % 1000, stale=2, index_key=2, batch_size=4)
    resumed.load_state_dict(torch.load(__import__("io").BytesIO(_save(sb.state_dict())), weights_only=True))
    assert torch.equal(resumed.cache.lookup(ids)[0], losses)


def _save(state) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class _Generated:
    """A re-iterable sbdata cannot load ids from nor ask for its position."""

    def __iter__(self):
        for k in range(0, 24, 8):
            ids = torch.arange(k, k + 8)
            yield ids[:, None].float().repeat(1, 2), ids % 3, ids


def test_a_mid_epoch_checkpoint_that_relies_on_replay_warns_once():
    sb = SelectiveBatchLoader(_Generated(), Echo(), keep=0.5, loss_fn=loss_from_x, batch_size=4)
    it = iter(sb)
    next(it)
    with pytest.warns(UserWarning, match=r"resumes a mid-epoch checkpoint of a _Generated by iterating it again"):
        sb.state_dict()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb.state_dict()  # once is enough
        list(it)
        sb.state_dict()  # an epoch boundary needs no replay
