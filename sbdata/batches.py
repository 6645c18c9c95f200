"""Batch structures: find fields, count rows, move to a device, flatten and rebuild.

A batch is a tensor, a tuple (named tuples included), a list or a dict, nested in any mix.
Per-example leaves are tensors with a leading batch dimension, and lists or tuples of plain
values (``["cat", "dog"]``), which is what ``default_collate`` makes of strings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

__all__ = [
    "Key",
    "batch_length",
    "describe",
    "flatten",
    "get_field",
    "is_value_list",
    "to_device",
    "unflatten",
]

Key = Union[int, str, Callable[[Any], Any]]  # noqa: UP007 (a runtime alias, kept readable on 3.10)
_PLAIN = (str, bytes, int, float, bool, type(None))


def is_value_list(obj: Any) -> bool:
    """A list or tuple of plain values (strings, numbers): a per-example field, not a structure."""
    return (
        isinstance(obj, (list, tuple))
        and not _is_namedtuple(obj)
        and len(obj) > 0
        and all(isinstance(v, _PLAIN) for v in obj)
    )


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def describe(batch: Any) -> str:
    """A short description of a batch's layout, for error messages."""
    if isinstance(batch, Tensor):
        return f"Tensor{tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "dict with keys " + repr(list(batch.keys()))
    if isinstance(batch, (list, tuple)):
        return f"{type(batch).__name__} of length {len(batch)}"
    return type(batch).__name__


def get_field(batch: Any, key: Key, *, argument: str) -> Any:
    """Return ``batch[key]`` (or ``key(batch)``), raising an error that names ``argument``."""
    if callable(key):
        return key(batch)
    try:
        if isinstance(batch, Mapping) or isinstance(batch, (list, tuple)):
            return batch[key]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        pass
    raise ValueError(
        f"{argument}={key!r} was not found in the batch ({describe(batch)}); pass {argument}= "
        "an index, a key or a callable (batch) -> value that locates it"
    )


def flatten(batch: Any) -> tuple[list[Any], Any]:
    """Split a batch into its per-example leaves and a spec that :func:`unflatten` reverses."""
    if isinstance(batch, Tensor) or is_value_list(batch):
        return [batch], None
    if isinstance(batch, Mapping):
        leaves: list[Any] = []
        specs = []
        for k, v in batch.items():
            sub, spec = flatten(v)
            leaves += sub
            specs.append((k, len(sub), spec))
        return leaves, (type(batch), specs)
    if isinstance(batch, (list, tuple)):
        leaves = []
        specs = []
        for v in batch:
            sub, spec = flatten(v)
            leaves += sub
            specs.append((None, len(sub), spec))
        return leaves, (type(batch), specs)
    raise TypeError(
        f"batches must be made of tensors, dicts, lists and tuples, got a {type(batch).__name__} "
        "leaf; return per-example values from your dataset (default_collate turns them into tensors)"
    )


def unflatten(spec: Any, leaves: Sequence[Any]) -> Any:
    """Rebuild a batch of the original structure from ``leaves``."""
    if spec is None:
        return leaves[0]
    kind, children = spec
    parts = []
    at = 0
    for key, count, child in children:
        parts.append((key, unflatten(child, leaves[at : at + count])))
        at += count
    if issubclass(kind, Mapping):
        return kind((k, v) for k, v in parts)
    values = [v for _, v in parts]
    if issubclass(kind, tuple) and hasattr(kind, "_fields"):
        return kind(*values)
    return kind(values)


def batch_length(batch: Any) -> int:
    """Number of examples in a batch: the common leading size of its per-example leaves."""
    leaves, _ = flatten(batch)
    sizes = {len(leaf) if not isinstance(leaf, Tensor) else _rows(leaf) for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"every field of a batch needs the same leading (batch) size, got sizes {sorted(sizes)} "
            f"in a batch ({describe(batch)})"
        )
    return sizes.pop()


def _rows(t: Tensor) -> int:
    if t.dim() == 0:
        raise ValueError(
            "a batch holds a 0-dim tensor; every tensor needs a leading batch dimension"
        )
    return t.shape[0]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch to ``device`` (no copy when it is already there)."""
    leaves, spec = flatten(batch)
    if all(leaf.device == device for leaf in leaves if isinstance(leaf, Tensor)):
        return batch  # already there: the very same object
    moved = [
        leaf.to(device, non_blocking=True) if isinstance(leaf, Tensor) else leaf for leaf in leaves
    ]
    return unflatten(spec, moved)
