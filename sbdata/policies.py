"""Selection policies: pure functions from per-example losses to kept positions.

Each ``*_select`` function takes a 1-D tensor of losses for one scored batch and returns
the positions (sorted, ``int64``) of the examples to keep; the InfoBatch ones also return a
loss weight per kept example. The small policy classes below wrap them so a policy can
carry state (a loss history) and be chosen by name; they all answer ``select`` with a
:class:`Selection`. Randomness always comes from the caller's ``torch.Generator``; nothing
here touches the global RNG.

A custom policy subclasses :class:`BasePolicy` and supplies ``count(n)`` and
``select(losses, generator)``; :class:`SelectionPolicy` is the full interface the loader
relies on.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "POLICIES",
    "BasePolicy",
    "InfoBatchPolicy",
    "RandomPolicy",
    "RankPolicy",
    "Selection",
    "SelectionPolicy",
    "ThresholdPolicy",
    "TopKPolicy",
    "infobatch_prune_select",
    "infobatch_select",
    "make_policy",
    "num_kept",
    "random_select",
    "rank_select",
    "rank_select_rows",
    "threshold_probabilities",
    "threshold_select",
    "topk_select",
    "topk_select_rows",
]

#: the two ways a probabilistic policy can draw: exactly ``int(keep * n)`` rows, or the
#: published rule's independent per-example coin flips (a variable count)
COUNT_MODES = ("exact", "bernoulli")


class Selection(NamedTuple):
    """What a policy keeps of one batch of losses.

    ``rows`` are sorted ``int64`` positions into the batch. ``weights`` is ``None`` when the
    policy does not reweight, else a ``float32`` CPU tensor with one loss weight per kept row,
    in the order of ``rows``.
    """

    rows: Tensor
    weights: Tensor | None


# ---------------------------------------------------------------- argument checks


def _check_keep(keep: Any) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got keep={keep!r}; keep=1 keeps every example")
    return float(keep)


def _check_history_size(history_size: Any) -> int:
    if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
        raise ValueError(
            f"history_size must be a positive integer, got history_size={history_size!r}; "
            "pass the number of recent losses to remember, e.g. history_size=1024"
        )
    return history_size


def _check_count_mode(count: Any) -> str:
    if count not in COUNT_MODES:
        raise ValueError(
            f"count must be 'exact' or 'bernoulli', got count={count!r}; 'exact' keeps "
            "int(keep * n) of every batch, 'bernoulli' draws each example independently"
        )
    return count


def _losses_1d(losses: Tensor) -> Tensor:
    """The losses as a flat float64 CPU tensor, detached."""
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"losses must be a torch.Tensor of per-example losses, got {type(losses).__name__}; "
            "pass torch.as_tensor(losses)"
        )
    return losses.detach().double().cpu().flatten()


def _float_losses(losses: Tensor) -> Tensor:
    """The losses as a flat float32 CPU tensor, detached (what the rank-based rules sort)."""
    return _losses_1d(losses).float()


def _history(state: dict[str, Any], policy: str) -> Tensor:
    if not isinstance(state, dict) or not isinstance(state.get("history"), Tensor):
        raise ValueError(
            f"{policy}.load_state_dict needs a dict with a 'history' tensor, got state={state!r}; "
            f"pass what {policy}.state_dict() returned"
        )
    return state["history"].detach().double().cpu().flatten().clone()


# ---------------------------------------------------------------- pure selection rules


def num_kept(n: int, keep: float) -> int:
    """Examples kept from a batch of ``n`` by the exact-count policies: ``int(keep * n)``."""
    return int(keep * n)


def _empty_rows() -> Tensor:
    return torch.empty(0, dtype=torch.long)


def _sorted_with(rows: Tensor, weights: Tensor) -> Selection:
    """``rows`` sorted, with ``weights`` (float32) carried along."""
    rows, order = torch.sort(rows)
    return Selection(rows, weights[order].float())


def _draw_weighted(weights: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """``k`` distinct positions drawn one after another, each with probability proportional to
    its weight among those left, like ``torch.multinomial(weights, k, replacement=False)``.

    Done as a Gumbel top-k race in log space, so only the ratios of the weights matter (a batch
    whose weights are all about 1e-60 is drawn as faithfully as one near 1; a probability floor
    would flatten it) and zero weights never fail the draw: positions of weight 0 are only taken
    once the positive ones run out, uniformly at random among themselves. Sorted.
    """
    n = weights.numel()
    if k == 0:
        return _empty_rows()
    perm = torch.randperm(n, generator=generator)  # random order among equal (-inf) keys
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform))
    keys = torch.log(weights.double()[perm]) + gumbel
    order = torch.argsort(keys, descending=True, stable=True)
    return torch.sort(perm[order[:k]]).values


def rank_select(losses: Tensor, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """Composer's rule: draw exactly ``int(keep * n)`` without replacement, with probability
    proportional to ``((rank + 0.5) / n) ** (1 / keep - 1)`` where rank 0 is the lowest loss."""
    return rank_select_rows(_float_losses(losses).view(1, -1), keep, generator)[0]


def _rank_weights(n: int, keep: float) -> Tensor:
    """Composer's draw weight of each rank (0 = lowest loss): ``((rank + 0.5) / n) ** (1 / keep - 1)``."""
    return ((torch.arange(n, dtype=torch.float64) + 0.5) / n) ** (1.0 / keep - 1.0)


