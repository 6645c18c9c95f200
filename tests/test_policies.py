"""Selection policies: exact counts, preference for high losses, the published rules, weights,
state and the policy interface. Imports only :mod:`sbdata.policies` (no loader)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sbdata.policies import (
    POLICIES,
    BasePolicy,
    InfoBatchPolicy,
    RandomPolicy,
    RankPolicy,
    Selection,
    SelectionPolicy,
    ThresholdPolicy,
    TopKPolicy,
    infobatch_prune_select,
    infobatch_select,
    make_policy,
    rank_select,
    threshold_probabilities,
    threshold_select,
    topk_select,
)

keeps = st.floats(min_value=0.01, max_value=1.0)
loss_lists = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40)

#: every built-in policy, in each of its count modes
BUILT_INS = {
    "rank": lambda keep: RankPolicy(keep),
    "topk": lambda keep: TopKPolicy(keep),
    "random": lambda keep: RandomPolicy(keep),
    "threshold": lambda keep: ThresholdPolicy(keep),
    "threshold-bernoulli": lambda keep: ThresholdPolicy(keep, count="bernoulli"),
    "infobatch": lambda keep: InfoBatchPolicy(keep),
    "infobatch-bernoulli": lambda keep: InfoBatchPolicy(keep, count="bernoulli"),
}
EXACT = [name for name in BUILT_INS if not name.endswith("bernoulli")]


def topk_positions(losses, keep):
    """Positions of the ``int(keep * n)`` highest losses, in batch order (independent reference)."""
    n = len(losses)
    best = sorted(range(n), key=lambda p: (-float(losses[p]), p))[: int(keep * n)]
    return sorted(best)


def _quartile_frequencies(select, n=40, trials=400, seed=0):
    """How often each loss quartile is selected, over ``trials`` fresh random batches."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(4)
    for _ in range(trials):
        losses = torch.rand(n, generator=gen)
        rows = select(losses, gen).rows
        rank = torch.argsort(torch.argsort(losses))  # 0 = lowest loss
        quartile = (rank[rows] * 4) // n
        counts += torch.bincount(quartile, minlength=4).float()
    return counts / (trials * n / 4)  # selection rate per quartile


def _inclusion_without_replacement(w):
    """Chance each item is in a draw of 2 without replacement, each draw proportional to ``w``."""
    total = sum(w)
    p = [x / total for x in w]
    return [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(len(p)) if j != i) for i in range(len(p))]


def _check_selection(sel, n, policy):
    assert isinstance(sel, Selection)
    rows = sel.rows
    assert rows.dtype == torch.long and rows.dim() == 1
    assert rows.tolist() == sorted(set(rows.tolist())), "sorted, distinct"
    assert all(0 <= r < n for r in rows.tolist())
    if policy.reweights:
        assert sel.weights is not None
        assert sel.weights.dtype == torch.float32 and sel.weights.device.type == "cpu"
        assert sel.weights.shape == rows.shape
        assert bool(torch.all(sel.weights > 0))
    else:
        assert sel.weights is None
    if policy.exact:
        assert rows.numel() == policy.count(n)
    else:
        assert rows.numel() <= policy.count(n)


# ---------------------------------------------------------------- every built-in


def test_selection_is_a_named_tuple_of_rows_and_weights():
    sel = Selection(torch.tensor([0, 2]), None)
    rows, weights = sel
    assert sel._fields == ("rows", "weights")
    assert rows is sel.rows and weights is None


def test_every_built_in_follows_the_protocol_and_says_whether_it_is_exact_and_reweights():
    for name, make in BUILT_INS.items():
        policy = make(0.5)
        assert isinstance(policy, SelectionPolicy) and isinstance(policy, BasePolicy), name
        assert policy.exact is (name in EXACT), name
        assert policy.reweights is name.startswith("infobatch"), name
        assert policy.count(10) == (5 if policy.exact else 10), name


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(BUILT_INS)),
    keep=keeps,
    sizes=st.lists(st.integers(0, 64), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_every_built_in_keeps_count_n_and_exact_ones_exactly(name, keep, sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, generator=gen) * 3 for n in sizes]
    one, many = BUILT_INS[name](keep), BUILT_INS[name](keep)
    for losses in batches:
        _check_selection(one.select(losses, gen), losses.numel(), one)
    selections = many.select_many(batches, gen)
    assert len(selections) == len(batches)
    for losses, sel in zip(batches, selections):
        _check_selection(sel, losses.numel(), many)


