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

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_variable", "all_reduce_int", "is_distributed", "rank", "world_size"]


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
