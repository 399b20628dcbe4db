"""Exact Gauss-Newton-vector products, streamed over the data, and their array-mode twin.

``MeanLossGGN`` computes ``v -> G v`` for the Gauss-Newton matrix of the mean
loss over ``data``,

    ``G = (1/n) sum_i J_i^T H_i J_i``,

``J_i`` the Jacobian of example ``i``'s model outputs in the selected
parameters and ``H_i`` the Hessian of its loss in those outputs, without ever
forming ``G``, a Jacobian or a per-class gradient. Per batch and block of
``k`` vectors ``V`` (rows):

1. ``U = J V``: ``torch.func.jvp`` of the model's forward pass (forward-mode
   AD), vectorised over the ``k`` rows with ``torch.func.vmap``;
2. ``W = H U`` in output space (:func:`output_hessian_product`): closed form
   for the built-in losses, ``diag(p) - p p^T`` per example for
   cross-entropy on ``(N, C)`` logits and ``(2 / D) I`` for MSE over ``D``
   output entries; for any other loss (a callable, or cross-entropy on
   sequence outputs) the Hessian-vector product of the loss in the outputs,
   ``torch.func.jvp`` of its output gradient, so custom losses get their
   exact Gauss-Newton matrix too;
3. ``J^T W``: one ``torch.func.vjp`` pullback of the batch's forward pass,
   vectorised over the rows.

The batch sums are accumulated in float64 with the example count, all-reduced
once per call and divided by the count: the streaming, distribution and error
propagation are :class:`attribkit._compute.curvature.MeanLossHVP`'s, of which this is
a subclass that replaces the per-batch product only. For the built-in losses
``G`` is the expected Fisher (``fisher="expected"`` of ExplicitIFVP and
EKFACIFVP): ``sum_c p_c g_c g_c^T = J^T (diag(p) - p p^T) J``.

``GramProduct`` is the array-mode curvature ``G^T G / n`` of a gradient
matrix, applied as two float64 GEMMs (never the ``p x p`` matrix).
"""

from __future__ import annotations

import torch
from torch.func import grad, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..config import ComputeConfig
from . import validation as V
from .curvature import MeanLossHVP, _BatchProblem, forward_ad_error, pull
from .model import call_model
from .precision import F64 as _F64
from .targets import _builtin_name, check_batch, logits_of, resolve_loss

__all__ = ["GramProduct", "MeanLossGGN", "output_hessian_product"]


def _detach(outputs):
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, outputs)


def _differentiable(outputs):
    """A model output's floating-point tensors (a tuple) and the function that rebuilds it.

    What ``torch.func`` differentiates for a callable loss: a Hugging Face
    ``ModelOutput`` also holds objects that are not tensors (GPT-2's
    ``past_key_values`` cache), which ``vjp`` and ``jvp`` refuse. The rebuilt
    output puts given tensors in the floating-point leaves and keeps every
    other leaf as it came from the model.
    """
    leaves, spec = tree_flatten(outputs)
    where = [
        i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()
    ]

    def rebuild(tensors):
        full = list(leaves)
        for i, t in zip(where, tensors):
            full[i] = t
        return tree_unflatten(full, spec)

    return tuple(leaves[i] for i in where), rebuild


