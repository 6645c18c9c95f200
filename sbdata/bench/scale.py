"""Scale benchmark: what stale mode costs as the dataset grows, on one process and on ranks.

    python -m sbdata.bench.scale                      # N = 1e4 .. 1e7 on one process, 2 and 4 gloo ranks (~6 min)
    python -m sbdata.bench.scale --sizes 1e4 1e5 1e6 --ranks 2 --rank-sizes 1e5
    python -m sbdata.bench.scale --quick              # tiny sizes, a few seconds (what the test runs)

For each dataset size N it measures, through the public API of ``SelectiveBatchLoader`` only:

* the time from ``iter()`` to the first batch of a STALE epoch (where the epoch is planned
  from cached losses), next to the same for a plain epoch of the raw DataLoader (same
  dataset, sampler and batch size 128): the ratio is the headline;
* the per-step overhead over the raw loader: SB time per yielded batch (``next`` and
  ``sb.record``) minus the raw loader's time per batch, over ``--steps`` batches after the
  first (so N = 1e7 stays cheap); the same for the steps of a fresh (scoring) epoch where one
  runs;
* saved state bytes per example: ``len(torch.save(sb.state_dict()))`` / N, at the epoch
  boundary before the stale epoch and in its middle;
* under ``torch.distributed`` (gloo on 127.0.0.1, ``--ranks``): per-rank state bytes, with
  ``shard_cache=True`` where this sbdata has it and without, and the bytes each rank sends and
  receives through torch.distributed collectives during one whole stale epoch (counted by
  wrapping ``torch.distributed.<collective>`` while the epoch runs).

The dataset is cheap on purpose: ``__getitems__`` returns the ids and a tiny tensor, and the
scorer's per-example loss is a fixed hash of the id (:func:`loss_of`), so the loader's own
work is what is measured. The loss cache is filled by one fresh epoch where N <= ``--fresh-max``;
above it the loader loads a state built from its own ``state_dict()`` with the cache replaced by
N entries of exactly the losses a fresh epoch would have stored (:func:`synthesized_state`; the
equivalence is checked against a real fresh epoch at a small N, in each layout used). Every
row says which way was used; a synthesized boundary state has no selection log of epoch 0.
Every figure comes from ``sb.mode()``/``sb.stats`` confirming the measured epoch is stale.

Timings on a small shared machine are noisy, and ranks share its cores: under ranks the
figures are the largest over ranks, and times are upper bounds.

Writes ``scale.json`` and ``scale.md`` to ``--out`` (default runs/scale) and prints the table,
then :func:`sizing`: the measured per-example figures extrapolated to 1e9 examples on 64 ranks.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import io
import json
import os
import pickle
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sbdata import SelectiveBatchLoader

BATCH = 128
KEEP = 0.5
STALE = 3  # epoch 0 scores, epochs 1 and 2 select from cached losses
EPOCHS = 3
SIZES = [10_000, 100_000, 1_000_000, 10_000_000]
RANK_SIZES = [1_000_000, 10_000_000]
QUICK_SIZES = [2_000, 20_000]
QUICK_RANK_SIZES = [20_000]
QUICK_FRESH_MAX = 5_000
TARGET_N, TARGET_RANKS = 10**9, 64  # what sizing() extrapolates to

#####  A cheap dataset and scorer  #####


def loss_of(ids: Tensor) -> Tensor:
    """A fixed per-example loss in [0, 1): a multiplicative hash of the id (int64, exact up to ids of 2e9)."""
    return ((ids.long() * 2654435761 + 12345) % 2**32).float() / 2**32


class IdDataset(Dataset):
    """``n`` examples; example ``i`` is ``(tensor([i.]), i)``. ``__getitems__`` returns a whole
    batch at once, so loading costs next to nothing."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return torch.tensor([float(i)]), i

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        ids = torch.tensor(indices, dtype=torch.long)
        return ids.float()[:, None], ids


def as_batch(batch: Any) -> Any:
    """The DataLoader's collate_fn: ``__getitems__`` already returns a batch."""
    return batch


class IdScorer(nn.Module):
    """The scorer: maps the id inputs of a batch to their per-example losses."""

    def forward(self, ids: Tensor) -> Tensor:
        return loss_of(ids)


def score(model: nn.Module, batch: Any) -> Tensor:
    """``score_fn`` of the SelectiveBatchLoader: the batch is ``(x, ids)``."""
    return model(batch[1])


def make_loader(n: int, rank: int = 0, world: int = 1) -> DataLoader:
    """DataLoader(batch_size=128, shuffle=True), or a DistributedSampler's shard on ranks."""
    dataset = IdDataset(n)
    if world == 1:
        return DataLoader(
            dataset, batch_size=BATCH, shuffle=True, collate_fn=as_batch, generator=torch.Generator().manual_seed(0)
        )
    sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=as_batch)


