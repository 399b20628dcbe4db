"""Layer capture for Kronecker-factored methods: the one place that hooks a model.

EKFACIFVP (``ekfac.py``) and the LoGra-style ``KroneckerProjector`` both need,
for each covered layer and each batch, the layer input ``a`` and the gradient
``s`` of the per-example loss with respect to the layer output. This module
finds the layers, describes their parameter layout and captures ``(a, s)``;
it computes no statistics.

Module types are covered through a registry keyed by type (as opacus'
``grad_sample``): one :class:`LayerRule` per type says how wide its gradient
matrix is (``fan_in``, ``fan_out``), how its weight holds that matrix
(``layout``), how to turn the module's input into the ``(batch, T, d_in)``
rows ``a`` and its output gradient into the ``(batch, T, d_out)`` rows
``s``, and when a module of that type cannot be covered (a grouped
convolution). ``nn.Linear``, ``nn.Conv2d`` and Hugging Face's ``Conv1D``
(``transformers.pytorch_utils.Conv1D``: ``y = x @ W + b`` with ``W`` of shape
``(in, out)``, the ``nn.Linear`` it is with its weight transposed) are
registered here; a new type is one :func:`register` call. Lookup follows the
class's MRO (a subclass of ``nn.Linear`` is covered as one) and also accepts
a ``"module.QualName"`` string key, so a type is registered without importing
the library that defines it (``Conv1D`` is: transformers is never imported).

Interface
---------
``resolve_layers(model, layers=None, owner="EKFACIFVP") -> (list[KFACLayer], skipped)``
    ``layers=None``: every registered module (a ``Conv2d`` with ``groups=1``)
    with a trainable parameter whose parameters no other module holds, in
    ``model.named_modules()`` order; ``skipped`` is an ordered dict ``module
    name -> reason`` of the modules with trainable parameters of their own
    that are not covered: another type (LayerNorm, Embedding, grouped
    convolutions, ``nn.MultiheadAttention`` with its ``out_proj``, whose
    forward is never called, ...) or a tied weight (a parameter another
    module also holds, as GPT-2's ``lm_head.weight`` is its
    ``transformer.wte.weight``). Parameter-free and frozen modules are not
    listed (peft's LoRA wrappers hold no parameter of their own and their
    base layers are frozen: what is covered are their ``lora_A``/``lora_B``
    ``nn.Linear`` modules). Given module names (any order, returned in model
    order): a name the model does not have, or a module of an unsupported
    type, raises ``ValueError`` naming it; requested modules are covered
    whether or not their parameters are trainable, and a module with a tied
    weight is covered under the weight's first name
    (``KFACLayer.shared_with`` names the other modules; the estimators warn),
    but two requested modules holding the same parameter raise.
``param_layout(layers) -> OrderedDict``
    ``parameter name -> shape`` of the covered parameters, in the order of
    ``model.named_parameters()`` (per layer its weight, then its bias, layers
    in model order, unless a tied weight's first name comes earlier); the
    names are those of ``model.named_parameters()`` (a tied weight has its
    first name), so ``per_example_gradients(model, data,
    params=list(param_layout(layers)))`` gives vectors in this layout.
``coverage(model, layers)`` and ``warn_coverage`` / ``warn_tied``
    The share of the model's trainable parameters the layers hold, with the
    largest modules left out; the warnings both estimators give at fit.
``LayerCapture(model, layers, owner)``
    A context manager. On entry it registers one forward hook per covered
    layer; on exit (also when an exception is raised inside) it removes every
    hook it registered. Inside, each forward call of a covered module (with
    gradients enabled) records

    * ``a``: the layer input as ``(batch, T, d_in)``, detached, with a column
      of ones appended when the layer has a bias (so ``d_in`` counts it).
      ``nn.Linear`` and ``Conv1D`` on ``(batch, features)``: ``T = 1``; on
      ``(batch, *dims, features)`` (tokens): ``T = prod(dims)``.
      ``nn.Conv2d``: the input unfolded (im2col) with
      ``torch.nn.functional.unfold`` and the conv's ``kernel_size``,
      ``dilation``, ``padding`` and ``stride`` (string paddings and the
      non-zero ``padding_mode`` values are applied first with ``F.pad``, as
      the conv does), so ``T`` = number of output positions and
      ``d_in = in_channels * kh * kw [+ 1]``, features ordered like
      ``weight.reshape(out_channels, -1)``;
    * a gradient edge of the layer output (taken at that moment, so later
      in-place changes of the output, e.g. ``ReLU(inplace=True)``, do not
      alter what is differentiated).

    ``capture.backward(loss, retain_graph=False)`` then differentiates a
    scalar ``loss`` (use the SUM of per-example losses, never the mean, so
    that ``s`` is the per-example gradient) with respect to the recorded
    outputs only (no parameter gradient is computed or accumulated, ``.grad``
    is never touched) and returns one ``(a, s)`` pair per layer, in layer
    order, with ``s`` shaped ``(batch, T, d_out)`` (conv: output positions in
    ``unfold`` order). Call it several times with ``retain_graph=True`` for
    several losses on one forward (``fisher="expected"``: one per class); the
    recorded ``a`` are the same tensors each time. ``capture.inputs()``
    returns the ``a`` of the last forward without a backward;
    ``capture.row_masks(token_mask(inputs))`` which rows of each layer are
    real tokens under a batch's ``(batch, L)`` attention mask (call it before
    ``backward``); ``capture.reset()`` forgets the recorded forward
    (``backward`` does that itself unless ``retain_graph=True``). A module
    called several times in one forward (weight sharing) has its calls
    concatenated along ``T``.

With ``a`` and ``s`` so shaped, the per-example gradient of a layer's weight
matrix (bias as the last column) is ``sum_t s[i, t, :] outer a[i, t, :]`` =
``s[i].T @ a[i]``, shape ``(d_out, d_in)``. How a weight holds its part of
that matrix is the layer's ``layout``, plain data an estimator keeps in its
fitted state: ``"out_in"`` (``nn.Linear``, ``nn.Conv2d``: the matrix is
``weight.reshape(d_out, -1)``) or ``"in_out"`` (``Conv1D``: the matrix is
``weight.T``). :func:`matrix_view` turns flat weights into matrices (a view,
for reading or writing), and ``matrix_to_params`` / ``params_to_matrix``
convert between the matrix and a layer's parameters.

A layer whose output does not require grad (frozen parameters and nothing
trainable upstream) is differentiated at a fresh leaf and the model goes on
with a copy of it (:func:`output_edge`), so its ``s`` is still defined; the
model's parameters and their ``requires_grad`` flags are never changed. The
model itself is called with :func:`attribkit._compute.model.call_model`, the
one model-call dispatcher.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

from . import validation as V


def output_edge(output: torch.Tensor):
    """Where to differentiate a hooked module's output, and what its forward hook returns.

    Returns ``(edge, replaced)``. An output that requires grad gives its
    gradient edge, taken now so that it survives later in-place changes of
    the output (``relu_`` after a layer), and ``replaced`` is None: the model
    goes on with its own output. An output that does not (nothing upstream is
    differentiated: frozen parameters, integer inputs) gives a fresh leaf
    that requires grad as the edge, and the model is handed a copy of it as
    ``replaced``, since an in-place op on a leaf that requires grad would
    fail. The model's parameters and their ``requires_grad`` flags are never
    changed. Both hook captures (:class:`LayerCapture` and the per-example
    one of :mod:`attribkit._compute.gradients`) go through this.
    """
    if output.requires_grad:
        return get_gradient_edge(output), None
    leaf = output.detach().requires_grad_()
    return leaf, leaf.clone()


__all__ = [
    "LAYOUTS",
    "KFACLayer",
    "LayerCapture",
    "LayerRule",
    "coverage",
    "matrix_to_params",
    "matrix_view",
    "output_edge",
    "param_layout",
    "params_to_matrix",
    "register",
    "resolve_layers",
    "rule_for",
    "token_mask",
    "warn_coverage",
    "warn_tied",
]


# --------------------------------------------------------------------------- layouts
#: How a weight holds its layer's ``(d_out, fan_in)`` gradient matrix.
LAYOUTS = {
    "out_in": "the matrix is weight.reshape(d_out, -1) (nn.Linear, nn.Conv2d)",
    "in_out": "the matrix is weight.T, the weight being (fan_in, d_out) (Conv1D)",
}


def matrix_view(weight: torch.Tensor, layout: str, d_out: int) -> torch.Tensor:
    """The ``(m, d_out, fan_in)`` matrices of flat weights ``(m, n_w)``, as a view.

    A view, never a copy: read it, or ``copy_`` into it to write matrices back
    into the flat weights (a column slice of a larger matrix is fine).
    ``layout`` is plain data (:data:`LAYOUTS`), so a fitted estimator converts
    vectors without the module.
    """
    if layout == "out_in":
        return weight.unflatten(1, (d_out, -1))
    if layout == "in_out":
        return weight.unflatten(1, (-1, d_out)).transpose(1, 2)
    raise ValueError(f"Unknown weight layout {layout!r}; expected one of {list(LAYOUTS)}.")


# --------------------------------------------------------------------------- registry
def _weight_rows(module: nn.Module) -> int:
    return int(module.weight.shape[0])


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How the modules of one type are captured (one registry entry).

    Attributes
    ----------
    kind : str
        Short name of the type (``"linear"``, ``"conv2d"``, ``"conv1d"``).
    label : str
        The type as error messages name it (``"nn.Linear"``).
    fan_in : callable
        ``module -> int``: columns of the weight gradient matrix, bias excluded
        (``in_features``; ``in_channels * kh * kw`` for a conv).
    inputs : callable
        ``(module, x) -> (batch, T, fan_in)``: the rows ``a`` from the module's
        first input ``x`` (detached), before the bias column is appended.
    output_grads : callable
        ``(module, g) -> (batch, T, d_out)``: the rows ``s`` from the gradient
        ``g`` of the module's output, in the order of ``inputs``' rows.
    unsupported : callable
        ``module -> str or None``: why this module cannot be covered (None when
        it can), e.g. a grouped convolution.
    fan_out : callable
        ``module -> int``: rows of the matrix, ``d_out`` (default the weight's
        first dimension).
    layout : str
        How the weight holds the matrix (:data:`LAYOUTS`; default ``"out_in"``).
    """

    kind: str
    label: str
    fan_in: Callable[[nn.Module], int]
    inputs: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    output_grads: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    unsupported: Callable[[nn.Module], str | None] = lambda module: None
    fan_out: Callable[[nn.Module], int] = _weight_rows
    layout: str = "out_in"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"LayerRule.layout must be one of {list(LAYOUTS)}; got {self.layout!r}."
            )


