"""Curvature-vector products of the mean loss, streamed over the data.

:class:`MeanLossHVP` is the one Hessian-vector product of attribkit: per
batch, ``torch.func`` differentiates the batch's summed loss twice (``jvp``
of ``grad``, or ``vjp`` of ``grad``) on a ``functional_call`` of the model;
the products of all batches are added in float64 with the example count in
the same tensor, all-reduced over processes once per product
(:mod:`attribkit._compute.distributed`), and divided by the count. Every
batch is checked against the loss (:func:`attribkit._compute.targets.check_batch`,
inside the differentiated function: shapes and the targets' range), and a
failure names the batch and what failed (API section 9), including the one
real models hit: PyTorch's scaled-dot-product attention has neither a
forward-mode nor a double-backward derivative on every device, which calls
for ``attn_implementation="eager"``.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from ..config import ComputeConfig
from . import distributed
from . import validation as V
from .data import EMPTY_DATA_MESSAGE, EmptyDataError, batch_len, iter_batches
from .model import (
    EvalMode,
    autograd_on,
    call_model,
    model_failure,
    param_shapes,
    select_params,
    split_state,
)
from .precision import F64
from .targets import BUILTIN_LOSSES, check_batch, logits_of, resolve_loss
from .vectors import split

__all__ = ["HVP_MODES", "MeanLossHVP", "forward_ad_error"]

#: How a Hessian-vector product is taken: forward-over-reverse or reverse-over-reverse.
HVP_MODES = ("rev-fwd", "rev-rev")


#: What torch says when forward-mode AD cannot run an operator: no forward
#: formula ("Trying to use forward AD with grid_sampler_2d that does not support
#: it"), a custom autograd.Function without ``jvp`` ("You must implement the jvp
#: function ... forward mode AD"), a forward gradient it cannot define
#: ("... cannot have forward grad defined").
_FORWARD_AD = re.compile(r"forward[- ]?(mode )?ad\b|forward grad|\bjvp\b", re.IGNORECASE)


def forward_ad_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is forward-mode AD's own failure.

    Only those may be blamed on ``mode="rev-fwd"`` (and cured by
    ``"rev-rev"``); any other error from the model or the loss is reported
    as what it is. Decided from torch's messages (``RuntimeError`` or
    ``NotImplementedError`` naming forward AD, a forward gradient or a
    ``jvp``), following ``__cause__`` and ``__context__``.

    Examples
    --------
    >>> import torch
    >>> from torch.func import grad, jvp
    >>> from attribkit._compute.curvature import forward_ad_error
    >>> def f(x):  # grid_sample has no forward-mode rule
    ...     grid = torch.zeros(1, 1, 1, 2, dtype=x.dtype)
    ...     out = torch.nn.functional.grid_sample(x.reshape(1, 1, 1, 3), grid, align_corners=True)
    ...     return out.sum() ** 2
    >>> try:
    ...     jvp(grad(f), (torch.ones(3),), (torch.ones(3),))
    ... except Exception as exc:
    ...     error = exc
    >>> forward_ad_error(error), forward_ad_error(RuntimeError("shape mismatch in my layer"))
    (True, False)
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (RuntimeError, NotImplementedError)) and _FORWARD_AD.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class MeanLossHVP:
    """Curvature-vector products ``v -> (H + damping I) v`` of the mean loss over ``data``.

    ``H`` is the Hessian, in the selected parameters, of the mean loss
    ``(1/n) sum_i loss_i`` over all ``n`` examples ``data`` yields. A call
    takes one flat vector ``(p,)`` or a block of ``k`` of them ``(k, p)``
    (products ``(k, p)``, one per row, vectorised over the rows with
    ``torch.func.vmap`` in chunks of at most ``max_rows``). Each call
    streams over ``data`` once, so the data set never has to fit in memory:
    per batch ``b`` it adds the Hessian-vector product of the batch's *summed*
    loss (``|b|`` times its mean, so a ragged last batch weighs exactly what
    its examples weigh) to a float64 sum, with the example count in one more
    entry of the same tensor. That one tensor is all-reduced over processes
    (:func:`attribkit._compute.distributed.reducer`: one collective per call, a no-op
    in one process) and only then divided by the count, so every rank gets
    the product of the union of the shards.

    The model runs through ``torch.func.functional_call`` with detached copies
    of its parameters, in eval mode (mode restored after every pass; the
    parameters' ``requires_grad`` is never touched). Floating-point inputs and
    targets are cast to the parameters' dtype.

    Errors name the batch (API section 9): a batch whose summed loss or
    product is NaN or infinite raises ``ValueError`` with the product's
    number (a NaN loss whose derivatives vanish would otherwise look like a
    zero curvature); an error raised while differentiating a batch is a
    ``ValueError`` quoting it with the batch's index and shapes, unless it is
    forward-mode AD's own (:func:`forward_ad_error`: an operator without a
    forward-mode rule, with ``mode="rev-fwd"``), which is a ``RuntimeError``
    suggesting ``mode="rev-rev"``. Out-of-memory errors pass through.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its parameters and buffers are captured at construction.
    data : DataLoader, Dataset, tuple (inputs, targets) or re-iterable of batches
        Iterated once per call; a one-shot iterator (a generator) is refused.
    loss : {"cross_entropy", "mse"} or callable
        The per-example loss, as everywhere in attribkit.
    params : list of str, optional
        The parameters ``H`` is taken over (default: all trainable).
    mode : {"rev-fwd", "rev-rev"}
        ``"rev-fwd"``: ``torch.func.jvp`` of the reverse-mode gradient
        (forward-over-reverse, the cheaper one); ``"rev-rev"``:
        ``torch.func.vjp`` of the gradient (reverse-over-reverse, for
        operators without forward-mode rules). Both give the same values to
        rounding. With data of a single batch and ``"rev-rev"``, that batch's
        vjp pullback is kept between calls instead of being rebuilt by every
        pass (streamed data never keeps a batch's graph). The path depends only
        on the data and the mode, never on elapsed time or machine load (API
        section 9): ``"rev-fwd"`` rebuilds its jvp in every pass. (An earlier
        version switched to ``torch.func.linearize`` once plain passes had taken
        0.2 s; that made the code path machine-dependent, and the linearised
        product crashed the process for ``loss="mse"``, so it was removed.)
    damping : float
        ``damping * v`` is added to the product (in float64).
    config : ComputeConfig
        ``batch_size`` for tuple/Dataset data and ``distributed``; progress
        bars of the passes are left to the caller.
    owner : str or estimator
        Named in error messages.

    Attributes
    ----------
    param_shapes : OrderedDict
        ``name -> shape`` of the selected parameters (model order).
    n_features : int
        Their total size ``p``.
    dtype, device
        The parameters' dtype and device, where the products are computed.
    n_samples : int or None
        The (all-reduced) example count, known after the first call; a later
        pass that sees another count raises ``ValueError``.
    max_rows : int or None
        At most this many rows of a block go through one vectorised product
        (``None``: all at once); a block of more rows is split into chunks
        within each batch, so a call is still one pass over the data.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data,
        *,
        loss="cross_entropy",
        params=None,
        mode: str = "rev-fwd",
        damping: float = 0.0,
        config: ComputeConfig,
        owner="hvp",
    ):
        V.check_option(owner, "mode", mode, HVP_MODES)
        self.loss, self.loss_fn = loss, resolve_loss(loss, owner)
        if isinstance(data, Iterator):
            raise ValueError(
                f"{V.owner_name(owner)} passes over 'data' once per Hessian-vector product, so "
                f"'data' must be re-iterable. Got a one-shot iterator ({type(data).__name__}); "
                "pass a DataLoader, a Dataset, a tuple (inputs, targets) or a list of batches."
            )
        selected = select_params(model, params, owner)
        self.model, self.data, self.mode, self.owner = model, data, mode, owner
        self.damping = float(damping)
        self.param_shapes = param_shapes(selected)
        self.n_features = sum(p.numel() for p in selected.values())
        self._sel, self._frozen = split_state(model, selected)
        self.device = next(iter(self._sel.values())).device
        self.dtype = next(iter(self._sel.values())).dtype
        # One bar for the caller's iterations, not one per pass over the data.
        self._config = dataclasses.replace(config, progress=False)
        self._reducer = distributed.reducer(config, V.owner_name(owner))
        self.n_samples: int | None = None
        # Data of one batch with rev-rev: that batch's vjp pullback and size, kept
        # between calls, as every pass would rebuild the same one.
        self._kept = None
        self._products = 0  # calls so far: the iteration a failure is reported at
        self.max_rows: int | None = None

    def _batch_gradient(self, inputs, targets, index: int, offset: int) -> Callable:
        """``sel -> (gradient of one batch's summed loss, that loss)`` (``torch.func.grad``).

        The batch is checked against the loss inside (shapes from the
        outputs, the targets' range on the plain targets): ``_BatchProblem``
        carries a failure out of the transforms.
        """
        model, frozen, loss_fn, loss = self.model, self._frozen, self.loss_fn, self.loss
        builtin_ce = loss_fn is BUILTIN_LOSSES["cross_entropy"]
        owner = self.owner

        def batch_loss(sel):
            outputs = call_model(model, inputs, {**frozen, **sel})
            try:
                check_batch(loss, outputs, targets, owner, index=index, offset=offset)
            except ValueError as exc:
                raise _BatchProblem(exc) from exc
            logits = logits_of(outputs) if builtin_ce else None
            if builtin_ce and logits.ndim == 2 and targets.ndim == 1:
                # The same sum of per-example losses; forward-mode AD through
                # reduction="none" is several times slower than through "sum".
                total = F.cross_entropy(logits, targets, reduction="sum")
            else:
                losses = loss_fn(outputs, targets)
                try:
                    check_batch(None, outputs, targets, owner, index=index, offset=offset,
                                losses=losses)  # fmt: skip
                except ValueError as exc:
                    raise _BatchProblem(exc) from exc
                total = losses.sum()
            return total, total.detach()  # the value comes out as aux: checked to be finite

        return grad(batch_loss, has_aux=True)

    def _batch_hvp(self, inputs, targets, tangents: dict, batched: bool, index: int, offset: int):
        """``(H_b v, the batch's summed loss, the vjp pullback or None)`` for one batch.

        ``tangents`` maps each parameter to ``(k, *shape)`` rows when
        ``batched`` (the products are then ``(k, *shape)``), else to
        ``shape``. A curvature subclass (the Gauss-Newton product) overrides
        this method alone.
        """
        gradient = self._batch_gradient(inputs, targets, index, offset)
        if self.mode == "rev-fwd":
            from torch.func import jvp

            def product(t):
                _, hv, value = jvp(gradient, (self._sel,), (t,), has_aux=True)
                return hv, value

            if not batched:
                hv, value = product(tangents)
                return hv, value, None
            hv, values = vmap(product)(tangents)
            return hv, values[0], None
        from torch.func import vjp

        _, pullback, value = vjp(gradient, self._sel, has_aux=True)
        return pull(pullback, tangents, batched), value, pullback

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``(H + damping I) v`` in float64 on ``v``'s device.

        ``v`` is one flat vector ``(p,)`` or a block ``(k, p)`` of them; the
        result has ``v``'s shape. A block costs one pass over the data too.
        """
        return self.product_and_sum(v)[0]

    def product_and_sum(
        self, v: torch.Tensor, extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The product of ``v``, and ``extra`` summed over the ranks in the same all-reduce.

        ``extra`` (any float64 tensor) rides along with the products, so an
        iterative solver can agree on its own state across ranks without a
        second collective per iteration. In one process it comes back as is.
        """
        p = self.n_features
        if v.ndim not in (1, 2) or v.shape[-1] != p:
            raise ValueError(
                f"{V.owner_name(self.owner)}: a Hessian-vector product takes a flat vector of "
                f"shape ({p},) or a block (k, {p}). Got {tuple(v.shape)}."
            )
        self._products += 1
        batched = v.ndim == 2
        rows = v.reshape(-1, p).detach().to(device=self.device, dtype=self.dtype)
        k = rows.shape[0]
        tangents = split(rows, self.param_shapes)
        if not batched:
            tangents = OrderedDict((n, t[0]) for n, t in tangents.items())
        # The weighted sums, the extra values, the count and a failure flag
        # travel in one tensor: one all-reduce. Distributed, an empty shard on
        # one rank is fine (an empty union is not), and a rank that fails makes
        # every rank raise instead of leaving the others waiting in the all-reduce.
        size = 0 if extra is None else extra.numel()
        total = torch.zeros(k * p + size + 2, dtype=F64, device=self.device)
        if extra is not None:
            total[k * p : k * p + size] = extra.reshape(-1)
        red, error = self._reducer, None
        try:
            with autograd_on():  # also inside torch.inference_mode() / no_grad()
                self._pass(total, tangents, k if batched else 0)
        except EmptyDataError:
            if not red.active:
                raise
        except Exception as exc:
            if not red.active:
                raise
            error, total[-1] = exc, 1.0
        red.sum_(total)
        if error is not None:
            raise error
        if float(total[-1]) > 0:
            raise RuntimeError(
                f"{V.owner_name(self.owner)}: a Hessian-vector product failed on "
                f"{round(float(total[-1]))} other rank(s) of the process group (see their "
                f"error), so it stops on every rank (this is rank {red.rank})."
            )
        count = round(float(total[-2]))
        if count == 0:
            raise EmptyDataError(f"{EMPTY_DATA_MESSAGE} It was empty on every rank.")
        if self.n_samples is None:
            self.n_samples = count
        elif count != self.n_samples:
            raise ValueError(
                f"{V.owner_name(self.owner)}: 'data' yielded {count} examples in one pass and "
                f"{self.n_samples} in the first; every pass must see the same data."
            )
        out = total[: k * p].div_(count).reshape(v.shape)
        if self.damping:
            out.add_(v.detach().to(device=self.device, dtype=F64), alpha=self.damping)
        if extra is not None:
            extra = total[k * p : k * p + size].reshape(extra.shape).to(extra.device)
        return out.to(v.device), extra

    def _pass(self, total: torch.Tensor, tangents: dict, k: int) -> None:
        """Add this rank's ``sum_b H_b v`` to ``total[:k p]`` and its count to ``total[-2]``.

        ``k`` is the number of rows of a block (0 for a single vector).
        """
        if self._kept is not None:
            pullback, size = self._kept
            for lo, chunk in self._chunks(tangents, k):
                self._add(total, pull(pullback, chunk, k > 0), lo, k)
            total[-2] += size
            return
        batches = iter_batches(
            self.data, self._config, device=self.device, dtype=self.dtype, loss=self.loss
        )
        seen, pullback, offset = 0, None, 0
        with EvalMode(self.model, self.owner):
            for index, (inputs, targets) in enumerate(batches):
                pullback = None  # a second batch's HVP never holds the first one's graph
                for lo, chunk in self._chunks(tangents, k):
                    try:
                        hv, value, pullback = self._batch_hvp(
                            inputs, targets, chunk, k > 0, index, offset
                        )
                    except _BatchProblem as problem:
                        raise problem.error from None
                    except (MemoryError, torch.OutOfMemoryError):
                        raise
                    except Exception as exc:
                        raise self._failure(exc, index, inputs, targets) from exc
                    self._check_finite(value, hv, index)
                    self._add(total, hv, lo, k)
                total[-2] += batch_len(inputs)
                offset += batch_len(inputs)
                seen += 1
        if seen == 1 and pullback is not None:
            self._kept = (pullback, float(total[-2]))

    def _chunks(self, tangents: dict, k: int):
        """``(first row, tangents)`` chunks of at most ``max_rows`` rows (one if ``k == 0``)."""
        step = k if not self.max_rows else min(k, int(self.max_rows))
        if k == 0 or step >= k:
            yield 0, tangents
            return
        for lo in range(0, k, step):
            yield lo, OrderedDict((n, t[lo : lo + step]) for n, t in tangents.items())

    def _failure(self, exc: Exception, index: int, inputs, targets) -> Exception:
        """The error for a Hessian-vector product that failed on batch ``index``: what failed.

        * PyTorch's scaled-dot-product attention (SDPA) has no forward-mode
          derivative and, on some devices, no double-backward: a
          ``ValueError`` saying to load the model with
          ``attn_implementation="eager"`` (mode ``"rev-rev"`` does not help);
        * another operator without a forward-mode rule under ``"rev-fwd"``: a
          ``RuntimeError`` suggesting ``mode="rev-rev"``;
        * anything else is the model's (or the loss's) own error: a
          ``ValueError`` naming the batch (API section 9).
        """
        who, text = V.owner_name(self.owner), f"{type(exc).__name__}: {exc}"
        if "scaled_dot_product" in text or "_efficient_attention" in text:
            return ValueError(
                f"{who}: {self._product_name()} failed on batch {index} of 'data' "
                "in the model's scaled-dot-product attention (SDPA), whose kernels have no "
                "forward-mode derivative and, on some devices, no second derivative "
                f"({text}). Use eager attention: load the model with "
                'from_pretrained(name, attn_implementation="eager"), build it from a config '
                'made with attn_implementation="eager", or switch a loaded one with '
                'model.set_attn_implementation("eager") (same weights, same outputs)'
                f"{self._SDPA_NOTE}"
            )
        if self.mode == "rev-fwd" and forward_ad_error(exc):
            return RuntimeError(
                f"{who}: the forward-over-reverse Hessian-vector product (mode='rev-fwd') "
                f"failed on batch {index} of 'data' at Hessian-vector product "
                f"{self._products} with {text}\nAn operator of the model or loss has no "
                "forward-mode rule; use mode='rev-rev'."
            )
        return model_failure(exc, index, inputs, targets, self.owner)

    #: The end of the SDPA error: what else does not help.
    _SDPA_NOTE = "; mode='rev-rev' does not help with SDPA."

    def _product_name(self) -> str:
        """What this class computes, for error messages."""
        return f"the Hessian-vector product (mode={self.mode!r})"

    def _check_finite(self, value: torch.Tensor, hv: dict, index: int) -> None:
        """Refuse a non-finite loss or product: its Hessian is meaningless, not zero."""
        finite = torch.isfinite(value).all()
        for t in hv.values():
            finite = finite & torch.isfinite(t).all()
        if not bool(finite):  # one synchronisation per batch; the diagnosis only on failure
            if not bool(torch.isfinite(value).all()):
                bad = f"the loss is {float(value)}"
            else:
                bad = "the Hessian-vector product is not finite (NaN or infinity)"
            raise ValueError(
                f"{V.owner_name(self.owner)}: on batch {index} of 'data', {bad} at "
                f"Hessian-vector product {self._products} of this fit (one per iteration): "
                "the model's outputs, the loss or the data contain NaN or overflow. The "
                "curvature of a non-finite loss is undefined; check the inputs and the loss."
            )

    def _add(self, total: torch.Tensor, hv: dict, lo: int = 0, k: int = 0) -> None:
        """``total[:p] += flat(hv)`` in float64 (rows ``lo:`` of the ``(k, p)`` block)."""
        p = self.n_features
        rows = next(iter(hv.values())).shape[0] if k else 1
        out = total[lo * p : (lo + rows) * p].view(rows, p)
        offset = 0
        for name in self.param_shapes:
            block = hv[name].reshape(rows, -1)
            out[:, offset : offset + block.shape[1]] += block.to(F64)
            offset += block.shape[1]


def pull(pullback, cotangents: dict, batched: bool) -> dict:
    """A vjp ``pullback`` applied to one cotangent, or vectorised over a block of rows."""
    if batched:
        return vmap(pullback)(cotangents)[0]
    return pullback(cotangents)[0]


class _BatchProblem(Exception):
    """A batch failed its check inside ``torch.func``: carries the ``ValueError`` out."""

    def __init__(self, error: ValueError):
        super().__init__(str(error))
        self.error = error
