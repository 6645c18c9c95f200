"""``torch.distributed`` helpers; every function is a no-op on a single process.

NOTE [ Equal batches on every rank ]
Under DDP each backward pass is an all-reduce, so a rank that yields one batch more than the
others hangs the job. sbdata keeps the counts equal in two ways. For exact-count policies
the count is known before the epoch: the ranks agree on the smallest ``len`` and stop there.
For probabilistic policies, the ranks agree batch by batch (one all-reduce of a single
integer per yielded batch) and stop together as soon as any rank runs out; the surplus rows
a rank had ready are dropped (counted in ``stats.dropped``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .cache import LossCache, Update, stack_updates

__all__ = [
    "all_gather_variable",
    "all_reduce_int",
    "equal_batch_counts",
    "exchange",
    "reply",
    "check_shared_id_space",
    "is_distributed",
    "rank",
    "share_cache_updates",
    "share_policy_state",
    "world_size",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo and others take CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_int(value: int, op: str = "min") -> int:
    """``value`` reduced over ranks with ``"min"``, ``"max"`` or ``"sum"``."""
    if not is_distributed():
        return value
    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=ops[op])
    return int(t.item())


def all_gather_variable(t: Tensor) -> list[Tensor]:
    """Every rank's 1-D tensor ``t`` (lengths may differ), in rank order, on the CPU.

    Integers stay integers: ids are never packed into float tensors.
    """
    if not is_distributed():
        return [t.cpu()]
    device = _comm_device()
    t = t.flatten().to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.numel()], dtype=torch.int64, device=device))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=t.dtype, device=device)
    padded[: t.numel()] = t
    gathered = [torch.zeros(longest, dtype=t.dtype, device=device) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return [g[: int(s.item())].cpu() for g, s in zip(gathered, sizes)]


def equal_batch_counts(
    stream: Iterator[Any], local_count: int | None, drop_surplus: Callable[[Any | None], None]
) -> Iterator[Any]:
    """Yield from ``stream`` so that every rank yields the same number of batches.

    ``local_count`` is the number of batches this rank's stream will yield, or ``None`` when
    it cannot be known in advance (probabilistic policies). If every rank knows its count, all
    stop at the smallest; otherwise the ranks agree batch by batch and stop as soon as one
    runs out. ``drop_surplus(batch)`` is told about the batch (``None``: the rows still
    buffered) a rank had ready when it had to stop. ``stream`` is closed either way.
    """
    known = -1 if local_count is None else local_count
    low, high = all_reduce_int(known, "min"), all_reduce_int(known, "max")
    try:
        if low >= 0:
            yielded = 0
            for batch in stream:
                if yielded == low:
                    drop_surplus(batch)
                    return
                yielded += 1
                yield batch
            if high != low:
                drop_surplus(None)
            return
        for batch in stream:
            if all_reduce_int(1, "min") == 0:  # another rank ran out
                drop_surplus(batch)
                return
            yield batch
        all_reduce_int(0, "min")  # tell the others this rank ran out
    finally:
        stream.close()  # type: ignore[attr-defined]


def check_shared_id_space(candidates: int, num_examples: int | None) -> None:
    """Refuse ranks whose candidates overlap by more than ``DistributedSampler``'s padding (at
    most ``world - 1`` repeated ids), from one all-reduce of the counts: the ids are dataset
    indices, so more candidates over all ranks than examples means each rank wraps its own
    dataset with ids local to it, and the shared loss cache would mix up their examples."""
    if not is_distributed() or num_examples is None:
        return
    total = all_reduce_int(candidates, "sum")
    if total > num_examples + world_size() - 1:
        raise ValueError(
            f"stale mode under torch.distributed keeps one loss cache over one id space shared by every rank, "
            f"but the ranks have {total} candidates this epoch for a dataset of {num_examples} examples, so "
            f"{total - num_examples} example ids are candidates on more than one rank: each rank seems to wrap "
            "its own dataset with ids local to it. Shard one dataset with a DistributedSampler, or give every "
            "example a global id (e.g. the rank's offset plus the local index) and pass index_key= to locate it "
            "in the batch"
        )


def exchange(
    dest: Tensor, tensors: list[Tensor], grouped: bool = False
) -> tuple[list[Tensor], tuple[list[int], list[int]]]:
    """Send element ``i`` of every tensor in ``tensors`` to rank ``dest[i]``, with
    ``all_to_all_single`` (one call per tensor, after one for the counts). Returns what this
    rank received, in the order of the ranks that sent it (each sender's elements in their
    order), and the ``(sent, received)`` counts per rank, for :func:`reply`. ``grouped``:
    ``dest`` is already ascending (no reordering needed)."""
    world = world_size()
    sent = torch.bincount(dest, minlength=world)[:world] if dest.numel() else torch.zeros(world, dtype=torch.long)
    if not grouped:
        order = torch.argsort(dest, stable=True)
        tensors = [t[order] for t in tensors]
    if not is_distributed():
        return tensors, (sent.tolist(), sent.tolist())
    device = _comm_device()
    received = torch.empty(world, dtype=torch.long, device=device)
    dist.all_to_all_single(received, sent.to(device))
    splits = (sent.tolist(), received.cpu().tolist())
    return [_all_to_all(t, *splits) for t in tensors], splits


def reply(tensors: list[Tensor], splits: tuple[list[int], list[int]]) -> list[Tensor]:
    """Send answers back along an :func:`exchange`: ``tensors`` hold one answer per element
    this rank received; each rank gets its answers in the order it sent the questions
    (grouped by the rank that answered)."""
    if not is_distributed():
        return tensors
    sent, received = splits
    return [_all_to_all(t, received, sent) for t in tensors]


def _all_to_all(t: Tensor, send: list[int], receive: list[int]) -> Tensor:
    device = _comm_device()
    out = torch.empty(sum(receive), dtype=t.dtype, device=device)
    dist.all_to_all_single(out, t.contiguous().to(device), output_split_sizes=receive, input_split_sizes=send)
    return out.cpu()


def broadcast_tensor(t: Tensor) -> Tensor:
    """Rank 0's ``t`` on every rank (shapes may differ between ranks; dtypes may not)."""
    device = _comm_device()
    shape = torch.zeros(8, dtype=torch.int64, device=device)
    shape[0] = t.dim()
    shape[1 : 1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.broadcast(shape, src=0)
    size = [int(n) for n in shape[1 : 1 + int(shape[0])].tolist()]
    out = t.to(device).contiguous() if rank() == 0 else torch.empty(size, dtype=t.dtype, device=device)
    dist.broadcast(out, src=0)
    return out.cpu()


def share_policy_state(policy: Any) -> None:
    """Give every rank rank 0's policy state, so a stateful policy decides alike everywhere
    and rank 0's checkpoint holds every rank's policy state.

    A state of tensors (every built-in policy's) travels as tensors; any other state through
    ``broadcast_object_list``. (Each ``broadcast_object_list`` call leaves cyclic garbage, a
    pickler class, behind; collected after ``destroy_process_group`` it could make gloo abort
    at exit, so the common case avoids it.)"""
    if not is_distributed():
        return
    state = policy.state_dict()
    if all(isinstance(v, Tensor) and v.dim() <= 7 for v in state.values()):
        policy.load_state_dict({k: broadcast_tensor(v) for k, v in sorted(state.items())})
        return
    boxed = [state]
    dist.broadcast_object_list(boxed, src=0)
    policy.load_state_dict(boxed[0])


def share_cache_updates(cache: LossCache, pending: list[Update]) -> None:
    """All-gather every rank's ``(ids, losses, epoch)`` cache updates and apply them all, in
    rank order, so every rank ends with the same cache. Ids travel as ``int64``, losses as
    ``float32`` and epochs as ``int32``, in three tensors."""
    ids, losses, epochs = stack_updates(pending)
    gathered = zip(all_gather_variable(ids), all_gather_variable(losses), all_gather_variable(epochs))
    for r_ids, r_losses, r_epochs in gathered:
        cache.update_each(r_ids, r_losses, r_epochs)