#: type (or "module.QualName") -> LayerRule; see :func:`register`.
RULES: dict = {}


def register(module_type, rule: LayerRule) -> None:
    """Cover modules of ``module_type`` (a class or a ``"module.QualName"`` string)."""
    RULES[module_type] = rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule of the first class in ``type(module).__mro__`` that is registered."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls) or RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


def _labels(sep: str) -> str:
    labels = list(dict.fromkeys(rule.label for rule in RULES.values()))
    return sep.join(labels)


def _token_inputs(label: str):
    def inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2:
            raise ValueError(
                f"{label} layers must get batched inputs (batch, ..., features) to be "
                f"captured; got an input of shape {tuple(x.shape)}."
            )
        return x.reshape(x.shape[0], -1, x.shape[-1])

    return inputs


def _token_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _conv_inputs(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """im2col of a conv input: ``(batch, positions, in * kh * kw)``."""
    if x.ndim != 4:
        raise ValueError(
            f"nn.Conv2d inputs must be (batch, channels, height, width) to be captured; got "
            f"shape {tuple(x.shape)} (unbatched input is not supported)."
        )
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        # What Conv2d itself does for padding_mode != "zeros"; for the string
        # paddings the same attribute holds the (possibly asymmetric) amounts.
        pads = module._reversed_padding_repeated_twice
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
        padding = 0
    cols = F.unfold(
        x,
        kernel_size=module.kernel_size,
        dilation=module.dilation,
        padding=padding,
        stride=module.stride,
    )
    return cols.transpose(1, 2)


def _conv_positions(module: nn.Conv2d, g: torch.Tensor) -> torch.Tensor:
    return g.flatten(2).transpose(1, 2)


def _grouped(module: nn.Conv2d) -> str | None:
    if module.groups != 1:
        return (
            f"a grouped convolution (groups={module.groups}): its weight gradient is "
            "block-diagonal over groups, which one Kronecker factor pair does not describe"
        )
    return None


register(
    nn.Linear,
    LayerRule(
        "linear", "nn.Linear", lambda m: m.in_features, _token_inputs("nn.Linear"), _token_rows
    ),
)
register(
    nn.Conv2d,
    LayerRule(
        "conv2d",
        "nn.Conv2d",
        lambda m: math.prod(m.weight.shape[1:]),
        _conv_inputs,
        _conv_positions,
        _grouped,
    ),
)
# Hugging Face's GPT-style Conv1D, y = x @ W + b with W (in, out): the nn.Linear it
# is, its weight the transposed matrix. Keyed by name: transformers is not imported.
register(
    "transformers.pytorch_utils.Conv1D",
    LayerRule(
        "conv1d",
        "Conv1D",
        lambda m: int(m.weight.shape[0]),
        _token_inputs("Conv1D"),
        _token_rows,
        fan_out=lambda m: int(m.weight.shape[1]),
        layout="in_out",
    ),
)


@dataclasses.dataclass(frozen=True)
class KFACLayer:
    """One covered layer.

    Attributes
    ----------
    name : str
        Module name in ``model.named_modules()``.
    kind : str
        The :class:`LayerRule` kind of its type (``"linear"``, ``"conv2d"``, ``"conv1d"``).
    module : torch.nn.Module
        The module itself (used while capturing; never pickled by estimators).
    weight_name, bias_name : str, str or None
        Parameter names, as ``model.named_parameters()`` gives them (a tied
        parameter's first name); ``bias_name`` is None without a bias.
    weight_shape : tuple
        Shape of the weight parameter.
    d_in : int
        Columns of the layer's gradient matrix: ``fan_in`` (``in_features``,
        ``in_channels * kh * kw``), plus 1 with a bias.
    d_out : int
        Rows: ``out_features`` or ``out_channels``.
    layout : str
        How the weight holds the matrix (:data:`LAYOUTS`).
    shared_with : tuple of str
        Other modules that hold one of this layer's parameters (a tied
        weight); empty for most layers.
    positions : tuple of int
        Positions of the weight (and bias) in ``model.named_parameters()``,
        which order :func:`param_layout`.
    """

    name: str
    kind: str
    module: nn.Module = dataclasses.field(repr=False, compare=False)
    weight_name: str
    bias_name: str | None
    weight_shape: tuple
    d_in: int
    d_out: int
    layout: str = "out_in"
    shared_with: tuple = ()
    positions: tuple = dataclasses.field(default=(), compare=False)

    @property
    def has_bias(self) -> bool:
        return self.bias_name is not None

    @property
    def param_shapes(self) -> OrderedDict:
        shapes = OrderedDict([(self.weight_name, self.weight_shape)])
        if self.bias_name is not None:
            shapes[self.bias_name] = (self.d_out,)
        return shapes


class _Params:
    """The model's parameters by identity: first names, positions and holders."""

    def __init__(self, model: nn.Module, modules: OrderedDict):
        self.name, self.position = {}, {}
        for i, (name, p) in enumerate(model.named_parameters()):
            self.name[id(p)], self.position[name] = name, i
        self.holders: dict[int, list[str]] = {}
        for mname, module in modules.items():
            for p in module.parameters(recurse=False):
                self.holders.setdefault(id(p), []).append(mname)

    def shared_with(self, name: str, module: nn.Module) -> tuple:
        """Other modules holding one of ``module``'s own parameters (tied weights)."""
        others = {h for p in module.parameters(recurse=False) for h in self.holders[id(p)]}
        others.discard(name)
        return tuple(sorted(others))


def _make_layer(name: str, module: nn.Module, rule: LayerRule, params: _Params) -> KFACLayer:
    bias = getattr(module, "bias", None)
    weight = module.weight
    weight_name = params.name[id(weight)]
    bias_name = params.name[id(bias)] if bias is not None else None
    names = (weight_name,) if bias_name is None else (weight_name, bias_name)
    return KFACLayer(
        name=name,
        kind=rule.kind,
        module=module,
        weight_name=weight_name,
        bias_name=bias_name,
        weight_shape=tuple(weight.shape),
        d_in=rule.fan_in(module) + (bias is not None),
        d_out=int(rule.fan_out(module)),
        layout=rule.layout,
        shared_with=params.shared_with(name, module),
        positions=tuple(params.position[n] for n in names),
    )


def _own_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _layer_input(layer: KFACLayer, x: torch.Tensor) -> torch.Tensor:
    """The ``(batch, T, d_in)`` input rows of a layer, ones column appended for the bias."""
    try:
        cols = rule_for(layer.module).inputs(layer.module, x.detach())
    except ValueError as exc:
        raise ValueError(f"Layer {layer.name!r}: {exc}") from None
    if not layer.has_bias:
        return cols.contiguous()
    b, t, d = cols.shape
    a = cols.new_empty(b, t, d + 1)
    a[..., :d] = cols
    a[..., d] = 1
    return a


def _tied_reason(name: str, module: nn.Module, params: _Params, others: tuple) -> str:
    tied = [
        params.name[id(p)]
        for p in module.parameters(recurse=False)
        if len(params.holders[id(p)]) > 1
    ]
    return (
        f"its parameter {', '.join(repr(t) for t in tied)} is tied to (also held by) module "
        f"{', '.join(repr(o) for o in others)}: its factors would describe this use only, "
        "while the parameter's gradient sums every use (name it in layers=[...] to cover it "
        "anyway, with a warning)"
    )


def resolve_layers(model: nn.Module, layers=None, owner="EKFACIFVP"):
    """The covered layers and the skipped modules (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
    layers : list of str, optional
        Module names to cover; ``None`` covers every supported module with a
        trainable parameter (tied ones excepted).
    owner : estimator or str
        Named in error messages.

    Returns
    -------
    covered : list of KFACLayer
        In model order.
    skipped : OrderedDict
        ``layers=None`` only: ``module name -> reason`` for the modules with
        trainable parameters of their own that are not covered (empty when
        ``layers`` is given).
    """
    who = V.owner_name(owner)
    modules = OrderedDict(model.named_modules())
    params = _Params(model, modules)
    if layers is not None:
        if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
            raise V.param_error(owner, "layers", "None or a list of module names", layers)
        layers = list(layers)
        if not layers:
            raise V.param_error(
                owner, "layers", "None or a non-empty list of module names", layers
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"The 'layers' parameter of {who} lists a module twice: {layers}.")
        supported = [n for n, m in modules.items() if rule_for(m) is not None]
        for name in layers:
            if name not in modules:
                raise ValueError(
                    f"The 'layers' parameter of {who} names a module the model does not have: "
                    f"{name!r}. Supported modules of this model ({_labels(', ')}): "
                    f"{supported}."
                )
            module = modules[name]
            rule = rule_for(module)
            if rule is None:
                raise ValueError(
                    f"The 'layers' parameter of {who} names module {name!r} of type "
                    f"{type(module).__name__}, which is not supported: only {_labels(', ')} "
                    f"layers can be covered (a convolution with groups=1). Supported modules "
                    f"of this model: {supported}."
                )
            reason = rule.unsupported(module)
            if reason is not None:
                raise ValueError(
                    f"The 'layers' parameter of {who} names module {name!r}, {reason}; it "
                    "cannot be covered."
                )
        wanted = set(layers)
        covered = [
            _make_layer(n, m, rule_for(m), params) for n, m in modules.items() if n in wanted
        ]
        for layer in covered:
            both = sorted(wanted.intersection(layer.shared_with))
            if both:
                raise ValueError(
                    f"The 'layers' parameter of {who} names modules {[layer.name, *both]} that "
                    f"hold the same (tied) parameter {layer.weight_name!r}: one parameter can "
                    "have one block of factors. Name one of them."
                )
        return covered, OrderedDict()
    covered, skipped = [], OrderedDict()
    # Modules whose forward does not call their children (MultiheadAttention
    # uses out_proj.weight directly) are skipped whole.
    opaque: list[str] = []
    for name, module in modules.items():
        if any(name.startswith(o + ".") for o in opaque):
            continue
        if isinstance(module, nn.MultiheadAttention):
            opaque.append(name)
            if any(p.requires_grad for p in module.parameters()):
                skipped[name] = (
                    "nn.MultiheadAttention: its forward uses its projections' weights directly "
                    "(out_proj's forward is never called), so no layer of it can be hooked"
                )
            continue
        if not _own_trainable(module):
            continue
        rule = rule_for(module)
        if rule is None:
            skipped[name] = (
                f"{type(module).__name__}: not a supported type (only {_labels(', ')} layers "
                "are covered)"
            )
            continue
        reason = rule.unsupported(module)
        others = params.shared_with(name, module)
        if reason is not None:
            skipped[name] = reason
        elif others:
            skipped[name] = _tied_reason(name, module, params, others)
        else:
            covered.append(_make_layer(name, module, rule, params))
    if not covered:
        raise ValueError(
            f"The model given to {who} has no {_labels(' or ')} module (a convolution with "
            f"groups=1) with trainable parameters to cover. Modules with trainable parameters "
            f"that are not covered: {dict(skipped)}."
        )
    return covered, skipped


def param_layout(layers) -> OrderedDict:
    """``parameter name -> shape`` of the covered parameters, in the model's parameter order."""
    entries = []
    for index, layer in enumerate(layers):
        for j, (name, shape) in enumerate(layer.param_shapes.items()):
            position = layer.positions[j] if layer.positions else index
            entries.append((position, index, j, name, shape))
    entries.sort(key=lambda e: e[:3])
    return OrderedDict((name, shape) for *_, name, shape in entries)


def params_to_matrix(layer: KFACLayer, weight: torch.Tensor, bias: torch.Tensor | None):
    """``(m, *weight_shape)`` and ``(m, d_out)`` -> the ``(m, d_out, d_in)`` matrix."""
    m = weight.shape[0]
    w = matrix_view(weight.reshape(m, -1), layer.layout, layer.d_out)
    if bias is None:
        return w.contiguous()
    return torch.cat([w, bias.reshape(m, layer.d_out, 1)], dim=2)


def matrix_to_params(layer: KFACLayer, matrix: torch.Tensor):
    """``(m, d_out, d_in)`` -> ``(weight (m, *weight_shape), bias (m, d_out) or None)``."""
    m = matrix.shape[0]
    w = matrix[..., :-1] if layer.has_bias else matrix
    if layer.layout == "in_out":
        w = w.transpose(1, 2)
    weight = w.reshape(m, *layer.weight_shape)
    return weight, (matrix[..., -1] if layer.has_bias else None)


def token_mask(inputs) -> torch.Tensor | None:
    """The ``(batch, L)`` token mask of a batch's inputs (nonzero at real tokens), or None.

    A Hugging Face batch's ``"attention_mask"`` (inputs given as a Mapping of
    the model's keyword arguments, a 2-D tensor); None when the inputs have
    none (every position is real). Padded positions contribute nothing (API
    section 7): with :meth:`LayerCapture.row_masks` it says which captured
    rows EK-FAC's covariances leave out.
    """
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            return mask
    return None


# --------------------------------------------------------------------------- coverage
def coverage(model: nn.Module, layers):
    """How much of the model's trainable parameters the layers hold.

    Returns
    -------
    covered, total : int
        Trainable parameters (each counted once, tied ones included) held by
        the layers, and in the whole model.
    left_out : list of (str, str, int)
        ``(module name, type name, trainable parameters)`` of the modules
        holding the trainable parameters not covered (each parameter counted
        under the module of its first name), largest first.
    """
    mine = {n for layer in layers for n in layer.param_shapes}
    modules = dict(model.named_modules())
    covered = total = 0
    counts: OrderedDict = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        total += p.numel()
        if name in mine:
            covered += p.numel()
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        counts[owner] = counts.get(owner, 0) + p.numel()
    left_out = [(n, type(modules[n]).__name__, c) for n, c in counts.items()]
    left_out.sort(key=lambda e: -e[2])  # stable: model order among equals
    return covered, total, left_out


def warn_coverage(model: nn.Module, layers, owner, consequence: str, largest: int = 5) -> None:
    """Warn (``UserWarning``) when the layers hold less than half of the trainable parameters."""
    covered, total, left_out = coverage(model, layers)
    if total == 0 or 2 * covered >= total:
        return
    listed = ", ".join(f"{n or '<model>'!r} ({t}, {c:,})" for n, t, c in left_out[:largest])
    count = f"{len(layers)} layer" + ("s" if len(layers) != 1 else "")
    warnings.warn(
        f"{V.owner_name(owner)} covers {covered / total:.1%} of the model's trainable "
        f"parameters ({covered:,} of {total:,}) with its {count}. The largest modules left "
        f"out (name, type, trainable parameters): {listed}. {consequence} Only "
        f"{_labels(', ')} modules (a convolution with groups=1) whose parameters no other "
        "module holds are covered automatically: skipped_reasons_ says why each module "
        "was skipped; name modules in layers=[...] to choose.",
        UserWarning,
        stacklevel=4,
    )


def warn_tied(layers, owner, consequence: str) -> None:
    """Warn (``UserWarning``) once per covered layer holding a parameter tied to another module."""
    for layer in layers:
        if layer.shared_with:
            warnings.warn(
                f"{V.owner_name(owner)} covers layer {layer.name!r}, whose weight "
                f"{layer.weight_name!r} is tied to (also held by) module(s) "
                f"{list(layer.shared_with)}: its factors describe the use of the parameter "
                f"by {layer.name!r} only, while the parameter's gradient sums every use. "
                f"{consequence}",
                UserWarning,
                stacklevel=4,
            )


class LayerCapture:
    """Context manager capturing ``(a, s)`` per covered layer (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
    layers : list of KFACLayer
        From ``resolve_layers``.
    owner : estimator or str
        Named in error messages.
    """

    def __init__(self, model: nn.Module, layers, owner="EKFACIFVP"):
        self.model = model
        self.layers = list(layers)
        self.owner = owner
        self._handles: list = []
        self.reset()

    # ------------------------------------------------------------ context
    def __enter__(self):
        try:
            for index, layer in enumerate(self.layers):
                hook = self._forward_hook(index, layer)
                self._handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        """Remove every hook registered and forget recorded tensors."""
        while self._handles:
            self._handles.pop().remove()
        self.reset()

    def reset(self) -> None:
        """Forget the recorded forward (inputs and output edges)."""
        self._inputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._edges: list[list] = [[] for _ in self.layers]

    # ------------------------------------------------------------ hooks
    def _forward_hook(self, index: int, layer: KFACLayer):
        def hook(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                return None
            x = args[0] if args else kwargs.get("input", next(iter(kwargs.values())))
            self._inputs[index].append(_layer_input(layer, x))
            edge, replaced = output_edge(output)
            self._edges[index].append(edge)
            return replaced

        return hook

    # ------------------------------------------------------------ results
    def _check_called(self) -> None:
        missing = [layer.name for layer, e in zip(self.layers, self._edges) if not e]
        if missing:
            raise ValueError(
                f"{V.owner_name(self.owner)}: the covered layers {missing} were not called in the "
                "model's forward pass (with gradients enabled), so their inputs and output "
                "gradients cannot be captured. Pass layers=[...] naming modules the forward "
                "calls."
            )

    def row_masks(self, mask: torch.Tensor | None) -> list:
        """Which captured rows of each layer are real tokens, under a batch's token mask.

        ``mask`` is ``(batch, L)`` (an ``attention_mask``: nonzero at real
        tokens), or None. A call of a layer whose rows are ``(batch, L, d)``
        (``T = L``: one row per token) takes the mask; other calls (pooled
        heads, conv positions, ``T != L``) keep every row. Returns per layer a
        ``(batch, T)`` boolean tensor, or None where every row is kept. Call it
        after the forward and before ``backward`` (which forgets the forward).
        """
        self._check_called()
        if mask is None or mask.ndim != 2:
            return [None] * len(self.layers)
        b, length = mask.shape
        out = []
        for calls in self._inputs:
            if not any(x.shape[:2] == (b, length) for x in calls):
                out.append(None)
                continue
            keep = (mask != 0).to(calls[0].device)
            parts = [
                keep if x.shape[:2] == (b, length)
                else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
                for x in calls
            ]  # fmt: skip
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        return out

    def inputs(self) -> list[torch.Tensor]:
        """The recorded ``a`` per layer, ``(batch, T, d_in)``, of the last forward."""
        self._check_called()
        return [x[0] if len(x) == 1 else torch.cat(x, dim=1) for x in self._inputs]

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, grad_outputs=None):
        """Differentiate ``loss`` at the recorded layer outputs.

        Returns
        -------
        list of (a, s)
            Per layer, in layer order: ``a`` ``(batch, T, d_in)`` and ``s``
            ``(batch, T, d_out)``, in the model's dtype.
        """
        inputs = self.inputs()
        edges = [e for per_layer in self._edges for e in per_layer]
        grads = torch.autograd.grad(
            loss, edges, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True
        )
        pairs, start = [], 0
        for i, (layer, a, per_layer) in enumerate(zip(self.layers, inputs, self._edges)):
            parts = []
            for k, g in enumerate(grads[start : start + len(per_layer)]):
                if g is None:  # the loss does not depend on this call's output
                    t = self._inputs[i][k].shape[1]
                    g = a.new_zeros(a.shape[0], t, layer.d_out)
                else:
                    g = rule_for(layer.module).output_grads(layer.module, g)
                parts.append(g)
            start += len(per_layer)
            pairs.append((a, parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)))
        if not retain_graph:
            self.reset()
        return pairs


