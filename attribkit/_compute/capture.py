"""Layer capture for Kronecker-factored methods: the one place that hooks a model.

EKFACIFVP (``ekfac.py``) and the LoGra-style ``KroneckerProjector`` both need,
for each covered layer and each batch, the layer input ``a`` and the gradient
``s`` of the per-example loss with respect to the layer output. This module
finds the layers, describes their parameter layout and captures ``(a, s)``;
it computes no statistics.

Module types are covered through a registry keyed by type (as opacus'
``grad_sample``): one :class:`LayerRule` per type says how wide its gradient
matrix is, how to turn the module's input into the ``(batch, T, d_in)``
rows ``a`` and its output gradient into the ``(batch, T, d_out)`` rows
``s``, and when a module of that type cannot be covered (a grouped
convolution). ``nn.Linear`` and ``nn.Conv2d`` are registered here; a new
type is one :func:`register` call. Lookup follows the class's MRO (a
subclass of ``nn.Linear`` is covered as one) and also accepts a
``"module.QualName"`` string key, so a type can be registered without
importing the library that defines it.

Interface
---------
``resolve_layers(model, layers=None, owner="EKFACIFVP") -> (list[KFACLayer], skipped)``
    ``layers=None``: every ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``) with
    a trainable parameter, in ``model.named_modules()`` order; modules with
    trainable parameters of their own and another type (LayerNorm,
    Embedding, grouped convolutions, ``nn.MultiheadAttention`` with its
    ``out_proj``, whose forward is never called, ...) are returned in
    ``skipped`` (names, model order); parameter-free modules are not listed.
    Given module names (any order, returned in model order): a name the model
    does not have, or a module of an unsupported type, raises ``ValueError``
    naming it; requested modules are covered whether or not their
    parameters are trainable.
``param_layout(layers) -> OrderedDict``
    ``parameter name -> shape`` of the covered parameters: per layer its
    weight, then its bias (when it has one), layers in model order; the names
    are those of ``model.named_parameters()``, so
    ``per_example_gradients(model, data, params=list(param_layout(layers)))``
    gives vectors in this layout.
``LayerCapture(model, layers, owner)``
    A context manager. On entry it registers one forward hook per covered
    layer; on exit (also when an exception is raised inside) it removes every
    hook it registered. Inside, each forward call of a covered module (with
    gradients enabled) records

    * ``a``: the layer input as ``(batch, T, d_in)``, detached, with a column
      of ones appended when the layer has a bias (so ``d_in`` counts it).
      ``nn.Linear`` on ``(batch, features)``: ``T = 1``; on
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
    ``capture.reset()`` forgets the recorded forward (``backward`` does that
    itself unless ``retain_graph=True``). A module called several times in
    one forward (weight sharing) has its calls concatenated along ``T``.

With ``a`` and ``s`` so shaped, the per-example gradient of a layer's weight
matrix (bias as the last column) is ``sum_t s[i, t, :] outer a[i, t, :]`` =
``s[i].T @ a[i]``, shape ``(d_out, d_in)``; ``matrix_to_params`` and
``params_to_matrix`` convert between that matrix and the layer's parameters
(a conv weight is ``(d_out, in * kh * kw)`` reshaped to the weight's shape).

A layer whose output does not require grad (frozen parameters and nothing
trainable upstream) gets a detached leaf that requires grad in place of its
output, so its ``s`` is still defined; the model's parameters and their
``requires_grad`` flags are never changed. The model itself is called with
:func:`attribkit._compute.model.call_model`, the one model-call dispatcher.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import validation as V

try:  # torch >= 2.2: the edge taken at forward time survives in-place changes
    from torch.autograd.graph import get_gradient_edge as _edge
except ImportError:  # pragma: no cover - older torch

    def _edge(tensor):
        return tensor


__all__ = [
    "KFACLayer",
    "LayerCapture",
    "LayerRule",
    "matrix_to_params",
    "param_layout",
    "params_to_matrix",
    "register",
    "resolve_layers",
    "rule_for",
]


# --------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How the modules of one type are captured (one registry entry).

    Attributes
    ----------
    kind : str
        Short name of the type (``"linear"``, ``"conv2d"``).
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
    """

    kind: str
    label: str
    fan_in: Callable[[nn.Module], int]
    inputs: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    output_grads: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    unsupported: Callable[[nn.Module], str | None] = lambda module: None


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