def has_shard_cache() -> bool:
    return "shard_cache" in inspect.signature(SelectiveBatchLoader).parameters


def make_sb(loader: DataLoader, shard: bool = False) -> SelectiveBatchLoader:
    extra: dict[str, Any] = {"shard_cache": True} if shard else {}
    return SelectiveBatchLoader(
        loader, IdScorer(), keep=KEEP, stale=STALE, epochs=EPOCHS, policy="rank", seed=0, score_fn=score, **extra
    )


#####  Measuring helpers  #####


def state_bytes(sb: SelectiveBatchLoader) -> int:
    buffer = io.BytesIO()
    torch.save(sb.state_dict(), buffer)
    return buffer.tell()


def set_epoch(loader: DataLoader, epoch: int) -> None:
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def time_first_and_steps(
    iterable: Any, steps: int, record: Any = None, on_mid: Any = None
) -> tuple[float, float, Any, int | None]:
    """``(seconds to the first batch, seconds per batch over the next steps, iterator, peak
    RSS at the first batch)``.

    ``record(losses)`` runs after every batch (the training step's ``sb.record``);
    ``on_mid(it)`` right after the timed steps (to save a mid-epoch state)."""
    began = time.perf_counter()
    it = iter(iterable)
    batch = next(it)
    first = time.perf_counter() - began
    peak = rss_bytes("VmHWM")
    losses = loss_of(batch[1])
    if record is not None:
        record(losses)
    began = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        losses = loss_of(batch[1])  # the same cheap "training step" in both loops
        if record is not None:
            record(losses)
    per_step = (time.perf_counter() - began) / max(steps, 1)
    if on_mid is not None:
        on_mid(it)
    return first, per_step, it, peak


def finish(it: Any, record: Any = None) -> int:
    """Run the rest of an epoch; returns the batches it yielded."""
    count = 0
    for batch in it:
        count += 1
        if record is not None:
            record(loss_of(batch[1]))
    return count


def close(it: Any) -> None:
    if hasattr(it, "close"):
        it.close()


