"""Inverse-Fisher-vector products: explicit (exact), DataInf, EK-FAC and iterative (exact, CG)."""

from .datainf import DataInfIFVP
from .ekfac import EKFACIFVP
from .explicit import ExplicitIFVP
from .iterative import IterativeIFVP

__all__ = ["DataInfIFVP", "EKFACIFVP", "ExplicitIFVP", "IterativeIFVP"]