@pytest.mark.parametrize("name", EXACT)
def test_exact_policies_keep_int_keep_times_n_for_every_batch_size(name):
    gen = torch.Generator().manual_seed(0)
    for keep in (0.1, 0.25, 0.5, 0.9, 1.0):
        policy = BUILT_INS[name](keep)
        for n in range(0, 70):
            sel = policy.select(torch.rand(n, generator=gen), gen)
            assert sel.rows.numel() == int(keep * n) == policy.count(n), (keep, n)


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_policies_are_reproducible_from_the_generator_and_do_not_touch_the_global_rng(name):
    batches = [torch.rand(n, generator=torch.Generator().manual_seed(n)) for n in (16, 16, 9)]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    runs = []
    for _ in range(2):
        policy, gen = BUILT_INS[name](0.3), torch.Generator().manual_seed(5)
        runs.append([policy.select(b, gen) for b in batches] + policy.select_many(batches, gen))
    for a, b in zip(*runs):
        assert torch.equal(a.rows, b.rows)
        assert (a.weights is None) == (b.weights is None)
        assert a.weights is None or torch.equal(a.weights, b.weights)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- topk


@settings(max_examples=50, deadline=None)
@given(losses=loss_lists, keep=keeps)
def test_topk_keeps_exactly_the_highest_int_keep_times_n_losses(losses, keep):
    rows = topk_select(torch.tensor(losses, dtype=torch.float64), keep)
    assert rows.dtype == torch.long
    assert rows.tolist() == topk_positions(torch.tensor(losses).float().tolist(), keep)
    sel = TopKPolicy(keep).select(torch.tensor(losses), torch.Generator())
    assert torch.equal(sel.rows, rows) and sel.weights is None


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
    assert torch.allclose(counts / trials, by_rank[[3, 0, 2, 1]], atol=0.012)


def test_rank_inclusion_probabilities_match_the_weights_without_replacement():
    # n=4, keep=0.5 -> two draws without replacement, weights [1, 3, 5, 7] / 16 by rank
    inclusion = _inclusion_without_replacement([1, 3, 5, 7])
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


def test_rank_select_many_matches_the_per_batch_inclusion_probabilities():
    # the same n=4, keep=0.5 case as above, drawn for 20000 batches in one vectorised call
    inclusion = torch.tensor(_inclusion_without_replacement([1, 3, 5, 7]))
    losses = torch.tensor([0.5, 9.0, -1.0, 4.0])  # ranks 1, 3, 0, 2
    trials = 20000
    selections = RankPolicy(0.5).select_many([losses] * trials, torch.Generator().manual_seed(3))
    rows = [s.rows for s in selections]
    assert all(s.weights is None for s in selections)
    for r in rows:
        assert r.numel() == 2 and torch.equal(r, torch.sort(r).values) and r.unique().numel() == 2
    counts = torch.bincount(torch.cat(rows), minlength=4).float()
    assert torch.allclose(counts / trials, inclusion[[1, 3, 0, 2]].float(), atol=0.012)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    keep=keeps,
    seed=st.integers(0, 2**16),
)
def test_rank_and_topk_select_many_keep_int_keep_times_n_of_each_batch_in_order(sizes, keep, seed):
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.rand(n, generator=gen) for n in sizes]  # mixed lengths: one group per length
    ranked = RankPolicy(keep).select_many(batches, gen)
    top = TopKPolicy(keep).select_many(batches, gen)
    assert len(ranked) == len(top) == len(batches)
    for losses, r, t in zip(batches, ranked, top):
        k = int(keep * losses.numel())
        assert r.rows.numel() == k and r.rows.unique().numel() == k
        assert torch.equal(r.rows, torch.sort(r.rows).values)
        assert r.rows.numel() == 0 or int(r.rows.max()) < losses.numel()
        assert torch.equal(t.rows, topk_select(losses, keep))  # top-k is deterministic: same answer


# ---------------------------------------------------------------- random


def test_random_selects_exactly_int_keep_times_n():
    gen = torch.Generator().manual_seed(0)
    for n, keep in itertools.product([1, 2, 7, 10, 33], [0.1, 0.25, 0.5, 0.99]):
        rows = RandomPolicy(keep).select(torch.rand(n), gen).rows
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
        counts[RandomPolicy(0.25).select(losses, gen).rows] += 1
    assert torch.allclose(counts / 4000, torch.full((8,), 0.25), atol=0.03)


def test_random_ignores_the_losses_entirely():
    a = RandomPolicy(0.5).select(torch.arange(20.0), torch.Generator().manual_seed(5))
    b = RandomPolicy(0.5).select(-torch.arange(20.0), torch.Generator().manual_seed(5))
    assert torch.equal(a.rows, b.rows)


# ---------------------------------------------------------------- threshold: probabilities


def test_threshold_probabilities_are_the_strict_cdf_to_the_power_beta():
    history = torch.tensor([1.0, 2.0, 2.0, 2.0, 5.0])
    losses = torch.tensor([0.5, 1.0, 2.0, 3.0, 9.0])
    # F(L) with strict <: 0, 0, 1/5, 4/5, 1
    assert threshold_probabilities(losses, history, 1.0).tolist() == pytest.approx([0, 0, 0.2, 0.8, 1.0])
    assert threshold_probabilities(losses, history, 2.0).tolist() == pytest.approx([0, 0, 0.04, 0.64, 1.0])
    assert threshold_probabilities(losses, history, 0.0).tolist() == [1.0] * 5
    assert threshold_probabilities(losses, history, 1.0).dtype == torch.float64


def test_threshold_defaults():
    policy = ThresholdPolicy(0.25)
    assert policy.beta == pytest.approx(3.0)
    assert policy.history_size == 1024
    assert policy.exact is True and policy.count(10) == 2
    assert "count='exact'" in repr(policy)
    bernoulli = ThresholdPolicy(0.25, count="bernoulli")
    assert bernoulli.exact is False and bernoulli.count(10) == 10
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        policy.select(torch.rand(64, generator=gen), gen)
    assert policy.state_dict()["history"].numel() == 1024


# ---------------------------------------------------------------- threshold: exact draw


def test_threshold_exact_first_draw_is_proportional_to_the_probabilities():
    history = torch.arange(10.0)  # F(5) = 0.5, F(8) = 0.8
    gen = torch.Generator().manual_seed(0)
    losses = torch.tensor([5.0, 8.0])
    picks = torch.cat([threshold_select(losses, history, 1.0, gen, k=1) for _ in range(8000)])
    assert (picks == 1).float().mean().item() == pytest.approx(0.8 / 1.3, abs=0.02)


def test_threshold_exact_inclusion_matches_draws_without_replacement():
    history = torch.arange(10.0)
    losses = torch.tensor([2.0, 9.0, 4.0, 6.0])  # F = 0.2, 0.9, 0.4, 0.6; beta=1
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    trials = 12000
    for _ in range(trials):
        counts[threshold_select(losses, history, 1.0, gen, k=2)] += 1
    expected = torch.tensor(_inclusion_without_replacement([0.2, 0.9, 0.4, 0.6]))
    assert torch.allclose(counts / trials, expected.float(), atol=0.015)


