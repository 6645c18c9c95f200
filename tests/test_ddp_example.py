"""The DDP example runs under torchrun with 2 CPU processes (gloo on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .distributed_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_example_runs_under_torchrun_on_two_cpu_processes():
    pytest.importorskip("mnist1d")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(ROOT / "examples" / "ddp_train.py"), "--smoke",
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "epoch  1 stale" in done.stdout
    assert "2 ranks: test accuracy" in done.stdout