def _linear_inputs(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 2:
        raise ValueError(
            f"nn.Linear layers must get batched inputs (batch, ..., features) to be "
            f"captured; got an input of shape {tuple(x.shape)}."
        )
    return x.reshape(x.shape[0], -1, x.shape[-1])


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
    LayerRule("linear", "nn.Linear", lambda m: m.in_features, _linear_inputs, _token_rows),
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


@dataclasses.dataclass(frozen=True)
class KFACLayer:
    """One covered layer.

    Attributes
    ----------
    name : str
        Module name in ``model.named_modules()``.
    kind : str
        The :class:`LayerRule` kind of its type (``"linear"``, ``"conv2d"``).
    module : torch.nn.Module
        The module itself (used while capturing; never pickled by estimators).
    weight_name, bias_name : str, str or None
        Full parameter names (``bias_name`` is None without a bias).
    weight_shape : tuple
        Shape of the weight parameter.
    d_in : int
        Columns of the layer's gradient matrix: ``in_features`` (Linear) or
        ``in_channels * kh * kw`` (Conv2d), plus 1 with a bias.
    d_out : int
        Rows: ``out_features`` or ``out_channels``.
    """

    name: str
    kind: str
    module: nn.Module = dataclasses.field(repr=False, compare=False)
    weight_name: str
    bias_name: str | None
    weight_shape: tuple
    d_in: int
    d_out: int

    @property
    def has_bias(self) -> bool:
        return self.bias_name is not None

    @property
    def param_shapes(self) -> OrderedDict:
        shapes = OrderedDict([(self.weight_name, self.weight_shape)])
        if self.bias_name is not None:
            shapes[self.bias_name] = (self.d_out,)
        return shapes


def _prefixed(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _make_layer(name: str, module: nn.Module, rule: LayerRule) -> KFACLayer:
    bias = getattr(module, "bias", None)
    weight = module.weight
    return KFACLayer(
        name=name,
        kind=rule.kind,
        module=module,
        weight_name=_prefixed(name, "weight"),
        bias_name=_prefixed(name, "bias") if bias is not None else None,
        weight_shape=tuple(weight.shape),
        d_in=rule.fan_in(module) + (bias is not None),
        d_out=int(weight.shape[0]),
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


def resolve_layers(model: nn.Module, layers=None, owner="EKFACIFVP"):
    """The covered layers and the skipped module names (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
    layers : list of str, optional
        Module names to cover; ``None`` covers every supported module with a
        trainable parameter.
    owner : estimator or str
        Named in error messages.

    Returns
    -------
    covered : list of KFACLayer
        In model order.
    skipped : list of str
        ``layers=None`` only: modules with trainable parameters of their own
        that cannot be covered (an empty list when ``layers`` is given).
    """
    who = V.owner_name(owner)
    modules = OrderedDict(model.named_modules())
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
                    f"{type(module).__name__}, which is not supported: only {_labels(' and ')} "
                    f"layers can be covered (a convolution with groups=1). Supported modules "
                    f"of this model: {supported}."
                )
            reason = rule.unsupported(module)
            if reason is not None:
                raise ValueError(
                    f"The 'layers' parameter of {who} names module {name!r}, {reason}; it "
                    "cannot be covered."
                )
        covered = [_make_layer(n, m, rule_for(m)) for n, m in modules.items() if n in set(layers)]
        return covered, []
    covered, skipped = [], []
    # Modules whose forward does not call their children (MultiheadAttention
    # uses out_proj.weight directly) are skipped whole.
    opaque: list[str] = []
    for name, module in modules.items():
        if any(name.startswith(o + ".") for o in opaque):
            continue
        if isinstance(module, nn.MultiheadAttention):
            opaque.append(name)
            if any(p.requires_grad for p in module.parameters()):
                skipped.append(name)
            continue
        rule = rule_for(module)
        if rule is not None:
            if not _own_trainable(module):
                continue
            if rule.unsupported(module) is None:
                covered.append(_make_layer(name, module, rule))
            else:
                skipped.append(name)
        elif _own_trainable(module):
            skipped.append(name)
    if not covered:
        raise ValueError(
            f"The model given to {who} has no {_labels(' or ')} module (a convolution with "
            f"groups=1) with trainable parameters to cover. Modules with trainable parameters "
            f"of other types: {skipped}."
        )
    return covered, skipped


def param_layout(layers) -> OrderedDict:
    """``parameter name -> shape``: weight then bias per layer, layers in order."""
    shapes = OrderedDict()
    for layer in layers:
        shapes.update(layer.param_shapes)
    return shapes


def params_to_matrix(layer: KFACLayer, weight: torch.Tensor, bias: torch.Tensor | None):
    """``(m, *weight_shape)`` and ``(m, d_out)`` -> the ``(m, d_out, d_in)`` matrix."""
    m = weight.shape[0]
    w = weight.reshape(m, layer.d_out, -1)
    if bias is None:
        return w
    return torch.cat([w, bias.reshape(m, layer.d_out, 1)], dim=2)


def matrix_to_params(layer: KFACLayer, matrix: torch.Tensor):
    """``(m, d_out, d_in)`` -> ``(weight (m, *weight_shape), bias (m, d_out) or None)``."""
    m = matrix.shape[0]
    if layer.has_bias:
        return matrix[..., :-1].reshape(m, *layer.weight_shape), matrix[..., -1]
    return matrix.reshape(m, *layer.weight_shape), None


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
            replaced = None
            if not output.requires_grad:
                # Nothing upstream is trainable: differentiate at a fresh leaf.
                output = replaced = output.detach().requires_grad_()
            self._edges[index].append(_edge(output))
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