def test_threshold_exact_prefers_high_losses():
    gen = torch.Generator().manual_seed(2)
    policy = ThresholdPolicy(0.25)
    for _ in range(20):  # a history of typical losses, so every batch loss has 0 < F < 1 mostly
        policy.select(torch.rand(64, generator=gen), gen)
    highest = lowest = 0
    for _ in range(300):
        losses = torch.rand(32, generator=gen)
        rows = policy.select(losses, gen).rows.tolist()
        highest += int(losses.argmax()) in rows
        lowest += int(losses.argmin()) in rows
    assert highest > 20 * max(lowest, 1)
    assert highest > 150
    rates = _quartile_frequencies(ThresholdPolicy(0.25).select, trials=200)
    assert rates[0] < rates[1] < rates[2] < rates[3]
    assert rates.mean() == pytest.approx(0.25)


def test_threshold_exact_takes_zero_probability_rows_only_when_it_must_and_uniformly():
    losses = torch.tensor([0.0, 0.0, 0.0, 5.0, 6.0])  # as the history: F = 0, 0, 0, 3/5, 4/5
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(5)
    for _ in range(3000):
        rows = threshold_select(losses, losses, 1.0, gen, k=3)
        assert rows.numel() == 3 and {3, 4} <= set(rows.tolist())
        counts[rows] += 1
    assert torch.allclose(counts[:3] / 3000, torch.full((3,), 1 / 3), atol=0.03)
    ties = torch.full((6,), 2.0)  # every F is 0: the draw is uniform and never fails
    assert threshold_select(ties, ties, 1.0, gen, k=4).unique().numel() == 4


def test_threshold_exact_still_prefers_high_losses_when_every_probability_is_tiny():
    # F ** 200 is ~1e-61 and ~1e-45 here: a probability floor would flatten them, the draw must not
    history = torch.arange(10.0)
    gen = torch.Generator().manual_seed(4)
    picks = [int(threshold_select(torch.tensor([5.0, 6.0]), history, 200.0, gen, k=1)) for _ in range(500)]
    assert picks.count(1) == 500


def test_threshold_exact_never_keeps_the_lowest_loss_of_a_fresh_history():
    gen = torch.Generator().manual_seed(0)
    for count in ("exact", "bernoulli"):
        kept = []
        for _ in range(100):
            policy = ThresholdPolicy(0.5, count=count)
            kept += policy.select(torch.tensor([3.0, -1.0, 2.0]), gen).rows.tolist()
        assert kept.count(1) == 0, "the lowest loss has F(L) = 0, so it is never kept"
        assert kept.count(0) > 30 and kept.count(2) > 5, "the others are kept by F(L) ** beta"


# ---------------------------------------------------------------- threshold: bernoulli draw


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.8])
def test_threshold_bernoulli_keeps_about_keep_overall(keep):
    policy = ThresholdPolicy(keep, count="bernoulli")
    gen = torch.Generator().manual_seed(11)
    kept = total = 0
    sizes = set()
    for _ in range(200):
        losses = torch.randn(32, generator=gen)
        n_kept = policy.select(losses, gen).rows.numel()
        kept, total = kept + n_kept, total + 32
        sizes.add(n_kept)
    assert kept / total == pytest.approx(keep, abs=0.03)
    assert len(sizes) > 3, "independent draws: the count varies from batch to batch"


def test_threshold_bernoulli_beta_is_settable_and_sets_the_selectivity():
    policy = ThresholdPolicy(0.5, beta=3.0, count="bernoulli")  # 1 / (beta + 1) = 0.25
    gen = torch.Generator().manual_seed(4)
    kept = sum(policy.select(torch.rand(32, generator=gen), gen).rows.numel() for _ in range(200))
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
            policy = ThresholdPolicy(0.5, history_size=history_size, count="bernoulli")
            policy.select(torch.zeros(4), gen)
            hits += 0 in policy.select(torch.tensor([1.0, 2.0, 3.0, 4.0]), gen).rows.tolist()
        return hits

    assert kept_lowest(4) == 0
    assert kept_lowest(1024) > 100  # F(1.0) = 4/8, beta = 1: kept about half the time


