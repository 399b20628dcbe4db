"""Top eigenpairs of the curvature by Lanczos iteration, and the projector built on them.

The whole data flow, from ``fit`` to ``transform``:

1. a symmetric curvature-vector product ``matvec: (p,) -> (p,)`` is set up:
   Hessian-vector products of the mean loss streamed over the data
   (:class:`attribkit._compute.curvature.MeanLossHVP`, model mode) or
   ``v -> G^T (G v) / n + damping v`` (:func:`gram_matvec`, array mode);
2. :func:`lanczos` runs the Lanczos iteration with full
   re-orthogonalisation from a start vector drawn from ``seed`` (float64, on
   the CPU, then moved: the same on every device), keeping the orthonormal
   Krylov basis ``Q`` (``n_iter x p``, float64) and the tridiagonal ``T``;
3. :func:`ritz_pairs` solves the small ``T`` eigenproblem in float64 and
   lifts its eigenvectors back, ``U = Y^T Q``, ordered by decreasing
   magnitude with a deterministic sign;
4. the estimator keeps the top ``proj_dim`` pairs; ``transform`` projects on
   the positive ones and scales by ``1 / sqrt(eigenvalue)``, ``ihvp`` applies
   the inverse restricted to all kept pairs.

Reusing the core
----------------
:func:`lanczos` and :func:`ritz_pairs` know nothing about models: any
symmetric linear map given as a callable works, e.g. the Hessian of an
arbitrary function ``f(x)`` (what dattri 0.1.0's ``arnoldi_project`` takes)::

    from torch.func import grad, jvp
    matvec = lambda v: jvp(grad(f), (x,), (v.to(x.dtype),))[1].reshape(-1)
    result = lanczos(matvec, x.numel(), max_iter=100, tol=1e-7, seed=0)
    values, vectors = ritz_pairs(result)       # all n_iter pairs, largest |value| first

``matvec`` receives a float64 ``(p,)`` tensor on ``device`` and may return any
floating dtype on any device (the result is cast to float64 on ``device``).
:func:`eigenpairs` adds the estimator's selection rules (numerically zero
values dropped, top ``k`` kept) on top of the two.

The iteration is deterministic (no data-dependent randomness, the small
eigenproblem solved on the CPU), so processes that feed it the same all-reduced
products agree bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from .._compute import validation as V
from .._compute.budget import check_fits, rows_within
from .._compute.curvature import HVP_MODES, MeanLossHVP
from .._compute.precision import EPS64 as _EPS64
from .._compute.precision import F64 as _F64
from .._compute.precision import matmul_dtype
from .._compute.progress import bar as progress_bar
from ..base import BaseEstimator
from ..config import ComputeConfig

__all__ = [
    "ArnoldiProjector",
    "LanczosResult",
    "eigenpairs",
    "gram_matvec",
    "lanczos",
    "ritz_pairs",
]


class LanczosResult(NamedTuple):
    """What :func:`lanczos` returns.

    Attributes
    ----------
    alpha : torch.Tensor of shape (n_iter,)
        Diagonal of the tridiagonal ``T = Q A Q^T`` (float64, CPU).
    beta : torch.Tensor of shape (n_iter - 1,)
        Its off-diagonal (float64, CPU, all > 0).
    basis : torch.Tensor of shape (n_iter, p)
        The orthonormal Krylov basis ``Q`` (float64, on ``device``); row 0 is
        the normalised start vector.
    n_iter : int
        Number of matrix-vector products (the size of ``T``).
    invariant : bool
        Whether the iteration stopped on an invariant subspace (residual norm
        ``<= tol`` times the largest ``||A q_j||`` seen, or the basis spans
        all ``p`` dimensions): then the Ritz pairs are eigenpairs of ``A`` to
        rounding.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    basis: torch.Tensor
    n_iter: int
    invariant: bool


