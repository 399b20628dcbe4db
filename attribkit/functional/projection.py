"""The seed's projection functions, over attribkit's projectors.

* ``random_project`` -> :class:`attribkit.RandomProjector` (array mode), one
  fitted projector per ``ensemble_id``;
* ``arnoldi_project`` -> the Lanczos core of :class:`attribkit.ArnoldiProjector`,
  run on the Hessian-vector products of the user's ``func`` at ``x``.

Names, parameter order, kinds and defaults are those of dattri 0.1.0's
``dattri.func.projection``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
import torch

from .._compute import validation as V
from .._compute.curvature import HVP_MODES
from .._compute.precision import float_dtype
from ..projection.arnoldi import ArnoldiProjector
from ..projection.random import RandomProjector
from ._common import config

__all__ = ["random_project", "arnoldi_project"]

_MASK64 = (1 << 64) - 1


def ensemble_seed(proj_seed: int, ensemble_id: int) -> int:
    """The RandomProjector seed of ensemble member ``ensemble_id``.

    Member 0 uses ``proj_seed`` itself (so ``random_project(...)(X)`` is
    ``RandomProjector(seed=proj_seed).transform(X)``); every other member a
    64-bit seed that numpy's ``SeedSequence`` derives from
    ``(proj_seed, ensemble_id)``, so members are independent of each other
    (and of other ``proj_seed`` values, up to 64-bit hash collisions), and
    reproducible.
    """
    if ensemble_id == 0:
        return int(proj_seed)
    seq = np.random.SeedSequence(int(proj_seed) & _MASK64, spawn_key=(int(ensemble_id) & _MASK64,))
    words = seq.generate_state(2, np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def _feature_layout(feature, feature_batch_size: int, func: str) -> OrderedDict:
    """``name -> entries per example`` of the feature (one ``None`` key for a tensor)."""
    if isinstance(feature, Mapping):
        items = list(feature.items())
        if not items:
            raise ValueError(f"The 'feature' of {func} is an empty dict.")
    elif isinstance(feature, torch.Tensor):
        items = [(None, feature)]
    else:
        raise TypeError(
            f"The 'feature' parameter of {func} must be a torch.Tensor of shape "
            "(feature_batch_size, feature_dim) or a dict name -> tensor shaped like "
            f"model.named_parameters(). Got {type(feature).__name__} instead."
        )
    layout = OrderedDict()
    for key, value in items:
        where = "feature" if key is None else f"feature[{key!r}]"
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{where} of {func} must be a torch.Tensor. Got {type(value).__name__}."
            )
        shape = tuple(value.shape)
        one_vector = value.ndim == 1 and feature_batch_size == 1 and key is None
        if not one_vector and (value.ndim == 0 or shape[0] != feature_batch_size):
            # dattri 0.1.0 divides numel by feature_batch_size whatever the shape, so a
            # (4, 10) tensor with feature_batch_size=5 silently became 5 examples of 8.
            what = "The 'feature' parameter" if key is None else f"The value {where}"
            raise ValueError(
                f"{what} of {func} must have shape (feature_batch_size, ...) = "
                f"({feature_batch_size}, ...): its first dimension holds the "
                f"feature_batch_size={feature_batch_size} examples. Got shape {shape} instead."
            )
        if value.numel() == 0:
            raise ValueError(f"{where} of {func} has no entries (shape {shape}).")
        layout[key] = value.numel() // feature_batch_size
    return layout


def _flatten_feature(feature, layout: OrderedDict, func: str) -> tuple[torch.Tensor, bool]:
    """``(m, feature_dim)`` rows of ``feature`` in the layout's order; and whether it was 1-D."""
    p = sum(layout.values())
    if None in layout:
        if not isinstance(feature, torch.Tensor):
            raise TypeError(
                f"{func}'s projection was built for a tensor feature; got "
                f"{type(feature).__name__}."
            )
        if feature.ndim == 1 and feature.numel() == p:
            return feature.reshape(1, p), True
        if feature.ndim >= 2 and feature[0].numel() == p:
            return feature.reshape(feature.shape[0], p), False
        raise ValueError(
            f"The feature passed to {func}'s projection must have shape (m, {p}) (m examples "
            f"of feature_dim={p}). Got shape {tuple(feature.shape)} instead."
        )
    if not isinstance(feature, Mapping) or set(feature) != set(layout):
        got = list(feature) if isinstance(feature, Mapping) else type(feature).__name__
        raise ValueError(
            f"The feature passed to {func}'s projection must be a dict with the keys it was "
            f"built with ({list(layout)}). Got {got}."
        )
    m = None
    blocks = []
    for key, size in layout.items():
        value = feature[key]
        rows = value.shape[0] if value.ndim else 0
        if m is None:
            m = rows
        if rows != m or rows == 0 or value.numel() != rows * size:
            raise ValueError(
                f"feature[{key!r}] passed to {func}'s projection must hold m={m} examples of "
                f"{size} entries each. Got shape {tuple(value.shape)} instead."
            )
        blocks.append(value.reshape(m, size))
    return torch.cat(blocks, dim=1), False


