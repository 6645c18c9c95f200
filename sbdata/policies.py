"""Selection policies: pure functions from per-example losses to kept positions.

Each ``*_select`` function takes a 1-D tensor of losses for one scored batch and returns
the positions (sorted, ``int64``) of the examples to keep. The small policy classes below
wrap them so a policy can carry state (the threshold rule's loss history) and be chosen by
name. Randomness always comes from the caller's ``torch.Generator``; nothing here touches
the global RNG.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "POLICIES",
    "InfoBatchPolicy",
    "RandomPolicy",
    "RankPolicy",
    "SelectionPolicy",
    "ThresholdPolicy",
    "TopKPolicy",
    "make_policy",
    "num_kept",
    "random_select",
    "rank_select",
    "select_each",
    "threshold_select",
    "topk_select",
]


def num_kept(n: int, keep: float) -> int:
    """Examples kept from a batch of ``n`` by the exact-count policies: ``int(keep * n)``."""
    return int(keep * n)


def rank_select(losses: Tensor, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """Composer's rule: draw exactly ``int(keep * n)`` without replacement, with probability
    proportional to ``((rank + 0.5) / n) ** (1 / keep - 1)`` where rank 0 is the lowest loss."""
    n = losses.numel()
    k = num_kept(n, keep)
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.argsort(losses.detach().float().cpu(), stable=True)
    picked_ranks = torch.multinomial(_rank_weights(n, keep), k, replacement=False, generator=generator)
    return torch.sort(order[picked_ranks]).values


def _rank_weights(n: int, keep: float) -> Tensor:
    """Composer's draw weight of each rank (0 = lowest loss): ``((rank + 0.5) / n) ** (1 / keep - 1)``."""
    return ((torch.arange(n, dtype=torch.float64) + 0.5) / n) ** (1.0 / keep - 1.0)


def topk_select(losses: Tensor, keep: float) -> Tensor:
    """The ``int(keep * n)`` highest losses (ties broken by position), deterministic."""
    return topk_select_rows(losses.detach().float().cpu().view(1, -1), keep)[0]


