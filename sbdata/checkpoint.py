"""Sharded checkpoints of a ``SelectiveBatchLoader(..., shard_cache=True)``.

With a sharded loss cache (NOTE [ Sharded loss cache ] in :mod:`sbdata.sharded`) no rank
holds the whole state, so one rank's ``state_dict()`` cannot resume a job. These two
functions save and load every rank's shard with ``torch.distributed.checkpoint`` (DCP), the
engine PyTorch already uses for sharded model state: the cache is written as two ``DTensor``
columns (``float32`` loss, ``int32`` epoch, sharded ``Shard(0)`` by id), so DCP reshards it
on load and the job resumes on any number of ranks, or on one process. Everything else
(schedule position, policy, statistics) is rank 0's, as for a replicated checkpoint::

    sbdata.checkpoint.save(sb, "ckpt/sb")        # every rank, at an epoch boundary
    sbdata.checkpoint.load(sb, "ckpt/sb")        # every rank, any world size

Call both on every rank (they are collective), between epochs (or right after an epoch's last
batch): a mid-epoch position belongs to one rank and one world size, so it is refused here.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from . import distributed as dist_utils
from .sharded import ShardedLossCache

__all__ = ["load", "save"]


def save(sb: Any, path: str | os.PathLike[str]) -> None:
    """Write ``sb``'s state, every rank's cache shard included, to the DCP folder ``path``."""
    import torch.distributed.checkpoint as dcp

    cache = _sharded_cache(sb, "save")
    state = sb.state_dict()
    if state["position"] is not None:
        raise ValueError(
            f"sbdata.checkpoint.save() takes epoch-boundary checkpoints, and epoch {state['epoch']} is in "
            "progress; save after the epoch's last batch (or between epochs)"
        )
    losses, epochs = cache.dense()
    contents: dict[str, Any] = {"cache": {"loss": _global(losses, cache), "epoch": _global(epochs, cache)}}
    if dist_utils.rank() == 0:  # one copy of what every rank shares
        contents["meta"] = _pickled({**state, "cache": None})
    with _single_process_quietly():
        dcp.save(contents, checkpoint_id=os.fspath(path), no_dist=not dist_utils.is_distributed())


def load(sb: Any, path: str | os.PathLike[str]) -> None:
    """Resume ``sb`` from a :func:`save` folder, on this job's number of ranks."""
    import torch.distributed.checkpoint as dcp

    cache = _sharded_cache(sb, "load")
    size = cache.stop - cache.start
    losses, epochs = torch.zeros(size), torch.full((size,), -1, dtype=torch.int32)
    contents: dict[str, Any] = {
        "cache": {"loss": _global(losses, cache), "epoch": _global(epochs, cache)},
        "meta": io.BytesIO(),
    }
    with _single_process_quietly():
        dcp.load(contents, checkpoint_id=os.fspath(path), no_dist=not dist_utils.is_distributed())
    contents["meta"].seek(0)
    state = torch.load(contents["meta"], weights_only=True)
    sb.load_state_dict(state)  # everything but the cache (saved as None)
    cache.load_dense(_local(contents["cache"]["loss"]), _local(contents["cache"]["epoch"]))


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns that it assumes a single process when torch.distributed is not initialized;
    here that is the intent (``no_dist``), so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _sharded_cache(sb: Any, verb: str) -> ShardedLossCache:
    if not isinstance(sb.cache, ShardedLossCache):
        raise ValueError(
            f"sbdata.checkpoint.{verb}() is for SelectiveBatchLoader(..., shard_cache=True); a loader with a "
            "replicated cache is checkpointed with torch.save(sb.state_dict(), path) on rank 0"
        )
    return sb.cache


def _global(local: Tensor, cache: ShardedLossCache) -> Any:
    """This rank's rows as its ``Shard(0)`` of a global ``[num_examples]`` tensor (a plain
    tensor on one process)."""
    if not dist_utils.is_distributed():
        return local
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = DeviceMesh("cpu", list(range(dist_utils.world_size())))
    shape = torch.Size([cache.num_examples])
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=(1,))


def _local(t: Any) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _pickled(state: dict[str, Any]) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer
