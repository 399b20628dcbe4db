"""The exact inverse curvature by preconditioned conjugate gradients, never formed.

The whole data flow, from ``fit`` to ``transform``:

1. ``fit`` selects the parameters (the layout) and sets up the curvature
   product ``C``: exact Gauss-Newton-vector products
   (:class:`attribkit._compute.ggn.MeanLossGGN`) or Hessian-vector products
   (:class:`attribkit._compute.curvature.MeanLossHVP`) streamed over the data, bound
   to the model and the data by reference; in array mode
   ``(V G^T) G / n`` (:class:`attribkit._compute.ggn.GramProduct`). It fits
   the preconditioner (a clone of the one given, on the same model, data and
   loss) or checks a fitted one's layout, and runs one curvature product of
   a fixed Rademacher probe: that pass checks the data, counts the examples
   and measures the mean curvature on the parameters the preconditioner does
   not cover (the scale of the identity used there). A checksum of the
   parameter values is recorded.
2. ``solve(V)`` / ``transform(V)`` run :func:`batched_pcg` on all rows of
   ``V`` at once: every iteration is ONE pass over the data computing the
   products of all rows still active, in float64; rows that reach ``tol``
   are frozen.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import sklearn.base
import torch
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils.validation import check_is_fitted

from .._compute import validation as V
from .._compute.checksum import checksum_differences, parameter_checksum
from .._compute.curvature import MeanLossHVP
from .._compute.ggn import GramProduct, MeanLossGGN
from .._compute.model import select_params
from .._compute.precision import EPS64 as _EPS64
from .._compute.precision import F64 as _F64
from .._compute.progress import bar as progress_bar
from .._compute.vectors import ARRAY_KEY, all_finite, split
from ..base import BaseEstimator
from ..config import ComputeConfig

__all__ = ["IterativeIFVP", "PCGResult", "batched_pcg"]

_CURVATURES = ("ggn", "hessian")
#: Seed of the Rademacher probe of ``fit`` (fixed: the same probe on every rank and run).
_PROBE_SEED = 0


# --------------------------------------------------------------------------- the solver
class PCGResult(NamedTuple):
    """What :func:`batched_pcg` returns (all per row of ``V``).

    Attributes
    ----------
    X : torch.Tensor of shape (m, p)
        The solutions, float64.
    n_iter : torch.Tensor of shape (m,)
        Curvature products each row took (0 for a zero row), int64, CPU.
    residual : torch.Tensor of shape (m,)
        Relative residual ``||r_i|| / ||v_i||`` reached (0 for a zero row),
        float64, CPU; ``r_i`` is CG's recursively updated residual.
    converged : torch.Tensor of shape (m,)
        Whether the row reached ``tol``, bool, CPU.
    """

    X: torch.Tensor
    n_iter: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor


class NotPositiveDefinite(ValueError):
    """CG met ``d^T A d <= 0`` (``where="operator"``) or ``r^T M r <= 0`` (``"preconditioner"``).

    Attributes ``where``, ``row`` (of ``V``), ``iteration`` and ``value``.
    """

    def __init__(self, where: str, row: int, iteration: int, value: float):
        super().__init__(
            f"conjugate gradients met a non-positive {where} quadratic form "
            f"{value:.3g} for row {row} at iteration {iteration}"
        )
        self.where, self.row, self.iteration, self.value = where, row, iteration, value


def batched_pcg(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    V: torch.Tensor,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    rounding: float = _EPS64,
    scale: float = 0.0,
    shared: bool = False,
    progress: bool = False,
    desc: str = "CG",
) -> PCGResult:
    """Solve ``A x_i = v_i`` for every row of ``V`` by (preconditioned) conjugate gradients.

    One conjugate-gradient recurrence per row, all advanced together: each
    iteration calls ``matmat`` ONCE with the search directions of the rows
    still active (a ``(k, p)`` block), so for a curvature streamed over data
    one pass serves every row. A row whose relative residual
    ``||r_i|| / ||v_i||`` reaches ``tol`` is frozen and leaves the block.

    Parameters
    ----------
    matmat : callable
        ``(k, p) float64 -> (k, p)``: ``A`` applied to each row; ``A``
        symmetric positive definite.
    V : torch.Tensor of shape (m, p)
        float64 right-hand sides; zero rows give zero solutions at once.
    precondition : callable, optional
        ``(k, p) float64 -> (k, p)``: ``M r`` per row, ``M`` symmetric
        positive definite, approximating ``A^{-1}``. ``None``: plain CG.
    max_iter : int, default=100
        At most this many calls of ``matmat``.
    tol : float, default=1e-6
        Stop a row at relative residual ``<= tol``.
    rounding : float, default=float64 eps
        The relative rounding error of ``matmat`` (the machine epsilon of
        the precision it computes in).
    scale : float, default=0.0
        An estimate of ``||A||`` (e.g. its mean eigenvalue); the largest
        ``||A d|| / ||d||`` seen is used when larger.
    shared : bool, default=False
        Call ``matmat(D, state)`` instead, with ``state`` the ``(k, p + 1)``
        float64 tensor ``[D | z^T r]``; it returns ``(A D, state')`` and the
        recurrence continues from ``state'``. Across processes, ``matmat``
        makes ``state'`` the same on every rank (rank 0's, in the all-reduce
        of the products), so that a preconditioner whose rounding differs
        between ranks cannot make their iterations diverge.
    progress : bool
        A tqdm bar over the iterations.
    desc : str
        The bar's label.

    Returns
    -------
    PCGResult

    Raises
    ------
    NotPositiveDefinite
        When ``d^T A d <= rounding * ||d||^2 * ||A||`` for a search
        direction ``d`` (``A`` is indefinite, or singular to the precision
        of its products: the curvature along ``d`` is at their rounding
        level; ``||A||`` is ``scale`` or the largest ``||A d|| / ||d||``
        seen), or
        ``r^T M r <= 0`` for a nonzero residual (``M`` is not positive
        definite). The row index refers to ``V``.
    ValueError
        When a product is not finite.

    Notes
    -----
    With a preconditioner the update uses the Polak-Ribiere form
    ``beta = z_new^T (r_new - r_old) / z_old^T r_old`` (flexible CG, Notay
    2000), which equals the classical ``z_new^T r_new / z_old^T r_old`` in
    exact arithmetic and keeps converging when the preconditioner is
    symmetric only to its working precision (a float32 EK-FAC); without one,
    the classical form.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    >>> V = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    >>> res = batched_pcg(lambda D: D @ A, V, tol=1e-12)
    >>> res.X
    tensor([[1.0000, 0.5000, 0.3333],
            [0.0000, 0.0000, 0.0000]], dtype=torch.float64)
    >>> res.n_iter.tolist(), res.converged.tolist()
    ([3, 0], [True, True])
    """
    m = V.shape[0]
    X = torch.zeros_like(V)
    norms = torch.linalg.vector_norm(V, dim=1)
    n_iter = torch.zeros(m, dtype=torch.int64)
    residual = torch.zeros(m, dtype=_F64)
    converged = (norms == 0).cpu()
    idx = torch.nonzero(norms > 0).flatten()
    if idx.numel() == 0:
        return PCGResult(X, n_iter, residual, converged)
    residual[idx.cpu()] = 1.0
    vnorm = norms[idx]
    R = V[idx].clone()

    def preconditioned(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if precondition is None:
            return R, R.square().sum(1)
        Z = precondition(R).to(device=R.device, dtype=_F64)
        return Z, (R * Z).sum(1)

    Z, rz = preconditioned(R)
    D = Z.clone()
    norm = torch.linalg.vector_norm
    opnorm = float(scale)
    with progress_bar(total=max_iter, desc=desc, enabled=progress) as bar:
        for it in range(1, max_iter + 1):
            if shared:
                Q, state = matmat(D, torch.cat([D, rz.unsqueeze(1)], 1))
                D, rz = state[:, :-1], state[:, -1]
            else:
                Q = matmat(D)
            Q = Q.to(device=D.device, dtype=_F64)
            bad = ~(rz > 0)
            if bool(bad.any()):
                j = int(torch.nonzero(bad)[0, 0])
                raise NotPositiveDefinite("preconditioner", int(idx[j]), it - 1, float(rz[j]))
            if not all_finite(Q):
                raise ValueError(
                    f"the curvature-vector product at iteration {it} is not finite (NaN or "
                    "infinity): the loss, model outputs or data overflow or contain NaN."
                )
            dq = (D * Q).sum(1)
            dd = D.square().sum(1)
            opnorm = max(opnorm, float((norm(Q, dim=1) / dd.sqrt()).max()))
            bad = ~(dq > rounding * opnorm * dd)
            if bool(bad.any()):
                j = int(torch.nonzero(bad)[0, 0])
                raise NotPositiveDefinite("operator", int(idx[j]), it, float(dq[j]))
            alpha = (rz / dq).unsqueeze(1)
            X[idx] += alpha * D
            R_old = R
            R = R - alpha * Q
            rel = norm(R, dim=1) / vnorm
            cpu_idx = idx.cpu()
            n_iter[cpu_idx] = it
            residual[cpu_idx] = rel.cpu()
            done = rel <= tol
            converged[cpu_idx[done.cpu()]] = True
            bar.update(1)
            keep = ~done
            if not bool(keep.any()) or it == max_iter:
                break
            if not bool(keep.all()):
                idx, vnorm = idx[keep], vnorm[keep]
                R, R_old, D, rz = R[keep], R_old[keep], D[keep], rz[keep]
            bar.set_postfix(active=int(idx.numel()), refresh=False)
            Z, rz_new = preconditioned(R)
            if precondition is None:
                beta = rz_new / rz
            else:
                beta = (Z * (R - R_old)).sum(1) / rz
            D = Z + beta.unsqueeze(1) * D
            rz = rz_new
    return PCGResult(X, n_iter, residual, converged)


# --------------------------------------------------------------------------- the estimator
class _Binding:
    """What a model-mode ``transform`` needs and a pickle never holds."""

    __slots__ = ("data", "model", "product")

    def __init__(self, model, data, product):
        self.model, self.data, self.product = model, data, product


class _Cover(NamedTuple):
    """How a preconditioner's layout maps onto the estimator's (tensors of column indices).

    ``ours``: our columns it covers, in its order; ``its``: their columns in
    its flat layout (``None`` when it covers nothing else), ``width`` its
    ``n_features_in_``; ``rest``: our columns it does not cover. Kept as a
    plain dict (``_asdict``), whose tensors ``to()`` and pickling move.
    """

    ours: torch.Tensor
    its: torch.Tensor | None
    width: int
    rest: torch.Tensor


def _offsets(shapes) -> dict:
    """``name -> (first flat column, size, shape)``."""
    out, start = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape)
        out[key] = (start, size, tuple(int(d) for d in shape))
        start += size
    return out


def _is_fitted(est) -> bool:
    try:
        check_is_fitted(est)
    except NotFittedError:
        return False
    return True


def _modules_within(model: torch.nn.Module, names) -> list[str]:
    """Modules all of whose own (trainable) parameters are among ``names``."""
    wanted = set(names)
    out = []
    for module_name, module in model.named_modules():
        own = [
            f"{module_name}.{n}" if module_name else n
            for n, q in module.named_parameters(recurse=False)
            if q.requires_grad
        ]
        if own and all(n in wanted for n in own):
            out.append(module_name)
    return out


class IterativeIFVP(BaseEstimator):
    """The exact inverse curvature ``(C + damping I)^{-1}`` by preconditioned conjugate gradients.

    ``transform(V)`` solves ``(C + damping I) X = V`` for all rows of ``V``
    at once without ever forming ``C``: each iteration is one streamed pass of
    exact curvature-vector products over the training data, accumulated in
    float64. It reaches the exact limit (what ExplicitIFVP gives where its
    ``p x p`` matrix fits) at any model size, for the cost of a few dozen to
    a few hundred passes per block of test vectors; a preconditioner such as
    an EK-FAC inverse cuts the passes needed (Martens, 2010; Grosse et al.,
    2023). dattri's ``ihvp_cg`` (conjugate gradients on Hessian-vector
    products, Koh & Liang, 2017) is its unpreconditioned Hessian version.

    Parameters
    ----------
    damping : float, default=0.0
        ``damping >= 0`` added to the curvature. With L2 weight decay ``λ``
        in training, ``damping=λ`` makes ``C + λ I`` the curvature of the
        trained objective. ``C + damping I`` must be positive definite:
        ``damping > 0`` when ``C`` is singular (fewer examples than
        parameters, unused parameters).
    curvature : {"ggn", "hessian"}, default="ggn"
        Model mode: ``"ggn"``, the exact Gauss-Newton matrix
        ``(1/n) sum_i J_i^T H_i J_i`` by Jacobian-vector products (for the
        built-in losses exactly ``fisher="expected"`` of ExplicitIFVP and
        EKFACIFVP; for a callable loss its own output-space Hessian), positive
        semi-definite for a loss convex in the outputs; ``"hessian"``, the
        exact Hessian of the mean loss by Hessian-vector products, which can
        be indefinite away from a minimum: conjugate gradients then meet
        negative curvature and raise ``ValueError`` naming the damping.
        Ignored in array mode, where the curvature is ``G^T G / n``.
    preconditioner : IFVP estimator or None, default=None
        ``None``: plain conjugate gradients. An IFVP estimator (EKFACIFVP,
        ExplicitIFVP on a parameter subset, DataInfIFVP, ...): its
        ``transform`` is the preconditioner ``M ≈ (C + damping I)^{-1}``.
        Unfitted, a clone is fitted inside ``fit`` on the same model and
        data (array mode: the same gradients), with this estimator's
        ``loss``, this estimator's ``params`` when its own ``params`` is
        ``None`` (an EK-FAC with ``layers=None`` covers the modules all of
        whose parameters are in ``params``), and this estimator's ``config``
        when its own is ``None``; its other hyper-parameters (damping,
        ``fisher``) are used as given. Its damping need not be this one, and
        on networks a larger one preconditions better: EK-FAC
        (``fisher="expected"``) underestimates curvature in many directions,
        which its inverse then amplifies up to ``1 / damping``. On the
        benchmark's digits MLPs (``damping=1e-3``), EK-FAC with
        ``damping=0.1`` cut the passes by 13-17%, while with ``1e-3`` it
        needed 40-45% more than plain CG; on softmax regression both cut
        them (by 20-30%). The object passed is never modified; the fitted clone is
        ``preconditioner_``. Fitted, it is used as given (parameters it
        shares with this estimator's layout must have the same shapes). It
        must be symmetric positive definite (any IFVP with ``damping > 0``
        is); one that is not raises ``ValueError``. On the parameters it does
        not cover it acts as ``identity_scale_ * I`` (see Attributes);
        parameters it covers that this estimator does not (the frozen weight
        of a layer EK-FAC covers) get zero input and their output is dropped,
        which keeps it symmetric positive definite (a compression ``S^T M S``).
    max_iter : int, default=100
        At most this many iterations (passes over the data) per ``solve``.
    tol : float, default=1e-6
        A row is solved when its relative residual
        ``||v_i - (C + damping I) x_i|| / ||v_i||`` is at most ``tol``
        (``0 <= tol < 1``).
    loss : {"cross_entropy", "mse", "causal_lm"} or callable, default="cross_entropy"
        Model mode: the per-example loss, as in
        :func:`~attribkit.per_example_gradients` (``"causal_lm"``: the summed
        next-token cross-entropy of a language model); a callable takes
        ``(outputs, targets)`` and returns losses of shape ``(batch,)``. It
        receives the model's raw output; with ``curvature="ggn"`` the
        floating-point tensors of that output are differentiated and its other
        parts (a Hugging Face cache) passed through as they are.
    params : list of str, optional
        Model mode: the parameters the curvature is taken over (default: all
        trainable).
    config : ComputeConfig, optional
        Device of the solve and the output ``dtype`` (the solve itself is
        float64; products are computed in the model's dtype and accumulated
        in float64), ``batch_size`` of the passes for tuple/Dataset data,
        progress bar over the iterations, ``memory_budget`` (rows of a block
        go through one vectorised product in chunks of at most
        ``memory_budget / (32 p)``), ``distributed``.

    Attributes
    ----------
    preconditioner_ : BaseEstimator or None
        The preconditioner in use: the fitted clone, the fitted estimator
        that was given (the same object), or ``None``.
    identity_scale_ : float
        ``1 / (c + damping)`` with ``c`` the mean curvature measured on the
        parameters the preconditioner does not cover (a Rademacher estimate
        of the mean diagonal of that block of ``C``): the preconditioner
        there. 1.0 when there is no preconditioner or it covers everything.
    curvature_scale_ : float
        ``c``, measured at ``fit`` with one curvature product of a fixed
        Rademacher probe ``u`` (on the uncovered parameters, or on all):
        ``u^T C u / u^T u``.
    n_samples_ : int
        Number of examples the curvature averages over.
    param_checksum_ : torch.Tensor of shape (n_params, 4)
        Model mode: a float64 checksum of each covered parameter's values at
        ``fit``, one row per entry of ``param_shapes_``: the L1 norm of its
        values, two sums of its values weighted by ``cos``/``sin`` of their
        flat positions (so a moved or swapped value shows) and its size.
        Checked before every solve and by :meth:`attach`; values that
        differ by more than ``1e-10`` of the L1 norm count as changed.
        Empty in array mode.
    gradients_ : torch.Tensor of shape (n, p) or None
        Array mode: a float64 copy of the gradients (the curvature is
        ``G^T G / n``); ``None`` in model mode.
    n_features_in_ : int
        Number of features ``p``.
    param_shapes_ : OrderedDict
        ``name -> shape`` of the blocks a flat vector concatenates.
    feature_names_in_ : ndarray of str
        Column names of a DataFrame given to ``fit`` in array mode (only then).

    See Also
    --------
    ExplicitIFVP : The same ``(C + damping I)^{-1}`` factorised once, where ``p x p`` fits.
    EKFACIFVP : A Kronecker-factored approximation, the usual preconditioner.

    Notes
    -----
    **Batched independent CG, not block CG.** Every row of ``V`` runs its
    own conjugate-gradient recurrence (its own step sizes); what rows share is
    the pass over the data, which computes the products of all active rows
    together (vectorised with ``torch.func.vmap``). True block CG (O'Leary,
    1980) searches the block Krylov space and can need fewer iterations, but
    its matrix-valued step sizes break down when the residual block loses
    rank, which rows of test gradients do routinely (duplicated or nearly
    collinear examples, rows converging at different times) and which needs
    deflation; batched CG has no such failure, freezes each row as it
    converges, and a row's solution does not depend on which other rows it
    is solved with (``transform(V)[i]`` equals ``transform(V[i:i+1])`` to
    rounding), as a transformer's must.

    **Cost.** One iteration is one pass over the data: per batch, for
    ``"ggn"`` a forward pass with its vjp graph, a forward-mode pass and a
    backward pass vectorised over the ``k`` active rows; for ``"hessian"``
    a forward-over-reverse product vectorised over the rows. Without a
    preconditioner CG needs about ``sqrt(kappa)`` iterations for condition
    number ``kappa`` of ``C + damping I`` (a small damping makes it large).
    ``fit`` costs one product pass (the probe) plus the preconditioner's fit.

    **What is kept, and pickling.** In model mode ``fit`` keeps the model
    and the data by reference (a DataLoader, a tuple of tensors, ...: it is
    iterated again in every iteration, so it must be re-iterable and yield
    the same examples; a generator is refused), plus the fitted
    preconditioner and a checksum of the parameter values. A pickle (and
    joblib) contains **no model and no data**: the layout, hyper-parameters,
    fitted preconditioner, ``identity_scale_``, ``n_samples_`` and the
    checksum. An unpickled model-mode estimator needs :meth:`attach` with
    the model (its parameter values are checked against the checksum) and
    the same data before ``transform``, which otherwise raises
    ``RuntimeError`` saying so; the preconditioner is not refitted. If the
    model's parameters change after ``fit`` (training goes on), ``transform``
    raises ``ValueError``: refit. In array mode the float64 gradients are the
    fitted state (``gradients_``, ``8 n p`` bytes) and are pickled.

    **The model** runs in eval mode through ``torch.func.functional_call``
    with detached parameters (modes restored after every pass; parameters,
    ``requires_grad`` and ``.grad`` untouched). Solves on one model are
    serialised by a lock, so threads may share a fitted estimator.

    **Precision.** The recurrences are float64; products are computed in
    the model's dtype and summed in float64. The residual reported is CG's
    recursively updated one; with products in float32 it can keep falling
    below the accuracy the products allow (about ``kappa * 1e-7``).

    **Distributed.** With ``config.distributed`` on and a process group of
    ``W > 1`` ranks, ``fit`` and ``solve``/``transform`` are collective:
    each rank passes its own shard of the data to ``fit`` (uneven shards and
    an empty one are fine), and every rank must call ``transform`` with the
    same vectors (checked to ``1e-8`` by one small all-gather per call, after
    which rank 0's vectors are broadcast). Each iteration then all-reduces
    ONE tensor: the products' sums and the example count, plus, with a
    preconditioner, the new search directions and ``z^T r`` of rank 0 (zeros
    from the others: twice the payload), so every rank continues from the
    same bits even where a preconditioner's BLAS rounding differs between
    processes; every rank ends with the single-process solution to rounding
    (summed in another order, a row may stop one iteration apart from one
    process's run) and all ranks with exactly the same result. A
    preconditioner whose ``transform`` communicates (DataInfIFVP) adds its
    own collective per iteration. A rank that fails (bad data, bad input)
    makes every rank raise instead of hanging. Array-mode fits stay local.

    References
    ----------
    .. [1] P. W. Koh and P. Liang, "Understanding Black-box Predictions via
       Influence Functions", ICML 2017.
    .. [2] J. Martens, "Deep learning via Hessian-free optimization", ICML 2010.
    .. [3] N. N. Schraudolph, "Fast Curvature Matrix-Vector Products for
       Second-Order Gradient Descent", Neural Computation 14, 2002.
    .. [4] D. P. O'Leary, "The block conjugate gradient algorithm and related
       methods", Linear Algebra Appl. 29, 1980.
    .. [5] Y. Notay, "Flexible conjugate gradients", SIAM J. Sci. Comput. 22,
       2000.
    .. [6] R. Grosse et al., "Studying Large Language Model Generalization
       with Influence Functions", arXiv:2308.03296, 2023.

    Examples
    --------
    >>> import torch
    >>> import attribkit as ak
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
    ...                             torch.nn.Linear(8, 3)).double()
    >>> X, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    >>> cfg = ak.ComputeConfig(dtype="float64")
    >>> cg = ak.IterativeIFVP(damping=0.01, tol=1e-10, config=cfg).fit(model, (X, y))
    >>> grads = ak.per_example_gradients(model, (X[:3], y[:3]), config=cfg)
    >>> out, info = cg.solve(grads)
    >>> exact = ak.ExplicitIFVP(damping=0.01, fisher="expected", config=cfg).fit(model, (X, y))
    >>> ref = exact.transform(grads)
    >>> bool((out - ref).abs().max() <= 1e-8 * ref.abs().max())
    True
    >>> info["n_iter"], bool(info["converged"].all())
    (array([25, 25, 25]), True)

    Preconditioned by EK-FAC (a clone fitted inside ``fit``):

    >>> ekfac = ak.EKFACIFVP(damping=0.01, fisher="expected")
    >>> pcg = ak.IterativeIFVP(damping=0.01, tol=1e-10, preconditioner=ekfac, config=cfg)
    >>> out2, info2 = pcg.fit(model, (X, y)).solve(grads)
    >>> bool((out2 - ref).abs().max() <= 1e-8 * ref.abs().max()), pcg.preconditioner_ is ekfac
    (True, False)
    """

    _transient = ("_lock",)
    _agree_on_fit = True  # model-mode fits communicate: the ranks agree first

    def __init__(
        self,
        damping: float = 0.0,
        curvature: str = "ggn",
        preconditioner=None,
        max_iter: int = 100,
        tol: float = 1e-6,
        loss="cross_entropy",
        params: list[str] | None = None,
        config: ComputeConfig | None = None,
    ):
        self.damping = damping
        self.curvature = curvature
        self.preconditioner = preconditioner
        self.max_iter = max_iter
        self.tol = tol
        self.loss = loss
        self.params = params
        self.config = config

    # ------------------------------------------------------------------ params
    def _check_params(self) -> None:
        V.check_float(self, "damping", self.damping, minimum=0.0)
        V.check_option(self, "curvature", self.curvature, _CURVATURES)
        pre = self.preconditioner
        if pre is not None and not (
            getattr(pre, "_is_ifvp", False)
            and hasattr(pre, "transform")
            and hasattr(pre, "get_params")
        ):
            raise V.param_error(
                self,
                "preconditioner",
                "None or an IFVP estimator (EKFACIFVP, ExplicitIFVP, DataInfIFVP, ...)",
                pre,
            )
        V.check_int(self, "max_iter", self.max_iter, minimum=1)
        tol = V.check_float(self, "tol", self.tol, minimum=0.0)
        if tol >= 1.0:
            raise V.param_error(self, "tol", "a float in [0, 1)", self.tol)
        V.check_loss(self, self.loss)
        V.check_params(self, self.params)

    # ------------------------------------------------------------------ fit
    def _make_product(self, model, data, config: ComputeConfig):
        if isinstance(data, Iterator):
            raise ValueError(
                "The 'data' argument of IterativeIFVP is iterated again in every conjugate-"
                "gradient iteration, so it must be re-iterable. Got a one-shot iterator "
                f"({type(data).__name__}); pass a DataLoader, a Dataset, a tuple (inputs, "
                "targets) or a list of batches."
            )
        kwargs = dict(loss=self.loss, params=self.params, config=config, owner=self)
        if self.curvature == "ggn":
            product = MeanLossGGN(model, data, **kwargs)
        else:
            product = MeanLossHVP(model, data, mode="rev-fwd", **kwargs)
        product.max_rows = max(1, config.memory_budget // (32 * product.n_features))
        return product

    def _fit_model(self, model, data, config: ComputeConfig) -> None:
        product = self._make_product(model, data, config)
        checksum = parameter_checksum(product._sel)
        # Distributed, the ranks agree on the estimator, the layout and the model's
        # values here (BaseEstimator's agreement, _agree_on_fit), before any collective.
        self._set_layout(product.param_shapes)
        self._from_model = True
        self.gradients_ = None
        self.param_checksum_ = checksum
        self._fit_preconditioner(config, model=model, data=data)
        self._probe(product)
        self.n_samples_ = int(product.n_samples)
        self._binding = _Binding(model, data, product)

    def _fit_array(self, G: torch.Tensor, config: ComputeConfig) -> None:
        self._from_model = False
        # copy=True: the kept gradients never alias the caller's array.
        self.gradients_ = G.to(_F64, copy=True)
        self.param_checksum_ = torch.zeros(0, 4, dtype=_F64)
        self.n_samples_ = int(G.shape[0])
        self._fit_preconditioner(config, G=G)
        self._probe(GramProduct(self.gradients_, config.memory_budget))

    def _fit_preconditioner(self, config, *, model=None, data=None, G=None) -> None:
        """Fit a clone of the preconditioner (or take a fitted one) and map its layout."""
        given = self.preconditioner
        self._cover = None  # where the preconditioner's layout meets ours (_Cover)
        if given is None:
            self.preconditioner_ = None
            return
        if _is_fitted(given):
            pre = given
        else:
            pre = sklearn.base.clone(given)
            own = pre.get_params(deep=False)
            updates = {}
            if "loss" in own:
                updates["loss"] = self.loss
            if "params" in own and own["params"] is None and self.params is not None:
                updates["params"] = list(self.params)
            if "layers" in own and own["layers"] is None and self.params is not None:
                if model is not None:
                    updates["layers"] = _modules_within(model, self.params) or None
            if "config" in own and own["config"] is None:
                updates["config"] = self.config
            pre.set_params(**updates)
            if G is None:
                pre.fit(model, data)
            elif list(self.param_shapes_) == [ARRAY_KEY]:
                pre.fit(G)
            else:  # the layout of the dict this estimator was fitted on
                pre.fit(split(G, self.param_shapes_))
        self.preconditioner_ = pre
        cover = self._map_layout(pre)
        self._cover = None if cover is None else dict(cover._asdict())

    def _map_layout(self, pre) -> _Cover | None:
        """Where the preconditioner's layout meets this estimator's; ``None`` if they are equal."""
        shapes = getattr(pre, "param_shapes_", None)
        name = type(pre).__name__
        if not shapes:
            raise ValueError(
                f"The 'preconditioner' of IterativeIFVP ({name}) has no param_shapes_: "
                "it must be a fitted attribkit IFVP estimator."
            )
        if list(shapes) == list(self.param_shapes_) and all(
            tuple(shapes[k]) == tuple(s) for k, s in self.param_shapes_.items()
        ):
            return None
        mine, theirs = _offsets(self.param_shapes_), _offsets(shapes)
        wrong = {k: (theirs[k][2], mine[k][2]) for k in theirs if k in mine}
        wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
        common = [k for k in theirs if k in mine]
        if wrong or not common:
            raise ValueError(
                f"The 'preconditioner' of IterativeIFVP ({name}) was fitted on a layout that "
                "does not match IterativeIFVP's: "
                + (
                    f"{wrong} have other shapes (preconditioner's, ours)"
                    if wrong
                    else f"none of its parameters {list(theirs)} are among {list(mine)}"
                )
                + ". Fit it on the same model and parameters (or leave it unfitted: it is "
                "then fitted inside fit)."
            )

        def columns(offsets):
            return torch.cat(
                [torch.arange(offsets[k][0], offsets[k][0] + offsets[k][1]) for k in common]
            )

        ours, its = columns(mine), columns(theirs)
        rest = torch.ones(self.n_features_in_, dtype=torch.bool)
        rest[ours] = False
        width = int(pre.n_features_in_)
        device = self._device
        return _Cover(
            ours.to(device),
            None if width == its.numel() else its.to(device),
            width,
            torch.nonzero(rest).flatten().to(device),
        )

    def _probe(self, product) -> None:
        """One curvature product of a fixed probe: checks the data, counts, measures scale."""
        p = self.n_features_in_
        gen = torch.Generator().manual_seed(_PROBE_SEED)
        u = torch.randint(0, 2, (p,), generator=gen).to(_F64).mul_(2).sub_(1)
        partial = self._cover is not None and self._cover["rest"].numel() > 0
        if partial:
            u[self._cover["ours"].cpu()] = 0.0
        u = u.to(self._device)
        Cu = product(u)
        c = float(u @ Cu.to(u.device)) / float(u @ u)
        self.curvature_scale_ = c
        damping = float(self.damping)
        if partial and not c + damping > 0:
            raise ValueError(
                f"IterativeIFVP: the preconditioner {type(self.preconditioner_).__name__} does "
                f"not cover {int(u.abs().sum())} parameters, where the preconditioner is "
                "1 / (mean curvature + damping) times the identity, but the mean curvature "
                f"measured there is {c:.3g} and damping={self.damping!r}: not positive. Use a "
                "larger damping (or a preconditioner that covers every parameter)."
            )
        self.identity_scale_ = 1.0 / (c + damping) if partial else 1.0

    # ------------------------------------------------------------------ pickling
    def _init_transient(self) -> None:
        self._lock = threading.Lock()

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_binding", None)  # no model and no data in a pickle (API section 2)
        return state

    def attach(self, model: torch.nn.Module, data):
        """Bind a model and data to a fitted (e.g. unpickled) model-mode estimator.

        A pickle holds neither (see Notes of the class); ``attach`` gives them
        back without refitting anything: the model's parameters (``params``)
        must have the layout and, to rounding, the values the estimator was
        fitted on (their checksum is compared), and ``data`` must be the same
        examples (its example count is checked in the next pass).

        Parameters
        ----------
        model : torch.nn.Module
            The model the estimator was fitted on (or an exact copy).
        data : DataLoader, Dataset, tuple, mapping or re-iterable of batches
            The same training data.

        Returns
        -------
        self
            This estimator, ready to ``transform`` again.

        Raises
        ------
        ValueError
            When the estimator was fitted in array mode, or the model's
            layout or parameter values differ from the fitted ones.
        TypeError
            When ``model`` is not a ``torch.nn.Module``.
        """
        check_is_fitted(self)
        if not getattr(self, "_from_model", False):
            raise ValueError(
                "IterativeIFVP.attach binds a model and data to an estimator fitted in model "
                "mode; this one was fitted on an array of gradients, which it keeps itself."
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                "The 'model' argument of IterativeIFVP.attach must be a torch.nn.Module. "
                f"Got {type(model).__name__} instead."
            )
        product = self._make_product(model, data, self._config)
        if product.param_shapes != self.param_shapes_:
            raise ValueError(
                "IterativeIFVP.attach: the model's parameters "
                f"{dict(product.param_shapes)} are not the layout the estimator was fitted "
                f"on, {dict(self.param_shapes_)}."
            )
        changed = checksum_differences(
            parameter_checksum(product._sel), self.param_checksum_, list(self.param_shapes_)
        )
        if changed:
            raise ValueError(
                "IterativeIFVP.attach: the values of the model's parameters "
                f"{changed} differ from the ones the estimator was fitted on (their checksums "
                "differ), so its preconditioner and curvature would not match. Attach the "
                "fitted model, or fit again."
            )
        product.n_samples = self.n_samples_  # a pass over other data raises
        self._binding = _Binding(model, data, product)
        return self

    # ------------------------------------------------------------------ transform
    def solve(self, vectors):
        """Solve ``(C + damping I) X = V`` and report the iterations per row.

        Parameters
        ----------
        vectors : ndarray, torch.Tensor of shape (m, n_features), or dict
            Flat vectors, or a dict ``name -> (m, *shape)`` keyed like
            ``param_shapes_``.

        Returns
        -------
        X : ndarray, torch.Tensor or dict
            The solutions, in the container and shapes of ``vectors``, in
            ``config.dtype`` (``transform(vectors)`` is this).
        info : dict
            ``"n_iter"``: int64 ndarray ``(m,)``, the iterations (curvature
            products) each row took (0 for a zero row); ``"residual"``:
            float64 ndarray ``(m,)``, the relative residual
            ``||v_i - (C + damping I) x_i|| / ||v_i||`` reached (CG's
            recursively updated residual; 0 for a zero row);
            ``"converged"``: bool ndarray ``(m,)``, whether it is at most
            ``tol``.

        Warns
        -----
        ConvergenceWarning
            When some row did not reach ``tol`` within ``max_iter``
            iterations, with the residual reached.
        """
        info: dict = {}
        reached = [False]  # whether this rank got to the collective agreement

        def run(flat):
            X, details = self._solve_flat(flat, reached)
            info.update(details)
            return X

        try:
            return self._apply(vectors, run, same_layout=True), info
        except Exception:
            red = self._collective()
            if red is not None and not reached[0]:
                # This rank failed before the collective: tell the others, which
                # would otherwise wait for it, then raise its own error.
                red.agree("IterativeIFVP.transform", failed=True)
            raise

    def transform(self, vectors):
        """Solve ``(C + damping I) X = V``: ``solve(vectors)[0]``.

        Parameters
        ----------
        vectors : ndarray, torch.Tensor of shape (m, n_features), or dict
            Flat vectors, or a dict ``name -> (m, *shape)`` keyed like
            ``param_shapes_``.

        Returns
        -------
        ndarray, torch.Tensor or dict
            In the container and shapes of ``vectors``, in ``config.dtype``.
        """
        return self.solve(vectors)[0]

    def _transform(self, V: torch.Tensor) -> torch.Tensor:
        return self._solve_flat(V, [False])[0]

    def _collective(self):
        """The active reducer of a distributed model-mode fit, else None."""
        binding = self.__dict__.get("_binding")
        if binding is None or not binding.product._reducer.active:
            return None
        return binding.product._reducer

    def _product(self):
        if self.gradients_ is not None:
            return GramProduct(self.gradients_, self._config.memory_budget), None
        binding = self.__dict__.get("_binding")
        if binding is None:
            raise RuntimeError(
                "IterativeIFVP needs the model and the training data it was fitted on to "
                "transform, and a pickle never contains them: call attach(model, data) on "
                "this unpickled estimator first (it checks the model's parameter values "
                "and does not refit the preconditioner)."
            )
        return binding.product, binding

    def _solve_flat(self, V: torch.Tensor, reached: list) -> tuple[torch.Tensor, dict]:
        product, binding = self._product()
        finite = all_finite(V)
        if binding is None:
            if not finite:
                raise ValueError("Input X contains NaN or infinity.")
            return self._run(product, V, None)
        with self._lock:
            error = None if finite else ValueError("Input X contains NaN or infinity.")
            if error is None:
                live = select_params(binding.model, self.params, self)
                changed = checksum_differences(
                    parameter_checksum(live), self.param_checksum_, list(self.param_shapes_)
                )
                if changed or list(live) != list(self.param_shapes_):
                    error = ValueError(
                        f"The values of the model's parameters {changed or list(live)} changed "
                        "since IterativeIFVP was fitted (the model is kept by reference, and "
                        "its preconditioner and checksum are those of the fitted values). Fit "
                        "it again on the current model."
                    )
            red = product._reducer
            if red.active:
                reached[0] = True
                V = V.to(_F64)
                red.agree(
                    "IterativeIFVP.transform",
                    shape=tuple(V.shape),
                    fingerprint=(float(V.sum()), float(V.square().sum())),
                    failed=error is not None,
                )
            if error is not None:
                raise error
            if red.active:  # from here on every rank works on rank 0's bits
                V = V.to(device=self._device).contiguous()
                red.broadcast_(V)
            return self._run(product, V, red)

    def _run(self, product, V: torch.Tensor, red) -> tuple[torch.Tensor, dict]:
        damping = float(self.damping)
        pre = self.preconditioner_
        # Distributed and preconditioned: the CG state rides in the products' all-reduce
        # (rank 0's values; zeros from the others), so every rank continues from the same
        # bits although a preconditioner's rounding may differ between processes.
        shared = red is not None and red.active and pre is not None

        def matmat(D, state=None):
            if not shared:
                Q = product(D)
                return Q.add_(D, alpha=damping) if damping else Q
            mine = state if red.rank == 0 else torch.zeros_like(state)
            Q, agreed = product.product_and_sum(D, mine)
            if damping:
                Q.add_(agreed[:, :-1], alpha=damping)
            return Q, agreed

        try:
            result = batched_pcg(
                matmat,
                V.to(device=self._device, dtype=_F64),
                None if pre is None else self._precondition,
                max_iter=int(self.max_iter),
                tol=float(self.tol),
                rounding=torch.finfo(getattr(product, "dtype", _F64)).eps,
                scale=abs(self.curvature_scale_) + damping,
                shared=shared,
                progress=self._config.show_progress,
                desc="IterativeIFVP CG",
            )
        except NotPositiveDefinite as exc:
            raise self._breakdown_error(exc) from None
        except ValueError as exc:
            if "not finite" not in str(exc):
                raise
            raise ValueError(f"IterativeIFVP: {exc}") from None
        if not bool(result.converged.all()):
            bad = ~result.converged
            worst = float(result.residual[bad].max())
            warnings.warn(
                f"IterativeIFVP did not reach tol={self.tol:g} within max_iter={self.max_iter} "
                f"iterations for {int(bad.sum())} of {len(bad)} rows: relative residual up to "
                f"{worst:.3g} (median over those rows "
                f"{float(result.residual[bad].median()):.3g}). Increase max_iter, use a "
                "preconditioner, or a larger damping.",
                ConvergenceWarning,
                stacklevel=4,
            )
        info = {
            "n_iter": result.n_iter.numpy(),
            "residual": result.residual.numpy(),
            "converged": result.converged.numpy().astype(bool),
        }
        return result.X, info

    def _precondition(self, R: torch.Tensor) -> torch.Tensor:
        pre, cover = self.preconditioner_, self._cover
        if cover is not None:
            cover = _Cover(**cover)
        if cover is None:
            return torch.as_tensor(pre.transform(R)).to(device=R.device, dtype=_F64)
        Z = R * self.identity_scale_  # the parameters it does not cover
        inp = R[:, cover.ours]
        if cover.its is not None:  # it covers parameters we do not have: zero there
            inp = R.new_zeros(R.shape[0], cover.width).index_copy_(1, cover.its, inp)
        out = torch.as_tensor(pre.transform(inp)).to(device=R.device, dtype=_F64)
        Z[:, cover.ours] = out if cover.its is None else out[:, cover.its]
        return Z

    def _breakdown_error(self, exc: NotPositiveDefinite) -> ValueError:
        where = f"row {exc.row} at iteration {exc.iteration}"
        if exc.where == "preconditioner":
            name = type(self.preconditioner_).__name__
            return ValueError(
                f"The 'preconditioner' of IterativeIFVP ({name}) is not positive definite: "
                f"r^T M r = {exc.value:.3g} <= 0 for {where}. Preconditioned conjugate "
                "gradients need a symmetric positive definite preconditioner; give it a "
                "damping > 0."
            )
        if self.gradients_ is not None:
            what = "G^T G / n + damping I (array mode)"
            advice = "Use damping > 0 (or a larger one)."
        elif self.curvature == "hessian":
            what = "the Hessian plus damping I"
            advice = (
                "A Hessian away from a minimum is indefinite: use a larger damping (above the "
                "magnitude of its most negative eigenvalue), or curvature='ggn' (the "
                "Gauss-Newton matrix, positive semi-definite)."
            )
        else:
            what = "the Gauss-Newton matrix plus damping I"
            advice = (
                "The Gauss-Newton matrix is singular with fewer examples than parameters or "
                "unused parameters (and indefinite for a loss that is not convex in the "
                "outputs): use damping > 0 (or a larger one)."
            )
        return ValueError(
            f"IterativeIFVP met non-positive curvature: d^T (C + damping I) d = "
            f"{exc.value:.3g} for a search direction of {where}, with curvature="
            f"{self.curvature!r} and damping={self.damping!r}. Conjugate gradients need "
            f"C + damping I positive definite, and {what} is not (or is singular to the "
            f"precision of the products). {advice}"
        )
