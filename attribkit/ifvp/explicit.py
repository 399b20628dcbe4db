"""Exact inverse-Fisher-vector products: a dense Cholesky factor or its kernel form.

The whole data flow, from ``fit`` to ``transform``:

1. per-example gradients ``g_i`` arrive in ``(b, p)`` chunks (streamed from the
   model in model mode, sliced from ``G`` in array mode), cast to float64;
2. the solver is chosen (``_resolve_solver``): the dense ``p x p`` form or the
   kernel ``n x n`` form, by cost and by memory, refusing before allocating
   what cannot fit;
3. dense form: ``F += G_b^T G_b``, then ``F / n + damping I = L L^T``;
   kernel form: the gradients are kept and ``n damping I + G G^T = L L^T``;
4. ``transform`` applies ``(F + damping I)^{-1}`` with triangular solves,
   ``inverse_transform`` applies ``F + damping I`` without forming it anew.
"""

from __future__ import annotations

import contextlib

import torch

from .._compute import budget, progress
from .._compute import validation as V
from .._compute.distributed import Reducer, reducer
from .._compute.gradients import iter_gradients
from .._compute.model import param_shapes, select_params
from .._compute.precision import EPS64 as _EPS64
from .._compute.precision import F64 as _F64
from .._compute.vectors import flatten_dict
from ..base import BaseEstimator
from ..config import ComputeConfig

__all__ = ["ExplicitIFVP"]

_SOLVERS = ("auto", "cholesky", "woodbury")


def _dense_bytes(p: int) -> int:
    # float64 Fisher and its Cholesky factor, alive together while factorising.
    return 2 * 8 * p * p


def _kernel_bytes(n: int, p: int) -> int:
    # float64 kept gradients, plus the n x n kernel and its Cholesky factor.
    return 8 * n * p + 2 * 8 * n * n


