"""Checksums of tensor values: do two ranks hold the same model, has a model changed?

:func:`fingerprints` gives each tensor three float64 numbers: the L1 norm of
its values and two sums weighted by ``cos``/``sin`` of their flat positions
(so a moved or permuted value shows). Equal values give fingerprints that
differ only by the rounding of float64 sums (another device, another
summation order), far below :data:`FINGERPRINT_RTOL` of the L1 norm. Two
users:

* a distributed fit (:meth:`attribkit._compute.distributed.Reducer.agree_fit`)
  checks that every rank holds the same weights;
* an estimator that keeps a model by reference (``IterativeIFVP``) records
  :func:`parameter_checksum` at ``fit`` and compares it
  (:func:`checksum_differences`) before every use and when a model is
  attached to an unpickled estimator.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "FINGERPRINT_RTOL",
    "checksum_differences",
    "fingerprints",
    "parameter_checksum",
]

#: Two ranks' value fingerprints agree when they differ by at most this
#: fraction of the values' L1 norm. Bitwise-equal values give fingerprints
#: that differ only by the rounding of float64 sums taken in another order
#: (another device type or CPU kernel): about ``log2(n) * 1.1e-16`` of the L1
#: norm for tree and pairwise summation, under ``1e-13`` even for blocks of
#: ``10^3`` sequential additions, so ``1e-10`` never rejects equal weights;
#: any change that moves a value by more than ``1e-10`` of the model's L1
#: mass (``~1.4e-10`` with the weights of :func:`fingerprints`) is caught.
FINGERPRINT_RTOL = 1e-10
#: Golden-ratio steps: the weights cos/sin(j * phi + t * psi) never repeat.
_PHI, _PSI = 0.6180339887498949, 0.7548776662466927
#: Elements converted to float64 at a time by :func:`fingerprints` (whole rows).
_CHUNK = 1 << 22
#: Values per row of the weight table of :func:`fingerprints`.
_ROW = 1 << 12


def _weight_table(device: torch.device) -> torch.Tensor:
    """``(_ROW, 2)`` float64: ``cos(j phi)`` and ``sin(j phi)`` for ``j < _ROW``."""
    j = torch.arange(_ROW, dtype=torch.float64, device=device).mul_(_PHI)
    return torch.stack([torch.cos(j), torch.sin(j)], 1)


def fingerprints(tensors) -> torch.Tensor:
    """A float64 ``(T, 3)`` fingerprint of each tensor's values, on the CPU.

    Row ``t``: ``(sum_j |x_j|, sum_j x_j cos(a_j), sum_j x_j sin(a_j))`` over
    the flattened tensor, ``a_j = j * phi + t * psi`` (golden-ratio steps),
    accumulated in float64 on the tensor's device, ``2**22`` elements at a
    time. Moving a value, swapping two equal-shaped tensors or permuting
    entries changes the weighted sums (one of ``|cos|``, ``|sin|`` is at least
    ``0.7``); the L1 norm is the scale for :data:`FINGERPRINT_RTOL`. The
    weighted sums are matrix products with one ``(4096, 2)`` table of
    ``cos/sin(j phi)``, each row of 4096 values rotated by its own phase
    (``cos(a + b) = cos a cos b - sin a sin b``): about one float64 pass over
    the values, a fraction of a forward pass. Integer and boolean tensors
    are converted exactly (up to ``2**53``).

    Examples
    --------
    >>> import torch
    >>> from attribkit._compute.checksum import fingerprints
    >>> a = torch.tensor([1.0, 2.0])
    >>> fp = fingerprints([a, a.flip(0)])
    >>> fp.shape, bool(fp[0, 0] == fp[1, 0]), bool(fp[0, 1] == fp[1, 1])
    (torch.Size([2, 3]), True, False)
    """
    rows, tables = [], {}
    for t, x in enumerate(tensors):
        flat = x.detach().reshape(-1)
        device = flat.device
        if device not in tables:
            tables[device] = _weight_table(device)
        W = tables[device]
        acc = torch.zeros(3, dtype=torch.float64, device=device)
        for start in range(0, flat.numel(), _CHUNK):
            block = flat[start : start + _CHUNK].to(torch.float64)
            m = block.numel()
            full = m - m % _ROW
            acc[0] += block.abs().sum()
            sums = block[:full].view(-1, _ROW) @ W  # (rows, 2): sum x cos(j phi), sum x sin
            if full < m:
                sums = torch.cat([sums, (block[full:] @ W[: m - full])[None]])
            first = start // _ROW
            phase = torch.arange(first, first + sums.shape[0], dtype=torch.float64, device=device)
            phase.mul_(_ROW).mul_(_PHI).add_(t * _PSI)
            cos, sin = torch.cos(phase), torch.sin(phase)
            acc[1] += (cos * sums[:, 0] - sin * sums[:, 1]).sum()
            acc[2] += (sin * sums[:, 0] + cos * sums[:, 1]).sum()
        rows.append(acc.cpu())
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


def parameter_checksum(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(len(tensors), 4)`` float64 CPU rows: each tensor's :func:`fingerprints` and size.

    Examples
    --------
    >>> import torch
    >>> a = {"w": torch.tensor([1.0, 2.0, 3.0])}
    >>> parameter_checksum(a).shape
    torch.Size([1, 4])
    >>> checksum_differences(parameter_checksum(a), parameter_checksum(a), list(a))
    []
    >>> b = {"w": torch.tensor([3.0, 2.0, 1.0])}  # the same values, permuted
    >>> checksum_differences(parameter_checksum(a), parameter_checksum(b), list(a))
    ['w']
    """
    sizes = torch.tensor([[float(t.numel())] for t in tensors.values()], dtype=torch.float64)
    if not len(sizes):
        return torch.zeros(0, 4, dtype=torch.float64)
    return torch.cat([fingerprints(list(tensors.values())), sizes], 1)


def checksum_differences(
    have: torch.Tensor, want: torch.Tensor, names: list[str], rtol: float = FINGERPRINT_RTOL
) -> list[str]:
    """Names of the rows where two :func:`parameter_checksum` results differ.

    Each of the three fingerprint columns must agree to ``rtol`` of the
    larger L1 norm; different row counts or sizes differ.
    """
    if have.shape != want.shape:
        return list(names)
    out = []
    for name, a, b in zip(names, have.tolist(), want.tolist()):
        scale = max(abs(a[0]), abs(b[0]))
        finite = all(v == v and abs(v) != float("inf") for v in (*a, *b))
        if a[3] != b[3] or not finite or any(abs(x - y) > rtol * scale for x, y in zip(a, b)):
            out.append(name)
    return out
