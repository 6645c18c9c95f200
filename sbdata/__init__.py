"""sbdata: Selective Backprop as a data-pipeline component.

``SelectiveBatchLoader`` wraps a PyTorch ``DataLoader``, an FFCV ``Loader`` or any re-iterable
of batches, scores each batch with a model, keeps the examples with the highest loss and
re-packs them into full-size batches, so the training loop stays as it is.
"""

from . import checkpoint
from .cache import LossCache
from .config import LoaderConfig
from .loader import SelectiveBatchLoader
from .policies import (
    BasePolicy,
    InfoBatchPolicy,
    RandomPolicy,
    RankPolicy,
    Selection,
    SelectionPolicy,
    ThresholdPolicy,
    TopKPolicy,
)
from .recipes import recipe
from .stats import EpochStats, LoaderStats

__version__ = "0.1.0"

__all__ = [
    "BasePolicy",
    "EpochStats",
    "InfoBatchPolicy",
    "LoaderConfig",
    "LoaderStats",
    "LossCache",
    "RandomPolicy",
    "RankPolicy",
    "Selection",
    "SelectionPolicy",
    "SelectiveBatchLoader",
    "ThresholdPolicy",
    "TopKPolicy",
    "checkpoint",
    "recipe",
]
if __all__ != sorted(__all__):
    raise AssertionError("__all__ is not sorted")
