"""Losses and the targets a Fisher is taken at: one generator for every model-mode pass.

* The built-in per-example losses (:data:`BUILTIN_LOSSES`, :func:`resolve_loss`):
  per-example versions of ``torch.nn.CrossEntropyLoss`` and ``torch.nn.MSELoss``,
  whose batch mean is the torch loss, and ``"causal_lm"``, Hugging Face's
  language-model loss summed per sequence (API section 7). They read the
  model's logits from whatever it returns (:func:`logits_of`: a Hugging Face
  ``ModelOutput``, a tuple, a tensor); a callable loss gets the raw output.
* :func:`check_batch` checks one batch against the loss, on what the loss
  reads: output shapes, the targets' range (two scalars), the per-example
  losses' shape; a failure names the batch and, where known, the example.
* :func:`sample_targets` (``fisher="true"``) and :func:`expected_targets`
  (``fisher="expected"``) take targets from the model's predictive
  distribution.
* :func:`target_batches` is the one loop that drives a Fisher pass over the
  data: batch by batch it calls the model where the targets need its outputs
  (always for ``"true"`` and ``"expected"``; on the first batch only for
  ``"empirical"`` unless the consumer differentiates those outputs), checks
  the batch, and yields a :class:`TargetBatch` holding the targets the
  gradients are taken at: the data's (``"empirical"``), one sample
  (``"true"``), or all ``K`` targets with their weights (``"expected"``).
  Per-example gradients (:mod:`attribkit._compute.gradients`) and EK-FAC's
  and the Kronecker projector's captured layer gradients consume it; how
  each differentiates is theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import ComputeConfig
from . import validation as V
from .data import batch_len, iter_batches
from .model import batch_shapes, checked_call

__all__ = [
    "BUILTIN_LOSSES",
    "IGNORE_INDEX",
    "TargetBatch",
    "check_batch",
    "check_loss_output",
    "expected_targets",
    "logits_of",
    "resolve_loss",
    "sample_targets",
    "target_batches",
]

#: Targets equal to this are ignored by the cross-entropy losses (torch's and HF's).
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- outputs
def logits_of(outputs) -> torch.Tensor:
    """What a built-in loss reads from the model's outputs (API section 7).

    ``outputs.logits`` (an attribute, as on a Hugging Face ``ModelOutput``,
    or a ``"logits"`` key of a mapping) when the output has it, else the
    first element of a tuple or list, else the output itself, which must
    then be a tensor (``ValueError`` otherwise).
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    found = getattr(outputs, "logits", None)
    if found is None and isinstance(outputs, Mapping):
        found = outputs.get("logits")
    if found is None and isinstance(outputs, (tuple, list)) and len(outputs) > 0:
        found = outputs[0]
    if not isinstance(found, torch.Tensor):
        raise ValueError(
            "The built-in losses read the model's logits: outputs.logits (an attribute or a "
            "key), else the first element of a tuple output, else the output tensor. Got "
            f"{type(outputs).__name__} {_shapes(outputs)} with none of them a tensor; return "
            "a tensor or pass a callable loss(outputs, targets), which gets the raw output."
        )
    return found


def _shapes(outputs) -> str:
    try:
        return str(batch_shapes(outputs))
    except Exception:  # an output torch's pytree cannot walk
        return ""