def test_threshold_bernoulli_cdf_uses_strictly_lower_losses():
    gen = torch.Generator().manual_seed(0)
    ties = torch.full((5,), 2.0)
    for _ in range(50):  # F(L) = 0 with strict <, so nothing is kept
        assert threshold_select(ties, ties.clone(), beta=1.0, generator=gen).numel() == 0
    history = torch.tensor([1.0, 2.0, 2.0, 2.0])  # F(2.0) = 1/4 with strict < (1 with <=)
    hits = sum(threshold_select(torch.tensor([2.0]), history, 1.0, gen).numel() for _ in range(4000))
    assert hits / 4000 == pytest.approx(0.25, abs=0.03)


def test_threshold_bernoulli_keep_probability_is_cdf_to_the_power_beta():
    history = torch.arange(10.0)  # F(5.0) = 5/10
    gen = torch.Generator().manual_seed(9)
    for beta, expected in [(1.0, 0.5), (2.0, 0.25), (0.0, 1.0)]:
        hits = sum(threshold_select(torch.tensor([5.0]), history, beta, gen).numel() for _ in range(4000))
        assert hits / 4000 == pytest.approx(expected, abs=0.03)


# ---------------------------------------------------------------- infobatch: exact


def test_infobatch_exact_keeps_every_above_mean_row_when_they_fit_and_weights_the_rest():
    losses = torch.tensor([9.0, 1.0, 2.0, 8.0, 0.5, 1.5, 7.0, 0.0, 3.0, 0.2])  # mean 3.22
    gen = torch.Generator().manual_seed(0)
    high = {0, 3, 6}  # 7 rows below the mean; k = 5 -> 2 of them, weighted 7 / 2
    seen_low = set()
    for _ in range(200):
        rows, weights = infobatch_select(losses, float(losses.double().mean()), 5, gen)
        assert rows.numel() == 5 and high <= set(rows.tolist())
        assert weights.dtype == torch.float32
        expected = [1.0 if r in high else 3.5 for r in rows.tolist()]
        assert weights.tolist() == expected
        seen_low |= set(rows.tolist()) - high
    assert seen_low == set(range(10)) - high, "every below-mean row gets its chance"


def test_infobatch_exact_keeps_a_uniform_k_of_the_above_mean_rows_when_they_do_not_fit():
    losses = torch.tensor([5.0, 5.0, 6.0, 7.0, 5.5, 0.0])  # mean 4.75: 5 rows at or above it
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(6)
    for _ in range(3000):
        rows, weights = infobatch_select(losses, 4.75, 2, gen)
        assert rows.numel() == 2 and 5 not in rows.tolist()
        assert weights.tolist() == [2.5, 2.5]  # |H| / k
        counts[rows] += 1
    assert torch.allclose(counts[:5] / 3000, torch.full((5,), 0.4), atol=0.03)


def test_infobatch_exact_counts_rows_at_the_mean_as_high():
    rows, weights = infobatch_select(torch.tensor([1.0, 2.0, 3.0]), 2.0, 2, torch.Generator())
    assert rows.tolist() == [1, 2] and weights.tolist() == [1.0, 1.0]


def test_infobatch_exact_weighted_sum_is_unbiased_for_the_batch_sum():
    gen = torch.Generator().manual_seed(2)
    losses = torch.tensor([9.0, 7.5, 0.3, 1.2, 0.8, 2.0, 0.1, 1.7, 0.5, 3.1, 0.05, 1.1])
    mean = float(losses.mean())  # 2.28: three rows at or above it
    k = 6  # all 3 high rows plus 3 of the 9 low ones, each weighted 3
    assert int((losses >= mean).sum()) == 3, "the case that draws from below the mean"
    estimates = []
    for _ in range(4000):
        rows, weights = infobatch_select(losses, mean, k, gen)
        estimates.append(float((weights.double() * losses.double()[rows]).sum()))
    estimates = torch.tensor(estimates)
    assert estimates.mean().item() == pytest.approx(float(losses.sum()), rel=0.01)
    assert estimates.std().item() > 0  # it is a random estimate, not a constant