# =========================================================================== per-example rules
# Per-example gradients from layer hooks (opacus' ``grad_sample`` idea): a
# module's forward hook keeps what its rule needs from the input, a backward
# of the SUM of the per-example losses gives the output gradient ``g`` of
# every example at once, and the rule turns ``(saved, g)`` into each
# example's gradient of the module's own parameters. Separate from the
# Kronecker registry above: more types have per-example rules (Embedding,
# the norms) than Kronecker factors. The machinery that hooks the model and
# runs the backward is :mod:`attribkit._compute.gradients`.


@dataclasses.dataclass(frozen=True)
class GradientRule:
    """How the per-example gradients of one module type's parameters come from hooks.

    Attributes
    ----------
    kind : str
        Short name (``"linear"``, ``"embedding"``, ...).
    save : callable
        ``(module, x) -> saved``: what the rule keeps from the module's first
        input ``x`` (detached), e.g. the input rows of a Linear, the token ids
        of an Embedding, the normalised input of a LayerNorm.
    grads : callable
        ``(module, saved, g) -> {local name: (batch, *shape)}``: each
        example's gradient of the module's own parameters (``"weight"``,
        ``"bias"``), from the gradient ``g`` of the summed loss with respect
        to the module's output (shaped like the output, batch first).
    unsupported : callable
        ``module -> str or None``: why this module's gradients cannot come
        from the rule (None when they can); its parameters then take the
        fallback path.
    """

    kind: str
    save: Callable
    grads: Callable
    unsupported: Callable[[nn.Module], str | None] = lambda module: None