def rss_bytes(field: str = "VmRSS") -> int | None:
    """This process's resident memory (``VmHWM``: the peak since :func:`reset_peak_rss`); Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def cache_bytes(sb: SelectiveBatchLoader) -> int | None:
    """Bytes of the loss cache on this rank (``sb.cache.nbytes``), if this sbdata exposes it."""
    return getattr(getattr(sb, "cache", None), "nbytes", None)


#####  Filling the cache  #####

TEMPLATE_N = 3_000  # the small fresh run whose cache state is scaled up


def own_range(n: int, rank: int, world: int, shard: bool) -> tuple[int, int]:
    """``(first id, count)`` of the ids whose losses this rank's cache holds: all of them, or
    with ``shard_cache`` its ``torch.chunk`` slice of ``0 .. n-1`` (the layout sbdata documents)."""
    if not shard:
        return 0, n
    chunk = -(-n // world)
    first = min(rank * chunk, n)
    return first, min(first + chunk, n) - first


def template(n0: int = TEMPLATE_N, rank: int = 0, world: int = 1, shard: bool = False) -> dict[str, Any]:
    """The cache part of the state_dict after one real fresh epoch at ``n0`` examples, and the
    layout it was taken in (every rank must call it together under torch.distributed)."""
    sb = make_sb(make_loader(n0, rank, world), shard)
    set_epoch(sb.loader, 0)
    finish(iter(sb), sb.record)
    state = sb.state_dict()
    if state.get("epoch") != 1 or "cache" not in state:
        raise RuntimeError(
            f"sbdata's state_dict() layout changed: expected 'epoch' == 1 and a 'cache' entry, got keys {sorted(state)}"
        )
    return {"n0": n0, "cache": state["cache"], "rank": rank, "world": world, "shard": shard}


def scaled(part: Any, small: dict[str, Any], n: int) -> Any:
    """``part`` of the template's cache state rewritten for ``n`` examples. Every 1-D tensor as
    long as this rank's share of the template (:func:`own_range`) must be ids (global or local
    to the share), losses (``loss_of`` of the ids) or one repeated value (the epoch); the int
    ``n0`` becomes ``n`` (a dataset size or a count of measured examples). Anything else
    raises: the layout changed."""
    n0, rank, world, shard = small["n0"], small["rank"], small["world"], small["shard"]
    first0, count0 = own_range(n0, rank, world, shard)
    first, count = own_range(n, rank, world, shard)
    if isinstance(part, dict):
        return {k: scaled(v, small, n) for k, v in part.items()}
    if isinstance(part, (list, tuple)):
        return type(part)(scaled(v, small, n) for v in part)
    if isinstance(part, int) and not isinstance(part, bool) and part == n0:
        return n
    if not isinstance(part, Tensor) or part.dim() != 1 or part.numel() != count0 or count0 <= 64:
        if isinstance(part, Tensor) and part.numel() > 64:
            raise RuntimeError(f"cannot scale a cache state entry of shape {list(part.shape)} from N={n0} to N={n}")
        return part
    ids0 = torch.arange(first0, first0 + count0)
    if not part.is_floating_point() and torch.equal(part.long(), ids0):
        return torch.arange(first, first + count, dtype=part.dtype)
    if not part.is_floating_point() and torch.equal(part.long(), ids0 - first0):
        return torch.arange(count, dtype=part.dtype)
    if part.is_floating_point() and torch.equal(part, loss_of(ids0).to(part.dtype)):
        return loss_of(torch.arange(first, first + count)).to(part.dtype)
    if bool((part == part[0]).all()):
        return torch.full((count,), part[0].item(), dtype=part.dtype)
    raise RuntimeError(
        f"cannot scale a cache state entry of {count0} {part.dtype} values from N={n0} to N={n}: neither ids, "
        "losses nor one repeated value (a changed layout?); run with --fresh-max above N"
    )


def synthesized_state(sb: SelectiveBatchLoader, n: int, small: dict[str, Any]) -> dict[str, Any]:
    """``sb``'s own epoch-0 state with its cache replaced by the template's (``small``, from
    :func:`template`) scaled to ``n`` examples, and the epoch set to 1: what a fresh epoch 0
    at ``n`` leaves in the cache, since the loss of an example is a fixed function of its id.
    (The selection log of that epoch is not made up: it stays empty.)"""
    state = sb.state_dict()
    if state.get("epoch") != 0 or "cache" not in state:
        raise RuntimeError(
            f"sbdata's state_dict() layout changed: expected 'epoch' == 0 and a 'cache' entry, got keys {sorted(state)}"
        )
    state["cache"] = scaled(small["cache"], small, n)
    state["epoch"] = 1
    return state


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def check_synthesis(small: dict[str, Any], n: int) -> bool:
    """The synthesized cache state at ``n`` equals the one a real fresh epoch leaves (on this
    rank, in the template's layout; collective under torch.distributed)."""
    real = template(n, small["rank"], small["world"], small["shard"])["cache"]
    made = synthesized_state(make_sb(make_loader(n, small["rank"], small["world"]), small["shard"]), n, small)["cache"]
    if not same(real, made):
        raise AssertionError(f"the synthesized cache state differs from the one a fresh epoch leaves at N={n}")
    return True


def fill_cache(sb: SelectiveBatchLoader, n: int, small: dict[str, Any] | None, steps: int, raw_step: float) -> dict[str, Any]:
    """Bring ``sb`` to the boundary before epoch 1: a fresh epoch 0 (timing its steps), or,
    given a template ``small``, a synthesized state."""
    if small is not None:
        sb.load_state_dict(synthesized_state(sb, n, small))
        return {"cache_fill": "synthesized state"}
    set_epoch(sb.loader, 0)
    first, per_step, it, _ = time_first_and_steps(sb, steps, sb.record)
    finish(it, sb.record)
    mode = sb.stats[0].mode
    if mode != "fresh":
        raise AssertionError(f"epoch 0 ran {mode!r}, expected 'fresh'")
    return {
        "cache_fill": "fresh epoch",
        "fresh_first_batch_ms": 1e3 * first,
        "fresh_step_overhead_us": 1e6 * (per_step - raw_step),
    }


#####  One process  #####


def sync() -> None:
    """Start the ranks' timed sections together (nothing on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def measure_raw(n: int, steps: int, repeats: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """The raw DataLoader's epoch 1: first batch and per-step time (medians over ``repeats``),
    and its peak memory growth to the first batch (first repeat)."""
    loader = make_loader(n, rank, world)
    firsts, per_steps, peak = [], [], None
    for r in range(repeats):
        set_epoch(loader, 1)
        sync()
        rss_before, reset = rss_bytes(), reset_peak_rss()
        first, per_step, it, top = time_first_and_steps(loader, steps)
        if r == 0 and reset and rss_before and top:
            peak = top - rss_before
        del it
        firsts.append(first)
        per_steps.append(per_step)
    return {"first": statistics.median(firsts), "step": statistics.median(per_steps), "peak_rss": peak}


def measure_stale(sb: SelectiveBatchLoader, steps: int, full_epoch: bool = False) -> dict[str, Any]:
    """Run the stale epoch from the current (boundary) state: first batch, ``steps`` steps, a
    mid-epoch state; with ``full_epoch`` the rest of the epoch too."""
    if sb.mode(sb.epoch) != "stale":
        raise AssertionError(f"epoch {sb.epoch} is predicted {sb.mode(sb.epoch)!r}, not 'stale'")
    out: dict[str, Any] = {"epoch": sb.epoch}
    set_epoch(sb.loader, sb.epoch)

    def on_mid(it: Any) -> None:
        out["mid_state_bytes"] = state_bytes(sb)
        out["length"] = len(it)

    rss_before, reset = rss_bytes(), reset_peak_rss()
    first, per_step, it, peak = time_first_and_steps(sb, steps, sb.record, on_mid)
    out["planning_peak_rss_bytes"] = peak - rss_before if reset and peak and rss_before else None
    out.update(first=first, step=per_step, mode=sb.stats.current.mode)
    if out["mode"] != "stale":
        raise AssertionError(f"the measured epoch ran {out['mode']!r}, not 'stale'")
    if full_epoch:
        finish(it, sb.record)
    else:
        close(it)
    return out


def measure_stale_repeats(sb: SelectiveBatchLoader, steps: int, repeats: int, full_last: bool = False) -> dict[str, Any]:
    """The stale epoch ``repeats`` times from the same boundary state (medians); with
    ``full_last`` the last run goes to the epoch's end with its collectives counted."""
    boundary = sb.state_dict()
    runs = []
    for r in range(repeats):
        sb.load_state_dict(boundary)
        sync()
        if full_last and r == repeats - 1:
            with Traffic() as traffic:
                runs.append(measure_stale(sb, steps, full_epoch=True))
            runs[-1]["traffic"] = traffic.as_dict()
        else:
            runs.append(measure_stale(sb, steps))
    sync()
    peaks = [r["planning_peak_rss_bytes"] for r in runs if r["planning_peak_rss_bytes"] is not None]
    return {
        "epoch": runs[0]["epoch"],
        "mode": "stale" if all(r["mode"] == "stale" for r in runs) else "mixed",
        "first": statistics.median(r["first"] for r in runs),
        "step": statistics.median(r["step"] for r in runs),
        "mid_state_bytes": runs[0]["mid_state_bytes"],
        "length": runs[0]["length"],
        "planning_peak_rss_bytes": max(peaks) if peaks else None,
        "traffic": runs[-1].get("traffic"),
    }


def figures(n: int, raw: dict[str, Any], stale: dict[str, Any], boundary_bytes: int, sb: SelectiveBatchLoader) -> dict[str, Any]:
    """The row's figures from the raw and stale measurements."""
    return {
        "measured_epoch": stale["epoch"],
        "measured_mode": stale["mode"],
        "raw_first_batch_ms": 1e3 * raw["first"],
        "stale_first_batch_ms": 1e3 * stale["first"],
        "first_batch_ratio": stale["first"] / raw["first"],
        "raw_step_us": 1e6 * raw["step"],
        "stale_step_us": 1e6 * stale["step"],
        "stale_step_overhead_us": 1e6 * (stale["step"] - raw["step"]),
        "boundary_state_bytes": boundary_bytes,
        "mid_state_bytes": stale["mid_state_bytes"],
        "boundary_state_bytes_per_example": boundary_bytes / n,
        "mid_state_bytes_per_example": stale["mid_state_bytes"] / n,
        "cache_bytes": cache_bytes(sb),
        "raw_peak_rss_bytes": raw["peak_rss"],
        "planning_peak_rss_bytes": stale["planning_peak_rss_bytes"],
        "stale_epoch_batches": stale["length"],
    }


def measure_single(n: int, steps: int, repeats: int, small: dict[str, Any] | None) -> dict[str, Any]:
    """One process: the raw loader, then a SelectiveBatchLoader's stale epoch (``repeats``
    times, each from the same boundary state); ``small``: fill the cache from this template
    (:func:`template`) instead of a fresh epoch."""
    began = time.perf_counter()
    sb = make_sb(make_loader(n))
    steps = min(steps, len(sb.loader) - 1, sb.epoch_length(1) - 1)
    raw = measure_raw(n, steps, repeats)
    row: dict[str, Any] = {"n": n, "ranks": 1, "shard_cache": False, "steps": steps}
    row.update(fill_cache(sb, n, small, steps, raw["step"]))
    boundary_bytes = state_bytes(sb)
    stale = measure_stale_repeats(sb, steps, repeats)
    row.update(figures(n, raw, stale, boundary_bytes, sb), seconds=time.perf_counter() - began)
    return row


#####  Ranks  #####

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "broadcast",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "send", "isend", "recv", "irecv",
    "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
)  # fmt: skip


