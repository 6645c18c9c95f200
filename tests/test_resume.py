"""Exact resume: a fresh loader loaded from a saved state continues the run batch for batch."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from sbdata import SelectiveBatchLoader

from .conftest import Echo, IndexedPairs, loss_from_x

N = 90


def dataloader(**kw):
    # A DistributedSampler over one replica: its shuffle depends only on (seed, epoch), which
    # sbdata forwards, so the data order needs no state of its own to resume.
    sampler = DistributedSampler(IndexedPairs(N), num_replicas=1, rank=0, shuffle=True, seed=7)
    return DataLoader(IndexedPairs(N), batch_size=8, sampler=sampler, **kw)


CONFIGS = {
    "fresh-rank": dict(policy="rank"),
    "stale-threshold-carry": dict(policy="threshold", stale=3, last_batch="carry", batch_size=7),
    "stale-rank-interrupt": dict(policy="rank", stale=2, interrupt=3),
    "schedule-infobatch": dict(policy="infobatch", stale=2, epochs=6, start=0.2, end=0.9),
}


def make(config: str, loader=None) -> SelectiveBatchLoader:
    return SelectiveBatchLoader(loader or dataloader(), Echo(), keep=0.4, loss_fn=loss_from_x, **CONFIGS[config])


def ids_of(batches) -> list[list[int]]:
    return [b[2].tolist() for b in batches]


def save_and_load(state) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("stop_after", [0, 1, 2])
def test_resuming_at_an_epoch_boundary_reproduces_the_next_epochs(config, stop_after):
    reference = make(config)
    for _ in range(stop_after):
        list(reference)
    state = save_and_load(reference.state_dict())
    expected = [ids_of(reference) for _ in range(3)]
    resumed = make(config)
    resumed.load_state_dict(state)
    assert [ids_of(resumed) for _ in range(3)] == expected


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("k", [0, 3, "last"])
def test_resuming_in_the_middle_of_an_epoch_continues_it_exactly(config, epoch, k):
    reference, twin = make(config), make(config)
    for _ in range(epoch):
        list(reference)
        list(twin)
    it = iter(reference)
    count = len(list(twin)) - 1 if k == "last" else k  # len is only a bound for threshold
    head = [next(it) for _ in range(count)]
    state = save_and_load(reference.state_dict())
    expected_rest = ids_of(it)
    expected_next = ids_of(reference)
    resumed = make(config)
    resumed.load_state_dict(state)
    assert ids_of(resumed) == expected_rest, f"after {len(head)} batches"
    assert ids_of(resumed) == expected_next


def test_two_resumes_in_one_epoch():
    reference = make("stale-threshold-carry")
    list(reference)
    it = iter(reference)
    next(it)
    first = save_and_load(reference.state_dict())
    next(it)
    next(it)
    expected = ids_of(it)
    resumed = make("stale-threshold-carry")
    resumed.load_state_dict(first)
    it2 = iter(resumed)
    next(it2)
    next(it2)
    second = save_and_load(resumed.state_dict())
    again = make("stale-threshold-carry")
    again.load_state_dict(second)
    assert ids_of(again) == expected


def test_a_state_taken_after_the_epoch_ended_starts_the_next_epoch():
    reference = make("stale-rank-interrupt")
    list(reference)
    state = save_and_load(reference.state_dict())
    assert state["position"] is None
    resumed = make("stale-rank-interrupt")
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and ids_of(resumed) == ids_of(reference)


def test_a_stateful_dataloader_source_resumes_mid_epoch_in_fresh_mode():
    torchdata = pytest.importorskip("torchdata.stateful_dataloader")

    def loader():
        return torchdata.StatefulDataLoader(
            IndexedPairs(N), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)
        )

    reference = SelectiveBatchLoader(loader(), Echo(), keep=0.5, loss_fn=loss_from_x, policy="rank")
    it = iter(reference)
    [next(it) for _ in range(2)]
    state = save_and_load(reference.state_dict())
    plan = state["position"]["plan"]
    assert plan["candidates"] is None, "sbdata draws the epoch's id batches itself, again on resume"
    assert plan["planner"]["next"] == 4 and plan["window"] == [], "2 batches of keep=0.5: 4 source batches"
    expected = ids_of(it)
    resumed = SelectiveBatchLoader(loader(), Echo(), keep=0.5, loss_fn=loss_from_x, policy="rank")
    resumed.load_state_dict(state)
    assert ids_of(resumed) == expected


def test_a_plain_list_of_batches_is_fast_forwarded():
    batches = [(torch.arange(i, i + 6).float()[:, None].repeat(1, 2), torch.zeros(6, dtype=torch.long), torch.arange(i, i + 6)) for i in range(0, 60, 6)]
    make_list = lambda: SelectiveBatchLoader(batches, Echo(), keep=0.5, loss_fn=loss_from_x, policy="topk", batch_size=4)  # noqa: E731
    reference = make_list()
    it = iter(reference)
    [next(it) for _ in range(3)]
    state = save_and_load(reference.state_dict())
    expected = ids_of(it)
    resumed = make_list()
    resumed.load_state_dict(state)
    assert ids_of(resumed) == expected


def test_a_state_from_a_different_dataset_size_is_refused():
    state = make("fresh-rank").state_dict()
    other = DataLoader([IndexedPairs(N)[i] for i in range(50)], batch_size=8)
    loader = SelectiveBatchLoader(other, Echo(), keep=0.4, loss_fn=loss_from_x, policy="rank")
    with pytest.raises(ValueError, match="num_examples=90"):
        loader.load_state_dict(state)


def test_a_state_with_another_keep_or_version_is_refused():
    state = make("fresh-rank").state_dict()
    other = SelectiveBatchLoader(dataloader(), Echo(), keep=0.5, loss_fn=loss_from_x, policy="rank")
    with pytest.raises(ValueError, match="keep=0.4"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="format version"):
        make("fresh-rank").load_state_dict(dict(state, version=99))


def test_load_state_dict_of_an_empty_dict_is_refused():
    sb = make("fresh-rank")
    with pytest.raises(ValueError, match=r"format version None.*SelectiveBatchLoader.state_dict\(\)"):
        sb.load_state_dict({})
    assert sb.epoch == 0
