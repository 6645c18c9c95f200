"""Small benchmark datasets as in-memory tensors: MNIST-1D and scikit-learn's 8x8 digits.

Both are made on this machine, with no network access: MNIST-1D is generated from its
templates by the ``mnist1d`` package (and cached as an ``.npz``, since generating a large set
takes a few seconds), and the digits ship inside scikit-learn. Install them with
``pip install 'sbdata[bench]'``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["default_cache_dir", "load_digits", "load_mnist1d"]

Split = tuple[Tensor, Tensor, Tensor, Tensor]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sbdata``, or ``~/.cache/sbdata``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sbdata"


def load_mnist1d(
    num_samples: int = 5000, seed: int = 42, cache_dir: str | os.PathLike[str] | None = None
) -> Split:
    """MNIST-1D (Greydanus 2020), generated offline and cached.

    The set is made by ``mnist1d.data.make_dataset`` with the package's default arguments
    except ``num_samples`` and ``seed``; 80 % of it is the training split, as in the package.
    It is never downloaded. The arrays are cached in ``cache_dir`` (default
    :func:`default_cache_dir`) as ``mnist1d-n{num_samples}-seed{seed}.npz`` and read from there
    on later calls.

    Args:
        num_samples: examples in both splits together; a multiple of 10 (one tenth per class).
        seed: the generator's seed; the same seed gives the same arrays.
        cache_dir: where the ``.npz`` lives.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: inputs are ``float32`` of shape ``(N, 1, 40)``
        (one channel, ready for ``nn.Conv1d``), labels ``int64`` of shape ``(N,)``.

    Raises:
        ImportError: ``mnist1d`` is not installed and the arrays are not cached.
        ValueError: ``num_samples`` is not a positive multiple of 10.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10 or num_samples % 10:
        raise ValueError(
            f"num_samples must be a positive multiple of 10 (MNIST-1D has 10 equal classes), "
            f"got num_samples={num_samples!r}"
        )
    path = Path(cache_dir if cache_dir is not None else default_cache_dir())
    path = path.expanduser() / f"mnist1d-n{num_samples}-seed{seed}.npz"
    if path.exists():
        with np.load(path) as arrays:
            data = {k: arrays[k] for k in ("x", "y", "x_test", "y_test")}
    else:
        data = _generate_mnist1d(num_samples, seed)
        _save_npz(path, data)
    return (
        torch.from_numpy(data["x"]).float().unsqueeze(1),
        torch.from_numpy(data["y"]).long(),
        torch.from_numpy(data["x_test"]).float().unsqueeze(1),
        torch.from_numpy(data["y_test"]).long(),
    )


def _generate_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError("load_mnist1d needs the mnist1d package: pip install 'sbdata[bench]'") from e
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    # make_dataset reseeds Python's and NumPy's global generators; put them back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        dataset = make_dataset(args)  # make_dataset generates; get_dataset would try to download
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: np.asarray(dataset[k]) for k in ("x", "y", "x_test", "y_test")}


def _save_npz(path: Path, data: dict[str, np.ndarray]) -> None:
    # Write to a temporary name and rename, so a concurrent reader never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **data)  # type: ignore[arg-type]
    os.replace(tmp, path)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's 8x8 handwritten digits (1797 images, bundled with scikit-learn).

    Args:
        test_fraction: share of the images held out for testing, in (0, 1).
        seed: seed of the random train/test split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images are ``float32`` of shape ``(N, 1, 8, 8)``
        scaled to [0, 1], labels ``int64`` of shape ``(N,)``.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: ``test_fraction`` is outside (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got test_fraction={test_fraction!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise ImportError("load_digits needs scikit-learn: pip install 'sbdata[bench]'") from e
    digits = sklearn_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # pixel values are 0..16
    y = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
