"""Losses and the targets a Fisher is taken at: one generator for every model-mode pass.

* The built-in per-example losses (:data:`BUILTIN_LOSSES`, :func:`resolve_loss`):
  per-example versions of ``torch.nn.CrossEntropyLoss`` and ``torch.nn.MSELoss``,
  whose batch mean is the torch loss.
* :func:`sample_targets` (``fisher="true"``) and :func:`expected_targets`
  (``fisher="expected"``) take targets from the model's predictive
  distribution.
* :func:`target_batches` is the one loop that drives a Fisher pass over the
  data: batch by batch it calls the model where the targets need its outputs
  (always for ``"true"`` and ``"expected"``; on the first batch only for
  ``"empirical"``, whose outputs are checked against the loss there), and
  yields a :class:`TargetBatch` holding the targets the gradients are taken
  at: the data's (``"empirical"``), one sample (``"true"``), or all ``K``
  targets with their weights (``"expected"``). Per-example gradients by
  ``vmap`` (:mod:`attribkit._compute.gradients`) and EK-FAC's captured layer
  gradients both consume it; how each differentiates is theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..config import ComputeConfig
from . import validation as V
from .data import batch_len, iter_batches
from .model import first_call

__all__ = [
    "BUILTIN_LOSSES",
    "TargetBatch",
    "check_loss_output",
    "expected_targets",
    "resolve_loss",
    "sample_targets",
    "target_batches",
]


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # torch.nn.CrossEntropyLoss convention: outputs (N, C, d1, ...), targets
    # (N, d1, ...) class indices or (N, C, d1, ...) probabilities.
    losses = F.cross_entropy(outputs, targets, reduction="none")
    if losses.ndim == 1:
        return losses
    if not targets.is_floating_point():
        # Tokens at ignore_index (-100) are left out of their example's mean.
        keep = (targets != -100).to(losses.dtype)
        return (losses * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
    return losses.flatten(1).mean(1)


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.shape != outputs.shape and targets.numel() == outputs.numel():
        targets = targets.reshape(outputs.shape)
    targets = targets.to(outputs.dtype)
    return F.mse_loss(outputs, targets, reduction="none").reshape(outputs.shape[0], -1).mean(1)


BUILTIN_LOSSES = {"cross_entropy": _cross_entropy, "mse": _mse}


def resolve_loss(loss, owner="per_example_gradients") -> Callable:
    """The per-example loss ``(outputs, targets) -> (N,)`` for ``loss``.

    The built-ins are per-example versions of ``torch.nn.CrossEntropyLoss``
    and ``torch.nn.MSELoss`` (MSE averages over output dimensions), so their
    batch mean equals the torch loss.
    """
    V.check_loss(owner, loss)
    if callable(loss):
        return loss
    return BUILTIN_LOSSES[loss]


def sample_targets(outputs: torch.Tensor, loss, owner="sample_targets") -> torch.Tensor:
    """Targets drawn from the model's predictive distribution (``fisher="true"``).

    Cross-entropy: classes drawn from ``softmax(outputs)`` over dim 1.
    MSE: ``outputs + sqrt(D / 2) * N(0, I)`` with ``D`` output dimensions per
    example: the Gaussian whose negative log-likelihood is the per-example MSE
    up to a constant, so that the expected outer product of gradients equals
    the Gauss-Newton matrix of the loss. Uses torch's global generator
    (``torch.manual_seed`` makes it reproducible).
    """
    V.check_fisher_loss(owner, "true", loss)
    outputs = outputs.detach()
    if loss == "cross_entropy":
        probs = torch.softmax(outputs.movedim(1, -1).double(), dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        draws = torch.multinomial(flat, 1).reshape(probs.shape[:-1])
        return draws
    dim = math.prod(outputs.shape[1:])
    return outputs + math.sqrt(dim / 2.0) * torch.randn_like(outputs)


def expected_targets(
    outputs: torch.Tensor, loss, owner="expected_targets"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and weights that enumerate the model's predictive distribution.

    The exact expected Fisher (``fisher="expected"``) of a built-in loss is
    ``sum_k w_k g_k g_k^T`` per example, where ``g_k`` is the gradient of the
    loss at target ``targets[k]``; it equals the Gauss-Newton matrix
    ``J^T H_f J`` (``H_f`` the Hessian of the loss in the outputs).

    * Cross-entropy, outputs ``(N, C)``: ``K = C`` targets, ``targets[c]`` is
      class ``c`` for every example and ``weights[c] = softmax(outputs)[:, c]``
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

    Raises ``ValueError`` for a custom loss and for cross-entropy outputs with
    extra dimensions (sequences), whose exact expectation needs one gradient
    per token and class.
    """
    V.check_fisher_loss(owner, "expected", loss)
    outputs = outputs.detach()
    n = outputs.shape[0]
    if loss == "cross_entropy":
        if outputs.ndim != 2:
            raise ValueError(
                "The 'fisher' parameter 'expected' with loss='cross_entropy' needs model "
                f"outputs of shape (batch, classes). Got {tuple(outputs.shape)}: for sequence "
                "outputs the exact expectation needs one gradient per token and class; use "
                "fisher='true' (sampled targets) or 'empirical'."
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


def check_loss_output(loss_fn, outputs, targets, owner) -> None:
    """The model's outputs are a tensor and the loss gives one value per example.

    Run on the first batch of a pass, so that a reduced loss (a mean instead
    of per-example values) or a model returning something else than a tensor
    is a clear ``ValueError`` instead of a wrong result or an error deep in
    ``torch.func``.
    """
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(
            f"The model given to {V.owner_name(owner)} must return a tensor of outputs for the "
            f"loss. Got {type(outputs).__name__}."
        )
    try:
        losses = loss_fn(outputs.detach(), targets)
    except Exception as exc:  # pragma: no cover - message depends on torch
        raise ValueError(
            f"The 'loss' of {V.owner_name(owner)} failed on model outputs of shape "
            f"{tuple(outputs.shape)} and targets of shape {tuple(targets.shape)}: {exc}"
        ) from exc
    if not isinstance(losses, torch.Tensor) or losses.shape != (outputs.shape[0],):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
        raise ValueError(
            f"The 'loss' of {V.owner_name(owner)} must return per-example losses of shape "
            f"(batch,) = ({outputs.shape[0]},). Got {shape} instead (a reduced loss?)."
        )


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
    outputs : torch.Tensor or None
        The model's outputs from ``call``; None when they were not needed
        (``fisher="empirical"`` after the first batch).
    targets : torch.Tensor
        ``(b, ...)``: the data's targets (``"empirical"``) or one sample
        (``"true"``); ``(K, b, ...)`` for ``"expected"``.
    weights : torch.Tensor or None
        ``(K, b)`` weights of the ``K`` targets (``"expected"``), else None.
    """

    index: int
    offset: int
    inputs: object
    outputs: torch.Tensor | None
    targets: torch.Tensor
    weights: torch.Tensor | None


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
    loss : {"cross_entropy", "mse"} or callable
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
        Re-raise a failure of the first model call as a ``ValueError`` with
        the batch's shapes (:func:`attribkit._compute.model.first_call`);
        False lets it through unchanged.

    The first batch's outputs are checked with :func:`check_loss_output`.
    ``"true"`` samples with torch's global generator
    (:func:`sample_targets`), once per batch and pass.
    """
    V.check_fisher(owner, fisher)
    V.check_fisher_loss(owner, fisher, loss)
    loss_fn = resolve_loss(loss, owner)
    offset = 0
    batches = iter_batches(data, config, device=device, dtype=dtype, desc=desc)
    for index, (inputs, targets) in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        outputs = weights = None
        if always_call or fisher != "empirical" or index == 0:
            if index == 0 and describe_first_failure:
                outputs = first_call(call, inputs, targets, owner)
            else:
                outputs = call(inputs)
            if index == 0:
                check_loss_output(loss_fn, outputs, targets, owner)
        if fisher == "true":
            targets = sample_targets(outputs, loss, owner)
        elif fisher == "expected":
            targets, weights = expected_targets(outputs, loss, owner)
        yield TargetBatch(index, offset, inputs, outputs, targets, weights)
        offset += batch_len(inputs)
