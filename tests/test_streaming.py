"""Streaming engines: stale epochs skip loading and decoding where the engine lets them.

* a ``torchdata.nodes`` pipeline (id batches, then a mapping node that loads them) calls its
  loading function only for the selected ids, and resumes mid-epoch exactly;
* WebDataset's map-style ``wids`` in a ``DataLoader`` decodes only the selected samples, and
  its samplers' orders resume;
* an ``IterableDataset`` or any other iterable selects from cached losses but reads everything.
"""

from __future__ import annotations

import io
import tarfile
import threading
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler

from sbdata.sources.dataloader import epoch_order_generator

from .conftest import IndexedPairs, id_loss, selected_ids
from .test_stale import make

nodes = pytest.importorskip("torchdata.nodes")
from sbdata.sources.nodes import NodesSource, PlannedIds, nodes_pipeline  # noqa: E402  (needs torchdata)

N = 96
B = 8


def run_epoch(sb):
    """Ids and sizes of one epoch's batches; checks rows and ids stay paired and len() holds."""
    try:
        expected = len(sb)
    except TypeError:  # a streamed source's batch sizes are known after its first epoch
        assert not sb.stats.history
        expected = None
    ids, sizes = [], []
    for x, y, idx in sb:
        assert torch.equal(x[:, 0].long(), idx), "rows and their ids must stay paired"
        ids += idx.tolist()
        sizes.append(len(idx))
    assert expected is None or len(sizes) == expected, "len(sb) equals the batches yielded"
    return ids, sizes


