"""Sources: adapters from what the user wraps to what the loader needs.

* :class:`~sbdata.sources.base.Source`: the interface, with its declared capabilities.
* :class:`~sbdata.sources.dataloader.DataLoaderSource`: a map-style ``DataLoader`` (or
  torchdata's ``StatefulDataLoader``), rebuilt to load chosen id batches.
* :class:`~sbdata.sources.iterable.IterableSource`: any re-iterable of batches;
  :class:`~sbdata.sources.iterable.StatefulSource` when it keeps its own position.
* ``sbdata.sources.ffcv.FFCVSource``: an FFCV ``Loader`` (imported only when one is wrapped).
* ``sbdata.sources.nodes.NodesSource``: a ``torchdata.nodes.Loader`` whose graph draws id batches
  and then maps them (``sbdata.sources.nodes.nodes_pipeline`` builds one); imported only when one
  is wrapped. A ``Loader`` of another shape is streamed with its own ``state_dict``.
* :class:`~sbdata.sources.wids.WidsSource`: a map-style ``DataLoader`` drawing from a WebDataset
  ``wids`` sampler.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from .base import Source, close_iterator, default_batch_sizes, forward_set_epoch
from .dataloader import DataLoaderSource, PlannedBatchSampler, rebuildable
from .iterable import IterableSource, StatefulSource, is_stateful
from .wids import WidsSource, wids_sampler

__all__ = [
    "DataLoaderSource",
    "IterableSource",
    "PlannedBatchSampler",
    "Source",
    "StatefulSource",
    "WidsSource",
    "close_iterator",
    "default_batch_sizes",
    "forward_set_epoch",
    "make_source",
]


def make_source(loader: Any) -> Source:
    """Pick the source for ``loader``."""
    if not isinstance(loader, Iterable):
        raise TypeError(
            f"loader must be a DataLoader, an FFCV Loader or a re-iterable of batches, got "
            f"{type(loader).__name__}"
        )
    if isinstance(loader, Iterator):
        raise TypeError(
            f"loader is a one-shot iterator ({type(loader).__name__}); it would be empty after the "
            "first epoch. Pass a re-iterable (a DataLoader, a list, or an object whose __iter__ "
            "starts a new pass)"
        )
    if isinstance(loader, DataLoader) and loader.batch_sampler is None and not isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            "loader is a DataLoader(batch_size=None): it yields single examples, not batches, and "
            "SelectiveBatchLoader selects rows of batches; give the DataLoader a batch_size (the "
            "source batch to select from)"
        )
    if _is_ffcv_loader(loader):
        from .ffcv import FFCVSource

        return FFCVSource(loader)
    if _is_nodes_loader(loader):
        from .nodes import nodes_source

        source = nodes_source(loader)
        if source is not None:
            return source
    if rebuildable(loader):
        if wids_sampler(loader) is not None:
            return WidsSource(loader)
        return DataLoaderSource(loader)  # type: ignore[arg-type]
    if is_stateful(loader):
        return StatefulSource(loader)
    return IterableSource(loader)


def _is_nodes_loader(loader: Any) -> bool:
    return any(cls.__module__.startswith("torchdata.nodes") and cls.__name__ == "Loader" for cls in type(loader).__mro__)


def _is_ffcv_loader(loader: Any) -> bool:
    return any(cls.__module__.startswith("ffcv.") and cls.__name__ == "Loader" for cls in type(loader).__mro__)
