"""Stale-epoch planning: from cached losses to the id batches to load, decided before loading.

Pure functions: they take candidate id batches and a way to pick rows, and return an
:class:`EpochPlan`. Nothing here touches a loader, a model or ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .schedule import is_interrupt_batch

__all__ = ["EpochPlan", "Share", "cut_plan", "share_selection"]

#: one source batch's part of a rank's selection: (batch index, ids, weights or None)
Share = list[tuple[int, Tensor, "Tensor | None"]]
#: picks rows of candidate batches: [ids per batch] -> [(kept positions, weights of the kept or None)]
Picker = Callable[[list[Tensor]], list[tuple[Tensor, "Tensor | None"]]]


@dataclass
class EpochPlan:
    """The id batches an epoch loads, in order; ``passes[k]``: batch k is yielded unchanged
    (an ``interrupt`` batch); ``weights[k]``: the policy's per-example weights, if any."""

    batches: list[Tensor] = field(default_factory=list)
    passes: list[bool] = field(default_factory=list)
    weights: list[Tensor | None] = field(default_factory=list)

    def append(self, ids: Tensor, passed: bool = False, weights: Tensor | None = None) -> None:
        self.batches.append(ids)
        self.passes.append(passed)
        self.weights.append(weights)

    def examples(self) -> int:
        return sum(b.numel() for b in self.batches)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": list(self.batches), "passes": list(self.passes), "weights": list(self.weights)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochPlan:
        return cls(list(state["batches"]), list(state["passes"]), list(state["weights"]))


def share_selection(
    per_rank: list[list[Tensor]], pick: Picker, interrupt: int
) -> tuple[list[Share], int]:
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
    for (i, ids), (rows, weight) in zip(order, picked):
        by_batch.setdefault(i, []).append((ids[rows], weight))
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
    plan = EpochPlan()
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
