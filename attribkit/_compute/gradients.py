"""Per-example gradients by ``torch.func``, batch by batch, and their checks.

The data flow of :func:`iter_gradients`:

1. the parameters to differentiate are selected (``params``) and detached
   into the ``functional_call`` state (:mod:`attribkit._compute.model`);
2. :func:`attribkit._compute.targets.target_batches` streams the data in
   batches on the model's device and dtype and gives each batch's targets
   for the Fisher asked for (the data's, one sample, or all ``K`` weighted
   targets of the expected Fisher);
3. per batch, ``vmap(grad(loss of one example))`` over the batch gives every
   example's gradient in one vectorised backward pass; for
   ``fisher="expected"`` one such pass per target ``k``, scaled by
   ``sqrt(w_k)``;
4. every batch is checked for NaN/Inf gradients (one sum per batch; the
   diagnosis of the first bad example runs only when the sum is not finite)
   and yielded as ``name -> (b, *shape)`` (``(K, b, *shape)`` for
   ``"expected"``), detached, on the model's device and in its dtype.

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
from torch.utils._pytree import tree_flatten, tree_map

from ..config import ComputeConfig
from . import validation as V
from .model import EvalMode, call_model, model_device, model_dtype, select_params, split_state
from .targets import resolve_loss, target_batches

__all__ = ["iter_gradients", "layout_params"]


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

    Gradients are detached, on the model's device and in its dtype. The model
    is evaluated in eval mode (dropout off, batch-norm running statistics) and
    its mode is restored afterwards. Floating-point inputs and targets are cast
    to the dtype of the model's parameters (integer ones, such as class labels
    or token ids, are left alone).

    Every batch is checked for non-finite gradients (one sum per batch; the
    per-element diagnosis runs only when that sum is not finite): a NaN or Inf
    gradient raises ``ValueError`` naming the batch, the example and its likely
    cause. A model call that fails on the first batch is re-raised as a
    ``ValueError`` giving the batch's shapes.

    ``fisher="expected"`` (built-in losses only) yields instead
    ``name -> (K, b, *shape)``: the weighted pseudo-gradients
    ``sqrt(w_k) g_k`` of :func:`~attribkit._compute.targets.expected_targets`,
    whose outer products summed over ``k`` are each example's exact expected
    Fisher (its Gauss-Newton matrix). That costs ``K`` vectorised backward
    passes per batch (``K = C`` classes for cross-entropy, ``D`` output
    entries for MSE) and holds ``K`` times one batch of gradients.
    """
    loss_fn = resolve_loss(loss, owner)
    V.check_fisher(owner, fisher)
    V.check_fisher_loss(owner, fisher, loss)
    selected = select_params(model, params, owner)
    names = list(selected)
    sel, frozen = split_state(model, selected)
    state = {**frozen, **sel}

    def one_loss(sel_params, x, t):
        x1 = tree_map(lambda a: a.unsqueeze(0), x)
        out = call_model(model, x1, {**frozen, **sel_params})
        value = loss_fn(out, t.unsqueeze(0))
        return value.reshape(())

    def outputs_of(inputs):
        with torch.no_grad():
            return call_model(model, inputs, state)

    def loss_of(x, t):
        return loss_fn(call_model(model, x, state), t)

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))
    batches = target_batches(
        data, loss=loss, fisher=fisher, call=outputs_of, config=config, owner=owner,
        device=model_device(model), dtype=model_dtype(model), desc=desc,
    )  # fmt: skip
    with EvalMode(model, owner):
        for tb in batches:
            if tb.weights is None:
                out = _batch_gradients(per_example, sel, names, tb.inputs, tb.targets)
                _check_finite_gradients(out, tb.inputs, tb.targets, tb, owner, loss_of)
                yield out
                continue
            rows: dict[str, list] = {n: [] for n in names}
            for k in range(tb.targets.shape[0]):
                grads = _batch_gradients(per_example, sel, names, tb.inputs, tb.targets[k])
                _check_finite_gradients(grads, tb.inputs, tb.targets[k], tb, owner, loss_of)
                root = tb.weights[k].clamp_min(0).sqrt()
                for n in names:
                    g = grads[n]
                    rows[n].append(g * root.to(g.dtype).reshape(-1, *([1] * (g.ndim - 1))))
            yield OrderedDict((n, torch.stack(rows[n])) for n in names)


def _batch_gradients(per_example, sel, names, inputs, targets) -> OrderedDict:
    grads = per_example(sel, inputs, targets)
    return OrderedDict((n, grads[n].detach()) for n in names)


def _example(x, j):
    """Example ``j`` of a batch, as a batch of one."""
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
