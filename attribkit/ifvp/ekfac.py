"""EK-FAC: eigenvalue-corrected Kronecker-factored inverse-Fisher-vector products.

The whole data flow, from ``fit`` to ``transform``:

1. :mod:`attribkit._compute.capture` finds the covered layers (its registry:
   ``nn.Linear``, ``nn.Conv2d``, Hugging Face's ``Conv1D``) and, per batch of
   :func:`attribkit._compute.targets.target_batches` (the targets of the
   empirical, true or expected Fisher), captures each layer's input ``a``
   ``(b, T, d_in)`` (ones column for the bias, conv inputs unfolded) and
   output gradient ``s`` ``(b, T, d_out)`` of the SUM of per-example losses;
2. pass 1 (``EKFACStatistics.update_covariances``): sums ``a^T a`` and
   ``s^T s`` over all rows (tokens, positions; not the padded tokens of a
   batch's ``attention_mask``) and counts them; ``finish_covariances``
   reduces sums and counts over processes, normalises (``A = E[a a^T]``,
   ``S = E[s s^T]``) and eigendecomposes in float64 (:func:`eigh_psd`):
   ``A = Q_A diag(.) Q_A^T``, ``S = Q_S diag(.) Q_S^T`` (eigenvectors as columns);
3. pass 2 (``update_lambda``): the per-example gradient in that basis,
   ``Q_S^T (s_i^T a_i) Q_A``, squared and summed over examples (from pass 1's
   captured ``(a, s)`` when they fit ``config.memory_budget``, else from a
   second pass over the data);
   ``finish_lambda`` reduces and normalises: ``Λ = E_i[(Q_S^T ∇W_i Q_A)^2]``
   (both passes: :func:`fit_statistics`); a zero damping with entries of
   ``Λ`` at rounding level is refused (:func:`check_lambda`);
4. ``transform`` per layer: ``Q_S ((Q_S^T V Q_A) / (Λ + damping)) Q_A^T``.

Statistics core (no hooks): ``EKFACStatistics`` and ``ekfac_apply``
----------------------------------------------------------------------
``EKFACStatistics(dims, names=None, *, device, dtype, memory_budget)``
    ``dims``: one ``(d_in, d_out)`` per layer; ``dtype``: the dtype of the
    incoming ``a`` and ``s`` (the products run in it, or float32 for half
    types; sums are folded into float64 regularly).
``update_covariances(k, a, s, weights=None, rows=None)``
    One batch of layer ``k``: ``a`` ``(b, T, d_in)``, ``s`` ``(b, T, d_out)``
    with optional per-example ``weights`` ``(b,)``, or ``s`` ``(K, b, T, d_out)``
    with ``weights`` ``(K, b)`` (``fisher="expected"``: ``S`` gets
    ``sum_k w_k s_k s_k^T``); ``rows``, a ``(b, T)`` boolean mask, keeps only
    those rows (padding left out of the sums and the row count). Call it
    once per batch and layer.
``finish_covariances(reducer=None)``
    Raises ``ValueError`` naming the layer and the first batch where a NaN or
    infinity appeared, before any eigendecomposition; all-reduces the raw sums
    and counts with ``reducer.sum_`` (:mod:`attribkit._compute.distributed`;
    once for the pass), normalises, eigendecomposes (:func:`eigh_psd`: a
    failure raises ``ValueError`` naming the layer and the factor, on every
    rank). Afterwards ``Q_A[k]``, ``Q_S[k]``, ``eigvals_A[k]``,
    ``eigvals_S[k]`` (float64) are set.
``update_lambda(k, a, s, weights=None)`` / ``finish_lambda(reducer=None)``
    Pass 2, same shapes; returns the list of float64 ``Λ`` ``(d_out, d_in)``.
``fit_statistics(stats, covariance_batches, lambda_batches, *, reducer, keep_budget)``
    Both passes over batches of per-layer ``(a, s, weights)`` triples (or
    ``(a, s, weights, rows)``: ``rows`` enters the covariances only, ``Λ``
    takes each example's whole gradient); returns ``Λ``.
``eigh_psd(cov, what=...)``
    The eigendecomposition of a PSD covariance that never surfaces a LAPACK
    error: structurally zero rows and columns exactly (eigenvalue 0, unit
    vectors), then LAPACK's divide and conquer (scipy's ``"evd"`` on the CPU,
    ``torch.linalg.eigh`` elsewhere), scipy's ``"evr"`` and ``"ev"`` drivers,
    then ``ValueError`` naming ``what``.
``check_lambda(lam, damping, *, d, dtype, ...)``
    The rounding floor ``(eps * d)^2 * max(Λ)`` below which an entry counts
    as zero, and the error when the damping is 0.
``ekfac_apply(Q_S, Q_A, scale, X)``
    ``Q_S ((Q_S^T X Q_A) * scale) Q_A^T`` for ``X`` ``(m, d_out, d_in)``:
    ``scale = 1 / (Λ + damping)`` is the IFVP, ``Λ + damping`` the FVP.

The functional ``ifvp_at_x_ekfac`` feeds the same core (``fit_statistics``,
``check_lambda``, ``ekfac_apply``) with the pairs an ``MLPCache`` holds;
there is no second implementation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .._compute import validation as V
from .._compute.budget import rows_within
from .._compute.capture import (
    LayerCapture,
    matrix_view,
    param_layout,
    resolve_layers,
    token_mask,
    warn_coverage,
    warn_tied,
)
from .._compute.distributed import Reducer
from .._compute.distributed import reducer as make_reducer
from .._compute.model import EvalMode, call_model, model_device, model_dtype
from .._compute.precision import F64 as _F64
from .._compute.precision import itemsize, matmul_dtype
from .._compute.targets import resolve_loss, target_batches
from .._compute.vectors import offsets
from ..base import BaseEstimator
from ..config import ComputeConfig

__all__ = [
    "EKFACIFVP",
    "EKFACStatistics",
    "check_lambda",
    "ekfac_apply",
    "eigh_psd",
    "fit_statistics",
]

#: float32 partial sums are folded into the float64 totals after this many rows.
_FOLD_ROWS = 1 << 14


class _Sum:
    """A float64 total fed through a partial sum in the compute dtype.

    The partial sums of products keep GEMMs in the compute dtype (float32 for
    a float32 model); folding them into float64 every ``_FOLD_ROWS`` rows
    keeps the rounding of long sums at float32's level for a few thousand
    rows, not for the whole data set. Each update records the partial sum's
    trace (its entries are sums of non-negative terms, so a NaN or infinity
    anywhere shows in the trace and stays there) to name the first bad batch
    later without a synchronisation per batch.
    """

    def __init__(self, shape, device, dtype, trace):
        self.total = torch.zeros(shape, dtype=_F64, device=device)
        self.partial = (
            self.total if dtype == _F64 else torch.zeros(shape, dtype=dtype, device=device)
        )
        self.rows = 0
        self.trace = trace  # diagonal sum (square) or full sum (Λ)
        self.history: list[torch.Tensor] = []

    def added(self, rows: int, marker: torch.Tensor | None = None) -> None:
        """Record an update of ``rows`` rows; ``marker``: a cheaper finite-iff-finite value."""
        part = self.partial
        if marker is None:
            marker = part.diagonal().sum() if self.trace else part.sum()
        self.history.append(marker)
        self.rows += rows
        if part is not self.total and self.rows >= _FOLD_ROWS:
            self.fold()

    def fold(self) -> None:
        if self.partial is not self.total:
            self.total.add_(self.partial)
            self.partial.zero_()
        self.rows = 0

    def first_bad_batch(self) -> int | None:
        """Index of the first update after which the sum was not finite (None if none)."""
        if not self.history:
            return None
        bad = ~torch.isfinite(torch.stack(self.history))
        if not bool(bad.any()):
            return None
        return int(bad.nonzero()[0, 0])


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _weighted(s: torch.Tensor, weights) -> torch.Tensor:
    """``s`` as ``(K, b, T, d)`` scaled by ``sqrt(weights)`` (K = 1 without weights)."""
    if s.ndim == 3:
        s = s.unsqueeze(0)
        if weights is not None:
            weights = weights.reshape(1, -1)
    if weights is None:
        return s
    root = weights.to(s.dtype).clamp_min(0).sqrt()
    return s * root[:, :, None, None]


class EKFACStatistics:
    """Sums, counts and factors of EK-FAC for a list of layers (no hooks).

    See the module docstring for the call sequence. Every sum is kept raw
    (unnormalised) with its count until ``finish_*``, which all-reduces them
    once per pass before normalising, so a fit over sharded data gives the
    single-process result.

    Parameters
    ----------
    dims : list of (int, int)
        ``(d_in, d_out)`` per layer (``d_in`` includes the bias column).
    names : list of str, optional
        Layer names for error messages.
    device : torch.device
    dtype : torch.dtype
        dtype of the incoming ``a`` and ``s``.
    memory_budget : int
        Bytes for the ``(chunk, d_out, d_in)`` per-example temporaries of
        layers with ``T > 1``.
    """

    def __init__(self, dims, names=None, *, device, dtype, memory_budget: int = 2 * 2**30):
        self.dims = [(int(i), int(o)) for i, o in dims]
        self.names = list(names) if names is not None else [str(k) for k in range(len(dims))]
        self.device = torch.device(device)
        self.dtype = matmul_dtype(dtype, stage="accumulate")
        self.memory_budget = int(memory_budget)
        self.A = [_Sum((i, i), self.device, self.dtype, True) for i, _ in self.dims]
        self.S = [_Sum((o, o), self.device, self.dtype, True) for _, o in self.dims]
        self.rows = [0] * len(self.dims)  # tokens (rows of a) per layer
        self.examples = [0] * len(self.dims)
        self.Q_A = self.Q_S = self.eigvals_A = self.eigvals_S = None
        self.L: list[_Sum] = []
        self.lambda_examples = [0] * len(self.dims)

    # ------------------------------------------------------------ pass 1
    def update_covariances(
        self, k: int, a: torch.Tensor, s: torch.Tensor, weights=None, rows=None
    ) -> None:
        """Add one batch of layer ``k`` to the sums of ``a a^T`` and ``s s^T``.

        ``rows``: an optional ``(b, T)`` boolean mask of the rows (tokens) to
        count; the others (padding) enter neither the sums nor the row count.
        """
        a = a.to(self.dtype)
        s = _weighted(s.to(self.dtype), weights)
        if rows is not None:
            rows = rows.to(device=a.device, dtype=torch.bool)
            a2, s2 = a[rows], _rows(s[:, rows])
        else:
            a2, s2 = _rows(a), _rows(s)
        A, S = self.A[k], self.S[k]
        A.partial.addmm_(a2.mT, a2)
        S.partial.addmm_(s2.mT, s2)
        A.added(a2.shape[0])
        S.added(s2.shape[0])
        self.rows[k] += a2.shape[0]
        self.examples[k] += a.shape[0]

    def _check_finite(self, sums, what: str, stage: str) -> None:
        for k, total in enumerate(sums):
            value = total.total.diagonal().sum() if total.trace else total.total.sum()
            if bool(torch.isfinite(value)):
                continue
            batch = total.first_bad_batch()
            where = (
                f"first at batch {batch} (0-based) of the {stage} pass"
                if batch is not None
                else "after the reduction over processes (another rank's data)"
            )
            raise ValueError(
                f"The {what} of layer {self.names[k]!r} is not finite: a NaN or infinity "
                f"appeared {where}. The inputs, targets or the loss of that batch give "
                "non-finite values (NaN/Inf inputs, labels out of range, an overflowing "
                "dtype); fix the data or use a wider dtype."
            )

    def finish_covariances(self, reducer=None) -> None:
        """Check, reduce (once), normalise and eigendecompose ``A`` and ``S``."""
        for total in (*self.A, *self.S):
            total.fold()
        active = reducer is not None and reducer.active
        if not active:  # distributed: checked after the reduction, on every rank alike
            self._check_finite(self.A, "input covariance A = E[a a^T]", "covariance")
            self._check_finite(self.S, "output-gradient covariance S = E[s s^T]", "covariance")
        counts = torch.tensor([*self.rows, *self.examples], dtype=torch.int64, device=self.device)
        if reducer is not None:
            reducer.sum_(*(t.total for t in (*self.A, *self.S)), counts)
            self._check_finite(self.A, "input covariance A = E[a a^T]", "covariance")
            self._check_finite(self.S, "output-gradient covariance S = E[s s^T]", "covariance")
        n = len(self.dims)
        self.rows = [int(c) for c in counts[:n].tolist()]
        self.examples = [int(c) for c in counts[n:].tolist()]
        self.Q_A, self.Q_S, self.eigvals_A, self.eigvals_S = [], [], [], []
        # Distributed: layer k is eigendecomposed once, on rank k % world_size,
        # and broadcast (one packed broadcast per rank), so every rank holds
        # the very same bases whatever its LAPACK and thread count.
        world = reducer.world_size if active else 1
        rank = reducer.rank if active else 0
        failed: dict[int, str] = {}
        for k in range(n):
            rows = max(self.rows[k], 1)
            for total, vals, vecs, factor in (
                (self.A[k], self.eigvals_A, self.Q_A, "input covariance A"),
                (self.S[k], self.eigvals_S, self.Q_S, "output-gradient covariance S"),
            ):
                cov = total.total.div_(rows)
                if k % world == rank:
                    try:
                        w, Q = eigh_psd(cov, what=f"{factor} of layer {self.names[k]!r}")
                    except ValueError as exc:
                        if not active:
                            raise
                        # Every rank must reach the broadcast: NaN eigenvalues carry
                        # the failure to all of them, which then raise alike.
                        failed.setdefault(k, str(exc))
                        w = cov.new_full((cov.shape[0],), float("nan"))
                        Q = torch.zeros_like(cov)
                else:
                    w, Q = cov.new_empty(cov.shape[0]), torch.empty_like(cov)
                vals.append(w)
                vecs.append(Q)
        if active:
            for src in range(min(world, n)):
                mine = [k for k in range(n) if k % world == src]
                parts = [
                    t for k in mine
                    for t in (self.eigvals_A[k], self.Q_A[k], self.eigvals_S[k], self.Q_S[k])
                ]  # fmt: skip
                flat = torch.cat([t.reshape(-1) for t in parts])
                reducer.broadcast_(flat, src=src)
                start = 0
                for t in parts:
                    t.copy_(flat[start : start + t.numel()].view_as(t))
                    start += t.numel()
            for k in range(n):
                if not bool(torch.isfinite(self.eigvals_A[k]).all()) or not bool(
                    torch.isfinite(self.eigvals_S[k]).all()
                ):
                    raise ValueError(
                        failed.get(
                            k,
                            f"The eigendecomposition of a covariance of layer {self.names[k]!r} "
                            f"failed on rank {k % world}, which decomposes that layer; see the "
                            "error there.",
                        )
                    )
        self.L = [_Sum((o, i), self.device, self.dtype, False) for i, o in self.dims]
        self._QA_c = [q.to(self.dtype) for q in self.Q_A]
        self._QS_c = [q.to(self.dtype) for q in self.Q_S]

    def covariances(self, k: int):
        """The normalised float64 ``(A, S)`` of layer ``k`` (after ``finish_covariances``)."""
        return self.A[k].total, self.S[k].total

    # ------------------------------------------------------------ pass 2
    def update_lambda(self, k: int, a: torch.Tensor, s: torch.Tensor, weights=None) -> None:
        """Add one batch of layer ``k`` to the sum of squared rotated gradients."""
        if self.Q_A is None:
            raise RuntimeError("update_lambda needs finish_covariances first.")
        QA, QS = self._QA_c[k], self._QS_c[k]
        a = a.to(self.dtype)
        s = _weighted(s.to(self.dtype), weights)  # (K, b, T, d_out)
        L = self.L[k]
        n_k, b, t, d_out = s.shape
        d_in = a.shape[-1]
        if t == 1:
            # Rank one per example: (Q_S^T s)^2 ((Q_A^T a)^2)^T, summed over
            # examples (and the K weighted targets) as one product.
            ra = torch.mm(a.reshape(b, d_in), QA).square_()
            rs = torch.mm(s.reshape(n_k * b, d_out), QS).square_()
            if n_k > 1:
                rs = rs.reshape(n_k, b, d_out).sum(0)
            L.partial.addmm_(rs.mT, ra)
            # The sum of the update, sum_i |Q_S^T s_i|^2 |Q_A^T a_i|^2, is finite
            # exactly when the update is (all terms >= 0), at O(b (d_in + d_out)).
            marker = rs.sum(1).dot(ra.sum(1))
        else:
            marker = self._lambda_shared(L.partial, a, s, QA, QS)
        L.added(b, marker)
        self.lambda_examples[k] += b

    def _lambda_shared(self, out, a, s, QA, QS) -> torch.Tensor:
        """Weight sharing (tokens, positions): add ``sum_i ((S_i Q_S)^T (A_i Q_A))^2``.

        Per example the gradient is ``S_i^T A_i``; rotating the factors first
        costs ``T (d_in^2 + d_out^2 + d_out d_in)`` per example, forming the
        gradient first ``T d_out d_in + d_out d_in (d_out + d_in)``: the
        cheaper order is taken. Examples go in chunks whose ``(chunk, d_out,
        d_in)`` temporaries fit ``memory_budget``. Returns the update's sum.
        """
        n_k, b, t, d_out = s.shape
        d_in = a.shape[-1]
        rotate_first = t * (d_in * d_in + d_out * d_out) <= d_out * d_in * (d_out + d_in)
        if rotate_first:
            a = torch.matmul(a, QA)
            s = torch.matmul(s, QS)
        chunk = rows_within(self.memory_budget, 2 * itemsize(self.dtype) * d_out * d_in, b)
        marker = out.new_zeros(())
        for kk in range(n_k):
            for start in range(0, b, chunk):
                ac = a[start : start + chunk]
                sc = s[kk, start : start + chunk]
                G = torch.bmm(sc.mT, ac)  # (c, d_out, d_in)
                if not rotate_first:
                    G = torch.matmul(QS.mT, torch.matmul(G, QA))
                update = G.square_().sum(0)
                marker += update.sum()
                out.add_(update)
        return marker

    def finish_lambda(self, reducer=None) -> list[torch.Tensor]:
        """Check, reduce (once) and normalise ``Λ``: float64 ``(d_out, d_in)`` per layer."""
        for total in self.L:
            total.fold()
        what = "eigenvalue correction Λ = E[(Q_S^T ∇W Q_A)^2]"
        if reducer is None or not reducer.active:  # distributed: after the reduction
            self._check_finite(self.L, what, "eigenvalue-correction")
        counts = torch.tensor(self.lambda_examples, dtype=torch.int64, device=self.device)
        if reducer is not None:
            reducer.sum_(*(t.total for t in self.L), counts)
            self._check_finite(self.L, what, "eigenvalue-correction")
        self.lambda_examples = [int(c) for c in counts.tolist()]
        return [t.total.div_(max(n, 1)) for t, n in zip(self.L, self.lambda_examples)]


def _torch_first(device: torch.device) -> bool:
    """Whether ``torch.linalg.eigh`` decomposes on ``device`` before scipy does.

    Off the CPU, yes: the matrix stays on the device. On the CPU, scipy's
    LAPACK runs the same divide-and-conquer driver (``syevd``) faster and
    steadier: torch's goes through MKL's OpenMP threads, which under
    ``OMP_WAIT_POLICY=PASSIVE`` (the setting a shared machine needs) sleep
    and wake at every parallel region. Measured on a 385 x 385 float64
    covariance, 2 threads, idle 2-core machine (medians of 7): torch 90 ms
    with passive waiting and 15 ms with spinning threads (which a busy
    machine makes up to 100x slower), scipy 14-15 ms either way; 1 thread:
    torch 23 ms, scipy 14 ms.
    """
    return device.type != "cpu"


def _eigh(cov: torch.Tensor, what: str):
    """A symmetric eigendecomposition, trying LAPACK's drivers until one converges.

    Divide and conquer (``syevd``: ``torch.linalg.eigh`` on a GPU, scipy's
    ``"evd"`` on the CPU, see :func:`_torch_first`), then scipy's MRRR
    (``"evr"``) and QR (``"ev"``) drivers on a CPU copy; ``ValueError``
    naming ``what`` when all fail.
    """
    torch_error = scipy_error = None
    drivers = ("evd", "evr", "ev")
    if _torch_first(cov.device):
        try:
            return torch.linalg.eigh(cov)
        except torch.linalg.LinAlgError as exc:
            torch_error, drivers = exc, ("evr", "ev")
    import scipy.linalg

    matrix = cov.detach().cpu().numpy()
    for driver in drivers:
        try:
            w, Q = scipy.linalg.eigh(matrix, driver=driver, check_finite=False)
        except (np.linalg.LinAlgError, ValueError) as exc:
            scipy_error = scipy_error or exc
            continue
        return (
            torch.from_numpy(w).to(device=cov.device, dtype=cov.dtype),
            torch.from_numpy(Q).to(device=cov.device, dtype=cov.dtype),
        )
    tried = ", ".join(repr(d) for d in drivers)
    before = "" if torch_error is None else f"torch.linalg.eigh failed ({torch_error}), and "
    raise ValueError(
        f"Cannot eigendecompose the {what} ({cov.shape[0]} x {cov.shape[0]}): {before}"
        f"scipy.linalg.eigh failed with the drivers {tried} (first: {scipy_error}). The "
        "covariance is too ill-conditioned to decompose: check the layer's inputs (huge or "
        "nearly constant values), fit in float64, or leave the layer out (layers=[...])."
    ) from (torch_error or scipy_error)


def eigh_psd(cov: torch.Tensor, *, what: str = "covariance"):
    """Eigendecomposition of a symmetric PSD covariance that never raises a LAPACK error.

    1. Structurally zero rows and columns (a zero diagonal entry of a PSD
       matrix makes its row and column zero; e.g. the input columns of a conv
       on 1 x 1 maps that only ever see padding) get eigenvalue 0 and unit
       eigenvectors, exactly; only the rest is decomposed (also much cheaper
       when most columns are zero).
    2. LAPACK's divide and conquer on the rest (``scipy.linalg.eigh``'s
       ``"evd"`` on the CPU, ``torch.linalg.eigh`` on other devices); where
       it fails to converge, scipy's ``"evr"`` then ``"ev"`` driver.
    3. Otherwise ``ValueError`` naming ``what`` (the layer and the factor).

    Returns eigenvalues (ascending) and eigenvectors as columns, like
    ``torch.linalg.eigh``.
    """
    d = cov.shape[0]
    nonzero = cov != 0
    zero = (cov.diagonal() == 0) & ~nonzero.any(0) & ~nonzero.any(1)
    if not bool(zero.any()):
        return _eigh(cov, what)
    kept = (~zero).nonzero().squeeze(1)
    dropped = zero.nonzero().squeeze(1)
    vals = cov.new_zeros(d)
    vecs = cov.new_zeros(d, d)
    n_zero = dropped.numel()
    vecs[dropped, torch.arange(n_zero, device=cov.device)] = 1
    if kept.numel():
        w, Q = _eigh(cov[kept][:, kept], what)
        vals[n_zero:] = w
        vecs[kept.unsqueeze(1), torch.arange(n_zero, d, device=cov.device)] = Q
    order = torch.argsort(vals, stable=True)
    return vals[order], vecs[:, order]


def ekfac_apply(Q_S: torch.Tensor, Q_A: torch.Tensor, scale: torch.Tensor, X: torch.Tensor):
    """``Q_S ((Q_S^T X Q_A) * scale) Q_A^T`` for ``X`` of shape ``(m, d_out, d_in)``."""
    m, d_out, d_in = X.shape
    Y = torch.mm(X.reshape(m * d_out, d_in), Q_A).reshape(m, d_out, d_in)
    Y = torch.matmul(Q_S.mT, Y)
    Y.mul_(scale)
    Y = torch.matmul(Q_S, Y)
    return torch.mm(Y.reshape(m * d_out, d_in), Q_A.mT).reshape(m, d_out, d_in)


# --------------------------------------------------------------------------- estimator
def _keep(kept, pairs, budget: int):
    """Append a batch's ``(a, s, w)`` to ``kept = (batches, bytes)``; None past ``budget``."""
    if kept is None:
        return None
    batches, used = kept
    used += sum(t.numel() * t.element_size() for p in pairs for t in p if t is not None)
    if used > budget:
        return None  # stream pass 2 from the data instead
    batches.append(pairs)
    return batches, used


