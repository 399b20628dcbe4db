"""LoGra-style Kronecker-structured projection of layer gradients.

The whole data flow:

1. ``fit(model)`` resolves the covered layers (``nn.Linear``, ``nn.Conv2d``
   and Hugging Face's ``Conv1D``, exactly as EKFACIFVP does) and records the
   layout: each layer's weight (and bias) in model order, and its gradient
   seen as a ``(d_out, d_in)`` matrix ``W`` (the bias is the last input
   column; a conv weight ``(out, in, kh, kw)`` is ``(out, in * kh * kw)``; a
   ``Conv1D`` weight ``(in, out)`` is ``W`` transposed, its layout kept as
   plain data by :func:`attribkit._compute.capture.matrix_view`);
2. each layer ``l`` gets two JL matrices, ``P_in`` ``(d_in, k_in)`` and
   ``P_out`` ``(d_out, k_out)``, regenerated from the counter-based generator
   whenever needed (never pickled);
3. ``transform(V)`` computes ``P_out^T W P_in`` per layer and concatenates
   the flattened ``(k_out, k_in)`` blocks;
4. ``per_example_gradients(model, data, projector=kp)`` never forms ``W``:
   hooks capture each layer's inputs ``a`` ``(b, T, d_in)`` and output
   gradients ``s`` ``(b, T, d_out)``, and the projection is
   ``sum_t (P_out^T s_t)(P_in^T a_t)^T`` per example
   (:meth:`KroneckerProjector.project_gradients`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from sklearn.utils.validation import check_is_fitted

from .._compute import capture
from .._compute import validation as V
from .._compute.model import EvalMode, call_model, model_device, model_dtype
from .._compute.precision import matmul_dtype
from .._compute.targets import resolve_loss, target_batches
from .._compute.vectors import offsets
from ..base import BaseEstimator
from ..config import ComputeConfig
from ._generator import GAMMA, MASK64, PROJ_TYPES, Projection, mix64

__all__ = ["KroneckerProjector", "layer_seed"]

_SIDES = {"in": 1, "out": 2}


def layer_seed(seed: int, position: int, side: str) -> int:
    """Seed of the JL matrix on ``side`` ("in" or "out") of the layer at ``position``.

    ``mix(mix(mix(seed) + GAMMA * (position + 1)) + GAMMA * side_code)`` with
    the generator's SplitMix64 finaliser ``mix`` and increment ``GAMMA``
    (side codes: in = 1, out = 2). The generator keys its stream with this
    seed and ``proj_type``, so entry ``(i, j)`` of a layer's matrix is a pure
    function of ``(seed, proj_type, position, side, i, j)``.
    """
    k = mix64(int(seed) & MASK64)
    k = mix64(k + GAMMA * (int(position) + 1))
    return mix64(k + GAMMA * _SIDES[side])


class KroneckerProjector(BaseEstimator):
    """LoGra-style structured random projection of layer gradients.

    The gradient of a linear layer's loss with respect to its weight, for
    one example, is an outer product ``s a^T`` of the output gradient ``s``
    and the input ``a`` (summed over tokens or conv positions). LoGra [1]_
    projects it with a Kronecker-structured JL matrix,
    ``P_out^T (s a^T) P_in = (P_out^T s)(P_in^T a)^T``, which costs two small
    matrix-vector products per token instead of forming the ``d_out * d_in``
    gradient: with :func:`~attribkit.per_example_gradients` ``(model, data,
    projector=kp)`` the per-example gradients are never formed at all.

    Per covered layer (``nn.Linear``, ``nn.Conv2d`` and Hugging Face's
    ``Conv1D``, as in :class:`~attribkit.EKFACIFVP`; peft's LoRA adapters
    through their ``lora_A``/``lora_B`` ``nn.Linear`` modules), the weight
    gradient with the bias as an extra input column is a ``(d_out, d_in)``
    matrix ``W`` (conv: ``d_in = in * kh * kw + 1``, the im2col layout of
    ``torch.nn.functional.unfold``; ``Conv1D``, whose weight is ``(in,
    out)``: ``W`` is the transposed weight, so its projection equals that of
    the equivalent ``nn.Linear``); its
    projection is ``P_out^T W P_in`` with ``P_in`` ``(d_in, k_in)`` and
    ``P_out`` ``(d_out, k_out)``, ``k_in = min(in_dim, d_in)``, ``k_out =
    min(out_dim, d_out)``. The ``(k_out, k_in)`` blocks are flattened
    (row-major) and concatenated over layers in model order: ``proj_dim_ =
    sum_l k_out * k_in``.

    Both matrices are JL matrices from the counter-based generator of
    :class:`~attribkit.RandomProjector`, scaled by ``1 / sqrt(k)`` so that
    ``E ||P_out^T W P_in||_F^2 = ||W||_F^2``. The matrix of the layer at
    position ``l`` of ``layers_`` and side ``in``/``out`` is the generator's
    matrix for a seed derived from ``(seed, l, side)`` by SplitMix64 mixing, so
    every (unscaled) entry is a pure function of ``(seed, proj_type, l,
    side, i, j)`` (for ``"sjlt"`` also of ``k``, as in RandomProjector): the
    same on every device, for every batch size, and never stored (the pickle
    holds only the layout; the matrices are regenerated on first use).
    Under ``torch.distributed`` it needs no communication: every rank
    builds the same matrices.

    Parameters
    ----------
    in_dim : int, default=16
        ``k_in``, the projection of each layer's input side (capped at ``d_in``).
    out_dim : int, default=16
        ``k_out``, the projection of each layer's output side (capped at ``d_out``).
    proj_type : {"rademacher", "normal", "sjlt"}, default="rademacher"
        Entries ``±1 / sqrt(k)``, ``N(0, 1) / sqrt(k)`` (the generator's
        65,536-level discretisation), or a sparse JL matrix with one nonzero
        ``±1`` per input row (a count sketch, ``sparsity=1``).
    seed : int, default=0
        Seed of the generator.
    layers : list of str, optional
        Names of the modules to cover; default all ``nn.Linear``,
        ``Conv1D`` and ``nn.Conv2d`` modules with trainable parameters, except
        those with a tied weight (see Notes); the others with trainable
        parameters are listed in ``skipped_layers_`` with the reason in
        ``skipped_reasons_``, and when the covered layers hold less than half
        of the model's trainable parameters ``fit`` warns (``UserWarning``)
        with the share and the largest modules left out. A named module of
        another type raises ``ValueError``; a list is taken as the choice it
        is (no coverage warning).
    config : ComputeConfig, optional
        Device and dtype of the matrices and outputs.

    Attributes
    ----------
    layers_ : list of str
        Names of the covered modules, in model order.
    skipped_layers_ : list of str
        Modules with trainable parameters of their own that are not covered
        (an unsupported type or a tied weight; ``layers=None`` only).
    skipped_reasons_ : OrderedDict
        ``module -> reason`` for each of ``skipped_layers_``.
    param_shapes_ : OrderedDict
        The covered weights and biases, named and ordered as
        ``model.named_parameters()`` (a tied weight under its first name):
        the layout of the vectors ``transform`` takes.
    n_features_in_ : int
        Length of those vectors.
    layer_dims_ : OrderedDict
        ``layer -> (d_out, d_in, k_out, k_in)`` (``d_in`` counts the bias column).
    proj_dim_ : int
        Output dimension ``sum_l k_out * k_in``.

    Notes
    -----
    **Tied weights.** A layer's projection ``(P_out^T s)(P_in^T a)^T`` on
    the hook path is the gradient of one use of its weight, while
    ``transform`` projects whatever vector it is given under the weight's
    name, and the gradient of a tied parameter sums every use (GPT-2's
    ``lm_head.weight`` is its ``transformer.wte.weight``, the name it has in
    ``model.named_parameters()`` and in ``param_shapes_``). So with
    ``layers=None`` a module holding a parameter another module also holds
    is skipped (listed in ``skipped_reasons_``); named in ``layers``, it is
    covered under the parameter's first name with a ``UserWarning`` that the
    hook path then differs from ``transform`` of the full gradient.

    **Choosing in_dim and out_dim: what the structure costs in JL quality.**
    A dense JL projection of dimension ``k`` distorts squared norms by about
    ``sqrt(2 / k)``. The Kronecker projection of one layer has dimension
    ``k_out * k_in`` but far fewer independent random numbers, and for a
    per-example gradient of rank one (a Linear layer on one token, ``W = s
    a^T``) it is ``(P_out^T s)(P_in^T a)^T``, whose squared norm is
    ``||P_out^T s||^2 ||P_in^T a||^2``: the product of a ``k_out``- and a
    ``k_in``-dimensional JL estimate, so its distortion falls like ``sqrt(2 /
    k_in + 2 / k_out)``, not like ``sqrt(2 / (k_in k_out))`` (gradients summed
    over tokens or conv positions have higher rank and fare better; not
    measured here). Measured on real gradients (200 per-example gradients of
    an MLP 64-64-64-10 trained briefly on sklearn's digits, 8,970 parameters
    in 3 Linear layers, float64, mean over seeds 0-19 with the per-seed range;
    ``python benchmarks/bench_scale.py --only jl``;
    ``tests/projection/test_kronecker.py`` checks seeds 0-4 against these):

    =================  ========  ===================  ====================
    projection         proj_dim  median ratio error   median ip error
    =================  ========  ===================  ====================
    Kronecker 8 x 8    192       0.290 (0.208-0.405)  0.114 (0.072-0.234)
    dense, same dim    192       0.067 (0.049-0.089)  0.049 (0.045-0.054)
    Kronecker 16 x 16  672       0.215 (0.148-0.413)  0.078 (0.050-0.193)
    dense, same dim    672       0.037 (0.026-0.045)  0.026 (0.023-0.029)
    Kronecker 32 x 32  2368      0.176 (0.115-0.323)  0.058 (0.044-0.132)
    dense, same dim    2368      0.021 (0.017-0.027)  0.014 (0.013-0.017)
    =================  ========  ===================  ====================

    (the ratio error is ``|ratio - 1|`` with ``ratio = ||x P||^2 / ||x||^2``
    per gradient; the inner-product error is ``|<xP, yP> - <x, y>| / (||x||
    ||y||)`` over pairs; "dense" is
    :class:`~attribkit.RandomProjector` with the same ``proj_dim``.) So at 16
    x 16 the norms are distorted about as much as by a dense projection of
    only ~20 dimensions, inner products about as much as by ~70, and the
    error varies several times more from seed to seed; quadrupling
    ``in_dim`` and ``out_dim`` (16x the dimension) lowers it by less than a
    half. Squared norms are still preserved in expectation (the mean over
    seeds is unbiased). What the structure buys is cost: no per-example
    gradient is formed, a batch costs one forward pass and one backward pass
    to the layer outputs plus two thin matrix products per token, and the
    matrices hold ``d_in k_in + d_out k_out`` entries instead of ``d_in d_out
    k_in k_out``. Guidance: keep ``in_dim = out_dim`` (for a given
    ``proj_dim`` that minimises ``1 / k_in + 1 / k_out``); prefer the largest
    sides the ``(n, proj_dim_)`` store allows; when ranks matter more than
    scores (finding proponents), compare the top-k of two seeds to check
    that a choice is large enough; and use a dense RandomProjector when the
    per-example gradients fit in memory one batch at a time and accuracy per
    stored dimension matters most. A layer narrower than ``in_dim`` or
    ``out_dim`` keeps that side at its width ``d`` (still a random ``d x d``
    JL matrix, not the identity).

    References
    ----------
    .. [1] S. K. Choe et al., "What is Your Data Worth to GPT? LLM-Scale Data
       Valuation with Influence Functions", 2024 (LoGra).

    Examples
    --------
    >>> import torch, attribkit as ak
    >>> model = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 3))
    >>> kp = ak.KroneckerProjector(in_dim=4, out_dim=4).fit(model)
    >>> kp.layers_, kp.proj_dim_
    (['0', '2'], 28)
    >>> X, y = torch.randn(6, 20), torch.randint(0, 3, (6,))
    >>> ak.per_example_gradients(model, (X, y), projector=kp).shape
    torch.Size([6, 28])
    """

    _array_mode = (
        "its projection acts on layer gradients as (d_out, d_in) matrices, and an array or "
        "dict of gradients does not say which entries form which Linear/Conv2d layer. Fit it "
        "on the model (kp.fit(model); data is ignored), then transform vectors in its layout."
    )
    _same_layout = False
    _transient = ("_mats",)

    def __init__(
        self,
        in_dim: int = 16,
        out_dim: int = 16,
        proj_type: str = "rademacher",
        seed: int = 0,
        layers: list | None = None,
        config: ComputeConfig | None = None,
    ):
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.proj_type = proj_type
        self.seed = seed
        self.layers = layers
        self.config = config

    # ------------------------------------------------------------------ fit
    def _check_params(self) -> None:
        V.check_int(self, "in_dim", self.in_dim, minimum=1)
        V.check_int(self, "out_dim", self.out_dim, minimum=1)
        V.check_option(self, "proj_type", self.proj_type, PROJ_TYPES)
        V.check_int(self, "seed", self.seed)
        # `layers` is validated against the model by resolve_layers at fit.

    def _fit_model(self, model, data, config) -> None:
        # Only the structure of the model matters; data is ignored.
        # The layers exactly as EKFACIFVP resolves them (one capture module for both).
        covered, skipped = capture.resolve_layers(model, self.layers, self)
        dims = OrderedDict()
        for layer in covered:
            d_out, d_in = layer.d_out, layer.d_in
            dims[layer.name] = (
                d_out,
                d_in,
                min(int(self.out_dim), d_out),
                min(int(self.in_dim), d_in),
            )
        self.layers_ = [layer.name for layer in covered]
        self.skipped_layers_ = list(skipped)
        self.skipped_reasons_ = OrderedDict(skipped)
        self.layer_dims_ = dims
        self.proj_dim_ = int(sum(ko * ki for _, _, ko, ki in dims.values()))
        # Plain data: the layout says how each weight holds its (d_out, d_in) matrix.
        self._layer_params = [
            (layer.weight_name, layer.bias_name, layer.layout) for layer in covered
        ]
        self._set_layout(capture.param_layout(covered))
        if self.layers is None:
            capture.warn_coverage(
                model, covered, self, "Their gradients are not projected: the projection "
                "describes the covered layers only.",
            )  # fmt: skip
        capture.warn_tied(
            covered, self, "per_example_gradients(model, data, projector=kp) projects the "
            "gradient of this use only, while transform projects whatever vector it is given "
            "under that name (per_example_gradients(params=[...]) sums every use): the two "
            "differ.",
        )  # fmt: skip

    # ------------------------------------------------------------ matrices
    def _init_transient(self) -> None:
        self._mats = {}  # position -> (P_in, P_out), built on first use

    @property
    def _compute_dtype(self) -> torch.dtype:
        return matmul_dtype(self._config.torch_dtype, self._device, stage="project")

    def _matrix(self, position: int, side: str, d: int, k: int) -> torch.Tensor:
        engine = Projection(
            layer_seed(self.seed, position, side),
            self.proj_type,
            1,
            d,
            k,
            dtype=self._config.torch_dtype,
            device=self._device,
            memory_budget=self._config.memory_budget,
        )
        return engine.matrix().to(self._compute_dtype)

    def matrices(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Get the two JL matrices of a covered layer.

        Regenerated from the seed on first use and cached until pickling or ``to``.

        Parameters
        ----------
        layer : str
            The name of a covered module (one of ``layers_``).

        Returns
        -------
        P_in : torch.Tensor of shape (d_in, k_in)
            The input-side matrix (``d_in`` counts the bias column).
        P_out : torch.Tensor of shape (d_out, k_out)
            The output-side matrix: the layer's gradient ``W`` (``(d_out,
            d_in)``) projects to ``P_out^T W P_in``. Both are on the fitted
            device, in ``config.dtype`` (float32 on the CPU for the half
            precisions, which the CPU multiplies in float32).

        Examples
        --------
        >>> import torch, attribkit as ak
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 3))
        >>> kp = ak.KroneckerProjector(in_dim=4, out_dim=2).fit(model)
        >>> P_in, P_out = kp.matrices("0")
        >>> tuple(P_in.shape), tuple(P_out.shape)
        ((11, 4), (3, 2))
        """
        check_is_fitted(self)
        if layer not in self.layer_dims_:
            raise ValueError(
                f"The 'layer' argument must be one of the covered layers {self.layers_}. "
                f"Got {layer!r} instead."
            )
        position = self.layers_.index(layer)
        mats = self._mats.get(position)
        if mats is None:
            d_out, d_in, k_out, k_in = self.layer_dims_[layer]
            mats = (
                self._matrix(position, "in", d_in, k_in),
                self._matrix(position, "out", d_out, k_out),
            )
            # Compute, then publish: concurrent transforms that race here build
            # the same pure matrices, and all use the one setdefault keeps.
            mats = self._mats.setdefault(position, mats)
        return mats

    # ------------------------------------------------------------ transform
    def _transform(self, X: torch.Tensor) -> torch.Tensor:
        cd = self._compute_dtype
        X = X.to(cd)
        m = X.shape[0]
        columns = offsets(self.param_shapes_)
        blocks = []
        for layer, (w_name, b_name, *layout) in zip(self.layers_, self._layer_params):
            d_out, d_in, k_out, k_in = self.layer_dims_[layer]
            P_in, P_out = self.matrices(layer)
            w0, w1 = columns[w_name]
            d_w = d_in - (b_name is not None)
            # (m, d_out, d_w), a view (Conv1D: the transposed weight); state from
            # before Conv1D has no layout entry.
            W = capture.matrix_view(X[:, w0:w1], layout[0] if layout else "out_in", d_out)
            bias = None
            if b_name is not None:
                b0, b1 = columns[b_name]
                bias = X[:, b0:b1]  # (m, d_out): the last column of W
            if k_in <= k_out:  # the cheaper order: shrink the input side first
                Y = W @ P_in[:d_w]  # (m, d_out, k_in)
                if bias is not None:
                    Y = Y + bias[:, :, None] * P_in[d_w]
                Z = P_out.T @ Y
            else:
                Y = P_out.T @ W  # (m, k_out, d_w)
                Z = Y @ P_in[:d_w]
                if bias is not None:
                    Z = Z + (bias @ P_out)[:, :, None] * P_in[d_w]
            blocks.append(Z.reshape(m, k_out * k_in))
        return torch.cat(blocks, dim=1)

    # ------------------------------------------------------------ hook path
    def project_gradients(self, model, data, *, loss="cross_entropy", params=None, config=None):
        """Projected per-example gradients batch by batch, from layer hooks.

        Overrides :meth:`attribkit.BaseEstimator.project_gradients`: the
        per-example gradients are never formed. Validates at once (fitted,
        the model matches the layout, ``params``), then returns ``(batches,
        proj_dim_)`` where ``batches`` yields ``(b, proj_dim_)`` tensors. Per
        batch: one forward pass with the capture hooks, the sum of the
        per-example losses, one backward pass to the layer outputs
        (``torch.autograd.grad``: no ``.grad`` is touched and no weight
        gradient is computed), then per layer ``sum_t (s_t P_out)^T (a_t P_in)``.

        Parameters
        ----------
        model : torch.nn.Module
            A model with the covered layers, of the fitted shapes.
        data : DataLoader, Dataset, tuple (inputs, targets), mapping or iterable of batches
            The examples.
        loss : {"cross_entropy", "mse", "causal_lm"} or callable, default="cross_entropy"
            The per-example loss, as in :func:`~attribkit.per_example_gradients`.
        params : list of str, optional
            None, or the covered parameters (``param_shapes_``, any order).
        config : ComputeConfig, optional
            ``batch_size`` and progress of the pass; default the estimator's.

        Returns
        -------
        batches : iterator of torch.Tensor
            ``(b, proj_dim_)`` per batch.
        k : int
            ``proj_dim_``.
        """
        check_is_fitted(self)
        config = V.check_config(self, self._config if config is None else config)
        loss_fn = resolve_loss(loss, "per_example_gradients")
        if params is not None and set(params) != set(self.param_shapes_):
            raise ValueError(
                "The 'params' argument of per_example_gradients must be None or name the "
                f"parameters KroneckerProjector covers ({list(self.param_shapes_)}) when "
                f"projector is a KroneckerProjector. Got {params!r}."
            )
        # The same modules on the model given now.
        try:
            covered, _ = capture.resolve_layers(model, self.layers_, self)
        except ValueError as exc:
            raise ValueError(
                "The model given to per_example_gradients does not match the layers the "
                f"KroneckerProjector was fitted on ({self.layers_}): {exc}"
            ) from exc
        layout = capture.param_layout(covered)
        if layout != self.param_shapes_:
            fitted = dict(self.param_shapes_)
            wrong = {k: (fitted.get(k), s) for k, s in layout.items() if fitted.get(k) != s}
            raise ValueError(
                "The model given to per_example_gradients does not match the layout the "
                f"KroneckerProjector was fitted on: {wrong} (fitted, model)."
            )
        return self._projected_batches(model, covered, data, loss, loss_fn, config), self.proj_dim_

    def _projected_batches(self, model, covered, data, loss, loss_fn, config):
        cd = self._compute_dtype
        mats = [self.matrices(layer) for layer in self.layers_]

        def forward(inputs):
            with torch.enable_grad():
                return call_model(model, inputs)

        owner = "per_example_gradients"
        batches = target_batches(
            data, loss=loss, fisher="empirical", call=forward, config=config, owner=owner,
            device=model_device(model), dtype=model_dtype(model), desc="projections",
            always_call=True, describe_first_failure=False,
        )  # fmt: skip
        with EvalMode(model, owner), capture.LayerCapture(model, covered, owner) as cap:
            for tb in batches:
                with torch.enable_grad():
                    # The sum of per-example losses: s is each example's own gradient.
                    pairs = cap.backward(loss_fn(tb.outputs, tb.targets).sum())
                blocks = []
                for (a, s), (P_in, P_out) in zip(pairs, mats):
                    aP = a.to(device=self._device, dtype=cd) @ P_in  # (b, T, k_in)
                    sP = s.to(device=self._device, dtype=cd) @ P_out  # (b, T, k_out)
                    blocks.append((sP.transpose(1, 2) @ aP).flatten(1))
                yield torch.cat(blocks, dim=1)
