"""The selection log behind ``selection_report``: exact per-id counts and a fair, bounded sample."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from sbdata import SelectiveBatchLoader
from sbdata.cache import grown
from sbdata.stats import SelectionLog

from .conftest import Echo, IndexedPairs, id_loss, loss_from_x


def test_counts_how_often_each_id_was_a_candidate_and_how_often_it_was_kept():
    log = SelectionLog()
    log.observe(0, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2]), torch.tensor([10, 11, 12]))
    log.observe(1, torch.tensor([5.0, 4.0]), torch.tensor([0, 1]), torch.tensor([12, 3]))
    for _ in range(300):  # past the fold threshold: queued counts are folded in on the way
        log.observe(2, torch.tensor([0.0]), torch.tensor([0]), torch.tensor([7]))
    candidates, kept = log.candidates, log.kept
    assert candidates[[3, 7, 10, 11, 12]].tolist() == [1, 300, 1, 1, 2]
    assert kept[[3, 7, 10, 11, 12]].tolist() == [1, 300, 0, 0, 2]
    assert int(candidates.sum()) == 305 and int(kept.sum()) == 303
    assert sorted(log.selection_frequency().tolist()) == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_without_ids_only_the_sample_is_kept():
    log = SelectionLog()
    log.observe(0, torch.tensor([1.0, 2.0]), torch.tensor([1]), None)
    losses, chosen, seen = log.samples[0]
    assert losses.tolist() == [1.0, 2.0] and chosen.tolist() == [False, True] and seen == 2
    assert log.selection_frequency().numel() == 0


def test_the_sample_is_bounded_and_every_batch_is_about_equally_likely_to_be_in_it():
    log = SelectionLog(max_samples=256, seed=0)
    for b in range(2000):  # losses of batch b are all b, the first of each batch is kept
        log.observe(0, torch.full((16,), float(b)), torch.tensor([0]), None)
    losses, chosen, seen = log.samples[0]
    assert seen == 32000 and losses.numel() == 256
    assert int(chosen.sum()) == 16  # one kept row per sampled batch, with its own loss
    # uniform over batches 0..1999: mean 999.5, sd of the mean of 16 batches ~ 577/4 = 144
    assert abs(float(losses.unique().mean()) - 999.5) < 3 * 144
    assert float(losses.max()) > 1000  # late batches do replace early ones


def test_one_large_observation_is_subsampled_to_max_samples():
    log = SelectionLog(max_samples=100)
    losses = torch.arange(1000.0)
    log.observe(3, losses, torch.arange(500, 1000), torch.arange(1000))
    sample, chosen, seen = log.samples[3]
    assert sample.numel() == 100 and seen == 1000
    assert torch.equal(chosen, sample >= 500)  # kept flags travel with their losses
    assert int(log.kept.sum()) == 500


def test_state_dict_round_trips_and_the_restored_log_continues_identically():
    def feed(log, epochs):
        for e in epochs:
            for b in range(50):
                ids = torch.arange(b * 8, b * 8 + 8)
                log.observe(e, ids.float() * (e + 1), torch.tensor([1, 5]), ids)

    a = SelectionLog(max_samples=64, seed=3)
    feed(a, [0])
    b = SelectionLog(max_samples=64, seed=99)
    b.load_state_dict(a.state_dict())
    feed(a, [1])
    feed(b, [1])
    for epoch in (0, 1):
        assert all(torch.equal(x, y) for x, y in zip(a.samples[epoch][:2], b.samples[epoch][:2]))
    assert torch.equal(a.candidates, b.candidates) and torch.equal(a.kept, b.kept)


def test_logging_uses_its_own_generator_only():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    log = SelectionLog(max_samples=8)
    for b in range(100):
        log.observe(0, torch.rand(4, generator=torch.Generator().manual_seed(b)), torch.tensor([0]), torch.arange(4))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("stale", [None, 2])
def test_the_loader_logs_every_candidate_and_every_kept_example(stale):
    n = 64
    loader = DataLoader(IndexedPairs(n), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    sb = SelectiveBatchLoader(loader, Echo(), keep=0.5, loss_fn=loss_from_x, index_key=2, stale=stale)
    yielded = []
    for _ in range(2):  # stale=2: a fresh epoch (scored batch by batch), then a planned one
        yielded += [batch[2] for batch in sb]
    assert [s.mode for s in sb.stats.history] == (["fresh", "fresh"] if stale is None else ["fresh", "stale"])
    assert sb.selection_log.candidates[:n].tolist() == [2] * n
    assert torch.equal(sb.selection_log.kept[:n], torch.bincount(torch.cat(yielded), minlength=n).int())
    assert set(sb.selection_log.samples) == {0, 1}
    for losses, chosen, seen in sb.selection_log.samples.values():
        assert seen == n and int(chosen.sum()) == n // 2
        assert torch.equal(torch.sort(losses).values, torch.sort(id_loss(torch.arange(n)).float()).values)


def test_grown_keeps_the_contents_and_at_least_doubles():
    t = torch.arange(5, dtype=torch.int32)
    assert grown(t, 5) is t
    g = grown(t, 6, fill=-1)
    assert g.numel() >= 1024 and g[:5].tolist() == [0, 1, 2, 3, 4] and bool((g[5:] == -1).all())
    assert grown(g, 3000).numel() == 3000


def test_selection_report_draws_the_logged_selection(tmp_path):
    pytest.importorskip("matplotlib")
    from sbdata.plot import selection_report

    loader = DataLoader(IndexedPairs(64), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    sb = SelectiveBatchLoader(loader, Echo(), keep=0.5, loss_fn=loss_from_x, index_key=2, stale=2)
    for _ in range(3):
        list(sb)
    fig = selection_report(sb, tmp_path / "report.png")
    loss_panel, frequency_panel = fig.axes[0], fig.axes[1]
    assert loss_panel.get_title() == "losses in epoch 2"
    assert sum(p.get_height() for p in loss_panel.patches) == 64  # the whole epoch was sampled
    assert sum(p.get_height() for p in frequency_panel.patches) == 64  # one bar count per example
    assert (tmp_path / "report.png").stat().st_size > 0