def fit_statistics(
    stats: EKFACStatistics,
    covariance_batches: Iterable,
    lambda_batches: Callable[[], Iterable],
    *,
    reducer: Reducer | None = None,
    owner: str = "EKFACIFVP.fit",
    keep_budget: int | None = None,
) -> list[torch.Tensor]:
    """EK-FAC's two passes over batches of per-layer ``(a, s, weights)`` triples; returns ``Λ``.

    Pass 1 feeds ``covariance_batches`` to ``update_covariances`` and
    finishes (reduce, normalise, eigendecompose); pass 2 feeds
    ``lambda_batches()`` to ``update_lambda`` and returns ``finish_lambda``.
    With ``keep_budget`` (bytes), pass 1's triples are kept while they fit
    it and are pass 2's input instead of ``lambda_batches()`` (the same
    numbers without running the model again). Each pass is a
    :meth:`~attribkit._compute.distributed.Reducer.shard_pass` of
    ``reducer`` (every rank raises if one fails; an empty shard is fine).
    Used by :class:`EKFACIFVP` (hooked layers) and
    :func:`attribkit.functional.ifvp_at_x_ekfac` (a user's cache).
    """
    red = Reducer(False) if reducer is None else reducer
    kept = ([], 0) if keep_budget is not None else None
    with red.shard_pass(f"{owner} (covariance pass)") as shard:
        for triples in covariance_batches:
            for k, (a, s, w, *rows) in enumerate(triples):
                stats.update_covariances(k, a, s, w, rows[0] if rows else None)
            shard.count += int(triples[0][0].shape[0]) if triples else 1
            kept = _keep(kept, triples, keep_budget)
    stats.finish_covariances(red)
    second = kept[0] if kept is not None else lambda_batches()
    with red.shard_pass(f"{owner} (eigenvalue-correction pass)") as shard:
        for triples in second:
            for k, (a, s, w, *_) in enumerate(triples):
                stats.update_lambda(k, a, s, w)
            shard.count += int(triples[0][0].shape[0]) if triples else 1
    return stats.finish_lambda(red)