def test_infobatch_policy_exact_is_unbiased_with_a_fixed_history():
    # (when at least k rows are at or above the mean, the estimate is of their sum alone)
    gen = torch.Generator().manual_seed(3)
    policy = InfoBatchPolicy(0.5, history_size=4096)
    policy.select(torch.rand(2000, generator=gen) * 4, gen)  # a history with mean about 2
    state = policy.state_dict()
    losses = torch.cat([torch.arange(14) / 10, torch.tensor([3.0, 3.5])])  # 2 of 16 above the mean
    totals = []
    for _ in range(3000):
        policy.load_state_dict(state)
        rows, weights = policy.select(losses, gen)
        assert rows.numel() == 8
        totals.append(float((weights.double() * losses.double()[rows]).sum()))
    assert sum(totals) / len(totals) == pytest.approx(float(losses.sum()), rel=0.02)


def test_infobatch_exact_uses_the_running_mean_of_the_history():
    policy = InfoBatchPolicy(0.5, history_size=1000)
    gen = torch.Generator().manual_seed(4)
    policy.select(torch.full((996,), 10.0), gen)  # the dataset's losses are about 10
    batch = torch.tensor([0.0, 1.0, 11.0, 12.0])  # only the two above 10 are at or above the mean
    rows, weights = policy.select(batch, gen)
    assert rows.tolist() == [2, 3] and weights.tolist() == [1.0, 1.0]
    assert policy.state_dict()["history"].numel() == 1000


# ---------------------------------------------------------------- infobatch: bernoulli


def test_infobatch_bernoulli_prunes_below_the_running_mean_and_reweights_the_survivors():
    policy = InfoBatchPolicy(prune=0.5, history_size=1000, count="bernoulli")
    assert policy.exact is False and policy.count(7) == 7
    gen = torch.Generator().manual_seed(0)
    policy.select(torch.full((500,), 10.0), gen)  # history: the dataset's losses are about 10
    low = torch.linspace(0.0, 1.0, 400)  # a whole batch below the running mean
    rows, weights = policy.select(low, gen)
    assert 0.35 < rows.numel() / 400 < 0.65, "about half of the below-mean examples dropped"
    assert torch.all(weights == 2.0), "survivors weighted 1 / (1 - prune)"
    rows, weights = policy.select(torch.full((100,), 50.0), gen)
    assert rows.numel() == 100, "above-mean examples are always kept"
    assert torch.all(weights == 1.0)


def test_infobatch_bernoulli_prune_defaults_to_one_minus_keep():
    assert InfoBatchPolicy(0.3, count="bernoulli").prune == pytest.approx(0.7)
    assert InfoBatchPolicy(0.3).prune is None


def test_infobatch_prune_select_weights_are_unbiased():
    gen = torch.Generator().manual_seed(5)
    losses = torch.rand(20, generator=gen) * 4
    mean = float(losses.mean())
    totals = []
    for _ in range(3000):
        rows, weights = infobatch_prune_select(losses, mean, 0.6, gen)
        totals.append(float((weights.double() * losses.double()[rows]).sum()))
    assert sum(totals) / len(totals) == pytest.approx(float(losses.sum()), rel=0.02)


# ---------------------------------------------------------------- stateful select_many and state


