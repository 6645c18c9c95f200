"""The loader's contract inside the stacks people use (one test or more per failure the
iterator redesign fixed): read-ahead wrappers, loops that stop at len(), schedulers sized from
total_steps(), drop_last sources, one worker pool, frozen options, one device, one iterator."""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from sbdata import InfoBatchPolicy, SelectiveBatchLoader, ThresholdPolicy, recipe
from sbdata.recipes import RECIPES

from .conftest import Echo, IndexedPairs, id_loss, loss_from_x

N = 64
POLICIES = ["rank", "topk", "random", "threshold", "infobatch"]


def make(n: int = N, batch_size: int = 8, shuffle: bool = True, **kw) -> SelectiveBatchLoader:
    loader = DataLoader(IndexedPairs(n), batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(1))
    kw.setdefault("keep", 0.5)
    return SelectiveBatchLoader(loader, Echo(), loss_fn=loss_from_x, **kw)


class ReadAhead:
    """A wrapper that keeps ``ahead`` batches in flight, like timm's ``PrefetchLoader`` (1) or a
    CUDA-stream prefetcher with a deeper queue: it takes batch k + ahead from the loader before
    the loop has trained on batch k."""

    def __init__(self, loader, ahead: int) -> None:
        self.loader, self.ahead = loader, ahead

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        queue: collections.deque = collections.deque()
        for batch in self.loader:
            queue.append(batch)
            if len(queue) > self.ahead:
                yield queue.popleft()
        yield from queue


def train_ids_and_weights(sb, loader, epochs: int) -> list[tuple[list[int], list[float]]]:
    """A loop that records a known loss per example: ``record`` must store each on its own id
    and return it times that row's weight."""
    seen = []
    for _ in range(epochs):
        for _, _, ids in loader:
            losses = id_loss(ids).float()
            weighted = sb.record(losses)
            known, _ = sb.cache.lookup(ids)
            assert torch.equal(known, losses), "record() stored these losses on other example ids"
            seen.append((ids.tolist(), (weighted / losses).tolist()))
    return seen


@pytest.mark.parametrize("ahead", [1, 3])
@pytest.mark.parametrize("policy", ["infobatch", "rank"])
def test_a_wrapper_that_reads_ahead_pairs_every_loss_and_weight_with_its_own_batch(ahead, policy):
    reference = make(policy=policy, stale=2)
    expected = train_ids_and_weights(reference, reference, epochs=4)  # unambiguous: no read-ahead
    wrapped = make(policy=policy, stale=2)
    got = train_ids_and_weights(wrapped, ReadAhead(wrapped, ahead), epochs=4)
    assert got == expected
    if policy == "infobatch":
        assert any(w != 1.0 for _, ws in got for w in ws), "the test must see real weights"
    assert [s.mode for s in wrapped.stats.history] == ["fresh", "stale", "fresh", "stale"]


def test_batch_weights_under_read_ahead_is_an_error_that_names_record():
    sb = make(policy="infobatch")
    it = iter(ReadAhead(sb, 1))
    next(it)
    with pytest.raises(RuntimeError, match=r"batch_weights is ambiguous: 2 yielded batches.*sb.record\("):
        sb.batch_weights


def test_record_with_ids_pairs_by_ids_in_any_order():
    sb = make(policy="infobatch", stale=2)
    batches = list(itertools.islice(iter(sb), 3))
    for _, _, ids in reversed(batches):
        sb.record(id_loss(ids).float(), ids=ids)
    for _, _, ids in batches:
        assert torch.equal(sb.cache.lookup(ids)[0], id_loss(ids).float())
    with pytest.raises(ValueError, match=r"match no yielded, unrecorded batch"):
        sb.record(id_loss(batches[0][2]).float(), ids=batches[0][2])


def test_a_loop_that_begins_recording_later_pairs_from_that_epoch_on():
    sb = make(stale=2)
    list(sb)  # epoch 0: nothing recorded
    for _, _, ids in sb:
        sb.record(id_loss(ids).float())
        assert torch.equal(sb.cache.lookup(ids)[0], id_loss(ids).float())