#: type (or "module.QualName") -> GradientRule; see :func:`register_gradient_rule`.
GRADIENT_RULES: dict = {}


def register_gradient_rule(module_type, rule: GradientRule) -> None:
    """Per-example gradients of ``module_type`` (a class or ``"module.QualName"``) by hooks."""
    GRADIENT_RULES[module_type] = rule


def gradient_rule_for(module: nn.Module) -> GradientRule | None:
    """The rule for ``module``, or None.

    Looked up along ``type(module).__mro__`` like :func:`rule_for`, and only
    used when the module runs that class's own ``forward``: a subclass that
    overrides it (``nn.SyncBatchNorm``, a quantised Linear) computes
    something else, and takes the fallback path.
    """
    for cls in type(module).__mro__:
        rule = GRADIENT_RULES.get(cls)
        if rule is None:
            rule = GRADIENT_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None


def _rows3(t: torch.Tensor) -> torch.Tensor:
    """``(batch, ..., features) -> (batch, T, features)``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _sum_but(t: torch.Tensor, keep: int) -> torch.Tensor:
    """``(batch, *middle, *last)`` with ``keep`` last dims, summed over ``middle``."""
    middle = tuple(range(1, t.ndim - keep))
    return t.sum(middle) if middle else t


# ------------------------------------------------------------ Linear, Conv1D
def _outer_sum(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sum_t g[:, t, :, None] * a[:, t, None, :]``: ``(batch, out, in)``.

    One row per example (``T = 1``) is a plain outer product, several times
    faster broadcast than as a ``bmm`` with an inner dimension of 1.
    """
    if g.shape[1] == 1:
        return g[:, 0, :, None] * a[:, 0, None, :]
    return torch.bmm(g.transpose(1, 2), a)