def start_vector(n_features: int, seed: int, device=None) -> torch.Tensor:
    """The unit start vector: standard normal from a CPU generator seeded by ``seed``.

    Drawn in float64 on the CPU and then moved, so it is the same on every
    device and process.
    """
    gen = torch.Generator().manual_seed(int(seed) % 2**64)
    v = torch.randn(n_features, generator=gen, dtype=_F64)
    return (v / torch.linalg.vector_norm(v)).to(device or "cpu")


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n_features: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
    device=None,
    progress: bool = False,
    desc: str = "Lanczos",
    owner="lanczos",
) -> LanczosResult:
    """Lanczos iteration with full re-orthogonalisation for a symmetric ``matvec``.

    Builds an orthonormal basis ``Q`` of the Krylov space
    ``span{q_0, A q_0, ..., A^(m-1) q_0}`` and ``T = Q A Q^T`` tridiagonal.
    Every new vector is re-orthogonalised against the whole basis by
    classical Gram-Schmidt applied twice ("twice is enough"), so ``Q`` stays
    orthonormal to working precision: no ghost copies of converged
    eigenvalues, unlike plain Lanczos or Arnoldi without re-orthogonalisation.
    The iteration is Arnoldi's applied to a symmetric matrix, whose Hessenberg
    matrix is tridiagonal.

    Parameters
    ----------
    matvec : callable
        ``v -> A v`` for a float64 ``(p,)`` tensor ``v`` on ``device``; ``A``
        symmetric. The result may have any floating dtype and device.
    n_features : int
        ``p``.
    max_iter : int, default=100
        At most this many products (and never more than ``p``).
    tol : float, default=1e-7
        Early stop on an invariant subspace: when the new residual's norm is
        at most ``tol`` times the largest ``||A q_j||`` seen so far (a lower
        bound of ``||A||_2``, which makes ``tol`` independent of the scale of
        ``A``). ``tol=0`` stops only on an exactly zero residual.
    seed : int, default=0
        Seed of the start vector (see :func:`start_vector`).
    device : torch.device or str, optional
        Where the basis lives (default CPU).
    progress : bool, default=False
        A progress bar over the iterations.
    desc : str
        The bar's label.
    owner : str or estimator
        Named in error messages.

    Returns
    -------
    LanczosResult

    Notes
    -----
    Memory is the basis, ``8 * n_iter * p`` bytes, plus a few ``p``-vectors.
    Work per step: one ``matvec`` and ``4 j p`` flops of re-orthogonalisation.

    References
    ----------
    .. [1] C. Lanczos, "An iteration method for the solution of the eigenvalue
       problem of linear differential and integral operators", J. Res. Natl.
       Bur. Stand. 45, 1950.
    .. [2] L. Giraud, J. Langou, M. Rozloznik and J. van den Eshof, "Rounding
       error analysis of the classical Gram-Schmidt orthogonalization
       process", Numer. Math. 101, 2005.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> res = lanczos(lambda v: A @ v, 5, max_iter=10)
    >>> res.n_iter, res.invariant
    (5, True)
    >>> values, vectors = ritz_pairs(res)
    >>> [round(x, 12) for x in values.tolist()]
    [5.0, 4.0, 3.0, 2.0, 1.0]
    """
    p = int(n_features)
    m = min(int(max_iter), p)
    device = torch.device(device or "cpu")
    Q = torch.empty(m, p, dtype=_F64, device=device)
    Q[0] = start_vector(p, seed, device)
    alpha: list[float] = []
    beta: list[float] = []
    scale, invariant = 0.0, m == p
    with progress_bar(total=m, desc=desc, enabled=progress) as bar:
        for j in range(m):
            w = matvec(Q[j])
            if not isinstance(w, torch.Tensor) or w.shape != (p,):
                shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise ValueError(
                    f"{V.owner_name(owner)}: the curvature-vector product must return a ({p},) "
                    f"tensor. Got {shape}."
                )
            # A copy: w is updated in place and may alias the input or matvec's state.
            w = w.to(device=device, dtype=_F64, copy=True)
            norm = float(torch.linalg.vector_norm(w))
            if not math.isfinite(norm):
                raise ValueError(
                    f"{V.owner_name(owner)}: the curvature-vector product at iteration {j + 1} is "
                    "not finite (NaN or infinity): the loss, model outputs or data overflow "
                    "or contain NaN."
                )
            scale = max(scale, norm)
            a = float(Q[j] @ w)
            w.sub_(Q[j], alpha=a)
            if j:
                w.sub_(Q[j - 1], alpha=beta[-1])
            basis = Q[: j + 1]
            for _ in range(2):
                w.sub_(basis.T @ (basis @ w))
            alpha.append(a)
            bar.update(1)
            if j + 1 == m:
                break
            b = float(torch.linalg.vector_norm(w))
            if b <= tol * scale:
                invariant = True
                break
            beta.append(b)
            Q[j + 1] = w.div_(b)
    n = len(alpha)
    basis = Q[:n] if n == m else Q[:n].clone()
    return LanczosResult(
        torch.tensor(alpha, dtype=_F64), torch.tensor(beta, dtype=_F64), basis, n, invariant
    )


