"""The schedule: selection only inside [start, end), and interrupt batches passed through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sbdata import SelectiveBatchLoader
from sbdata.schedule import is_interrupt_batch, selection_active, training_progress

from .conftest import consecutive_ids, id_loss, make_batch, topk_positions


def _tuple_batches(sizes):
    return [make_batch("tuple", ids) for ids in consecutive_ids(sizes)]


def _score_by_id(model, batch):
    return id_loss(batch[2])


def _expected_stream(batches, keep, batch_size, interrupt):
    """Reference model of one topk epoch with last_batch="yield": a list whose items are
    either a source batch (passed through) or a list of ids (a re-packed batch)."""
    stream, pending = [], []
    for i, batch in enumerate(batches):
        if interrupt and (i + 1) % interrupt == 0:
            stream.append(batch)
            continue
        ids = batch[2]
        pending += [int(ids[p]) for p in topk_positions(id_loss(ids).tolist(), keep)]
        while len(pending) >= batch_size:
            stream.append(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        stream.append(pending)
    return stream


def _assert_stream(yielded, expected):
    assert len(yielded) == len(expected)
    for got, want in zip(yielded, expected):
        if isinstance(want, list):
            assert got[2].tolist() == want
        else:
            assert got is want


# ---------------------------------------------------------------- pure schedule


def test_training_progress_is_epoch_over_epochs_and_zero_when_unknown():
    assert training_progress(3, 10) == pytest.approx(0.3)
    assert training_progress(0, 4) == 0.0
    assert training_progress(7, None) == 0.0


def test_selection_is_active_on_the_half_open_interval_start_to_end():
    assert selection_active(0.5, 0.5, 0.9)
    assert selection_active(0.89, 0.5, 0.9)
    assert not selection_active(0.9, 0.5, 0.9)
    assert not selection_active(0.49, 0.5, 0.9)


def test_interrupt_batches_are_those_with_batch_idx_plus_one_divisible_by_interrupt():
    assert [i for i in range(9) if is_interrupt_batch(i, 3)] == [2, 5, 8]
    assert [i for i in range(5) if is_interrupt_batch(i, 2)] == [1, 3]
    assert not any(is_interrupt_batch(i, 0) for i in range(10))


# ---------------------------------------------------------------- through the loader


def test_epochs_outside_start_end_yield_the_source_batches_themselves():
    batches = _tuple_batches([4, 4, 4, 3])
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.5, policy="topk", score_fn=_score_by_id,
        batch_size=4, epochs=10, start=0.5, end=0.9,
    )
    for epoch in range(10):
        n_batches = len(sb) if epoch else None
        yielded = list(sb)
        if n_batches is not None:
            assert n_batches == len(yielded)
        active = 5 <= epoch <= 8  # progress 0.5, 0.6, 0.7, 0.8
        if active:
            _assert_stream(yielded, _expected_stream(batches, 0.5, 4, 0))
            assert sb.stats.history[-1].scored == 15
        else:
            assert len(yielded) == len(batches)
            assert all(got is src for got, src in zip(yielded, batches))
            assert sb.stats.history[-1].scored == 0
            assert sb.stats.history[-1].mode == "plain"


def test_set_epoch_moves_the_schedule():
    batches = _tuple_batches([4, 4])
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.5, policy="topk", score_fn=_score_by_id,
        batch_size=4, epochs=4, start=0.0, end=0.5,
    )
    sb.set_epoch(2)
    assert sb.epoch == 2
    assert all(a is b for a, b in zip(list(sb), batches))
    assert sb.epoch == 3
    sb.set_epoch(1)
    (out,) = list(sb)
    assert out[2].tolist() == _expected_stream(batches, 0.5, 4, 0)[0]


def test_keep_one_passes_every_batch_through():
    batches = _tuple_batches([5, 5, 2])
    calls = []
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=1.0, score_fn=lambda m, b: calls.append(b) or id_loss(b[2]),
        batch_size=5,
    )
    yielded = list(sb)
    assert len(yielded) == 3 and all(a is b for a, b in zip(yielded, batches))
    assert calls == []


@pytest.mark.parametrize("interrupt", [2, 3])
def test_interrupt_batches_pass_through_unchanged_at_their_position(interrupt):
    batches = _tuple_batches([6, 6, 6, 6, 6, 6, 6, 4])
    before = [tuple(t.clone() for t in b) for b in batches]
    scored = []

    def score(model, batch):
        scored.append(batch[2].clone())
        return id_loss(batch[2])

    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.5, policy="topk", score_fn=score,
        batch_size=4, interrupt=interrupt,
    )
    for _ in range(2):  # the interrupt count restarts every epoch
        scored.clear()
        yielded = list(sb)
        _assert_stream(yielded, _expected_stream(batches, 0.5, 4, interrupt))
        passed = [b for b in yielded if any(b is src for src in batches)]
        assert [b[2][0].item() for b in passed] == [
            batches[i][2][0].item() for i in range(len(batches)) if (i + 1) % interrupt == 0
        ]
        # interrupt batches are never scored, the others always are
        assert [s[0].item() for s in scored] == [
            batches[i][2][0].item() for i in range(len(batches)) if (i + 1) % interrupt != 0
        ]
    for src, copy in zip(batches, before):  # nothing was modified in place
        assert all(torch.equal(a, b) for a, b in zip(src, copy))


def test_len_counts_interrupt_batches_and_repacked_batches():
    batches = _tuple_batches([6] * 7 + [4])
    sb = SelectiveBatchLoader(
        batches, nn.Identity(), keep=0.5, policy="topk", score_fn=_score_by_id,
        batch_size=4, interrupt=3,
    )
    list(sb)
    expected = _expected_stream(batches, 0.5, 4, 3)
    assert len(sb) == len(expected) == len(list(sb))
