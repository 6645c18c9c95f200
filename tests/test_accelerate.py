"""SelectiveBatchLoader under Hugging Face Accelerate with 2 CPU processes (gloo, 127.0.0.1).

Each rank is forked by :func:`run_on_two_ranks`, which initialises the gloo process group;
``accelerate.Accelerator(cpu=True)`` then joins it. Two user patterns:

(a) ``accelerator.prepare(model, optimizer, DataLoader(...))`` first, then wrap the prepared
    ``DataLoaderShard``: sbdata streams it as it is (never rebuilt), ids come from the batch
    (``index_key=2``), and the data is sharded by Accelerate's ``BatchSamplerShard``;
(b) wrap a plain ``DataLoader`` with a ``DistributedSampler`` and prepare only the model and
    the optimizer: sbdata rebuilds the loader and draws its id batches from the sampler.

What the tests rely on in accelerate 1.15 (read from its source):

* ``PartialState`` (``accelerate/state.py``) reports ``MULTI_CPU`` only when ``cpu=True`` and
  ``LOCAL_RANK`` is set or ``WORLD_SIZE > 1``; otherwise it silently runs as a single process
  (``DistributedType.NO``, no DDP wrapping, no sharding) even with a process group initialised.
  For ``MULTI_CPU`` it reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``
  (``get_cpu_distributed_information``) and calls ``init_process_group`` only when none is
  initialised, so it joins ours. With ``OMP_NUM_THREADS`` unset it resets torch's thread count.
  Its state lives in class-level singletons (``PartialState``, ``AcceleratorState``,
  ``GradientState``) that a forked child inherits from the pytest process (where another test
  may have built a 1-process Accelerator): each rank resets them first.
* With ``shuffle=True`` a prepared loader's ``RandomSampler`` gets a generator seeded from the
  global RNG at ``prepare()`` time unless ``use_seedable_sampler=True``, whose
  ``SeedableRandomSampler`` is seeded by ``data_seed + epoch``: only that makes a freshly
  prepared loader (a resumed run) draw the same epoch as the uninterrupted run.
* ``BatchSamplerShard`` (``even_batches=True``, the default) gives every rank the same number of
  full batches, rank ``r`` taking source batches ``r, r + world, ...``: disjoint shards here.
* ``DataLoaderShard`` defines ``state_dict``/``load_state_dict`` (``DataLoaderAdapter``), but
  they only work when it wraps torchdata's ``StatefulDataLoader``
  (``use_stateful_dataloader=True``); over a plain ``DataLoader`` ``state_dict()`` raises
  ``AttributeError`` (``dl_state_dict`` is never set).
* ``register_for_checkpointing(obj)`` needs ``state_dict``/``load_state_dict``.
  ``save_state`` calls ``obj.state_dict()`` on EVERY process (``save_custom_state``), but
  ``accelerate.utils.save`` writes ``custom_checkpoint_<i>.pkl`` on the main process only
  (``save_on_each_node=False``): sbdata's local, collective-free ``state_dict`` is what makes
  that safe. ``load_state`` has every process read that one file (``weights_only=False``), so
  rank 0's epoch-boundary state resumes every rank. ``save_state`` ends without a barrier
  (model, optimizer and custom files are written by the main process only; RNG states per
  process), so ``wait_for_everyone()`` must come before another rank loads.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from sbdata import SelectiveBatchLoader

from .conftest import IndexedPairs
from .distributed_helpers import run_on_two_ranks

accelerate = pytest.importorskip("accelerate")
# torch.optim imports torch._dynamo on the first optimizer built (seconds); import it once here
# so that the forked ranks inherit it instead of paying for it in every run.
import torch._dynamo

N, BATCH, EPOCHS, KEEP = 96, 8, 4, 0.5
SAVED_AFTER = 2  # the checkpoint is taken at the boundary before this epoch
PER_EPOCH = N // 2 // BATCH // 2  # 6 source batches per rank, half kept: 3 full batches


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x / N)


def make_accelerator(rank: int, world: int):
    """An Accelerator that joins the process group the helper initialised."""
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, DistributedType

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1"
    )
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    AcceleratorState._reset_state(reset_partial_state=True)  # singletons inherited through fork
    GradientState._reset_state()
    group = dist.distributed_c10d._get_default_group()
    accelerator = accelerate.Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=7)
    )
    assert accelerator.distributed_type == DistributedType.MULTI_CPU
    assert (accelerator.num_processes, accelerator.process_index) == (world, rank)
    assert accelerator.state.backend == "gloo"
    assert dist.distributed_c10d._get_default_group() is group, "Accelerate joined the existing group"
    return accelerator


def prepared_model(accelerator, rank: int):
    torch.manual_seed(100 + rank)  # different initial weights: DDP must broadcast rank 0's
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    return model, optimizer


def sharded_plain_loader(rank: int, world: int) -> DataLoader:
    sampler = DistributedSampler(IndexedPairs(N), num_replicas=world, rank=rank, shuffle=True, seed=3)
    return DataLoader(IndexedPairs(N), batch_size=BATCH, sampler=sampler)


def selective(pattern: str, accelerator, model, rank: int, world: int, policy: str) -> SelectiveBatchLoader:
    if pattern == "prepared":  # (a): prepare the DataLoader first, then wrap the DataLoaderShard
        loader = accelerator.prepare(DataLoader(IndexedPairs(N), batch_size=BATCH, shuffle=True))
        assert type(loader).__name__ == "DataLoaderShard" and len(loader) == N // BATCH // world
    else:  # (b): wrap a plain DataLoader with a DistributedSampler; sbdata rebuilds it
        loader = sharded_plain_loader(rank, world)
    return SelectiveBatchLoader(
        loader, model, keep=KEEP, policy=policy, stale=2, epochs=EPOCHS, index_key=2, seed=11
    )


def train_epoch(sb: SelectiveBatchLoader, accelerator, model, optimizer) -> dict:
    """One epoch of the usual Accelerate step; returns what the epoch yielded."""
    try:
        expected = len(sb)
    except TypeError:  # sizes of a streamed source are unknown until one epoch has run
        expected = None
    ids, sizes, reweighted = [], [], False
    for x, y, idx in sb:
        ids.append(idx.tolist())
        sizes.append(len(x))
        losses = F.cross_entropy(model(x), y, reduction="none")
        weighted = sb.record(losses)
        reweighted |= not torch.equal(weighted, losses)
        accelerator.backward(weighted.mean())
        optimizer.step()
        optimizer.zero_grad()
    stats = sb.stats.history[-1]
    return {
        "ids": ids, "sizes": sizes, "len": expected, "mode": stats.mode, "scored": stats.scored,
        "loaded": stats.loaded, "reweighted": reweighted,
    }  # fmt: skip


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _training_worker(pattern: str, policy: str, tmp: str):
    ckpt = os.path.join(tmp, "sb.pt")
    state_dir = os.path.join(tmp, "accelerate_state")

    def work(rank: int, world: int):
        accelerator = make_accelerator(rank, world)
        model, optimizer = prepared_model(accelerator, rank)
        initial = params(model)
        sb = selective(pattern, accelerator, model, rank, world, policy)
        accelerator.register_for_checkpointing(sb)
        try:  # what an LR schedule is sized from, before any training
            upfront = (len(sb), sb.total_steps())
        except TypeError as e:
            upfront = f"TypeError: {e}"
        epochs = []
        for epoch in range(EPOCHS):
            if epoch == SAVED_AFTER:
                # the plain DDP habit: rank 0 alone takes sbdata's (local) state and saves it,
                # with the model and optimizer the selection depends on
                if rank == 0:
                    torch.save(
                        {
                            "sb": sb.state_dict(),
                            "model": accelerator.unwrap_model(model).state_dict(),
                            "optimizer": optimizer.state_dict(),
                        },
                        ckpt,
                    )
                accelerator.save_state(state_dir)  # registered sb: saved by the main process only
                accelerator.wait_for_everyone()
            epochs.append(train_epoch(sb, accelerator, model, optimizer))
        result = {
            "epochs": epochs,
            "steps": sum(len(e["ids"]) for e in epochs),
            "total_steps": sb.total_steps(),
            "upfront": upfront,
            "params": params(model),
            "files": sorted(os.listdir(state_dir)),
            "initial": initial,
        }

        # resume 1: a fresh loader (and Accelerate loader) loads rank 0's torch.save'd state
        saved = torch.load(ckpt, weights_only=True)
        accelerator.unwrap_model(model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        resumed = selective(pattern, accelerator, model, rank, world, policy)
        resumed.load_state_dict(saved["sb"])
        result["resumed"] = [train_epoch(resumed, accelerator, model, optimizer) for _ in range(SAVED_AFTER, EPOCHS)]
        result["resumed_params"] = params(model)

        # resume 2: as a restarted script would: a new Accelerator, model, optimizer and loader,
        # the loader registered for checkpointing, then load_state
        accelerator2 = make_accelerator(rank, world)
        model2, optimizer2 = prepared_model(accelerator2, rank + 7)
        restarted = selective(pattern, accelerator2, model2, rank, world, policy)
        accelerator2.register_for_checkpointing(restarted)
        accelerator2.load_state(state_dir)
        result["restarted_epoch"] = restarted.epoch
        result["restarted"] = [
            train_epoch(restarted, accelerator2, model2, optimizer2) for _ in range(SAVED_AFTER, EPOCHS)
        ]
        result["restarted_params"] = params(model2)
        return result

    return work


_RUNS: dict[tuple[str, str], dict] = {}


def training_run(pattern: str, policy: str, tmp_path_factory) -> dict:
    """Both ranks' results of one training run (run once per module, shared by the tests)."""
    if (pattern, policy) not in _RUNS:
        tmp = str(tmp_path_factory.mktemp(f"{pattern}-{policy}"))
        r0, r1 = run_on_two_ranks(_training_worker(pattern, policy, tmp))
        _RUNS[pattern, policy] = {"pattern": pattern, "policy": policy, "ranks": (r0, r1)}
    return _RUNS[pattern, policy]


