"""sbdata: Selective Backprop as a data-pipeline component.

``SelectiveBatchLoader`` wraps a PyTorch ``DataLoader``, an FFCV ``Loader`` or any re-iterable
of batches, scores each batch with a model, keeps the examples with the highest loss and
re-packs them into full-size batches, so the training loop stays as it is.
"""

from .cache import LossCache as LossCache
from .config import LoaderConfig as LoaderConfig
from .loader import SelectiveBatchLoader as SelectiveBatchLoader
from .policies import (
    BasePolicy as BasePolicy,
)
from .policies import (
    InfoBatchPolicy as InfoBatchPolicy,
)
from .policies import (
    RandomPolicy as RandomPolicy,
)
from .policies import (
    RankPolicy as RankPolicy,
)
from .policies import (
    Selection as Selection,
)
from .policies import (
    SelectionPolicy as SelectionPolicy,
)
from .policies import (
    ThresholdPolicy as ThresholdPolicy,
)
from .policies import (
    TopKPolicy as TopKPolicy,
)
from .recipes import recipe as recipe
from .stats import EpochStats as EpochStats
from .stats import LoaderStats as LoaderStats

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
    "recipe",
]
if __all__ != sorted(__all__):
    raise AssertionError("__all__ is not sorted")
