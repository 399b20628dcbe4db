"""The seed's functional API, as thin wrappers over attribkit's estimators.

Code written against dattri 0.1.0's ``dattri.func.projection`` and
``dattri.func.fisher`` runs unchanged after replacing the import with
``attribkit.functional``; the estimators do the work. Where the documented
reference behaviour is mathematically wrong (a Fisher matrix that is not
``g gᵀ``, a default damping that divides by zero, caches sharing one list,
eigenvectors taken as rows), these functions do the correct thing and their
docstrings say so.
"""

from .fisher import (
    EKFAC_CACHE_KEY,
    IFVPUsageError,
    MLPCache,
    ifvp_at_x_datainf,
    ifvp_at_x_ekfac,
    ifvp_at_x_explicit,
    ifvp_datainf,
    ifvp_explicit,
    manual_cache_forward,
)
from .projection import arnoldi_project, random_project

__all__ = [
    # projection
    "random_project",
    "arnoldi_project",
    # inverse-Fisher-vector products
    "ifvp_explicit",
    "ifvp_at_x_explicit",
    "ifvp_datainf",
    "ifvp_at_x_datainf",
    "ifvp_at_x_ekfac",
    # EK-FAC caching
    "MLPCache",
    "manual_cache_forward",
    "EKFAC_CACHE_KEY",
    # errors
    "IFVPUsageError",
]
