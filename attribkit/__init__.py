"""attribkit: training-data attribution building blocks as scikit-learn estimators."""

from . import evaluation
from ._scores import influence, self_influence
from .base import BaseEstimator
from .config import ComputeConfig
from .gradients import per_example_gradients
from .ifvp import EKFACIFVP, DataInfIFVP, ExplicitIFVP, IterativeIFVP
from .persistence import load, save
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
    # persistence (safe: safetensors + JSON, no pickle on load)
    "save",
    "load",
    # evaluation against retraining (attribkit.evaluation.loo_correlation, .lds)
    "evaluation",
]