def nbytes(t: Any) -> int:
    if isinstance(t, Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(nbytes(x) for x in t)
    return 0


def pickled(obj: Any) -> int:
    try:
        return len(pickle.dumps(obj))
    except Exception:
        return 0


def own_part(t: Tensor, splits: list[int] | None, rank: int, world: int) -> int:
    """Bytes of ``t``'s rows that an all-to-all keeps on this rank."""
    rows = t.shape[0] if t.dim() else 1
    own = splits[rank] if splits else rows // world
    return nbytes(t) * own // max(rows, 1)


def payload(name: str, a: dict[str, Any], rank: int, world: int) -> tuple[int, int]:
    """``(bytes this rank sends, bytes it receives)`` for one call: the tensors it gives to and
    gets from the other ranks (its own part of a gather or all-to-all excluded), not what the
    backend's algorithm moves on the wire. Object collectives count their pickled size."""
    src = a.get("src", a.get("dst", 0))
    if name == "all_reduce":
        return nbytes(a["tensor"]), nbytes(a["tensor"])
    if name == "all_gather":
        return nbytes(a["tensor"]), nbytes(a["tensor_list"]) - nbytes(a["tensor"])
    if name == "all_gather_into_tensor":
        return nbytes(a["input_tensor"]), nbytes(a["output_tensor"]) - nbytes(a["input_tensor"])
    if name == "reduce_scatter_tensor":
        return nbytes(a["input"]) - nbytes(a["output"]), nbytes(a["output"])
    if name == "reduce_scatter":
        inputs = a["input_list"]
        return nbytes(inputs) - nbytes(inputs[rank]), nbytes(a["output"])
    if name == "all_to_all":
        inputs, outputs = a["input_tensor_list"], a["output_tensor_list"]
        return nbytes(inputs) - nbytes(inputs[rank]), nbytes(outputs) - nbytes(outputs[rank])
    if name == "all_to_all_single":
        sent = nbytes(a["input"]) - own_part(a["input"], a.get("input_split_sizes"), rank, world)
        return sent, nbytes(a["output"]) - own_part(a["output"], a.get("output_split_sizes"), rank, world)
    if name == "broadcast":
        return (nbytes(a["tensor"]), 0) if rank == src else (0, nbytes(a["tensor"]))
    if name in ("reduce", "send", "isend"):
        return nbytes(a["tensor"]), 0
    if name in ("recv", "irecv"):
        return 0, nbytes(a["tensor"])
    if name == "gather":
        return nbytes(a["tensor"]), nbytes(a.get("gather_list"))
    if name == "scatter":
        return nbytes(a.get("scatter_list")), nbytes(a["tensor"])
    if name == "broadcast_object_list":
        size = pickled(a["object_list"])
        return (size, 0) if rank == src else (0, size)
    if name == "all_gather_object":
        return pickled(a["obj"]), pickled(a["obj"]) * (world - 1)
    if name == "gather_object":
        return pickled(a["obj"]), 0
    if name == "scatter_object_list":
        return pickled(a.get("scatter_object_input_list")), 0
    return 0, 0


class Traffic:
    """While active, wraps ``torch.distributed.<collective>`` to sum what this rank sends and
    receives. sbdata calls them as ``dist.<name>`` (module attributes), so it sees the wrappers."""

    def __init__(self) -> None:
        self.sent = self.received = self.calls = 0
        self.by_name: dict[str, list[int]] = {}
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> Traffic:
        rank, world = dist.get_rank(), dist.get_world_size()
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original, rank, world))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}

    def _wrap(self, name: str, original: Any, rank: int, world: int) -> Any:
        signature = inspect.signature(original)

        def counted(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)  # first: outputs are filled in
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            sent, received = payload(name, bound.arguments, rank, world)
            self.sent += sent
            self.received += received
            self.calls += 1
            entry = self.by_name.setdefault(name, [0, 0, 0])
            entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + sent, entry[2] + received
            return result

        return counted

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "received": self.received, "calls": self.calls, "by_name": self.by_name}