def output_hessian_product(loss, outputs, targets, U, batched: bool, rebuild=None):
    """``H U``: the Hessian of the summed per-example losses in the outputs, times ``U``.

    Parameters
    ----------
    loss : {"cross_entropy", "mse"} or callable
        The loss as the user gave it (a string selects a closed form where
        one applies).
    outputs : torch.Tensor or pytree of tensors
        The model's outputs for a batch (detached).
    targets : torch.Tensor
        The batch's targets.
    U : torch.Tensor or pytree
        Output-space directions shaped like ``outputs``, with a leading
        dimension of ``k`` rows when ``batched``.
    batched : bool
        Whether ``U`` holds ``k`` rows.
    rebuild : callable, optional
        For a callable loss: maps ``outputs`` (then a tuple of the model
        output's floating-point tensors) to the structure the loss reads.

    Returns
    -------
    torch.Tensor or pytree
        Shaped like ``U``. Examples do not interact: the Hessian of a sum of
        per-example losses is block diagonal, one ``H_i`` per example.

    Notes
    -----
    Closed forms, for tensor outputs: cross-entropy on ``(N, C)`` logits with
    class-index targets, ``H_i u = p * u - p (p . u)`` with
    ``p = softmax(outputs_i)`` (zero for a target of ``-100``, which
    ``torch.nn.functional.cross_entropy`` ignores); MSE (attribkit's averages
    over the ``D`` output entries of an example), ``H_i = (2 / D) I``. Every
    other case (a callable loss, cross-entropy on sequence outputs or with
    probability targets) differentiates the loss itself: ``jvp`` of
    ``grad`` of the summed loss in the outputs, vectorised over the rows.

    Examples
    --------
    >>> import torch
    >>> logits = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    >>> u = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    >>> output_hessian_product("cross_entropy", logits, torch.tensor([1]), u, False)
    tensor([[ 0.2500, -0.2500]], dtype=torch.float64)
    >>> generic = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")
    >>> output_hessian_product(generic, logits, torch.tensor([1]), u, False)
    tensor([[ 0.2500, -0.2500]], dtype=torch.float64)
    """
    if isinstance(outputs, torch.Tensor):
        if (
            loss == "cross_entropy"
            and outputs.ndim == 2
            and not targets.is_floating_point()
            and targets.ndim == 1
        ):
            p = torch.softmax(outputs, dim=1)
            HU = p * U - p * (p * U).sum(-1, keepdim=True)
            keep = (targets != -100).to(HU.dtype).unsqueeze(-1)
            return HU * keep
        if loss == "mse":
            entries = outputs[0].numel() if outputs.shape[0] else 1
            return U * (2.0 / entries)
    loss_fn = resolve_loss(loss)

    def summed(out):
        return loss_fn(out if rebuild is None else rebuild(out), targets).sum()

    gradient = grad(summed)

    def product(u):
        return jvp(gradient, (outputs,), (u,))[1]

    return vmap(product)(U) if batched else product(U)