def _linear_grads(module, a, g):
    g = _rows3(g)
    out = {"weight": _outer_sum(g, a)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


def _conv1d_hf_grads(module, a, g):
    # Hugging Face's Conv1D: y = x @ W + b with W (in, out).
    g = _rows3(g)
    out = {"weight": _outer_sum(a, g)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


def _save_rows(module, x):
    if x.ndim < 2:
        raise ValueError(f"unbatched input of shape {tuple(x.shape)}")
    return _rows3(x)


register_gradient_rule(nn.Linear, GradientRule("linear", _save_rows, _linear_grads))
register_gradient_rule(
    "transformers.pytorch_utils.Conv1D", GradientRule("conv1d-hf", _save_rows, _conv1d_hf_grads)
)


# ------------------------------------------------------------ convolutions
def _conv_columns(module, x):
    """im2col of a 1-D or 2-D conv input: ``(batch, positions, in * prod(kernel))``.

    Features are ordered like ``weight.reshape(out, -1)``; string paddings
    and non-zero padding modes are applied first with ``F.pad``, as the conv
    itself does. A 1-D conv is unfolded as a 2-D one of width 1.
    """
    spatial = x.ndim - 2
    if spatial != len(module.kernel_size):
        raise ValueError(f"unbatched input of shape {tuple(x.shape)}")
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * spatial
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if spatial == 1:
        x = x.unsqueeze(-1)
        kernel, dilation = (kernel[0], 1), (dilation[0], 1)
        padding, stride = (padding[0], 0), (stride[0], 1)
    cols = F.unfold(x, kernel_size=kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


def _conv_grads(module, a, g):
    b, groups = g.shape[0], module.groups
    g = g.flatten(2).transpose(1, 2)  # (batch, positions, out)
    out_g = g.shape[-1] // groups
    if groups == 1:
        weight = torch.bmm(g.transpose(1, 2), a)
    else:  # block-diagonal over groups: each group's outputs see its own inputs
        a4 = a.reshape(b, a.shape[1], groups, -1)
        g4 = g.reshape(b, g.shape[1], groups, out_g)
        weight = torch.einsum("btgo,btgi->bgoi", g4, a4)
    out = {"weight": weight.reshape(b, *module.weight.shape)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


for _conv in (nn.Conv1d, nn.Conv2d):
    register_gradient_rule(_conv, GradientRule("conv", _conv_columns, _conv_grads))


# ------------------------------------------------------------ Embedding
def _save_ids(module, x):
    return x


def _embedding_grads(module, ids, g):
    b, (num, dim) = g.shape[0], module.weight.shape
    rows = g.reshape(-1, dim)
    index = ids.reshape(b, -1)
    if module.padding_idx is not None:
        # torch never updates the padding row: its gradient is 0.
        rows = rows.masked_fill((index == module.padding_idx).reshape(-1, 1), 0)
    index = (index + torch.arange(b, device=index.device).unsqueeze(1) * num).reshape(-1)
    weight = rows.new_zeros(b * num, dim).index_add_(0, index, rows)
    return {"weight": weight.reshape(b, num, dim)}


def _embedding_unsupported(module):
    if module.max_norm is not None:
        return "an Embedding with max_norm renormalises its weight during the forward"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq scales the gradient by counts over the whole batch"
    return None


register_gradient_rule(
    nn.Embedding,
    GradientRule("embedding", _save_ids, _embedding_grads, _embedding_unsupported),
)


# ------------------------------------------------------------ norms
def _affine_grads(module, x_hat, g, keep):
    """``weight``: per example ``sum g * x_hat``, ``bias``: ``sum g``, over the rest."""
    out = {}
    if getattr(module, "weight", None) is not None:
        out["weight"] = keep(g * x_hat)
    if getattr(module, "bias", None) is not None:
        out["bias"] = keep(g)
    return out


def _layer_norm_hat(module, x):
    dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + module.eps)


def _layer_norm_grads(module, x_hat, g):
    k = len(module.normalized_shape)
    return _affine_grads(module, x_hat, g, lambda t: _sum_but(t, k))


def _rms_norm_hat(module, x):
    dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)


def _group_norm_hat(module, x):
    b = x.shape[0]
    grouped = x.reshape(b, module.num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
    return ((grouped - mean) * torch.rsqrt(var + module.eps)).reshape(x.shape)


def _channel_grads(module, x_hat, g):
    # (batch, C, *spatial) -> (batch, C): per-channel affine (GroupNorm, BatchNorm).
    return _affine_grads(module, x_hat, g, lambda t: t.reshape(t.shape[0], t.shape[1], -1).sum(2))


def _batch_norm_hat(module, x):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = module.running_mean.reshape(shape)
    var = module.running_var.reshape(shape)
    return (x - mean) * torch.rsqrt(var + module.eps)


def _batch_norm_unsupported(module):
    if module.training:
        return "a BatchNorm in training mode normalises each example with the whole batch"
    if not module.track_running_stats or module.running_mean is None:
        return "a BatchNorm without running statistics normalises with the whole batch"
    return None


register_gradient_rule(
    nn.LayerNorm, GradientRule("layer_norm", _layer_norm_hat, _layer_norm_grads)
)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register_gradient_rule(nn.RMSNorm, GradientRule("rms_norm", _rms_norm_hat, _layer_norm_grads))
register_gradient_rule(nn.GroupNorm, GradientRule("group_norm", _group_norm_hat, _channel_grads))
register_gradient_rule(
    nn.modules.batchnorm._BatchNorm,
    GradientRule("batch_norm", _batch_norm_hat, _channel_grads, _batch_norm_unsupported),
)
