"""Per-example gradients from layer hooks, batch by batch, and their checks.

The data flow of :func:`iter_gradients`:

1. the parameters to differentiate are selected (``params``) and split
   (:class:`GradientPlan`): a parameter is *hooked* when every module that
   holds it has a per-example rule (:func:`attribkit._compute.capture.gradient_rule_for`:
   ``nn.Linear``, Hugging Face's ``Conv1D``, ``nn.Conv1d``/``nn.Conv2d``,
   ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
   eval-mode BatchNorm), else it *falls back*;
2. :func:`attribkit._compute.targets.target_batches` streams the data in
   batches on the model's device and dtype, calls the model itself once per
   batch with forward hooks on the hooked parameters' modules (each call
   keeps what its rule needs from the input and a gradient edge of its
   output), checks the batch against the loss and gives its targets (the
   data's, one sample, or all ``K`` weighted targets of the expected Fisher);
3. one backward of the SUM of the per-example losses to those outputs only
   (``torch.autograd.grad``: no weight gradient is formed, no ``.grad``
   written) gives each example's output gradient, and each rule turns it into
   the example's gradient of the module's parameters; the contributions of a
   module called several times, and of a parameter several modules hold (a
   tied weight), are summed;
4. the parameters that fall back are differentiated by ``vmap(grad)`` over a
   ``functional_call`` differentiating only them; where ``vmap`` cannot run
   the model (data-dependent control flow, such as transformers'
   padding-mask checks), by one autograd call per example instead;
5. every batch is checked for NaN/Inf gradients and yielded as
   ``name -> (b, *shape)`` (``(K, b, *shape)`` for ``"expected"``),
   detached, on the model's device and in its dtype.

Why hooks and not ``vmap`` over the whole model: hooks run one ordinary
forward and backward per batch, so padded attention masks and any
data-dependent model code work, at about the cost of one forward and
backward, where ``vmap`` takes several and cannot run such code. Why our own
hooks and not opacus' ``GradSampleModule``: opacus wraps the model and writes
``.grad`` and ``.grad_sample`` onto the user's parameters, runs a full
backward (weight gradients included), and knows neither Hugging Face's
``Conv1D`` nor parameters used outside their module (tied weights, a ViT's
``cls_token``); our rules share the capture registry with the Kronecker
methods, and the model is left exactly as it was.

:func:`layout_params` matches a fitted layout (a projector's
``param_shapes_`` or its ``n_features_in_``) against a model: the
parameters whose gradients that layout takes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

import torch
from sklearn.utils.validation import check_is_fitted
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..config import ComputeConfig
from . import validation as V
from .capture import gradient_rule_for, output_edge
from .data import batch_len
from .model import (
    EvalMode,
    autograd_on,
    call_model,
    model_device,
    model_dtype,
    model_failure,
    select_params,
    split_state,
)
from .targets import check_batch, resolve_loss, target_batches

__all__ = ["GradientPlan", "iter_gradients", "layout_params"]

#: The parameters of a module its per-example rule computes.
_RULE_PARAMS = ("weight", "bias")


# --------------------------------------------------------------------------- plan
class GradientPlan:
    """Which selected parameters come from hooks, and which fall back.

    A selected parameter is hooked when every module that holds it (its
    own parameter, ``recurse=False``; a tied weight is held by several) has
    a per-example rule that applies to it (the module runs the rule's
    ``forward`` and its rule does not refuse it, e.g. a training-mode
    BatchNorm). Build it in the mode the pass runs in (eval mode).

    Attributes
    ----------
    names : list of str
        Every selected parameter, in model order.
    hooked : dict
        ``module -> (rule, {local name: parameter name})``: the modules to
        hook and the hooked parameters they hold.
    fallback : list of str
        The selected parameters no rule covers, in model order.
    params : dict
        ``name -> parameter`` of every selected parameter.
    """

    def __init__(self, model: torch.nn.Module, selected: OrderedDict):
        self.names = list(selected)
        self.params = dict(selected)
        by_id = {id(p): n for n, p in selected.items()}
        holders: dict[str, list] = {n: [] for n in self.names}
        for module in model.modules():
            for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
                if id(p) in by_id:
                    holders[by_id[id(p)]].append((module, local))
        self.hooked: dict = {}
        self.fallback: list[str] = []
        for name in self.names:
            mods = holders[name]
            rules = [(m, local, gradient_rule_for(m)) for m, local in mods]
            if mods and all(
                rule is not None and local in _RULE_PARAMS and rule.unsupported(m) is None
                for m, local, rule in rules
            ):
                for m, local, rule in rules:
                    self.hooked.setdefault(m, (rule, {}))[1][local] = name
            else:
                self.fallback.append(name)

    @property
    def hooked_names(self) -> list[str]:
        """The hooked parameters, in model order."""
        fallback = set(self.fallback)
        return [n for n in self.names if n not in fallback]


# --------------------------------------------------------------------------- capture
#: Broadcasting additions a module output shared by the batch may flow into (below).
_ADDS = {
    torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
    torch.Tensor.add_, torch.Tensor.__iadd__,
}  # fmt: skip


class _Uses(TorchFunctionMode):
    """Watches the hooked forward: parameter uses outside their modules, shared outputs.

    Every torch function called during the hooked forward passes through
    here.

    * One that takes a hooked parameter while the innermost hooked module
      running is not one that holds it (``F.linear(h, wte.weight)`` written
      in a parent's forward, ``nn.MultiheadAttention`` using its
      ``out_proj.weight`` directly) makes that parameter fall back for the
      batch, since its rule would miss that use. Uses whose result is not a
      tensor (``.shape``, ``.dtype``) or carries no gradient (``detach``) are
      not uses of the value.
    * A module output shared by the whole batch (leading dimension 1 while
      the batch has more examples: GPT-2's and BERT's position embeddings of
      ``(1, T)`` position ids) carries no per-example gradient itself; where
      it is added to a batch-first tensor, the sum's gradient row ``i`` is
      example ``i``'s gradient of it, so the edge is taken there. Any other
      use of it (besides ``.to``) makes its parameters fall back.
    """

    def __init__(self, capture: _HookCapture):
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        cap = self.capture
        if func is torch.Tensor.detach or not _holds_float_tensor(result):
            return result
        inside = cap.stack[-1] if cap.stack else None
        for t in _tensor_args(args, kwargs):
            name = cap.watched.get(id(t))
            if name is not None and (inside is None or id(t) not in cap.own[inside]):
                cap.dirty.add(name)
            record = cap.shared.get(id(t))
            if record is not None and result is not t:
                self._shared_use(record, t, func, args, kwargs, result)
        return result

    def _shared_use(self, record, t, func, args, kwargs, result) -> None:
        cap = self.capture
        if func is torch.Tensor.to and isinstance(result, torch.Tensor):
            if result.shape == t.shape:  # a cast or a move: follow it
                cap.shared[id(result)] = record
                record.keep.append(result)
                return
        elif (
            func in _ADDS
            and isinstance(result, torch.Tensor)
            and kwargs.get("alpha", 1) == 1
            and len(args) == 2
            and all(isinstance(a, torch.Tensor) for a in args)
            and result.ndim == t.ndim
            and result.shape[0] == cap.batch
            and result.shape[1:] == t.shape[1:]
            and result.requires_grad
        ):
            record.edges.append(output_edge(result)[0])
            return
        cap.dirty.update(cap.plan.hooked[record.module][1].values())


def _tensor_args(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, torch.Tensor):
                    yield v


def _holds_float_tensor(result) -> bool:
    if isinstance(result, torch.Tensor):
        return result.is_floating_point() or result.is_complex()
    if isinstance(result, (list, tuple)):
        return any(_holds_float_tensor(r) for r in result)
    return False


class _Shared:
    """A hooked module's output shared by the batch, and where it was added in."""

    def __init__(self, module, saved, output):
        self.module, self.saved = module, saved
        self.edges: list = []
        self.keep = [output]  # alive, so that no other tensor takes its id


