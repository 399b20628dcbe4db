"""Plumbing shared by the functional wrappers: configs and pytrees.

Nothing here computes anything an estimator computes; it turns dattri 0.1.0's
calling conventions (callables, tuples of tensors, pytrees of gradients) into
the arrays and configs the estimators take. Parameter checks are the
estimators' own (:mod:`attribkit._compute.validation`).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from ..config import ComputeConfig


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
