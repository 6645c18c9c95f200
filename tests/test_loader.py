"""SelectiveBatchLoader end to end: re-packing properties, len, stats, DataLoader integration."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from sbdata import SelectiveBatchLoader, ThresholdPolicy
from sbdata.policies import BasePolicy

from .conftest import (
    KINDS,
    check_structure,
    consecutive_ids,
    id_loss,
    id_score_fn,
    ids_of,
    make_batch,
    selected_ids,
)

DTYPES = (torch.float32, torch.float16, torch.float64)


def _expected_epochs(selected, batch_size, last_batch, epochs):
    """Reference model: the id lists of the batches each epoch yields."""
    out, pending = [], []
    for _ in range(epochs):
        stream = pending + selected
        full = len(stream) // batch_size * batch_size
        batches = [stream[i : i + batch_size] for i in range(0, full, batch_size)]
        rest = stream[full:]
        pending = []
        if rest and last_batch == "yield":
            batches.append(rest)
        elif rest and last_batch == "carry":
            pending = rest
        out.append(batches)
    return out


def _run_and_check(sb, kind, dtype, expected_epochs, len_known_from):
    for epoch, expected in enumerate(expected_epochs):
        n_batches = len(sb) if epoch >= len_known_from else None
        got = []
        for batch in sb:
            got.append(check_structure(kind, batch, dtype).tolist())
        assert got == expected, f"epoch {epoch}"
        if n_batches is not None:
            assert n_batches == len(got), f"len() said {n_batches}, epoch {epoch} yielded {len(got)}"
        stats = sb.stats.history[-1]
        assert stats.batches == len(got)
        assert stats.yielded == sum(len(b) for b in got)


settings_ = settings(max_examples=50, deadline=None)


@settings_
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    keep=st.floats(0.05, 0.95),
    batch_size=st.integers(1, 10),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(DTYPES),
    last_batch=st.sampled_from(["yield", "drop", "carry"]),
    epochs=st.integers(1, 3),
)
def test_every_selected_example_is_yielded_exactly_once_in_full_batches(
    sizes, keep, batch_size, kind, dtype, last_batch, epochs
):
    assume(int(keep * max(sizes)) >= 1)  # otherwise refused at construction
    batches = [make_batch(kind, ids, dtype) for ids in consecutive_ids(sizes)]
    selected = selected_ids(consecutive_ids(sizes), keep)
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=keep, policy="topk", score_fn=id_score_fn(kind),
        batch_size=batch_size, last_batch=last_batch,
    )
    expected = _expected_epochs(selected, batch_size, last_batch, epochs)
    _run_and_check(sb, kind, dtype, expected, len_known_from=0)
    # the reference model's guarantees, spelled out
    for batches_of_epoch in expected:
        assert all(len(b) == batch_size for b in batches_of_epoch[:-1])
        if last_batch != "yield":
            assert all(len(b) == batch_size for b in batches_of_epoch)


@settings_
@given(
    n=st.integers(1, 40),
    source_batch=st.integers(1, 9),
    keep=st.floats(0.05, 0.95),
    batch_size=st.integers(1, 9),
    kind=st.sampled_from(KINDS),
    last_batch=st.sampled_from(["yield", "drop", "carry"]),
)
def test_len_is_exact_from_the_first_epoch_for_a_dataloader(
    n, source_batch, keep, batch_size, kind, last_batch
):
    assume(int(keep * source_batch) >= 1)  # otherwise refused at construction (tests/test_errors.py)
    loader = DataLoader(
        list(range(n)), batch_size=source_batch,
        collate_fn=lambda ids: make_batch(kind, ids),
    )
    sizes = [len(ids) for ids in torch.arange(n).split(source_batch)]
    selected = selected_ids(consecutive_ids(sizes), keep)
    sb = SelectiveBatchLoader(
        loader, nn.Identity(), keep=keep, policy="topk", score_fn=id_score_fn(kind),
        batch_size=batch_size, last_batch=last_batch,
    )
    expected = _expected_epochs(selected, batch_size, last_batch, 3)
    _run_and_check(sb, kind, torch.float32, expected, len_known_from=0)


def test_carry_yields_leftover_rows_first_in_the_next_epoch_and_loses_nothing():
    sizes = [5, 5, 5]  # keep 0.6 -> 3 per batch, 9 per epoch; batch_size 4 -> 1 left over
    batches = [make_batch("tuple", ids) for ids in consecutive_ids(sizes)]
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.6, policy="topk", score_fn=id_score_fn("tuple"),
        batch_size=4, last_batch="carry",
    )
    selected = selected_ids(consecutive_ids(sizes), 0.6)
    assert len(selected) == 9
    epochs = [[b[2].tolist() for b in sb] for _ in range(4)]
    assert [len(e) for e in epochs] == [2, 2, 2, 3]  # 9, 18, 27, 36 rows -> 2, 4, 6, 9 batches
    assert epochs[1][0][0] == selected[8]  # the carried row opens epoch 1
    flat = [i for e in epochs for b in e for i in b]
    assert flat == selected * 4  # nothing lost or repeated


def test_drop_discards_only_the_partial_batch_and_the_next_epoch_starts_empty():
    batches = [make_batch("tuple", ids) for ids in consecutive_ids([5, 5, 5])]
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.6, policy="topk", score_fn=id_score_fn("tuple"),
        batch_size=4, last_batch="drop",
    )
    selected = selected_ids(consecutive_ids([5, 5, 5]), 0.6)
    for _ in range(2):
        assert [b[2].tolist() for b in sb] == [selected[:4], selected[4:8]]


@pytest.mark.parametrize("policy", ["rank", "topk", "random"])
@pytest.mark.parametrize("last_batch", ["yield", "drop", "carry"])
def test_len_equals_the_batches_yielded_for_exact_count_policies(policy, last_batch):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(45, 4, generator=gen), torch.randint(0, 3, (45,), generator=gen))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=gen)
    sb = SelectiveBatchLoader(
        loader, nn.Linear(4, 3), keep=0.3, policy=policy, batch_size=5, last_batch=last_batch,
        interrupt=3,
    )
    for _ in range(3):
        expected = len(sb)
        yielded = list(sb)
        assert len(yielded) == expected
        stats = sb.stats.history[-1]
        # exactly int(keep * n) of every scored (non-interrupt) source batch
        sizes = [8, 8, 8, 8, 8, 5]  # batches 2 and 5 pass through (interrupt=3)
        assert stats.selected == sum(int(0.3 * sizes[i]) for i in (0, 1, 3, 4))
        assert stats.passed_through == sizes[2] + sizes[5]
        if last_batch != "yield":
            assert all(len(x) in (5, 8) for x, _ in yielded)  # full or passed through


def test_len_is_a_bound_never_exceeded_by_the_bernoulli_threshold_policy():
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(70, 4, generator=gen), torch.randint(0, 3, (70,), generator=gen))
    loader = DataLoader(data, batch_size=10)
    for seed in range(3):
        sb = SelectiveBatchLoader(
            loader, nn.Linear(4, 3), keep=0.5, policy=ThresholdPolicy(0.5, count="bernoulli"), batch_size=4,
            seed=seed, loss_fn=lambda out, tgt: torch.rand(len(tgt), generator=gen),
        )
        for _ in range(3):
            bound = len(sb)
            assert len(list(sb)) <= bound
        assert bound == 70 // 4 + 1  # every example may be kept


@pytest.mark.parametrize("policy", ["threshold", "infobatch"])
def test_len_is_exact_for_the_default_count_exact_threshold_and_infobatch(policy):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(70, 4, generator=gen), torch.randint(0, 3, (70,), generator=gen))
    for seed in range(3):
        sb = SelectiveBatchLoader(
            DataLoader(data, batch_size=10), nn.Linear(4, 3), keep=0.5, policy=policy, batch_size=4,
            seed=seed, loss_fn=lambda out, tgt: torch.rand(len(tgt), generator=gen),
        )
        for _ in range(3):
            expected = len(sb)
            assert len(list(sb)) == expected == 35 // 4 + 1


def test_rank_keeps_exactly_int_keep_times_n_per_source_batch_through_the_loader():
    sizes = [10, 10, 7]
    batches = [make_batch("tuple", ids) for ids in consecutive_ids(sizes)]
    kept_per_batch = []

    class CountingRank(BasePolicy):
        def __init__(self):
            from sbdata import RankPolicy

            self.inner = RankPolicy(0.4)

        def count(self, n):
            return self.inner.count(n)

        def select(self, losses, generator):
            selection = self.inner.select(losses, generator)
            kept_per_batch.append(selection.rows.numel())
            return selection

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    sb = SelectiveBatchLoader(
        batches, nn.Identity(), policy=CountingRank(), score_fn=id_score_fn("tuple"), batch_size=3,
    )
    out = [i for b in sb for i in b[2].tolist()]
    assert kept_per_batch == [4, 4, 2]
    assert len(out) == len(set(out)) == 10


# ---------------------------------------------------------------- stats


def test_stats_count_loaded_scored_selected_yielded_and_batches_per_epoch():
    batches = [make_batch("tuple", ids) for ids in consecutive_ids([8, 8, 8, 8, 6])]
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.5, policy="topk", score_fn=id_score_fn("tuple"),
        batch_size=8, interrupt=4, epochs=3, end=2 / 3,
    )
    for _ in range(3):
        list(sb)
    first, second, third = sb.stats.history
    assert [s.epoch for s in sb.stats.history] == [0, 1, 2]
    # batch 3 (the 4th) passes through; 8 + 8 + 8 + 6 = 30 scored, 4 + 4 + 4 + 3 = 15 kept
    for s in (first, second):
        assert s.mode == "fresh"
        assert (s.loaded, s.scored, s.selected, s.passed_through) == (38, 30, 15, 8)
        assert s.source_batches == 5
        # 15 rows -> one full batch of 8 and a partial of 7, plus the interrupt batch
        assert (s.yielded, s.batches) == (23, 3)
        assert s.scoring_seconds >= 0.0
        assert s.kept_fraction == pytest.approx(15 / 30)
    assert third.mode == "plain"
    assert (third.loaded, third.scored, third.selected, third.yielded, third.batches) == (38, 0, 0, 38, 5)
    assert sb.stats[1] is second


def test_stats_current_is_updated_while_the_epoch_runs():
    batches = [make_batch("tuple", ids) for ids in consecutive_ids([4, 4, 4])]
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.5, policy="topk", score_fn=id_score_fn("tuple"), batch_size=2,
    )
    it = iter(sb)
    next(it)
    assert (sb.stats.current.loaded, sb.stats.current.batches, sb.stats.current.yielded) == (4, 1, 2)
    assert sb.stats.history == []
    list(it)
    assert len(sb.stats.history) == 1 and sb.stats.history[0].batches == 3


# ---------------------------------------------------------------- epochs


def test_iterating_advances_the_epoch_counter():
    batches = [make_batch("tuple", ids) for ids in consecutive_ids([4])]
    sb = SelectiveBatchLoader(batches, nn.Identity(), score_fn=id_score_fn("tuple"), batch_size=2)
    assert sb.epoch == 0
    list(sb)
    list(sb)
    assert sb.epoch == 2


def test_an_abandoned_epoch_leaves_nothing_behind_for_the_next():
    sizes = [6, 6, 6]
    batches = [make_batch("tuple", ids) for ids in consecutive_ids(sizes)]
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.5, policy="topk", score_fn=id_score_fn("tuple"),
        batch_size=2, last_batch="carry",
    )
    for batch in sb:
        break  # 3 rows selected, 2 yielded, 1 pending
    selected = selected_ids(consecutive_ids(sizes), 0.5)
    assert [b[2].tolist() for b in sb] == [selected[i : i + 2] for i in range(0, 8, 2)]


def test_a_dataloader_with_two_workers_works_in_fresh_mode():
    ids = torch.arange(40)
    data = TensorDataset(ids.float()[:, None], ids)
    loader = DataLoader(data, batch_size=8, num_workers=2)
    sb = SelectiveBatchLoader(
        loader, nn.Identity(), keep=0.5, policy="topk", batch_size=4,
        score_fn=lambda model, batch: id_loss(batch[1]),
    )
    expected = selected_ids(list(ids.split(8)), 0.5)
    for _ in range(2):
        assert len(sb) == 5
        out = [i for x, y in sb for i in y.tolist()]
        assert out == expected


def test_set_epoch_is_forwarded_to_a_distributed_sampler():
    ids = torch.arange(32)
    data = TensorDataset(ids.float()[:, None], ids)
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=5)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    loaded = []
    sb = SelectiveBatchLoader(
        loader, nn.Identity(), keep=0.5, policy="topk", batch_size=2,
        score_fn=lambda model, batch: loaded.append(batch[1].clone()) or id_loss(batch[1]),
    )

    def expected_order(epoch):
        reference = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=5)
        reference.set_epoch(epoch)
        return list(reference)

    orders = []
    for epoch in [0, 1, 2]:
        loaded.clear()
        list(sb)
        orders.append(torch.cat(loaded).tolist())
        assert orders[-1] == expected_order(epoch)
        assert sampler.epoch == epoch
    assert orders[0] != orders[1] != orders[2]
    sb.set_epoch(7)
    loaded.clear()
    list(sb)
    assert torch.cat(loaded).tolist() == expected_order(7)
    assert len(orders[0]) == 16  # rank 0 sees half the data


def test_loader_properties_expose_the_wrapped_loader():
    data = TensorDataset(torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))
    loader = DataLoader(data, batch_size=4)
    sb = SelectiveBatchLoader(loader, nn.Identity())
    assert sb.loader is loader and sb.dataset is data
    assert sb.batch_size == 4
    assert sb.sampler is loader.sampler


def test_the_generator_seed_makes_rank_selection_reproducible():
    batches = [make_batch("tuple", ids) for ids in consecutive_ids([10, 10, 10])]

    def run(seed):
        sb = SelectiveBatchLoader(
            batches, nn.Identity(), keep=0.5, score_fn=id_score_fn("tuple"), batch_size=5, seed=seed
        )
        return [[b[2].tolist() for b in sb] for _ in range(2)]

    assert run(0) == run(0)
    assert run(0) != run(1)


@pytest.mark.parametrize("kind", KINDS)
def test_selected_rows_keep_every_field_consistent(kind):
    sizes = [7, 7, 3]
    batches = [make_batch(kind, ids) for ids in consecutive_ids(sizes)]
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.5, score_fn=id_score_fn(kind), batch_size=3
    )
    seen = [int(i) for b in sb for i in check_structure(kind, b)]
    assert len(seen) == len(set(seen)) == 3 + 3 + 1
    for b in batches:  # the source batches were not modified
        check_structure(kind, b)
    assert all(ids_of(kind, b).numel() == n for b, n in zip(batches, sizes))
