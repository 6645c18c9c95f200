"""FFCV support; the adapter lives in :mod:`sbdata.sources.ffcv` (imported only when used)."""

from .sources.ffcv import FFCVSource as FFCVSource
from .sources.ffcv import FilteredOrder as FilteredOrder

__all__ = ["FFCVSource", "FilteredOrder"]
