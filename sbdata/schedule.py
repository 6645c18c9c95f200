"""When selection is active: Composer's ``start``/``end``/``interrupt`` schedule.

Progress is measured in whole epochs (``epoch / epochs``), so a whole epoch is either
selective or plain and ``len(loader)`` can be known before the epoch starts.
"""

from __future__ import annotations

__all__ = ["is_interrupt_batch", "selection_active", "training_progress"]


def training_progress(epoch: int, epochs: int | None) -> float:
    """Fraction of training done when ``epoch`` starts; 0.0 when ``epochs`` is unknown."""
    if not epochs:
        return 0.0
    return epoch / epochs


def selection_active(progress: float, start: float, end: float) -> bool:
    """Selection runs while ``start <= progress < end`` (half-open, as in Composer)."""
    return start <= progress < end


def is_interrupt_batch(batch_idx: int, interrupt: int) -> bool:
    """Source batch ``batch_idx`` (0-based within the epoch) passes through unchanged when
    ``(batch_idx + 1) % interrupt == 0``; ``interrupt=0`` never interrupts."""
    return interrupt > 0 and (batch_idx + 1) % interrupt == 0
