"""Epoch plans: which id batches an epoch loads, decided before loading.

Every epoch of a source that loads chosen ids (a map-style DataLoader, FFCV) runs from an
:class:`EpochPlan` drawn up front: in plain and fresh epochs the user's own id batches, in
stale epochs only the ids selected from cached losses. A checkpoint names the plan and how far
the epoch got, so resuming loads exactly what is left.

Pure functions: they take candidate id batches, cached losses and a policy, and return plans.
Nothing here touches a loader, a model or ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .policies import Selection, SelectionPolicy
from .schedule import is_interrupt_batch

__all__ = ["EpochPlan", "candidate_plan", "check_global_ids", "cut_plan", "select_from_cache", "share_selection"]

#: one source batch's part of a rank's selection: (batch index, ids, weights or None)
Share = list[tuple[int, Tensor, "Tensor | None"]]
#: picks rows of candidate batches: [ids per batch] -> [Selection per batch]
Picker = Callable[[list[Tensor]], list[Selection]]


@dataclass
class EpochPlan:
    """The id batches an epoch loads, in order.

    ``passes[k]``: batch k is yielded unchanged (a plain epoch, or an ``interrupt`` batch).
    ``weights[k]``: the policy's per-example weights of batch k, if it reweights.
    ``preselected``: every row of a batch that does not pass is already selected (a stale
    epoch); otherwise the rows are selected after loading, from scores (a fresh epoch).
    """

    batches: list[Tensor] = field(default_factory=list)
    passes: list[bool] = field(default_factory=list)
    weights: list[Tensor | None] = field(default_factory=list)
    preselected: bool = False

    def append(self, ids: Tensor, passed: bool = False, weights: Tensor | None = None) -> None:
        self.batches.append(ids)
        self.passes.append(passed)
        self.weights.append(weights)

    def examples(self) -> int:
        return sum(b.numel() for b in self.batches)

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": list(self.batches),
            "passes": list(self.passes),
            "weights": list(self.weights),
            "preselected": self.preselected,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochPlan:
        return cls(list(state["batches"]), list(state["passes"]), list(state["weights"]), bool(state["preselected"]))


def candidate_plan(candidates: list[Tensor], *, plain: bool, interrupt: int) -> EpochPlan:
    """A plain or fresh epoch's plan: every candidate batch, in order; plain epochs and
    ``interrupt`` batches pass through unchanged."""
    plan = EpochPlan()
    for i, ids in enumerate(candidates):
        plan.append(ids, passed=plain or is_interrupt_batch(i, interrupt))
    return plan


def select_from_cache(
    policy: SelectionPolicy, batches: list[Tensor], losses: Tensor, generator: torch.Generator
) -> list[Selection]:
    """The policy's selection from each candidate batch, given the batches' cached ``losses``
    (concatenated in batch order)."""
    if not batches:
        return []
    parts = list(torch.split(losses, [b.numel() for b in batches]))
    return policy.select_many(parts, generator)


def check_global_ids(per_rank: list[list[Tensor]]) -> None:
    """Refuse candidates that overlap between ranks by more than ``DistributedSampler``'s
    padding (at most ``world - 1`` repeated ids): then the ids are local to each rank's own
    dataset, and one global selection would hand a rank ids of another rank's dataset."""
    world = len(per_rank)
    if world < 2:
        return
    per = [torch.unique(torch.cat(c)) if c else torch.empty(0, dtype=torch.long) for c in per_rank]
    values, counts = torch.unique(torch.cat(per), return_counts=True)
    shared = values[counts > 1]
    if shared.numel() > world - 1:
        raise ValueError(
            f"stale mode under torch.distributed selects from one id space shared by every rank, but "
            f"{shared.numel()} example ids (e.g. {shared[:5].tolist()}) are candidates on more than one rank: "
            "each rank seems to wrap its own dataset with ids local to it. Shard one dataset with a "
            "DistributedSampler, or give every example a global id (e.g. the rank's offset plus the local "
            "index) and pass index_key= to locate it in the batch"
        )


def share_selection(per_rank: list[list[Tensor]], pick: Picker, interrupt: int) -> tuple[list[Share], int]:
    """Select from every rank's candidate batches and deal the result out evenly.

    ``pick`` gets every candidate batch that is not an ``interrupt`` batch in one list, source
    batch ``i`` of every rank in rank order, then ``i + 1``, and so on (one call, so a policy
    can decide them all at once). The ids kept from source batch ``i`` are dealt round-robin
    (rank ``r`` takes every ``world``-th, starting at ``r``). Returns each rank's share and the
    number of ids every share can keep so that all are equally long.
    """
    world = len(per_rank)
    order = [
        (i, candidates[i])
        for i in range(max((len(c) for c in per_rank), default=0))
        if not is_interrupt_batch(i, interrupt)
        for candidates in per_rank
        if i < len(candidates)
    ]
    picked = pick([ids for _, ids in order])
    by_batch: dict[int, list[tuple[Tensor, Tensor | None]]] = {}
    for (i, ids), selection in zip(order, picked):
        by_batch.setdefault(i, []).append((ids[selection.rows], selection.weights))
    shares: list[Share] = [[] for _ in range(world)]
    for i, parts in by_batch.items():
        ids = torch.cat([kept for kept, _ in parts])
        weight = torch.cat([w for _, w in parts]) if parts[0][1] is not None else None  # type: ignore[misc]
        for r in range(world):
            shares[r].append((i, ids[r::world], None if weight is None else weight[r::world]))
    equal = min(sum(part.numel() for _, part, _ in share) for share in shares)
    return shares, equal


def cut_plan(
    local: list[Tensor],
    share: Share,
    *,
    limit: int,
    batch_size: int,
    waiting: int,
    interrupt: int,
    last_batch: str,
) -> EpochPlan:
    """Cut this rank's selected ids (the first ``limit`` of them) into batches to load.

    The first batch tops up the ``waiting`` rows already in the re-pack buffer; every later one
    is exactly ``batch_size``, so it needs no copy. ``interrupt`` batches of ``local`` go in at
    their place, whole. The remainder is loaded unless ``last_batch == "drop"``.
    """
    plan = EpochPlan(preselected=True)
    by_batch = {i: (ids, w) for i, ids, w in share}
    queue = torch.empty(0, dtype=torch.long)
    queued_weights: Tensor | None = None
    need = batch_size - waiting
    budget = limit
    for i, candidates in enumerate(local):
        if is_interrupt_batch(i, interrupt):
            plan.append(candidates, passed=True)
            continue
        ids, weights = by_batch.get(i, (torch.empty(0, dtype=torch.long), None))
        ids = ids[:budget]
        budget -= ids.numel()
        queue = torch.cat([queue, ids])
        if weights is not None:
            weights = weights[: ids.numel()]
            queued_weights = weights if queued_weights is None else torch.cat([queued_weights, weights])
        while queue.numel() >= need:
            plan.append(queue[:need], weights=None if queued_weights is None else queued_weights[:need])
            queue = queue[need:]
            queued_weights = None if queued_weights is None else queued_weights[need:]
            need = batch_size
    if queue.numel() and last_batch != "drop":
        plan.append(queue, weights=queued_weights)
    return plan
