"""The model side of every model-mode pass: parameters, devices, modes and the one model call.

* :func:`select_params` / :func:`param_shapes` turn ``params=None`` or a list
  of names into the ordered parameters to differentiate (model order) and
  their layout;
* :func:`split_state` detaches them into the two dicts ``torch.func``'s
  ``functional_call`` takes (the differentiated ones, and everything else);
* :class:`EvalMode` runs a pass in eval mode and gives every submodule its
  own ``training`` flag back;
* :func:`autograd_on` lets a pass differentiate even when it is called
  inside ``torch.inference_mode()`` or ``torch.no_grad()``;
* :func:`call_model` is the one model-call dispatcher: it builds the
  positional and keyword arguments from a batch's inputs (:func:`model_args`)
  and calls the model itself (hooks fire: layer capture) or, given a state,
  ``torch.func.functional_call`` (per-example gradients, Hessian-vector
  products); :func:`checked_call` is the same with the batch's index and
  shapes in the error when the model fails (API section 9).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from . import validation as V
from .guard import use_model

__all__ = [
    "EvalMode",
    "autograd_on",
    "batch_shapes",
    "call_model",
    "checked_call",
    "check_not_inference",
    "first_call",
    "model_args",
    "model_failure",
    "model_device",
    "model_dtype",
    "param_shapes",
    "select_params",
    "split_state",
]


def select_params(model: torch.nn.Module, params, owner) -> OrderedDict:
    """Ordered ``name -> parameter`` of the parameters to differentiate."""
    named = OrderedDict(model.named_parameters())
    if params is None:
        chosen = OrderedDict((n, p) for n, p in named.items() if p.requires_grad)
        if not chosen:
            raise ValueError(
                f"The model given to {V.owner_name(owner)} has no trainable parameter."
            )
        return chosen
    V.check_params(owner, params)
    unknown = [n for n in params if n not in named]
    if unknown:
        raise ValueError(
            f"The 'params' parameter of {V.owner_name(owner)} names parameters the model does "
            f"not have: {unknown}. Available: {list(named)}."
        )
    if len(set(params)) != len(params):
        raise ValueError(
            f"The 'params' parameter of {V.owner_name(owner)} lists a parameter twice: {params}."
        )
    # Model order, whatever order the user listed them in.
    wanted = set(params)
    return OrderedDict((n, p) for n, p in named.items() if n in wanted)


def param_shapes(selected: Mapping) -> OrderedDict:
    """``name -> shape`` of selected parameters, in their order."""
    return OrderedDict((n, tuple(p.shape)) for n, p in selected.items())


def split_state(model: torch.nn.Module, selected: Mapping) -> tuple[OrderedDict, dict]:
    """``(differentiated, frozen)`` detached state for ``functional_call``.

    ``differentiated`` holds the selected parameters (their order), ``frozen``
    every other parameter and the buffers; ``{**frozen, **differentiated}`` is
    the model's whole state. Detached copies share storage with the model, so
    nothing about the model (``requires_grad``, ``.grad``) is touched.
    """
    sel = OrderedDict((n, p.detach()) for n, p in selected.items())
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in sel}
    frozen.update(dict(model.named_buffers()))
    return sel, frozen


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (or buffer), if any."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


class EvalMode:
    """Evaluate in eval mode (no dropout, running batch-norm stats), then restore.

    Each submodule gets its own ``training`` flag back, so a model whose
    parts were in different modes (a frozen, eval-mode backbone under a
    training head) is left exactly as it was. The model is held for this
    thread meanwhile (:mod:`attribkit._compute.guard`): another thread using
    it at the same time raises ``RuntimeError`` before any mode is changed.
    """

    def __init__(self, model, owner="attribkit"):
        self.model = model
        self.guard_owner = V.owner_name(owner)
        self.guard = use_model(model, self.guard_owner)

    def __enter__(self):
        self.guard.__enter__()
        self.modes = [(m, m.training) for m in self.model.modules()]
        try:
            check_not_inference(self.model, self.guard_owner)
            self.model.eval()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            for module, training in self.modes:
                module.training = training
        finally:
            self.guard.__exit__(*exc)


def check_not_inference(model: torch.nn.Module, owner) -> None:
    """Raise ``ValueError`` when the model holds inference tensors.

    Tensors created under ``torch.inference_mode()`` can never be saved for
    backward, and a model's parameters cannot be cloned without changing the
    model, so such a model cannot be differentiated: say how to get a normal
    copy instead of letting autograd fail deep inside the pass.
    """
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_inference():
            raise ValueError(
                f"The model given to {V.owner_name(owner)} holds tensors created under "
                f"torch.inference_mode() ({name!r}), which autograd cannot differentiate "
                "through. Build or load the model outside inference_mode (calling attribkit "
                "inside inference_mode is fine), or make a normal copy: "
                "with torch.inference_mode(False): model = copy.deepcopy(model)."
            )


@contextlib.contextmanager
def autograd_on():
    """Differentiate inside: inference mode off and gradients on, whatever the caller set.

    Every model-mode entry point runs its passes in here, so that a call made
    inside ``torch.inference_mode()`` or ``torch.no_grad()`` works (inference
    tensors in the data are cloned by :mod:`attribkit._compute.data`). The
    caller's modes are restored on exit.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


