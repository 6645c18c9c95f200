"""Sources that stream: any re-iterable of batches, and loaders with their own position."""

from __future__ import annotations

from typing import Any

from ..batches import batch_length
from .base import Source

__all__ = ["IterableSource", "StatefulSource"]


class IterableSource(Source):
    """Any re-iterable of batches (a list, a class whose ``__iter__`` starts a new pass, a
    DataLoader sbdata does not rebuild). Ids come only from the batch (``index_key``)."""

    def batch_sizes(self) -> list[int] | None:
        if isinstance(self.loader, (list, tuple)):  # batches already in memory: just count
            return [batch_length(batch) for batch in self.loader]
        return super().batch_sizes()


class StatefulSource(IterableSource):
    """A streamed loader with its own ``state_dict``/``load_state_dict`` (torchdata's
    ``StatefulDataLoader`` over an iterable dataset, ``torchdata.nodes.Loader``): a
    mid-epoch checkpoint stores the loader's own position instead of a batch count."""

    stateful = True

    def position(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_position(self, state: dict[str, Any]) -> None:
        if state:
            self.loader.load_state_dict(state)


def is_stateful(loader: Any) -> bool:
    """The loader keeps its own position: it has ``state_dict``/``load_state_dict``, and is not
    an Accelerate ``DataLoaderShard`` whose methods only work with ``use_stateful_dataloader``."""
    if getattr(loader, "use_stateful_dataloader", True) is False:
        return False
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