@pytest.mark.parametrize("name", ["threshold", "threshold-bernoulli", "infobatch", "infobatch-bernoulli"])
def test_select_many_on_a_stateful_policy_equals_select_in_order(name):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(n, generator=gen) * (i + 1) for i, n in enumerate([16, 16, 7, 16, 3])]
    one, other = BUILT_INS[name](0.5), BUILT_INS[name](0.5)
    one.history_size = other.history_size = 20  # short: the order of the batches matters
    together = one.select_many(batches, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    apart = [other.select(b, g) for b in batches]
    for a, b in zip(together, apart):
        assert torch.equal(a.rows, b.rows)
        assert (a.weights is None and b.weights is None) or torch.equal(a.weights, b.weights)
    assert torch.equal(one.state_dict()["history"], other.state_dict()["history"])


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_a_state_dict_round_trip_reproduces_the_next_selection(name):
    gen = torch.Generator().manual_seed(0)
    policy = BUILT_INS[name](0.4)
    for _ in range(5):
        policy.select(torch.randn(24, generator=gen), gen)
    state = policy.state_dict()
    restored = BUILT_INS[name](0.4)
    restored.load_state_dict(state)
    assert restored.state_dict().keys() == state.keys()
    losses = torch.randn(24, generator=gen) - 0.3
    a = policy.select(losses, torch.Generator().manual_seed(9))
    b = restored.select(losses, torch.Generator().manual_seed(9))
    assert torch.equal(a.rows, b.rows)
    assert (a.weights is None) == (b.weights is None)
    assert a.weights is None or torch.equal(a.weights, b.weights)
    for key, value in state.items():
        assert torch.equal(restored.state_dict()[key], policy.state_dict()[key]) or key != "history"
    if "history" in state:  # the restored policy carried the history (5 batches, then this one)
        assert torch.equal(restored.state_dict()["history"], policy.state_dict()["history"])
        assert restored.state_dict()["history"].numel() == 6 * 24


def test_state_dict_holds_a_copy_of_the_history():
    policy = ThresholdPolicy(0.5)
    policy.select(torch.tensor([1.0, 2.0]), torch.Generator())
    state = policy.state_dict()
    state["history"].zero_()
    assert policy.state_dict()["history"].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("cls", [ThresholdPolicy, InfoBatchPolicy])
def test_load_state_dict_rejects_a_state_without_a_history(cls):
    with pytest.raises(ValueError, match=r"needs a dict with a 'history' tensor.*state_dict\(\)"):
        cls(0.5).load_state_dict({})


# ---------------------------------------------------------------- the policy interface


def test_policy_names_map_to_their_classes():
    assert set(POLICIES) == {"rank", "threshold", "topk", "random", "infobatch", "infobatch-prune"}
    for name, cls in POLICIES.items():
        policy = make_policy(name, 0.5)
        assert type(policy) is (InfoBatchPolicy if name == "infobatch-prune" else cls) and policy.keep == 0.5
    prune = make_policy("infobatch-prune", 0.4)
    assert not prune.exact and prune.prune == pytest.approx(0.6) and prune.count(10) == 10
    custom = TopKPolicy(0.3)
    assert make_policy(custom, 0.5) is custom


def test_an_unknown_policy_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"policy must be one of \[.*'rank'.*'topk'.*\].*got policy='best'"):
        make_policy("best", 0.5)


def test_make_policy_names_every_missing_member_and_points_to_base_policy():
    with pytest.raises(TypeError) as info:
        make_policy(object(), 0.5)
    message = str(info.value)
    for member in ("exact", "reweights", "count", "select", "select_many", "state_dict", "load_state_dict"):
        assert member in message.split("lacks")[1]
    assert "subclass sbdata.policies.BasePolicy" in message

    class OldStyle:  # the interface before reweights and select_many were declared
        exact = True

        def count(self, n):
            return n

        def select(self, losses, generator):
            return Selection(torch.arange(losses.numel()), None)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    expected = r"got OldStyle, which lacks reweights, select_many; subclass sbdata\.policies\.BasePolicy"
    with pytest.raises(TypeError, match=expected):
        make_policy(OldStyle(), 0.5)


def test_make_policy_rejects_a_member_that_is_not_callable():
    class NotCallable(BasePolicy):
        select_many = None  # type: ignore[assignment]

        def count(self, n):
            return n

        def select(self, losses, generator):
            return Selection(torch.arange(losses.numel()), None)

    with pytest.raises(TypeError, match=r"lacks select_many;"):
        make_policy(NotCallable(), 0.5)


