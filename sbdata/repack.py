"""Re-packing: selected rows from consecutive source batches fill fixed-size output batches.

NOTE [ One copy, no views ]
Each selected row is copied exactly once, straight from the source batch into a freshly
allocated output batch. Nothing keeps a view into a source batch, so a loader that recycles
its buffers (FFCV) can overwrite them as soon as the next batch is requested. Output
batches are never reused either: the training loop may keep them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .batches import flatten, unflatten

__all__ = ["Repacker", "count_output_batches"]


def count_output_batches(
    kept_per_batch: Iterable[int], batch_size: int, last_batch: str, carried: int = 0
) -> int:
    """Batches an epoch yields when ``kept_per_batch`` rows are selected from each source
    batch, starting with ``carried`` rows left over from the previous epoch."""
    total = carried + sum(kept_per_batch)
    full, rest = divmod(total, batch_size)
    return full + (1 if last_batch == "yield" and rest > 0 else 0)


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _allocate(leaf: Any, batch_size: int) -> Any:
    if isinstance(leaf, Tensor):
        return torch.empty(
            (batch_size, *leaf.shape[1:]),
            dtype=leaf.dtype,
            device=leaf.device,
            memory_format=_memory_format(leaf),
        )
    return [None] * batch_size


def _copy_rows(dest: Any, at: int, leaf: Any, rows: Tensor) -> None:
    count = rows.numel()
    if isinstance(dest, Tensor):
        target = dest[at : at + count]
        if target.is_contiguous():
            torch.index_select(leaf, 0, rows.to(leaf.device), out=target)
        else:  # channels_last: gather keeps the layout, then one more copy into place
            target.copy_(leaf[rows.to(leaf.device)])
    else:
        for offset, row in enumerate(rows.tolist()):
            dest[at + offset] = leaf[row]


def _shrink(leaf: Any, count: int, like: Any) -> Any:
    if isinstance(leaf, Tensor):
        return leaf[:count]
    return type(like)(leaf[:count]) if isinstance(like, tuple) else leaf[:count]


class Repacker:
    """Collects selected rows and hands out full batches of ``batch_size``.

    ``add(batch, rows)`` copies ``batch``'s rows at positions ``rows`` into the pending output
    batch and returns every batch it completed. ``flush()`` returns the partial batch (or
    ``None``) and empties the buffer.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._leaves: list[Any] | None = None
        self._spec: Any = None
        self._like: list[Any] = []
        self._fill = 0

    def __len__(self) -> int:
        """Rows waiting in the pending output batch."""
        return self._fill

    def add(self, batch: Any, rows: Tensor) -> list[Any]:
        leaves, spec = flatten(batch)
        done = []
        start = 0
        while start < rows.numel():
            if self._leaves is None:
                self._start_batch(leaves, spec)
            self._check_compatible(leaves, spec)
            take = min(rows.numel() - start, self.batch_size - self._fill)
            chunk = rows[start : start + take]
            for dest, leaf in zip(self._leaves, leaves):  # type: ignore[arg-type]
                _copy_rows(dest, self._fill, leaf, chunk)
            self._fill += take
            start += take
            if self._fill == self.batch_size:
                done.append(self._finish(self.batch_size))
        return done

    def flush(self) -> Any | None:
        """The pending partial batch (``None`` if empty); the buffer is emptied."""
        if self._fill == 0:
            return None
        return self._finish(self._fill)

    def pending(self) -> Any | None:
        """A copy of the rows waiting in the buffer (``None`` if empty); the buffer is kept."""
        if self._fill == 0:
            return None
        leaves = [
            dest[: self._fill].clone() if isinstance(dest, Tensor) else _shrink(dest, self._fill, like)
            for dest, like in zip(self._leaves, self._like)  # type: ignore[arg-type]
        ]
        return unflatten(self._spec, leaves)

    def clear(self) -> None:
        self._leaves, self._spec, self._like, self._fill = None, None, [], 0

    def _start_batch(self, leaves: list[Any], spec: Any) -> None:
        self._leaves = [_allocate(leaf, self.batch_size) for leaf in leaves]
        self._spec = spec
        self._like = list(leaves)
        self._fill = 0

    def _check_compatible(self, leaves: list[Any], spec: Any) -> None:
        if spec != self._spec or len(leaves) != len(self._like):
            raise ValueError(
                "the batch structure changed while rows were waiting to be re-packed; every "
                "source batch of an epoch must have the same fields (use last_batch='yield' or "
                "'drop' if it changes between epochs)"
            )
        for dest, leaf in zip(self._leaves, leaves):  # type: ignore[arg-type]
            if isinstance(dest, Tensor) and (
                not isinstance(leaf, Tensor)
                or dest.shape[1:] != leaf.shape[1:]
                or dest.dtype != leaf.dtype
            ):
                got = f"{tuple(leaf.shape[1:])} {leaf.dtype}" if isinstance(leaf, Tensor) else type(leaf)
                raise ValueError(
                    f"rows of shape {tuple(dest.shape[1:])} {dest.dtype} are waiting to be re-packed "
                    f"but the next source batch has rows of {got}; every source batch of an epoch must "
                    "have the same per-example shapes and dtypes (and, with last_batch='carry', so "
                    "must consecutive epochs)"
                )

    def _finish(self, count: int) -> Any:
        leaves = [_shrink(dest, count, like) for dest, like in zip(self._leaves, self._like)]  # type: ignore[arg-type]
        batch = unflatten(self._spec, leaves)
        self.clear()
        return batch