@pytest.fixture(params=[("prepared", "rank"), ("prepared", "infobatch"), ("plain", "rank")], ids="-".join)
def trained(request, tmp_path_factory):
    return training_run(*request.param, tmp_path_factory)


def test_every_rank_yields_the_same_number_of_full_batches(trained):
    r0, r1 = trained["ranks"]
    for e in range(EPOCHS):
        a, b = r0["epochs"][e], r1["epochs"][e]
        assert len(a["ids"]) == len(b["ids"]) == PER_EPOCH, f"epoch {e}"
        assert a["sizes"] == b["sizes"] == [BATCH] * PER_EPOCH, f"epoch {e}: every batch full-size"
        assert a["len"] == b["len"] == PER_EPOCH, f"epoch {e}: len(sb) before the epoch"


def test_stale_epochs_select_from_the_cache_without_scoring(trained):
    for r in trained["ranks"]:
        assert [e["mode"] for e in r["epochs"]] == ["fresh", "stale", "fresh", "stale"]
        for e in r["epochs"]:
            shard = N // 2
            if e["mode"] == "fresh":
                assert e["scored"] == e["loaded"] == shard
            else:
                assert e["scored"] == 0
                # a rebuilt DataLoader loads only its share of the global selection; the
                # DataLoaderShard is streamed whole and selected from batch by batch
                assert e["loaded"] == (shard if trained["pattern"] == "prepared" else int(KEEP * shard))


