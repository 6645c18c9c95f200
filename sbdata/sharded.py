"""A loss cache sharded across ``torch.distributed`` ranks (``shard_cache=True``).

NOTE [ Sharded loss cache ]
A replicated cache costs every rank 8 bytes per example of the whole dataset and receives
every rank's updates. Sharded, rank ``r`` owns the ids of one contiguous range, the ``r``-th
``ceil(N / world)`` slice of ``0 .. N-1`` (the layout of a ``DTensor`` with ``Shard(0)``),
and holds only those:

* updates (scores, ``record()`` losses) wait on the rank that measured them until the next
  sharing point (the end of an epoch, the ``record()`` of its last batch), then travel to
  their owners in one ``all_to_all_single``;
* a stale epoch fetches the losses of this rank's own candidates from their owners, once, when
  it starts (one ``all_to_all_single`` out, one back): O(N / ranks) per rank;
* every rank keeps the counts of measured examples per epoch over the whole dataset (a few
  integers, all-gathered at each sharing point), so ``len()``, ``mode()`` and "is every loss
  recent" stay local and O(1).

Checkpoints: ``sb.state_dict()`` holds this rank's shard only (loading it on another rank, or
on another number of ranks, is refused); :func:`sbdata.checkpoint.save` writes every rank's
shard with ``torch.distributed.checkpoint``, which :func:`sbdata.checkpoint.load` reads back
on any number of ranks (or on one process).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import distributed as dist_utils
from .cache import LossCache, Update, as_ids, stack_updates

__all__ = ["Fetched", "ShardedLossCache", "check_own_shard", "shard_range", "shard_size"]


def check_own_shard(shard: dict[str, Any]) -> None:
    """Refuse, on every rank at once, a state that holds another rank's shard (collective)."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    own = shard["world"] == world and shard["rank"] == rank
    if dist_utils.all_reduce_int(int(own), "min"):
        return
    raise ValueError(
        f"this state_dict holds rank {shard['rank']}'s shard of a loss cache sharded over {shard['world']} "
        f"rank(s) (shard_cache=True), and this is rank {rank} of {world}: one rank's state does not resume "
        "the others. Save every rank's shard with sbdata.checkpoint.save(sb, path) (torch.distributed.checkpoint) "
        "and resume with sbdata.checkpoint.load(sb, path), on any number of ranks"
    )


