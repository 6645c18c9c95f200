"""Pairing ``record()`` with the batch it is about: a FIFO of yielded, unrecorded batches.

NOTE [ Per-batch information travels with the batch order ]
A wrapper that reads ahead (timm's ``PrefetchLoader``, a CUDA prefetcher, Lightning's fetcher)
takes batch k+1 from the loader before the training step of batch k runs, so "the batch just
yielded" is the wrong batch to pair a training loss with. Instead every yielded batch enters
this queue with its example ids and weights, and ``record(losses)`` pairs with the oldest
batch not yet recorded. A loop that records once per batch, in order, pairs correctly however
far ahead a wrapper reads; ``record(losses, ids=...)`` pairs by ids instead of by order.

A loop that never records must not make the queue grow: when more than ``max_lag`` batches
are waiting the oldest are forgotten, and a later ``record()`` without ids then raises (its
pair is unknown) instead of guessing. A new epoch that follows one in which nothing was
recorded starts with an empty queue, so a loop may begin recording at any epoch.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Handout", "HandoutQueue"]

MAX_LAG = 64  # yielded batches a loop may be behind its loader (no prefetcher reads this far)


@dataclass
class Handout:
    """One yielded batch: its size, example ids (if known), weights (if the policy reweights)
    and the epoch it belongs to."""

    size: int
    ids: Tensor | None
    weights: Tensor | None
    epoch: int


class HandoutQueue:
    """Yielded batches not yet recorded, oldest first."""

    def __init__(self, max_lag: int = MAX_LAG) -> None:
        self.max_lag = max_lag
        self._waiting: collections.deque[Handout] = collections.deque()
        self._forgotten = 0  # batches dropped from the queue since the last record()
        self._recorded_since_epoch = 0
        self.last: Handout | None = None  # the most recently yielded batch

    def __len__(self) -> int:
        return len(self._waiting)

    def push(self, handout: Handout) -> None:
        self._waiting.append(handout)
        self.last = handout
        if len(self._waiting) > self.max_lag:
            self._waiting.popleft()
            self._forgotten += 1

    def new_epoch(self) -> None:
        """Called by ``iter()``: forget an epoch in which nothing was recorded."""
        if self._recorded_since_epoch == 0:
            self._waiting.clear()
            self._forgotten = 0
        self._recorded_since_epoch = 0

    def peek(self, ids: Tensor | None = None) -> Handout:
        """The handout ``record()`` is about: the oldest one, or the one holding ``ids``.
        It stays queued until :meth:`remove` (a ``record()`` that fails changes nothing)."""
        if ids is not None:
            return self._matching(ids)
        if self._forgotten:
            raise RuntimeError(
                f"record() cannot tell which batch these losses belong to: {self._forgotten} yielded "
                f"batches were never recorded (more than {self.max_lag} waiting). Call record() once "
                "for every yielded batch, in order, from the first batch of the epoch; or pass "
                "record(losses, ids=example_ids)"
            )
        if not self._waiting:
            raise RuntimeError(
                "record() was called more times than batches were yielded; call it once per batch"
                if self.last is not None
                else "record() was called before any batch was yielded; call it after each batch"
            )
        return self._waiting[0]

    def _matching(self, ids: Tensor) -> Handout:
        ids = torch.as_tensor(ids).cpu().long().flatten()
        for handout in self._waiting:
            if handout.ids is not None and handout.ids.numel() == ids.numel() and torch.equal(handout.ids, ids):
                return handout
        raise ValueError(
            f"record(ids=...) got ids {ids[:8].tolist()} that match no yielded, unrecorded batch; "
            "pass the ids of a batch this loader yielded (in its row order), each batch once"
        )

    def has_epoch(self, epoch: int) -> bool:
        """Whether a batch of ``epoch`` is still waiting to be recorded."""
        return any(h.epoch == epoch for h in self._waiting)

    def remove(self, handout: Handout) -> None:
        """Mark ``handout`` (from :meth:`peek`) recorded."""
        for k, waiting in enumerate(self._waiting):
            if waiting is handout:
                del self._waiting[k]
                self._recorded_since_epoch += 1
                return

    def only_waiting(self) -> Handout | None:
        """The single batch waiting to be recorded; ``None`` if none; raises if several."""
        if len(self._waiting) > 1 or self._forgotten:
            raise RuntimeError(
                f"batch_weights is ambiguous: {len(self._waiting) + self._forgotten} yielded batches "
                "have not been recorded (a wrapper reads ahead, or the loop never calls record()); "
                "use loss = sb.record(per_example_losses).mean(), which pairs each batch's weights "
                "with its losses in order"
            )
        return self._waiting[0] if self._waiting else None
