"""Planners: which id batches an epoch loads, decided one batch at a time, just before loading.

Every epoch of a source that loads chosen ids (a map-style DataLoader, FFCV, torchdata.nodes)
loads the id batches a planner hands it. In plain and fresh epochs that is the user's own id
batches (:class:`CandidatePlanner`); in stale epochs only the ids selected from cached losses,
cut into full batches (:class:`StalePlanner`).

NOTE [ Planning batch by batch ]
A stale epoch decides candidate batch ``i``'s selection when the loader asks for the next id
batch to load, never for the whole epoch up front: the first batch arrives as soon as a plain
epoch's would, and each step costs work in proportion to the batch. The cached losses a
planner reads cannot change under it: an example is a candidate once per epoch, so its loss
is only ever recorded after it was planned. Under ``torch.distributed`` each rank plans only
its own candidates (its ``DistributedSampler`` share) with its own generator, so planning
gets cheaper with more ranks and no ids cross between ranks; equal batch counts come from an
all-reduce of the counts (NOTE [ Equal batches on every rank ]).

A planner's state is small: the next candidate batch, the selected ids not yet cut into a
batch, and how many rows the next cut needs. With it, and the few batches planned but not yet
loaded (a DataLoader with workers asks a few batches ahead), a checkpoint resumes the epoch
exactly.

Pure: a planner takes candidate id batches and a ``select`` function; nothing here touches a
loader, a model or ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .policies import Selection
from .schedule import is_interrupt_batch

__all__ = ["CandidatePlanner", "PlanEntry", "StalePlanner"]


@dataclass
class PlanEntry:
    """One id batch to load. ``passed``: yielded unchanged (a plain epoch, an ``interrupt``
    batch). ``preselected``: every row is already selected (a stale epoch); otherwise rows
    are selected after loading, from scores. ``weights``: the policy's per-row weights."""

    ids: Tensor
    passed: bool = False
    preselected: bool = False
    weights: Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        # clones: ids may be views into the epoch's whole order, which torch.save would write whole
        weights = None if self.weights is None else self.weights.clone()
        return {"ids": self.ids.clone(), "passed": self.passed, "preselected": self.preselected, "weights": weights}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PlanEntry:
        return cls(state["ids"], bool(state["passed"]), bool(state["preselected"]), state["weights"])


class CandidatePlanner(Iterator[PlanEntry]):
    """A plain or fresh epoch: every candidate batch, in order; plain epochs and ``interrupt``
    batches pass through unchanged. ``candidates[k]`` is candidate batch ``offset + k``."""

    def __init__(self, candidates: list[Tensor], *, plain: bool, interrupt: int, offset: int = 0) -> None:
        self.candidates, self.offset = candidates, offset
        self.plain, self.interrupt = plain, interrupt
        self.next = offset

    def __next__(self) -> PlanEntry:
        if self.next >= self.offset + len(self.candidates):
            raise StopIteration
        i, self.next = self.next, self.next + 1
        return PlanEntry(self.candidates[i - self.offset], passed=self.plain or is_interrupt_batch(i, self.interrupt))

    def state_dict(self) -> dict[str, Any]:
        return {"next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next = int(state["next"])


class StalePlanner(Iterator[PlanEntry]):
    """A stale epoch: select from each candidate batch as it comes up, and cut the selected
    ids into batches of ``batch_size`` (NOTE [ Planning batch by batch ]).

    ``select(ids)`` returns the policy's selection among ``ids`` (from their cached losses).
    The first batch tops up the ``waiting`` rows already in the re-pack buffer; every later
    one is exactly ``batch_size``, so it needs no copy. ``interrupt`` batches go in at their
    place, whole. The last partial batch is loaded unless ``last_batch == "drop"``.
    ``skipped(n)`` is told of every ``n`` candidates that will not be loaded.
    """

    def __init__(
        self,
        candidates: list[Tensor],
        select: Callable[[Tensor], Selection],
        *,
        batch_size: int,
        waiting: int,
        interrupt: int,
        last_batch: str,
        skipped: Callable[[int], None] = lambda n: None,
        offset: int = 0,
    ) -> None:
        self.candidates, self.offset = candidates, offset
        self.select, self.skipped = select, skipped
        self.batch_size, self.interrupt, self.last_batch = batch_size, interrupt, last_batch
        self.next = offset
        self.need = batch_size - waiting
        self.queue = torch.empty(0, dtype=torch.long)
        self.queue_weights: Tensor | None = None
        self.done = False

    def __next__(self) -> PlanEntry:
        while self.queue.numel() < self.need:
            if self.next >= self.offset + len(self.candidates):
                return self._last()
            i, self.next = self.next, self.next + 1
            ids = self.candidates[i - self.offset]
            if is_interrupt_batch(i, self.interrupt):
                return PlanEntry(ids, passed=True)
            self._add(ids, self.select(ids))
        return self._cut(self.need)

    def _add(self, ids: Tensor, selection: Selection) -> None:
        rows, weights = selection
        self.skipped(ids.numel() - rows.numel())
        self.queue = torch.cat([self.queue, ids[rows]])
        if weights is not None:
            weights = weights.float().cpu()
            self.queue_weights = weights if self.queue_weights is None else torch.cat([self.queue_weights, weights])

    def _cut(self, n: int) -> PlanEntry:
        weights = None if self.queue_weights is None else self.queue_weights[:n]
        entry = PlanEntry(self.queue[:n], preselected=True, weights=weights)
        self.queue = self.queue[n:]
        self.queue_weights = None if self.queue_weights is None else self.queue_weights[n:]
        self.need = self.batch_size
        return entry

    def _last(self) -> PlanEntry:
        if self.done or not self.queue.numel():
            self.done = True
            raise StopIteration
        self.done = True
        if self.last_batch == "drop":
            self.skipped(self.queue.numel())
            raise StopIteration
        return self._cut(self.queue.numel())

    def state_dict(self) -> dict[str, Any]:
        return {
            "next": self.next,
            "need": self.need,
            "queue": self.queue.clone(),
            "queue_weights": None if self.queue_weights is None else self.queue_weights.clone(),
            "done": self.done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next, self.need, self.done = int(state["next"]), int(state["need"]), bool(state["done"])
        self.queue = state["queue"].long()
        self.queue_weights = state["queue_weights"]
