"""Projections of gradient features: random (JL), Kronecker-structured (LoGra) and Arnoldi."""

from .arnoldi import ArnoldiProjector
from .kronecker import KroneckerProjector
from .random import RandomProjector

__all__ = ["RandomProjector", "ArnoldiProjector", "KroneckerProjector"]
