"""attribkit: training-data attribution building blocks as scikit-learn estimators."""

from ._gradients import per_example_gradients
from .base import BaseEstimator
from .config import ComputeConfig

__version__ = "0.1.0"

__all__ = [
    # configuration
    "ComputeConfig",
    # estimators
    "BaseEstimator",
    # helpers
    "per_example_gradients",
]
