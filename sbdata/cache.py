"""The loss cache of stale mode: the last loss of every example and the epoch it was measured.

Storage is two flat tables, ``float32`` loss and ``int32`` epoch: 8 bytes per example (10 MB
for ImageNet-1k). Reads and writes touch only the ids of one batch, never the whole table.

NOTE [ Dense or sparse ids ]
Example ids are usually dataset indices, ``0 .. N-1``: the tables are then indexed by id
directly and grow (doubling) as larger ids arrive. Ids can also be sparse (a database key, a
hash): a table up to the largest id would then be mostly empty, so once an id lands far past
what the dataset's size explains, the cache switches to a sorted table of the ids it has seen
(8 more bytes per example, a binary search per lookup). Memory follows the number of examples,
never the size of the largest id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["IdTable", "LossCache", "Update", "as_ids", "concat_ids", "grown", "narrowest", "stack_updates"]

_NEVER = -1  # epoch stored for ids that were never measured
_DENSE_MIN = 1 << 16  # ids below this are always stored densely


def grown(table: Tensor, needed: int, fill: float | int = 0) -> Tensor:
    """``table`` itself if it holds ``needed`` entries, else a copy at least twice as long
    (and at least 1024), the new tail set to ``fill``: amortised O(1) growth per id."""
    if needed <= table.numel():
        return table
    out = torch.full((max(needed, 2 * table.numel(), 1024),), fill, dtype=table.dtype)
    out[: table.numel()] = table
    return out


def narrowest(values: Tensor) -> Tensor:
    """Non-negative integers in the narrowest dtype that holds them (``uint8`` up to 255, then
    ``int16``, ``int32``, ``int64``): checkpoints store counts and epochs at 1-2 bytes each."""
    top = int(values.max()) if values.numel() else 0
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if top <= torch.iinfo(dtype).max:
            return values.to(dtype)
    return values.long()


def concat_ids(batches: Sequence[Tensor]) -> Tensor:
    """Id batches as one flat ``int64`` tensor (empty when there are none)."""
    return torch.cat(list(batches)).long() if len(batches) else torch.empty(0, dtype=torch.long)


#: a cache update waiting to be shared: ``(ids, losses, epoch)``
Update = tuple[Tensor, Tensor, int]


def stack_updates(pending: Sequence[Update]) -> tuple[Tensor, Tensor, Tensor]:
    """Queued updates as three flat tensors: ``int64`` ids, ``float32`` losses, ``int32``
    epochs (one per id), the form in which they travel between ranks."""
    ids = concat_ids([p[0] for p in pending])
    losses = torch.cat([p[1].float() for p in pending]) if pending else torch.empty(0)
    epochs = [torch.full((p[0].numel(),), p[2], dtype=torch.int32) for p in pending]
    return ids, losses, torch.cat(epochs) if epochs else torch.empty(0, dtype=torch.int32)


def as_ids(ids: Any, argument: str = "index_key") -> Tensor:
    """``ids`` as a flat CPU ``int64`` tensor; non-integer or negative ids raise, naming ``argument``."""
    ids = torch.as_tensor(ids).flatten()
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"example ids must be integers, got dtype {ids.dtype}; check {argument}")
    ids = ids.cpu().long()
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(
            f"example ids must be >= 0, got {int(ids.min())}; {argument} must locate each example's "
            "index (or another non-negative integer key) in the batch"
        )
    return ids


class IdTable:
    """Columns of values keyed by example id, dense or sparse (NOTE [ Dense or sparse ids ]).

    ``columns`` maps a name to ``(dtype, fill)``: the value of an id never written; an id is
    in use once column ``present`` differs from its fill. Every operation but a switch to
    sparse storage (once) and a checkpoint touches only the ids it is given.
    """

    def __init__(self, columns: dict[str, tuple[torch.dtype, float | int]], size: int = 0, *, present: str) -> None:
        self._spec = columns
        self._present = present
        self._size_hint = size
        self._count = 0  # ids written at least once (an upper bound while dense)
        self.keys: Tensor | None = None  # sorted ids, once sparse; None while dense
        self.cols = {name: torch.full((size,), fill, dtype=dtype) for name, (dtype, fill) in columns.items()}

    def __len__(self) -> int:
        return next(iter(self.cols.values())).numel()

    @property
    def nbytes(self) -> int:
        tables = list(self.cols.values()) + ([self.keys] if self.keys is not None else [])
        return sum(t.element_size() * t.numel() for t in tables)

    def written(self) -> Tensor:
        """A mask of the slots in use (a pass over the table: checkpoints only)."""
        return self.cols[self._present] != self._spec[self._present][1]

    def _to_sparse(self) -> None:
        self.keys = torch.nonzero(self.written()).flatten()
        self.cols = {name: col[self.keys].clone() for name, col in self.cols.items()}

    def slots(self, ids: Tensor) -> Tensor:
        """Slots for ``ids``, made where missing."""
        if self.keys is None:
            top = int(ids.max()) if ids.numel() else -1
            if top < max(2 * max(self._size_hint, self._count), _DENSE_MIN):
                if top >= len(self):
                    self.cols = {n: grown(c, top + 1, self._spec[n][1]) for n, c in self.cols.items()}
                self._count = max(self._count, top + 1)
                return ids
            self._to_sparse()
        assert self.keys is not None
        new = torch.unique(ids)
        new = new[~torch.isin(new, self.keys)]
        if new.numel():
            keys = torch.cat([self.keys, new])
            order = torch.argsort(keys)
            self.keys = keys[order]
            self.cols = {
                n: torch.cat([c, torch.full((new.numel(),), self._spec[n][1], dtype=c.dtype)])[order]
                for n, c in self.cols.items()
            }
        return torch.searchsorted(self.keys, ids)

    def find(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(slots, found)`` for ``ids``, making nothing; ``slots`` is 0 where not found."""
        if self.keys is None:
            found = ids < len(self)
            return torch.where(found, ids, 0), found
        if self.keys.numel() == 0:
            return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        slots = torch.searchsorted(self.keys, ids).clamp(max=self.keys.numel() - 1)
        found = self.keys[slots] == ids
        return torch.where(found, slots, 0), found

    def get(self, name: str, ids: Tensor) -> Tensor:
        """Column ``name`` at ``ids`` (the fill value where an id was never written)."""
        slots, found = self.find(ids)
        fill = torch.full((ids.numel(),), self._spec[name][1], dtype=self._spec[name][0])
        return torch.where(found, self.cols[name][slots], fill) if len(self) else fill

    def items(self) -> tuple[Tensor, dict[str, Tensor]]:
        """``(ids, columns)`` of the slots in use."""
        slots = torch.nonzero(self.written()).flatten()
        ids = slots if self.keys is None else self.keys[slots]
        return ids, {n: c[slots].clone() for n, c in self.cols.items()}

    def saved(self) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The table as a checkpoint stores it: dense, the columns up to the last slot in use
        and no ids (unused slots keep their fill value); sparse, the ids in use and their values."""
        if self.keys is not None:
            return self.items()
        written = self.written()
        top = int(torch.nonzero(written).max()) + 1 if bool(written.any()) else 0
        return None, {n: c[:top].clone() for n, c in self.cols.items()}

    def restore(self, ids: Tensor | None, cols: dict[str, Tensor]) -> None:
        """Load what :meth:`saved` returned (``ids=None``: dense columns from id 0)."""
        n = next(iter(cols.values())).numel()
        if n == 0:
            return
        slots = self.slots(torch.arange(n) if ids is None else ids.long())
        for name, values in cols.items():
            self.cols[name][slots] = values.to(self.cols[name].dtype)


class LossCache:
    """Per-example losses keyed by integer example id (``0 <= id``); ``size``: the number of
    examples expected, if known (NOTE [ Dense or sparse ids ])."""

    def __init__(self, size: int = 0) -> None:
        self._table = IdTable({"loss": (torch.float32, 0.0), "epoch": (torch.int32, _NEVER)}, size, present="epoch")
        self._per_epoch: dict[int, int] = {}  # epoch -> examples whose latest loss is from it

    def __len__(self) -> int:
        """Entries stored (measured or not)."""
        return len(self._table)

    @property
    def nbytes(self) -> int:
        return self._table.nbytes

    @property
    def sparse(self) -> bool:
        return self._table.keys is not None

    def update(self, ids: Tensor, losses: Tensor, epoch: int) -> None:
        """Store ``losses[i]`` as the loss of example ``ids[i]``, measured in ``epoch``."""
        ids = as_ids(ids)
        if ids.numel() == 0:
            return
        slots = self._table.slots(ids)
        self._count(self._table.cols["epoch"][torch.unique(slots)], epoch)
        self._table.cols["loss"][slots] = losses.detach().float().cpu().flatten()
        self._table.cols["epoch"][slots] = epoch

    def update_each(self, ids: Tensor, losses: Tensor, epochs: Tensor) -> None:
        """:meth:`update` with an epoch per id (``epochs``), applied epoch by epoch, oldest first."""
        for epoch in torch.unique(epochs).tolist():
            at = epochs == epoch
            self.update(ids[at], losses[at], int(epoch))

    def _count(self, previous: Tensor, epoch: int) -> None:
        """Move the examples whose epochs were ``previous`` to ``epoch`` in the per-epoch counts
        (work in proportion to the batch: NOTE [ Recency is a counter ])."""
        old, counts = torch.unique(previous, return_counts=True)
        for e, c in zip(old.tolist(), counts.tolist()):
            if e != _NEVER:
                left = self._per_epoch[e] - c
                if left:
                    self._per_epoch[e] = left
                else:
                    del self._per_epoch[e]
        self._per_epoch[epoch] = self._per_epoch.get(epoch, 0) + previous.numel()

    def oldest_epoch(self) -> int:
        """The epoch of the oldest loss in the cache (-1 if empty), in O(epochs).

        NOTE [ Recency is a counter ] The cache counts how many examples' latest loss comes
        from each epoch, updated with every write, so "is every cached loss younger than n
        epochs" needs no pass over the table."""
        return min(self._per_epoch, default=_NEVER)

    def lookup(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(losses, known)`` for ``ids``; ``known`` is False where no loss was ever stored."""
        ids = as_ids(ids)
        return self._table.get("loss", ids), self._table.get("epoch", ids) != _NEVER

    def measured_epoch(self, ids: Tensor) -> Tensor:
        """The epoch each id's loss was measured in (-1: never)."""
        return self._table.get("epoch", as_ids(ids))

    def counts_by_epoch(self) -> dict[int, int]:
        """Epoch -> how many examples' latest loss was measured in it."""
        return dict(self._per_epoch)

    def known_count(self) -> int:
        """Examples with a cached loss, in O(epochs)."""
        return sum(self._per_epoch.values())

    def state_dict(self) -> dict[str, Any]:
        """The measured entries in about 5 bytes each: ``float32`` losses, and epochs as
        ``epoch - epoch_base + 1`` in the narrowest integer type (0: never measured); ids only
        when they are sparse (NOTE [ Dense or sparse ids ])."""
        ids, cols = self._table.saved()
        base = self.oldest_epoch() if self._per_epoch else 0
        measured = cols["epoch"] != _NEVER
        offsets = torch.where(measured, cols["epoch"].long() - base + 1, 0)
        return {"ids": ids, "loss": cols["loss"], "epoch": narrowest(offsets), "epoch_base": base}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._table = IdTable(dict(self._table._spec), self._table._size_hint, present="epoch")
        offsets = state["epoch"].long()
        epoch = torch.where(offsets > 0, offsets + int(state["epoch_base"]) - 1, _NEVER).to(torch.int32)
        self._table.restore(state["ids"], {"loss": state["loss"].float(), "epoch": epoch})
        values, counts = torch.unique(epoch, return_counts=True)
        self._per_epoch = {int(e): int(c) for e, c in zip(values, counts) if int(e) != _NEVER}