def test_base_policy_supplies_the_defaults_of_a_custom_policy():
    class EveryOther(BasePolicy):
        def __init__(self):
            self.calls = 0

        def count(self, n):
            return (n + 1) // 2

        def select(self, losses, generator):
            self.calls += 1
            return Selection(torch.arange(0, losses.numel(), 2), None)

    policy = make_policy(EveryOther(), 0.5)
    assert isinstance(policy, SelectionPolicy)
    assert policy.exact is True and policy.reweights is False
    assert policy.state_dict() == {}
    policy.load_state_dict({})
    selections = policy.select_many([torch.zeros(5), torch.zeros(2)], torch.Generator())
    assert [s.rows.tolist() for s in selections] == [[0, 2, 4], [0]] and policy.calls == 2
    assert repr(policy) == "EveryOther(calls=2)"


def test_base_policy_requires_count_and_select():
    class NoSelect(BasePolicy):
        def count(self, n):
            return n

    with pytest.raises(TypeError, match="select"):
        NoSelect()


def test_reprs_show_the_settings():
    assert repr(RankPolicy(0.5)) == "RankPolicy(keep=0.5)"
    assert repr(ThresholdPolicy(0.5, count="bernoulli")) == (
        "ThresholdPolicy(keep=0.5, beta=1.0, history_size=1024, count='bernoulli')"
    )
    assert repr(InfoBatchPolicy(0.5, prune=0.3, count="bernoulli")) == (
        "InfoBatchPolicy(keep=0.5, prune=0.3, history_size=4096, count='bernoulli')"
    )
    assert repr(InfoBatchPolicy()) == "InfoBatchPolicy(keep=0.5, history_size=4096, count='exact')"


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("cls", list(POLICIES.values()))
@pytest.mark.parametrize("keep", [0, -0.5, 1.5, True, "half", float("nan")])
def test_keep_must_be_a_fraction(cls, keep):
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\], got keep="):
        cls(keep)


def test_bad_threshold_settings_are_rejected():
    with pytest.raises(ValueError, match=r"history_size must be a positive integer, got history_size=0"):
        ThresholdPolicy(0.5, history_size=0)
    with pytest.raises(ValueError, match=r"beta must be >= 0, got beta=-1; omit it"):
        ThresholdPolicy(0.5, beta=-1)
    with pytest.raises(ValueError, match=r"beta must be finite, got beta=inf"):
        ThresholdPolicy(0.5, beta=float("inf"))
    with pytest.raises(TypeError, match=r"beta must be a number, got beta='2'"):
        ThresholdPolicy(0.5, beta="2")
    with pytest.raises(ValueError, match=r"count must be 'exact' or 'bernoulli', got count='fixed'"):
        ThresholdPolicy(0.5, count="fixed")


def test_bad_infobatch_settings_are_rejected():
    expected = r"prune applies only to count='bernoulli', got prune=0.3.*keep sets the kept fraction"
    with pytest.raises(ValueError, match=expected):
        InfoBatchPolicy(0.5, prune=0.3)
    with pytest.raises(ValueError, match=r"prune must be in \[0, 1\), got prune=1.0"):
        InfoBatchPolicy(prune=1.0, count="bernoulli")
    with pytest.raises(ValueError, match=r"count must be 'exact' or 'bernoulli', got count=None"):
        InfoBatchPolicy(count=None)
    with pytest.raises(ValueError, match=r"history_size must be a positive integer, got history_size=2.5"):
        InfoBatchPolicy(history_size=2.5)


def test_pure_draws_reject_a_bad_k():
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 3\].*got k=4"):
        threshold_select(torch.zeros(3), torch.zeros(3), 1.0, k=4)
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 3\].*got k=-1"):
        infobatch_select(torch.zeros(3), 0.0, -1)


def test_losses_must_be_a_tensor():
    with pytest.raises(TypeError, match=r"losses must be a torch.Tensor.*got list"):
        ThresholdPolicy(0.5).select([1.0, 2.0], torch.Generator())
