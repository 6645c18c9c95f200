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


def _descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (Linux /proc; empty elsewhere). torchrun starts its workers
    in new sessions, so killing torchrun's process group would not reach them."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_torchrun(script: Any, args: list[str], *, nproc: int, cwd: Any, timeout: float) -> tuple[int | None, str, str]:
    """``torchrun --nproc_per_node=nproc script *args`` on CPU and loopback only.

    Returns ``(returncode, stdout, stderr)``; ``returncode`` is ``None`` when the launch ran past
    ``timeout``, after which torchrun and every worker it started have been killed.
    """
    import signal
    import subprocess
    import sys
    from pathlib import Path

    cmd = [
        sys.executable, "-m", "torch.distributed.run",  # the torchrun entry point
        "--nnodes=1", f"--nproc_per_node={nproc}", "--max_restarts=0",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args,
    ]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on loopback too
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        workers = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # torchrun stops its workers on SIGTERM
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            for pid in [*workers, proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out, err = proc.communicate()
        return None, out, err
