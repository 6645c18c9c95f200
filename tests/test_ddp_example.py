"""The DDP example under the real torchrun launcher, 2 CPU processes (gloo on 127.0.0.1):
an uninterrupted run, and a run stopped after a checkpoint then resumed in a new launch, which
must train on exactly the same batches, rank by rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .distributed_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ddp_train.py"
EPOCHS = 3
LAUNCH_TIMEOUT = 180  # seconds per torchrun launch; about 10 s each on an idle 2-core machine


def _descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (Linux /proc; empty elsewhere). torchrun starts its workers
    in new sessions, so killing torchrun's process group would not reach them."""
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


def torchrun(*script_args: str, tmp_path: Path) -> str:
    """``torchrun --nproc_per_node=2`` on loopback; returns stdout. Bounded: on a timeout torchrun
    and the workers it started are killed and the test fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",  # the torchrun entry point
        "--nnodes=1", "--nproc_per_node=2", "--max_restarts=0",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(SCRIPT), "--smoke", f"--epochs={EPOCHS}", f"--data-dir={tmp_path / 'data'}", *script_args,
    ]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on loopback too
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
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
        pytest.fail(f"torchrun {' '.join(script_args)} timed out after {LAUNCH_TIMEOUT}s\n{out}\n{err}")
    assert proc.returncode == 0, f"torchrun {' '.join(script_args)} failed:\n{out}\n{err}"
    return out


def batch_ids(path: Path) -> dict[int, dict[int, list[list[int]]]]:
    """rank -> epoch -> the example ids of each batch that rank trained on; checks 2 distinct processes."""
    dump = json.loads(path.read_text())
    assert dump["world_size"] == 2
    ranks = dump["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"], "both ranks ran"
    return {r["rank"]: {int(e): batches for e, batches in r["epochs"].items()} for r in ranks}


def epoch_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("epoch ")]


@pytest.mark.timeout(4 * LAUNCH_TIMEOUT)
def test_ddp_example_resumes_from_an_epoch_checkpoint_on_the_same_batches(tmp_path: Path) -> None:
    pytest.importorskip("mnist1d")
    ckpt = tmp_path / "ckpt.pt"

    # the reference: 3 epochs in one launch
    full_out = torchrun(f"--dump-ids={tmp_path / 'full.json'}", tmp_path=tmp_path)
    assert [line[:12] for line in epoch_lines(full_out)] == ["epoch  0 fre", "epoch  1 sta", "epoch  2 sta"]
    assert "2 ranks: test accuracy" in full_out
    full = batch_ids(tmp_path / "full.json")

    # (a) the same schedule, stopped after epoch 1 with a checkpoint
    first_out = torchrun(f"--save={ckpt}", "--stop-after=2", f"--dump-ids={tmp_path / 'a.json'}", tmp_path=tmp_path)
    assert [line[:8] for line in epoch_lines(first_out)] == ["epoch  0", "epoch  1"]
    assert ckpt.exists() and not ckpt.with_name("ckpt.pt.tmp").exists()
    first = batch_ids(tmp_path / "a.json")

    # (b) a new launch resumes from it: every rank loads rank 0's epoch-boundary state
    resumed_out = torchrun(f"--save={ckpt}", f"--resume={ckpt}", f"--dump-ids={tmp_path / 'b.json'}", tmp_path=tmp_path)
    assert "epoch 1 done, continuing at epoch 2" in resumed_out
    assert [line[:8] for line in epoch_lines(resumed_out)] == ["epoch  2"], resumed_out
    assert "2 ranks: test accuracy" in resumed_out
    resumed = batch_ids(tmp_path / "b.json")

    for rank in (0, 1):
        assert sorted(full[rank]) == [0, 1, 2]
        assert sorted(first[rank]) == [0, 1] and sorted(resumed[rank]) == [2]
        for epoch in range(EPOCHS):
            run = first if epoch < 2 else resumed
            assert run[rank][epoch] == full[rank][epoch], f"rank {rank}, epoch {epoch}: other batches than uninterrupted"
    # the ranks trained on disjoint examples in each epoch (one global selection, split)
    for epoch in range(EPOCHS):
        ids = [set(i for batch in full[rank][epoch] for i in batch) for rank in (0, 1)]
        assert ids[0] and ids[1] and not ids[0] & ids[1], f"epoch {epoch}"
    # the resumed run's checkpoint moved on to epoch 2
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