def shard_size(num_examples: int, world: int) -> int:
    """Ids per rank: ``ceil(num_examples / world)`` (``torch.chunk``'s split, as ``Shard(0)``)."""
    return -(-num_examples // world)


def shard_range(num_examples: int, world: int, rank: int) -> tuple[int, int]:
    """The ids ``[start, stop)`` rank ``rank`` owns."""
    start = min(rank * shard_size(num_examples, world), num_examples)
    return start, min(start + shard_size(num_examples, world), num_examples)


class Fetched:
    """Losses and epochs of a set of ids, fetched once for a stale epoch's planning."""

    def __init__(self, ids: Tensor, losses: Tensor, epochs: Tensor, sorted: bool = False) -> None:
        if not sorted:
            order = torch.argsort(ids)
            ids, losses, epochs = ids[order], losses[order], epochs[order]
        self.ids, self.losses, self.epochs = ids.contiguous(), losses, epochs

    def lookup(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(losses, known)`` of ``ids`` (each must have been fetched)."""
        slots = torch.searchsorted(self.ids, as_ids(ids).contiguous()).clamp(max=max(self.ids.numel() - 1, 0))
        return self.losses[slots], self.epochs[slots] >= 0


class ShardedLossCache:
    """This rank's shard of the loss cache (NOTE [ Sharded loss cache ])."""

    def __init__(self, num_examples: int) -> None:
        self.num_examples = num_examples
        self.world, self.rank = dist_utils.world_size(), dist_utils.rank()
        self.start, self.stop = shard_range(num_examples, self.world, self.rank)
        self.local = LossCache(self.stop - self.start)
        self._pending: list[Update] = []
        self._global: dict[int, int] = {}  # epoch -> measured examples over every shard
        self.fetched: Fetched | None = None

    # ------------------------------------------------------------------ counts (local, O(epochs))

    @property
    def nbytes(self) -> int:
        return self.local.nbytes

    def known_count(self) -> int:
        """Examples with a cached loss on any rank, as of the last sharing point."""
        return sum(self._global.values())

    def oldest_epoch(self) -> int:
        return min(self._global, default=-1)

    # ------------------------------------------------------------------ updates

    def _check_world(self) -> None:
        world, rank = dist_utils.world_size(), dist_utils.rank()
        if (world, rank) != (self.world, self.rank):
            raise RuntimeError(
                f"shard_cache=True split the loss cache for rank {self.rank} of {self.world} when the loader was "
                f"built, but this is rank {rank} of {world}: build the SelectiveBatchLoader after "
                "torch.distributed.init_process_group()"
            )

    def update(self, ids: Tensor, losses: Tensor, epoch: int) -> None:
        """Queue an update for its owner (applied at the next :meth:`share`; at once on one process)."""
        self._check_world()
        ids, losses = as_ids(ids), losses.detach().float().cpu().flatten()
        if not dist_utils.is_distributed():
            self._check_ids(ids)
            self.local.update(ids - self.start, losses, epoch)
            self._global = self.local.counts_by_epoch()
            return
        self._pending.append((ids, losses, epoch))

    def share(self) -> None:
        """Collective: every queued update goes to the rank that owns its id, then the
        per-epoch counts are all-gathered."""
        pending, self._pending = self._pending, []
        ids, losses, epochs = stack_updates(pending)
        self._check_ids(ids)
        (got_ids, got_losses, got_epochs), _ = dist_utils.exchange(self._owner(ids), [ids, losses, epochs])
        self.local.update_each(got_ids - self.start, got_losses, got_epochs)
        self._count_globally()

    def _count_globally(self) -> None:
        local = self.local.counts_by_epoch()
        epochs = torch.tensor(sorted(local), dtype=torch.long)
        counts = torch.tensor([local[int(e)] for e in epochs], dtype=torch.long)
        merged: dict[int, int] = {}
        for e_part, c_part in zip(dist_utils.all_gather_variable(epochs), dist_utils.all_gather_variable(counts)):
            for e, c in zip(e_part.tolist(), c_part.tolist()):
                merged[e] = merged.get(e, 0) + c
        self._global = merged

    def _owner(self, ids: Tensor) -> Tensor:
        return torch.div(ids, max(shard_size(self.num_examples, self.world), 1), rounding_mode="floor")

    def _check_ids(self, ids: Tensor) -> None:
        if ids.numel() and int(ids.max()) >= self.num_examples:
            raise ValueError(
                f"shard_cache=True shards the ids 0..{self.num_examples - 1} of the dataset, got example id "
                f"{int(ids.max())}; a sharded cache needs ids that are dataset indices"
            )

    # ------------------------------------------------------------------ reads

    def fetch(self, ids: Tensor) -> Fetched:
        """Collective: the losses of ``ids`` (this rank's candidates) from their owners."""
        self._check_world()
        ids = as_ids(ids)
        self._check_ids(ids)
        ids = torch.sort(ids).values  # sorted ids are grouped by owner (contiguous ranges) and ready to search
        (asked,), splits = dist_utils.exchange(self._owner(ids), [ids], grouped=True)
        losses, _ = self.local.lookup(asked - self.start)
        epochs = self.local.measured_epoch(asked - self.start)
        back_losses, back_epochs = dist_utils.reply([losses, epochs], splits)
        self.fetched = Fetched(ids, back_losses, back_epochs, sorted=True)
        return self.fetched

    def lookup(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(losses, known)`` of ids among those last fetched (:meth:`fetch`)."""
        if self.fetched is None:
            raise RuntimeError("a sharded loss cache answers lookups only for ids fetched from their owners")
        return self.fetched.lookup(ids)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: loading it needs the same rank of the same number of ranks."""
        return {
            "shard": {"rank": self.rank, "world": self.world, "num_examples": self.num_examples},
            "local": self.local.state_dict(),
            "global": dict(self._global),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local.load_state_dict(state["local"])
        self._global = {int(k): int(v) for k, v in state["global"].items()}

    def dense(self) -> tuple[Tensor, Tensor]:
        """This shard as dense ``(losses, epochs)`` over ``[start, stop)`` (-1: never measured)."""
        ids = torch.arange(self.stop - self.start)
        losses, _ = self.local.lookup(ids)
        return losses, self.local.measured_epoch(ids)

    def load_dense(self, losses: Tensor, epochs: Tensor) -> None:
        """Replace this shard with dense ``(losses, epochs)`` over ``[start, stop)`` (collective)."""
        self.local = LossCache(self.stop - self.start)
        measured = torch.nonzero(epochs >= 0).flatten()
        self.local.update_each(measured, losses[measured], epochs[measured])
        self._count_globally()

