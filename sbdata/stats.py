"""Per-epoch counters: what was loaded, scored, selected and yielded, and the time it took."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["EpochStats", "LoaderStats"]


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
