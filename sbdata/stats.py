"""Per-epoch counters: what was loaded, scored, selected and yielded, and the time it took."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from .cache import IdTable, narrowest

__all__ = ["HISTORY_EPOCHS", "SAMPLED_EPOCHS", "EpochStats", "LoaderStats", "SelectionLog"]


@dataclass
class EpochStats:
    """Counters for one epoch of a :class:`~sbdata.SelectiveBatchLoader`.

    ``loaded``: examples the source loader produced; ``loads_skipped``: examples a stale epoch
    never loaded; ``scored``: examples the scorer saw; ``selected``: examples the policy kept;
    ``passed_through``: examples of source batches yielded unchanged (schedule or interrupt);
    ``yielded`` / ``batches``: examples and batches handed to the training loop;
    ``recorded``: examples whose training loss came back through ``record()``;
    ``dropped``: selected rows dropped so that every distributed rank yields as many batches;
    ``scoring_seconds``: wall-clock time inside the scoring pass.
    """

    epoch: int = 0
    mode: str = "plain"
    loaded: int = 0
    loads_skipped: int = 0
    scored: int = 0
    selected: int = 0
    passed_through: int = 0
    yielded: int = 0
    batches: int = 0
    source_batches: int = 0
    recorded: int = 0
    dropped: int = 0
    scoring_seconds: float = 0.0

    @property
    def candidates(self) -> int:
        """Examples the policy chose from: scored or cached, not passed through whole."""
        return self.loaded + self.loads_skipped - self.passed_through

    @property
    def kept_fraction(self) -> float:
        """Selected examples over :attr:`candidates` (1.0 when nothing was selected on)."""
        return self.selected / self.candidates if self.candidates else 1.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: finished epochs kept in ``LoaderStats.history`` and in checkpoints (the state stays bounded)
HISTORY_EPOCHS = 32
#: epochs whose loss samples ``SelectionLog`` keeps (and checkpoints)
SAMPLED_EPOCHS = 8


@dataclass
class LoaderStats:
    """``current`` is the epoch in progress (or last finished); ``history`` the last
    :data:`HISTORY_EPOCHS` finished epochs."""

    current: EpochStats = field(default_factory=EpochStats)
    history: list[EpochStats] = field(default_factory=list)

    def begin(self, epoch: int, mode: str) -> EpochStats:
        self.current = EpochStats(epoch=epoch, mode=mode)
        return self.current

    def end(self) -> None:
        self.history.append(self.current)
        del self.history[:-HISTORY_EPOCHS]

    def __getitem__(self, epoch: int) -> EpochStats:
        for stats in reversed(self.history):
            if stats.epoch == epoch:
                return stats
        if self.current.epoch == epoch:
            return self.current
        raise KeyError(f"no statistics for epoch {epoch}")

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current.as_dict(), "history": [s.as_dict() for s in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in fields(EpochStats)}
        self.current = EpochStats(**{k: v for k, v in state["current"].items() if k in names})
        self.history = [
            EpochStats(**{k: v for k, v in s.items() if k in names}) for s in state["history"]
        ]


class SelectionLog:
    """What the selection looked like, for :func:`sbdata.plot.selection_report`.

    Per epoch (the last :data:`SAMPLED_EPOCHS`), a sample of about ``max_samples`` scored (or
    cached) losses with whether each was kept; per example id, how often it was a candidate
    and how often it was kept (4 + 4 bytes per example, only when ids are known; sparse ids as
    in :class:`~sbdata.cache.IdTable`). The sample is drawn with its own generator, so logging
    never changes which examples are selected.

    NOTE [ Logging stays off the hot path ]
    ``observe`` runs once per source batch, so it does almost nothing there: the sample is a
    reservoir of whole batches (one random draw per batch; a kept-mask is built only for the
    few batches that enter the reservoir), and the per-id counts are added at the batch's ids
    only (work in proportion to the batch, never to the table). With equal-sized batches every
    loss of an epoch is equally likely to be in the sample.
    """

    def __init__(self, max_samples: int = 4096, seed: int = 0, size: int = 0, per_example: bool = True) -> None:
        self.max_samples = max_samples
        self.per_example = per_example  # keep the per-id counts
        self._reservoir: dict[int, list[tuple[Tensor, Tensor]]] = {}  # epoch -> [(losses, kept?)]
        self._seen: dict[int, list[int]] = {}  # epoch -> [losses seen, batches seen, sampled]
        self._size = size  # examples expected, if known: the count table is sized for them
        self._counts = _count_table(size if per_example else 0)
        self._generator = torch.Generator().manual_seed(seed)

    def observe(self, epoch: int, losses: Tensor, rows: Tensor, ids: Tensor | None) -> None:
        """Note that ``rows`` of the candidates ``losses`` (example ``ids``, if known) were kept."""
        self._sample(epoch, losses, rows)
        if ids is not None and self.per_example:
            ids = ids.cpu().long()
            slots = self._counts.slots(ids)
            self._counts.cols["candidates"].index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
            kept = slots[rows.cpu()]
            self._counts.cols["kept"].index_add_(0, kept, torch.ones_like(kept, dtype=torch.int32))

    def _sample(self, epoch: int, losses: Tensor, rows: Tensor) -> None:
        """Reservoir sampling over batches (Algorithm R with whole batches as the items)."""
        if epoch not in self._reservoir:
            for old in sorted(self._reservoir)[:-SAMPLED_EPOCHS + 1]:  # keep the last few epochs
                del self._reservoir[old], self._seen[old]
        reservoir = self._reservoir.setdefault(epoch, [])
        seen = self._seen.setdefault(epoch, [0, 0, 0])
        seen[0] += losses.numel()
        seen[1] += 1
        if seen[2] < self.max_samples:  # still filling up
            reservoir.append(self._entry(losses, rows))
            seen[2] += reservoir[-1][0].numel()
            return
        slot = int(torch.randint(seen[1], (1,), generator=self._generator))
        if slot < len(reservoir):
            reservoir[slot] = self._entry(losses, rows)

    def _entry(self, losses: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        losses = losses.detach().float().cpu().clone()
        chosen = torch.zeros(losses.numel(), dtype=torch.bool)
        chosen[rows.cpu()] = True
        if losses.numel() > self.max_samples:  # a whole epoch at once (stale planning): subsample
            pick = torch.randperm(losses.numel(), generator=self._generator)[: self.max_samples]
            losses, chosen = losses[pick], chosen[pick]
        return losses, chosen

    @property
    def samples(self) -> dict[int, tuple[Tensor, Tensor, int]]:
        """epoch -> ``(sampled losses, whether each was kept, losses seen in the epoch)``."""
        out = {}
        for epoch, parts in self._reservoir.items():
            losses = torch.cat([p for p, _ in parts]) if parts else torch.empty(0)
            chosen = torch.cat([c for _, c in parts]) if parts else torch.empty(0, dtype=torch.bool)
            out[epoch] = (losses, chosen, self._seen[epoch][0])
        return out

    def counts(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, candidacies, times kept)`` of every example that was ever a candidate."""
        ids, cols = self._counts.items()
        return ids, cols["candidates"], cols["kept"]

    def _dense(self, name: str) -> Tensor:
        if self._counts.keys is not None:
            raise ValueError("example ids are sparse here (far larger than the dataset); use counts()")
        return self._counts.cols[name]

    @property
    def candidates(self) -> Tensor:
        """Per example id: how many times it was a selection candidate (dense ids)."""
        return self._dense("candidates")

    @property
    def kept(self) -> Tensor:
        """Per example id: how many times it was kept (dense ids)."""
        return self._dense("kept")

    def selection_frequency(self) -> Tensor:
        """Per example that was ever a candidate: the fraction of its candidacies that were kept."""
        _, candidates, kept = self.counts()
        return kept.float() / candidates.float()

    def state_dict(self) -> dict[str, Any]:
        return {
            "reservoir": {int(e): [(l.clone(), c.clone()) for l, c in parts] for e, parts in self._reservoir.items()},
            "seen": {int(e): list(v) for e, v in self._seen.items()},
            "counts": self._saved_counts(),
            "generator": self._generator.get_state(),
        }

    def _saved_counts(self) -> dict[str, Any]:
        """Per-id counts in the narrowest integer type (a byte each while below 256)."""
        ids, cols = self._counts.saved()
        return {"ids": ids, "candidates": narrowest(cols["candidates"]), "kept": narrowest(cols["kept"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reservoir = {int(e): [(l.clone(), c.clone()) for l, c in parts] for e, parts in state["reservoir"].items()}
        self._seen = {int(e): list(v) for e, v in state["seen"].items()}
        self._counts = _count_table(self._size if self.per_example else 0)
        counts = state["counts"]
        self._counts.restore(counts["ids"], {"candidates": counts["candidates"], "kept": counts["kept"]})
        self._generator.set_state(state["generator"])


def _count_table(size: int = 0) -> IdTable:
    return IdTable({"candidates": (torch.int32, 0), "kept": (torch.int32, 0)}, size, present="candidates")