def rank_select_rows(losses: Tensor, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """:func:`rank_select` on every row of a ``[B, n]`` loss matrix at once: ``[B, k]``."""
    b, n = losses.shape
    k = num_kept(n, keep)
    if k == 0:
        return torch.empty(b, 0, dtype=torch.long)
    order = torch.argsort(losses, dim=1, stable=True)
    picked_ranks = torch.multinomial(_rank_weights(n, keep).expand(b, n), k, replacement=False, generator=generator)
    return torch.sort(torch.gather(order, 1, picked_ranks), dim=1).values


def topk_select(losses: Tensor, keep: float) -> Tensor:
    """The ``int(keep * n)`` highest losses (ties broken by position), deterministic."""
    return topk_select_rows(_float_losses(losses).view(1, -1), keep)[0]


def topk_select_rows(losses: Tensor, keep: float) -> Tensor:
    """:func:`topk_select` on every row of a ``[B, n]`` loss matrix at once: ``[B, k]``."""
    k = num_kept(losses.shape[1], keep)
    order = torch.argsort(losses, dim=1, descending=True, stable=True)
    return torch.sort(order[:, :k], dim=1).values


def random_select(n: int, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """``int(keep * n)`` positions uniformly at random: the loss-blind control."""
    k = num_kept(n, keep)
    return torch.sort(torch.randperm(n, generator=generator)[:k]).values


def threshold_probabilities(losses: Tensor, history: Tensor, beta: float) -> Tensor:
    """The paper's keep probability of each loss: ``F(L) ** beta`` (float64).

    ``F(L)`` is the fraction of ``history`` strictly below ``L``. The caller puts the batch's
    own losses into ``history`` first, as the reference code does, so the lowest loss of a
    fresh history gets probability 0 (for ``beta > 0``) and the highest just under 1.
    """
    values = _losses_1d(losses)
    ranked = torch.sort(_losses_1d(history)).values
    below = torch.searchsorted(ranked, values, right=False)
    return (below.double() / max(ranked.numel(), 1)) ** beta


def threshold_select(
    losses: Tensor,
    history: Tensor,
    beta: float,
    generator: torch.Generator | None = None,
    *,
    k: int | None = None,
) -> Tensor:
    """The paper's rule with probabilities :func:`threshold_probabilities`.

    With ``k=None`` each example is kept independently with its probability (the published
    draw: a variable count). With ``k`` an int, exactly ``k`` are drawn without replacement,
    each draw proportional to the probabilities of the examples left; examples of probability
    0 are only taken when fewer than ``k`` have a positive one.
    """
    prob = threshold_probabilities(losses, history, beta)
    if k is None:
        draws = torch.rand(prob.numel(), generator=generator, dtype=torch.float64)
        return torch.nonzero(draws < prob).flatten()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= prob.numel():
        raise ValueError(
            f"k must be an int in [0, {prob.numel()}] (the batch size), got k={k!r}; "
            "pass k=None for the independent draw"
        )
    return _draw_weighted(prob, k, generator)


def infobatch_select(
    losses: Tensor, mean: float, k: int, generator: torch.Generator | None = None
) -> Selection:
    """InfoBatch with an exact count: keep ``k`` rows, high losses first, unbiasedly reweighted.

    ``H`` are the rows with loss at or above ``mean``, ``L`` the others. If ``|H| >= k``, a
    uniformly random ``k`` of ``H`` is kept, each weighted ``|H| / k``. Otherwise all of ``H``
    is kept (weight 1) plus a uniformly random ``k - |H|`` of ``L``, each weighted
    ``|L| / (k - |H|)``: the inverse of its chance of being kept, so the weighted loss sum over
    the kept rows estimates the sum over the rows they were drawn from without bias.
    """
    values = _losses_1d(losses)
    n = values.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}] (the batch size), got k={k!r}")
    if k == 0:
        return Selection(_empty_rows(), torch.empty(0, dtype=torch.float32))
    is_high = values >= mean
    high = torch.nonzero(is_high).flatten()
    low = torch.nonzero(~is_high).flatten()  # below the mean (or NaN): every row is in one set
    if high.numel() >= k:
        rows = high[torch.randperm(high.numel(), generator=generator)[:k]]
        weights = torch.full((k,), high.numel() / k)
    else:
        extra = k - high.numel()
        picked = low[torch.randperm(low.numel(), generator=generator)[:extra]]
        rows = torch.cat([high, picked])
        weights = torch.cat([torch.ones(high.numel()), torch.full((extra,), low.numel() / extra)])
    return _sorted_with(rows, weights)


