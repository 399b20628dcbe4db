"""DataInf: a closed-form, layer-wise inverse Fisher-vector product.

DataInf (Kwon et al., 2024) replaces the inverse of each layer's damped
empirical Fisher by the mean of the inverses of its rank-one terms, each of
which Sherman-Morrison inverts in closed form. The whole approximation is then
two matrix products with the stored per-example gradients of the layer, and no
factorisation at all.

The whole data flow, from ``fit`` to ``transform``:

1. the layout is set and split into layers (``_resolve_layers``: by module
   prefix, per parameter, named groups or sizes), each layer a list of
   ``(start, stop)`` column segments of the flat vector;
2. per-example gradients arrive in ``(b, p)`` batches (streamed by
   :func:`attribkit._compute.gradients.iter_gradients` in model mode, the
   whole array in array mode); per layer its columns are kept in
   ``config.dtype`` and their squared norms ``‖g_i‖²`` in float64
   (``_collect``);
3. ``_finish`` joins the batches, reduces the example count and (for
   ``damping="auto"``) the per-layer sums of squared norms over processes,
   and sets ``damping_``: ``λ_l = 0.1 × mean_i ‖g_{l,i}‖² / d_l``;
4. ``transform(V)`` per layer: ``(1/λ)(V − ((V Gᵀ) * c) G)`` with
   ``c_i = 1 / (n (λ + ‖g_i‖²))``, in chunks of training examples within
   ``config.memory_budget`` (``_accumulate``), products at least in float32.

Sharded transform (after a distributed fit, ``len(shard_sizes_) > 1``):
each rank keeps only its shard's gradients, so ``transform`` is collective.
The ranks first agree on the vectors' shape and checksums
(``Reducer.agree``: a mismatch or a rank that failed before the collective
makes every rank raise); each rank then computes its shard's correction
``((V G_rᵀ) * c_r) G_r`` for all layers into one ``(m, n_features)``
tensor, one all-reduce sums the shards, and every rank finishes
``(V − correction) / λ`` per layer: the single-process result.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, OrderedDict

import torch

from .._compute import validation as V
from .._compute.budget import rows_within
from .._compute.distributed import Reducer, reducer
from .._compute.gradients import iter_gradients
from .._compute.model import param_shapes, select_params
from .._compute.precision import itemsize, matmul_dtype
from .._compute.vectors import flatten_dict, offsets
from ..base import BaseEstimator
from ..config import ComputeConfig

#: Per thread: whether the running collective transform reached its all-reduce.
#: A thread-local flag, not an attribute, so that transform never writes the
#: estimator (concurrent calls would read each other's progress).
_COLLECTIVE = threading.local()

__all__ = ["DataInfIFVP"]

_DAMPING_EXPECTED = (
    "a float > 0 (zero would divide by zero), a non-empty list of such floats "
    "(one per layer) or 'auto'"
)
_LAYERS_EXPECTED = (
    "'module', 'parameter', a non-empty list of non-empty lists of parameter names, "
    "or a non-empty list of layer sizes (ints >= 1)"
)


class DataInfIFVP(BaseEstimator):
    """Layer-wise inverse Fisher-vector products in DataInf's closed form.

    For layer ``l`` with per-example training gradients ``g_i`` (restricted to
    the layer's parameters, ``d_l`` of them) and damping ``λ_l``, DataInf
    approximates the inverse of the damped empirical Fisher
    ``(1/n) Σ_i g_i g_iᵀ + λ_l I`` by the mean of the inverses of its rank-one
    terms, ``(1/n) Σ_i (g_i g_iᵀ + λ_l I)⁻¹``, which Sherman-Morrison gives in
    closed form:

    ``IFVP_l(v) = (1/λ_l) (v − (1/n) Σ_i (g_iᵀ v) / (λ_l + ‖g_i‖²) g_i)``.

    ``transform`` applies this to ``m`` vectors at once with two matrix
    products per layer, ``((V_l G_lᵀ) * c) G_l`` with
    ``c_i = 1 / (n (λ_l + ‖g_i‖²))``, in chunks of training examples so the
    ``(m, n_chunk)`` temporary stays within ``config.memory_budget``. Layers
    are independent: the result is block-diagonal over layers.

    dattri 0.1.0's ``ifvp_datainf`` uses a damping of 0
    when ``regularization`` is None, which divides by zero (``1/λ``). This
    estimator never does: ``damping="auto"`` is the paper's automatic choice
    ``λ_l = 0.1 × mean_i ‖g_{l,i}‖² / d_l`` (a tenth of the layer's mean
    squared gradient entry), and a zero damping raises ``ValueError``.

    DataInf must keep the per-example training gradients: fitting stores an
    ``(n_samples, n_features)`` matrix in ``config.dtype`` (split by layer);
    ``memory_budget`` bounds only the temporaries of ``transform``.

    **Distributed.** With ``config.distributed`` on and a ``torch.distributed``
    process group of ``W > 1`` ranks, a model-mode ``fit`` is collective:
    every rank passes its own shard of the data (uneven shards, or an empty
    one, are fine as long as the union is not empty) and keeps only its
    shard's gradients, so the memory is split over the ranks. The example
    counts and, for ``damping="auto"``, the per-layer sums of squared norms
    are reduced, so ``damping_`` and ``n_samples_`` are those of the union.
    ``transform`` is then collective too: **every rank must call it, with
    the same vectors**; each computes its shard's partial sums
    ``((V G_rᵀ) * c_r) G_r`` and one all-reduce of an ``(m, n_features)``
    tensor adds them, so every rank gets the single-process result. Before
    that the ranks all-gather the shape and checksums of their arguments:
    different shapes or values, or a rank whose input is invalid, make every
    rank raise ``ValueError`` instead of hanging (a rank that does not call
    ``transform`` at all still blocks the others until the process group's
    timeout). ``attribkit.influence`` and ``self_influence`` call it the same
    way, so they are collective with such an estimator. A pickled shard
    refuses to ``transform`` outside its process group. Array-mode fits stay
    local.

    Parameters
    ----------
    damping : float, list of float or "auto", default="auto"
        ``λ_l``. A float > 0 is used for every layer; a list gives one value
        > 0 per layer, in the order of ``layers_`` (its length is checked at
        fit, when the layers are known); ``"auto"`` is
        ``0.1 × mean_i ‖g_{l,i}‖² / d_l`` per layer, and raises
        ``ValueError`` naming a layer whose training gradients are all zero.
    layers : "module", "parameter", list of list of str, or list of int, \
default="module"
        How the parameters are split into layers.

        * model mode: ``"module"`` puts the parameters of one module in one
          layer (names grouped by the prefix before their last ``'.'``, e.g.
          ``0.weight`` and ``0.bias``); ``"parameter"`` makes each parameter
          tensor its own layer.
        * array mode: ``"module"`` (the default) makes one layer of a plain
          array and groups a dict's keys by module prefix exactly as model
          mode groups parameter names (``{"0.weight", "0.bias", "2.weight"}``
          gives two layers; keys without a ``'.'`` share the empty prefix and
          form one layer), so the dict of
          ``per_example_gradients(..., flatten=False)`` gives the same layers
          and scores as fitting on the model; ``"parameter"`` makes one layer
          per key.
        * either mode: a list of lists of parameter names (keys of
          ``param_shapes_``), which must partition them, each name in exactly
          one layer; or a list of layer sizes (ints >= 1 summing to
          ``n_features_in_``) splitting the flat vector into consecutive
          blocks.
    loss : {"cross_entropy", "mse", "causal_lm"} or callable, default="cross_entropy"
        Per-example loss differentiated in model mode, as in
        :func:`~attribkit.per_example_gradients` (``"causal_lm"``: the summed
        next-token cross-entropy of a language model); a callable takes
        ``(outputs, targets)`` and returns losses of shape ``(batch,)``.
        DataInf's derivation assumes a log-likelihood loss (cross-entropy), for
        which the Fisher is the loss curvature.
    params : list of str, optional
        Names of the parameters to differentiate in model mode (default: all
        trainable parameters).
    config : ComputeConfig, optional
        ``dtype`` and ``device`` of the stored gradients and of the outputs,
        ``batch_size`` of the gradient pass, ``memory_budget`` of
        ``transform``'s chunks. Float16/bfloat16 gradients are stored in that
        dtype and the products computed in float32.

    Attributes
    ----------
    damping_ : list of float
        ``λ_l`` of each layer, in the order of ``layers_``.
    layers_ : list
        One entry per layer, in the order used by ``damping_`` and
        ``train_gradients_``: the list of parameter names (keys of
        ``param_shapes_``, in layout order) forming the layer; or, when
        ``layers`` was a list of sizes, the ``(start, stop)`` range of flat
        feature indices of the layer.
    train_gradients_ : list of torch.Tensor
        Per layer, the ``(n_samples_, d_l)`` per-example training gradients
        in ``config.dtype`` on ``config.device``; the columns are the layer's
        coordinates of the flat vector, in layout order.
    train_sq_norms_ : list of torch.Tensor
        Per layer, the ``(n_samples_,)`` squared norms ``‖g_{l,i}‖²`` in
        float64, computed from the gradients before they are cast to
        ``config.dtype``.
    n_samples_ : int
        Number of training examples ``n`` (over all ranks after a
        distributed fit).
    shard_sizes_ : tuple of int
        Examples held by each rank, in rank order: ``(n_samples_,)`` after
        a single-process fit; after a distributed fit ``train_gradients_``
        holds this rank's ``shard_sizes_[rank]`` rows only.
    n_features_in_ : int
        Length of the flat vectors the estimator accepts.
    param_shapes_ : OrderedDict
        ``name -> shape`` of the parameters (or of the array-mode blocks)
        whose flattened concatenation, in this order, is a flat vector.
    feature_names_in_ : ndarray of str
        Column names of a DataFrame given to ``fit`` in array mode (only then).

    See Also
    --------
    ExplicitIFVP : The exact damped inverse Fisher, for comparison.

    References
    ----------
    Y. Kwon, E. Wu, K. Wu and J. Zou. "DataInf: Efficiently Estimating Data
    Influence in LoRA-tuned LLMs and Diffusion Models." ICLR 2024.
    https://arxiv.org/abs/2310.00902

    Examples
    --------
    >>> import torch
    >>> from attribkit import DataInfIFVP
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> X, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    >>> ifvp = DataInfIFVP().fit(model, (X, y))
    >>> ifvp.layers_
    [['0.weight', '0.bias'], ['2.weight', '2.bias']]
    >>> ifvp.transform(torch.randn(5, ifvp.n_features_in_)).shape
    torch.Size([5, 23])

    Array mode, two layers of sizes 3 and 2:

    >>> import numpy as np
    >>> G = np.random.default_rng(0).normal(size=(10, 5))
    >>> ifvp = DataInfIFVP(damping=0.1, layers=[3, 2]).fit(G)
    >>> ifvp.layers_
    [(0, 3), (3, 5)]
    >>> ifvp.transform(G[:2]).shape
    (2, 5)
    """

    _agree_on_fit = True  # model-mode fits communicate: the ranks agree first

    def __init__(
        self,
        damping: float | list[float] | str = "auto",
        layers: str | list = "module",
        loss="cross_entropy",
        params: list[str] | None = None,
        config: ComputeConfig | None = None,
    ):
        self.damping = damping
        self.layers = layers
        self.loss = loss
        self.params = params
        self.config = config

    # ------------------------------------------------------------ parameters
    def _check_params(self) -> None:
        V.check_damping(
            self, self.damping, positive=True, per_layer=True, expected=_DAMPING_EXPECTED
        )

        layers = self.layers
        if isinstance(layers, str):
            V.check_option(self, "layers", layers, ("module", "parameter"))
        elif not isinstance(layers, (list, tuple)) or not layers:
            raise V.param_error(self, "layers", _LAYERS_EXPECTED, layers)
        elif all(V.is_int(s) for s in layers):
            if min(layers) < 1:
                raise V.param_error(self, "layers", _LAYERS_EXPECTED, layers)
        elif not all(
            isinstance(group, (list, tuple))
            and group
            and all(isinstance(name, str) for name in group)
            for group in layers
        ):
            raise V.param_error(self, "layers", _LAYERS_EXPECTED, layers)

        V.check_loss(self, self.loss)
        V.check_params(self, self.params)

    # ------------------------------------------------------------ layers
    def _resolve_layers(self, model_mode: bool) -> None:
        """Set ``layers_`` and the flat ``(start, stop)`` segments of each layer."""
        shapes = self.param_shapes_
        names = list(shapes)
        columns = offsets(shapes)

        layers = self.layers
        if isinstance(layers, str):
            # Array mode groups a dict's keys exactly as model mode groups the
            # parameter names, so per_example_gradients(..., flatten=False)
            # gives the same layers (and scores) in both modes.
            if layers == "module":
                groups: OrderedDict[str, list[str]] = OrderedDict()
                for name in names:
                    groups.setdefault(name.rpartition(".")[0], []).append(name)
                layers_ = list(groups.values())
            else:
                layers_ = [[name] for name in names]
        elif all(V.is_int(s) for s in layers):
            sizes = [int(s) for s in layers]
            if sum(sizes) != self.n_features_in_:
                raise ValueError(
                    f"The 'layers' parameter of {type(self).__name__} gives layer sizes "
                    f"summing to {sum(sizes)}, but the vectors have n_features="
                    f"{self.n_features_in_}. Got {list(layers)!r} instead."
                )
            layers_ = list(itertools.pairwise(itertools.accumulate(sizes, initial=0)))
        else:
            counts = Counter(name for group in layers for name in group)
            unknown = [n for n in counts if n not in columns]
            repeated = [n for n, c in counts.items() if c > 1]
            missing = [n for n in names if n not in counts]
            if unknown or repeated or missing:
                raise ValueError(
                    f"The 'layers' parameter of {type(self).__name__} must partition the "
                    f"parameters {names} into layers, each name in exactly one layer. "
                    f"Unknown: {unknown}; repeated: {repeated}; missing: {missing}."
                )
            order = {n: i for i, n in enumerate(names)}
            # Layout order inside a layer: adjacent parameters then form one
            # contiguous segment, read as a view without a copy.
            layers_ = [sorted(group, key=order.__getitem__) for group in layers]

        segments = []
        for layer in layers_:
            parts = [layer] if isinstance(layer, tuple) else [columns[n] for n in layer]
            merged: list[tuple[int, int]] = []
            for s, e in parts:
                if merged and merged[-1][1] == s:
                    merged[-1] = (merged[-1][0], e)
                else:
                    merged.append((s, e))
            segments.append(merged)

        n_layers = len(layers_)
        if isinstance(self.damping, (list, tuple)) and len(self.damping) != n_layers:
            raise ValueError(
                f"The 'damping' parameter of {type(self).__name__} must have one value per "
                f"layer: {n_layers} layers ({layers_}). Got a list of length "
                f"{len(self.damping)} instead."
            )
        self.layers_ = layers_
        self._segments = segments

    def _layer_label(self, k: int) -> str:
        layer = self.layers_[k]
        if isinstance(layer, tuple):
            return f"layer {k} (flat features {layer[0]}:{layer[1]})"
        return f"layer {k} ({layer})"

    @staticmethod
    def _gather(flat: torch.Tensor, segments) -> torch.Tensor:
        """The layer's columns of ``flat``: a view for one segment, else a copy."""
        if len(segments) == 1:
            s, e = segments[0]
            return flat[:, s:e]
        return torch.cat([flat[:, s:e] for s, e in segments], dim=1)

    # ------------------------------------------------------------ fit
    def _fit_model(self, model, data, config: ComputeConfig) -> None:
        selected = select_params(model, self.params, self)
        shapes = param_shapes(selected)
        self._set_layout(shapes)
        # Before the gradient pass, so a bad 'layers' or damping list fails fast.
        self._resolve_layers(model_mode=True)
        blocks: list[list[torch.Tensor]] = [[] for _ in self._segments]
        norms: list[list[torch.Tensor]] = [[] for _ in self._segments]
        red = reducer(config, "DataInfIFVP.fit", device=self._device)
        # Distributed: this rank's shard (possibly empty) stays here; every
        # rank stops together if any rank's pass fails.
        with red.shard_pass("DataInfIFVP.fit") as shard:
            for grads in iter_gradients(
                model,
                data,
                loss=self.loss,
                params=self.params,
                config=config,
                owner=self,
                desc="DataInf gradients",
            ):
                flat = flatten_dict(grads, shapes)
                self._collect(flat, blocks, norms, config)
                shard.count += flat.shape[0]
            self._check_norms([torch.cat(parts) for parts in norms])
        self._finish(blocks, norms, red)

    def _fit_array(self, G: torch.Tensor, config: ComputeConfig) -> None:
        self._resolve_layers(model_mode=False)
        blocks: list[list[torch.Tensor]] = [[] for _ in self._segments]
        norms: list[list[torch.Tensor]] = [[] for _ in self._segments]
        self._collect(G, blocks, norms, config)
        self._finish(blocks, norms)

    def _collect(self, flat, blocks, norms, config: ComputeConfig) -> None:
        """Append one batch of flat per-example gradients, split by layer."""
        for k, segments in enumerate(self._segments):
            g = self._gather(flat, segments)
            # Squared norms in float64 from the gradients as computed, before
            # the cast to config.dtype: c_i = 1/(n(λ+‖g_i‖²)) keeps full precision.
            norms[k].append(
                torch.linalg.vector_norm(g, dim=1, dtype=torch.float64).square().to(self._device)
            )
            # torch.cat in _finish copies, so a view of the user's array is never kept.
            blocks[k].append(g.to(device=self._device, dtype=config.torch_dtype))

    def _check_norms(self, sq_norms) -> None:
        for k, s in enumerate(sq_norms):
            if not bool(torch.isfinite(s).all()):
                raise ValueError(
                    f"The per-example gradients of {self._layer_label(k)} contain NaN or "
                    "infinity (or overflow when squared); check the model, the data and "
                    "the loss."
                )

    def _finish(self, blocks, norms, red: Reducer | None = None) -> None:
        red = Reducer(False) if red is None else red
        widths = [sum(e - s for s, e in segments) for segments in self._segments]
        if not norms[0]:  # an empty shard on this rank of a distributed fit
            norms = [[torch.zeros(0, dtype=torch.float64, device=self._device)] for _ in norms]
            blocks = [
                [torch.zeros(0, d, dtype=self._config.torch_dtype, device=self._device)]
                for d in widths
            ]
        sq_norms = [torch.cat(parts) for parts in norms]
        self._check_norms(sq_norms)
        # Distributed: the example counts of every shard and the per-layer
        # sums of squared norms are reduced; the gradients stay on their rank.
        sizes = [r[0] for r in red.gather_ints([sq_norms[0].shape[0]])]
        n = sum(sizes)
        sums = torch.stack([s.sum() for s in sq_norms])
        red.sum_(sums)
        if self.damping == "auto":
            damping = []
            for k in range(len(sq_norms)):
                d = widths[k]
                lam = 0.1 * float(sums[k]) / n / d if d else 0.0
                if not lam > 0:
                    raise ValueError(
                        f"damping='auto' of {type(self).__name__} is 0.1 × the mean squared "
                        f"gradient entry of each layer, but the training gradients of "
                        f"{self._layer_label(k)} are all zero, which would divide by zero. "
                        "Pass a float damping > 0, or leave the layer out ('params')."
                    )
                damping.append(lam)
        elif isinstance(self.damping, (list, tuple)):
            damping = [float(d) for d in self.damping]
        else:
            damping = [float(self.damping)] * len(sq_norms)
        train = []
        for k in range(len(blocks)):
            train.append(torch.cat(blocks[k]))
            blocks[k] = None  # free each layer's batches as soon as they are joined
        self.damping_ = damping
        self.train_gradients_ = train
        self.train_sq_norms_ = sq_norms
        self.n_samples_ = n
        self.shard_sizes_ = tuple(sizes)
        self._shard_rank = red.rank

    # ------------------------------------------------------------ transform
    def transform(self, vectors):
        """Apply the layer-wise DataInf IFVP to a batch of vectors.

        After a distributed fit (``len(shard_sizes_) > 1``) this is a
        collective call: every rank of the process group must call it
        together, with the same vectors, and gets the same result (see the
        class docstring). Ranks that pass arguments of different shapes or
        values, or a rank whose input is invalid, make every rank raise
        ``ValueError`` instead of hanging.

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
        if len(getattr(self, "shard_sizes_", ())) <= 1:
            return super().transform(vectors)
        red = self._shard_reducer()
        _COLLECTIVE.reached = False
        try:
            return super().transform(vectors)
        except Exception:
            if not _COLLECTIVE.reached:
                # This rank failed before the collective: tell the others,
                # which would otherwise wait for it, then raise its own error.
                red.agree("DataInfIFVP.transform", failed=True)
            raise

    def _shard_reducer(self) -> Reducer:
        """The reducer of the process group this estimator was fitted across."""
        sizes, rank = self.shard_sizes_, self._shard_rank
        try:
            red = reducer(self._config, "DataInfIFVP.transform", device=self._device)
        except RuntimeError:
            red = Reducer(False)
        if not red.active or red.world_size != len(sizes) or red.rank != rank:
            now = f"rank {red.rank} of {red.world_size}" if red.active else "no process group"
            raise RuntimeError(
                f"This DataInfIFVP was fitted across {len(sizes)} processes and holds only "
                f"rank {rank}'s shard of the training gradients ({sizes[rank]} of "
                f"{self.n_samples_} examples), so transform must be called together by every "
                f"rank of that process group (it all-reduces partial sums over the shards). "
                f"Here there is {now}. Refit in one process for a self-contained estimator."
            )
        return red

    def _transform(self, V: torch.Tensor) -> torch.Tensor:
        # Half precisions store compactly but multiply in float32.
        V = V.to(matmul_dtype(V.dtype, stage="accumulate"))
        if len(getattr(self, "shard_sizes_", ())) > 1:
            return self._transform_sharded(V)
        if len(self._segments) == 1 and self._segments[0] == [(0, self.n_features_in_)]:
            return self._layer_ifvp(0, V)
        out = torch.empty_like(V)
        for k, segments in enumerate(self._segments):
            result = self._layer_ifvp(k, self._gather(V, segments))
            start = 0
            for s, e in segments:
                out[:, s:e] = result[:, start : start + e - s]
                start += e - s
        return out

    def _transform_sharded(self, V: torch.Tensor) -> torch.Tensor:
        """The IFVP from this rank's shard: partial sums all-reduced, once per call.

        Every rank computes ``((V G_rᵀ) * c_r) G_r`` over its own examples
        for all layers into one ``(m, n_features)`` tensor, which one
        all-reduce sums; the shards' sum is the single-process sum.
        """
        red = self._shard_reducer()
        _COLLECTIVE.reached = True
        # Checksums of V: the ranks must pass the same vectors, not just shapes.
        weights = torch.cos(torch.arange(V.shape[1], device=V.device)).to(V.dtype)
        fingerprint = (
            float(torch.linalg.vector_norm(V, ord=1, dtype=torch.float64)),
            float(V.sum(dtype=torch.float64)),
            float((V @ weights).sum(dtype=torch.float64)),
        )
        red.agree("DataInfIFVP.transform", shape=V.shape, fingerprint=fingerprint)
        correction = torch.zeros_like(V)
        for k, segments in enumerate(self._segments):
            part = self._layer_correction(k, self._gather(V, segments))
            start = 0
            for s, e in segments:
                correction[:, s:e] = part[:, start : start + e - s]
                start += e - s
        red.sum_(correction)
        out = V - correction
        for k, segments in enumerate(self._segments):
            for s, e in segments:
                out[:, s:e] /= self.damping_[k]
        return out

    def _layer_correction(self, k: int, Vl: torch.Tensor) -> torch.Tensor:
        """``((V Gᵀ) * c) G`` over this rank's examples of layer ``k``, chunked."""
        return self._accumulate(k, Vl, torch.zeros_like(Vl), alpha=1.0)

    def _layer_ifvp(self, k: int, Vl: torch.Tensor) -> torch.Tensor:
        """``(1/λ)(V − ((V Gᵀ) * c) G)`` for one layer, chunked over examples."""
        acc = Vl.clone()  # Vl may be a view of the caller's input: never write to it
        return self._accumulate(k, Vl, acc, alpha=-1.0).div_(self.damping_[k])

    def _accumulate(self, k: int, Vl: torch.Tensor, acc: torch.Tensor, alpha: float):
        """``acc += alpha ((V Gᵀ) * c) G`` over the kept examples of layer ``k``.

        ``c_i = 1 / (n (λ + ‖g_i‖²))`` with ``n = n_samples_`` (over all ranks);
        the examples go in chunks whose temporaries fit ``config.memory_budget``.
        """
        G = self.train_gradients_[k]
        lam = self.damping_[k]
        rows, d = G.shape
        m = Vl.shape[0]
        c = (1.0 / (self.n_samples_ * (lam + self.train_sq_norms_[k]))).to(Vl.dtype)
        # Bytes per training example in a chunk: its column of the (m, chunk)
        # coefficients, plus its upcast gradient row when G is stored in half.
        per_example = itemsize(Vl.dtype) * max(1, m + (d if G.dtype != Vl.dtype else 0))
        chunk = rows_within(self._config.memory_budget, per_example, rows)
        for s in range(0, rows, chunk):
            Gc = G[s : s + chunk].to(Vl.dtype)
            coef = Vl @ Gc.T
            coef.mul_(c[s : s + chunk])
            acc.addmm_(coef, Gc, alpha=alpha)
        return acc
