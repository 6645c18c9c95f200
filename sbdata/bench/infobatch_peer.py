"""Peer baselines written for the benchmark, outside sbdata: InfoBatch and RS2.

Neither goes through ``SelectiveBatchLoader``: each is its own small sampler that the
benchmark's training loop (``sbdata/bench/train.py``) drives with the same model, optimiser,
LR schedule shape and clock as every other method, so they are measured side by side.

NOTE [ InfoBatch peer ]
Written from the description in Qin et al., *InfoBatch: Lossless Training Speed Up by Unbiased
Dynamic Data Pruning* (ICLR 2024), not from its code. Every example has a score, its last seen
training loss, initialised to 1 for all (so no example is below the mean before it has been
trained once, and the first epoch trains on everything). At the start of each epoch before the
last ``1 - delta`` of training (``epoch < delta * epochs``), the examples whose score is below
the mean score are "well learned": each of them is pruned with probability ``r``; the epoch
trains on the rest, in a random order, and multiplies the losses of the kept well-learned
examples by ``1 / (1 - r)`` so that the expected gradient is the full data's. The trained
examples' scores become their (unweighted) training losses. The last epochs (from
``delta * epochs`` on) train on all the data with weight 1 ("annealing").

NOTE [ RS2 peer ]
Repeated random sampling without replacement (Okanovic et al., *Repeated Random Sampling for
Minimizing the Time-to-Accuracy of Learning*, ICLR 2024): each epoch trains on a fraction of
the data, the next slice of a random permutation; a new permutation starts only when the
current one is used up, so every example is seen once before any is seen twice. Over the same
number of epochs as plain training, at fraction 0.5, it costs half of plain's time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["InfoBatchPeer", "RS2Sampler", "expected_kept"]


class InfoBatchPeer:
    """InfoBatch's per-epoch pruning (NOTE [ InfoBatch peer ]).

    Use per epoch: ``order, weights = peer.plan(epoch)``, then for every batch of ids taken
    from ``order`` train on ``losses * weights[ids]`` and call ``peer.update(ids, losses)``
    with the unweighted per-example losses.

    Args:
        n: examples in the training set.
        epochs: the training's epoch budget.
        r: the probability of pruning a below-mean example (InfoBatch's default 0.5).
        delta: the share of epochs with pruning; the rest train on all the data (0.875).
        seed: seed of the pruning draws and of the order.
    """

    def __init__(self, n: int, epochs: int, *, r: float = 0.5, delta: float = 0.875, seed: int = 0) -> None:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"r must be in [0, 1), got r={r!r}")
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta must be in [0, 1], got delta={delta!r}")
        self.n, self.epochs, self.r, self.delta = int(n), int(epochs), float(r), float(delta)
        self.scores = torch.ones(self.n, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, int]] = []  # per epoch: kept, pruned, below_mean

    def prunes(self, epoch: int) -> bool:
        """Whether ``epoch`` prunes (it lies before the last ``1 - delta`` of training)."""
        return epoch < self.delta * self.epochs

    def plan(self, epoch: int) -> tuple[Tensor, Tensor]:
        """The ids the epoch trains on, in a random order, and every example's loss weight
        (``1 / (1 - r)`` for the kept below-mean ones, 1 otherwise)."""
        weights = torch.ones(self.n, dtype=torch.float32)
        keep = torch.ones(self.n, dtype=torch.bool)
        below = torch.zeros(self.n, dtype=torch.bool)
        if self.prunes(epoch):
            below = self.scores < self.scores.mean()
            pruned = below & (torch.rand(self.n, generator=self.generator) < self.r)
            keep = ~pruned
            weights[below & keep] = 1.0 / (1.0 - self.r)
        ids = keep.nonzero().flatten()
        order = ids[torch.randperm(len(ids), generator=self.generator)]
        self.history.append({"kept": len(order), "pruned": self.n - len(order), "below_mean": int(below.sum())})
        return order, weights

    def update(self, ids: Tensor, losses: Tensor) -> None:
        """The trained examples' scores become their unweighted training losses."""
        self.scores[ids] = losses.detach().float().to(self.scores.device)


class RS2Sampler(Sampler[int]):
    """Each epoch, the next ``fraction`` of a random permutation of the data, without
    replacement across epochs (NOTE [ RS2 peer ]). ``set_epoch(e)`` picks epoch ``e``'s slice;
    the slices of a seed are a pure function of the epoch."""

    def __init__(self, n: int, fraction: float = 0.5, seed: int = 0) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got fraction={fraction!r}")
        self.n, self.fraction, self.seed, self.epoch = int(n), float(fraction), int(seed), 0
        self.per_epoch = max(1, int(round(fraction * n)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_epoch

    def _permutation(self, k: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + k))

    def ids(self, epoch: int) -> Tensor:
        """The ids of ``epoch``: positions ``[epoch * m, (epoch + 1) * m)`` of the endless
        sequence of permutations, ``m`` per epoch."""
        start = epoch * self.per_epoch
        out, taken = [], 0
        while taken < self.per_epoch:
            k, offset = divmod(start + taken, self.n)
            part = self._permutation(k)[offset : offset + self.per_epoch - taken]
            out.append(part)
            taken += len(part)
        return torch.cat(out)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids(self.epoch).tolist())


def expected_kept(scores: Tensor, r: float) -> float:
    """The expected number of examples an InfoBatch epoch keeps for ``scores``: every example
    at or above the mean, and ``1 - r`` of those below it."""
    below = int((scores < scores.mean()).sum())
    return len(scores) - r * below