def infobatch_prune_select(
    losses: Tensor, mean: float, prune: float, generator: torch.Generator | None = None
) -> Selection:
    """InfoBatch's published draw: keep every row at or above ``mean``, drop each row below it
    independently with probability ``prune``, and weight the kept below-mean rows
    ``1 / (1 - prune)`` (the others 1), so the expected weighted loss sum is unchanged."""
    values = _losses_1d(losses)
    low = values < mean
    dropped = low & (torch.rand(values.numel(), generator=generator, dtype=torch.float64) < prune)
    rows = torch.nonzero(~dropped).flatten()
    weights = torch.where(low[rows], 1.0 / (1.0 - prune), 1.0).float()
    return Selection(rows, weights)


# ---------------------------------------------------------------- the policy interface


@runtime_checkable
class SelectionPolicy(Protocol):
    """What :class:`~sbdata.SelectiveBatchLoader` needs from a policy.

    ``exact``: ``select`` keeps exactly ``count(n)`` of ``n`` examples every time (then
    ``len(loader)`` is exact); when False, ``count(n)`` is only an upper bound.
    ``reweights``: selections carry per-example loss weights (``Selection.weights``).
    ``select_many`` returns one :class:`Selection` per batch of losses, in order; a stateful
    policy processes the batches in order exactly as repeated ``select`` calls would.
    Subclass :class:`BasePolicy` to get defaults for everything but ``count`` and ``select``.
    """

    exact: bool
    reweights: bool

    def count(self, n: int) -> int: ...

    def select(self, losses: Tensor, generator: torch.Generator) -> Selection: ...

    def select_many(self, losses: list[Tensor], generator: torch.Generator) -> list[Selection]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


#: the members of :class:`SelectionPolicy`, as they are named in error messages
_MEMBERS = {
    "exact": "exact",
    "count": "count(n)",
    "reweights": "reweights",
    "select": "select(losses, generator)",
    "select_many": "select_many(losses, generator)",
    "state_dict": "state_dict()",
    "load_state_dict": "load_state_dict(state)",
}


def _missing_members(obj: Any) -> list[str]:
    """The :class:`SelectionPolicy` members ``obj`` lacks (methods must also be callable)."""
    missing = []
    for name in _MEMBERS:
        if not hasattr(obj, name):
            missing.append(name)
        elif name not in ("exact", "reweights") and not callable(getattr(obj, name)):
            missing.append(name)
    return missing


class BasePolicy(abc.ABC):
    """Base class for selection policies: subclass it and define ``count`` and ``select``.

    Defaults: ``exact = True`` (``select`` keeps exactly ``count(n)``), ``reweights = False``
    (selections carry no weights), ``select_many`` calling ``select`` batch by batch in order,
    no state (``state_dict`` is empty), and a ``repr`` listing the public attributes.
    """

    exact: bool = True
    reweights: bool = False

    @abc.abstractmethod
    def count(self, n: int) -> int:
        """Rows kept from a batch of ``n``: exactly if :attr:`exact`, else at most."""

    @abc.abstractmethod
    def select(self, losses: Tensor, generator: torch.Generator) -> Selection:
        """The rows to keep of one batch of per-example ``losses``."""

    def select_many(self, losses: Sequence[Tensor], generator: torch.Generator) -> list[Selection]:
        """:meth:`select` on each batch of ``losses``, in order."""
        return [self.select(batch, generator) for batch in losses]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class _FractionPolicy(BasePolicy):
    """A stateless policy keeping exactly ``int(keep * n)``."""

    def __init__(self, keep: float) -> None:
        self.keep = _check_keep(keep)

    def count(self, n: int) -> int:
        return num_kept(n, self.keep)


