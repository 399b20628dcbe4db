"""Johnson-Lindenstrauss random projection of gradient features.

The whole data flow, from ``fit`` to ``transform``:

1. ``fit`` learns only a layout: the selected parameters of a model
   (``params``; data is ignored) or the columns of an array or dict; it
   checks the backend (``fast_jl`` needs CUDA, ``proj_dim % 512 == 0``, ...)
   and sets ``proj_dim_``. No matrix is drawn;
2. after ``fit`` (and after unpickling or ``to``) a
   :class:`~attribkit.projection._generator.Projection` engine is built: it
   holds the seed and the sizes, and generates rows ``[r0, r1)`` of the
   ``(n_features, proj_dim)`` matrix on demand from a counter-based hash
   (every entry a pure function of ``(seed, proj_type, sparsity, i, j)``);
3. ``transform(X)`` (``BaseEstimator`` flattens dicts and casts to
   ``config.dtype``) computes ``X @ R``: with the whole matrix cached when it
   fits ``config.memory_budget``, else from the cached leading rows plus
   blocks regenerated per call; ``"sjlt"`` scatters each feature into its
   ``sparsity`` output coordinates (``index_add_``) without a dense matrix;
   ``backend="fast_jl"`` calls TRAK's CUDA kernel instead;
4. ``per_example_gradients(model, data, projector=rp)`` goes through
   :meth:`RandomProjector.project_gradients`: when the whole matrix is cached
   (or on fast_jl), one batch of per-example gradients at a time through
   ``transform``; when it streams, the gradient rows are gathered up to the
   memory budget and projected together, so each streamed block of the matrix
   is generated once per budget-full of rows instead of once per batch.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import torch
from sklearn.exceptions import DataDimensionalityWarning
from sklearn.utils.validation import check_is_fitted

from .._compute import validation as V
from .._compute.budget import rows_within
from .._compute.gradients import iter_gradients, layout_params
from .._compute.model import param_shapes, select_params
from .._compute.precision import itemsize
from .._compute.vectors import flatten_dict
from ..base import BaseEstimator
from ..config import ComputeConfig
from ._generator import PROJ_TYPES, Projection

__all__ = ["RandomProjector"]

_BACKENDS = ("auto", "torch", "fast_jl")
_FAST_JL_BATCHES = (8, 16, 32)


def _fast_jl_installed() -> bool:
    return importlib.util.find_spec("fast_jl") is not None


class RandomProjector(BaseEstimator):
    """Johnson-Lindenstrauss projection of (gradient) feature vectors.

    Projects vectors of ``n_features`` entries to ``proj_dim`` entries with a
    random matrix ``R`` of shape ``(n_features, proj_dim)``: ``transform(X) =
    X @ R``. Squared norms and inner products are preserved in expectation
    and, with high probability, within ``1 ± eps`` for ``proj_dim`` of order
    ``log(m) / eps**2`` [1]_, which is what TRAK [2]_ relies on to compare
    gradients of millions of parameters.

    Entry ``R[i, j]`` is a pure function of ``(seed, proj_type, sparsity, i,
    j)`` computed by a counter-based hash in plain torch integer ops, so the
    matrix is bit for bit the same on CPU and CUDA, for any batch size, block
    size or input container (a dict input equals its flattened input), and
    the projection to ``proj_dim=k`` is the first ``k`` columns of any larger
    one (dense types). The matrix is never stored in the fitted estimator
    (its pickle is a few hundred bytes whatever the dimensions): it is
    regenerated block by block on each ``transform``, or built once and
    cached in memory when ``n_features * proj_dim`` entries fit
    ``config.memory_budget``. Under ``torch.distributed`` it therefore needs
    no communication: every rank that fits the same layout and seed projects
    with the same matrix.

    Parameters
    ----------
    proj_dim : int, default=512
        Output dimension ``k``.
    proj_type : {"rademacher", "normal", "sjlt"}, default="rademacher"
        ``"rademacher"``: entries ``±1 / sqrt(k)``. ``"normal"``: entries
        ``N(0, 1) / sqrt(k)``, drawn by inverse CDF from 16 random bits (a
        65,536-level discretisation of the normal, rescaled to unit variance)
        so that one 64-bit hash serves four entries. ``"sjlt"``: the sparse JL
        transform [3]_: each input feature goes to ``sparsity`` distinct output
        coordinates (one in each of ``sparsity`` contiguous blocks of the
        output) with random signs, value ``±1 / sqrt(sparsity)``; a
        projection costs ``O(n * n_features * sparsity)`` instead of a dense
        matmul.
    seed : int, default=0
        Seed of the counter-based generator.
    sparsity : int, default=1
        Nonzeros per input feature for ``"sjlt"`` (``1 <= sparsity <=
        proj_dim``); ignored by the dense types.
    backend : {"auto", "torch", "fast_jl"}, default="auto"
        ``"torch"``: the portable implementation above. ``"fast_jl"``: the
        CUDA kernel of the ``fast_jl`` package (TRAK's), which needs a CUDA
        device, ``proj_dim`` a multiple of 512, ``max_batch_size`` a multiple
        of 8 and a dense ``proj_type``; its matrix is fast_jl's own (seeded by
        ``seed``), *not* the torch backend's, and it is scaled by
        ``1/sqrt(proj_dim)`` like the others. ``"auto"``: fast_jl when
        ``config.device`` is CUDA, fast_jl is installed and its constraints
        hold, else torch.
    max_batch_size : int, default=32
        Rows per fast_jl kernel call (8, 16 or 32 rows per call; a multiple
        of 8). Unused by the torch backend.
    params : list of str, optional
        Model mode only: the names of the parameters whose gradients will be
        projected (e.g. the last layer's), which sets the layout learnt by
        ``fit(model)``; default: all trainable parameters. Use the same
        ``params`` for :func:`~attribkit.per_example_gradients`. Ignored in
        array mode, where the layout is the array's.
    config : ComputeConfig, optional
        Device, dtype (``float16``/``bfloat16`` compute in that precision
        with float32 accumulation where the device allows: on the CPU the
        product is computed in float32 and rounded) and the memory budget
        for the cached matrix / blocks.

    Attributes
    ----------
    n_features_in_ : int
        Number of input features ``p``.
    param_shapes_ : OrderedDict
        Layout of the input: the model's trainable parameters (model mode),
        the dict's keys, or a single ``"features"`` entry for a plain array.
    backend_ : str
        The backend that runs ``transform`` (``"torch"`` or ``"fast_jl"``).
    proj_dim_ : int
        The output dimension ``k`` (``proj_dim``), the width of ``transform``'s
        output, as ArnoldiProjector and KroneckerProjector name theirs.
    feature_names_in_ : ndarray of str
        Column names of a DataFrame given to ``fit`` in array mode (only then).

    Notes
    -----
    **Huge gradients.** When the matrix does not fit ``config.memory_budget``
    (``n_features * proj_dim`` entries), every ``transform`` regenerates it
    block by block, which dominates the cost: project many rows per call
    (batch the gradients, e.g. ``per_example_gradients(..., projector=proj)``
    with a large ``config.batch_size``), raise ``memory_budget`` so more of
    the matrix stays cached, or use ``proj_type="sjlt"``, whose cost is
    ``O(n * n_features * sparsity)`` and needs no dense matrix (in a trial at
    5M features: 0.1 s per call instead of 12 s for rademacher). A progress
    bar (``config.progress``) follows the regenerated blocks.

    With ``per_example_gradients(model, data, projector=proj)`` and a matrix
    that streams, the gradient rows are gathered up to ``memory_budget``
    (beside one streamed block; at least one batch) and projected together
    without a cache (:meth:`project_gradients`): each block of the matrix is
    then generated once per budget-full of rows instead of once per batch.

    ``proj_dim`` larger than the number of features does not reduce the
    dimension; ``fit`` then warns (``DataDimensionalityWarning``, as
    scikit-learn's random projections do).

    References
    ----------
    .. [1] W. B. Johnson and J. Lindenstrauss, "Extensions of Lipschitz
       mappings into a Hilbert space", 1984; D. Achlioptas,
       "Database-friendly random projections", PODS 2001.
    .. [2] S. M. Park et al., "TRAK: Attributing Model Behavior at Scale",
       ICML 2023.
    .. [3] D. M. Kane and J. Nelson, "Sparser Johnson-Lindenstrauss
       Transforms", J. ACM 2014.

    Examples
    --------
    >>> import torch, attribkit as ak
    >>> X = torch.randn(10, 1000)
    >>> proj = ak.RandomProjector(proj_dim=256, seed=1).fit(X)
    >>> proj.transform(X).shape
    torch.Size([10, 256])
    >>> model = torch.nn.Linear(20, 5)
    >>> ak.RandomProjector(proj_dim=64).fit(model).n_features_in_
    105
    """

    _same_layout = False
    _transient = ("_engine",)

    def __init__(
        self,
        proj_dim: int = 512,
        proj_type: str = "rademacher",
        seed: int = 0,
        sparsity: int = 1,
        backend: str = "auto",
        max_batch_size: int = 32,
        params: list[str] | None = None,
        config: ComputeConfig | None = None,
    ):
        self.proj_dim = proj_dim
        self.proj_type = proj_type
        self.seed = seed
        self.sparsity = sparsity
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.params = params
        self.config = config

    # ------------------------------------------------------------------ fit
    def _check_params(self) -> None:
        V.check_int(self, "proj_dim", self.proj_dim, minimum=1)
        V.check_option(self, "proj_type", self.proj_type, PROJ_TYPES)
        V.check_int(self, "seed", self.seed)
        V.check_int(self, "sparsity", self.sparsity, minimum=1)
        if self.proj_type == "sjlt" and self.sparsity > self.proj_dim:
            raise V.param_error(
                self, "sparsity", f"an int in [1, proj_dim={self.proj_dim}]", self.sparsity
            )
        V.check_option(self, "backend", self.backend, _BACKENDS)
        V.check_int(self, "max_batch_size", self.max_batch_size, minimum=1)
        V.check_params(self, self.params)

    def _fit_model(self, model, data, config) -> None:
        # Only the layout of the selected parameters matters; data is ignored.
        self._set_layout(param_shapes(select_params(model, self.params, self)))
        self._finish_fit(config)

    def _fit_array(self, G, config) -> None:
        self._finish_fit(config)

    def _finish_fit(self, config) -> None:
        """What a fit sets once the layout is known, in either mode."""
        self._warn_dimensionality()
        self._resolve_backend(config)
        self.proj_dim_ = int(self.proj_dim)

    def _warn_dimensionality(self) -> None:
        if self.proj_dim > self.n_features_in_:
            warnings.warn(
                "The number of components is higher than the number of features: "
                f"n_features < proj_dim ({self.n_features_in_} < {self.proj_dim}). The "
                "dimensionality of the problem will not be reduced.",
                DataDimensionalityWarning,
                stacklevel=5,  # the caller of fit
            )

    def _resolve_backend(self, config: ComputeConfig) -> None:
        device = config.torch_device
        problems = []
        if device.type != "cuda":
            problems.append(f"it needs a CUDA device (config.device is {config.device!r})")
        if not _fast_jl_installed():
            problems.append("the fast_jl package is not installed (pip install attribkit[cuda])")
        if self.proj_type == "sjlt":
            problems.append("it has no 'sjlt' projection")
        if self.proj_dim % 512:
            problems.append(f"proj_dim must be a multiple of 512 (got {self.proj_dim})")
        if self.max_batch_size % 8:
            problems.append(f"max_batch_size must be a multiple of 8 (got {self.max_batch_size})")
        if self.backend == "fast_jl" and problems:
            raise ValueError(
                "The 'fast_jl' backend of RandomProjector cannot run: "
                + "; ".join(problems)
                + ". Use backend='torch' or 'auto'."
            )
        self.backend_ = "fast_jl" if self.backend != "torch" and not problems else "torch"

    # ------------------------------------------------------------ transform
    def _init_transient(self) -> None:
        # The engine holds no matrix until the first transform (then maybe a cache).
        self._engine = Projection(
            int(self.seed),
            self.proj_type,
            int(self.sparsity),
            self.n_features_in_,
            int(self.proj_dim),
            dtype=self._config.torch_dtype,
            device=self._device,
            memory_budget=self._config.memory_budget,
        )

    def _get_engine(self) -> Projection:
        return self._engine

    def _transform(self, X: torch.Tensor) -> torch.Tensor:
        if self.backend_ == "fast_jl":
            return self._fast_jl(X)
        return self._get_engine().project(X, progress=self._config.show_progress)

    def _fast_jl(self, X: torch.Tensor) -> torch.Tensor:
        import fast_jl

        device = X.device
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        # fast_jl kernels come in 8-, 16- and 32-row variants; pad the last chunk.
        rows = max(b for b in _FAST_JL_BATCHES if b <= max(8, min(self.max_batch_size, 32)))
        work = X.to(torch.float16 if X.dtype in (torch.float16, torch.bfloat16) else torch.float32)
        out = torch.empty(X.shape[0], self.proj_dim, device=device, dtype=torch.float32)
        for start in range(0, X.shape[0], rows):
            chunk = work[start : start + rows]
            size = min(b for b in _FAST_JL_BATCHES if b >= min(chunk.shape[0], rows))
            if chunk.shape[0] < size:
                chunk = torch.cat([chunk, chunk.new_zeros(size - chunk.shape[0], chunk.shape[1])])
            fn = getattr(fast_jl, f"project_{self.proj_type}_{size}")
            res = fn(chunk.contiguous(), self.proj_dim, int(self.seed) % 2**32, num_sms)
            out[start : start + rows] = res[: min(rows, X.shape[0] - start)].float()
        return out / math.sqrt(self.proj_dim)

    # ------------------------------------------------------ per-example gradients
    def project_gradients(self, model, data, *, loss="cross_entropy", params=None, config=None):
        """Projected per-example gradients batch by batch, the matrix generated once per pass.

        Overrides :meth:`attribkit.BaseEstimator.project_gradients`. When the
        whole matrix is cached (it fits ``memory_budget``), or on the fast_jl
        backend, each batch goes through :meth:`transform` as in the default.
        When it streams (a dense matrix larger than the budget, or an sjlt
        index larger than half of it), regenerating it for every batch would
        dominate the cost: the flat gradients are instead gathered into one
        buffer of as many rows as fit the budget beside one streamed block
        (at least one batch), and each buffer-full is projected in one pass
        over the matrix blocks, with no cache, so that the buffer and the
        block together stay within ``memory_budget``. The rows are the same
        as the default's to the dtype's rounding, still yielded batch by
        batch (in the estimator's ``config.dtype``, on its device).

        Parameters
        ----------
        model : torch.nn.Module
            The model the gradients are taken of (checked against the
            fitted layout before anything runs).
        data : DataLoader, Dataset, tuple (inputs, targets), mapping or iterable of batches
            The examples.
        loss : {"cross_entropy", "mse", "causal_lm"} or callable, default="cross_entropy"
            The per-example loss, as in :func:`~attribkit.per_example_gradients`.
        params : list of str, optional
            Parameters to differentiate; must name the fitted ones (any
            order) when the projector was fitted on the model.
        config : ComputeConfig, optional
            ``batch_size``, progress and ``distributed`` of the gradient
            pass; default the estimator's own. The buffer follows the
            estimator's own ``memory_budget``.

        Returns
        -------
        batches : iterator of torch.Tensor
            ``(b, proj_dim_)`` rows per batch of ``data``.
        k : int
            ``proj_dim_``.

        Examples
        --------
        >>> import torch, attribkit as ak
        >>> model = torch.nn.Linear(30, 4)
        >>> small = ak.ComputeConfig(memory_budget=4096)  # the matrix streams
        >>> proj = ak.RandomProjector(proj_dim=16, config=small).fit(model)
        >>> X, y = torch.randn(10, 30), torch.randint(0, 4, (10,))
        >>> batches, k = proj.project_gradients(model, [(X[:5], y[:5]), (X[5:], y[5:])])
        >>> k, [tuple(b.shape) for b in batches]
        (16, [(5, 16), (5, 16)])
        """
        check_is_fitted(self)
        engine = self._get_engine()
        if self.backend_ == "fast_jl" or not engine.streams():
            return super().project_gradients(model, data, loss=loss, params=params, config=config)
        config = V.check_config(self, self._config if config is None else config)
        names, _ = layout_params(model, self, params)
        dtype = self._config.torch_dtype
        room = max(0, self._config.memory_budget - engine.block_bytes())
        capacity = rows_within(room, self.n_features_in_ * itemsize(dtype))

        def batches():
            buffer, parts = None, []  # parts: rows of each gathered batch
            for grads in iter_gradients(model, data, loss=loss, params=names, config=config):
                flat = flatten_dict(grads, names or grads).to(device=self._device, dtype=dtype)
                b = flat.shape[0]
                if parts and sum(parts) + b > capacity:
                    yield from self._project_gathered(buffer, parts)
                    parts = []
                if b > capacity:  # one batch larger than the budget: on its own
                    yield self._project_rows(flat)
                    continue
                if buffer is None:
                    buffer = flat.new_empty(capacity, flat.shape[1])
                start = sum(parts)
                buffer[start : start + b].copy_(flat)
                parts.append(b)
            if parts:
                yield from self._project_gathered(buffer, parts)

        return batches(), int(self.proj_dim_)

    def _project_rows(self, X: torch.Tensor) -> torch.Tensor:
        return self._get_engine().project(X, progress=self._config.show_progress, cache=False)

    def _project_gathered(self, buffer: torch.Tensor, parts: list[int]):
        """The gathered rows projected in one pass, yielded as the batches they came in."""
        Y = self._project_rows(buffer[: sum(parts)])
        start = 0
        for b in parts:
            yield Y[start : start + b]
            start += b
