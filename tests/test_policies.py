"""Selection policies: exact counts, preference for high losses, and the published rules."""

from __future__ import annotations

import itertools

import pytest
import torch
from .conftest import LogitTable, consecutive_ids, id_loss, known_ce, topk_positions
from hypothesis import given, settings
from hypothesis import strategies as st

from sbdata import RandomPolicy, RankPolicy, SelectiveBatchLoader, ThresholdPolicy, TopKPolicy
from sbdata.policies import make_policy, rank_select, select_each, threshold_select, topk_select

keeps = st.floats(min_value=0.01, max_value=1.0)
loss_lists = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40)


def _quartile_frequencies(select, n=40, trials=400, seed=0):
    """How often each loss quartile is selected, over ``trials`` fresh random batches."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(4)
    for _ in range(trials):
        losses = torch.rand(n, generator=gen)
        rows = select(losses, gen)
        rank = torch.argsort(torch.argsort(losses))  # 0 = lowest loss
        quartile = (rank[rows] * 4) // n
        counts += torch.bincount(quartile, minlength=4).float()
    return counts / (trials * n / 4)  # selection rate per quartile


# ---------------------------------------------------------------- topk


@settings(max_examples=50, deadline=None)
@given(losses=loss_lists, keep=keeps)
def test_topk_keeps_exactly_the_highest_int_keep_times_n_losses(losses, keep):
    rows = topk_select(torch.tensor(losses, dtype=torch.float64), keep)
    assert rows.dtype == torch.long
    assert rows.tolist() == topk_positions(torch.tensor(losses).float().tolist(), keep)


def test_topk_through_the_loader_keeps_the_top_of_every_source_batch_with_cross_entropy():
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(40, 5, generator=gen)
    targets = torch.randint(0, 5, (40,), generator=gen)
    sizes = [8, 8, 8, 8, 5, 3]
    batches = [(ids, targets[ids]) for ids in consecutive_ids(sizes)]
    sb = SelectiveBatchLoader(batches, LogitTable(table), keep=0.5, policy="topk", batch_size=100)
    (out,) = list(sb)
    expected = []
    for ids, y in batches:
        losses = known_ce(table, ids, y)
        expected += [int(ids[p]) for p in topk_positions(losses.tolist(), 0.5)]
    assert out[0].tolist() == expected
    assert torch.equal(out[1], targets[out[0]])


# ---------------------------------------------------------------- rank


@settings(max_examples=50, deadline=None)
@given(losses=loss_lists, keep=keeps, seed=st.integers(0, 2**31 - 1))
def test_rank_selects_exactly_int_keep_times_n_distinct_sorted_positions(losses, keep, seed):
    n = len(losses)
    rows = rank_select(torch.tensor(losses), keep, torch.Generator().manual_seed(seed))
    assert rows.dtype == torch.long
    assert rows.numel() == int(keep * n)
    assert rows.tolist() == sorted(set(rows.tolist()))
    assert all(0 <= r < n for r in rows.tolist())


def test_rank_prefers_high_losses_by_quartile():
    rates = _quartile_frequencies(RankPolicy(0.25).select)
    # keep=0.25 gives weights ~ percentile^3: the top quartile dominates, the bottom is rare
    assert rates[3] > 10 * rates[0]
    assert rates[0] < rates[1] < rates[2] < rates[3]
    assert rates.mean() == pytest.approx(0.25)


def test_rank_first_draw_probabilities_follow_the_composer_weights():
    # n=4, keep=0.25 -> one draw with weights ((rank + 0.5) / 4) ** 3 = [1, 27, 125, 343] / 496
    losses = torch.tensor([3.0, 0.0, 2.0, 1.0])  # ranks of the positions: 3, 0, 2, 1
    gen = torch.Generator().manual_seed(0)
    trials = 20000
    counts = torch.zeros(4)
    for _ in range(trials):
        counts[rank_select(losses, 0.25, gen)] += 1
    by_rank = torch.tensor([1, 27, 125, 343]) / 496
    expected = by_rank[[3, 0, 2, 1]]
    assert torch.allclose(counts / trials, expected, atol=0.012)


def test_rank_inclusion_probabilities_match_the_weights_without_replacement():
    # n=4, keep=0.5 -> two draws without replacement, weights [1, 3, 5, 7] / 16 by rank
    w = [1 / 16, 3 / 16, 5 / 16, 7 / 16]
    inclusion = [
        w[i] + sum(w[j] * w[i] / (1 - w[j]) for j in range(4) if j != i) for i in range(4)
    ]
    assert sum(inclusion) == pytest.approx(2.0)
    losses = torch.tensor([0.5, 9.0, -1.0, 4.0])  # ranks of the positions: 1, 3, 0, 2
    gen = torch.Generator().manual_seed(1)
    trials = 20000
    counts = torch.zeros(4)
    for _ in range(trials):
        counts[rank_select(losses, 0.5, gen)] += 1
    expected = torch.tensor(inclusion)[[1, 3, 0, 2]]
    assert torch.allclose(counts / trials, expected.float(), atol=0.012)


def test_rank_with_keep_one_half_on_two_examples_keeps_the_higher_three_times_in_four():
    gen = torch.Generator().manual_seed(2)
    picks = [int(rank_select(torch.tensor([5.0, 1.0]), 0.5, gen)) for _ in range(8000)]
    assert sum(p == 0 for p in picks) / 8000 == pytest.approx(0.75, abs=0.02)


def test_rank_is_reproducible_from_the_generator_and_does_not_touch_the_global_rng():
    losses = torch.rand(50, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = rank_select(losses, 0.3, torch.Generator().manual_seed(7))
    b = rank_select(losses, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- random


def test_random_selects_exactly_int_keep_times_n():
    gen = torch.Generator().manual_seed(0)
    for n, keep in itertools.product([1, 2, 7, 10, 33], [0.1, 0.25, 0.5, 0.99]):
        rows = RandomPolicy(keep).select(torch.rand(n), gen)
        assert rows.numel() == int(keep * n)
        assert rows.tolist() == sorted(set(rows.tolist()))


def test_random_is_unbiased_across_loss_quartiles():
    rates = _quartile_frequencies(RandomPolicy(0.25).select, trials=600)
    assert torch.allclose(rates, torch.full((4,), 0.25), atol=0.03)


def test_random_picks_every_position_equally_often():
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(8)
    losses = torch.arange(8.0)
    for _ in range(4000):
        counts[RandomPolicy(0.25).select(losses, gen)] += 1
    assert torch.allclose(counts / 4000, torch.full((8,), 0.25), atol=0.03)


def test_random_ignores_the_losses_entirely():
    losses_a = torch.arange(20.0)
    losses_b = -torch.arange(20.0)
    a = RandomPolicy(0.5).select(losses_a, torch.Generator().manual_seed(5))
    b = RandomPolicy(0.5).select(losses_b, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- threshold


def test_threshold_defaults_to_beta_one_over_keep_minus_one_and_history_1024():
    policy = ThresholdPolicy(0.25)
    assert policy.beta == pytest.approx(3.0)
    assert policy.history_size == 1024
    assert policy.exact is False
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        policy.select(torch.rand(64, generator=gen), gen)
    assert policy.state_dict()["history"].numel() == 1024


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.8])
def test_threshold_keeps_about_keep_overall(keep):
    policy = make_policy("threshold", keep)
    assert isinstance(policy, ThresholdPolicy)
    gen = torch.Generator().manual_seed(11)
    kept = total = 0
    for _ in range(200):
        losses = torch.randn(32, generator=gen)
        kept += policy.select(losses, gen).numel()
        total += 32
    assert kept / total == pytest.approx(keep, abs=0.03)


def test_threshold_beta_is_settable_and_sets_the_selectivity():
    policy = ThresholdPolicy(0.5, beta=3.0)  # 1 / (beta + 1) = 0.25, whatever keep says
    gen = torch.Generator().manual_seed(4)
    kept = sum(policy.select(torch.rand(32, generator=gen), gen).numel() for _ in range(200))
    assert kept / (200 * 32) == pytest.approx(0.25, abs=0.03)


def test_threshold_history_size_is_settable_and_bounds_the_history():
    policy = ThresholdPolicy(0.5, history_size=6)
    gen = torch.Generator().manual_seed(0)
    policy.select(torch.zeros(4), gen)
    policy.select(torch.tensor([1.0, 2.0, 3.0, 4.0]), gen)
    assert policy.state_dict()["history"].tolist() == [0.0, 0.0, 1.0, 2.0, 3.0, 4.0]


def test_threshold_only_compares_against_the_last_history_size_losses():
    # After a batch of zeros, loss 1.0 beats half of a long history but none of a 4-long one.
    def kept_lowest(history_size):
        gen = torch.Generator().manual_seed(0)
        hits = 0
        for _ in range(300):
            policy = ThresholdPolicy(0.5, history_size=history_size)
            policy.select(torch.zeros(4), gen)
            hits += 0 in policy.select(torch.tensor([1.0, 2.0, 3.0, 4.0]), gen).tolist()
        return hits

    assert kept_lowest(4) == 0
    assert kept_lowest(1024) > 100  # F(1.0) = 4/8, beta = 1: kept about half the time


def test_threshold_cdf_uses_strictly_lower_losses():
    gen = torch.Generator().manual_seed(0)
    ties = torch.full((5,), 2.0)
    # every loss equals every history entry: F(L) = 0 with strict <, so nothing is kept
    for _ in range(50):
        assert threshold_select(ties, ties.clone(), beta=1.0, generator=gen).numel() == 0
    # F(2.0) over [1, 2, 2, 2] is 1/4 with strict < (it would be 1 with <=)
    history = torch.tensor([1.0, 2.0, 2.0, 2.0])
    hits = sum(threshold_select(torch.tensor([2.0]), history, 1.0, gen).numel() for _ in range(4000))
    assert hits / 4000 == pytest.approx(0.25, abs=0.03)


def test_threshold_keep_probability_is_cdf_to_the_power_beta():
    history = torch.arange(10.0)  # F(L) for L = 5.0 is 5/10
    gen = torch.Generator().manual_seed(9)
    for beta, expected in [(1.0, 0.5), (2.0, 0.25), (0.0, 1.0)]:
        hits = sum(
            threshold_select(torch.tensor([5.0]), history, beta, gen).numel() for _ in range(4000)
        )
        assert hits / 4000 == pytest.approx(expected, abs=0.03)


def test_threshold_never_keeps_the_lowest_loss_of_a_fresh_history():
    gen = torch.Generator().manual_seed(0)
    kept = []
    for _ in range(100):
        policy = ThresholdPolicy(0.5)
        kept += policy.select(torch.tensor([3.0, -1.0, 2.0]), gen).tolist()
    assert kept.count(1) == 0, "the lowest loss has F(L) = 0, so it is never kept"
    assert kept.count(0) > 30 and kept.count(2) > 5, "the others are kept with F(L) ** beta"


def test_threshold_through_the_loader_keeps_about_keep_and_len_is_a_bound():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, generator=gen), torch.zeros(16)) for _ in range(60)]
    sb = SelectiveBatchLoader(
        batches,
        torch.nn.Identity(),
        keep=0.25,
        policy="threshold",
        batch_size=8,
        loss_fn=lambda out, tgt: out,
    )
    list(sb)  # first epoch: batch sizes get known
    bound = len(sb)
    yielded = list(sb)
    stats = sb.stats.history[-1]
    assert stats.selected / stats.scored == pytest.approx(0.25, abs=0.05)
    assert len(yielded) <= bound


# ---------------------------------------------------------------- policy objects


def test_policy_names_map_to_their_classes():
    assert isinstance(make_policy("rank", 0.5), RankPolicy)
    assert isinstance(make_policy("topk", 0.5), TopKPolicy)
    assert isinstance(make_policy("random", 0.5), RandomPolicy)
    assert isinstance(make_policy("threshold", 0.5), ThresholdPolicy)
    custom = TopKPolicy(0.3)
    assert make_policy(custom, 0.5) is custom


def test_the_default_policy_is_rank():
    sb = SelectiveBatchLoader([(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))], torch.nn.Identity(), batch_size=2)
    assert isinstance(sb.policy, RankPolicy)
    assert sb.policy.keep == 0.5


def test_a_policy_object_is_used_as_given_by_the_loader():
    ids = torch.arange(12)
    batches = [(ids.float()[:, None], ids)]
    sb = SelectiveBatchLoader(
        batches,
        torch.nn.Identity(),
        keep=0.5,
        policy=TopKPolicy(0.25),
        batch_size=3,
        score_fn=lambda model, b: id_loss(b[1]),
    )
    (out,) = list(sb)
    assert out[1].tolist() == [ids[p].item() for p in topk_positions(id_loss(ids).tolist(), 0.25)]


def test_infobatch_prunes_below_the_running_mean_and_reweights_the_survivors():
    from sbdata.policies import InfoBatchPolicy

    policy = InfoBatchPolicy(prune=0.5, history_size=1000)
    gen = torch.Generator().manual_seed(0)
    policy.select(torch.full((500,), 10.0), gen)  # history: the dataset's losses are about 10
    low = torch.linspace(0.0, 1.0, 400)  # a whole batch below the running mean
    kept = policy.select(low, gen)
    assert 0.35 < kept.numel() / 400 < 0.65, "about half of the below-mean examples dropped"
    assert torch.all(policy.weigh(low, kept) == 2.0), "survivors weighted 1 / (1 - prune)"
    high = torch.full((100,), 50.0)
    assert policy.select(high, gen).numel() == 100, "above-mean examples are always kept"
    assert torch.all(policy.weigh(high, torch.arange(100)) == 1.0)


# ---------------------------------------------------------------- many batches at once (stale planning)


def test_rank_select_many_matches_the_per_batch_inclusion_probabilities():
    # the same n=4, keep=0.5 case as above, drawn for 20000 batches in one vectorised call
    w = [1 / 16, 3 / 16, 5 / 16, 7 / 16]
    inclusion = torch.tensor([w[i] + sum(w[j] * w[i] / (1 - w[j]) for j in range(4) if j != i) for i in range(4)])
    losses = torch.tensor([0.5, 9.0, -1.0, 4.0])  # ranks 1, 3, 0, 2
    trials = 20000
    rows = RankPolicy(0.5).select_many([losses] * trials, torch.Generator().manual_seed(3))
    counts = torch.bincount(torch.cat(rows), minlength=4).float()
    assert all(r.numel() == 2 and torch.equal(r, torch.sort(r).values) and r.unique().numel() == 2 for r in rows)
    assert torch.allclose(counts / trials, inclusion[[1, 3, 0, 2]].float(), atol=0.012)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    keep=keeps,
    seed=st.integers(0, 2**16),
)
def test_select_many_keeps_int_keep_times_n_of_each_batch_in_order(sizes, keep, seed):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.rand(n, generator=gen) for n in sizes]  # mixed lengths: one group per length
    ranked = RankPolicy(keep).select_many(batches, gen)
    top = TopKPolicy(keep).select_many(batches, gen)
    assert len(ranked) == len(top) == len(batches)
    for losses, r, t in zip(batches, ranked, top):
        k = int(keep * losses.numel())
        assert r.numel() == k and r.unique().numel() == k and torch.equal(r, torch.sort(r).values)
        assert r.numel() == 0 or int(r.max()) < losses.numel()
        assert torch.equal(t, topk_select(losses, keep))  # top-k is deterministic: same answer


def test_select_each_calls_a_policy_without_select_many_batch_by_batch_in_order():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, generator=gen) for _ in range(5)]
    one, other = ThresholdPolicy(0.5, history_size=20), ThresholdPolicy(0.5, history_size=20)
    together = select_each(one, batches, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    assert all(torch.equal(a, other.select(b, g)) for a, b in zip(together, batches))
    assert torch.equal(one.state_dict()["history"], other.state_dict()["history"])


def test_select_many_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = [torch.rand(32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    a = RankPolicy(0.3).select_many(batches, torch.Generator().manual_seed(5))
    b = RankPolicy(0.3).select_many(batches, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(torch.get_rng_state(), before)
