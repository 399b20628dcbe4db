"""Inverse-Fisher-vector products: explicit (exact), DataInf (closed form) and EK-FAC."""

from .datainf import DataInfIFVP
from .ekfac import EKFACIFVP
from .explicit import ExplicitIFVP

__all__ = ["DataInfIFVP", "EKFACIFVP", "ExplicitIFVP"]
