"""Plumbing shared by the functional wrappers: configs, pytrees and checks.

Nothing here computes anything an estimator computes; it turns dattri 0.1.0's
calling conventions (callables, tuples of tensors, pytrees of gradients) into
the arrays and configs the estimators take.
"""

from __future__ import annotations

import numbers

import torch
from torch.utils._pytree import tree_flatten

from ..config import ComputeConfig

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def value_error(func: str, name: str, expected: str, value) -> ValueError:
    return ValueError(
        f"The {name!r} parameter of {func} must be {expected}. Got {value!r} instead."
    )


def check_callable(func_name: str, name: str, value) -> None:
    if not callable(value):
        raise TypeError(
            f"The {name!r} parameter of {func_name} must be a callable. "
            f"Got {type(value).__name__} {value!r} instead."
        )


def check_nonneg_float(func: str, name: str, value) -> float:
    if not is_real(value) or not (0.0 <= float(value) < float("inf")):
        raise value_error(func, name, "a float >= 0", value)
    return float(value)


def float_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promoted floating dtype of ``dtypes`` (integers promote to float32)."""
    out = None
    for d in dtypes:
        d = d if d in _DTYPES else torch.float32
        out = d if out is None else torch.promote_types(out, d)
    return out


def config(device, dtype: torch.dtype) -> ComputeConfig:
    """The config of an estimator fitted inside a function call.

    Local (``distributed=False``: the user's function and data are this
    process's own), silent, on ``device`` in ``dtype``.
    """
    if isinstance(device, torch.device):
        device = str(device)
    return ComputeConfig(device=device, dtype=dtype, progress=False, distributed=False)


def leaves(tree, func: str, name: str) -> list[torch.Tensor]:
    """The tensors of a pytree (tensor, tuple, list or dict) in flattening order."""
    flat, _ = tree_flatten(tree)
    if not flat or not all(isinstance(t, torch.Tensor) for t in flat):
        raise TypeError(
            f"{func} expected {name} to be a tensor or a tuple/list/dict of tensors. "
            f"Got {type(tree).__name__} with leaves "
            f"{[type(t).__name__ for t in flat]} instead."
        )
    return flat