def measure_rank(
    n: int, rank: int, world: int, steps: int, repeats: int, small: dict[str, Any] | None, shard: bool
) -> dict[str, Any]:
    """One rank's figures: the raw shard's first batch and steps, then the stale epoch
    (``repeats`` times; the last one whole, with its collectives counted)."""
    began = time.perf_counter()
    sb = make_sb(make_loader(n, rank, world), shard)
    steps = min(steps, len(sb.loader) - 1, sb.epoch_length(1) - 1)
    raw = measure_raw(n, steps, repeats, rank, world)
    row: dict[str, Any] = {"n": n, "ranks": world, "rank": rank, "shard_cache": shard, "steps": steps}
    with Traffic() as fill_traffic:
        row.update(fill_cache(sb, n, small, steps, raw["step"]))
    row["fill_traffic"] = fill_traffic.as_dict()
    boundary_bytes = state_bytes(sb)
    stale = measure_stale_repeats(sb, steps, repeats, full_last=True)
    row.update(figures(n, raw, stale, boundary_bytes, sb), traffic=stale["traffic"], seconds=time.perf_counter() - began)
    return row


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_entry(rank: int, world: int, port: int, jobs: list[dict[str, Any]], folder: str) -> None:
    """The body of one spawned rank: every job, then its rows as JSON in ``folder``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    rows = []
    templates = {}
    try:
        for job in jobs:
            try:
                if not job["fresh"] and job["shard"] not in templates:  # in this world's own layout, checked
                    templates[job["shard"]] = template(TEMPLATE_N, rank, world, job["shard"])
                    check_synthesis(templates[job["shard"]], 2 * TEMPLATE_N + 77)
                small = None if job["fresh"] else templates[job["shard"]]
                rows.append(measure_rank(job["n"], rank, world, job["steps"], job["repeats"], small, job["shard"]))
            except Exception as e:  # a layout change or a failed assertion: the row says so
                rows.append({"n": job["n"], "ranks": world, "rank": rank, "shard_cache": job["shard"], "error": repr(e)})
                raise
    finally:
        Path(folder, f"rank{rank}.json").write_text(json.dumps(rows))
        dist.destroy_process_group()


def run_ranks(world: int, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spawn ``world`` gloo ranks on 127.0.0.1; returns one row per job with every rank's
    figures (``per_rank``) and the worst rank's in front."""
    with tempfile.TemporaryDirectory() as folder:
        error = None
        try:
            torch.multiprocessing.spawn(rank_entry, args=(world, free_port(), jobs, folder), nprocs=world, join=True)
        except Exception as e:
            error = repr(e).splitlines()[0][:300]
        per_rank = [
            json.loads(Path(folder, f"rank{r}.json").read_text()) if Path(folder, f"rank{r}.json").exists() else []
            for r in range(world)
        ]
    rows = []
    for j, job in enumerate(jobs):
        ranks = [rows_of[j] for rows_of in per_rank if j < len(rows_of)]
        if len(ranks) < world or any("error" in r for r in ranks):
            errors = [r["error"] for r in ranks if "error" in r] or [error or "a rank died"]
            rows.append({"n": job["n"], "ranks": world, "shard_cache": job["shard"], "error": errors[0]})
            continue
        rows.append(combine_ranks(ranks))
    return rows