# --------------------------------------------------------------------------- losses
def _class_layout(logits: torch.Tensor, targets: torch.Tensor) -> str | None:
    """How cross-entropy pairs ``logits`` with ``targets``; None when they do not fit.

    * ``"classes"``: logits ``(N, C)``, targets ``(N,)`` class indices or
      ``(N, C)`` probabilities;
    * ``"tokens"``: logits ``(N, T, ..., C)``, integer targets ``(N, T, ...)``
      (API section 7: the classes last, as language models return them);
    * ``"torch"``: torch's ``CrossEntropyLoss`` convention, logits
      ``(N, C, d1, ...)`` with targets ``(N, d1, ...)`` class indices or
      ``(N, C, d1, ...)`` probabilities.

    When both ``"tokens"`` and ``"torch"`` fit (``(N, C, T)`` logits with
    ``C == T``), ``"tokens"`` wins, as API section 7 binds it.
    """
    if logits.ndim < 2 or targets.shape[:1] != logits.shape[:1]:
        return None
    floating = targets.is_floating_point()
    if logits.ndim == 2:
        if (floating and targets.shape == logits.shape) or (not floating and targets.ndim == 1):
            return "classes"
        return None
    if not floating and targets.shape == logits.shape[:-1]:
        return "tokens"
    if floating and targets.shape == logits.shape:
        return "torch"
    if not floating and targets.shape == logits.shape[:1] + logits.shape[2:]:
        return "torch"
    return None


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropies ``(N, T...)`` of classes-last logits, 0 at ignored tokens."""
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    )
    return flat.reshape(targets.shape)


def _long(targets: torch.Tensor) -> torch.Tensor:
    """Integer class indices as int64, the only integer dtype ``F.cross_entropy`` takes."""
    if targets.is_floating_point() or targets.dtype == torch.int64:
        return targets
    return targets.long()


def _cross_entropy(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (API section 7), on the logits :func:`logits_of` reads.

    * logits ``(N, C)``: torch's ``CrossEntropyLoss`` per example, targets
      ``(N,)`` class indices (``-100``: a loss of 0) or ``(N, C)``
      probabilities;
    * logits ``(N, T, C)`` (classes last, any number of token dimensions)
      with integer targets ``(N, T)``: the SUM of the per-token cross
      entropies over the example's tokens whose target is not ``-100``;
    * torch's convention, logits ``(N, C, d1, ...)`` with targets
      ``(N, d1, ...)`` class indices or ``(N, C, d1, ...)`` probabilities:
      the MEAN over the positions (over those whose target is not ``-100``),
      so the batch mean is ``CrossEntropyLoss`` when every example has as
      many counted positions.

    The conventions are told apart by the targets' shape; ``(N, C, T)``
    logits with ``C == T`` and ``(N, T)`` targets fit both, and are read as
    ``(N, T, C)`` (classes last).
    """
    logits = logits_of(outputs)
    targets = _long(targets)
    layout = _class_layout(logits, targets)
    if layout is None:
        raise ValueError(_layout_message("cross_entropy", logits, targets))
    if layout == "classes":
        return F.cross_entropy(logits, targets, reduction="none")
    if layout == "tokens":
        return _token_losses(logits, targets).flatten(1).sum(1)
    losses = F.cross_entropy(logits, targets, reduction="none")
    if not targets.is_floating_point():
        # Tokens at ignore_index (-100) are left out of their example's mean.
        keep = (targets != IGNORE_INDEX).to(losses.dtype)
        return (losses * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
    return losses.flatten(1).mean(1)


def _causal_lm(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Per-sequence language-model loss: cross-entropy of each token's next-token prediction.

    Logits ``(N, T, V)`` and integer targets ``(N, T)`` (the token ids, or
    Hugging Face's ``labels``): ``logits[:, :-1]`` against
    ``targets[:, 1:]``, summed over the pairs whose target is not ``-100``
    (padding, prompts). Hugging Face's ``loss`` is the mean of the same
    token losses over the batch's counted tokens.
    """
    logits = logits_of(outputs)
    targets = _long(targets)
    if (
        logits.ndim != 3
        or targets.is_floating_point()
        or tuple(targets.shape) != tuple(logits.shape[:2])
    ):
        raise ValueError(_layout_message("causal_lm", logits, targets))
    return _token_losses(logits[:, :-1], targets[:, 1:]).sum(1)


def _mse(outputs, targets: torch.Tensor) -> torch.Tensor:
    outputs = logits_of(outputs)
    if targets.shape != outputs.shape and targets.numel() == outputs.numel():
        targets = targets.reshape(outputs.shape)
    targets = targets.to(outputs.dtype)
    return F.mse_loss(outputs, targets, reduction="none").reshape(outputs.shape[0], -1).mean(1)


def _layout_message(loss: str, logits: torch.Tensor, targets: torch.Tensor) -> str:
    got = (
        f"Got logits of shape {tuple(logits.shape)} and {targets.dtype} targets of shape "
        f"{tuple(targets.shape)}."
    )
    if loss == "causal_lm":
        return (
            "loss='causal_lm' takes logits (batch, tokens, vocabulary) and integer targets "
            f"(batch, tokens) (token ids or labels, -100 ignored). {got}"
        )
    return (
        "loss='cross_entropy' takes logits (N, C) with targets (N,) class indices or (N, C) "
        "probabilities; logits (N, T, C) with integer targets (N, T) (a sequence: the "
        "per-token losses are summed); or torch's (N, C, d1, ...) with targets (N, d1, ...) "
        f"(averaged over positions). {got}"
    )


BUILTIN_LOSSES = {"cross_entropy": _cross_entropy, "mse": _mse, "causal_lm": _causal_lm}
_BUILTIN_NAMES = {fn: name for name, fn in BUILTIN_LOSSES.items()}


def resolve_loss(loss, owner="per_example_gradients") -> Callable:
    """The per-example loss ``(outputs, targets) -> (N,)`` for ``loss``.

    The built-ins take the model's raw output (they read its logits with
    :func:`logits_of`): per-example versions of ``torch.nn.CrossEntropyLoss``
    and ``torch.nn.MSELoss`` (MSE averages over output dimensions), so their
    batch mean equals the torch loss, cross-entropy summed over the tokens of
    a sequence, and ``"causal_lm"``. A callable is returned as is.
    """
    V.check_loss(owner, loss)
    if callable(loss):
        return loss
    return BUILTIN_LOSSES[loss]


def _builtin_name(loss) -> str | None:
    """The built-in name of ``loss`` (a name or a built-in function), else None."""
    if isinstance(loss, str):
        return loss if loss in BUILTIN_LOSSES else None
    try:
        return _BUILTIN_NAMES.get(loss)
    except TypeError:  # unhashable callable
        return None


# --------------------------------------------------------------------------- checks
def _where(index: int | None, offset: int | None, j: int | None = None) -> str:
    if index is None:
        return "a batch of 'data'"
    text = f"batch {index} of 'data'"
    if j is not None:
        text += f", example {j} of that batch"
        if offset is not None:
            text += f" (example {offset + j} of the data)"
    return text


def _check_classes(name: str, logits, targets, owner, index, offset) -> None:
    """Shapes fit and integer targets lie in ``[0, C)`` or are ``-100``: one sync."""
    targets = _long(targets)
    who = V.owner_name(owner)
    if name == "causal_lm":
        ok = (
            logits.ndim == 3
            and not targets.is_floating_point()
            and tuple(targets.shape) == tuple(logits.shape[:2])
        )
        layout = "tokens" if ok else None
        counted = targets[:, 1:] if ok else targets
    else:
        layout = _class_layout(logits, targets)
        counted = targets
    if layout is None:
        raise ValueError(
            f"The 'loss' of {who} cannot pair the model's outputs with the targets of "
            f"{_where(index, offset)}: {_layout_message(name, logits, targets)}"
        )
    classes = logits.shape[-1] if layout == "tokens" else logits.shape[1]
    _check_range(name, counted, classes, owner, index, offset)


def _check_range(name, counted, classes: int, owner, index, offset) -> None:
    """Integer targets lie in ``[0, classes)`` or are ``-100``: one ``any`` per batch."""
    if counted.is_floating_point() or counted.numel() == 0:
        return
    bad = ((counted < 0) & (counted != IGNORE_INDEX)) | (counted >= classes)
    if not bool(bad.any()):
        return
    rows = bad.reshape(bad.shape[0], -1).any(1)
    j = int(rows.nonzero()[0, 0])
    value = int(counted[j][bad[j]].reshape(-1)[0])
    raise ValueError(
        f"{V.owner_name(owner)}: {_where(index, offset, j)} has the target {value}, out of "
        f"range for loss={name!r} on outputs with {classes} classes: class indices must be "
        f"in [0, {classes}) or {IGNORE_INDEX} (ignored)."
    )


def check_batch(
    loss, outputs, targets, owner, *, index: int | None = None, offset: int | None = None,
    losses: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """Check one batch against the loss, on what the loss reads (API sections 7 and 9).

    Built-in losses: the logits (:func:`logits_of`) and the targets fit
    (shapes; for MSE as many entries per example) and integer class targets
    lie in ``[0, C)`` or are ``-100`` (one ``any`` per batch; the bad example
    is looked for only on failure). ``losses``, when given (the per-example
    losses of the batch), must have shape ``(batch,)``, for a callable loss
    too. A failure is a ``ValueError`` naming the batch (``index``, counted
    from 0) and, where known, the example (``offset``: examples before it).
    """
    name = _builtin_name(loss)
    n = targets.shape[0]
    if name is not None:
        logits = logits_of(outputs)
        if name == "mse":
            if logits.shape[:1] != targets.shape[:1] or targets.numel() != logits.numel():
                raise ValueError(
                    f"The 'loss' of {V.owner_name(owner)} ('mse') needs as many targets as "
                    f"outputs per example in {_where(index, offset)}. Got outputs of shape "
                    f"{tuple(logits.shape)} and targets of shape {tuple(targets.shape)}."
                )
        else:
            _check_classes(name, logits.detach(), targets, owner, index, offset)
    if losses is not None and (
        not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n,)
    ):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
        raise ValueError(
            f"The 'loss' of {V.owner_name(owner)} must return per-example losses of shape "
            f"(batch,) = ({n},). Got {shape} instead in {_where(index, offset)} (a reduced "
            "loss?)."
        )


def check_loss_output(loss_fn, outputs, targets, owner, *, index=None, offset=None) -> None:
    """The outputs fit the loss, which gives one value per example.

    :func:`check_batch`, with the loss evaluated (without gradients) on the
    outputs: a reduced loss (a mean instead of per-example values), outputs
    the loss cannot read or targets out of range are a clear ``ValueError``
    instead of a wrong result or an error deep in ``torch.func``.
    """
    check_batch(loss_fn, outputs, targets, owner, index=index, offset=offset)
    try:
        with torch.no_grad():
            losses = loss_fn(outputs, targets)
    except Exception as exc:
        raise ValueError(
            f"The 'loss' of {V.owner_name(owner)} failed on {_where(index, offset)} (model "
            f"outputs {_shapes(outputs)}, targets of shape {tuple(targets.shape)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    check_batch(None, outputs, targets, owner, index=index, offset=offset, losses=losses)


# --------------------------------------------------------------------------- Fisher targets
def sample_targets(outputs, loss, owner="sample_targets", targets=None) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution (``fisher="true"``).

    Cross-entropy: one class per example (or per token) drawn from the
    softmax of the logits, over the class dimension of the layout the data's
    ``targets`` give (:func:`_cross_entropy`; without ``targets``: dimension
    1, torch's convention). ``"causal_lm"``: token ``t`` (from 1) drawn from
    the prediction at ``t - 1``. Positions whose data target is ``-100`` stay
    ``-100`` (ignored). MSE: ``outputs + sqrt(D / 2) * N(0, I)`` with ``D``
    output dimensions per example: the Gaussian whose negative
    log-likelihood is the per-example MSE up to a constant, so that the
    expected outer product of gradients equals the Gauss-Newton matrix of
    the loss. Uses torch's global generator (``torch.manual_seed`` makes it
    reproducible).
    """
    V.check_fisher_loss(owner, "true", loss)
    name = _builtin_name(loss)
    logits = logits_of(outputs).detach()
    if name == "mse":
        dim = math.prod(logits.shape[1:])
        return logits + math.sqrt(dim / 2.0) * torch.randn_like(logits)
    if targets is not None:
        targets = _long(targets)
    if name == "causal_lm":
        head = logits[:, :-1]
        draws = _draw(head)
        sampled = torch.full(logits.shape[:2], IGNORE_INDEX, dtype=torch.long, device=draws.device)
        sampled[:, 1:] = draws
    else:
        layout = "torch" if targets is None else _class_layout(logits, targets)
        if layout is None:
            raise ValueError(_layout_message("cross_entropy", logits, targets))
        sampled = _draw(logits if layout in ("classes", "tokens") else logits.movedim(1, -1))
    if targets is not None and not targets.is_floating_point():
        sampled = sampled.masked_fill(targets == IGNORE_INDEX, IGNORE_INDEX)
    return sampled


def _draw(logits: torch.Tensor) -> torch.Tensor:
    """One class per row of classes-last logits ``(..., C)``: int64 ``(...)``."""
    probs = torch.softmax(logits.double(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1).reshape(probs.shape[:-1])


def expected_targets(outputs, loss, owner="expected_targets") -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and weights that enumerate the model's predictive distribution.

    The exact expected Fisher (``fisher="expected"``) of a built-in loss is
    ``sum_k w_k g_k g_k^T`` per example, where ``g_k`` is the gradient of the
    loss at target ``targets[k]``; it equals the Gauss-Newton matrix
    ``J^T H_f J`` (``H_f`` the Hessian of the loss in the outputs).

    * Cross-entropy, logits ``(N, C)``: ``K = C`` targets, ``targets[c]`` is
      class ``c`` for every example and ``weights[c] = softmax(logits)[:, c]``
      (``sum_c p_c (p - e_c)(p - e_c)^T = diag(p) - p p^T``).
    * MSE, outputs ``(N, *shape)`` with ``D`` entries per example: ``K = D``
      targets ``outputs - sqrt(D / 2) e_k`` with weight 1, since the gradient
      in the outputs is ``(2 / D)(f - y)`` and ``sum_k (2/D)^2 (D/2) e_k e_k^T
      = (2 / D) I`` is the Hessian of the per-example MSE.

    Returns
    -------
    targets : torch.Tensor of shape (K, N, ...)
        Detached; class indices (int64) for cross-entropy, outputs' dtype for MSE.
    weights : torch.Tensor of shape (K, N)
        In the outputs' dtype; each example's weights sum to 1 (cross-entropy)
        or are all 1 (MSE).

    Raises ``ValueError`` for a custom loss, for ``"causal_lm"`` and for
    cross-entropy outputs with extra dimensions (sequences), whose exact
    expectation needs one gradient per token and class: the message names
    ``fisher="true"``.
    """
    V.check_fisher_loss(owner, "expected", loss)
    name = _builtin_name(loss)
    outputs = logits_of(outputs).detach()
    n = outputs.shape[0]
    if name == "cross_entropy":
        if outputs.ndim != 2:
            raise ValueError(
                f"The 'fisher' parameter 'expected' of {V.owner_name(owner)} with "
                "loss='cross_entropy' needs model outputs of shape (batch, classes). Got "
                f"{tuple(outputs.shape)}: for sequence outputs the exact expectation needs one "
                "gradient per token and class; use fisher='true' (one label sampled per "
                "token) or 'empirical'."
            )
        classes = outputs.shape[1]
        weights = torch.softmax(outputs.double(), dim=1).T.to(outputs.dtype)
        targets = torch.arange(classes, device=outputs.device).unsqueeze(1).expand(classes, n)
        return targets.contiguous(), weights.contiguous()
    dim = math.prod(outputs.shape[1:])
    eye = torch.eye(dim, dtype=outputs.dtype, device=outputs.device)
    eye = eye.reshape(dim, 1, *outputs.shape[1:])
    targets = outputs.unsqueeze(0) - math.sqrt(dim / 2.0) * eye
    weights = torch.ones(dim, n, dtype=outputs.dtype, device=outputs.device)
    return targets, weights


# --------------------------------------------------------------------------- the pass
class TargetBatch(NamedTuple):
    """One batch of a Fisher pass (see :func:`target_batches`).

    Attributes
    ----------
    index : int
        The batch's position in ``data`` (0-based).
    offset : int
        Examples before this batch.
    inputs : tensor, tuple or dict
        The batch's inputs, on the model's device (floating ones in its dtype).
    outputs : object or None
        The model's raw outputs from ``call`` (a tensor, a tuple, a
        ``ModelOutput``); None when they were not needed
        (``fisher="empirical"`` after the first batch).
    targets : torch.Tensor
        ``(b, ...)``: the data's targets (``"empirical"``) or one sample
        (``"true"``); ``(K, b, ...)`` for ``"expected"``.
    weights : torch.Tensor or None
        ``(K, b)`` weights of the ``K`` targets (``"expected"``), else None.
    data_targets : torch.Tensor
        ``(b, ...)``: the data's own targets, whatever ``fisher`` is.
    """

    index: int
    offset: int
    inputs: object
    outputs: object
    targets: torch.Tensor
    weights: torch.Tensor | None
    data_targets: torch.Tensor | None = None


def target_batches(
    data,
    *,
    loss,
    fisher: str,
    call: Callable,
    config: ComputeConfig,
    owner,
    device: torch.device | None,
    dtype: torch.dtype | None,
    desc: str | None = None,
    always_call: bool = False,
    max_batches: int | None = None,
    describe_first_failure: bool = True,
) -> Iterator[TargetBatch]:
    """Yield the batches of a Fisher pass with the targets the gradients are taken at.

    Parameters
    ----------
    data
        Anything :func:`attribkit._compute.data.iter_batches` takes; batches
        are moved to ``device`` and floating ones cast to ``dtype``.
    loss : {"cross_entropy", "mse", "causal_lm"} or callable
    fisher : {"empirical", "true", "expected"}
        ``"true"`` and ``"expected"`` need a built-in loss (``ValueError``).
    call : callable
        ``inputs -> outputs``, the consumer's own model call (under
        ``torch.no_grad`` for a ``functional_call``, with gradients and hooks
        for layer capture).
    always_call : bool, default=False
        Call the model on every batch even for ``"empirical"`` (a consumer
        that differentiates those outputs); otherwise only the first batch is
        called, to check the outputs against the loss.
    max_batches : int, optional
        Stop after this many batches.
    describe_first_failure : bool, default=True
        A model call that fails is re-raised as a ``ValueError`` naming the
        batch and its shapes (:func:`attribkit._compute.model.checked_call`),
        on every batch; on the first one this adds how batches are read
        (False leaves that advice out).

    Every batch the model is called on is checked with :func:`check_batch`
    (shapes and target range, on what the loss reads; on the first batch the
    loss is also evaluated, :func:`check_loss_output`); the targets of the
    other batches are checked against the number of classes seen on the
    first. ``"true"`` samples with torch's global generator
    (:func:`sample_targets`), once per batch and pass.
    """
    V.check_fisher(owner, fisher)
    V.check_fisher_loss(owner, fisher, loss)
    loss_fn = resolve_loss(loss, owner)
    offset = 0
    name = _builtin_name(loss)
    classes = None  # the class count seen on the first batch, for the uncalled ones
    batches = iter_batches(data, config, device=device, dtype=dtype, desc=desc, loss=loss)
    for index, (inputs, targets) in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        outputs = weights = None
        data_targets = targets
        if always_call or fisher != "empirical" or index == 0:
            outputs = checked_call(call, inputs, targets, owner, index, describe_first_failure)
            if index == 0:  # the loss too, once: a reduced loss is caught before any work
                check_loss_output(loss_fn, outputs, targets, owner, index=0, offset=0)
            else:
                check_batch(loss, outputs, targets, owner, index=index, offset=offset)
            if index == 0 and name in ("cross_entropy", "causal_lm"):
                logits = logits_of(outputs)
                classes = logits.shape[1] if logits.ndim == 2 else None
        elif classes is not None:  # (N, C) logits: the targets are (N,) class indices
            _check_range(name, _long(targets), classes, owner, index, offset)
        if fisher == "true":
            targets = sample_targets(outputs, loss, owner, targets)
        elif fisher == "expected":
            targets, weights = expected_targets(outputs, loss, owner)
        yield TargetBatch(index, offset, inputs, outputs, targets, weights, data_targets)
        offset += batch_len(inputs)
