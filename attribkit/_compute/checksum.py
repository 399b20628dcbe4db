"""Checksums of parameter values: has a model changed since an estimator was fitted on it?

An estimator that keeps a model by reference (``IterativeIFVP``) records a
checksum of the parameter values at ``fit`` and compares it before every use
and when a model is attached to an unpickled estimator: three float64 sums per
parameter (of the values, of their squares, and of the values weighted by a
ramp over their flat positions, which catches a permutation). The sums are
compared with a relative tolerance, so the same values summed on another
device (another summation order) still match.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["parameter_checksum", "checksum_differences"]


def parameter_checksum(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(len(tensors), 4)`` float64 CPU rows ``(sum, sum of squares, ramp sum, numel)``.

    Examples
    --------
    >>> import torch
    >>> a = {"w": torch.tensor([1.0, 2.0, 3.0])}
    >>> parameter_checksum(a).tolist()
    [[6.0, 14.0, 2.0, 3.0]]
    >>> checksum_differences(parameter_checksum(a), parameter_checksum(a), list(a))
    []
    >>> b = {"w": torch.tensor([3.0, 2.0, 1.0])}  # the same values, permuted
    >>> checksum_differences(parameter_checksum(a), parameter_checksum(b), list(a))
    ['w']
    """
    rows = []
    for t in tensors.values():
        x = t.detach().reshape(-1).to(torch.float64)
        n = x.numel()
        ramp = torch.linspace(-1.0, 1.0, n, dtype=torch.float64, device=x.device)
        rows.append(
            torch.stack([x.sum(), x.square().sum(), (x * ramp).sum(), x.new_tensor(float(n))])
        )
    if not rows:
        return torch.zeros(0, 4, dtype=torch.float64)
    return torch.stack(rows).cpu()


def checksum_differences(
    have: torch.Tensor, want: torch.Tensor, names: list[str], rtol: float = 1e-9
) -> list[str]:
    """Names of the rows where two :func:`parameter_checksum` results differ.

    Sums of squares must agree to ``rtol`` relative; the plain and ramp sums,
    which can cancel, to ``rtol * sqrt(numel * sum of squares)`` (their
    largest possible magnitude). Different row counts or sizes differ.
    """
    if have.shape != want.shape:
        return list(names)
    out = []
    for name, a, b in zip(names, have.tolist(), want.tolist()):
        if a[3] != b[3]:
            out.append(name)
            continue
        squares = max(abs(a[1]), abs(b[1]))
        bound = rtol * math.sqrt(a[3] * squares)
        if (
            not all(math.isfinite(v) for v in (*a, *b))
            or abs(a[1] - b[1]) > rtol * squares
            or abs(a[0] - b[0]) > bound
            or abs(a[2] - b[2]) > bound
        ):
            out.append(name)
    return out
