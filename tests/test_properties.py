"""Invariants that hold for every policy, schedule, mode and batch size (hypothesis)."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from sbdata import SelectiveBatchLoader

from .conftest import Echo, IndexedPairs, loss_from_x

EXACT = {"rank", "topk", "random", "threshold", "infobatch"}  # every built-in, by default


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 60),
    source_batch=st.integers(1, 9),
    batch_size=st.integers(1, 9),
    keep=st.floats(0.05, 1.0),
    policy=st.sampled_from(["rank", "topk", "random", "threshold", "infobatch"]),
    stale=st.sampled_from([None, 1, 2, 3, "once"]),
    interrupt=st.sampled_from([0, 2, 3]),
    last_batch=st.sampled_from(["yield", "drop", "carry"]),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_every_configuration_keeps_the_loader_invariants(
    n, source_batch, batch_size, keep, policy, stale, interrupt, last_batch, shuffle, seed
):
    assume(int(keep * source_batch) >= 1)  # otherwise refused at construction
    dataset = IndexedPairs(n)
    loader = DataLoader(dataset, batch_size=source_batch, shuffle=shuffle and n > 0)
    sb = SelectiveBatchLoader(
        loader, Echo(), keep=keep, loss_fn=loss_from_x, policy=policy, stale=stale,
        interrupt=interrupt, last_batch=last_batch, batch_size=batch_size, seed=seed,
    )
    carried_in = 0
    for _ in range(3):
        bound = len(sb)
        dataset.loads.zero_()
        batches = [(x[:, 0].long().tolist(), idx.tolist()) for x, _, idx in sb]
        stats = sb.stats.history[-1]
        assert all(rows == ids for rows, ids in batches), "rows and ids stay paired"
        ids = [i for _, b in batches for i in b]
        assert set(ids) <= set(range(n))
        if policy in EXACT:
            assert len(batches) == bound, "len is exact for exact-count policies"
        else:
            assert len(batches) <= bound, "len is a bound the epoch never exceeds"
        if last_batch != "carry":
            assert len(ids) == len(set(ids)), "no example twice in an epoch"
        passed = stats.passed_through
        assert stats.yielded == len(ids)
        unaccounted = carried_in + stats.selected + passed - stats.yielded - sb._carried_rows()
        if last_batch == "drop":
            assert 0 <= unaccounted < batch_size, "only the partial last batch is dropped"
        else:
            assert unaccounted == 0, "no row lost"
        sizes = [len(b) for _, b in batches]
        full = [s for s in sizes if s != batch_size]
        if interrupt == 0 and stats.mode != "plain":  # plain epochs pass source batches through
            assert len(full) <= (1 if last_batch == "yield" else 0), f"partial batches {sizes}"
        if stats.mode == "stale":
            assert stats.scored == 0
            assert int(dataset.loads.sum()) == stats.loaded <= stats.selected + passed + carried_in
        carried_in = sb._carried_rows()