class _HookCapture:
    """Forward hooks on the plan's hooked modules; one backward gives their per-example grads.

    A context manager: on entry it registers one forward pre-hook and one
    forward hook per hooked module (the latter first among the module's
    forward hooks, so it sees the module's own output before other hooks
    change it); on exit, also on error, it removes every one.
    """

    def __init__(self, model: torch.nn.Module, plan: GradientPlan, owner):
        self.model, self.plan, self.owner = model, plan, owner
        self.handles: list = []
        # id(parameter) -> name, and module -> ids of its own parameters
        self.watched = {}
        self.own = {}
        for module, (_, locals_) in plan.hooked.items():
            ids = set()
            for local, name in locals_.items():
                p = getattr(module, local)
                self.watched[id(p)] = name
                ids.add(id(p))
            self.own[module] = ids
        self.recording = False
        self.reset(0)

    def reset(self, batch: int) -> None:
        self.batch = batch
        self.records: list = []  # (module, saved, edge)
        self.shared: dict = {}  # id(output) -> _Shared
        self.stack: list = []
        self.dirty: set[str] = set()

    def __enter__(self):
        try:
            for module in self.plan.hooked:
                self.handles.append(module.register_forward_pre_hook(self._pre, prepend=True))
                self.handles.append(
                    module.register_forward_hook(self._post, with_kwargs=True, prepend=True)
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        self.recording = False
        self.reset(0)

    def _pre(self, module, args):
        if self.recording:
            self.stack.append(module)

    def _post(self, module, args, kwargs, output):
        if not self.recording:
            return None
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        if not torch.is_grad_enabled():  # the model itself chose not to differentiate here
            return None
        x = args[0] if args else next(iter(kwargs.values()), None)
        rule, locals_ = self.plan.hooked[module]
        ok = (
            isinstance(x, torch.Tensor)
            and isinstance(output, torch.Tensor)
            and x.ndim > 0
            and output.ndim > 0
            and x.shape[0] == output.shape[0]
        )
        shared = ok and self.batch > 1 and x.shape[0] == 1
        if not ok or not (shared or x.shape[0] == self.batch):
            # Not batch first (rows of several examples flattened together, say):
            # the rule cannot tell the examples apart, so these parameters fall back.
            self.dirty.update(locals_.values())
            return None
        try:
            saved = rule.save(module, x.detach())
        except ValueError:
            self.dirty.update(locals_.values())
            return None
        edge, replaced = output_edge(output)
        if replaced is not None:
            output = replaced
        if shared:
            self.shared[id(output)] = _Shared(module, saved, output)
        else:
            self.records.append((module, saved, edge))
        return replaced

    def forward(self, inputs):
        """The model's outputs on a batch, with the hooks recording."""
        self.reset(batch_len(inputs))
        self.recording = True
        try:
            with autograd_on(), _Uses(self):
                return call_model(self.model, inputs)
        finally:
            self.recording = False

    def gradients(self, total: torch.Tensor, retain_graph: bool) -> dict:
        """``name -> (batch, *shape)`` of the hooked, clean parameters, from one backward.

        ``total`` is the SUM of the batch's per-example losses, so each
        example's output gradient is its own. Parameters the batch marked
        dirty are left out (they fall back); hooked parameters whose modules
        did not reach the loss get zeros.
        """
        names = [n for n in self.plan.hooked_names if n not in self.dirty]
        out: dict[str, torch.Tensor] = {}
        records = list(self.records)
        for record in {id(r): r for r in self.shared.values()}.values():
            saved = record.saved.expand(self.batch, *record.saved.shape[1:])
            records.extend((record.module, saved, edge) for edge in record.edges)
        if records and total.requires_grad:
            grads = torch.autograd.grad(
                total, [e for _, _, e in records], retain_graph=retain_graph, allow_unused=True
            )
            for (module, saved, _), g in zip(records, grads):
                if g is None:
                    continue
                rule, locals_ = self.plan.hooked[module]
                for local, value in rule.grads(module, saved, g).items():
                    name = locals_.get(local)
                    if name is None or name in self.dirty:
                        continue
                    out[name] = value if name not in out else out[name] + value
        result = {}
        for name in names:
            value = out.get(name)
            ref = self.plan.params[name]
            if value is None:
                value = ref.new_zeros(self.batch, *ref.shape)
            result[name] = value.detach().to(ref.dtype)
        return result


# --------------------------------------------------------------------------- fallback
class _Fallback:
    """Per-example gradients of the parameters hooks do not give: ``vmap``, else a loop.

    ``vmap(grad)`` of one example's loss over a ``functional_call`` that
    differentiates only the asked parameters (the others, buffers included,
    are detached constants). Where ``vmap`` cannot run the model (it raises:
    data-dependent Python control flow, say), one autograd call per example
    instead, for the rest of the pass: the same numbers, slower.
    """

    def __init__(self, model, selected, loss_fn, owner):
        sel, frozen = split_state(model, selected)
        self.model, self.loss_fn, self.owner = model, loss_fn, owner
        self.state = {**frozen, **sel}
        self.loop = False

    def __call__(self, names, inputs, targets, index) -> dict:
        if not names:
            return {}
        sel = OrderedDict((n, self.state[n]) for n in names)
        frozen = {k: v for k, v in self.state.items() if k not in sel}
        if not self.loop:
            try:
                return self._vmap(sel, frozen, inputs, targets)
            except (MemoryError, torch.OutOfMemoryError):
                raise
            except Exception:
                self.loop = True  # vmap cannot run this model: examples one at a time
        return self._loop(sel, frozen, inputs, targets, index)

    def _vmap(self, sel, frozen, inputs, targets) -> dict:
        model, loss_fn = self.model, self.loss_fn

        def one_loss(params, x, t):
            x1 = tree_map(lambda a: a.unsqueeze(0) if isinstance(a, torch.Tensor) else a, x)
            return loss_fn(call_model(model, x1, {**frozen, **params}), t.unsqueeze(0)).reshape(())

        dims = tree_map(lambda a: 0 if isinstance(a, torch.Tensor) else None, inputs)
        grads = vmap(grad(one_loss), in_dims=(None, dims, 0))(sel, inputs, targets)
        return {n: grads[n].detach() for n in sel}

    def _loop(self, sel, frozen, inputs, targets, index) -> dict:
        rows: dict[str, list] = {n: [] for n in sel}
        for j in range(targets.shape[0]):
            x_j = _example(inputs, j)
            params = {n: p.detach().requires_grad_() for n, p in sel.items()}
            try:
                out = call_model(self.model, x_j, {**frozen, **params})
                value = self.loss_fn(out, targets[j : j + 1]).sum()
                grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
            except (MemoryError, torch.OutOfMemoryError):
                raise
            except Exception as exc:
                raise model_failure(exc, index, x_j, targets[j : j + 1], self.owner) from exc
            for (n, p), g in zip(params.items(), grads):
                rows[n].append(torch.zeros_like(p) if g is None else g.detach())
        return {n: torch.stack(r) for n, r in rows.items()}


# --------------------------------------------------------------------------- the pass
def iter_gradients(
    model: torch.nn.Module,
    data,
    *,
    loss="cross_entropy",
    params=None,
    fisher: str = "empirical",
    config: ComputeConfig,
    owner="per_example_gradients",
    desc: str = "gradients",
) -> Iterator[OrderedDict]:
    """Yield per-example gradients batch by batch: ``name -> (b, *shape)``.

    Gradients are detached, on the model's device and in its dtype; they are
    those of one autograd call per example (to rounding), computed as the
    module docstring says. The model is evaluated in eval mode (dropout off,
    batch-norm running statistics) and left exactly as it was: modes
    restored, hooks removed, no ``.grad`` written, ``requires_grad``
    untouched, also when the pass fails. Floating-point inputs and targets
    are cast to the dtype of the model's parameters (integer ones, such as
    class labels or token ids, are left alone).

    Every batch is checked (API section 9): the model call (a failure is a
    ``ValueError`` naming the batch), the outputs and targets against the
    loss (shapes, target range, per-example losses; naming the batch and the
    example), and the gradients for NaN/Inf (one sum per batch; the
    per-element diagnosis runs only when that sum is not finite).

    ``fisher="expected"`` (built-in losses only) yields instead
    ``name -> (K, b, *shape)``: the weighted pseudo-gradients
    ``sqrt(w_k) g_k`` of :func:`~attribkit._compute.targets.expected_targets`,
    whose outer products summed over ``k`` are each example's exact expected
    Fisher (its Gauss-Newton matrix): ``K`` backward passes on one forward
    (``K = C`` classes for cross-entropy, ``D`` output entries for MSE), and
    ``K`` times one batch of gradients held.

    Notes
    -----
    Per-example gradients from hooks assume what ``vmap`` assumes: examples
    do not interact in the forward (eval-mode BatchNorm is fine), and a
    hooked module sees its examples batch first. A module whose input or
    output does not start with the batch dimension (rows of several examples
    flattened together) has its parameters differentiated by the fallback
    for that batch; a sequence-first layout whose length happens to equal
    the batch size cannot be told from batch first.
    """
    loss_fn = resolve_loss(loss, owner)
    V.check_fisher(owner, fisher)
    V.check_fisher_loss(owner, fisher, loss)
    selected = select_params(model, params, owner)
    names = list(selected)

    def loss_of(x, t):  # the non-finite diagnosis: one example, no gradient
        return loss_fn(call_model(model, x, fallback.state), t)

    with EvalMode(model, owner):
        plan = GradientPlan(model, selected)
        fallback = _Fallback(model, selected, loss_fn, owner)
        with _HookCapture(model, plan, owner) as cap:
            batches = target_batches(
                data, loss=loss, fisher=fisher, call=cap.forward, config=config, owner=owner,
                device=model_device(model), dtype=model_dtype(model), desc=desc,
                always_call=True,
            )  # fmt: skip
            for tb in batches:
                with autograd_on():
                    out = _batch(tb, cap, plan, fallback, loss_fn, names, owner, loss_of)
                yield out


def _batch(tb, cap, plan, fallback, loss_fn, names, owner, loss_of) -> OrderedDict:
    """One batch's per-example gradients (``(K, b, ...)`` pseudo-gradients for expected)."""
    rows: dict[str, list] = {n: [] for n in names}
    dirty = set(plan.fallback) | cap.dirty
    redo = [n for n in names if n in dirty]
    # (1, b, ...) or (K, b, ...): one backward per target set, on one forward.
    sets = tb.targets if tb.weights is not None else tb.targets.unsqueeze(0)
    for k in range(sets.shape[0]):
        t_k = sets[k]
        losses = loss_fn(tb.outputs, t_k)
        check_batch(None, tb.outputs, t_k, owner, index=tb.index, offset=tb.offset, losses=losses)
        hooked = cap.gradients(losses.sum(), retain_graph=k < sets.shape[0] - 1)
        fell = fallback(redo, tb.inputs, t_k, tb.index)
        grads = OrderedDict((n, hooked[n] if n in hooked else fell[n]) for n in names)
        _check_finite_gradients(grads, tb.inputs, t_k, tb, owner, loss_of)
        if tb.weights is not None:
            root = tb.weights[k].clamp_min(0).sqrt()
            for n in names:
                g = grads[n]
                grads[n] = g * root.to(g.dtype).reshape(-1, *([1] * (g.ndim - 1)))
        for n in names:
            rows[n].append(grads[n])
    if tb.weights is None:
        return OrderedDict((n, rows[n][0]) for n in names)
    return OrderedDict((n, torch.stack(rows[n])) for n in names)


def _example(x, j):
    """Example ``j`` of a batch, as a batch of one (non-tensor values passed whole)."""
    return tree_map(lambda t: t[j : j + 1] if isinstance(t, torch.Tensor) else t, x)


def _all_finite(x) -> bool:
    """Whether every floating tensor of a batch is finite."""
    return all(
        not t.is_floating_point() or bool(torch.isfinite(t).all())
        for t in tree_flatten(x)[0]
        if isinstance(t, torch.Tensor)
    )


def _check_finite_gradients(grads, inputs, targets, where_in_data, owner, loss_of):
    """Raise ``ValueError`` naming the first example with a NaN/Inf gradient.

    One scalar sum per batch is the cheap test (NaN and Inf propagate through
    it); only when it is not finite are the gradients checked entry by entry,
    so a sum that merely overflows raises nothing. ``where_in_data`` gives
    the batch's ``index`` and ``offset`` (a :class:`TargetBatch`).
    """
    batch, offset = where_in_data.index, where_in_data.offset
    total = torch.stack([g.sum() for g in grads.values()]).sum()
    if bool(torch.isfinite(total)):
        return
    bad = None
    for g in grads.values():
        rows = ~torch.isfinite(g.reshape(g.shape[0], -1)).all(1)
        bad = rows if bad is None else bad | rows
    if not bool(bad.any()):
        return
    j = int(bad.nonzero()[0, 0])
    where = [n for n, g in grads.items() if not bool(torch.isfinite(g[j]).all())]
    x_j, t_j = _example(inputs, j), _example(targets, j)
    if not _all_finite(x_j):
        cause = (
            "The inputs of that example contain NaN or infinity: check the data (missing "
            "values, a division by zero in preprocessing)."
        )
    elif not _all_finite(t_j):
        cause = "The targets of that example contain NaN or infinity: check the targets."
    else:
        try:
            with torch.no_grad():
                value = loss_of(x_j, t_j)
            value = float(value.reshape(-1)[0])
        except Exception:  # the diagnosis must not hide the real error
            value = None
        if value is not None and not math.isfinite(value):
            cause = (
                f"Its inputs and targets are finite but its loss is {value}: check the model "
                "(overflowing activations, a float16 model; try float64) and the loss (log of "
                "0, division by 0, targets out of range)."
            )
        else:
            cause = (
                f"Its inputs, targets and loss ({value}) are finite: check the loss and the "
                "model for operations whose derivative is infinite there (sqrt or norm at 0, "
                "log near 0)."
            )
    raise ValueError(
        f"{V.owner_name(owner)} got a per-example gradient containing NaN or infinity in batch "
        f"{batch} at example {j} of that batch (example {offset + j} of the data), for "
        f"parameters {where}. {cause}"
    )


def layout_params(model, projector, params) -> tuple[list | None, int]:
    """Parameters to differentiate for ``projector`` and the feature count it expects.

    A projector fitted on a model names its parameters in ``param_shapes_``:
    they are differentiated (``params`` may repeat them, in any order). One
    fitted on arrays (or any other transformer) takes the flat gradients of
    ``params`` (default: all trainable), whose count must be its
    ``n_features_in_``.
    """
    if not hasattr(projector, "transform"):
        raise TypeError(
            "The 'projector' argument of per_example_gradients must be a fitted transformer "
            f"(RandomProjector, KroneckerProjector, ...). Got {type(projector).__name__} instead."
        )
    check_is_fitted(projector)
    named = dict(model.named_parameters())
    shapes = getattr(projector, "param_shapes_", None)
    if shapes and all(k in named for k in shapes):
        wrong = {k: (tuple(s), tuple(named[k].shape)) for k, s in shapes.items()}
        wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
        if wrong:
            raise ValueError(
                f"The 'projector' of per_example_gradients was fitted on parameters of other "
                f"shapes than the model's: {wrong} (fitted, model)."
            )
        if params is not None and set(params) != set(shapes):
            raise ValueError(
                "The 'params' argument of per_example_gradients must name the parameters "
                f"the projector was fitted on ({list(shapes)}) or be None. Got {params!r}."
            )
        return list(shapes), int(sum(math.prod(s) for s in shapes.values()))
    n_in = getattr(projector, "n_features_in_", None)
    selected = select_params(model, params, "per_example_gradients")
    p = int(sum(q.numel() for q in selected.values()))
    if n_in is not None and int(n_in) != p:
        raise ValueError(
            f"The 'projector' of per_example_gradients expects {n_in} features, but the "
            f"gradients of the selected parameters have {p}. Fit the projector on the model "
            "or choose matching 'params'."
        )
    return (None if params is None else list(params)), p
