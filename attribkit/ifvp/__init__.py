"""Inverse-Fisher-vector products: explicit (exact) and DataInf (closed form)."""

from .datainf import DataInfIFVP
from .explicit import ExplicitIFVP

__all__ = ["DataInfIFVP", "ExplicitIFVP"]