def random_project(
    feature: dict[str, torch.Tensor] | torch.Tensor,
    feature_batch_size: int,
    proj_dim: int,
    proj_max_batch_size: int,
    device: str,
    proj_seed: int = 0,
    *,
    use_half_precision: bool = True,
) -> Callable:
    """Randomly projects the features to a smaller dimension.

    Builds a Johnson-Lindenstrauss projection for features shaped like
    ``feature`` and returns the function that applies it: each member of
    the ensemble is an :class:`attribkit.RandomProjector` (Rademacher
    ``±1/sqrt(proj_dim)`` entries, so squared norms are preserved in
    expectation) fitted to the feature's layout.

    Parameters
    ----------
    feature : torch.Tensor or dict of str to torch.Tensor
        An example of the features to project: a tensor of shape
        ``(feature_batch_size, feature_dim)``, or, typically for gradients of
        a ``torch.nn.Module``, a dict shaped like ``model.named_parameters()``
        whose values hold ``feature_batch_size`` examples each (e.g.
        ``(feature_batch_size, numel)`` or ``(feature_batch_size, *shape)``).
        Only its layout is used: ``feature_dim`` is the sum over keys of
        ``numel // feature_batch_size``. The first dimension of the tensor
        (of every value of the dict) must be ``feature_batch_size``
        (``ValueError`` otherwise; dattri 0.1.0 divides ``numel`` by
        ``feature_batch_size`` whatever the shape); a 1-D tensor with
        ``feature_batch_size=1`` is one example.
    feature_batch_size : int
        The number of examples in each tensor of ``feature``.
    proj_dim : int
        Dimension of the projected feature.
    proj_max_batch_size : int
        Rows per call of the fast_jl CUDA kernel when it is used (a multiple
        of 8: at most 32 for A100 GPUs, 16 for V100, 40 for H100).
    device : str
        ``"cuda"`` (or ``"cuda:N"``) or ``"cpu"``.
    proj_seed : int, default=0
        Seed of the projection matrix.
    use_half_precision : bool, default=True
        Compute and store in ``torch.float16`` (else ``torch.float32``).
        On CUDA the projection runs in float16 with float32 accumulation.
        On the CPU, which has no fast float16 matrix product, the inputs are
        rounded to float16, the product is computed in float32 and the
        result is rounded to float16: outputs are float16 as documented, at
        float32 speed. Features beyond float16's range (65504) raise a
        ``ValueError`` suggesting a wider dtype: pass
        ``use_half_precision=False``.

    Returns
    -------
    callable
        ``project(feature, ensemble_id=0)``: ``feature`` a tensor
        ``(m, feature_dim)`` (or a 1-D ``(feature_dim,)``) or a dict with the
        same keys holding ``m`` examples each; returns the
        ``(m, proj_dim)`` projection (``(proj_dim,)`` for 1-D input) on
        ``device``. Each ``ensemble_id`` (an int) is an independent
        projection, the same on every call: id 0 uses ``proj_seed``, the
        others seeds derived from ``(proj_seed, ensemble_id)``.

    Notes
    -----
    **Where this differs from the reference.** dattri 0.1.0 uses a normal
    matrix on the CPU and fast_jl's Rademacher matrix on CUDA (failing when
    fast_jl is missing), and its ensemble seeds
    ``proj_seed + 100000 * ensemble_id`` collide across seeds (seed 100000 of
    member 0 is seed 0 of member 1). Here the matrix is RandomProjector's:
    the same on CPU and CUDA for any batch size, dict input equal to its
    flattened input; on CUDA with fast_jl installed (and ``proj_dim`` a
    multiple of 512, ``proj_max_batch_size`` of 8) fast_jl's kernel and
    matrix are used instead, as RandomProjector's ``backend="auto"`` does.
    The matrix of the latest ``ensemble_id`` used is cached while it fits
    the default memory budget (2 GiB).

    Examples
    --------
    >>> import torch
    >>> from attribkit.functional import random_project
    >>> model = torch.nn.Linear(20, 4)
    >>> grads = {k: torch.randn(8, p.numel()) for k, p in model.named_parameters()}
    >>> project = random_project(grads, 8, 16, 32, "cpu", use_half_precision=False)
    >>> project(grads).shape
    torch.Size([8, 16])
    >>> torch.equal(project(grads, ensemble_id=1), project(grads, ensemble_id=1))
    True
    >>> torch.equal(project(grads, ensemble_id=1), project(grads))
    False
    """
    name = "random_project"
    fbs = V.check_int(name, "feature_batch_size", feature_batch_size, minimum=1)
    proj_dim = V.check_int(name, "proj_dim", proj_dim, minimum=1)
    max_batch = V.check_int(name, "proj_max_batch_size", proj_max_batch_size, minimum=1)
    proj_seed = V.check_int(name, "proj_seed", proj_seed)
    if not isinstance(use_half_precision, (bool, np.bool_)):
        raise V.param_error(name, "use_half_precision", "a bool", use_half_precision)
    layout = _feature_layout(feature, fbs, name)
    p = sum(layout.values())
    cfg = config(device, torch.float16 if use_half_precision else torch.float32)
    # A stride-0 row: the layout without copying (or even reading) the user's feature.
    template = torch.zeros((), device=cfg.torch_device).expand(1, p)
    members: dict[int, RandomProjector] = {}

    def _member(ensemble_id: int) -> RandomProjector:
        if ensemble_id not in members:
            members.clear()  # keep one (possibly cached) matrix, as the reference does
            members[ensemble_id] = RandomProjector(
                proj_dim=proj_dim,
                seed=ensemble_seed(proj_seed, ensemble_id),
                max_batch_size=max_batch,
                config=cfg,
            ).fit(template)
        return members[ensemble_id]

    def _random_project_func(feature, ensemble_id: int = 0) -> torch.Tensor:
        """The ``(m, proj_dim)`` projection of ``feature`` by member ``ensemble_id``."""
        ensemble_id = V.check_int(name, "ensemble_id", ensemble_id)
        flat, one = _flatten_feature(feature, layout, name)
        out = _member(ensemble_id).transform(flat.detach())
        return out[0] if one else out

    return _random_project_func