class ExplicitIFVP(BaseEstimator):
    """Exact inverse-Fisher-vector product ``V (F + damping I)^{-1}``.

    The Fisher information matrix is the mean outer product of the
    per-example gradients, ``F = (1/n) sum_i g_i g_i^T = G^T G / n`` for the
    ``(n, p)`` gradient matrix ``G``. It is factorised once at ``fit``;
    ``transform`` then costs two triangular solves per batch of vectors.
    Applied to test gradients, ``transform`` gives the inverse-curvature
    term of influence functions (Koh & Liang, 2017), with the Fisher standing
    for the Hessian.

    Parameters
    ----------
    damping : float or "auto", default=0.0
        ``damping >= 0`` added to the diagonal of ``F``. ``F`` has rank at most
        ``n_samples``, so with fewer examples than features (or directions the
        gradients never move along) it is singular and needs ``damping > 0``.
        ``"auto"``: ``0.1 ×`` the mean diagonal of ``F`` (``0.1 ×`` the mean
        squared gradient entry, the convention of DataInfIFVP's and
        EKFACIFVP's ``"auto"``), computed at ``fit`` and stored in
        ``damping_``. When the model was trained with L2 weight decay
        ``λ`` (a penalty ``(λ/2) ‖θ‖²`` on the mean loss, i.e. SGD's
        ``weight_decay=λ``), ``damping=λ`` makes ``F + λ I`` the curvature of
        the objective that was actually minimised: the principled choice.
        Otherwise ``"auto"`` is a reasonable start; check that the top-ranked
        examples are stable when ``damping`` is scaled by 0.1 and 10.
    solver : {"auto", "cholesky", "woodbury"}, default="auto"
        ``"cholesky"``: the dense form, a ``p x p`` Cholesky factor of
        ``F + damping I``. ``"woodbury"``: the exact kernel form (needs
        ``damping > 0``),
        ``(G^T G / n + d I)^{-1} = (1/d) (I - G^T (n d I + G G^T)^{-1} G)``,
        an ``n x n`` Cholesky factor with the gradients kept. ``"auto"``: the
        cheaper of the two (see Notes). Both give the same numbers.
    fisher : {"empirical", "true", "expected"}, default="empirical"
        Model mode only: gradients of the loss at the data's targets
        (``"empirical"``), at targets sampled from the model's predictive
        distribution (``"true"``, built-in losses only; uses torch's global
        generator, so ``torch.manual_seed`` makes it reproducible), or the
        exact expectation over that distribution (``"expected"``, built-in
        losses only): per example ``sum_c p_c g_c g_c^T`` over the ``C``
        classes for cross-entropy, the Gauss-Newton matrix ``J^T (diag(p) -
        p p^T) J``; for MSE likewise ``(2 / D) J^T J``. It is the best
        curvature of the three (for a linear model it is the Hessian of the
        loss) and costs ``C`` (or ``D``) backward passes per batch; see
        Notes. On sequences (per-token cross-entropy, ``"causal_lm"``) it
        would need one gradient per token and class, and raises
        ``ValueError`` naming ``"true"`` instead. Ignored in array mode,
        where the gradients are given.
    loss : {"cross_entropy", "mse", "causal_lm"} or callable, default="cross_entropy"
        Model mode only: the per-example loss, as in
        :func:`~attribkit.per_example_gradients` (``"causal_lm"``: the summed
        next-token cross-entropy of a language model); a callable takes
        ``(outputs, targets)`` and returns losses of shape ``(batch,)``.
    params : list of str, optional
        Model mode only: names of the parameters the Fisher is taken over
        (default: all trainable parameters).
    config : ComputeConfig, optional
        Device, output dtype, ``batch_size`` of the gradient pass, progress
        bar and ``memory_budget`` (see Notes). ``None`` means
        ``ComputeConfig()``.

    Attributes
    ----------
    damping_ : float
        The damping used: ``damping``, or its value for ``damping="auto"``.
    solver_ : str
        The solver that ran: ``"cholesky"`` or ``"woodbury"``.
    n_samples_ : int
        Number of examples ``n`` the Fisher averages over.
    cholesky_ : torch.Tensor
        Lower-triangular float64 Cholesky factor on the config device: of
        ``F + damping I``, shape ``(p, p)``, when ``solver_ == "cholesky"``;
        of the kernel ``n damping I + G G^T``, shape ``(n, n)``, when
        ``solver_ == "woodbury"``.
    gradients_ : torch.Tensor or None
        The ``(n, p)`` float64 per-example gradients ``G`` when
        ``solver_ == "woodbury"`` (the kernel form needs them), else ``None``.
    n_features_in_ : int
        Number of features ``p`` (total number of parameters in model mode).
    param_shapes_ : OrderedDict
        ``name -> shape`` of the blocks a flat vector concatenates: the
        selected parameters (model mode), the dict's keys, or the single key
        ``"features"`` of a plain array.
    feature_names_in_ : ndarray of str
        Column names of a DataFrame given to ``fit`` in array mode (only then).

    See Also
    --------
    attribkit.per_example_gradients : The ``G`` that array mode takes.

    Notes
    -----
    **Solver choice.** With ``m`` vectors per call, the dense form costs
    ``n p^2 + p^3 / 3`` flops to fit, ``2 m p^2`` per transform and ``p^2``
    stored numbers; the kernel form ``n^2 p + n^3 / 3`` to fit,
    ``2 m n (n + p)`` per transform and ``n (n + p)`` numbers. ``"auto"``
    takes the kernel form when ``damping > 0`` and ``n (n + p) < p^2``
    (about ``n < 0.62 p``): then it is the cheaper one on all three counts.
    In model mode ``n`` is not known up front, so ``"auto"`` keeps the
    gradients while that inequality holds for the examples seen so far and,
    the first time it fails, folds them into a dense ``F`` and streams the
    rest into it; the final choice is the one array mode makes for the same
    ``n``. If the preferred form does not fit in memory the other is used.

    **fisher="expected".** Each example contributes ``K`` weighted
    pseudo-gradients ``sqrt(w_k) g_k`` (``K = C`` classes weighted by the
    softmax probabilities, or ``K = D`` MSE outputs), so a batch costs ``K``
    vectorised backward passes and holds ``K`` times as many gradients. The
    Fisher still averages over the ``n`` examples (``n_samples_ = n``), but
    the kernel form keeps and factorises all ``r = n K`` rows (``gradients_``
    is ``(n K, p)``, the kernel ``n K x n K``: ``(1/d)(I - G^T (n d I +
    G G^T)^{-1} G)`` with ``G`` the pseudo-gradients), and the costs,
    memory and ``"auto"`` rule above hold with ``n`` replaced by ``r``.

    **Memory.** The dense form peaks at ``16 p^2`` bytes (the float64 Fisher
    and its factor), the kernel form at ``8 n p + 16 n^2`` bytes (float64
    gradients, kernel and factor). A form is refused, with its size in the
    message and before anything of that size is allocated, when it needs
    more than the larger of ``config.memory_budget`` and the memory available
    on the device now (``MemAvailable`` on the CPU, the driver's free memory
    on CUDA). In model mode the kernel form is checked as its gradients
    accumulate, and their batches are concatenated at the end of the pass
    (briefly twice ``8 n p`` bytes).

    **Precision.** The Fisher is accumulated, factorised and applied in
    float64 whatever ``config.dtype`` says, and results are cast to
    ``config.dtype``; the factor is kept in float64 because solving with a
    factor rounded to single precision would lose ``kappa * 1e-7`` relative
    accuracy for condition number ``kappa``, however the solve is done. A
    Fisher that is singular to float64 precision raises ``ValueError``
    suggesting ``damping > 0`` (or a larger one): a Cholesky pivot ``r`` with
    ``r^2 <= size * eps * max(diag)`` of the factored matrix, or ``n < p``
    with ``damping`` at or below ``p * eps * max(diag(F))`` (0 included), the
    rounding level of ``F``, for both forms alike. The kernel form
    subtracts nearly equal terms when ``damping`` is small next to ``F``'s
    eigenvalues, and loses accuracy ``eps * ||F|| / damping`` (the forward
    error the dense form has at that condition number too).

    **Distributed.** With ``config.distributed`` on and a ``torch.distributed``
    process group of ``W > 1`` ranks, a model-mode ``fit`` is collective:
    every rank calls it with its own shard of the data (shards may be uneven,
    a rank's may be empty as long as the union is not) and ends with the
    fitted state one process would get on the union, in rank order. The
    memory limit is the smallest over ranks and the solver is decided from
    the global row count, so every rank takes the same one. Dense form: one
    all-reduce of the ``p x p`` float64 sum ``G^T G`` (``8 p^2`` bytes) and
    of the counts, once per fit. Kernel form: the kept gradients are
    all-gathered so every rank holds all ``n`` of them and the same
    ``n x n`` factor: each rank receives ``8 n p`` bytes, holds the full
    ``8 n p + 16 n^2`` state (not its shard's share) and, during the
    gather, ``W`` buffers of the largest shard's rows besides. A rank that
    fails makes every rank raise. ``fisher="true"`` samples targets on each
    rank from its own torch generator, so it is a different (equally valid)
    draw than one process makes. Array-mode fits stay local.

    **dattri 0.1.0.** Its ``ifvp_explicit`` builds its matrix
    as ``g @ g.T`` from a 1-D gradient, which is a scalar; here ``F`` is the
    real ``p x p`` matrix ``G^T G / n``.

    References
    ----------
    .. [1] P. W. Koh and P. Liang, "Understanding Black-box Predictions via
       Influence Functions", ICML 2017.
    .. [2] M. A. Woodbury, "Inverting Modified Matrices", Memorandum Report 42,
       Statistical Research Group, Princeton University, 1950.
    .. [3] N. J. Higham, "Accuracy and Stability of Numerical Algorithms",
       2nd ed., SIAM 2002, ch. 10 (Cholesky factorisation).

    Examples
    --------
    >>> import torch
    >>> import attribkit as ak
    >>> G = torch.randn(50, 10, dtype=torch.float64)  # per-example gradients
    >>> cfg = ak.ComputeConfig(dtype="float64")
    >>> ifvp = ak.ExplicitIFVP(damping=0.1, config=cfg).fit(G)
    >>> ifvp.solver_
    'cholesky'
    >>> v = torch.randn(3, 10, dtype=torch.float64)
    >>> F = G.T @ G / 50 + 0.1 * torch.eye(10, dtype=torch.float64)
    >>> torch.allclose(ifvp.transform(v), torch.linalg.solve(F, v.T).T)
    True
    >>> torch.allclose(ifvp.inverse_transform(ifvp.transform(v)), v)
    True

    Model mode with fewer examples than parameters takes the kernel form:

    >>> model = torch.nn.Linear(8, 3).double()
    >>> X, y = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> ifvp = ak.ExplicitIFVP(damping=0.01, config=cfg).fit(model, (X, y))
    >>> ifvp.solver_, ifvp.n_samples_, ifvp.n_features_in_
    ('woodbury', 6, 27)
    >>> test_grads = ak.per_example_gradients(model, (X[:2], y[:2]), config=cfg, flatten=False)
    >>> {k: tuple(t.shape) for k, t in ifvp.transform(test_grads).items()}
    {'weight': (2, 3, 8), 'bias': (2, 3)}
    """

    _agree_on_fit = True  # model-mode fits communicate: the ranks agree first

    def __init__(
        self,
        damping: float = 0.0,
        solver: str = "auto",
        fisher: str = "empirical",
        loss="cross_entropy",
        params: list[str] | None = None,
        config: ComputeConfig | None = None,
    ):
        self.damping = damping
        self.solver = solver
        self.fisher = fisher
        self.loss = loss
        self.params = params
        self.config = config

    # ------------------------------------------------------------------ params
    def _check_params(self) -> None:
        V.check_damping(self, self.damping)
        V.check_option(self, "solver", self.solver, _SOLVERS)
        V.check_fisher(self, self.fisher)
        V.check_loss(self, self.loss)
        V.check_params(self, self.params)
        if self.solver == "woodbury" and self._nominal_damping() == 0.0:
            raise ValueError(
                "The 'damping' parameter of ExplicitIFVP must be a float > 0 with "
                f"solver='woodbury' (the kernel form divides by it). Got {self.damping!r} "
                "instead. Use damping > 0, or solver='cholesky' for an undamped Fisher."
            )

    # ------------------------------------------------------------------ fit
    def _fit_model(self, model, data, config: ComputeConfig) -> None:
        V.check_fisher_loss(self, self.fisher, self.loss)
        shapes = param_shapes(select_params(model, self.params, self))
        self._set_layout(shapes)
        self._from_model = True
        batches = iter_gradients(
            model,
            data,
            loss=self.loss,
            params=self.params,
            fisher=self.fisher,
            config=config,
            owner=self,
            desc="ExplicitIFVP Fisher",
        )
        red = reducer(config, "ExplicitIFVP.fit", device=self._device)
        limit = self._memory_limit()
        if red.active:
            # Every rank must take the same solver: decide by the smallest
            # budget and the smallest available memory over the ranks.
            limits = red.gather_ints(limit)
            limit = (min(b for b, _ in limits), min(a for _, a in limits))
        # Closed on any error: a suspended generator kept alive by the traceback
        # would hold the model (in eval mode) until then.
        with contextlib.closing(batches):
            self._fit_chunks(self._model_chunks(batches, shapes), None, limit, red)

    def _model_chunks(self, batches, shapes):
        """``(rows, examples)`` float64 chunks from the model's gradient batches.

        ``fisher="expected"`` batches are ``(K, b, *shape)`` weighted
        pseudo-gradients: ``K b`` rows that stand for ``b`` examples.
        """
        for g in batches:
            examples = next(iter(g.values())).shape[0]
            if self.fisher == "expected":
                examples = next(iter(g.values())).shape[1]
                g = {n: t.reshape(-1, *t.shape[2:]) for n, t in g.items()}
            yield flatten_dict(g, shapes).to(device=self._device, dtype=_F64), examples

    def _fit_array(self, G: torch.Tensor, config: ComputeConfig) -> None:
        n, p = G.shape
        limit = self._memory_limit()
        # copy=True: kept gradients must never alias the caller's tensor.
        if self._resolve_solver(n, p, limit) == "woodbury":
            chunks = [(G.to(_F64, copy=True), n)]  # the kept state itself, in one piece
        else:
            # Chunks keep the float64 copy of a low-precision G within the budget.
            rows = budget.rows_within(config.memory_budget, 8 * p, n)
            chunks = (
                (G[s : s + rows].to(_F64, copy=True), min(rows, n - s)) for s in range(0, n, rows)
            )
            chunks = progress.bar(
                chunks,
                total=-(-n // rows),
                desc="ExplicitIFVP Fisher",
                enabled=config.show_progress,
                several=True,
            )
        self._fit_chunks(chunks, n, limit)

    @property
    def _show(self) -> bool:
        return self._config.show_progress

    def _nominal_damping(self) -> float:
        """``damping`` before fit; ``"auto"`` counts as positive (its value comes later)."""
        return 1.0 if self.damping == "auto" else float(self.damping)

    def _set_damping(self, scale: float) -> float:
        """Record and return ``damping_`` given ``scale``, the mean diagonal of ``F``."""
        if self.damping != "auto":
            self.damping_ = float(self.damping)
        elif not scale > 0:
            raise ValueError(
                "damping='auto' of ExplicitIFVP is 0.1 times the mean diagonal of the Fisher "
                f"F, but that is {scale!r}: every per-example gradient is zero. Check the "
                "model and the loss, or pass a float damping > 0."
            )
        else:
            self.damping_ = 0.1 * scale
        return self.damping_

    def _memory_limit(self) -> tuple[int, int]:
        return budget.memory_limit(self._config.memory_budget, self._device)

    def _fit_chunks(
        self, chunks, n: int | None, limit: tuple[int, int], red: Reducer | None = None
    ) -> None:
        """Accumulate ``(rows, examples)`` float64 gradient chunks and factorise.

        A chunk is ``(r, p)`` rows standing for ``examples`` examples (``r``
        of them, or ``K`` times as many pseudo-gradients for
        ``fisher="expected"``). ``n`` is the number of rows when known up
        front (array mode); ``None`` in model mode, where the solver is
        re-checked as rows arrive.

        With an active reducer (a distributed model-mode fit) the chunks are
        this rank's shard; after the pass the solver is decided again from
        the global row count (the same on every rank, as ``limit`` is), then
        ``F`` is all-reduced or the kept gradients all-gathered.
        """
        red = Reducer(False) if red is None else red
        p = self.n_features_in_
        solver = self._resolve_solver(0 if n is None else n, p, limit)
        F = torch.zeros(p, p, dtype=_F64, device=self._device) if solver == "cholesky" else None
        kept: list[torch.Tensor] = []
        count = rows = 0
        with red.shard_pass("ExplicitIFVP.fit") as shard:
            for chunk, examples in chunks:
                count += examples
                rows += chunk.shape[0]
                shard.count = count
                if F is not None:
                    F.addmm_(chunk.T, chunk)
                    continue
                kept.append(chunk)
                if n is None:
                    solver = self._resolve_solver(rows, p, limit)
                    if solver == "cholesky":  # "auto" passed the break-even point
                        F = torch.zeros(p, p, dtype=_F64, device=self._device)
                        for c in kept:
                            F.addmm_(c.T, c)
                        kept = []
        if red.active:
            count, rows = shard.total, red.sum_int(rows)
            # The break-even point and the memory checks are monotone in the row
            # count, so a rank that switched to the dense form locally is never
            # asked for the kernel form here.
            solver = self._resolve_solver(rows, p, limit)
            if solver == "cholesky":
                if F is None:
                    F = torch.zeros(p, p, dtype=_F64, device=self._device)
                    for c in kept:
                        F.addmm_(c.T, c)
                    kept = []
                red.sum_(F)
            elif F is not None:  # pragma: no cover - excluded by the monotonicity above
                raise RuntimeError("ExplicitIFVP: ranks disagree on the solver.")
            else:
                empty = torch.zeros(0, p, dtype=_F64, device=self._device)
                local = torch.cat(kept) if kept else empty
                kept = [red.gather_rows(local, "ExplicitIFVP's per-example gradients")]
        self.solver_ = solver
        self.n_samples_ = count
        if solver == "cholesky":
            self._factorise_dense(F, count, rows)
        else:
            self._factorise_kernel(torch.cat(kept) if len(kept) > 1 else kept[0], count)

    def _resolve_solver(self, n: int, p: int, limit: tuple[int, int]) -> str:
        """The solver for ``n`` gradient rows and ``p`` features; raise if none fits.

        ``n`` counts rows, not examples: ``fisher="expected"`` keeps ``K``
        weighted pseudo-gradients per example, and costs and memory scale with
        them.

        ``limit`` is ``(memory_budget, available bytes)``; a form fits when it
        needs no more than the larger of the two.
        """
        damping, dense, kernel = self._nominal_damping(), _dense_bytes(p), _kernel_bytes(n, p)
        dense_fits = budget.fits(dense, limit)
        kernel_fits = damping > 0 and budget.fits(kernel, limit)
        if self.solver == "cholesky" and dense_fits:
            return "cholesky"
        if self.solver == "woodbury" and kernel_fits:
            return "woodbury"
        if self.solver == "auto":
            if kernel_fits and n * (n + p) < p * p:
                return "woodbury"
            if dense_fits:
                return "cholesky"
            if kernel_fits:
                return "woodbury"
        raise self._memory_error(n, p, limit)

    def _memory_error(self, n: int, p: int, limit: tuple[int, int]) -> ValueError:
        dense = (
            f"solver='cholesky' needs 16 * p^2 = {budget.gib(_dense_bytes(p))} for the float64 "
            f"{p} x {p} Fisher and its Cholesky factor (p = n_features = {p})"
        )
        kernel = (
            f"solver='woodbury' needs 8 * n * p + 16 * n^2 = {budget.gib(_kernel_bytes(n, p))} "
            f"for {n} kept float64 gradients and the {n} x {n} kernel factor"
        )
        if self.solver == "cholesky":
            what, advice = dense, "Use solver='woodbury' with damping > 0 when n_samples < p, "
        elif self.solver == "woodbury":
            what, advice = kernel, "Use solver='cholesky' when n_samples is large, "
        elif self._nominal_damping() > 0:
            what, advice = f"{dense}, and {kernel}", ""
        else:
            what = dense
            advice = "Use damping > 0 (which allows solver='woodbury' when n_samples < p), "
        advice += (
            "fewer parameters (params=[...]), or raise config.memory_budget."
            if getattr(self, "_from_model", False)
            # Array mode: the features are the user's; params= means nothing here.
            else "fewer features (e.g. a RandomProjector first), or raise config.memory_budget."
        )
        return budget.memory_error("ExplicitIFVP", what, limit, self._device, advice)

    def _singular_error(self, detail: str, scale: float) -> ValueError:
        used = getattr(self, "damping_", self._nominal_damping())
        hint = 0.1 * scale if scale > 0 else 1e-3
        shown = f"'auto' = {used:.3g}" if self.damping == "auto" else repr(self.damping)
        return ValueError(
            f"The damped Fisher matrix F + damping * I of ExplicitIFVP (damping="
            f"{shown}, n_samples={self.n_samples_}, n_features={self.n_features_in_},"
            f" solver={self.solver_!r}) is singular to float64 precision: {detail}. Use "
            f"{'damping > 0' if used == 0.0 else 'a larger damping'}: damping='auto' (0.1 "
            "times the mean diagonal of F), the training weight decay, or e.g. "
            f"damping={hint:.3g} ({'what auto gives here' if scale > 0 else 'F is zero'})."
        )

    def _cholesky(self, A: torch.Tensor, scale: float) -> torch.Tensor:
        """Lower Cholesky factor of ``A``, or the singular-matrix error."""
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) > 0:
            detail = f"its Cholesky factorisation broke down at pivot {int(info)} of {len(A)}"
            raise self._singular_error(detail, scale)
        # Pivots this small are rounding noise of an exactly singular matrix.
        smallest = float(L.diagonal().min())
        floor = len(A) * _EPS64 * float(A.diagonal().max())
        if smallest**2 <= floor:
            detail = (
                f"the smallest squared pivot of its Cholesky factor, {smallest**2:.3g}, is at "
                f"rounding level (size * eps * max diagonal = {floor:.3g})"
            )
            raise self._singular_error(detail, scale)
        return L

    def _factorise_dense(self, F: torch.Tensor, n: int, rows: int) -> None:
        # n examples (F averages over them), rows gradients (F's rank is at most rows).
        p = F.shape[0]
        F.div_(n)
        scale = float(F.diagonal().mean())
        damping = self._set_damping(scale)
        floor = p * _EPS64 * float(F.diagonal().max())
        if rows < p and damping <= floor:
            what = "n" if rows == n else "n K (the pseudo-gradients)"
            detail = f"F = G^T G / n has rank at most {what} = {rows} < p = {p}"
            if damping > 0:
                detail += f" and damping is at its rounding level ({floor:.3g})"
            raise self._singular_error(detail, scale)
        F.diagonal().add_(damping)
        with progress.stage(f"ExplicitIFVP: Cholesky of the {p} x {p} Fisher", self._show):
            self.cholesky_ = self._cholesky(F, scale)
        self.gradients_ = None

    def _factorise_kernel(self, G: torch.Tensor, n: int) -> None:
        # G: (rows, p), rows = n examples, or n K pseudo-gradients; F = G^T G / n.
        rows, p = G.shape
        K = G @ G.T
        scale = float(K.diagonal().sum()) / (n * p)  # = mean diagonal of F
        damping = self._set_damping(scale)
        # The kernel stays well conditioned however small the damping, but with
        # rows < p the matrix F + damping I is singular to float64 precision once
        # damping is at F's rounding level: refuse it as the dense form does.
        floor = p * _EPS64 * float(G.square().sum(0).max()) / n
        if rows < p and damping <= floor:
            detail = (
                f"F has rank at most {'n' if rows == n else 'n K (the pseudo-gradients)'} = "
                f"{rows} < p = {p} and damping is at its rounding level "
                f"(p * eps * max diagonal of F = {floor:.3g})"
            )
            raise self._singular_error(detail, scale)
        K.diagonal().add_(n * damping)
        with progress.stage(f"ExplicitIFVP: Cholesky of the {rows} x {rows} kernel", self._show):
            self.cholesky_ = self._cholesky(K, scale)
        self.gradients_ = G

    # ------------------------------------------------------------------ transform
    def _transform(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(_F64)
        L = self.cholesky_
        if self.solver_ == "cholesky":
            # V A^{-1} = V L^{-T} L^{-1}: two triangular solves from the right.
            Y = torch.linalg.solve_triangular(L.mT, V, upper=True, left=False)
            return torch.linalg.solve_triangular(L, Y, upper=False, left=False).contiguous()
        G = self.gradients_
        # (1/d) (V - (V G^T) K^{-1} G), K = n d I + G G^T symmetric.
        W = torch.cholesky_solve((V @ G.T).T, L).T
        return (V - W @ G) / self.damping_

    def inverse_transform(self, vectors):
        """Multiply by the damped Fisher: ``V (F + damping I)``, the FVP.

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
        return self._apply(vectors, self._fvp, same_layout=True)

    def _fvp(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(_F64)
        if self.solver_ == "cholesky":
            # F + d I = L L^T, so no second p x p matrix is kept.
            L = self.cholesky_
            return (V @ L) @ L.mT
        G = self.gradients_
        return self.damping_ * V + (V @ G.T) @ G / self.n_samples_