def _by_size(losses: Sequence[Tensor]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, batch in enumerate(losses):
        groups.setdefault(batch.numel(), []).append(i)
    return groups


def _select_rows(losses: Sequence[Tensor], choose: Callable[[Tensor], Tensor]) -> list[Selection]:
    """Apply ``choose(stacked [B, n] losses) -> [B, k] sorted positions`` to equally long
    batches at once, one group per batch length, and split the result back per batch."""
    out: list[Selection] = [Selection(_empty_rows(), None)] * len(losses)
    for members in _by_size(losses).values():
        stacked = torch.stack([_float_losses(losses[i]) for i in members])
        for i, rows in zip(members, choose(stacked)):
            out[i] = Selection(rows, None)
    return out


class RankPolicy(_FractionPolicy):
    """Composer's rank-weighted draw of exactly ``int(keep * n)`` (the default).

    ``select_many`` draws all batches of one length at once (one vectorised draw instead of
    one per batch, which makes planning a stale epoch cheap); its draws differ from repeated
    ``select`` calls but follow the same distribution.
    """

    def select(self, losses: Tensor, generator: torch.Generator) -> Selection:
        return Selection(rank_select(losses, self.keep, generator), None)

    def select_many(self, losses: Sequence[Tensor], generator: torch.Generator) -> list[Selection]:
        return _select_rows(losses, lambda stacked: rank_select_rows(stacked, self.keep, generator))


class TopKPolicy(_FractionPolicy):
    """The ``int(keep * n)`` highest losses."""

    def select(self, losses: Tensor, generator: torch.Generator) -> Selection:
        return Selection(topk_select(losses, self.keep), None)

    def select_many(self, losses: Sequence[Tensor], generator: torch.Generator) -> list[Selection]:
        return _select_rows(losses, lambda stacked: topk_select_rows(stacked, self.keep))


class RandomPolicy(_FractionPolicy):
    """``int(keep * n)`` uniformly at random (ignores the losses): the control."""

    def select(self, losses: Tensor, generator: torch.Generator) -> Selection:
        return Selection(random_select(losses.numel(), self.keep, generator), None)


class _HistoryPolicy(BasePolicy):
    """A policy that remembers the last ``history_size`` losses it saw (float64, CPU)."""

    _history: Tensor
    history_size: int

    def _remember(self, losses: Tensor) -> Tensor:
        """Add ``losses`` to the history; return them as a flat float64 CPU tensor."""
        fresh = _losses_1d(losses)
        self._history = torch.cat([self._history, fresh])[-self.history_size :]
        return fresh

    def state_dict(self) -> dict[str, Any]:
        return {"history": self._history.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history = _history(state, type(self).__name__)[-self.history_size :]


class ThresholdPolicy(_HistoryPolicy):
    """The paper's rule: probability ``p = F(L) ** beta`` over the last ``history_size`` scored
    losses (:func:`threshold_probabilities`); ``beta`` defaults to ``1 / keep - 1``.

    ``count="exact"`` (the default) draws exactly ``int(keep * n)`` of every batch without
    replacement, each draw proportional to ``p``. ``count="bernoulli"`` is the paper's
    independent draw, which keeps about ``keep`` overall (with the default ``beta``) but a
    varying number per batch; ``count(n)`` is then ``n``, an upper bound, so the loader's
    ``len`` and total steps are bounds too.
    """

    def __init__(
        self, keep: float, *, beta: float | None = None, history_size: int = 1024, count: str = "exact"
    ) -> None:
        self.keep = _check_keep(keep)
        if beta is not None:
            if isinstance(beta, bool) or not isinstance(beta, (int, float)):
                raise TypeError(f"beta must be a number, got beta={beta!r}; omit it to use 1/keep - 1")
            if not beta >= 0:
                raise ValueError(f"beta must be >= 0, got beta={beta!r}; omit it to use 1/keep - 1")
            if math.isinf(beta):
                raise ValueError(f"beta must be finite, got beta={beta!r}; omit it to use 1/keep - 1")
        self.beta = (1.0 / self.keep - 1.0) if beta is None else float(beta)
        self.history_size = _check_history_size(history_size)
        self.count_mode = _check_count_mode(count)
        self.exact = self.count_mode == "exact"
        self._history = torch.empty(0, dtype=torch.float64)

    def count(self, n: int) -> int:
        return num_kept(n, self.keep) if self.exact else n  # bernoulli: every example may be kept

    def select(self, losses: Tensor, generator: torch.Generator) -> Selection:
        fresh = self._remember(losses)
        k = num_kept(fresh.numel(), self.keep) if self.exact else None
        return Selection(threshold_select(fresh, self._history, self.beta, generator, k=k), None)

    def __repr__(self) -> str:
        return (
            f"ThresholdPolicy(keep={self.keep}, beta={self.beta}, history_size={self.history_size}, "
            f"count={self.count_mode!r})"
        )


class InfoBatchPolicy(_HistoryPolicy):
    """InfoBatch-style pruning of the examples below the running mean loss, with weights that
    keep the expected gradient unchanged. The mean is that of the last ``history_size`` losses
    the policy saw (this batch's included), an estimate of the dataset mean that InfoBatch
    computes from its per-example scores. Selections carry the weights (``reweights``).

    ``count="exact"`` (the default) keeps exactly ``int(keep * n)`` of every batch, all the
    above-mean rows first (see :func:`infobatch_select`). ``count="bernoulli"`` is InfoBatch's
    published draw: keep every row at or above the mean and drop each below-mean row with
    probability ``prune`` (default ``1 - keep``), weighting the kept ones ``1 / (1 - prune)``
    (:func:`infobatch_prune_select`); ``count(n)`` is then ``n``, an upper bound.
    """

    reweights = True

    def __init__(
        self,
        keep: float = 0.5,
        *,
        prune: float | None = None,
        history_size: int = 4096,
        count: str = "exact",
    ) -> None:
        self.keep = _check_keep(keep)
        self.count_mode = _check_count_mode(count)
        self.exact = self.count_mode == "exact"
        if prune is not None and self.exact:
            raise ValueError(
                f"prune applies only to count='bernoulli', got prune={prune!r} with count='exact' "
                "(where keep sets the kept fraction); drop prune= or pass count='bernoulli'"
            )
        if prune is not None and (isinstance(prune, bool) or not isinstance(prune, (int, float))):
            raise TypeError(f"prune must be a number in [0, 1), got prune={prune!r}")
        self.prune = None if self.exact else (1.0 - self.keep) if prune is None else float(prune)
        if self.prune is not None and not 0.0 <= self.prune < 1.0:
            raise ValueError(
                f"prune must be in [0, 1), got prune={self.prune!r}; it is the chance of dropping a "
                "below-mean example (prune=1 would need infinite weights)"
            )
        self.history_size = _check_history_size(history_size)
        self._history = torch.empty(0, dtype=torch.float64)

    def count(self, n: int) -> int:
        return num_kept(n, self.keep) if self.exact else n  # bernoulli: every example may be kept

    def select(self, losses: Tensor, generator: torch.Generator) -> Selection:
        fresh = self._remember(losses)
        mean = float(self._history.mean()) if self._history.numel() else 0.0
        if self.prune is None:
            return infobatch_select(fresh, mean, num_kept(fresh.numel(), self.keep), generator)
        return infobatch_prune_select(fresh, mean, self.prune, generator)

    def __repr__(self) -> str:
        prune = "" if self.prune is None else f", prune={self.prune}"
        return (
            f"InfoBatchPolicy(keep={self.keep}{prune}, history_size={self.history_size}, "
            f"count={self.count_mode!r})"
        )


def _infobatch_prune(keep: float) -> InfoBatchPolicy:
    """InfoBatch's published draw by name: every example at or above the mean loss kept, each
    below-mean one dropped with probability ``1 - keep`` (kept ones weighted ``1 / keep``)."""
    return InfoBatchPolicy(keep, count="bernoulli")


#: names accepted as ``policy=``: each builds its policy from ``keep``
POLICIES: dict[str, Callable[[float], BasePolicy]] = {
    "rank": RankPolicy,
    "threshold": ThresholdPolicy,
    "topk": TopKPolicy,
    "random": RandomPolicy,
    "infobatch": InfoBatchPolicy,
    "infobatch-prune": _infobatch_prune,
}


def make_policy(policy: str | SelectionPolicy, keep: float) -> SelectionPolicy:
    """Return a policy object for a name in :data:`POLICIES` (built with ``keep``), or
    ``policy`` itself if it is a :class:`SelectionPolicy`."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(
                f"policy must be one of {sorted(POLICIES)} or a policy object, got policy={policy!r}"
            )
        return POLICIES[policy](keep)
    missing = _missing_members(policy)
    if missing or not isinstance(policy, SelectionPolicy):
        raise TypeError(
            f"policy must be a name or an object with {', '.join(_MEMBERS.values())}; got "
            f"{type(policy).__name__}, which lacks {', '.join(missing)}; subclass "
            "sbdata.policies.BasePolicy (it supplies all but count and select)"
        )
    return policy
