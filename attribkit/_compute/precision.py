"""Which dtype each stage computes in: the precision policy, with its reasons, once.

Three stages, after kronfluence's per-stage dtype arguments:

* **Factors** (:data:`F64`, :func:`factor_dtype`): sums of squares that are
  factorised or inverted (Fishers, covariances, Krylov bases, their
  Cholesky factors and eigendecompositions) are float64 whatever
  ``config.dtype`` says. Their rounding error grows with the condition
  number, and single or half precision loses exactly the small
  eigen-directions that an inverse amplifies most. Every device attribkit
  runs on (CPU, CUDA) has float64.
* **Accumulation** (``matmul_dtype(..., stage="accumulate")``): products that
  are summed over many examples or applied against float64 factors (EK-FAC's
  statistics and rotations, DataInf's corrections, Arnoldi's coordinates)
  run in the working dtype, but never below float32: a half-precision sum of
  thousands of terms, or a rotation by a rounded eigenbasis, loses more than
  the half-precision result can show.
* **Projection** (``matmul_dtype(..., stage="project")``): one product of a
  batch with a random matrix whose entries are already rounded to
  ``config.dtype`` (RandomProjector, KroneckerProjector). On CUDA half and
  bfloat16 stay themselves (cuBLAS accumulates their GEMMs in float32, and
  the result is kept in that dtype anyway); on the CPU they compute in
  float32 on the half-rounded values, since CPU half GEMMs are slow and not
  every build accumulates them in float32.

float32 and float64 compute as themselves in every stage.
"""

from __future__ import annotations

import torch

__all__ = [
    "EPS64",
    "F64",
    "FLOAT_DTYPES",
    "HALF_DTYPES",
    "STAGES",
    "factor_dtype",
    "float_dtype",
    "itemsize",
    "matmul_dtype",
]

#: The factor dtype (see the module docstring).
F64 = torch.float64
#: Machine epsilon of float64: the rounding level of factors.
EPS64 = torch.finfo(F64).eps
HALF_DTYPES = (torch.float16, torch.bfloat16)
#: The dtypes attribkit computes and stores in.
FLOAT_DTYPES = (*HALF_DTYPES, torch.float32, F64)
STAGES = ("accumulate", "project")


def factor_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The dtype of sums that are factorised or inverted: float64 on every supported device."""
    return F64


def matmul_dtype(
    dtype: torch.dtype, device: torch.device | str | None = None, *, stage: str
) -> torch.dtype:
    """The dtype products of ``dtype`` values run in at ``stage`` on ``device``.

    Parameters
    ----------
    dtype : torch.dtype
        The working dtype (the model's, or ``config.dtype``).
    device : torch.device or str, optional
        Where the product runs (only the ``"project"`` stage depends on it).
    stage : {"accumulate", "project"}
        See the module docstring.
    """
    if stage == "accumulate":
        return dtype if dtype in (torch.float32, F64) else torch.float32
    if stage == "project":
        on_cpu = torch.device(device).type == "cpu"
        return torch.float32 if dtype in HALF_DTYPES and on_cpu else dtype
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def float_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promoted floating dtype of ``dtypes`` (other dtypes count as float32)."""
    out = None
    for d in dtypes:
        d = d if d in FLOAT_DTYPES else torch.float32
        out = d if out is None else torch.promote_types(out, d)
    return out