# ---------------------------------------------------------------------- Arnoldi
class _FunctionModel(torch.nn.Module):
    """``func`` at ``x`` as a model whose only parameter is ``x``.

    Its "per-example loss" on any batch is ``func(x)`` for every example, so
    the mean loss over one example is ``func(x)`` itself and ArnoldiProjector's
    model mode takes the Hessian of ``func`` in ``x``, with its own
    Hessian-vector products (``mode``) and Lanczos core.
    """

    def __init__(self, func: Callable, x: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "func", func)  # never registered as a submodule
        self.x = torch.nn.Parameter(x.detach().clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        value = self.func(self.x)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"arnoldi_project: func must return a single-element tensor. Got {got}."
            )
        return value.reshape(1).expand(inputs.shape[0])


def _value_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs


def _flatten_any(feature, p: int, func: str) -> torch.Tensor:
    """``(m, p)`` rows of a tensor or of a dict's values concatenated in the dict's order."""
    if isinstance(feature, Mapping):
        values = list(feature.values())
        if not values or not all(isinstance(v, torch.Tensor) and v.ndim for v in values):
            raise TypeError(f"The feature passed to {func}'s projection must hold tensors.")
        m = values[0].shape[0]
        if any(v.shape[0] != m for v in values):
            raise ValueError(
                f"The values of the feature dict passed to {func}'s projection must all hold "
                f"m={m} examples. Got shapes {[tuple(v.shape) for v in values]}."
            )
        flat = torch.cat([v.reshape(m, -1) for v in values], dim=1)
    elif isinstance(feature, torch.Tensor):
        flat = (
            feature.reshape(1, -1) if feature.ndim == 1 else feature.reshape(feature.shape[0], -1)
        )
    else:
        raise TypeError(
            f"The feature passed to {func}'s projection must be a tensor or a dict of tensors. "
            f"Got {type(feature).__name__}."
        )
    if flat.shape[1] != p:
        raise ValueError(
            f"The feature passed to {func}'s projection must have feature_dim={p} entries per "
            f"example. Got {flat.shape[1]}."
        )
    return flat