def combine_ranks(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for a job: the largest figure over ranks (the slowest rank sets the pace)."""
    row = {k: ranks[0][k] for k in ("n", "ranks", "shard_cache", "steps", "cache_fill", "measured_epoch")}
    row["measured_mode"] = "stale" if all(r["measured_mode"] == "stale" for r in ranks) else "mixed"
    for key in (
        "raw_first_batch_ms", "stale_first_batch_ms", "raw_step_us", "stale_step_us", "stale_step_overhead_us",
        "boundary_state_bytes", "mid_state_bytes", "boundary_state_bytes_per_example", "mid_state_bytes_per_example",
        "cache_bytes", "raw_peak_rss_bytes", "planning_peak_rss_bytes", "stale_epoch_batches",
        "fresh_first_batch_ms", "fresh_step_overhead_us", "seconds",
    ):  # fmt: skip
        values = [r[key] for r in ranks if r.get(key) is not None]
        row[key] = max(values) if values else None
    row["first_batch_ratio"] = row["stale_first_batch_ms"] / row["raw_first_batch_ms"]
    row["traffic_sent"] = max(r["traffic"]["sent"] for r in ranks)
    row["traffic_received"] = max(r["traffic"]["received"] for r in ranks)
    row["fill_traffic_received"] = max(r["fill_traffic"]["received"] for r in ranks)
    row["per_rank"] = ranks
    return row


#####  Report  #####


def _num(n: float) -> str:
    return f"{n:.0e}".replace("e+0", "e") if n >= 1e4 and float(f"{n:.0e}") == n else f"{n:,}"


def _bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| N | ranks | first batch plain / stale (ms) | ratio | step overhead stale (µs) | step overhead fresh (µs) "
        "| state B/example boundary / mid | per-rank sent / received per stale epoch "
        "| per-rank state boundary / mid | cache fill |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        ranks = str(r["ranks"]) + (" shard_cache" if r.get("shard_cache") else "")
        if r.get("na"):
            lines.append(f"| {_num(r['n'])} | {ranks} | n/a: {r['na']} |" + " |" * 7)
            continue
        if "error" in r:
            lines.append(f"| {_num(r['n'])} | {ranks} | error: {r['error'][:120]} |" + " |" * 7)
            continue
        fresh = r.get("fresh_step_overhead_us")
        traffic = "—" if r["ranks"] == 1 else f"{_bytes(r['traffic_sent'])} / {_bytes(r['traffic_received'])}"
        per_rank = "—" if r["ranks"] == 1 else f"{_bytes(r['boundary_state_bytes'])} / {_bytes(r['mid_state_bytes'])}"
        lines.append(
            f"| {_num(r['n'])} | {ranks} | {r['raw_first_batch_ms']:.1f} / {r['stale_first_batch_ms']:.1f} "
            f"| {r['first_batch_ratio']:.1f}x | {r['stale_step_overhead_us']:.0f} | {'—' if fresh is None else f'{fresh:.0f}'} "
            f"| {r['boundary_state_bytes_per_example']:.2f} / {r['mid_state_bytes_per_example']:.2f} "
            f"| {traffic} | {per_rank} | {r['cache_fill']} |"
        )
    return "\n".join(lines)


def _fit(points: list[tuple[int, int, float]]) -> tuple[float, float]:
    """``(a, b)`` of ``y = N * (a + b / W)`` through ``(N, W, y)`` points: exact through two
    rank counts at the largest N, ``y ∝ N`` (``b = 0``) from one. Negative parts are clipped."""
    top = max(n for n, _, _ in points)
    at_top = sorted({(w, y / n) for n, w, y in points if n == top})
    if len(at_top) < 2:
        return at_top[0][1], 0.0
    (w1, y1), (w2, y2) = at_top[0], at_top[-1]
    b = (y1 - y2) / (1 / w1 - 1 / w2)
    a = y1 - b / w1
    if a < 0:
        return 0.0, y1 * w1
    if b < 0:
        return max(y1, y2), 0.0
    return a, b


SIZED = (
    ("loss cache per rank", "cache_bytes", _bytes),
    ("peak RSS growth to the first batch, raw loader", "raw_peak_rss_bytes", _bytes),
    ("peak RSS growth to the first batch, stale epoch", "planning_peak_rss_bytes", _bytes),
    ("state per rank, boundary", "boundary_state_bytes", _bytes),
    ("state per rank, mid-epoch", "mid_state_bytes", _bytes),
    ("sent per rank per stale epoch", "traffic_sent", _bytes),
    ("received per rank per stale epoch", "traffic_received", _bytes),
    ("first batch, raw loader", "raw_first_batch_ms", lambda ms: f"{ms / 1e3:.3g} s"),
    ("first batch, stale epoch (planning)", "stale_first_batch_ms", lambda ms: f"{ms / 1e3:.3g} s"),
)


def others(world: int) -> float:
    """The share of an exchange that leaves a rank: ``(W - 1) / W`` (its own part stays)."""
    return (world - 1) / world


def sizing(results: dict[str, Any], n: int = TARGET_N, world: int = TARGET_RANKS) -> dict[str, Any]:
    """Per-rank memory, state, traffic and planning time at ``n`` examples on ``world`` ranks,
    extrapolated from the measured per-example figures.

    Each quantity is taken as ``N * (a + b / W)``, traffic as ``N * (W - 1) / W * (a + b / W)``
    (a rank's own part of an exchange stays home): ``a`` per example whatever the rank count
    (a replicated cache, updates every rank receives), ``b`` split over ranks. ``a`` and ``b``
    come from the 2- and 4-rank rows at the largest N measured with both (``b = 0`` with one
    rank count; single-process rows when there are no rank rows): linear in N, which holds for
    tables, states and exchanges, and for the planning time only while planning stays linear.
    Times come from ranks sharing 2 cores, so they are upper bounds."""
    rows = [r for r in results["rows"] if "error" not in r and not r.get("na")]
    out: dict[str, Any] = {"n": n, "ranks": world, "variants": {}}
    for shard in (False, True):
        pool = [r for r in rows if r["ranks"] > 1 and r["shard_cache"] == shard]
        if not pool and not shard:
            pool = [r for r in rows if r["ranks"] == 1]
        if not pool:
            continue
        variant: dict[str, Any] = {}
        for _, key, _ in SIZED:
            traffic = key.startswith("traffic")
            scale = 1e-3 if key.endswith("_ms") else 1.0  # times in seconds
            points = [
                (r["n"], r["ranks"], r[key] * scale / (others(r["ranks"]) if traffic else 1.0))
                for r in pool
                if r.get(key) is not None and r["ranks"] > (1 if traffic else 0)
            ]
            if not points:
                variant[key] = None
                continue
            a, b = _fit(points)
            value = n * (a + b / world) * (others(world) if traffic else 1.0) / scale
            variant[key] = {"per_example_any_ranks": a, "per_example_split": b, "value": value}
        out["variants"]["shard_cache" if shard else "replicated"] = variant
    return out


def sizing_table(sized: dict[str, Any]) -> str:
    variants = list(sized["variants"])
    head = f"| per rank, at {sized['n']:.0e} examples x {sized['ranks']} ranks | " + " | ".join(variants) + " |"
    lines = [head, "|---|" + "---|" * len(variants)]
    for label, key, fmt in SIZED:
        cells = []
        for v in variants:
            entry = sized["variants"][v].get(key)
            cells.append("n/a" if entry is None else fmt(entry["value"]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#####  Command line  #####


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sbdata.bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="*", default=None, help="N on one process (default 1e4 1e5 1e6 1e7)")
    parser.add_argument("--ranks", type=int, nargs="*", default=None, help="gloo rank counts (default 2 4; --quick: none)")
    parser.add_argument("--rank-sizes", type=float, nargs="*", default=None, help="N under ranks (default 1e6 1e7)")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes {QUICK_SIZES} (ranks: {QUICK_RANK_SIZES})")
    parser.add_argument("--steps", type=int, default=200, help="timed steps after the first batch (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="stale epochs timed per size on one process; median (default 3)")
    parser.add_argument("--fresh-max", type=float, default=1e6, help="fill the cache by a fresh epoch up to this N (default 1e6)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on one process (default 1; ranks use 1)")
    parser.add_argument("--out", default="runs/scale", help="output folder (default runs/scale)")
    return parser


def code_version() -> str:
    """The sbdata commit measured, and whether its files differ from it (read-only git calls)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sbdata"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip() and not line[3:].startswith("sbdata/bench/")]
    return head + (f" with uncommitted changes to {', '.join(changed)}" if changed else "") if head else "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    began, code = time.perf_counter(), code_version()  # the code as it was when the run began
    args = build_parser().parse_args(argv)
    sizes = [int(n) for n in (args.sizes if args.sizes is not None else QUICK_SIZES if args.quick else SIZES)]
    world_sizes = args.ranks if args.ranks is not None else ([] if args.quick else [2, 4])
    rank_sizes = [
        int(n) for n in (args.rank_sizes if args.rank_sizes is not None else QUICK_RANK_SIZES if args.quick else RANK_SIZES)
    ]
    fresh_max = QUICK_FRESH_MAX if args.quick and args.fresh_max == 1e6 else int(args.fresh_max)
    torch.set_num_threads(args.threads)
    shard_ok = has_shard_cache()
    print(
        f"sbdata.bench.scale: sizes {sizes}, ranks {world_sizes} at {rank_sizes}, "
        f"shard_cache {'available' if shard_ok else 'n/a'}",
        flush=True,
    )

    small, synthesis_checked = None, None
    if any(n > fresh_max for n in sizes + (rank_sizes if world_sizes else [])):
        small = template()
        synthesis_checked = check_synthesis(small, 2 * TEMPLATE_N + 77)  # another N, not a multiple of 128
    rows = []
    for n in sizes:
        row = measure_single(n, args.steps, args.repeats, None if n <= fresh_max else small)
        rows.append(row)
        print(f"  N={_num(n)}, 1 process: first batch {row['raw_first_batch_ms']:.1f} ms plain, "
              f"{row['stale_first_batch_ms']:.1f} ms stale ({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    for world in world_sizes:
        common = {"steps": args.steps, "repeats": args.repeats}
        jobs = [{"n": n, "fresh": n <= fresh_max, "shard": False, **common} for n in rank_sizes]
        jobs += [{"n": n, "fresh": n <= fresh_max, "shard": True, **common} for n in rank_sizes if shard_ok]
        t0 = time.perf_counter()
        rows += run_ranks(world, jobs)
        if not shard_ok:
            rows += [{"n": n, "ranks": world, "shard_cache": True, "na": "this sbdata has no shard_cache"} for n in rank_sizes]
        print(f"  {world} ranks at {rank_sizes}: {time.perf_counter() - t0:.0f} s", flush=True)

    results: dict[str, Any] = {
        "meta": {
            "command": "python -m sbdata.bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
            "code": code,
            "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}",
            "settings": {
                "batch_size": BATCH,
                "keep": KEEP,
                "stale": STALE,
                "epochs": EPOCHS,
                "policy": "rank",
                "steps": args.steps,
                "repeats": args.repeats,
                "fresh_max": fresh_max,
            },  # fmt: skip
            "shard_cache_available": shard_ok,
            "synthesis_checked": synthesis_checked,
        },
        "rows": rows,
    }
    results["sizing"] = sizing(results)
    results["meta"]["seconds"] = time.perf_counter() - began
    write(results, Path(args.out))
    return results


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = results["meta"]
    table = markdown_table(results["rows"])
    sized = sizing_table(results["sizing"])
    text = "\n".join([
        "# sbdata scale benchmark\n",
        f"`{meta['command']}` on {meta['machine']}, sbdata {meta['code']}, {meta['seconds']:.0f} s. "
        f"Settings: `{json.dumps(meta['settings'])}`.\n",
        "First batch: `iter()` to the first batch of the stale epoch (SB) and of a plain epoch of the raw DataLoader. "
        "Step overhead: SB time per batch (next + record) minus the raw loader's (next), over the timed steps. "
        "Under ranks every figure is the largest over ranks; traffic counts the tensors each rank puts into and "
        "gets out of torch.distributed collectives during one whole stale epoch (its own part of a gather or "
        "all-to-all excluded). Synthesized rows: the cache a fresh epoch 0 leaves, loaded with load_state_dict() "
        "(checked equal to a real one at a small N); their boundary state has no selection log of epoch 0.\n",
        table,
        "\nExtrapolated per rank (sizing(): linear in N, `N * (a + b / W)` fitted on the 2- and 4-rank rows):\n",
        sized,
        "",
    ])  # fmt: skip
    (out / "scale.json").write_text(json.dumps(results, indent=1))
    (out / "scale.md").write_text(text)
    print("\n" + table + "\n\n" + sized)
    print(f"\nwrote {out}/scale.json and scale.md; total {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
