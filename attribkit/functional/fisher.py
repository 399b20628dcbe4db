"""The seed's inverse-Fisher-vector-product functions, over attribkit's estimators.

Each function takes dattri 0.1.0's arguments (a loss function ``func`` and its
arguments ``x``), computes the gradients the seed says with ``torch.func``,
and hands them to an estimator that does the algebra:

* ``ifvp_explicit`` / ``ifvp_at_x_explicit`` -> :class:`attribkit.ExplicitIFVP`
  (array mode, one gradient row);
* ``ifvp_datainf`` / ``ifvp_at_x_datainf`` -> :class:`attribkit.DataInfIFVP`
  (array mode, one dict key per layer);
* ``ifvp_at_x_ekfac`` -> the two passes and statistics of :class:`attribkit.EKFACIFVP`,
  fed with the ``(input, output-gradient)`` pairs that the user's
  :class:`MLPCache` records.

Names, parameter order, kinds and defaults are those of dattri 0.1.0's
``dattri.func.fisher``; where the reference's documented behaviour is
mathematically wrong the functions do the correct thing, and their docstrings
say where and why.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import wraps

import torch

from .._compute import validation as V
from .._compute.precision import float_dtype
from ..ifvp.datainf import DataInfIFVP
from ..ifvp.ekfac import EKFACStatistics, check_lambda, ekfac_apply, fit_statistics
from ..ifvp.explicit import ExplicitIFVP
from ._common import config, leaves

__all__ = [
    "ifvp_explicit",
    "ifvp_at_x_explicit",
    "ifvp_datainf",
    "ifvp_at_x_datainf",
    "ifvp_at_x_ekfac",
    "IFVPUsageError",
    "MLPCache",
    "manual_cache_forward",
    "EKFAC_CACHE_KEY",
]


class IFVPUsageError(ValueError):
    """Misuse of the IFVP functions (dattri 0.1.0's ``IFVPUsageError``).

    Raised, as in the seed, when a DataInf ``regularization`` list does not
    have one entry per layer, and for the other inconsistent inputs the
    functions detect (a ``param_layer_map`` that does not match the
    parameters, ``in_dims`` that do not match ``*x``, mismatched batch sizes,
    an :class:`MLPCache` holding something other than tensors). It subclasses
    ``ValueError`` (dattri 0.1.0's subclasses ``Exception``), so code catching
    either keeps working.

    Examples
    --------
    >>> import torch
    >>> from attribkit.functional import IFVPUsageError, ifvp_datainf
    >>> def loss(inputs, params, label):  # one example
    ...     w, b = params
    ...     return torch.nn.functional.cross_entropy(inputs @ w.T + b, label)

    Three regularization entries for one layer (``w`` and ``b``):

    >>> try:  # doctest: +NORMALIZE_WHITESPACE
    ...     ifvp_datainf(loss, 1, (0, None, 0), regularization=[0.1, 0.2, 0.3],
    ...                  param_layer_map=[0, 0])
    ... except IFVPUsageError as err:
    ...     print(err)
    The length of 'regularization' of ifvp_datainf should be the same as the
    number of layers (1, or of parameter tensors, 2). Got 3 entries.
    """


# ---------------------------------------------------------------------- explicit
def _gradient_row(g_tree, func_name: str) -> torch.Tensor:
    """The gradient pytree as one detached ``(1, p)`` row (leaves concatenated)."""
    parts = leaves(g_tree, func_name, "the gradient of func")
    g = torch.cat([t.detach().reshape(-1) for t in parts])
    return g.reshape(1, -1)


def _fit_explicit(g_tree, regularization: float, func_name: str) -> ExplicitIFVP:
    g = _gradient_row(g_tree, func_name)
    p = g.shape[1]
    if regularization == 0.0 and p > 1:
        raise ValueError(
            f"The Fisher matrix g gᵀ of {func_name} has rank 1 but {p} rows (p = the number "
            "of entries of the gradient), so it is singular without regularization. Pass "
            f"regularization > 0. Got regularization={regularization!r}."
        )
    cfg = config(g.device, float_dtype(g.dtype))
    return ExplicitIFVP(damping=regularization, config=cfg).fit(g)


def _apply_flat(est, v, func_name: str) -> torch.Tensor:
    """``est.transform`` of one vector ``(p,)`` or of ``m`` vectors ``(m, p)``."""
    v = torch.as_tensor(v)
    p = est.n_features_in_
    if v.ndim == 1 and v.shape[0] == p:
        return est.transform(v.reshape(1, p)).reshape(p).to(v.device)
    if v.ndim == 2 and v.shape[1] == p:
        return est.transform(v).to(v.device)
    raise ValueError(
        f"The vector 'v' of {func_name} must have shape ({p},) or (m, {p}), the length of "
        f"the flattened gradient. Got shape {tuple(v.shape)} instead."
    )


def _check_argnums(func_name: str, argnums, allow_tuple: bool) -> None:
    ok = V.is_int(argnums) and argnums >= 0
    if allow_tuple and isinstance(argnums, tuple):
        ok = bool(argnums) and all(V.is_int(a) and a >= 0 for a in argnums)
    if not ok:
        expected = "an int >= 0" + (" or a non-empty tuple of them" if allow_tuple else "")
        raise V.param_error(func_name, "argnums", expected, argnums)


def ifvp_explicit(
    func: Callable,
    argnums: int = 0,
    regularization: float = 0.0,
) -> Callable:
    """IFVP via explicit FIM calculation.

    IFVP stands for inverse-FIM-vector product. Returns a function
    ``ifvp(x, v)`` that takes the gradient ``g`` of ``func(*x)`` with respect
    to its argument ``argnums``, forms the Fisher information matrix
    ``F = g gᵀ`` and returns ``(F + regularization * I)⁻¹ v`` for each row
    of ``v``, through :class:`attribkit.ExplicitIFVP` fitted on the single
    gradient row ``g`` (exact, float64 inside).

    Parameters
    ----------
    func : callable
        A function of one or more arguments returning a single-element
        tensor (the loss). It should be a negative log-likelihood (e.g.
        cross-entropy) for classification: the empirical FIM uses the
        ground-truth labels in the loss, the true FIM the model's predicted
        labels.
    argnums : int, default=0
        The argument of ``func`` the FIM is taken with respect to. It may be
        a tensor or a tuple/list/dict of tensors; the gradient is then
        flattened and concatenated in that order.
    regularization : float, default=0.0
        ``regularization * I`` is added to the FIM. ``g gᵀ`` has rank 1, so a
        gradient of more than one entry needs ``regularization > 0``
        (``ValueError`` otherwise, raised when the returned function runs).

    Returns
    -------
    callable
        ``ifvp(x, v)``: ``x`` is the tuple of arguments of ``func``; ``v`` is
        one vector ``(p,)`` or a batch ``(m, p)``, ``p`` the length of the
        flattened gradient. Returns ``(F + regularization * I)⁻¹ v`` row by
        row, of ``v``'s shape, on ``v``'s device, in the gradient's dtype.

    Notes
    -----
    **Where this differs from the reference.** dattri 0.1.0's implementation
    computes ``grad @ grad.T`` of the 1-D gradient, which is
    the scalar ``‖g‖²``, and so returns ``v / (‖g‖² + regularization)``.
    The FIM of the function is the ``p x p`` outer product ``g gᵀ``; this
    function uses that matrix, which Sherman-Morrison makes cheap:
    ``(g gᵀ + λ I)⁻¹ v = (v − g (gᵀv) / (λ + ‖g‖²)) / λ`` (ExplicitIFVP's
    kernel form; no ``p x p`` matrix is formed).

    Examples
    --------
    >>> import torch
    >>> from attribkit.functional import ifvp_explicit
    >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    >>> def loss(w, X, y):
    ...     return ((X @ w - y) ** 2).mean()
    >>> ifvp = ifvp_explicit(loss, argnums=0, regularization=0.5)
    >>> w, v = torch.zeros(3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    >>> g = torch.func.grad(loss)(w, X, y)
    >>> F = torch.outer(g, g) + 0.5 * torch.eye(3, dtype=torch.float64)
    >>> torch.allclose(ifvp((w, X, y), v), torch.linalg.solve(F, v.T).T)
    True
    """
    name = "ifvp_explicit"
    V.check_callable(name, "func", func)
    _check_argnums(name, argnums, allow_tuple=False)
    regularization = V.check_damping(name, regularization, name="regularization", auto=False)
    grad_func = torch.func.grad(func, argnums=argnums)

    def _ifvp_explicit_func(x: tuple, v: torch.Tensor) -> torch.Tensor:
        """``(g gᵀ + regularization I)⁻¹ v`` with ``g`` the gradient of ``func(*x)``."""
        if not isinstance(x, (tuple, list)):
            raise TypeError(
                f"{name}'s returned function takes x as the tuple of arguments of func. "
                f"Got {type(x).__name__} instead."
            )
        est = _fit_explicit(grad_func(*x), regularization, name)
        return _apply_flat(est, v, name)

    return _ifvp_explicit_func


def ifvp_at_x_explicit(
    func: Callable,
    *x,
    argnums: int | tuple[int, ...] = 0,
    regularization: float = 0.0,
) -> Callable:
    """IFVP via explicit FIM calculation (with fixed ``x``).

    The gradient ``g`` of ``func(*x)`` with respect to ``argnums`` is taken
    once, :class:`attribkit.ExplicitIFVP` is fitted once on it, and the
    returned function applies ``(g gᵀ + regularization * I)⁻¹`` to vectors.

    Parameters
    ----------
    func : callable
        A function of one or more arguments returning a single-element
        tensor (the loss); a negative log-likelihood for classification
        (ground-truth labels: empirical FIM; predicted labels: true FIM).
    *x
        The arguments of ``func``.
    argnums : int or tuple of int, default=0
        The argument(s) of ``func`` the FIM is taken with respect to; with a
        tuple (or an argument that is a tuple/list/dict of tensors) the
        gradients are flattened and concatenated in order.
    regularization : float, default=0.0
        ``regularization * I`` is added to the FIM; needs to be > 0 when the
        gradient has more than one entry (``g gᵀ`` has rank 1), else
        ``ValueError``.

    Returns
    -------
    callable
        ``ifvp(v)`` for ``v`` of shape ``(p,)`` or ``(m, p)``: the IFVP, of
        ``v``'s shape, on ``v``'s device, in the gradient's dtype.

    Notes
    -----
    dattri 0.1.0's implementation forms ``grad @ grad.T`` of the 1-D gradient, a
    scalar; here the FIM is the outer product ``g gᵀ`` (see
    :func:`ifvp_explicit`). The factorisation happens once, here, instead of
    one ``torch.linalg.solve`` per call.

    Examples
    --------
    >>> import torch
    >>> from attribkit.functional import ifvp_at_x_explicit
    >>> def loss(w, b):
    ...     return w.sin().sum() * b.sum() + (b**2).sum()
    >>> w, b = torch.randn(4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    >>> ifvp = ifvp_at_x_explicit(loss, w, b, argnums=(0, 1), regularization=1.0)
    >>> ifvp(torch.randn(6, dtype=torch.float64)).shape
    torch.Size([6])
    """
    name = "ifvp_at_x_explicit"
    V.check_callable(name, "func", func)
    _check_argnums(name, argnums, allow_tuple=True)
    regularization = V.check_damping(name, regularization, name="regularization", auto=False)
    est = _fit_explicit(torch.func.grad(func, argnums=argnums)(*x), regularization, name)

    def _ifvp_at_x_explicit_func(v: torch.Tensor) -> torch.Tensor:
        """``(g gᵀ + regularization I)⁻¹ v`` for the fixed gradient ``g``."""
        return _apply_flat(est, v, name)

    return _ifvp_at_x_explicit_func


# ---------------------------------------------------------------------- DataInf
_REG_EXPECTED = (
    "None (the DataInf paper's automatic damping), a float > 0 or a list of floats > 0 "
    "(one per layer); zero would divide by zero"
)


def _layer_groups(param_layer_map, n_params: int, func_name: str) -> list[list[int]]:
    """Parameter-tensor indices of each layer, layers in index order."""
    if param_layer_map is None:
        return [[i] for i in range(n_params)]
    if not isinstance(param_layer_map, (list, tuple)) or not all(
        V.is_int(k) and k >= 0 for k in param_layer_map
    ):
        raise V.param_error(
            func_name,
            "param_layer_map",
            "None or a list of layer indices (ints >= 0)",
            param_layer_map,
        )
    if len(param_layer_map) != n_params:
        raise IFVPUsageError(
            f"The 'param_layer_map' of {func_name} must have one entry per parameter tensor "
            f"of the differentiated argument: {n_params} tensors. Got {len(param_layer_map)} "
            f"entries ({list(param_layer_map)!r})."
        )
    n_layers = max(param_layer_map) + 1
    groups = [
        [i for i, k in enumerate(param_layer_map) if k == layer] for layer in range(n_layers)
    ]
    empty = [layer for layer, g in enumerate(groups) if not g]
    if empty:
        raise IFVPUsageError(
            f"The 'param_layer_map' of {func_name} must number its layers 0, 1, ..., L-1 "
            f"without gaps; layers {empty} have no parameter. Got {list(param_layer_map)!r}."
        )
    return groups


def _layer_damping(regularization, groups, n_params: int, has_map: bool, func_name: str):
    """DataInfIFVP's ``damping`` for dattri's ``regularization``."""
    if regularization is None:
        return "auto"
    is_list = isinstance(regularization, (list, tuple))
    if not is_list or regularization:  # an empty list is a wrong length, below
        regularization = V.check_damping(
            func_name, regularization, name="regularization", auto=False, positive=True,
            per_layer=True, expected=_REG_EXPECTED,
        )  # fmt: skip
    if not is_list:
        return regularization
    n_layers = len(groups)
    if len(regularization) == n_layers:
        return [float(r) for r in regularization]
    if has_map and len(regularization) == n_params:
        # The reference's own tests give one value per parameter tensor with a map.
        per_layer = []
        for layer, group in enumerate(groups):
            values = {float(regularization[i]) for i in group}
            if len(values) != 1:
                raise IFVPUsageError(
                    f"The 'regularization' of {func_name} has one entry per parameter tensor; "
                    f"the entries of the tensors of layer {layer} ({group}) must agree. Got "
                    f"{[regularization[i] for i in group]!r}."
                )
            per_layer.append(values.pop())
        return per_layer
    raise IFVPUsageError(
        f"The length of 'regularization' of {func_name} should be the same as the number of "
        f"layers ({n_layers}"
        + (f", or of parameter tensors, {n_params}" if has_map else "")
        + f"). Got {len(regularization)} entries."
    )


class _DataInfLayers:
    """Per-example gradients of ``func`` split into layers, and a fitted DataInfIFVP."""

    def __init__(self, func, argnums, in_dims, x, regularization, param_layer_map, func_name):
        self.func_name = func_name
        grads = torch.func.vmap(torch.func.grad(func, argnums=argnums), in_dims=in_dims)(*x)
        per_param = leaves(grads, func_name, "the gradient of func")
        n = per_param[0].shape[0]
        flat = [g.detach().reshape(n, -1) for g in per_param]
        groups = _layer_groups(param_layer_map, len(flat), func_name)
        damping = _layer_damping(
            regularization, groups, len(flat), param_layer_map is not None, func_name
        )
        self.keys = [f"layer{k}" for k in range(len(groups))]
        # Natural shape of a one-tensor layer, so v may also come in the parameter's shape.
        self.shapes = [tuple(per_param[g[0]].shape[1:]) if len(g) == 1 else None for g in groups]
        layers = {
            key: flat[g[0]] if len(g) == 1 else torch.cat([flat[i] for i in g], dim=1)
            for key, g in zip(self.keys, groups)
        }
        dtype = float_dtype(*(t.dtype for t in flat))
        # layers="parameter": one DataInf layer per key, i.e. per seed layer.
        self.est = DataInfIFVP(
            damping=damping, layers="parameter", config=config(flat[0].device, dtype)
        ).fit(layers)

    def apply(self, v):
        name = self.func_name
        if not isinstance(v, (tuple, list)) or len(v) != len(self.keys):
            got = f"{len(v)} entries" if isinstance(v, (tuple, list)) else type(v).__name__
            raise IFVPUsageError(
                f"The vectors 'v' of {name} must be a tuple with one tensor per layer "
                f"({len(self.keys)} layers). Got {got}."
            )
        batch, shapes, m = {}, [], None
        for k, (key, t) in enumerate(zip(self.keys, v)):
            t = torch.as_tensor(t)
            d = self.est.param_shapes_[key][0]
            natural = {(d,)} | ({self.shapes[k]} if self.shapes[k] is not None else set())
            if tuple(t.shape) in natural:
                rows = 1
            elif t.ndim >= 2 and tuple(t.shape[1:]) in natural:
                rows = t.shape[0]
            else:
                raise ValueError(
                    f"The vector v[{k}] of {name} must have shape ({d},) (layer {k} flattened) "
                    f"or (m, {d}), or the parameter's shape with or without a leading m. Got "
                    f"shape {tuple(t.shape)} instead."
                )
            if m is not None and rows != m:
                raise ValueError(
                    f"The vectors 'v' of {name} must hold the same number of vectors in every "
                    f"layer. Got {m} in layer 0 and {rows} in layer {k}."
                )
            m = rows
            batch[key] = t.reshape(rows, d)
            shapes.append(t)
        out = self.est.transform(batch)
        return tuple(out[key].reshape(t.shape).to(t.device) for key, t in zip(self.keys, shapes))


def _check_datainf_args(func_name, func, argnums, in_dims) -> None:
    V.check_callable(func_name, "func", func)
    _check_argnums(func_name, argnums, allow_tuple=False)
    if not isinstance(in_dims, (tuple, int)) or (
        isinstance(in_dims, tuple) and not all(d is None or V.is_int(d) for d in in_dims)
    ):
        raise V.param_error(
            func_name, "in_dims", "a tuple of ints or None (one per argument of func)", in_dims
        )


def ifvp_datainf(
    func: Callable,
    argnums: int,
    in_dims: tuple[int | None, ...],
    regularization: float | list[float] | None = None,
    param_layer_map: list[int] | None = None,
) -> Callable:
    """DataInf IFVP algorithm function.

    Returns a function ``ifvp(x, v)`` that computes layer-wise
    inverse-FIM-vector products in DataInf's closed form (Kwon et al., 2024)
    from the per-example gradients of ``func`` over the batch ``x``: for
    layer ``l`` with per-example gradients ``g_i`` and damping ``λ_l``,
    ``(1/λ_l) (v − (1/n) Σ_i (g_iᵀ v) / (λ_l + ‖g_i‖²) g_i)``. The
    per-example gradients are ``vmap(grad(func, argnums), in_dims)(*x)``;
    the algebra is :class:`attribkit.DataInfIFVP`'s (array mode, one layer
    per seed layer). Reference implementation:
    https://github.com/ykwon0407/DataInf/blob/main/src/influence.py

    Parameters
    ----------
    func : callable
        A function of one example (and shared arguments) returning a
        single-element tensor, its loss. DataInf assumes a cross-entropy
        (log-likelihood) loss.
    argnums : int
        The argument of ``func`` the FIM is taken with respect to: typically
        a tuple of parameter tensors (or a dict, e.g.
        ``dict(model.named_parameters())``), each tensor a layer unless
        ``param_layer_map`` groups them.
    in_dims : tuple of (int or None)
        Passed to ``torch.func.vmap`` to batch ``func`` over examples: for
        arguments ``(inputs, weights, labels)``, ``(0, None, 0)``.
    regularization : float, list of float or None, default=None
        The damping ``λ_l`` added to each layer's empirical FIM
        (``λ_l I``): a float > 0 for all layers, or a list of floats > 0 of
        length L, the number of layers (after ``param_layer_map`` grouping).
        With a map, a list of one entry per parameter tensor is also accepted
        when the entries of the tensors of each layer agree (the reference's
        own tests pass such lists); any other length raises
        :class:`IFVPUsageError`. ``None``: the DataInf paper's automatic
        damping ``λ_l = 0.1 × mean_i ‖g_{l,i}‖² / d_l``, a tenth of the
        layer's mean squared gradient entry (``ValueError`` if a layer's
        gradients are all zero).
    param_layer_map : list of int, optional
        How the parameter tensors are grouped into layers, one entry per
        tensor: for ``params = (0.weight, 0.bias, 1.weight, 1.bias)``,
        ``[0, 0, 1, 1]`` makes two layers. Layers are numbered ``0..L-1``.
        Default: each parameter tensor is a layer.

    Returns
    -------
    callable
        ``ifvp(x, v)``: ``x`` the tuple of arguments of ``func`` batched as
        ``in_dims`` says; ``v`` a tuple with one tensor per layer, each
        ``(d_l,)`` (the layer's parameters flattened and concatenated in
        order) or ``(m, d_l)`` (or, for a one-tensor layer, the parameter's
        shape, with or without a leading ``m``). Returns the tuple of
        layer-wise IFVPs, each of its ``v``'s shape, in the gradients' dtype.

    Raises
    ------
    IFVPUsageError
        If the length of ``regularization`` is not the number of layers (nor,
        with a map, of parameter tensors), or ``param_layer_map`` does not
        match the parameters.

    Notes
    -----
    **Where this differs from the reference.** dattri 0.1.0 uses a damping
    of 0 when ``regularization`` is None, and DataInf's closed form divides
    by the damping, so its default returns infinities and NaN. Here None is
    the paper's automatic damping and a zero damping raises ``ValueError``.
    The reference also fails on a single float without a map; here a float
    applies to every layer. Its batched output has a spurious leading
    dimension for 1-D ``v``; here outputs have the shape of ``v``.

    Examples
    --------
    >>> import torch
    >>> from attribkit.functional import ifvp_datainf
    >>> def loss(inputs, params, label):  # one example
    ...     w, b = params
    ...     return torch.nn.functional.cross_entropy(inputs @ w.T + b, label)
    >>> X, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    >>> params = (torch.randn(3, 4), torch.randn(3))
    >>> ifvp = ifvp_datainf(loss, 1, (0, None, 0), regularization=0.1, param_layer_map=[0, 0])
    >>> out = ifvp((X, params, y), (torch.randn(5, 15),))
    >>> [tuple(t.shape) for t in out]
    [(5, 15)]
    """
    name = "ifvp_datainf"
    _check_datainf_args(name, func, argnums, in_dims)
    # Checked up front where they need no gradients (the reference checks here too).
    if param_layer_map is not None:
        groups = _layer_groups(param_layer_map, len(param_layer_map), name)
        _layer_damping(regularization, groups, len(param_layer_map), True, name)
    elif regularization is not None and not isinstance(regularization, (list, tuple)):
        _layer_damping(regularization, [[0]], 1, False, name)

    def _ifvp_datainf_func(x: tuple, v: tuple) -> tuple:
        """Layer-wise DataInf IFVPs of ``v`` with the per-example gradients over ``x``."""
        layers = _DataInfLayers(func, argnums, in_dims, x, regularization, param_layer_map, name)
        return layers.apply(v)

    return _ifvp_datainf_func


def ifvp_at_x_datainf(
    func: Callable,
    argnums: int,
    in_dims: tuple[int | None, ...],
    regularization: list[float] | None = None,
    *x,
    param_layer_map: list[int] | None = None,
) -> Callable:
    """DataInf IFVP algorithm function (with fixed ``x``).

    As :func:`ifvp_datainf`, with the per-example gradients over ``x`` taken
    once and :class:`attribkit.DataInfIFVP` fitted once on them; the
    returned function maps layer-wise vectors to layer-wise IFVPs.

    Parameters
    ----------
    func : callable
        A function of one example returning a single-element tensor, its
        (cross-entropy) loss.
    argnums : int
        The argument of ``func`` the FIM is taken with respect to (a tensor,
        or a tuple/list/dict of parameter tensors).
    in_dims : tuple of (int or None)
        ``torch.func.vmap``'s ``in_dims`` over ``x``: for
        ``(inputs, weights, labels)``, ``(0, None, 0)``.
    regularization : list of float, float or None, default=None
        ``λ_l`` per layer, as in :func:`ifvp_datainf`: None is the paper's
        automatic damping; a list has one entry per layer (or, with a map,
        per parameter tensor, equal within each layer), else
        :class:`IFVPUsageError`.
    *x
        The arguments of ``func``, batched as ``in_dims`` says.
    param_layer_map : list of int, optional
        Layer index of each parameter tensor, e.g. ``(0, 0, 1, 1)`` for
        ``(0.weight, 0.bias, 1.weight, 1.bias)``.

    Returns
    -------
    callable
        ``ifvp(v)`` for ``v`` a tuple of one tensor per layer (``(d_l,)`` or
        ``(m, d_l)``): the tuple of layer-wise IFVPs, shapes as given.

    Notes
    -----
    The reference's ``regularization=None`` divides by zero; here it is the
    paper's automatic damping (see :func:`ifvp_datainf`). The reference
    handles one vector per layer only; here ``(m, d_l)`` batches work too.

    Examples
    --------
    >>> import torch
    >>> from attribkit.functional import ifvp_at_x_datainf
    >>> def loss(w, inputs, label):
    ...     return torch.nn.functional.cross_entropy(inputs @ w.T, label)
    >>> X, y = torch.randn(40, 5), torch.randint(0, 2, (40,))
    >>> ifvp = ifvp_at_x_datainf(loss, 0, (None, 0, 0), None, torch.randn(2, 5), X, y)
    >>> ifvp((torch.randn(10),))[0].shape
    torch.Size([10])
    """
    name = "ifvp_at_x_datainf"
    _check_datainf_args(name, func, argnums, in_dims)
    layers = _DataInfLayers(func, argnums, in_dims, x, regularization, param_layer_map, name)

    def _ifvp_at_x_datainf_func(v: tuple) -> tuple:
        """Layer-wise DataInf IFVPs of ``v`` with the fixed per-example gradients."""
        return layers.apply(v)

    return _ifvp_at_x_datainf_func


# ---------------------------------------------------------------------- EK-FAC cache
EKFAC_CACHE_KEY = "__ekfac_cache"
"""Attribute name under which a module carries its :class:`MLPCache`."""


class MLPCache:
    """Cache of the input and output variables of the layers of an MLP.

    A model whose forward is decorated with :func:`manual_cache_forward`
    appends, on each forward pass, one ``(input, hidden)`` pair per linear
    map to ``input_hidden_pairs``: the layer's input ``a`` of shape
    ``(batch, d_in)`` or ``(batch, t, d_in)`` and its output (pre-activation)
    ``s = a Wᵀ`` of shape ``(batch, d_out)`` or ``(batch, t, d_out)``.
    :func:`ifvp_at_x_ekfac` reads ``a`` and the gradient ``s.grad`` after
    the backward pass.

    Attributes
    ----------
    input_hidden_pairs : list of tuple of torch.Tensor
        The recorded pairs, in forward order.

    Notes
    -----
    In the reference (dattri 0.1.0) ``input_hidden_pairs`` is a class-level
    list, shared by every instance until each one's first ``clear()``: pairs
    appended through one cache then show up in all the others. Here every
    instance has its own list from construction.

    Examples
    --------
    >>> a, b = MLPCache(), MLPCache()
    >>> a.input_hidden_pairs.append((1, 2))
    >>> b.input_hidden_pairs
    []
    """

    def __init__(self) -> None:
        self.input_hidden_pairs: list[tuple[torch.Tensor, ...]] = []

    def clear(self) -> None:
        """Reset the variables in the cache."""
        self.input_hidden_pairs = []

    def zero_grad(self) -> None:
        """Zero out the gradients of the variables in the cache."""
        for inputs, hiddens in self.input_hidden_pairs:
            inputs.grad = None
            hiddens.grad = None

    def retain_grad(self) -> None:
        """Keep the gradients of the cached non-leaf tensors after backward."""
        for inputs, hiddens in self.input_hidden_pairs:
            if inputs.requires_grad:
                inputs.retain_grad()
            if hiddens.requires_grad:
                hiddens.retain_grad()

    def check_type(self) -> None:
        """Check that every cached variable is a tensor.

        Raises
        ------
        IFVPUsageError
            If a cached pair is not two ``torch.Tensor``.
        """
        for k, pair in enumerate(self.input_hidden_pairs):
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and all(isinstance(t, torch.Tensor) for t in pair)
            ):
                raise IFVPUsageError(
                    "Incorrect type of variable is cached in `MLPCache`: entry "
                    f"{k} of input_hidden_pairs must be a pair (input, hidden) of "
                    f"torch.Tensor. Got {type(pair).__name__} {pair!r:.80}."
                )

    def __repr__(self) -> str:
        return f"MLPCache({len(self.input_hidden_pairs)} pairs)"


def manual_cache_forward(forward_func: Callable) -> Callable:
    """Decorator for caching the inputs, outputs and gradients of a module.

    Wraps a ``forward(self, *args, **kwargs)`` that, when the module has an
    :class:`MLPCache` under the attribute :data:`EKFAC_CACHE_KEY`, appends
    its ``(input, hidden)`` pairs to ``cache.input_hidden_pairs``. The
    wrapper clears the cache before each forward, checks the types of what
    was cached after it, and makes the cached tensors retain their
    gradients, so that ``hidden.grad`` holds the output gradient after
    ``backward()``. Without a cache the forward runs unchanged.

    Parameters
    ----------
    forward_func : callable
        The forward function to wrap.

    Returns
    -------
    callable
        The forward function with caching.

    Examples
    --------
    >>> import types, torch
    >>> from attribkit.functional import EKFAC_CACHE_KEY, MLPCache, manual_cache_forward
    >>> model = torch.nn.Module()
    >>> model.linear = torch.nn.Linear(3, 2, bias=False)
    >>> @manual_cache_forward
    ... def forward(self, x):
    ...     y = self.linear(x)
    ...     if hasattr(self, EKFAC_CACHE_KEY):
    ...         getattr(self, EKFAC_CACHE_KEY).input_hidden_pairs.append((x, y))
    ...     return y
    >>> model.forward = types.MethodType(forward, model)
    >>> cache = MLPCache()
    >>> setattr(model, EKFAC_CACHE_KEY, cache)
    >>> model(torch.randn(4, 3)).sum().backward()
    >>> cache.input_hidden_pairs[0][1].grad.shape
    torch.Size([4, 2])
    """

    @wraps(forward_func)
    def cached_forward(self: torch.nn.Module, *args, **kwargs):
        if not hasattr(self, EKFAC_CACHE_KEY):
            return forward_func(self, *args, **kwargs)
        cache = getattr(self, EKFAC_CACHE_KEY)
        cache.clear()
        outputs = forward_func(self, *args, **kwargs)
        cache.check_type()
        cache.retain_grad()
        return outputs

    return cached_forward


# ---------------------------------------------------------------------- EK-FAC
def _input_size(x, in_dims, func_name: str) -> int:
    """The number of examples in ``x`` along ``in_dims`` (1 when nothing is batched)."""
    if len(in_dims) != len(x):
        raise IFVPUsageError(
            f"The 'in_dims' of {func_name} must have one entry per argument in *x: "
            f"{len(x)} arguments. Got {len(in_dims)} entries ({in_dims!r})."
        )
    size = None
    for i, (arg, dim) in enumerate(zip(x, in_dims)):
        if dim is None:
            continue
        if (
            not isinstance(arg, torch.Tensor)
            or not V.is_int(dim)
            or not -arg.ndim <= dim < arg.ndim
        ):
            raise IFVPUsageError(
                f"Argument {i} of {func_name} is batched along in_dims[{i}]={dim!r}, so it "
                f"must be a tensor with that dimension. Got {type(arg).__name__}"
                + (f" of shape {tuple(arg.shape)}" if isinstance(arg, torch.Tensor) else "")
                + "."
            )
        if size is None:
            size = arg.shape[dim]
        elif arg.shape[dim] != size:
            raise IFVPUsageError(
                f"Input batch size mismatch in {func_name}: expected {size} examples, found "
                f"{arg.shape[dim]} in argument {i} (along dimension {dim})."
            )
    return 1 if size is None else int(size)


def _as_tokens(t: torch.Tensor, b: int) -> torch.Tensor:
    """``(b, d)`` or ``(b, t, d)`` (or more middle dims) as ``(b, T, d)``."""
    return t.reshape(b, -1, t.shape[-1])


class _CacheReader:
    """The ``(a, s, ∇s)`` triples of one forward/backward through the user's caches."""

    def __init__(self, caches, func, func_name: str):
        self.caches, self.func, self.name = caches, func, func_name
        self.dims = None

    def __call__(self, batch):
        name = self.name
        with torch.enable_grad():  # the output gradients need a graph, even under no_grad
            out = self.func(*batch)
        losses, mask = out if isinstance(out, tuple) else (out, None)
        if not isinstance(losses, torch.Tensor) or losses.ndim != 1:
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
            raise IFVPUsageError(
                f"The func of {name} must return per-example losses of shape (batch_size,), "
                f"optionally with a mask (batch_size, t). Got losses {got}."
            )
        pairs = [pair for cache in self.caches for pair in cache.input_hidden_pairs]
        for cache in self.caches:
            cache.check_type()
        dims = [(a.shape[-1], s.shape[-1]) for a, s in pairs]
        if not pairs:
            raise IFVPUsageError(
                f"{name}: the MLPCache(s) recorded no (input, hidden) pair during func: the "
                f"model's forward must append them (see manual_cache_forward), and the model "
                f"must carry the cache under the attribute {EKFAC_CACHE_KEY!r}."
            )
        if self.dims is None:
            self.dims = dims
        elif dims != self.dims:
            raise IFVPUsageError(
                f"{name}: the MLPCache(s) recorded layers of (d_in, d_out) {dims} in one batch "
                f"and {self.dims} in the first; every forward must cache the same layers."
            )
        hidden = [s for _, s in pairs]
        if not all(s.requires_grad for s in hidden):
            raise IFVPUsageError(
                f"{name}: a cached hidden tensor does not require grad, so its output gradient "
                "cannot be computed; the parameters func uses must require grad."
            )
        # The output gradients of the summed loss, without touching anyone's .grad.
        with torch.enable_grad():
            grads = torch.autograd.grad(losses.sum(), hidden, allow_unused=True)
        b = losses.shape[0]
        triples = []
        for (a, s), g in zip(pairs, grads):
            g = torch.zeros_like(s) if g is None else g
            triples.append((_as_tokens(a.detach(), b), _as_tokens(g.detach(), b)))
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.numel() % b:
                raise IFVPUsageError(
                    f"The mask returned by the func of {name} must have shape (batch_size, t) "
                    f"with batch_size={b}. Got {tuple(mask.shape)}."
                )
            mask = mask.reshape(b, -1).to(dtype=triples[0][0].dtype, device=triples[0][0].device)
        return triples, mask


def _check_mask(mask: torch.Tensor, a: torch.Tensor, k: int, func_name: str) -> None:
    if mask.shape != a.shape[:2]:
        raise IFVPUsageError(
            f"The mask returned by the func of {func_name} has shape {tuple(mask.shape)}, but "
            f"cached layer {k} has (batch_size, t) = {tuple(a.shape[:2])} positions."
        )


def ifvp_at_x_ekfac(
    func: Callable,
    *x,
    in_dims: tuple | None = None,
    batch_size: int = 1,
    max_iter: int | None = None,
    mlp_cache: MLPCache | list[MLPCache],
    damping: float = 0.0,
) -> Callable:
    """IFVP via the EK-FAC algorithm (with fixed ``x``).

    Returns a function that, given layer-wise vectors, computes their
    inverse-FIM-vector products under EK-FAC's layer-wise approximation
    (George et al., 2018; Grosse et al., 2023). Each ``(input, hidden)``
    pair that the user's :class:`MLPCache` records is a layer ``s = a Wᵀ``.
    Two passes over ``x`` in random batches of ``batch_size``:

    1. the covariances ``A = E[a aᵀ]`` and ``S = E[∇s ∇sᵀ]`` of the inputs
       and of the output gradients (over examples and valid positions) and
       their eigenvectors ``Q_A``, ``Q_S``;
    2. the eigenvalue correction ``Λ = E_i[(Q_Sᵀ ∇W_i Q_A)²]`` from the
       per-example gradients ``∇W_i = Σ_t ∇s_{i,t} a_{i,t}ᵀ`` in that basis;

    and the IFVP of a layer's ``v`` is ``Q_S ((Q_Sᵀ v Q_A) / (Λ + damping)) Q_Aᵀ``.
    The work is :class:`attribkit.EKFACIFVP`'s, fed with the cached pairs:
    its two passes (float64 sums and eigendecompositions), its rounding
    floor for ``Λ`` and its per-layer product.

    Parameters
    ----------
    func : callable
        ``func(*batch)`` returns ``losses`` of shape ``(batch_size,)``, or
        ``(losses, mask)`` with ``mask`` of shape ``(batch_size, t)``: 1
        where the IFVP is estimated, 0 at irrelevant positions (padding
        tokens); ``t`` is the sequence length (1 for non-sequential data).
        Calling it must run the forward pass of the model that holds the
        cache(s), so that they record the ``(input, hidden)`` pairs. The FIM
        is estimated from the gradients of these losses.
    *x
        The arguments of ``func``.
    in_dims : tuple, optional
        One entry per argument in ``x``: the dimension along which it is
        batched, or None for an argument every batch shares. Default: the
        first dimension of every argument.
    batch_size : int, default=1
        Batch size for estimating the covariances and the lambdas (capped at
        the number of examples).
    max_iter : int, optional
        Maximum number of batches used for each estimate (default: all).
    mlp_cache : MLPCache or list of MLPCache
        The registered cache(s) that record the inputs and hidden vectors of
        the layers during the forward pass of ``func``.
    damping : float, default=0.0
        Added to ``Λ``. With ``damping=0`` an entry of ``Λ`` that is zero to
        rounding (at most ``(eps * d)^2 * max(Λ)``, ``d`` the layer's larger
        side, as in EKFACIFVP) raises ``ValueError`` (the IFVP would divide
        by zero).

    Returns
    -------
    callable
        ``ifvp(v)``: ``v`` a list with one entry per cache, each a list with
        one tensor per recorded pair, of shape ``(d_out, d_in)`` or
        ``(m, d_out, d_in)``; returns the same nested structure of IFVPs,
        shapes and dtypes as given.

    Raises
    ------
    IFVPUsageError
        ``in_dims`` that do not match ``x``, mismatched batch sizes, caches
        that record nothing or other than tensors, layers that change between
        batches, bad losses or masks.

    Notes
    -----
    **Where this differs from the reference.** ``torch.linalg.eigh`` returns
    eigenvectors as the *columns* of ``Q``; dattri 0.1.0 rotates by
    ``q_s @ v @ q_a.T``, i.e. with the rows, so its eigenvalue correction is
    measured in a basis that is not the eigenbasis (its IFVP is still
    symmetric, but not EK-FAC's). Here the rotation is ``Q_Sᵀ v Q_A``. The
    reference also drops the mask (its tuple unpacking always yields a mask
    of 1); here masked positions are left out of ``A`` and ``S`` and of the
    per-example gradients. Batches are drawn from one random permutation of
    the examples (``torch.randperm``: ``torch.manual_seed`` makes it
    reproducible) used by both passes, so with ``max_iter`` both passes see
    the same examples. Output gradients are taken with
    ``torch.autograd.grad``, so parameters' ``.grad`` are left untouched (the
    reference calls ``backward`` once per example).

    Examples
    --------
    >>> import types, torch
    >>> from attribkit.functional import (EKFAC_CACHE_KEY, MLPCache, ifvp_at_x_ekfac,
    ...                                   manual_cache_forward)
    >>> model = torch.nn.Module()
    >>> model.linear = torch.nn.Linear(4, 2, bias=False)
    >>> @manual_cache_forward
    ... def forward(self, x):
    ...     y = self.linear(x)
    ...     if hasattr(self, EKFAC_CACHE_KEY):
    ...         getattr(self, EKFAC_CACHE_KEY).input_hidden_pairs.append((x, y))
    ...     return y
    >>> model.forward = types.MethodType(forward, model)
    >>> cache = MLPCache()
    >>> setattr(model, EKFAC_CACHE_KEY, cache)
    >>> X, Y = torch.randn(64, 4), torch.randn(64, 2)
    >>> def losses(X, Y):
    ...     return ((model(X) - Y) ** 2).sum(-1)
    >>> ifvp = ifvp_at_x_ekfac(losses, X, Y, batch_size=16, mlp_cache=cache, damping=0.1)
    >>> ifvp([[torch.randn(3, 2, 4)]])[0][0].shape
    torch.Size([3, 2, 4])
    """
    name = "ifvp_at_x_ekfac"
    V.check_callable(name, "func", func)
    if not x:
        raise IFVPUsageError(f"{name} needs the arguments of func in *x; none were given.")
    if in_dims is None:
        in_dims = (0,) * len(x)
    if not isinstance(in_dims, tuple):
        raise V.param_error(name, "in_dims", "None or a tuple (one entry per argument)", in_dims)
    if not V.is_int(batch_size) or batch_size < 1:
        raise V.param_error(name, "batch_size", "an int >= 1", batch_size)
    if max_iter is not None and (not V.is_int(max_iter) or max_iter < 1):
        raise V.param_error(name, "max_iter", "None or an int >= 1", max_iter)
    damping = V.check_damping(name, damping, auto=False)
    caches = list(mlp_cache) if isinstance(mlp_cache, (list, tuple)) else [mlp_cache]
    if not caches or not all(hasattr(c, "input_hidden_pairs") for c in caches):
        raise V.param_error(
            name, "mlp_cache", "an MLPCache or a non-empty list of them", mlp_cache
        )

    n = _input_size(x, in_dims, name)
    batch_size = min(int(batch_size), n)
    n_batches = -(-n // batch_size)
    if max_iter is not None:
        n_batches = min(n_batches, int(max_iter))
    order = torch.randperm(n)

    def batches():
        for i in range(n_batches):
            index = order[i * batch_size : (i + 1) * batch_size]
            yield tuple(
                arg if dim is None else arg.index_select(dim, index.to(arg.device))
                for arg, dim in zip(x, in_dims)
            )

    read = _CacheReader(caches, func, name)

    def covariance_batches():
        for batch in batches():
            triples, mask = read(batch)
            if mask is None:
                yield [(a, s, None) for a, s in triples]
                continue
            for k, (a, _) in enumerate(triples):
                _check_mask(mask, a, k, name)
            # Only the valid positions enter A, S and their row counts (as padding
            # does in EKFACIFVP).
            yield [(a, s, None, mask != 0) for a, s in triples]

    def lambda_batches():
        for batch in batches():
            triples, mask = read(batch)
            if mask is not None:  # masked positions add nothing to ∇W_i
                for k, (a, _) in enumerate(triples):
                    _check_mask(mask, a, k, name)
                triples = [(a * mask[..., None], s) for a, s in triples]
            yield [(a, s, None) for a, s in triples]

    # The layers are known once the first batch has run through the caches.
    first = covariance_batches()
    head = next(first)
    a0 = head[0][0]
    stats = EKFACStatistics(
        [(t[0].shape[-1], t[1].shape[-1]) for t in head],
        [f"cache {k}" for k in range(len(head))],
        device=a0.device,
        dtype=float_dtype(a0.dtype),
    )
    lambdas = fit_statistics(stats, itertools.chain([head], first), lambda_batches, owner=name)
    scales = []
    for k, lam in enumerate(lambdas):
        check_lambda(
            lam, damping, d=max(stats.dims[k]), dtype=stats.dtype, owner=name,
            layer=f"cached layer {k}", note="damping=0.0",
            advice="Pass damping > 0 (the IFVP would divide by zero).",
        )  # fmt: skip
        scales.append(1.0 / (lam + damping))
    structure = [len(c.input_hidden_pairs) for c in caches]
    dims = stats.dims

    def _ifvp_at_x_ekfac_func(v: list) -> list:
        """EK-FAC IFVPs of the nested layer-wise vectors ``v`` (one list per cache)."""
        if (
            not isinstance(v, (list, tuple))
            or [len(layer) if isinstance(layer, (list, tuple)) else -1 for layer in v] != structure
        ):
            raise IFVPUsageError(
                f"The vectors 'v' of {name} must be a list with one list per cache, each with "
                f"one tensor per recorded pair: lengths {structure}."
            )
        out, k = [], 0
        for layer in v:
            row = []
            for t in layer:
                d_in, d_out = dims[k]
                t = torch.as_tensor(t)
                if tuple(t.shape[-2:]) != (d_out, d_in) or t.ndim not in (2, 3):
                    raise ValueError(
                        f"The vector for cached layer {k} of {name} must have shape "
                        f"({d_out}, {d_in}) or (m, {d_out}, {d_in}). Got {tuple(t.shape)}."
                    )
                Q_S, Q_A = stats.Q_S[k], stats.Q_A[k]
                X = t.reshape(-1, d_out, d_in).to(device=Q_S.device, dtype=torch.float64)
                res = ekfac_apply(Q_S, Q_A, scales[k], X)
                row.append(res.reshape(t.shape).to(device=t.device, dtype=t.dtype))
                k += 1
            out.append(row)
        return out

    return _ifvp_at_x_ekfac_func