class CallLog:
    """A loading function for a ``ParallelMapper``: ``collate([ds[i] for i in ids])``, recording
    every id batch it is called with (thread-safe: the mapper may run it in threads)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.calls: list[list[int]] = []
        self.lock = threading.Lock()

    def __call__(self, ids):
        with self.lock:
            self.calls.append(list(ids))
        return torch.utils.data.default_collate([self.dataset[i] for i in ids])

    def ids(self) -> list[int]:
        return [i for call in self.calls for i in call]


def sampler_batches(seed: int, epoch: int, n: int = N, size: int = B) -> list[torch.Tensor]:
    """The id batches a ``RandomSampler(generator=Generator().manual_seed(seed))`` cut by ``size``
    draws in ``epoch`` under sbdata (NOTE [ Orders that resume ])."""
    order = torch.randperm(n, generator=epoch_order_generator(seed, epoch))
    return list(order.split(size))


# ---------------------------------------------------------------------- torchdata.nodes


def users_graph(log, *, seed=1, workers=2, prefetch=2, batch_sampler=False, transform=None, in_order=True):
    """A ``torchdata.nodes`` pipeline as a user builds it: id batches -> load -> [transform] -> prefetch."""
    sampler = RandomSampler(range(N), generator=torch.Generator().manual_seed(seed))
    if batch_sampler:
        node = nodes.SamplerWrapper(BatchSampler(sampler, batch_size=B, drop_last=False))
    else:
        node = nodes.Batcher(nodes.SamplerWrapper(sampler), batch_size=B, drop_last=False)
    node = nodes.ParallelMapper(node, log, num_workers=workers, in_order=in_order)
    if transform is not None:
        node = nodes.Mapper(node, transform)
    if prefetch:
        node = nodes.Prefetcher(node, prefetch_factor=prefetch)
    return nodes.Loader(node)


@pytest.mark.parametrize(
    "shape",
    [
        dict(workers=0, prefetch=0),
        dict(workers=2, prefetch=2),
        dict(workers=2, prefetch=0, batch_sampler=True),
        dict(workers=0, prefetch=2, transform=lambda b: b),
    ],
    ids=["inline", "threads+prefetch", "batch-sampler", "transform-above"],
)
def test_a_stale_nodes_epoch_calls_the_loading_function_only_for_selected_ids(shape):
    ds = IndexedPairs(N)
    log = CallLog(ds)
    sb, scorer = make(users_graph(log, **shape))
    assert isinstance(sb._source, NodesSource)
    assert [sb.mode(e) for e in range(3)] == ["fresh", "stale", "stale"]
    for epoch in range(3):
        log.calls.clear()
        ds.loads.zero_()
        calls = scorer.calls
        ids, sizes = run_epoch(sb)
        candidates = sampler_batches(1, epoch)
        if epoch == 0:
            assert sorted(log.ids()) == list(range(N)) and scorer.calls - calls == N // B
            assert log.calls == [c.tolist() for c in candidates], "the sampler's batches, in order"
            continue
        expected = selected_ids(candidates, 0.5)
        assert ids == expected, "topk of each sampler batch by cached loss, in sampler order"
        assert sorted(log.ids()) == sorted(expected), "the loading function saw only the selected ids"
        assert int(ds.loads.sum()) == N // 2 and int(ds.loads.max()) == 1, "each selected example loaded once"
        assert all(len(call) == B for call in log.calls), "every loaded batch is full"
        assert sizes == [B] * (N // 2 // B) and len(set(ids)) == len(ids)
        assert scorer.calls == calls and sb.stats.history[-1].loads_skipped == N // 2


def test_the_fresh_epoch_follows_the_users_sampler_and_never_draws_from_its_generator():
    log = CallLog(IndexedPairs(N))
    loader = users_graph(log, seed=5, workers=0, prefetch=0)
    sampler = loader.root.source.source.sampler
    state = sampler.generator.get_state()
    sb, _ = make(loader)
    ids, _ = run_epoch(sb)
    assert log.calls == [b.tolist() for b in sampler_batches(5, 0)]
    assert sorted(ids) == sorted(selected_ids(sampler_batches(5, 0), 0.5))
    assert torch.equal(sampler.generator.get_state(), state)


def test_nodes_pipeline_builds_a_loader_sbdata_filters():
    ds = IndexedPairs(N)
    loader = nodes_pipeline(ds, batch_size=B, shuffle=True, num_workers=2, prefetch_factor=2,
                            generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert isinstance(loader, nodes.Loader)
    plain = [b[2] for b in loader]  # an ordinary nodes.Loader on its own
    assert sorted(torch.cat(plain).tolist()) == list(range(N)) and all(len(b) == B for b in plain)
    ds.loads.zero_()
    sb, _ = make(loader)
    assert sb._source.num_examples() == N and len(sb) == N // B // 2
    run_epoch(sb)
    assert int(ds.loads.sum()) == N
    ds.loads.zero_()
    ids, _ = run_epoch(sb)
    assert ids == selected_ids(sampler_batches(3, 1), 0.5)
    assert int(ds.loads.sum()) == N // 2 and torch.equal(ds.loads.nonzero().flatten(), torch.tensor(sorted(ids)))


def test_nodes_pipeline_with_worker_processes_loads_only_the_selected_ids():
    ds = IndexedPairs(N)  # its load counter lives in shared memory: worker processes count too
    sb, _ = make(nodes_pipeline(ds, batch_size=B, shuffle=True, num_workers=2, method="process"))
    run_epoch(sb)
    ds.loads.zero_()
    ids, _ = run_epoch(sb)
    assert int(ds.loads.sum()) == len(ids) == N // 2 and int(ds.loads.max()) == 1


def test_the_plan_is_read_lazily_in_the_main_thread_and_paired_in_order():
    log = CallLog(IndexedPairs(N))
    source = make(users_graph(log, workers=2, prefetch=2))[0]._source
    ahead = 2 * 2 + 2  # the mapper's 2 * num_workers in flight, and the prefetcher's 2
    pulled: list[int] = []
    main = threading.get_ident()
    plan = [torch.arange(i, i + k) for i, k in ((0, 8), (40, 3), (10, 8), (90, 6), (20, 1), (30, 8), (50, 8), (60, 8), (70, 8))]

    def lazy():
        for k, ids in enumerate(plan):
            assert threading.get_ident() == main, "the plan is read in the thread that iterates"
            pulled.append(k)
            yield ids

    with source.load(lazy()) as pairs:
        for k, (batch, ids) in enumerate(pairs):
            assert torch.equal(ids, plan[k]) and torch.equal(batch[2], plan[k]), "batch k holds plan k's ids"
            assert len(pulled) <= k + 1 + ahead, "never read further ahead than the graph holds"
    assert k == len(plan) - 1 and log.calls == [p.tolist() for p in plan]


def test_an_abandoned_pass_stops_the_graphs_threads_and_the_next_pass_is_clean():
    log = CallLog(IndexedPairs(N))
    sb, _ = make(users_graph(log, workers=2, prefetch=2))
    before = threading.active_count()
    for _ in sb:
        break  # abandons epoch 0
    sb.set_epoch(0)
    ids, _ = run_epoch(sb)
    assert sorted(ids) == sorted(selected_ids(sampler_batches(1, 0), 0.5))
    assert threading.active_count() <= before + 1


def test_an_error_in_the_loading_function_reaches_the_loop_and_the_next_epoch_runs():
    ds = IndexedPairs(N)
    failing = {"on": True}

    def load(ids):
        if failing["on"] and 40 in ids:
            raise OSError("unreadable shard")
        return torch.utils.data.default_collate([ds[i] for i in ids])

    sampler = RandomSampler(range(N), generator=torch.Generator().manual_seed(0))
    node = nodes.ParallelMapper(nodes.Batcher(nodes.SamplerWrapper(sampler), batch_size=B), load, num_workers=2)
    sb, _ = make(nodes.Loader(nodes.Prefetcher(node, prefetch_factor=2)))
    with pytest.raises(OSError, match="unreadable shard"):
        run_epoch(sb)
    failing["on"] = False
    sb.set_epoch(0)
    ids, _ = run_epoch(sb)
    assert len(ids) == N // 2


def test_in_order_false_is_turned_back_on_with_a_warning():
    log = CallLog(IndexedPairs(N))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb, _ = make(users_graph(log, workers=2, in_order=False))
    assert any("in_order" in str(w.message) for w in caught)
    run_epoch(sb)
    cached, _ = sb.cache.lookup(torch.arange(N))
    assert torch.equal(cached, id_loss(torch.arange(N)).float())


@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("k", [0, 2, 5])
def test_a_nodes_pipeline_resumes_mid_epoch_exactly(epoch, k):
    def fresh():
        ds = IndexedPairs(N)
        return ds, make(users_graph(CallLog(ds), seed=4, workers=2, prefetch=2), policy="rank")[0]

    _, reference = fresh()
    _, twin = fresh()
    for _ in range(epoch):
        run_epoch(reference)
        run_epoch(twin)
    it = iter(reference)
    head = [next(it)[2].tolist() for _ in range(k)]
    state = reference.state_dict()
    rest = [b[2].tolist() for b in it]
    following = [b[2].tolist() for b in reference]
    assert head + rest == [b[2].tolist() for b in twin], "taking a state does not disturb the epoch"

    torch.manual_seed(1234)  # a resumed process has other global random state
    ds, resumed = fresh()
    resumed.load_state_dict(state)
    got = [b[2].tolist() for b in resumed]
    assert got == rest, "the rest of the epoch, exactly"
    if epoch == 1:  # stale: only the rest of the plan is loaded
        assert int(ds.loads.sum()) == sum(map(len, rest))
    assert [b[2].tolist() for b in resumed] == following, "and the epochs after it"


def test_a_nodes_loader_of_another_shape_is_streamed_and_resumes_with_its_own_state_dict():
    # per-example mapping before the Batcher (torchdata's map-style recipe): ids are only known
    # after loading, so sbdata reads every example and takes ids from the batch (index_key=)
    ds = IndexedPairs(N)

    def graph():
        # SamplerWrapper saves its epoch and fast-forwards within it: the order must be a function
        # of the epoch (a RandomSampler's generator would restart from its first order)
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
        node = nodes.Mapper(nodes.SamplerWrapper(sampler), ds.__getitem__)
        node = nodes.Batcher(node, batch_size=B, drop_last=False)
        return nodes.Loader(nodes.Mapper(node, torch.utils.data.default_collate))

    sb, scorer = make(graph(), index_key=2, batch_size=B)
    assert not isinstance(sb._source, NodesSource) and sb._source.stateful
    run_epoch(sb)  # fresh: scores everything, fills the cache
    ds.loads.zero_()
    it = iter(sb)
    head = [next(it) for _ in range(2)]
    state = sb.state_dict()
    assert state["position"]["source_state"], "the nodes Loader's own state_dict is saved"
    rest = [b[2].tolist() for b in it]
    assert int(ds.loads.sum()) == N, "a stale epoch of this shape still loads every example"
    assert scorer.calls == N // B and sb.stats.history[-1].scored == 0, "but it scores none"
    chosen = torch.tensor([i for b in head for i in b[2].tolist()] + [i for b in rest for i in b])
    assert id_loss(chosen).mean() > id_loss(torch.arange(N)).mean(), "selected from the cached losses"

    resumed, _ = make(graph(), index_key=2, batch_size=B)
    resumed.load_state_dict(state)
    assert [b[2].tolist() for b in resumed] == rest


# ---------------------------------------------------------------------- wids


def write_shards(root, n=N, per_shard=32):
    """WebDataset tar shards: sample ``i`` is ``{i:05d}.npy`` (the row ``[i, i]``) and ``.cls``."""
    shards = []
    for s, start in enumerate(range(0, n, per_shard)):
        path = root / f"shard-{s:02d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, n)):
                buffer = io.BytesIO()
                np.save(buffer, np.array([i, i], dtype=np.float32))
                for ext, data in (("npy", buffer.getvalue()), ("cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(f"sample{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"url": str(path), "nsamples": min(per_shard, n - start)})
    return shards


class Decode:
    """A wids transformation: decode one sample to ``(x, y, index)``, counted per index."""

    def __init__(self, n=N):
        self.decoded = torch.zeros(n, dtype=torch.int64).share_memory_()

    def __call__(self, sample):
        index = int(sample["__index__"])
        self.decoded[index] += 1
        x = torch.from_numpy(np.load(sample[".npy"]))
        return x, int(sample[".cls"].read()), index


@pytest.fixture
def wids_dataset(tmp_path):
    wids = pytest.importorskip("wids")
    decode = Decode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = wids.ShardListDataset(write_shards(tmp_path), cache_dir=str(tmp_path / "cache"), transformations=[decode])
    return wids, ds, decode


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stale_wids_epoch_decodes_only_the_selected_samples(wids_dataset, workers):
    wids, ds, decode = wids_dataset
    sampler = wids.ChunkedSampler(ds, chunksize=32, seed=2, shuffle=True)
    sb, scorer = make(DataLoader(ds, batch_size=B, sampler=sampler, num_workers=workers))
    for epoch in range(3):
        decode.decoded.zero_()
        ids, sizes = run_epoch(sb)
        if epoch == 0:
            assert int(decode.decoded.sum()) == N and sorted(ids) == sorted(set(ids))
            continue
        assert int(decode.decoded.sum()) == len(ids) == N // 2, "only the selected samples are decoded"
        assert torch.equal(decode.decoded.nonzero().flatten(), torch.tensor(sorted(ids)))
        assert sizes == [B] * (N // 2 // B) and sb.stats.history[-1].scored == 0


@pytest.mark.parametrize("kind", ["ChunkedSampler", "ShardedSampler"])
def test_wids_sampler_orders_are_a_function_of_the_epoch_so_they_resume(wids_dataset, kind):
    wids, ds, _ = wids_dataset

    def loader():
        sampler = getattr(wids, kind)(ds, seed=9, **({"chunksize": 32} if kind == "ChunkedSampler" else {}))
        return DataLoader(ds, batch_size=B, sampler=sampler)

    reference, _ = make(loader())
    source = reference._source
    source.set_epoch(1)
    assert [c.tolist() for c in source.candidates()] == [c.tolist() for c in source.candidates()], (
        "the same epoch, the same order"
    )
    orders = [run_epoch(reference)[0] for _ in range(4)]
    assert orders[2] != orders[3]
    state = None
    again, _ = make(loader())
    for epoch in range(4):
        if epoch == 2:
            state = again.state_dict()
            break
        run_epoch(again)
    resumed, _ = make(loader())  # a new process: a new sampler that never made a pass
    resumed.load_state_dict(state)
    assert [run_epoch(resumed)[0] for _ in range(2)] == orders[2:]


# ---------------------------------------------------------------------- plain iterables


class IndexedStream(IterableDataset):
    """Yields example ``i`` as ``(x = [i, i], y, i)`` in a fixed shuffled order; counts reads."""

    def __init__(self, n=N):
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        self.reads = torch.zeros(n, dtype=torch.int64)

    def __iter__(self):
        for i in self.order:
            self.reads[i] += 1
            yield torch.tensor([float(i), float(i)]), i % 3, i


@pytest.mark.parametrize("kind", ["IterableDataset", "generator-backed iterable", "webdataset"])
def test_an_iterable_selects_from_cached_losses_but_reads_every_example(kind, tmp_path):
    stream = IndexedStream()
    reads = stream.reads
    if kind == "IterableDataset":
        loader = DataLoader(stream, batch_size=B)
    elif kind == "generator-backed iterable":

        class Batches:
            def __iter__(self):
                return iter(DataLoader(stream, batch_size=B))

        loader = Batches()
    else:  # WebDataset's streaming pipeline over local tar shards, decoding counted
        wds = pytest.importorskip("webdataset")
        stream.order = list(range(N))  # shards are read in order (shardshuffle=False)

        def decode(sample):
            index = int(sample["__key__"].removeprefix("sample"))
            reads[index] += 1
            return torch.from_numpy(sample["npy"]), sample["cls"], index

        urls = [shard["url"] for shard in write_shards(tmp_path)]
        loader = DataLoader(wds.WebDataset(urls, shardshuffle=False).decode().map(decode), batch_size=B)
    sb, scorer = make(loader, index_key=2, batch_size=B)
    assert not sb._source.loads_ids
    run_epoch(sb)  # fresh
    reads.zero_()
    ids, _ = run_epoch(sb)  # stale
    batches = [torch.tensor(stream.order[i : i + B]) for i in range(0, N, B)]
    assert ids == selected_ids(batches, 0.5), "the same selection a scoring pass would make"
    assert int(reads.sum()) == N and int(reads.min()) == 1, "every example still read and decoded"
    assert sb.stats.history[-1].scored == 0 and scorer.calls == N // B


def test_planned_ids_ends_when_closed_so_no_thread_waits_forever():
    ids = PlannedIds()
    ids.begin()
    ids.reset()
    ids.put([1, 2])
    assert next(ids) == [1, 2]
    done = threading.Event()

    def reader():
        with pytest.raises(StopIteration):
            next(ids)
        done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    ids.close()
    thread.join(timeout=5)
    assert done.is_set()