def check_lambda(
    lam: torch.Tensor, damping: float, *, d: int, dtype: torch.dtype, owner: str, layer: str,
    note: str, advice: str,
) -> None:  # fmt: skip
    """Refuse a zero ``damping`` when ``Λ`` has entries that are zero to rounding.

    ``Λ`` is a mean of squared rotated gradients: an entry that is zero in
    exact arithmetic comes out at about ``(eps * d)^2 * max(Λ)``, ``d`` the
    layer's larger side and ``eps`` that of ``dtype``, the precision the
    products ran in; dividing by it would amplify noise. ``note`` says what
    the damping was, ``advice`` what to do.
    """
    floor = (torch.finfo(dtype).eps * d) ** 2 * float(lam.max())
    if damping == 0.0 and bool((lam <= floor).any()):
        raise ValueError(
            f"{owner} cannot invert {layer}: its eigenvalue correction Λ has zero entries (at "
            f"or below the rounding level {floor:.3g}; smallest {float(lam.min()):.3g}, largest "
            f"{float(lam.max()):.3g}) and the damping is 0 ({note}). {advice}"
        )


class EKFACIFVP(BaseEstimator):
    """Eigenvalue-corrected K-FAC inverse-Fisher-vector products (model mode only).

    K-FAC (Martens & Grosse, 2015) approximates each layer's block of the
    Fisher by a Kronecker product ``S ⊗ A`` of the output-gradient covariance
    ``S = E[s s^T]`` and the input covariance ``A = E[a a^T]``; EK-FAC (George
    et al., 2018) keeps K-FAC's eigenbasis ``Q_S ⊗ Q_A`` but refits the
    eigenvalues to the per-example gradients,
    ``Λ = E_i[(Q_S^T ∇W_i Q_A)^2]`` (elementwise square), which minimises the
    Frobenius error in that basis. This is the curvature behind influence
    functions on real networks (Grosse et al., 2023; kronfluence). The
    inverse is applied per layer:

    ``transform(V)_l = Q_S ((Q_S^T V_l Q_A) / (Λ_l + damping_l)) Q_A^T``

    where ``V_l`` is the ``(d_out, d_in)`` matrix of layer ``l``'s weight with
    its bias as the last column. Layers are independent (block-diagonal).

    ``fit(model, data)`` hooks the model's ``nn.Linear``, ``nn.Conv2d`` and
    Hugging Face ``Conv1D`` layers (GPT-2's attention and MLP: the
    ``nn.Linear`` it is, its ``(in, out)`` weight the transposed matrix; its
    factors equal those of the model with every ``Conv1D`` replaced by the
    equivalent ``nn.Linear``), and peft's LoRA adapters through their
    ``lora_A``/``lora_B`` ``nn.Linear`` modules (after ``get_peft_model``
    the only trainable layers, so they are exactly the default layers); the
    forward pass needs no change. Two passes over ``data``: the
    covariances (then float64 eigendecompositions), then ``Λ``. The vectors
    ``transform`` takes are laid out like ``param_shapes_`` (the covered
    parameters only): per-example gradients in that layout come from
    ``ak.per_example_gradients(model, data, params=list(ekfac.param_shapes_))``.

    Parameters
    ----------
    damping : float or "auto", default=0.1
        ``damping >= 0`` added to ``Λ``; ``"auto"``: per layer
        ``0.1 * mean(Λ_l)``. A zero damping (given or ``"auto"`` on a layer
        whose ``Λ`` is all zero) with a zero entry of ``Λ`` raises
        ``ValueError`` naming the layer.
    layers : list of str, optional
        Names of the modules to cover (``nn.Linear``, ``Conv1D`` or
        ``nn.Conv2d`` with ``groups=1``; any other raises ``ValueError``
        naming it), covered whether or not their parameters are trainable.
        ``None``: every such module with a trainable parameter, except those
        with a tied weight (see Notes); the modules with trainable parameters
        left out are listed in ``skipped_layers_`` with the reason in
        ``skipped_reasons_``, and when the covered layers hold less than half
        of the model's trainable parameters ``fit`` warns (``UserWarning``)
        with the share and the largest modules left out. A list is taken as
        the choice it is: no coverage warning.
    fisher : {"empirical", "true", "expected"}, default="empirical"
        ``"empirical"``: gradients at the data's targets. ``"true"``: at
        targets sampled from the model's predictive distribution (built-in
        losses; torch's global generator, ``torch.manual_seed`` makes it
        reproducible; each pass samples afresh). ``"expected"``: the exact
        expectation over that distribution (built-in losses; for
        cross-entropy with ``C`` classes ``C`` backward passes per batch, ``S``
        and ``Λ`` weighted by the class probabilities; for MSE with ``D``
        outputs ``D`` passes), the Gauss-Newton matrix's EK-FAC. On sequences
        (per-token cross-entropy, ``"causal_lm"``) ``"expected"`` raises
        ``ValueError`` naming ``"true"``, which samples one label per token.
    loss : {"cross_entropy", "mse", "causal_lm"} or callable, default="cross_entropy"
        Per-example loss, as in :func:`~attribkit.per_example_gradients`
        (``"causal_lm"``: the summed next-token cross-entropy of a language
        model); a callable is ``(outputs, targets) -> (batch,)``. The backward pass
        differentiates the SUM over the batch, so ``s`` is each example's own
        output gradient.
    max_batches : int, optional
        Use only the first ``max_batches`` batches of ``data`` in each pass
        (``None``: all).
    config : ComputeConfig, optional
        ``device`` and ``dtype`` of the fitted state and of ``transform``;
        ``batch_size`` when ``data`` is a tuple or a Dataset; ``progress``;
        ``memory_budget`` bounds the per-example temporaries of weight-shared
        layers and the chunks of ``transform``; ``distributed``.

    Attributes
    ----------
    layers_ : list of str
        Names of the covered modules, in model order.
    skipped_layers_ : list of str
        Modules with trainable parameters of their own that are not covered:
        an unsupported type or a tied weight (automatic ``layers=None`` only;
        parameter-free and frozen modules are not listed).
    skipped_reasons_ : OrderedDict
        ``module -> reason`` for each of ``skipped_layers_``.
    param_shapes_ : OrderedDict
        The weight and bias of each covered layer, named and ordered as
        ``model.named_parameters()`` (a tied weight under its first name):
        the layout of the vectors ``transform`` takes.
    n_features_in_ : int
        Total number of covered parameters.
    input_eigenvectors_ : OrderedDict
        ``layer -> Q_A`` ``(d_in, d_in)``, eigenvectors of ``A`` as columns.
    output_eigenvectors_ : OrderedDict
        ``layer -> Q_S`` ``(d_out, d_out)``, eigenvectors of ``S`` as columns.
    input_eigenvalues_, output_eigenvalues_ : OrderedDict
        ``layer ->`` eigenvalues of ``A`` and ``S`` (ascending).
    lambdas_ : OrderedDict
        ``layer -> Λ`` ``(d_out, d_in)``, the corrected eigenvalues: entry
        ``(i, j)`` belongs to the eigenvector ``Q_S[:, i] ⊗ Q_A[:, j]``.
    damping_ : list of float
        The damping used per layer, in ``layers_`` order.
    n_samples_ : int
        Number of examples ``Λ`` averages over.

    Notes
    -----
    **Conventions.** ``a`` is a layer's input with a ones column when it has a
    bias; for ``nn.Conv2d`` the input unfolded into its ``in * kh * kw``
    patches per output position; for inputs ``(batch, *tokens, features)``
    every token is a row. ``A`` and ``S`` average over all rows (tokens,
    positions) of all examples; ``Λ`` over examples, each example's
    gradient summing over its rows. Only the eigenbases of ``A`` and ``S``
    enter the result, so their normalisation does not matter.

    **Cost.** On a layer without weight sharing each example's gradient is
    rank one, ``s a^T``, so ``Λ`` is one product of the squared rotated
    factors per batch, ``((S Q_S)^2)^T (A Q_A)^2``, never a per-example loop.
    With weight sharing the per-example gradients are formed in chunks
    (within ``memory_budget``), in the cheaper of the two orders.

    **Conventions for real models.** A ``Conv1D`` weight is ``(in, out)``:
    ``V``'s block for it is the transpose of the ``(d_out, d_in - 1)`` matrix
    (the fitted state records each layer's layout as plain data). With
    padded batches (inputs a dict holding an ``attention_mask`` of shape
    ``(batch, L)``, as Hugging Face batches are), the token rows of padded
    positions enter neither ``A`` nor the row counts of ``A`` and ``S``, in
    every layer whose rows are one per token (``T = L``); pooled heads
    (``T = 1``) are unaffected. ``Λ`` takes each example's gradient as it is
    (a loss that ignores padded tokens gives them no gradient).

    **Tied weights.** Parameters are named as ``model.named_parameters()``
    names them, so a tied weight has its first name (GPT-2's
    ``lm_head.weight`` is ``transformer.wte.weight``) and ``param_shapes_``
    never names a parameter that ``per_example_gradients(params=...)``
    cannot take. A layer's factors describe one use of a parameter, but the
    gradient of a tied parameter sums every use, so with ``layers=None`` a
    module holding a parameter that another module also holds is skipped
    (listed in ``skipped_reasons_``; GPT-2's ``lm_head``). Named in
    ``layers``, it is covered under the parameter's first name with a
    ``UserWarning`` that its factors describe this use only; two named
    modules holding the same parameter raise ``ValueError``.

    **Eigendecompositions** never surface a raw LAPACK
    error: structurally zero rows and columns of a covariance (the input
    columns of a convolution on 1 x 1 maps that only ever see padding) get
    eigenvalue 0 and unit eigenvectors exactly and only the rest is
    decomposed by LAPACK's divide and conquer (scipy's on the CPU, where it
    is faster and steadier than torch's; ``torch.linalg.eigh`` on a GPU);
    where that fails, scipy's ``"evr"`` and ``"ev"`` drivers are tried, and
    otherwise ``fit`` raises
    ``ValueError`` naming the layer and the factor.

    **Precision.** Products run in the model's dtype (float32 for half
    types), sums are folded into float64 every 16,384 rows, and the
    eigendecompositions are float64. The state is then kept in
    ``config.dtype`` (the eigenbases are orthogonal, so rounding them costs
    no more than ``config.dtype``'s precision in the result).

    **Distributed.** With ``config.distributed`` on and a ``torch.distributed``
    process group of ``W > 1`` ranks, ``fit`` is collective: each rank passes
    its own shard of the data (uneven shards, or an empty one, are fine as
    long as the union is not empty) and every rank ends with the state one
    process would fit on the union. Each pass ends with one all-reduce of the
    raw float64 sums and counts (``A`` and ``S`` with their row and example
    counts after pass 1, ``Λ`` with its example count after pass 2) and one
    tiny all-reduce of the pass's example count and failure flag, so a rank
    that fails makes every rank raise instead of hanging. Each layer's two
    eigendecompositions run once, on rank ``k % W`` for layer ``k``, and are
    broadcast: every rank holds bitwise the same bases. Per fit each rank
    sends about ``8 sum_l (2 (d_in^2 + d_out^2) + d_out d_in)`` payload bytes,
    independent of the number of examples. ``max_batches`` counts each
    rank's own batches; ``fisher="true"`` samples on each rank from its own
    generator.

    **The model** runs in eval mode (dropout off, batch-norm running
    statistics) and is left as it was: mode restored, hooks removed (also
    when fit fails), parameters, ``requires_grad`` and ``.grad`` untouched.
    Floating-point inputs are cast to the model's dtype. A NaN or infinity in
    a covariance raises ``ValueError`` naming the layer and the first batch
    where it appeared, before any eigendecomposition. ``data`` must allow two
    passes: a generator raises ``ValueError``.

    **Passes.** When the captured ``(a, s)`` of pass 1 fit in
    ``config.memory_budget`` they are kept and pass 2 computes ``Λ`` from
    them, without running the model again (the same numbers a second pass
    over deterministic data gives; with random augmentation or
    ``fisher="true"``, ``Λ`` then uses the very samples the covariances
    used). Otherwise pass 2 streams the data again, batch by batch.

    **dattri 0.1.0** (``ifvp_at_x_ekfac``) rotates with ``Q_S @ V @ Q_A.T``
    on eigenvector columns, the transpose of the basis, and forms each
    example's gradient with its own backward pass; here the rotation is
    ``Q_S^T V Q_A``, tested against the dense definition.

    References
    ----------
    .. [1] J. Martens and R. Grosse, "Optimizing Neural Networks with
       Kronecker-factored Approximate Curvature", ICML 2015.
    .. [2] T. George, C. Laurent, X. Bouthillier, N. Ballas and P. Vincent,
       "Fast Approximate Natural Gradient Descent in a Kronecker-factored
       Eigenbasis", NeurIPS 2018.
    .. [3] R. Grosse et al., "Studying Large Language Model Generalization
       with Influence Functions", arXiv:2308.03296, 2023.

    Examples
    --------
    >>> import torch
    >>> import attribkit as ak
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> ekfac = ak.EKFACIFVP(damping=0.1).fit(model, (X, y))
    >>> ekfac.layers_, list(ekfac.param_shapes_)
    (['0', '2'], ['0.weight', '0.bias', '2.weight', '2.bias'])
    >>> grads = ak.per_example_gradients(model, (X[:5], y[:5]), flatten=False)
    >>> {k: tuple(v.shape) for k, v in ekfac.transform(grads).items()}
    {'0.weight': (5, 8, 4), '0.bias': (5, 8), '2.weight': (5, 3, 8), '2.bias': (5, 3)}
    >>> V = torch.randn(2, ekfac.n_features_in_)
    >>> torch.allclose(ekfac.inverse_transform(ekfac.transform(V)), V, atol=1e-4)
    True
    """

    _array_mode = (
        "EK-FAC needs each layer's inputs and output gradients, which per-example "
        "gradients alone do not give (a gradient s a^T does not determine a a^T and s s^T)."
    )
    _transient = ("_scales",)
    _agree_on_fit = True  # model-mode fits communicate: the ranks agree first

    def __init__(
        self,
        damping: float | str = 0.1,
        layers: list[str] | None = None,
        fisher: str = "empirical",
        loss="cross_entropy",
        max_batches: int | None = None,
        config: ComputeConfig | None = None,
    ):
        self.damping = damping
        self.layers = layers
        self.fisher = fisher
        self.loss = loss
        self.max_batches = max_batches
        self.config = config

    # ------------------------------------------------------------------ params
    def _check_params(self) -> None:
        V.check_damping(self, self.damping)
        if self.layers is not None and (
            isinstance(self.layers, str)
            or not all(isinstance(n, str) for n in self.layers)
            or not list(self.layers)
        ):
            raise V.param_error(
                self, "layers", "None or a non-empty list of module names", self.layers
            )
        V.check_fisher(self, self.fisher)
        V.check_loss(self, self.loss)
        if self.max_batches is not None:
            V.check_int(self, "max_batches", self.max_batches, minimum=1)

    # ------------------------------------------------------------------ fit
    def _fit_model(self, model, data, config: ComputeConfig) -> None:
        V.check_fisher_loss(self, self.fisher, self.loss)
        if isinstance(data, Iterator):
            raise ValueError(
                "The 'data' argument of EKFACIFVP must allow two passes (covariances, then "
                f"eigenvalue corrections). Got a one-pass iterator ({type(data).__name__}, e.g. "
                "a generator); pass a DataLoader, a Dataset, a tuple (inputs, targets) or a "
                "list of batches."
            )
        layers, skipped = resolve_layers(model, self.layers, self)
        self._set_layout(param_layout(layers))
        self.layers_ = [layer.name for layer in layers]
        self.skipped_layers_ = list(skipped)
        self.skipped_reasons_ = OrderedDict(skipped)
        if self.layers is None:
            warn_coverage(
                model, layers, self, "Their parameters get no curvature: vectors must leave "
                "them out (per_example_gradients(params=list(ekfac.param_shapes_))).",
            )  # fmt: skip
        warn_tied(
            layers, self, "transform applies them to any vector under that name, e.g. to "
            "per_example_gradients(params=[...]), whose gradient of a tied parameter sums "
            "every use.",
        )  # fmt: skip
        device, dtype = model_device(model), model_dtype(model) or torch.float32
        stats = EKFACStatistics(
            [(layer.d_in, layer.d_out) for layer in layers],
            self.layers_,
            device=device,
            dtype=dtype,
            memory_budget=config.memory_budget,
        )
        # Distributed (API section 6): each rank streams its shard; a pass
        # ends with shard_pass (global count; every rank raises if one failed;
        # an empty shard is fine) and finish_* reduces the raw sums once.
        red = make_reducer(config, "EKFACIFVP.fit", device=device)
        with EvalMode(model, "EKFACIFVP.fit"), LayerCapture(model, layers, self) as capture:

            def stream(stage):
                return self._batches(model, data, capture, config, device, dtype, stage)

            # The captured (a, s) of pass 1, when they fit config.memory_budget,
            # are pass 2's input: the same numbers without running the model again.
            lambdas = fit_statistics(
                stats, stream("covariances"), lambda: stream("eigenvalue correction"),
                reducer=red, keep_budget=config.memory_budget,
            )  # fmt: skip
        self._store(stats, lambdas, layers)

    def _batches(self, model, data, capture, config, device, dtype, stage):
        """Per batch: one ``(a, s, weights)`` per layer (weights None unless expected)."""
        loss_fn = resolve_loss(self.loss, self)

        def forward(inputs):
            with torch.enable_grad():  # the output gradients need a graph, even under no_grad
                return call_model(model, inputs)

        batches = target_batches(
            data, loss=self.loss, fisher=self.fisher, call=forward, config=config, owner=self,
            device=device, dtype=dtype, desc=f"EKFACIFVP {stage}", always_call=True,
            max_batches=self.max_batches, describe_first_failure=False,
        )  # fmt: skip
        for tb in batches:
            # Padded tokens (a batch's attention_mask) enter neither A nor the row counts.
            rows = capture.row_masks(token_mask(tb.inputs))
            with torch.enable_grad():
                if tb.weights is None:
                    # The sum of per-example losses: s is each example's own gradient.
                    pairs = capture.backward(loss_fn(tb.outputs, tb.targets).sum())
                    yield [(a, s, None, m) for (a, s), m in zip(pairs, rows)]
                    continue
                K = tb.targets.shape[0]
                per_target = [
                    capture.backward(
                        loss_fn(tb.outputs, tb.targets[k]).sum(), retain_graph=k < K - 1
                    )
                    for k in range(K)
                ]
            yield [
                (
                    per_target[0][j][0],
                    torch.stack([p[j][1] for p in per_target]),
                    tb.weights,
                    rows[j],
                )
                for j in range(len(per_target[0]))
            ]

    def _store(self, stats: EKFACStatistics, lambdas, layers) -> None:
        device, dtype = self._device, self._config.torch_dtype
        damping = []
        for name, lam in zip(self.layers_, lambdas):
            if self.damping == "auto":
                value = 0.1 * float(lam.mean())
            else:
                value = float(self.damping)
            check_lambda(
                lam, value, d=max(stats.dims[len(damping)]), dtype=stats.dtype, owner="EKFACIFVP",
                layer=f"layer {name!r}",
                note=f"damping={self.damping!r}; 'auto' is 0.1 x mean(Λ), which is 0 when the "
                "layer's gradients are all zero",
                advice="Pass a float damping > 0, or leave the layer out (layers=[...]).",
            )  # fmt: skip
            damping.append(value)
        self.damping_ = damping
        self.n_samples_ = int(stats.lambda_examples[0]) if stats.lambda_examples else 0

        def keep(tensors):
            return OrderedDict(
                (n, t.to(device=device, dtype=dtype)) for n, t in zip(self.layers_, tensors)
            )

        self.input_eigenvectors_ = keep(stats.Q_A)
        self.output_eigenvectors_ = keep(stats.Q_S)
        self.input_eigenvalues_ = keep(stats.eigvals_A)
        self.output_eigenvalues_ = keep(stats.eigvals_S)
        self.lambdas_ = keep(lambdas)
        # Plain data only: no module reference is kept (pickles carry no model);
        # the layout says how the weight holds the (d_out, d_in) matrix (Conv1D: W.T).
        self._blocks = [
            (
                layer.weight_name,
                layer.bias_name,
                layer.weight_shape,
                layer.d_in,
                layer.d_out,
                layer.layout,
            )
            for layer in layers
        ]

    # ------------------------------------------------------------------ transform
    def _init_transient(self) -> None:
        self._scales = {}

    def _scale(self, k: int, inverse: bool) -> torch.Tensor:
        key = (k, inverse)
        scale = self._scales.get(key)
        if scale is None:
            name = self.layers_[k]
            lam = self.lambdas_[name].to(self._work_dtype) + self.damping_[k]
            # Compute, then publish (concurrent transforms may race here and
            # compute the same values; one setdefault wins, nothing is half-built).
            scale = self._scales.setdefault(key, lam if inverse else lam.reciprocal())
        return scale

    @property
    def _work_dtype(self) -> torch.dtype:
        return matmul_dtype(self._config.torch_dtype, self._device, stage="accumulate")

    def _transform(self, V: torch.Tensor) -> torch.Tensor:
        return self._apply_blocks(V, inverse=False)

    def inverse_transform(self, vectors):
        """Multiply by the EK-FAC curvature, ``Q_S ((Q_S^T V Q_A) * (Λ + damping)) Q_A^T``.

        Parameters
        ----------
        vectors : ndarray, torch.Tensor of shape (m, n_features), or dict
            Flat vectors, or a dict ``name -> (m, *shape)`` keyed like
            ``param_shapes_``.

        Returns
        -------
        ndarray, torch.Tensor or dict
            Same container and shapes as ``vectors``, in ``config.dtype``;
            ``inverse_transform(transform(V))`` is ``V`` to rounding.
        """
        return self._apply(
            vectors, lambda V: self._apply_blocks(V, inverse=True), same_layout=True
        )

    def _apply_blocks(self, V: torch.Tensor, inverse: bool) -> torch.Tensor:
        work = self._work_dtype
        V = V.to(work)
        m = V.shape[0]
        out = torch.empty_like(V)
        columns = offsets(self.param_shapes_)
        for k, (weight_name, bias_name, _, d_in, d_out, *layout) in enumerate(self._blocks):
            layout = layout[0] if layout else "out_in"  # state from before Conv1D
            name = self.layers_[k]
            QA = self.input_eigenvectors_[name].to(work)
            QS = self.output_eigenvectors_[name].to(work)
            scale = self._scale(k, inverse)
            w0, w1 = columns[weight_name]
            b0, b1 = columns[bias_name] if bias_name is not None else (w1, w1)
            d_w = d_in - (bias_name is not None)
            # Two (chunk, d_out, d_in) temporaries at a time.
            chunk = rows_within(self._config.memory_budget, 2 * itemsize(work) * d_out * d_in, m)
            for r in range(0, m, chunk):
                rows = slice(r, r + chunk)
                c = V[rows].shape[0]
                X = torch.empty(c, d_out, d_in, dtype=work, device=V.device)
                X[:, :, :d_w] = matrix_view(V[rows, w0:w1], layout, d_out)
                if bias_name is not None:
                    X[:, :, d_w] = V[rows, b0:b1]
                Y = ekfac_apply(QS, QA, scale, X)
                matrix_view(out[rows, w0:w1], layout, d_out).copy_(Y[:, :, :d_w])
                if bias_name is not None:
                    out[rows, b0:b1].copy_(Y[:, :, d_w])
        return out
