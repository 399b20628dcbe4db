"""Projections of gradient features: random (JL) and Arnoldi."""

from .random import RandomProjector

__all__ = ["RandomProjector"]
