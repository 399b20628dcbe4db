"""attribkit: training-data attribution building blocks as scikit-learn estimators."""

from . import evaluation
from ._gradients import per_example_gradients
from ._scores import influence, self_influence
from .base import BaseEstimator
from .config import ComputeConfig
from .ifvp import EKFACIFVP, DataInfIFVP, ExplicitIFVP, IterativeIFVP
from .projection import ArnoldiProjector, KroneckerProjector, RandomProjector

__version__ = "0.1.0"

__all__ = [
    # configuration
    "ComputeConfig",
    # estimators
    "BaseEstimator",
    "RandomProjector",
    "ArnoldiProjector",
    "KroneckerProjector",
    "ExplicitIFVP",
    "DataInfIFVP",
    "EKFACIFVP",
    "IterativeIFVP",
    # helpers
    "per_example_gradients",
    "influence",
    "self_influence",
    # evaluation against retraining (attribkit.evaluation.loo_correlation, .lds)
    "evaluation",
]