def test_record_after_more_than_64_unrecorded_batches_refuses_to_guess():
    sb = make(n=600, stale=2, keep=1.0)  # 75 plain batches
    it = iter(sb)
    batches = [next(it) for _ in range(70)]
    with pytest.raises(RuntimeError, match=r"cannot tell which batch.*ids=example_ids"):
        sb.record(torch.zeros(8))
    sb.record(id_loss(batches[-1][2]).float(), ids=batches[-1][2])  # the explicit form still works


# ---------------------------------------------------------------- epochs, len and total_steps


def test_iter_claims_the_epoch_and_the_last_batch_ends_it():
    sb = make(epochs=4, end=0.5)
    assert (sb.epoch, len(sb)) == (0, 4)
    for epoch, expected in enumerate([4, 4, 8, 8]):
        it = iter(sb)
        assert sb.epoch == epoch and len(sb) == len(it) == expected
        batches = [next(it) for _ in range(expected)]  # stops at len() without asking for more
        assert len(batches) == expected
        assert sb.epoch == epoch + 1, "the epoch ended with its last batch"
        assert sb.stats.history[-1].mode == ("fresh" if epoch < 2 else "plain")


def test_a_loop_that_stops_at_len_runs_every_epoch_in_full_across_the_schedule_switch():
    sb = make(epochs=4, end=0.5)
    counts = [len(list(itertools.islice(sb, len(sb)))) for _ in range(4)]
    assert counts == [4, 4, 8, 8]
    assert [s.mode for s in sb.stats.history] == ["fresh", "fresh", "plain", "plain"]


def test_a_probe_iter_without_next_gives_its_epoch_back():
    sb = make()
    iter(sb)  # Lightning's _check_dataloader_iterable does this and drops the iterator
    assert sb.epoch == 0 and sb.stats.history == []
    list(sb)
    assert sb.epoch == 1 and [s.epoch for s in sb.stats.history] == [0]


def test_two_live_iterators_are_an_error_not_a_mix():
    sb = make()
    first = iter(sb)
    next(first)
    second = iter(sb)
    with pytest.raises(RuntimeError, match=r"closed by a newer iter\(\) of the same loader"):
        next(first)
    assert len(list(second)) == len(second)
    assert [s.epoch for s in sb.stats.history] == [0, 1]


def _schedule_grid():
    modes = {"fresh": {}, "stale2": {"stale": 2}, "once": {"stale": "once"}}
    schedules = {"none": {}, "start": {"start": 0.5}, "end": {"end": 0.5}, "interrupt": {"interrupt": 2}}
    for policy in POLICIES:
        for mode, m in modes.items():
            for schedule, s in schedules.items():
                yield pytest.param(dict(policy=policy, epochs=4, **m, **s), id=f"{policy}-{mode}-{schedule}")
    for name in RECIPES:
        yield pytest.param(recipe(name, plain_epochs=4), id=f"recipe-{name}")


@pytest.mark.parametrize("config", list(_schedule_grid()))
@pytest.mark.parametrize("last_batch", ["yield", "carry"])
def test_one_cycle_lr_sized_from_total_steps_ends_exactly_at_the_last_batch(config, last_batch):
    sb = make(n=150, batch_size=16, **config, last_batch=last_batch)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=sb.total_steps())
    steps = 0
    for _ in range(sb.epochs):
        expected = len(sb)
        count = 0
        for _, _, ids in sb:
            sb.record(id_loss(ids).float())  # stale="once" and the recipes rely on it
            last_lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            count += 1
        assert count == expected, "len() is the epoch's exact length"
        steps += count
    assert steps == sb.total_steps()
    assert last_lr == pytest.approx(0.1 / 25 / 1e4), "the last batch trained at the schedule's final LR"
    with pytest.raises(ValueError, match="Tried to step"):
        sched.step()  # one step more than planned: the schedule was sized exactly


def test_total_steps_of_a_bernoulli_policy_is_a_bound():
    sb = make(policy=ThresholdPolicy(0.5, count="bernoulli"), epochs=3)
    assert sum(len(list(sb)) for _ in range(3)) <= sb.total_steps()
    sb = make(policy=InfoBatchPolicy(0.5, count="bernoulli"), epochs=3)
    assert sum(len(list(sb)) for _ in range(3)) <= sb.total_steps()