def arnoldi_project(
    feature_dim: int,
    func: Callable,
    x: list,
    argnums: int = 0,
    proj_dim: int = 100,
    max_iter: int = 100,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    seed: int = 0,
    device: torch.device = "cpu",
) -> Callable:
    """Apply the Arnoldi algorithm to approximate inverse-Hessian-vector products.

    Finds the top-``proj_dim`` eigenpairs ``(λ_j, u_j)`` (by magnitude) of
    the Hessian of ``func`` at ``x`` plus ``regularization * I`` from
    Hessian-vector products, and returns the function that applies the
    inverse restricted to them, ``v -> Σ_j (v·u_j / λ_j) u_j``
    (Schioppa et al., 2022). The work is :class:`attribkit.ArnoldiProjector`'s:
    its Lanczos iteration with full re-orthogonalisation (Arnoldi's iteration
    for a symmetric matrix) run on the Hessian-vector products of ``func``
    (``func`` at ``x`` is handed to it as a model whose only parameter is
    ``x``), and its ``ihvp``.

    Parameters
    ----------
    feature_dim : int
        Dimension of the features to project: the number of entries of ``x``
        (typically the number of model parameters).
    func : callable
        ``func(x)`` returns a single-element tensor; the Hessian is taken of
        it. It must be a pure tensor function (``torch.func`` transforms it).
    x : torch.Tensor
        The single argument passed to ``func`` (as in the reference), a
        floating tensor of ``feature_dim`` entries.
    argnums : int, default=0
        Which argument of ``func`` to take the Hessian in; ``func`` takes the
        single argument ``x``, so only 0 is valid.
    proj_dim : int, default=100
        The number ``k`` of top eigenvalues to keep. When fewer are found
        (``feature_dim`` or ``max_iter`` smaller, an invariant Krylov space)
        the ones found are kept, with a warning.
    max_iter : int, default=100
        Maximum number of Arnoldi iterations. As in the reference the count
        includes the start vector: ``max_iter - 1`` Hessian-vector products
        (at least 1, at most ``feature_dim``).
    norm_constant : float, default=1.0
        The norm of each stored eigenvector; the result is scaled by
        ``norm_constant**2`` as in the reference. ``norm_constant > 1``
        keeps the entries of the vectors of a large model away from tiny
        values; 1 gives the exact restricted inverse.
    tol : float, default=1e-7
        Early stop when the new basis vector's norm is at most ``tol``
        (an invariant Krylov subspace). Here relative to the largest
        ``‖H q_j‖`` seen, so independent of the scale of ``func``; the
        reference's is absolute.
    mode : {"rev-fwd", "rev-rev"}, default="rev-fwd"
        Hessian-vector products as forward-over-reverse (``jvp`` of
        ``grad``: cheaper) or reverse-over-reverse (``vjp``: for operators
        without forward-mode rules).
    regularization : float, default=0.0
        ``regularization * v`` is added to each Hessian-vector product,
        i.e. every eigenvalue is shifted by ``regularization``.
    seed : int, default=0
        Seed of the start vector (standard normal from a private generator:
        torch's global generator is left alone, unlike the reference's
        ``torch.manual_seed``).
    device : str or torch.device, default="cpu"
        ``"cuda"`` or ``"cpu"``: where ``x``, the products and the basis
        live.

    Returns
    -------
    callable
        ``project(feature)``: ``feature`` a ``(m, feature_dim)`` tensor (or
        ``(feature_dim,)``), or a dict of tensors shaped like
        ``model.named_parameters()`` with ``m`` rows each (concatenated in
        the dict's order); returns ``((feature @ U.T) / λ) @ U`` of shape
        ``(m, feature_dim)``, ``U`` the ``(k, feature_dim)`` eigenvectors,
        over all kept eigenpairs, negative ones included.

    Notes
    -----
    **Where this differs from the reference.** dattri 0.1.0 runs Arnoldi
    with a single Gram-Schmidt sweep, which loses orthogonality (and finds
    ghost copies of converged eigenvalues) over many iterations, from a
    uniform start vector after reseeding torch's global generator; here the
    basis is re-orthogonalised twice per step against all vectors and the
    start vector has its own generator. The eigenpairs are computed when
    ``arnoldi_project`` is called, not at the first projection.

    **Non-finite values.** ``func(x)`` is evaluated once first: NaN or
    infinity raises ``ValueError`` saying so (the reference goes on, and a
    NaN whose derivatives vanish looked like a zero curvature). A
    Hessian-vector product that is not finite raises ``ValueError`` naming
    the iteration.

    Examples
    --------
    >>> import torch
    >>> from attribkit.functional import arnoldi_project
    >>> x = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    >>> project = arnoldi_project(6, lambda x: (x**4).sum(), x, proj_dim=6)
    >>> v = torch.randn(3, 6, dtype=torch.float64)
    >>> torch.allclose(project(v), v / (12 * x**2))  # the Hessian is diag(12 x^2)
    True
    """
    name = "arnoldi_project"
    feature_dim = V.check_int(name, "feature_dim", feature_dim, minimum=1)
    V.check_callable(name, "func", func)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"The 'x' parameter of {name} is the single argument of func, a floating-point "
            f"torch.Tensor. Got {type(x).__name__} instead."
        )
    if x.numel() != feature_dim:
        raise ValueError(
            f"The 'feature_dim' parameter of {name} must equal the number of entries of x, "
            f"{x.numel()}. Got {feature_dim} instead."
        )
    if not V.is_int(argnums) or argnums != 0:
        raise V.param_error(name, "argnums", "0 (func takes the single argument x)", argnums)
    proj_dim = V.check_int(name, "proj_dim", proj_dim, minimum=1)
    max_iter = V.check_int(name, "max_iter", max_iter, minimum=1)
    V.check_float(name, "norm_constant", norm_constant, minimum=0.0, strict=True)
    tol = V.check_float(name, "tol", tol, minimum=0.0)
    if mode not in HVP_MODES:
        raise V.param_error(name, "mode", " or ".join(repr(m) for m in HVP_MODES), mode)
    regularization = V.check_damping(name, regularization, name="regularization", auto=False)
    seed = V.check_int(name, "seed", seed)
    cfg = config(device, float_dtype(x.dtype))
    model = _FunctionModel(func, x.to(cfg.torch_device))
    with torch.no_grad():
        value = model(torch.zeros(1, device=cfg.torch_device))
    if not bool(torch.isfinite(value).all()):
        # x is fixed, so every Hessian-vector product would see this value.
        raise ValueError(
            f"{name}: func(x) returned {float(value[0])} (checked before the first "
            "Hessian-vector product): the Hessian of a NaN or infinite value is undefined. "
            "Check func and x."
        )
    one = torch.zeros(1, 1, dtype=model.x.dtype, device=cfg.torch_device)
    est = ArnoldiProjector(
        proj_dim=proj_dim,
        max_iter=max(1, max_iter - 1),
        damping=regularization,
        tol=tol,
        norm_constant=float(norm_constant),
        mode=mode,
        seed=seed,
        loss=_value_loss,
        params=["x"],
        config=cfg,
    )
    with warnings.catch_warnings():
        # ihvp keeps negative eigenvalues (only transform drops them): not news here.
        warnings.filterwarnings("ignore", message=".*eigenvalues are negative.*")
        est.fit(model, (one, one[:, 0]))

    def _arnoldi_project_func(feature) -> torch.Tensor:
        """``((feature @ U.T) / λ) @ U`` over the kept eigenpairs."""
        flat = _flatten_any(feature, feature_dim, name)
        out = est.ihvp(flat.detach())
        return out[0] if isinstance(feature, torch.Tensor) and feature.ndim == 1 else out

    return _arnoldi_project_func