def ritz_pairs(result: LanczosResult, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values and vectors of a :func:`lanczos` run, largest magnitude first.

    The tridiagonal eigenproblem is solved in float64 on the CPU (it is
    ``n_iter x n_iter``). Each Ritz vector ``u = Q^T y`` gets the sign that
    makes its component along the start vector positive (``y_0 > 0``; never
    zero for an unreduced tridiagonal), so the result does not depend on the
    eigensolver's sign choice. Ties in magnitude keep ascending order of the
    value.

    Parameters
    ----------
    result : LanczosResult
    k : int, optional
        Keep the ``k`` of largest magnitude (default all ``n_iter``).

    Returns
    -------
    values : torch.Tensor of shape (k,)
        float64, CPU, signed.
    vectors : torch.Tensor of shape (k, p)
        float64 orthonormal rows, on the basis's device.
    """
    n = result.n_iter
    T = torch.diag(result.alpha)
    if n > 1:
        T = T + torch.diag(result.beta, 1) + torch.diag(result.beta, -1)
    values, Y = torch.linalg.eigh(T)
    order = torch.argsort(values.abs(), descending=True, stable=True)
    if k is not None:
        order = order[: int(k)]
    values, Y = values[order], Y[:, order]
    Y = Y * torch.where(Y[0] < 0, -1.0, 1.0).to(_F64)
    vectors = Y.T.to(result.basis.device) @ result.basis
    return values, vectors


def eigenpairs(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    n_features: int,
    k: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
    device=None,
    eps: float = _EPS64,
    progress: bool = False,
    desc: str = "Lanczos",
    owner="lanczos",
) -> tuple[torch.Tensor, torch.Tensor, LanczosResult, int]:
    """The top-``k`` Ritz pairs by magnitude, numerically zero ones left out.

    A Ritz value with ``|value| <= n_iter * eps * max |value|`` is at the
    rounding level of the products (``eps``: the machine epsilon of the
    precision ``matvec`` computes in) and cannot be inverted meaningfully:
    such pairs are dropped before the top ``k`` are taken.

    Returns
    -------
    values : (k',) float64 CPU tensor, vectors : (k', p) float64, result, n_zero
        ``k' <= k``; ``n_zero`` counts the dropped numerically zero values.

    Raises ``ValueError`` when every Ritz value is numerically zero (the
    curvature vanishes on the Krylov space).
    """
    result = lanczos(
        matvec, n_features, max_iter=max_iter, tol=tol, seed=seed, device=device,
        progress=progress, desc=desc, owner=owner,
    )  # fmt: skip
    values, vectors = ritz_pairs(result)
    floor = result.n_iter * eps * float(values.abs().max())
    keep = values.abs() > floor
    n_zero = int((~keep).sum())
    if not bool(keep.any()):
        raise ValueError(
            f"{V.owner_name(owner)}: the curvature is zero to rounding on its Krylov space "
            f"({result.n_iter} iteration(s), largest |eigenvalue| {float(values.abs().max()):.3g}"
            "): there is no eigenpair to invert. Use damping > 0, or check that the loss "
            "depends on the parameters."
        )
    index = torch.nonzero(keep).flatten()[: int(k)]
    return values[index], vectors[index.to(vectors.device)], result, n_zero


def gram_matvec(G: torch.Tensor, damping: float = 0.0, memory_budget: int = 2**31):
    """``v -> G^T (G v) / n + damping v`` in float64, never forming ``G^T G``.

    ``G`` of another dtype is cast to float64 once when its copy fits
    ``memory_budget`` bytes, else block by block in every product.
    """
    n, p = G.shape
    damping = float(damping)
    if G.dtype != _F64 and 8 * n * p <= memory_budget:
        G = G.to(_F64)
    rows = n if G.dtype == _F64 else rows_within(memory_budget, 8 * p, n)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        v = v.to(device=G.device, dtype=_F64)
        out = torch.zeros(p, dtype=_F64, device=G.device)
        for s in range(0, n, rows):
            block = G[s : s + rows].to(_F64)
            out.addmv_(block.T, block @ v)
        out.div_(n)
        if damping:
            out.add_(v, alpha=damping)
        return out

    return matvec


class ArnoldiProjector(BaseEstimator):
    """Projection on the top eigenvectors of the curvature (Hessian or ``G^T G / n``).

    Schioppa et al. [1]_ scale influence functions to large models by
    replacing the inverse Hessian with its restriction to the top-``k``
    eigenvectors, found from Hessian-vector products by Arnoldi iteration.
    The Hessian is symmetric, so the iteration here is its symmetric form,
    **Lanczos iteration with full re-orthogonalisation** [2]_ (classical
    Gram-Schmidt twice against the whole basis every step), which keeps the
    basis orthonormal to working precision: dattri
    0.1.0's ``arnoldi_project`` does a single Gram-Schmidt sweep and loses orthogonality.

    * model mode (``fit(model, data)``): the curvature is ``H + damping I``,
      ``H`` the Hessian of the **mean** loss over ``data`` in the selected
      parameters. Each iteration streams over ``data`` once and adds the
      Hessian-vector product of every batch's summed loss (weighted by its
      size, so a ragged last batch is right) to a float64 sum; under
      ``torch.distributed`` that sum and the example count are all-reduced,
      one collective per iteration, so every rank fits on the union of the
      shards (:doc:`/guide/distributed`); uneven shards and an empty one are fine (an
      empty union raises), and a rank whose pass fails makes every rank
      raise. The start vector comes from a CPU generator seeded by ``seed``
      and every product is the same all-reduced tensor on every rank, so the
      iteration (and its stopping decisions) is the same on every rank as
      long as the ranks run the same torch build with the same thread count
      (``torchrun`` sets ``OMP_NUM_THREADS=1``). Products by ``torch.func`` on a
      ``functional_call`` of the model in eval mode (mode restored; the
      parameters' ``requires_grad`` untouched); floating-point inputs are cast
      to the parameters' dtype. ``data`` must be re-iterable.
    * array mode (``fit(G)``): the curvature is ``G^T G / n + damping I`` of
      the ``(n, p)`` gradient matrix, applied as ``G^T (G v) / n``: the
      ``p x p`` matrix is never formed. Array-mode fits are local.

    The top ``proj_dim`` eigenpairs by magnitude are kept. ``transform``
    projects on those with a positive eigenvalue, scaled so that
    ``transform(a) @ transform(b).T = a H_k^+ b^T`` (``H_k^+`` the inverse
    restricted to them); ``ihvp`` applies the restricted inverse over all
    kept, signed, pairs (dattri 0.1.0's ``arnoldi_project`` semantics).

    Parameters
    ----------
    proj_dim : int, default=100
        Number ``k`` of eigenpairs to keep (largest ``|eigenvalue|`` first).
        When the Krylov space yields fewer usable ones (``max_iter`` or the
        parameter count is smaller, the space became invariant early, or some
        Ritz values are zero to rounding) the ones found are kept, with a
        warning, and ``eigenvalues_`` is shorter.
    max_iter : int, default=100
        Maximum number of Lanczos iterations, i.e. of curvature-vector
        products (passes over the data in model mode); capped at the number
        of features. The top eigenvalues converge first; ``max_iter`` well
        above ``proj_dim`` makes the kept ones accurate.
        :func:`attribkit.functional.arnoldi_project`'s ``max_iter`` (dattri's)
        counts the start vector too, and makes ``max_iter - 1`` products.
    damping : float, default=0.0
        ``damping >= 0`` added to the curvature (``damping * v`` in every
        product), which shifts every eigenvalue by ``damping``. With L2 weight
        decay ``lambda`` in training, ``damping=lambda`` makes the curvature
        that of the trained objective.
    tol : float, default=1e-7
        Early stop on an invariant subspace: the iteration ends when a new
        residual has norm ``<= tol`` times the largest ``||A q_j||`` seen (so
        ``tol`` is relative to the scale of the curvature; dattri 0.1.0's is an
        absolute threshold). Then the Krylov space is invariant and its Ritz
        pairs are exact eigenpairs.
    norm_constant : float, default=1.0
        ``> 0``: the norm of the stored eigenvectors, as in dattri 0.1.0's
        reference (Schioppa et al.'s ``norm_constant``), where its basis
        vectors have this norm. With many parameters the entries of unit
        vectors are tiny (``~1/sqrt(p)``); a larger norm keeps them well
        inside a low-precision ``config.dtype``. ``transform`` then scales by
        ``norm_constant`` and ``ihvp`` by ``norm_constant**2``; 1 gives the
        exact restricted inverse. Internally the basis stays orthonormal.
    mode : {"rev-fwd", "rev-rev"}, default="rev-fwd"
        Model mode: Hessian-vector products as the forward-mode ``jvp`` of
        the reverse-mode gradient or the ``vjp`` of the gradient (for
        operators without forward-mode rules). Same values to rounding. When
        ``data`` is a single batch, ``"rev-rev"`` keeps that batch's vjp
        pullback between iterations (no new forward pass per product);
        ``"rev-fwd"`` and streamed data (several batches) rebuild each
        batch's product every iteration. The path never depends on timing.
    seed : int, default=0
        Seed of the start vector: standard normal, drawn in float64 on the
        CPU and moved, so the same on every device and process.
    loss : {"cross_entropy", "mse", "causal_lm"} or callable, default="cross_entropy"
        Model mode: the per-example loss, as in
        :func:`~attribkit.per_example_gradients` (``"causal_lm"``: the summed
        next-token cross-entropy of a language model); a callable takes
        ``(outputs, targets)`` and returns losses of shape ``(batch,)``.
    params : list of str, optional
        Model mode: the parameters the Hessian is taken over (default: all
        trainable).
    config : ComputeConfig, optional
        Device of the basis and fitted state, ``dtype`` of outputs and of
        ``eigenvectors_``, ``batch_size`` for tuple/Dataset data, progress bar
        over the iterations, ``memory_budget``, ``distributed``.

    Attributes
    ----------
    eigenvalues_ : torch.Tensor of shape (k,)
        The kept eigenvalues of the (damped) curvature, signed, by decreasing
        magnitude; float64 on the config device.
    eigenvectors_ : torch.Tensor of shape (k, n_features)
        Their eigenvectors (rows of norm ``norm_constant``, orthogonal), in
        ``config.dtype``; each has a positive component along the start
        vector, so the signs are deterministic.
    proj_dim_ : int
        ``k'``, the number of positive eigenvalues: the width of
        ``transform``'s output.
    n_iter_ : int
        Number of Lanczos iterations run (curvature-vector products).
    n_samples_ : int
        Number of examples the curvature averages over.
    n_features_in_ : int
        Number of features ``p`` (parameters in model mode).
    param_shapes_ : OrderedDict
        ``name -> shape`` of the blocks a flat vector concatenates.
    feature_names_in_ : ndarray of str
        Column names of a DataFrame given to ``fit`` in array mode (only then).

    Notes
    -----
    **Precision.** The basis, the orthogonalisation and the tridiagonal
    eigenproblem are float64 whatever ``config.dtype`` says; model-mode
    products are computed in the model's dtype and accumulated in float64.
    Ritz values of magnitude at most ``n_iter_ * eps * max|value|`` (``eps``
    of the product's precision) are zero to rounding and are dropped with a
    warning; a curvature that is zero everywhere raises ``ValueError``.

    **Memory.** ``8 * min(max_iter, p) * p`` bytes for the float64 basis,
    refused before allocating when it exceeds both ``config.memory_budget``
    and the memory available on the device, plus a few ``p``-vectors and,
    in model mode, what one batch's Hessian-vector product needs.

    **What Lanczos finds.** From one start vector, a Krylov method sees one
    direction per distinct eigenvalue; a repeated eigenvalue (e.g. the
    ``damping`` of the null space of ``G^T G`` when ``n < p``) appears once.
    With ``max_iter < p`` the Ritz pairs approximate the extreme eigenpairs,
    the largest converging first.

    **Negative curvature.** A Hessian away from a minimum is indefinite.
    Directions with a negative eigenvalue cannot be scaled by
    ``1/sqrt(eigenvalue)``: ``transform`` drops them (warning at fit) while
    ``ihvp`` keeps them, signed.

    References
    ----------
    .. [1] A. Schioppa, P. Zablotskaia, D. Vilar and A. Sokolov, "Scaling Up
       Influence Functions", AAAI 2022.
    .. [2] B. N. Parlett, "The Symmetric Eigenvalue Problem", SIAM 1998, ch. 13.

    Examples
    --------
    >>> import torch
    >>> import attribkit as ak
    >>> G = torch.randn(200, 30, dtype=torch.float64)
    >>> cfg = ak.ComputeConfig(dtype="float64")
    >>> proj = ak.ArnoldiProjector(proj_dim=5, config=cfg).fit(G)
    >>> proj.eigenvalues_.shape, proj.eigenvectors_.shape, proj.n_iter_
    (torch.Size([5]), torch.Size([5, 30]), 30)
    >>> top = torch.linalg.eigvalsh(G.T @ G / 200).flip(0)[:5]
    >>> torch.allclose(proj.eigenvalues_, top)
    True
    >>> proj.transform(G[:3]).shape
    torch.Size([3, 5])

    Model mode, the Hessian of the mean cross-entropy of a small MLP:

    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
    ...                             torch.nn.Linear(8, 3)).double()
    >>> X, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    >>> proj = ak.ArnoldiProjector(proj_dim=4, damping=1.0, config=cfg).fit(model, (X, y))
    >>> proj.n_features_in_, proj.eigenvalues_.shape
    (67, torch.Size([4]))
    >>> grads = ak.per_example_gradients(model, (X[:2], y[:2]), config=cfg, flatten=False)
    >>> proj.transform(grads).shape
    torch.Size([2, 4])
    >>> {k: tuple(v.shape) for k, v in proj.ihvp(grads).items()}
    {'0.weight': (2, 8, 4), '0.bias': (2, 8), '2.weight': (2, 3, 8), '2.bias': (2, 3)}
    """

    _same_layout = False
    _agree_on_fit = True  # model-mode fits communicate: the ranks agree first

    def __init__(
        self,
        proj_dim: int = 100,
        max_iter: int = 100,
        damping: float = 0.0,
        tol: float = 1e-7,
        norm_constant: float = 1.0,
        mode: str = "rev-fwd",
        seed: int = 0,
        loss="cross_entropy",
        params: list[str] | None = None,
        config: ComputeConfig | None = None,
    ):
        self.proj_dim = proj_dim
        self.max_iter = max_iter
        self.damping = damping
        self.tol = tol
        self.norm_constant = norm_constant
        self.mode = mode
        self.seed = seed
        self.loss = loss
        self.params = params
        self.config = config

    # ------------------------------------------------------------------ params
    def _check_params(self) -> None:
        V.check_int(self, "proj_dim", self.proj_dim, minimum=1)
        V.check_int(self, "max_iter", self.max_iter, minimum=1)
        V.check_damping(self, self.damping, auto=False)
        V.check_float(self, "tol", self.tol, minimum=0.0)
        V.check_float(self, "norm_constant", self.norm_constant, minimum=0.0, strict=True)
        V.check_option(self, "mode", self.mode, HVP_MODES)
        V.check_int(self, "seed", self.seed)
        V.check_loss(self, self.loss)
        V.check_params(self, self.params)

    # ------------------------------------------------------------------ fit
    def _fit_model(self, model, data, config: ComputeConfig) -> None:
        hvp = MeanLossHVP(
            model, data, loss=self.loss, params=self.params, mode=self.mode,
            damping=float(self.damping), config=config, owner=self,
        )  # fmt: skip
        self._set_layout(hvp.param_shapes)
        self._solve(hvp, torch.finfo(hvp.dtype).eps, config)
        self.n_samples_ = hvp.n_samples

    def _fit_array(self, G: torch.Tensor, config: ComputeConfig) -> None:
        matvec = gram_matvec(G, float(self.damping), config.memory_budget)
        self._solve(matvec, _EPS64, config)
        self.n_samples_ = int(G.shape[0])

    def _solve(self, matvec, eps: float, config: ComputeConfig) -> None:
        p, owner = self.n_features_in_, type(self).__name__
        m = min(int(self.max_iter), p)
        check_fits(
            8 * m * p, config.memory_budget, self._device, owner=owner,
            what=f"its float64 Krylov basis of max_iter x p = {m} x {p}",
            advice="Use a smaller max_iter or fewer parameters (params=[...]).",
        )  # fmt: skip
        values, vectors, result, n_zero = eigenpairs(
            matvec, p, int(self.proj_dim), max_iter=int(self.max_iter), tol=float(self.tol),
            seed=int(self.seed), device=self._device, eps=eps, progress=config.show_progress,
            desc=f"{owner} Lanczos", owner=self,
        )  # fmt: skip
        k = int(values.shape[0])
        if k < int(self.proj_dim):
            if result.n_iter == p:
                why = f"all n_features={p} dimensions"
            elif result.invariant:
                why = "the Krylov space became invariant"
            else:
                why = f"max_iter={self.max_iter}"
            zero = f", {n_zero} Ritz value(s) zero to rounding dropped" if n_zero else ""
            warnings.warn(
                f"{owner} found {k} eigenpair(s), fewer than proj_dim={self.proj_dim}: "
                f"{result.n_iter} Lanczos iteration(s) ({why}){zero}. Keeping those {k}.",
                UserWarning,
                stacklevel=4,
            )
        n_pos = int((values > 0).sum())
        if n_pos < k:
            warnings.warn(
                f"{owner}: {k - n_pos} of the {k} kept eigenvalues are negative (the curvature "
                "is indefinite); transform drops those directions (it scales by "
                "1/sqrt(eigenvalue)) and keeps "
                f"{n_pos}; ihvp uses all {k}. Use damping to shift the spectrum.",
                UserWarning,
                stacklevel=4,
            )
        device = self._device
        self.eigenvalues_ = values.to(device)
        self.eigenvectors_ = (vectors * float(self.norm_constant)).to(config.torch_dtype)
        self.proj_dim_ = n_pos
        self.n_iter_ = result.n_iter

    # ------------------------------------------------------------------ transform
    def _work(self, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = matmul_dtype(V.dtype, stage="accumulate")
        U = self.eigenvectors_.to(dtype)
        return V.to(dtype) @ U.T, U

    def _transform(self, V: torch.Tensor) -> torch.Tensor:
        coords, _ = self._work(V)
        values = self.eigenvalues_
        positive = values > 0
        scale = values[positive].rsqrt().to(coords.dtype)
        return coords[:, positive] * scale

    def ihvp(self, vectors):
        """Inverse curvature restricted to the kept eigenpairs: ``((V U^T) / eigenvalues_) U``.

        Over all ``k`` kept pairs, negative ones included (dattri 0.1.0's
        ``arnoldi_project`` semantics). With ``norm_constant=c`` the result
        is ``c**2`` times the restricted inverse, as in the seed.

        Parameters
        ----------
        vectors : ndarray, torch.Tensor of shape (m, n_features), or dict
            Flat vectors, or a dict ``name -> (m, *shape)`` keyed like
            ``param_shapes_``.

        Returns
        -------
        ndarray, torch.Tensor or dict
            Same container and shapes as ``vectors``, in ``config.dtype``.
        """
        return self._apply(vectors, self._ihvp, same_layout=True)

    def _ihvp(self, V: torch.Tensor) -> torch.Tensor:
        coords, U = self._work(V)
        return (coords / self.eigenvalues_.to(coords.dtype)) @ U