def test_total_steps_needs_epochs():
    with pytest.raises(ValueError, match=r"total_steps\(\) needs the number of training epochs; pass epochs="):
        make().total_steps()


# ---------------------------------------------------------------- last batch, workers, options, device


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("stale", [None, 2])
def test_a_drop_last_source_never_gets_a_short_batch(policy, stale):
    loader = DataLoader(IndexedPairs(70), batch_size=8, shuffle=True, drop_last=True)
    for batch_size in (3, 5, 8):
        sb = SelectiveBatchLoader(loader, Echo(), keep=0.5, loss_fn=loss_from_x, policy=policy, stale=stale, batch_size=batch_size)
        assert sb.last_batch == "drop"
        for _ in range(3):
            assert {len(ids) for _, _, ids in sb} == {batch_size}


def test_last_batch_follows_the_source_by_default():
    assert make().last_batch == "yield"
    assert SelectiveBatchLoader([torch.zeros(4, 2)], nn.Identity(), score_fn=lambda m, b: b[:, 0], batch_size=4).last_batch == "yield"
    dropping = DataLoader(IndexedPairs(10), batch_size=4, drop_last=True)
    assert SelectiveBatchLoader(dropping, Echo(), loss_fn=loss_from_x).last_batch == "drop"
    assert SelectiveBatchLoader(dropping, Echo(), loss_fn=loss_from_x, last_batch="yield").last_batch == "yield"


def _workers_now() -> int:
    return len(multiprocessing.active_children())


@pytest.mark.parametrize("iterated_before", [True, False])
def test_stale_mode_keeps_one_pool_of_persistent_workers(iterated_before):
    loader = DataLoader(IndexedPairs(64), batch_size=8, num_workers=2, persistent_workers=True)
    if iterated_before:
        list(loader)  # the user's own loader has a live pool now
    baseline = _workers_now() - (2 if iterated_before else 0)
    sb = SelectiveBatchLoader(loader, Echo(), keep=0.5, loss_fn=loss_from_x, stale=2)
    counts = []
    for _ in range(3):  # fresh, stale, fresh
        for _ in sb:
            counts.append(_workers_now() - baseline)
    assert [s.mode for s in sb.stats.history] == ["fresh", "stale", "fresh"]
    assert set(counts) == {2}, f"worker processes seen while iterating: {sorted(set(counts))}"


def test_a_break_leaves_no_worker_behind():
    baseline = _workers_now()
    sb = SelectiveBatchLoader(DataLoader(IndexedPairs(64), batch_size=8, num_workers=2), Echo(), loss_fn=loss_from_x)
    for _ in sb:
        assert _workers_now() == baseline + 2
        break
    deadline = time.monotonic() + 10
    while _workers_now() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _workers_now() == baseline


@pytest.mark.parametrize("name, value", [("keep", 0.25), ("batch_size", 32), ("policy", "topk"), ("stale", 2), ("model", nn.Linear(2, 2))])
def test_options_are_fixed_after_construction(name, value):
    sb = make()
    with pytest.raises(AttributeError, match=rf"{name} is fixed when a SelectiveBatchLoader is built.*{name}=\.\.\."):
        setattr(sb, name, value)
    assert sb.keep == 0.5 and sb.batch_size == 8


def test_every_batch_plain_or_selected_is_put_on_the_loaders_device():
    loader = DataLoader(IndexedPairs(48), batch_size=8)
    sb = SelectiveBatchLoader(
        loader, nn.Identity(), keep=0.5, policy="random", score_fn=lambda m, b: torch.zeros(len(b[2])),
        device="meta", epochs=4, end=0.5, interrupt=3,
    )  # fmt: skip
    devices = collections.Counter()
    for _ in range(4):
        for x, y, _ in sb:
            devices[(x.device.type, y.device.type)] += 1
    assert set(devices) == {("meta", "meta")}
    assert [s.mode for s in sb.stats.history] == ["fresh", "fresh", "plain", "plain"]
    assert sum(s.passed_through for s in sb.stats.history[:2]) > 0, "interrupt batches were checked too"
