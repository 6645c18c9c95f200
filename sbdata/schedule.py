"""When selection is active: Composer's ``start``/``end``/``interrupt`` schedule.

Progress is measured in whole epochs (``epoch / epochs``), so a whole epoch is either
selective or plain and ``len(loader)`` can be known before the epoch starts.
"""

from __future__ import annotations

from collections.abc import Callable

from .repack import count_output_batches

__all__ = [
    "carried_after",
    "epoch_length",
    "first_active_epoch",
    "is_interrupt_batch",
    "selection_active",
    "training_progress",
]


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


def first_active_epoch(epochs: int | None, start: float, end: float) -> int:
    """The first epoch in which selection is active (0 when ``epochs`` is unknown)."""
    for epoch in range(epochs or 0):
        if selection_active(training_progress(epoch, epochs), start, end):
            return epoch
    return 0


def _kept(sizes: list[int], interrupt: int, count: Callable[[int], int]) -> tuple[int, list[int]]:
    """``(interrupt batches, rows kept from each other batch)`` of an epoch of ``sizes``."""
    selective = [n for i, n in enumerate(sizes) if not is_interrupt_batch(i, interrupt)]
    return len(sizes) - len(selective), [count(n) for n in selective]


def epoch_length(
    sizes: list[int], *, plain: bool, interrupt: int, count: Callable[[int], int], batch_size: int, last_batch: str, carried: int
) -> int:
    """Batches an epoch of source batches ``sizes`` yields: all of them in a plain epoch;
    otherwise the ``interrupt`` batches plus the full batches (and, with ``last_batch="yield"``,
    the partial one) that ``count(n)`` kept rows of each other batch fill, after ``carried``
    rows left over from the previous epoch."""
    if plain:
        return len(sizes)
    passed, kept = _kept(sizes, interrupt, count)
    return passed + count_output_batches(kept, batch_size, last_batch, carried)


def carried_after(
    sizes: list[int], *, plain: bool, interrupt: int, count: Callable[[int], int], batch_size: int, last_batch: str, carried: int
) -> int:
    """Rows an epoch leaves in the re-pack buffer for the next one (``last_batch="carry"``)."""
    if last_batch != "carry":
        return 0
    if plain:
        return carried
    _, kept = _kept(sizes, interrupt, count)
    return (carried + sum(kept)) % batch_size
