"""The examples run end to end, and the benchmark datasets have the promised shapes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sbdata

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_smoke_run_trains_both_ways_and_prints_both_accuracies(tmp_path):
    pytest.importorskip("mnist1d")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--smoke", "--data-dir", str(tmp_path)],
        cwd=tmp_path,  # the script must not depend on the working directory or write into it
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"quickstart failed:\n{result.stdout}\n{result.stderr}"
    lines = result.stdout.splitlines()
    assert any(line.startswith("plain") and "test accuracy" in line for line in lines), result.stdout
    assert any(line.startswith("selective") and "test accuracy" in line for line in lines), result.stdout
    assert list(tmp_path.glob("mnist1d-*.npz")), "the generated data set was not cached in --data-dir"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".npz")) == []


def test_load_mnist1d_gives_float_signals_and_int_labels_and_caches_them(tmp_path):
    pytest.importorskip("mnist1d")
    from sbdata.datasets import load_mnist1d

    x_train, y_train, x_test, y_test = load_mnist1d(num_samples=200, seed=3, cache_dir=tmp_path)
    assert x_train.shape == (160, 1, 40) and x_test.shape == (40, 1, 40)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.shape == (160,) and y_test.shape == (40,)
    assert y_train.dtype == y_test.dtype == torch.int64
    assert set(torch.cat([y_train, y_test]).tolist()) <= set(range(10))
    assert (tmp_path / "mnist1d-n200-seed3.npz").exists()

    again = load_mnist1d(num_samples=200, seed=3, cache_dir=tmp_path)  # from the cache
    for a, b in zip((x_train, y_train, x_test, y_test), again):
        assert torch.equal(a, b)


def test_load_mnist1d_leaves_the_global_numpy_generator_alone(tmp_path):
    pytest.importorskip("mnist1d")
    import numpy as np

    from sbdata.datasets import load_mnist1d

    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    load_mnist1d(num_samples=100, seed=0, cache_dir=tmp_path)
    assert np.random.rand() == expected


def test_load_mnist1d_rejects_a_sample_count_that_is_not_a_multiple_of_ten(tmp_path):
    from sbdata.datasets import load_mnist1d

    with pytest.raises(ValueError, match="num_samples"):
        load_mnist1d(num_samples=105, cache_dir=tmp_path)


def test_load_digits_gives_8x8_images_in_unit_range_with_a_seeded_split():
    pytest.importorskip("sklearn")
    from sbdata.datasets import load_digits

    x_train, y_train, x_test, y_test = load_digits(test_fraction=0.25, seed=0)
    assert x_train.shape[1:] == x_test.shape[1:] == (1, 8, 8)
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == round(0.25 * 1797)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    assert len(y_train) == len(x_train) and len(y_test) == len(x_test)

    same = load_digits(test_fraction=0.25, seed=0)
    other = load_digits(test_fraction=0.25, seed=1)
    assert torch.equal(same[3], y_test)
    assert not torch.equal(other[2], x_test)


# ---------------------------------------------------------------- the Lightning example

LIGHTNING_SCRIPT = ROOT / "examples" / "lightning_mnist1d.py"
LIGHTNING_TIMEOUT = 240  # seconds per run; about 15 s each on an idle 2-core machine (importing Lightning is most of it)


def run_lightning_example(*args: str, cwd: Path) -> str:
    """``python examples/lightning_mnist1d.py --smoke ...`` in a subprocess (on the CPU); returns stdout."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        CUDA_VISIBLE_DEVICES="",  # the same arithmetic in every run, whatever the machine
    )
    cmd = [sys.executable, str(LIGHTNING_SCRIPT), "--smoke", "--data-dir", str(cwd / "data"), *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=LIGHTNING_TIMEOUT)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def lightning_report(out: str) -> dict[str, object]:
    """The epochs trained, the final step count and the final test metrics of a run's stdout."""
    steps = re.search(r"trained to epoch (\d+) of (\d+), step (\d+) of (\d+)", out)
    final = re.search(r"test accuracy +([\d.]+) %  test loss ([\d.]+)  train time +([\d.]+) s", out)
    assert steps and final, out
    epochs = [line.split() for line in out.splitlines() if line.startswith("epoch ")]  # epoch E MODE: B batches
    return {
        "epochs": [int(e[1]) for e in epochs], "modes": [e[2].rstrip(":") for e in epochs],
        "batches": [int(e[3]) for e in epochs],
        "epoch": int(steps[1]), "of_epochs": int(steps[2]), "step": int(steps[3]), "total_steps": int(steps[4]),
        "test_loss": final[2],
    }  # fmt: skip


@pytest.fixture(scope="module")
def lightning_uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    pytest.importorskip("lightning")
    pytest.importorskip("mnist1d")
    tmp = tmp_path_factory.mktemp("lightning_full")
    report = lightning_report(run_lightning_example("--out-dir", str(tmp / "run"), cwd=tmp))
    assert sorted(p.name for p in tmp.iterdir()) == ["data", "run"], "wrote outside --data-dir and --out-dir"
    return report


@pytest.mark.timeout(3 * LIGHTNING_TIMEOUT + 60)  # the shared uninterrupted run may be set up here
def test_lightning_example_smoke_run_trains_every_epoch_in_full_and_reports(lightning_uninterrupted):
    report = lightning_uninterrupted
    # --smoke: 3 plain epochs, which the default "lossless" recipe turns into its own budget
    epochs = sbdata.recipe("lossless", 3)["epochs"]
    assert epochs >= 3 and report["epochs"] == list(range(epochs)) and report["epoch"] == report["of_epochs"] == epochs
    # one plain warm-up epoch, then selective ones, which are shorter: every epoch ran its own
    # length (SelectiveBackprop), and together they made the steps loader.total_steps() planned
    assert report["modes"] == ["plain"] + ["stale"] * (epochs - 1), report
    assert report["batches"][0] > report["batches"][1] > 0 and len(set(report["batches"][1:])) == 1
    assert report["step"] == report["total_steps"] == sum(report["batches"])


@pytest.mark.timeout(3 * LIGHTNING_TIMEOUT + 60)
def test_lightning_example_resumes_from_its_last_checkpoint_exactly(lightning_uninterrupted, tmp_path):
    out_dir = tmp_path / "run"
    first = lightning_report(run_lightning_example("--out-dir", str(out_dir), "--stop-after", "2", cwd=tmp_path))
    assert first["epochs"] == [0, 1] and first["epoch"] == 2 and first["step"] < first["total_steps"]
    last = out_dir / "checkpoints" / "last.ckpt"
    assert last.exists(), "ModelCheckpoint(save_last=True) wrote no last.ckpt"

    out = run_lightning_example("--out-dir", str(out_dir), "--resume", str(last), cwd=tmp_path)
    resumed = lightning_report(out)
    assert f"resuming from {last}" in out
    epochs = sbdata.recipe("lossless", 3)["epochs"]
    assert resumed["epochs"] == list(range(2, epochs)), "the resumed run trains only the epochs left"
    assert resumed["epoch"] == resumed["of_epochs"] == epochs and resumed["step"] == resumed["total_steps"]
    # the same batches, weights and LR schedule as the uninterrupted run: the same final test loss
    assert resumed["test_loss"] == lightning_uninterrupted["test_loss"]
