"""Shared tiny helpers for the sbdata tests.

The key trick: every example carries its integer id in the batch, and the loss of an
example is a known function of its id (:func:`id_loss`), so the tests can compute exactly
which examples an exact-count policy must select and in what order they must come out.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------- known losses


def id_loss(ids: Tensor) -> Tensor:
    """A known, distinct, scrambled loss per example id (not monotone in the id or position)."""
    return ((torch.as_tensor(ids).long() * 7919) % 10007).double() + 1.0


def features(ids: Tensor, dtype: torch.dtype = torch.float32, width: int = 3) -> Tensor:
    """Input rows that are a known function of the id, exact in float16 for small ids."""
    ids = torch.as_tensor(ids).long()
    cols = [ids.double() * (j + 1) + 0.25 for j in range(width)]
    return torch.stack(cols, dim=1).to(dtype)


def names(ids: Tensor) -> list[str]:
    return [f"ex{int(i)}" for i in ids]


# ---------------------------------------------------------------- batch structures

Example = collections.namedtuple("Example", ["x", "y", "id"])
KINDS = ("tuple", "dict", "nested", "namedtuple")


def make_batch(kind: str, ids: Sequence[int] | Tensor, dtype: torch.dtype = torch.float32) -> Any:
    """A batch of the given structure holding examples ``ids``."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    x, y = features(ids, dtype), ids % 3
    if kind == "tuple":
        return (x, y, ids)
    if kind == "dict":
        return {"x": x, "name": names(ids), "id": ids}
    if kind == "nested":
        return {"pair": (x, y), "meta": {"id": ids, "name": names(ids)}}
    if kind == "namedtuple":
        return Example(x, y, ids)
    raise AssertionError(kind)


def ids_of(kind: str, batch: Any) -> Tensor:
    if kind in ("tuple", "namedtuple"):
        return batch[2]
    if kind == "dict":
        return batch["id"]
    if kind == "nested":
        return batch["meta"]["id"]
    raise AssertionError(kind)


def check_structure(kind: str, batch: Any, dtype: torch.dtype = torch.float32) -> Tensor:
    """Assert ``batch`` has ``kind``'s structure, dtypes and consistent rows; return its ids."""
    if kind == "tuple":
        assert type(batch) is tuple and len(batch) == 3
        x, y, ids = batch
        name_list = None
    elif kind == "namedtuple":
        assert type(batch) is Example
        x, y, ids = batch.x, batch.y, batch.id
        name_list = None
    elif kind == "dict":
        assert type(batch) is dict and list(batch) == ["x", "name", "id"]
        x, ids, name_list, y = batch["x"], batch["id"], batch["name"], None
    elif kind == "nested":
        assert type(batch) is dict and list(batch) == ["pair", "meta"]
        assert type(batch["pair"]) is tuple and len(batch["pair"]) == 2
        assert type(batch["meta"]) is dict and list(batch["meta"]) == ["id", "name"]
        (x, y), ids, name_list = batch["pair"], batch["meta"]["id"], batch["meta"]["name"]
    else:
        raise AssertionError(kind)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert x.dtype == dtype and x.shape == (ids.numel(), 3)
    assert torch.equal(x, features(ids, dtype)), "rows of x do not belong to their ids"
    if y is not None:
        assert y.dtype == torch.long and torch.equal(y, ids % 3)
    if name_list is not None:
        assert type(name_list) is list and name_list == names(ids)
    return ids


def id_score_fn(kind: str):
    """A ``score_fn`` whose loss for each example is :func:`id_loss` of its id."""

    def score(model: nn.Module, batch: Any) -> Tensor:
        return id_loss(ids_of(kind, batch))

    return score


# ---------------------------------------------------------------- reference selection


def topk_positions(losses: Sequence[float], keep: float) -> list[int]:
    """Positions of the ``int(keep * n)`` highest losses, in batch order (independent reference)."""
    n = len(losses)
    k = int(keep * n)
    best = sorted(range(n), key=lambda p: (-float(losses[p]), p))[:k]
    return sorted(best)


def selected_ids(id_batches: Sequence[Tensor], keep: float) -> list[int]:
    """The ids topk selects from each batch under :func:`id_loss`, in stream order."""
    out: list[int] = []
    for ids in id_batches:
        ids = torch.as_tensor(ids)
        out += [int(ids[p]) for p in topk_positions(id_loss(ids).tolist(), keep)]
    return out


def consecutive_ids(sizes: Sequence[int]) -> list[Tensor]:
    batches, at = [], 0
    for n in sizes:
        batches.append(torch.arange(at, at + n))
        at += n
    return batches


# ---------------------------------------------------------------- models


class Recorder(nn.Module):
    """An identity model that records what the scoring pass fed it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.inputs: list[Tensor] = []
        self.grad_enabled: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        self.grad_enabled.append(torch.is_grad_enabled())
        return x


class LogitTable(nn.Module):
    """Maps an example id to a fixed row of logits: cross-entropy per example is known exactly."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table[ids]


def known_ce(table: Tensor, ids: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of ``LogitTable(table)`` computed by hand in float64."""
    rows = table[ids].double()
    return torch.logsumexp(rows, dim=1) - rows.gather(1, targets[:, None]).squeeze(1)


# ---------------------------------------------------------------- datasets that know their ids


class IndexedPairs(torch.utils.data.Dataset):
    """Example i is ``(x = [i, i], y = i % 3, i)``; every ``__getitem__`` is counted in a
    shared-memory tensor, so loads in worker processes count too."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loads = torch.zeros(n, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.loads[i] += 1
        return torch.tensor([float(i), float(i)]), i % 3, i


class Echo(nn.Module):
    """A scorer whose outputs are its inputs, so a loss can read the id from them; counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x


def loss_from_x(outputs: Tensor, targets: Tensor) -> Tensor:
    """``loss_fn`` for :class:`Echo` on :class:`IndexedPairs`: :func:`id_loss` of the id in x."""
    return id_loss(outputs[:, 0].long()).float()
