"""Stale mode: a per-example loss cache, and stale epochs that never load what they skip."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from sbdata import InfoBatchPolicy, LossCache, SelectiveBatchLoader
from sbdata.sources.dataloader import epoch_order_generator

from .conftest import Echo, IndexedPairs, id_loss, loss_from_x

N = 96


def make(loader, **kw):
    scorer = Echo()
    kw.setdefault("keep", 0.5)
    kw.setdefault("stale", 3)
    kw.setdefault("loss_fn", loss_from_x)
    kw.setdefault("policy", "topk")
    return SelectiveBatchLoader(loader, scorer, **kw), scorer


def run_epoch(sb):
    ids = []
    sizes = []
    expected = len(sb)
    for x, y, idx in sb:
        assert torch.equal(x[:, 0].long(), idx), "rows and their ids must stay paired"
        ids += idx.tolist()
        sizes.append(len(idx))
    assert len(sizes) == expected
    return ids, sizes


def test_rescoring_epochs_load_and_score_everything_stale_epochs_neither():
    ds = IndexedPairs(N)
    sb, scorer = make(DataLoader(ds, batch_size=8, shuffle=True))
    assert [sb.mode(e) for e in range(6)] == ["fresh", "stale", "stale", "fresh", "stale", "stale"]
    for epoch in range(6):
        ds.loads.zero_()
        calls = scorer.calls
        ids, sizes = run_epoch(sb)
        stats = sb.stats.history[-1]
        if epoch % 3 == 0:
            assert int(ds.loads.sum()) == N and stats.scored == N
            assert scorer.calls - calls == N // 8
        else:
            assert scorer.calls == calls, "the scorer must not run in a stale epoch"
            assert int(ds.loads.sum()) <= 0.5 * N + 8
            assert stats.scored == 0 and stats.loads_skipped == N - int(ds.loads.sum())
        assert len(ids) == len(set(ids)) == N // 2, "each selected example once per epoch"
        assert all(s == 8 for s in sizes)


def test_stale_selection_follows_the_cached_losses():
    ds = IndexedPairs(N)
    sb, _ = make(DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)))
    run_epoch(sb)  # fresh: fills the cache
    cached, known = sb.cache.lookup(torch.arange(N))
    assert bool(known.all()) and torch.equal(cached, id_loss(torch.arange(N)))
    ids, _ = run_epoch(sb)  # stale: topk of each sampler batch by cached loss
    chosen = torch.tensor(ids)
    assert id_loss(chosen).mean() > id_loss(torch.arange(N)).mean() + 15


def test_stale_epochs_follow_the_users_sampler_order_and_batches():
    ds = IndexedPairs(N)
    sampler_gen = torch.Generator().manual_seed(5)
    loader = DataLoader(ds, batch_size=8, shuffle=True, generator=sampler_gen)
    sb, _ = make(loader)
    run_epoch(sb)
    # Predict the stale epoch: the user's sampler, drawing epoch 1 from a generator seeded by
    # its own seed and the epoch (NOTE [ Orders that resume ] in sbdata/sources/dataloader.py).
    state = sampler_gen.get_state()
    loader.sampler.generator = epoch_order_generator(5, 1)
    order = [torch.tensor(b) for b in loader.batch_sampler]
    loader.sampler.generator = sampler_gen
    expected = []
    for b in order:
        top = torch.sort(torch.argsort(id_loss(b), descending=True, stable=True)[:4]).values
        expected += b[top].tolist()
    ids, _ = run_epoch(sb)
    assert ids == expected
    assert torch.equal(sampler_gen.get_state(), state), "the user's generator is never drawn from"


def _orders(seed_global: int, generator_seed: int | None) -> list[list[int]]:
    torch.manual_seed(seed_global)
    generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    sb, _ = make(DataLoader(IndexedPairs(N), batch_size=8, shuffle=True, generator=generator))
    return [run_epoch(sb)[0] for _ in range(2)]


def test_shuffled_orders_follow_the_users_seed_and_differ_between_epochs():
    first, second = _orders(0, None)
    assert first != second, "every epoch draws a new order"
    assert _orders(0, None) == [first, second], "the same torch.manual_seed gives the same orders"
    assert _orders(1, None) != [first, second], "another torch.manual_seed gives other orders"
    assert _orders(0, 7) == _orders(1, 7) != _orders(0, 8), "a loader generator's seed decides alone"


@pytest.mark.parametrize("persistent", [False, True])
def test_stale_mode_with_two_workers_keeps_ids_paired(persistent):
    ds = IndexedPairs(N)
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, persistent_workers=persistent)
    sb, scorer = make(loader)
    for epoch in range(3):
        ds.loads.zero_()
        ids, sizes = run_epoch(sb)
        assert len(ids) == len(set(ids)) == N // 2
        if epoch == 0:
            cached, _ = sb.cache.lookup(torch.arange(N))
            assert torch.equal(cached, id_loss(torch.arange(N))), "losses stored under the wrong ids"
        else:
            assert int(ds.loads.sum()) <= 0.5 * N + 8
    assert scorer.calls == N // 8


def test_record_updates_the_cache_and_needs_no_scoring_after_the_first_epoch():
    ds = IndexedPairs(N)
    sb, scorer = make(DataLoader(ds, batch_size=8, shuffle=True), stale=100)
    for epoch in range(4):
        for x, y, idx in sb:
            sb.record(torch.full((len(idx),), 1000.0 + epoch))
    assert scorer.calls == N // 8, "only the first epoch scores"
    losses, _ = sb.cache.lookup(torch.arange(N))
    assert (losses >= 1000).sum() > N // 2, "recorded training losses reach the cache"
    assert sb.stats.history[-1].recorded == N // 2


def test_record_rejects_bad_losses():
    sb, _ = make(DataLoader(IndexedPairs(N), batch_size=8))
    with pytest.raises(RuntimeError, match="record"):
        sb.record(torch.zeros(8))
    it = iter(sb)
    x, y, idx = next(it)
    with pytest.raises(ValueError, match=r"shape \[8\]"):
        sb.record(torch.zeros(7))
    with pytest.raises(ValueError, match="non-finite"):
        sb.record(torch.tensor([float("nan")] + [0.0] * 7))
    sb.record(torch.zeros(8))
    with pytest.raises(RuntimeError, match="more times than batches were yielded"):
        sb.record(torch.zeros(8))


def test_a_loader_without_ids_is_refused_with_the_fix():
    batches = [(torch.randn(4, 2), torch.randint(0, 2, (4,))) for _ in range(3)]
    with pytest.raises(ValueError, match="index_key"):
        SelectiveBatchLoader(batches, nn.Linear(2, 2), keep=0.5, stale=2, batch_size=4)


def test_batches_that_carry_ids_skip_scoring_in_stale_epochs_even_when_loading_cannot_be_filtered():
    ids = torch.randperm(40)
    batches = [(ids[i : i + 8].float()[:, None].repeat(1, 2), ids[i : i + 8] % 3, ids[i : i + 8]) for i in range(0, 40, 8)]
    sb, scorer = make(batches, index_key=2, batch_size=8)
    run_epoch(sb)
    assert scorer.calls == 5
    got, _ = run_epoch(sb)
    assert scorer.calls == 5, "stale epochs use the cache instead of scoring"
    assert sb.stats.history[-1].loaded == 40 and sb.stats.history[-1].scored == 0
    assert len(got) == 20


def test_len_is_exact_in_stale_epochs_with_a_short_last_batch_and_interrupts():
    ds = IndexedPairs(90)
    for last_batch in ("yield", "drop", "carry"):
        sb, _ = make(DataLoader(ds, batch_size=8, shuffle=True), policy="rank", interrupt=3, last_batch=last_batch)
        for _ in range(4):
            expected = len(sb)
            assert sum(1 for _ in sb) == expected


def test_set_epoch_reaches_the_users_distributed_sampler():
    ds = IndexedPairs(N)
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=3)
    sb, _ = make(DataLoader(ds, batch_size=8, sampler=sampler))
    orders = []
    for epoch in range(2):
        sb.set_epoch(epoch + 5)
        run_epoch(sb)
        orders.append(sampler.epoch)
    assert orders == [5, 6]


def test_in_order_false_is_turned_back_on_with_a_warning():
    loader = DataLoader(IndexedPairs(N), batch_size=8, num_workers=2, in_order=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb, _ = make(loader)
    assert any("in_order" in str(w.message) for w in caught)
    assert sb._source.loader.in_order is True
    run_epoch(sb)
    cached, _ = sb.cache.lookup(torch.arange(N))
    assert torch.equal(cached, id_loss(torch.arange(N)))


def test_the_rebuilt_loader_keeps_the_users_arguments():
    def collate(items):
        xs, ys, ids = zip(*items)
        return torch.stack(xs), torch.tensor(ys), torch.tensor(ids)

    def init(worker_id):
        torch.manual_seed(worker_id)

    loader = DataLoader(
        IndexedPairs(N), batch_size=8, num_workers=2, collate_fn=collate, worker_init_fn=init,
        prefetch_factor=3, persistent_workers=True, timeout=30,
    )
    sb, _ = make(loader)
    rebuilt = sb._source.loader
    for name in ("num_workers", "collate_fn", "worker_init_fn", "prefetch_factor", "persistent_workers", "timeout"):
        assert getattr(rebuilt, name) == getattr(loader, name), name
    assert sb.loader is loader


def test_loss_cache_uses_eight_bytes_per_example_and_grows_on_demand():
    cache = LossCache(100)
    assert cache.nbytes == 800
    cache.update(torch.tensor([5000]), torch.tensor([2.5]), epoch=3)
    losses, known = cache.lookup(torch.tensor([5000, 4999, 10**6]))
    assert losses[0] == 2.5 and known.tolist() == [True, False, False]
    assert cache.measured_epoch(torch.tensor([5000])).item() == 3
    with pytest.raises(TypeError, match="integers"):
        cache.update(torch.tensor([1.0]), torch.tensor([1.0]), epoch=0)


def test_a_due_rescoring_is_skipped_when_record_kept_every_loss_recent():
    ds = IndexedPairs(N)
    sb, scorer = make(DataLoader(ds, batch_size=8, shuffle=True), stale=3, epochs=8, start=0.25)
    modes = []
    for epoch in range(8):
        modes.append(sb.mode())
        for x, y, idx in sb:
            sb.record(id_loss(idx).float())
    # Warm-up epochs 0-1 train on (and record) everything, so epoch 2 needs no scoring pass.
    # Afterwards only selected examples are recorded: the rest age, and epoch 5 rescores.
    assert modes == ["plain", "plain", "stale", "stale", "stale", "fresh", "stale", "stale"]
    assert scorer.calls == N // 8


def test_without_record_every_nth_epoch_rescores():
    sb, scorer = make(DataLoader(IndexedPairs(N), batch_size=8), stale=2)
    assert [sb.mode(e) for e in range(4)] == ["fresh", "stale", "fresh", "stale"]
    for _ in range(4):
        run_epoch(sb)
    assert [s.mode for s in sb.stats.history] == ["fresh", "stale", "fresh", "stale"]


def test_infobatch_weights_in_a_stale_epoch_use_the_running_mean_as_of_each_source_batch():
    # losses id + 1 in id order; the running mean grows batch by batch through the stale epoch,
    # so weighing every batch against the epoch's final mean would give other weights
    n, size = 64, 8
    loader = DataLoader(IndexedPairs(n), batch_size=size, shuffle=False)
    sb = SelectiveBatchLoader(
        loader, Echo(), keep=0.5, policy=InfoBatchPolicy(0.5, count="bernoulli"), stale=2, index_key=2,
        loss_fn=lambda out, y: out[:, 0].float() + 1,
    )  # fmt: skip
    list(sb)  # epoch 0: fresh, every batch scored in order
    seen = torch.arange(1, n + 1, dtype=torch.float64)  # the policy's history after epoch 0
    rows = 0
    for batch in sb:  # epoch 1: stale, planned from the cache
        weights = sb.record(torch.ones(len(batch[2])))  # the batch's weights times ones
        for i, w in zip(batch[2].tolist(), weights.tolist()):
            b = i // size  # source batch: the mean includes epoch 1's batches up to this one
            mean = float(torch.cat([seen, torch.arange(1, (b + 1) * size + 1, dtype=torch.float64)]).mean())
            assert w == (2.0 if i + 1 < mean else 1.0), (i, w, mean)
            rows += 1
    assert sb.stats.history[-1].mode == "stale" and rows > n // 2


def test_recency_is_kept_as_counts_not_found_by_a_scan(monkeypatch):
    g = torch.Generator().manual_seed(0)
    cache = LossCache(100)
    for epoch in range(6):
        ids = torch.randint(0, 100, (40,), generator=g)
        cache.update(ids, torch.rand(40, generator=g), epoch)
        measured = cache.measured_epoch(torch.arange(100))
        assert cache.known_count() == int((measured >= 0).sum())
        assert cache.oldest_epoch() == int(measured[measured >= 0].min())
    sb, _ = make(DataLoader(IndexedPairs(N), batch_size=8), stale=2)
    run_epoch(sb)
    monkeypatch.setattr(LossCache, "measured_epoch", lambda *a: (_ for _ in ()).throw(AssertionError("scanned")))
    assert [sb.mode(e) for e in range(1, 5)] == ["stale", "fresh", "stale", "fresh"]
    assert len(sb) == N // 2 // 8  # len() needs no scan either


def test_an_abandoned_fresh_epoch_leaves_no_made_up_losses_in_the_policy_history():
    sb, _ = make(DataLoader(IndexedPairs(N), batch_size=8, shuffle=True), stale=2, policy="threshold")
    for _ in sb:  # epoch 0 scores one batch, then the loop breaks
        break
    run_epoch(sb)  # epoch 1 is not due, but most examples were never measured: it rescores
    assert [s.mode for s in sb.stats.history] == ["fresh", "fresh"]
    history = sb.policy.state_dict()["history"]
    real = set(id_loss(torch.arange(N)).tolist())
    assert history.numel() > 0 and set(history.tolist()) <= real, "only measured losses enter the history"


def test_record_makes_rescoring_unnecessary_for_a_subset_sampler():
    from torch.utils.data import SubsetRandomSampler

    subset = list(range(0, N, 2))  # the sampler only ever draws half of the dataset
    loader = DataLoader(IndexedPairs(N), batch_size=8, sampler=SubsetRandomSampler(subset, generator=torch.Generator().manual_seed(0)))
    sb, scorer = make(loader, stale="once", epochs=4, start=0.5)
    for _ in range(4):
        for _, _, idx in sb:
            sb.record(id_loss(idx).float())  # the plain warm-up epochs measure the whole subset
    assert [s.mode for s in sb.stats.history] == ["plain", "plain", "stale", "stale"], "the first selective epoch needs no scoring"
    assert sum(s.scored for s in sb.stats.history) == 0 and scorer.calls == 0
