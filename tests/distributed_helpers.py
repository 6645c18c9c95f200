"""Run a function on 2 CPU processes joined by gloo on 127.0.0.1, bounded by a timeout."""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable[[int, int], Any], rank: int, world: int, port: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
        buffer = io.BytesIO()  # plain bytes: tensors in a queue would need the sender alive
        torch.save(fn(rank, world), buffer)
        out.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report everything, the parent fails the test
        out.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_two_ranks(fn: Callable[[int, int], Any], timeout: float = 120.0) -> list[Any]:
    """``[fn(0, 2), fn(1, 2)]`` computed in two forked processes; a hang fails, never blocks."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in procs:
            rank, status, value = out.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            else:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    except Exception as e:  # queue.Empty: a rank hung
        errors.append(f"timed out after {timeout}s waiting for the ranks ({type(e).__name__})")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[0], results[1]]