def test_record_weighs_the_losses_only_for_a_reweighting_policy(trained):
    for r in trained["ranks"]:
        reweighted = [e["reweighted"] for e in r["epochs"]]
        assert any(reweighted) if trained["policy"] == "infobatch" else not any(reweighted)


def test_no_example_is_trained_twice_in_an_epoch(trained):
    r0, r1 = trained["ranks"]
    for e in range(EPOCHS):
        a = [i for b in r0["epochs"][e]["ids"] for i in b]
        b = [i for b in r1["epochs"][e]["ids"] for i in b]
        assert len(set(a)) == len(a) and len(set(b)) == len(b), f"epoch {e}: a rank repeats an example"
        assert not set(a) & set(b), f"epoch {e} ({r0['epochs'][e]['mode']}): the ranks share examples"
        assert len(set(a) | set(b)) == int(KEEP * N)


def test_the_gradient_all_reduce_keeps_the_ranks_identical(trained):
    r0, r1 = trained["ranks"]
    for name in ("initial", "params", "resumed_params", "restarted_params"):
        for p0, p1 in zip(r0[name], r1[name]):
            assert torch.equal(p0, p1), name
    assert not torch.equal(r0["params"][0], r0["initial"][0]), "training moved the weights"


def test_total_steps_is_the_number_of_steps_taken(trained):
    for r in trained["ranks"]:
        assert r["total_steps"] == r["steps"] == EPOCHS * PER_EPOCH
        if trained["pattern"] == "plain":
            assert r["upfront"] == (PER_EPOCH, r["steps"]), "known before training for a plain DataLoader"