class MeanLossGGN(MeanLossHVP):
    """Gauss-Newton-vector products ``v -> G v`` of the mean loss over ``data``.

    ``G = (1/n) sum_i J_i^T H_i J_i`` in the selected parameters (see the
    module docstring for how). Calls, blocks of vectors, streaming, float64
    accumulation, the one all-reduce per call under ``torch.distributed`` and
    the checks of the data are :class:`~attribkit._compute.curvature.MeanLossHVP`'s.
    Per batch and block of ``k`` rows it costs a forward pass with its vjp
    graph, a forward-mode pass vectorised over the rows and a backward pass
    vectorised over the rows.

    Parameters
    ----------
    model : torch.nn.Module
    data : DataLoader, Dataset, tuple (inputs, targets) or re-iterable of batches
    loss : {"cross_entropy", "mse"} or callable
        The per-example loss; the built-ins use the closed-form ``H_i``.
    params : list of str, optional
        The parameters ``G`` is taken over (default: all trainable).
    config : ComputeConfig
    owner : str or estimator
        Named in error messages.

    Examples
    --------
    >>> import torch, attribkit as ak
    >>> model = torch.nn.Linear(3, 2).double()
    >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    >>> ggn = MeanLossGGN(model, (X, y), config=ak.ComputeConfig(dtype="float64"))
    >>> V = torch.randn(4, 8, dtype=torch.float64)
    >>> cfg = ak.ComputeConfig(dtype="float64")
    >>> fisher = ak.ExplicitIFVP(damping=1.0, fisher="expected", config=cfg).fit(model, (X, y))
    >>> F = fisher.inverse_transform(V) - V  # V (F + I) - V
    >>> bool(torch.allclose(ggn(V), F, rtol=1e-10, atol=1e-12))
    True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data,
        *,
        loss="cross_entropy",
        params=None,
        config: ComputeConfig,
        owner="ggn",
    ):
        super().__init__(
            model, data, loss=loss, params=params, mode="rev-fwd", config=config, owner=owner
        )
        self.loss = loss

    def _batch_hvp(self, inputs, targets, tangents: dict, batched: bool, index: int, offset: int):
        model, frozen, loss, owner = self.model, self._frozen, self.loss, self.owner
        # Built-in losses read the logits (API section 7): differentiate those,
        # so a Hugging Face ModelOutput never goes through the transforms. A
        # callable gets the whole output back, its floating-point tensors
        # differentiated (``_differentiable``).
        builtin = _builtin_name(loss) is not None
        structure = {}

        def forward(sel):
            outputs = call_model(model, inputs, {**frozen, **sel})
            if builtin:
                return logits_of(outputs)
            tensors, structure["rebuild"] = _differentiable(outputs)
            if not tensors:
                raise _BatchProblem(
                    ValueError(
                        f"{V.owner_name(owner)}: the Gauss-Newton product with a callable "
                        "loss differentiates the floating-point tensors of the model's output, "
                        f"and the output of batch {index} (a {type(outputs).__name__}) holds "
                        "none that torch.utils._pytree can reach. Return a tensor, a tuple or "
                        "dict of tensors (or register the output class as a pytree node), or "
                        "use a built-in loss."
                    )
                )
            return tensors

        outputs, pullback = vjp(forward, self._sel)
        outputs = _detach(outputs)
        rebuild = structure.get("rebuild")
        seen = outputs if rebuild is None else rebuild(outputs)
        try:
            check_batch(loss, seen, targets, owner, index=index, offset=offset)
            losses = self.loss_fn(seen, targets)
            check_batch(None, seen, targets, owner, index=index, offset=offset, losses=losses)
        except ValueError as exc:
            raise _BatchProblem(exc) from exc

        def jacobian_product(t):
            return jvp(forward, (self._sel,), (t,))[1]

        U = vmap(jacobian_product)(tangents) if batched else jacobian_product(tangents)
        W = output_hessian_product(loss, outputs, targets, U, batched, rebuild)
        return pull(pullback, W, batched), losses.sum(), None

    _SDPA_NOTE = "."

    def _product_name(self) -> str:
        return "the Gauss-Newton product (Jacobian-vector products by forward-mode AD)"

    def _failure(self, exc: Exception, index: int, inputs, targets) -> Exception:
        if forward_ad_error(exc) and "scaled_dot_product" not in str(exc):
            return RuntimeError(
                f"{V.owner_name(self.owner)}: the Gauss-Newton product (Jacobian-vector "
                f"products of the model by forward-mode AD, torch.func.jvp) failed on batch "
                f"{index} of 'data' with {type(exc).__name__}: {exc}\nSome operators have no "
                "forward-mode rule; for such a model use curvature='hessian' (with a damping "
                "that makes it positive definite)."
            )
        return super()._failure(exc, index, inputs, targets)


class GramProduct:
    """``V -> V G^T G / n`` for an ``(n, p)`` gradient matrix, as two float64 GEMMs.

    ``(V G^T) G / n`` costs ``4 k n p`` flops for ``k`` rows and never forms
    the ``p x p`` matrix; rows of ``V`` go through in chunks that keep the
    ``(rows, n)`` intermediate within ``memory_budget`` bytes.

    Parameters
    ----------
    G : torch.Tensor of shape (n, p)
        float64 gradients (kept by reference).
    memory_budget : int
        Bytes for the intermediate.

    Attributes
    ----------
    n_samples, n_features : int

    Examples
    --------
    >>> import torch
    >>> G = torch.randn(5, 3, dtype=torch.float64)
    >>> V = torch.randn(2, 3, dtype=torch.float64)
    >>> bool(torch.allclose(GramProduct(G, 2**20)(V), V @ (G.T @ G) / 5))
    True
    """

    def __init__(self, G: torch.Tensor, memory_budget: int):
        self.G = G
        self.n_samples, self.n_features = int(G.shape[0]), int(G.shape[1])
        self.max_rows = max(1, int(memory_budget) // (8 * max(1, self.n_samples)))

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        G = self.G
        rows = V.reshape(-1, self.n_features).to(device=G.device, dtype=_F64)
        out = torch.empty_like(rows)
        for lo in range(0, rows.shape[0], self.max_rows):
            out[lo : lo + self.max_rows] = (rows[lo : lo + self.max_rows] @ G.T) @ G
        return out.div_(self.n_samples).reshape(V.shape).to(V.device)