def _by_size(losses: list[Tensor]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, batch in enumerate(losses):
        groups.setdefault(batch.numel(), []).append(i)
    return groups


def _select_rows(losses: list[Tensor], choose: Any) -> list[Tensor]:
    """Apply ``choose(stacked [B, n] losses) -> [B, k] sorted positions`` to equally long
    batches at once, one group per batch length, and split the result back per batch."""
    out: list[Tensor] = [torch.empty(0, dtype=torch.long)] * len(losses)
    for members in _by_size(losses).values():
        stacked = torch.stack([losses[i].detach().float().cpu().flatten() for i in members])
        for i, rows in zip(members, choose(stacked)):
            out[i] = rows
    return out


def rank_select_rows(losses: Tensor, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """:func:`rank_select` on every row of a ``[B, n]`` loss matrix at once: ``[B, k]``."""
    b, n = losses.shape
    k = num_kept(n, keep)
    if k == 0:
        return torch.empty(b, 0, dtype=torch.long)
    order = torch.argsort(losses, dim=1, stable=True)
    picked_ranks = torch.multinomial(_rank_weights(n, keep).expand(b, n), k, replacement=False, generator=generator)
    return torch.sort(torch.gather(order, 1, picked_ranks), dim=1).values


def topk_select_rows(losses: Tensor, keep: float) -> Tensor:
    """:func:`topk_select` on every row of a ``[B, n]`` loss matrix at once: ``[B, k]``."""
    k = num_kept(losses.shape[1], keep)
    order = torch.argsort(losses, dim=1, descending=True, stable=True)
    return torch.sort(order[:, :k], dim=1).values


def random_select(n: int, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """``int(keep * n)`` positions uniformly at random: the loss-blind control."""
    k = num_kept(n, keep)
    return torch.sort(torch.randperm(n, generator=generator)[:k]).values


def threshold_select(
    losses: Tensor, history: Tensor, beta: float, generator: torch.Generator | None = None
) -> Tensor:
    """The paper's rule: keep each example independently with probability ``F(L) ** beta``.

    ``F(L)`` is the fraction of ``history`` strictly below ``L``. The caller puts the batch's
    own losses into ``history`` first, as the reference code does, so the lowest loss of a
    fresh history is never kept and the highest is kept with probability just under 1.
    """
    values = losses.detach().double().cpu()
    ranked = torch.sort(history.detach().double().cpu()).values
    below = torch.searchsorted(ranked, values, right=False)
    prob = (below.double() / max(ranked.numel(), 1)) ** beta
    draws = torch.rand(values.numel(), generator=generator, dtype=torch.float64)
    return torch.nonzero(draws < prob).flatten()


@runtime_checkable
class SelectionPolicy(Protocol):
    """What :class:`~sbdata.SelectiveBatchLoader` needs from a policy.

    ``exact`` says whether ``select`` always keeps ``count(n)`` of ``n`` examples (then
    ``len(loader)`` is exact); a probabilistic policy keeps at most ``count(n)``.
    """

    exact: bool

    def count(self, n: int) -> int: ...

    def select(self, losses: Tensor, generator: torch.Generator) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _StatelessPolicy:
    exact = True

    def __init__(self, keep: float) -> None:
        self.keep = keep

    def count(self, n: int) -> int:
        return num_kept(n, self.keep)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keep={self.keep})"


class RankPolicy(_StatelessPolicy):
    """Composer's rank-weighted draw of exactly ``int(keep * n)`` (the default)."""

    def select(self, losses: Tensor, generator: torch.Generator) -> Tensor:
        return rank_select(losses, self.keep, generator)

    def select_many(self, losses: list[Tensor], generator: torch.Generator) -> list[Tensor]:
        return _select_rows(losses, lambda stacked: rank_select_rows(stacked, self.keep, generator))


class TopKPolicy(_StatelessPolicy):
    """The ``int(keep * n)`` highest losses."""

    def select(self, losses: Tensor, generator: torch.Generator) -> Tensor:
        return topk_select(losses, self.keep)

    def select_many(self, losses: list[Tensor], generator: torch.Generator) -> list[Tensor]:
        return _select_rows(losses, lambda stacked: topk_select_rows(stacked, self.keep))


class RandomPolicy(_StatelessPolicy):
    """``int(keep * n)`` uniformly at random (ignores the losses): the control."""

    def select(self, losses: Tensor, generator: torch.Generator) -> Tensor:
        return random_select(losses.numel(), self.keep, generator)


class ThresholdPolicy:
    """The paper's rule: keep with probability ``F(L) ** beta`` over the last ``history_size``
    scored losses. ``beta`` defaults to ``1 / keep - 1``, so about ``keep`` is kept."""

    exact = False

    def __init__(self, keep: float, *, beta: float | None = None, history_size: int = 1024) -> None:
        if history_size < 1:
            raise ValueError(
                f"history_size must be a positive integer, got history_size={history_size}"
            )
        if beta is not None and beta < 0:
            raise ValueError(f"beta must be >= 0, got beta={beta}; omit it to use 1/keep - 1")
        self.keep = keep
        self.beta = (1.0 / keep - 1.0) if beta is None else float(beta)
        self.history_size = history_size
        self._history = torch.empty(0, dtype=torch.float64)

    def count(self, n: int) -> int:
        return n  # an upper bound: every example may be kept

    def select(self, losses: Tensor, generator: torch.Generator) -> Tensor:
        fresh = losses.detach().double().cpu().flatten()
        self._history = torch.cat([self._history, fresh])[-self.history_size :]
        return threshold_select(fresh, self._history, self.beta, generator)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self._history.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history = state["history"].double().clone()

    def __repr__(self) -> str:
        return f"ThresholdPolicy(keep={self.keep}, beta={self.beta}, history_size={self.history_size})"


class InfoBatchPolicy:
    """InfoBatch-style pruning: keep every example at or above the mean loss, drop a random
    ``prune`` fraction of those below it, and up-weight the kept low-loss examples by
    ``1 / (1 - prune)`` so the expected gradient is unchanged. The mean is taken over the last
    ``history_size`` losses the policy saw (this batch's included), an estimate of the dataset
    mean that InfoBatch computes from its per-example scores. The weights of the batch just
    yielded are in ``SelectiveBatchLoader.batch_weights``.
    """

    exact = False

    def __init__(self, keep: float = 0.5, *, prune: float | None = None, history_size: int = 4096) -> None:
        self.prune = (1.0 - keep) if prune is None else float(prune)
        if not 0.0 <= self.prune < 1.0:
            raise ValueError(f"prune must be in [0, 1), got prune={self.prune}")
        if history_size < 1:
            raise ValueError(f"history_size must be a positive integer, got history_size={history_size}")
        self.keep = keep
        self.history_size = history_size
        self._history = torch.empty(0, dtype=torch.float64)
        self._mean = 0.0

    def count(self, n: int) -> int:
        return n

    def select(self, losses: Tensor, generator: torch.Generator) -> Tensor:
        values = losses.detach().double().cpu().flatten()
        self._history = torch.cat([self._history, values])[-self.history_size :]
        self._mean = float(self._history.mean())
        low = values < self._mean
        dropped = low & (torch.rand(values.numel(), generator=generator, dtype=torch.float64) < self.prune)
        return torch.nonzero(~dropped).flatten()

    def weigh(self, losses: Tensor, rows: Tensor) -> Tensor:
        """Weights of the kept ``rows`` (call right after :meth:`select` on the same losses)."""
        low = losses.detach().double().cpu()[rows] < self._mean
        return torch.where(low, 1.0 / (1.0 - self.prune), 1.0).float()

    def state_dict(self) -> dict[str, Any]:
        return {"history": self._history.clone(), "mean": self._mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history = state["history"].double().clone()
        self._mean = float(state["mean"])

    def __repr__(self) -> str:
        return f"InfoBatchPolicy(prune={self.prune}, history_size={self.history_size})"


def select_each(policy: SelectionPolicy, losses: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """``policy.select`` on each batch of ``losses``, in order.

    A policy with a ``select_many`` method (rank, top-k) decides all batches at once, which is
    what makes planning a stale epoch cheap (one vectorised draw instead of one per source
    batch); the draws then differ from per-batch calls but follow the same distribution.
    Any other policy, stateful ones included, is called batch by batch in order.
    """
    select_many = getattr(policy, "select_many", None)
    if callable(select_many):
        return select_many(losses, generator)
    return [policy.select(batch, generator) for batch in losses]


POLICIES: dict[str, type] = {
    "rank": RankPolicy,
    "threshold": ThresholdPolicy,
    "topk": TopKPolicy,
    "random": RandomPolicy,
    "infobatch": InfoBatchPolicy,
}


def make_policy(policy: str | SelectionPolicy, keep: float) -> SelectionPolicy:
    """Return a policy object for a name in :data:`POLICIES`, or ``policy`` itself."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(
                f"policy must be one of {sorted(POLICIES)} or a policy object, got policy={policy!r}"
            )
        return POLICIES[policy](keep)
    if not isinstance(policy, SelectionPolicy):
        raise TypeError(
            "policy must be a name or an object with exact, count(n), select(losses, generator), "
            f"state_dict() and load_state_dict(); got {type(policy).__name__}"
        )
    return policy