# --------------------------------------------------------------------------- the model call
def model_args(inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the model call for a batch's inputs.

    A dict holds keyword arguments, a tuple (or list) positional ones, and
    anything else is the single positional argument.
    """
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call_model(model: torch.nn.Module, inputs, state: Mapping | None = None):
    """The model's outputs on a batch's inputs: the one model-call dispatcher.

    Without ``state`` the model itself is called (its hooks fire: layer
    capture); with ``state`` (a full ``name -> tensor`` dict of parameters
    and buffers) ``torch.func.functional_call`` runs the model on it
    (per-example gradients and Hessian-vector products under ``vmap``,
    ``grad``, ``jvp``).
    """
    args, kwargs = model_args(inputs)
    if state is None:
        return model(*args, **kwargs)
    return functional_call(model, state, args, kwargs)


def batch_shapes(x):
    """Shapes of a batch's tensors, for error messages (type names elsewhere)."""
    return tree_map(
        lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__, x
    )


#: Errors a batch's context must not hide: the caller reacts to their type.
_PASS_THROUGH = (
    (MemoryError, torch.OutOfMemoryError) if hasattr(torch, "OutOfMemoryError") else (MemoryError,)
)


def model_failure(
    exc: Exception, index: int, inputs, targets, owner, example=None, advice: bool = True
) -> ValueError:
    """The ``ValueError`` for a model that failed on batch ``index`` (API section 9).

    It names the batch (and ``example``, when known) and the batch's shapes,
    says what to do about integer features reaching a float layer, and on
    the first batch (with ``advice``) how batches are read.
    """
    where = "the first batch (batch 0)" if index == 0 else f"batch {index}"
    if example is not None:
        where += f" (example {example} of the data)"
    message = (
        f"The model given to {V.owner_name(owner)} failed on {where} of 'data' (inputs of "
        f"shape {batch_shapes(inputs)}, targets of shape {batch_shapes(targets)}) with "
        f"{type(exc).__name__}: {exc}"
    )
    hint = _integer_input_hint(exc, inputs)
    if hint:
        message += "\n" + hint
    elif index == 0 and advice:
        message += (
            "\nEach batch must be a pair (inputs, targets) whose first dimension is the "
            "batch, or a mapping of the model's keyword arguments with its 'labels'; inputs "
            "are passed to the model as model(inputs) (a tuple as positional, a dict as "
            "keyword arguments). A list of single examples wants a DataLoader: "
            "torch.utils.data.DataLoader(list_of_pairs, batch_size=...), or a tuple "
            "(X, y) of stacked arrays."
        )
    return ValueError(message)


def _integer_input_hint(exc: Exception, inputs) -> str | None:
    """What to do when integer inputs reached a floating-point layer, else None.

    Integer inputs are never cast (they may be token ids, which an
    embedding needs as they are), so features stored as integers (pixel
    values, counts) meet a float weight and torch says only that the dtypes
    differ.
    """
    text = str(exc)
    if not any(
        key in text
        for key in ("same dtype", "should be the same", "expected scalar type", "Found dtype")
    ):
        return None
    ints = {
        str(t.dtype).replace("torch.", "")
        for t in tree_flatten(inputs)[0]
        if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dtype != torch.bool
    }
    if not ints:
        return None
    return (
        f"The inputs hold integer tensors ({', '.join(sorted(ints))}), which attribkit passes to "
        "the model as they are (they may be token ids or masks), while the layer that failed "
        "computes in floating point. If they are features (pixel values, counts), convert them "
        "first, e.g. X.float() or X.to(torch.float32), or cast them inside the model."
    )


def checked_call(call: Callable, inputs, targets, owner, index: int = 0, advice: bool = True):
    """``call(inputs)``; a failure is re-raised as a ``ValueError`` naming the batch.

    Out-of-memory errors pass through unchanged (a caller may retry with
    smaller batches). ``advice``: see :func:`model_failure`.
    """
    try:
        return call(inputs)
    except _PASS_THROUGH:
        raise
    except Exception as exc:
        raise model_failure(exc, index, inputs, targets, owner, advice=advice) from exc


def first_call(call: Callable, inputs, targets, owner):
    """:func:`checked_call` on the first batch."""
    return checked_call(call, inputs, targets, owner, 0)
