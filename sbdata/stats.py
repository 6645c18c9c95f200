"""Per-epoch counters: what was loaded, scored, selected and yielded, and the time it took."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

__all__ = ["EpochStats", "LoaderStats", "SelectionLog"]


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
    def kept_fraction(self) -> float:
        """Selected examples over scored-or-cached candidates (1.0 when nothing was selected on)."""
        candidates = self.loaded + self.loads_skipped - self.passed_through
        return self.selected / candidates if candidates else 1.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoaderStats:
    """``current`` is the epoch in progress (or last finished); ``history`` every finished epoch."""

    current: EpochStats = field(default_factory=EpochStats)
    history: list[EpochStats] = field(default_factory=list)

    def begin(self, epoch: int, mode: str) -> EpochStats:
        self.current = EpochStats(epoch=epoch, mode=mode)
        return self.current

    def end(self) -> None:
        self.history.append(self.current)

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

    Per epoch, a sample of up to ``max_samples`` scored (or cached) losses with whether each was
    kept; per example id, how often it was a candidate and how often it was kept (4 + 4 bytes
    per example, only when ids are known). The sample is drawn with its own generator, so
    logging never changes which examples are selected.
    """

    def __init__(self, max_samples: int = 4096, seed: int = 0) -> None:
        self.max_samples = max_samples
        self.samples: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # losses, kept?, seen
        self.candidates = torch.zeros(0, dtype=torch.int32)
        self.kept = torch.zeros(0, dtype=torch.int32)
        self._generator = torch.Generator().manual_seed(seed)

    def observe(self, epoch: int, losses: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor | None) -> None:
        losses = losses.detach().float().cpu()
        chosen = torch.zeros(losses.numel(), dtype=torch.bool)
        chosen[rows.cpu()] = True
        self._sample(epoch, losses, chosen)
        if ids is not None:
            self._count(ids.cpu().long(), chosen)

    def _sample(self, epoch: int, losses: torch.Tensor, chosen: torch.Tensor) -> None:
        """Reservoir sampling (one chance per batch): every loss of the epoch is about equally
        likely to end up in the sample."""
        kept_losses, kept_chosen, seen = self.samples.get(
            epoch, (torch.empty(0), torch.empty(0, dtype=torch.bool), 0)
        )
        room = self.max_samples - kept_losses.numel()
        if room > 0:  # still filling up
            kept_losses = torch.cat([kept_losses, losses[:room]])
            kept_chosen = torch.cat([kept_chosen, chosen[:room]])
            seen, losses, chosen = seen + min(room, losses.numel()), losses[room:], chosen[room:]
        if losses.numel():  # each new loss replaces a random slot with chance max_samples / seen
            chance = self.max_samples / (seen + (losses.numel() + 1) / 2)
            take = torch.rand(losses.numel(), generator=self._generator) < chance
            count = int(take.sum())
            if count:
                slots = torch.randint(self.max_samples, (count,), generator=self._generator)
                kept_losses[slots] = losses[take]
                kept_chosen[slots] = chosen[take]
            seen += losses.numel()
        self.samples[epoch] = (kept_losses, kept_chosen, seen)

    def _count(self, ids: torch.Tensor, chosen: torch.Tensor) -> None:
        needed = int(ids.max()) + 1 if ids.numel() else 0
        if needed > self.candidates.numel():
            grow = max(needed, 2 * self.candidates.numel())
            self.candidates = torch.cat([self.candidates, torch.zeros(grow - self.candidates.numel(), dtype=torch.int32)])
            self.kept = torch.cat([self.kept, torch.zeros(grow - self.kept.numel(), dtype=torch.int32)])
        self.candidates.index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.int32))
        self.kept.index_add_(0, ids[chosen], torch.ones(int(chosen.sum()), dtype=torch.int32))

    def selection_frequency(self) -> torch.Tensor:
        """Per example that was ever a candidate: the fraction of its candidacies that were kept."""
        seen = self.candidates > 0
        return self.kept[seen].float() / self.candidates[seen].float()

    def state_dict(self) -> dict[str, Any]:
        return {
            "samples": {int(e): [l.clone(), c.clone(), n] for e, (l, c, n) in self.samples.items()},
            "candidates": self.candidates.clone(),
            "kept": self.kept.clone(),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = {int(e): (v[0], v[1], int(v[2])) for e, v in state["samples"].items()}
        self.candidates = state["candidates"].clone()
        self.kept = state["kept"].clone()
        self._generator.set_state(state["generator"])
