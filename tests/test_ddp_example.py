"""The DDP example under the real torchrun launcher, 2 CPU processes (gloo on 127.0.0.1):
an uninterrupted run, and a run stopped after a checkpoint then resumed in a new launch, which
must train on exactly the same batches, rank by rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .distributed_helpers import run_torchrun

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ddp_train.py"
EPOCHS = 3
LAUNCH_TIMEOUT = 180  # seconds per torchrun launch; about 10 s each on an idle 2-core machine


def torchrun(*script_args: str, tmp_path: Path) -> str:
    """``torchrun --nproc_per_node=2`` on loopback; returns stdout. Bounded: on a timeout torchrun
    and the workers it started are killed and the test fails."""
    args = ["--smoke", f"--epochs={EPOCHS}", f"--data-dir={tmp_path / 'data'}", *script_args]
    code, out, err = run_torchrun(SCRIPT, args, nproc=2, cwd=tmp_path, timeout=LAUNCH_TIMEOUT)
    if code is None:
        pytest.fail(f"torchrun {' '.join(script_args)} timed out after {LAUNCH_TIMEOUT}s\n{out}\n{err}")
    assert code == 0, f"torchrun {' '.join(script_args)} failed:\n{out}\n{err}"
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