def test_rank_0_alone_saves_and_a_fresh_loader_resumes_exactly(trained):
    for r in trained["ranks"]:
        expected = r["epochs"][SAVED_AFTER:]
        assert [e["ids"] for e in r["resumed"]] == [e["ids"] for e in expected]
        assert [e["mode"] for e in r["resumed"]] == [e["mode"] for e in expected]
        for p, q in zip(r["resumed_params"], r["params"]):
            assert torch.equal(p, q), "the resumed run trains to the same weights"


def test_accelerate_save_state_and_load_state_resume_the_registered_loader_exactly(trained):
    for r in trained["ranks"]:
        assert r["restarted_epoch"] == SAVED_AFTER
        assert "custom_checkpoint_0.pkl" in r["files"]
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(r["files"])
        expected = r["epochs"][SAVED_AFTER:]
        assert [e["ids"] for e in r["restarted"]] == [e["ids"] for e in expected]
        for p, q in zip(r["restarted_params"], r["params"]):
            assert torch.equal(p, q), "model and optimizer restored by load_state train alike"


def test_len_and_total_steps_of_a_prepared_loader_are_known_before_training(tmp_path_factory):
    for r in training_run("prepared", "rank", tmp_path_factory)["ranks"]:
        assert r["upfront"] == (PER_EPOCH, EPOCHS * PER_EPOCH), r["upfront"]


def _mid_epoch_worker(rank: int, world: int):
    accelerator = make_accelerator(rank, world)
    model, _ = prepared_model(accelerator, rank)

    def step(sb, batch):  # no optimizer step: the scorer stays fixed, so resume can be exact
        x, y, idx = batch
        sb.record(F.cross_entropy(model(x), y, reduction="none").detach())
        return idx.tolist()

    sb = selective("prepared", accelerator, model, rank, world, "rank")
    for batch in sb:  # epoch 0 (fresh) fills the cache
        step(sb, batch)
    it = iter(sb)  # epoch 1 (stale)
    first = step(sb, next(it))
    try:  # what accelerator.save_state() calls (on every process) in the middle of an epoch
        state, error = sb.state_dict(), None
    except AttributeError as e:  # the bug below
        state, error = None, f"{type(e).__name__}: {e}"
    rest = [step(sb, batch) for batch in it]
    resumed = None
    if state is not None:  # a mid-epoch state resumes the rank that took it
        fresh = selective("prepared", accelerator, model, rank, world, "rank")
        fresh.load_state_dict(state)
        resumed = [step(fresh, batch) for batch in fresh]
    return {"first": first, "rest": rest, "resumed": resumed, "error": error}


def test_a_mid_epoch_state_over_a_prepared_loader_resumes_the_rest_of_the_epoch():
    for r in run_on_two_ranks(_mid_epoch_worker):
        assert r["error"] is None, r["error"]
        assert r["resumed"] == r["rest"] and len(r["rest"]) == PER_EPOCH - 1
