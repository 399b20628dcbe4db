"""The public per-example gradients: orchestration above the estimators.

The data flow of :func:`per_example_gradients`:

1. the config (the projector's when none is given) and the model are checked;
   a distributed rank whose shard is empty gets its ``0`` rows at once;
2. without ``projector`` and ``out`` the per-example gradients of
   :func:`attribkit._compute.gradients.iter_gradients` (layer hooks, with
   ``torch.func`` for the parameters no hook rule covers; batch by batch)
   are gathered: one ``(n, p)`` tensor, or a dict (allocated once when the
   example count is known, each batch written into its rows);
3. otherwise a source of ``(b, k)`` rows is chosen: the flat gradients
   themselves (``k = p``); an attribkit estimator's
   :meth:`~attribkit.BaseEstimator.project_gradients` (the estimator says
   how it consumes gradients: through ``transform`` by default, from layer
   hooks without forming them for KroneckerProjector); or, for a plain
   scikit-learn transformer, its numpy ``transform`` of each batch;
4. the rows are written batch by batch into ``out`` (checked before any
   work; a memmap is flushed) or collected into one tensor, in
   ``config.dtype`` on ``config.device``.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import numpy as np
import torch

from ._compute import validation as V
from ._compute.data import known_length
from ._compute.distributed import reducer
from ._compute.gradients import iter_gradients, layout_params
from ._compute.guard import use_model
from ._compute.model import autograd_on, select_params
from ._compute.vectors import flatten_dict
from .base import BaseEstimator
from .config import ComputeConfig

__all__ = ["per_example_gradients"]


_NUMPY_DTYPES = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


class _Rows:
    """The ``(n, k)`` result: filled batch by batch into ``out``, or collected."""

    def __init__(self, out, n: int | None, k: int, config: ComputeConfig):
        self.out, self.n, self.k, self.filled = out, n, k, 0
        self.dtype, self.device = config.torch_dtype, config.torch_device
        self.chunks: list[torch.Tensor] = []
        if out is not None:
            self._check()

    def _check(self) -> None:
        out, name = self.out, "The 'out' argument of per_example_gradients"
        if isinstance(out, np.ndarray):
            want = _NUMPY_DTYPES.get(self.dtype)
            if want is None:
                raise ValueError(
                    f"{name} cannot be a numpy array under config.dtype={self.dtype}: numpy "
                    "has no such dtype. Pass a torch tensor or use another config.dtype."
                )
            if out.dtype != want:
                raise ValueError(
                    f"{name} must have dtype {np.dtype(want).name} (config.dtype). Got "
                    f"{out.dtype.name} instead; pass config=ComputeConfig(dtype=...) to match."
                )
            if not out.flags.writeable:
                raise ValueError(f"{name} must be writeable (a memmap opened with mode 'r'?).")
        elif isinstance(out, torch.Tensor):
            if out.dtype != self.dtype:
                raise ValueError(
                    f"{name} must have dtype {self.dtype} (config.dtype). Got {out.dtype} "
                    "instead; pass config=ComputeConfig(dtype=...) to match."
                )
            if out.requires_grad:
                raise ValueError(f"{name} must not require grad.")
        else:
            raise TypeError(
                f"{name} must be a numpy array (np.memmap included) or a torch tensor. "
                f"Got {type(out).__name__} instead."
            )
        shape = tuple(out.shape)
        expected = f"({'n' if self.n is None else self.n}, {self.k})"
        if len(shape) != 2 or shape[1] != self.k or (self.n is not None and shape[0] != self.n):
            raise ValueError(f"{name} must have shape {expected}. Got {shape} instead.")

    def add(self, rows: torch.Tensor) -> None:
        b = rows.shape[0]
        if self.out is None:
            self.chunks.append(rows.to(device=self.device, dtype=self.dtype))
        else:
            stop = self.filled + b
            if stop > self.out.shape[0]:
                raise ValueError(
                    f"The 'out' argument of per_example_gradients has {self.out.shape[0]} rows "
                    f"but 'data' yields more examples (at least {stop})."
                )
            rows = rows.detach().to(dtype=self.dtype)
            if isinstance(self.out, np.ndarray):
                self.out[self.filled : stop] = rows.cpu().numpy()
            else:
                self.out[self.filled : stop].copy_(rows)
        self.filled += b

    def result(self):
        if self.out is None:
            return torch.cat(self.chunks)
        if self.filled != self.out.shape[0]:
            raise ValueError(
                f"The 'out' argument of per_example_gradients has {self.out.shape[0]} rows "
                f"but 'data' yielded {self.filled} examples (rows {self.filled}: are unset)."
            )
        if isinstance(self.out, np.memmap):
            self.out.flush()
        return self.out


def per_example_gradients(
    model: torch.nn.Module,
    data,
    loss="cross_entropy",
    params=None,
    config: ComputeConfig | None = None,
    flatten: bool = True,
    projector=None,
    out=None,
):
    """Per-example gradients of the loss with respect to the model's parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The model, raw: a Hugging Face model, a peft model, a CNN...;
        evaluated in eval mode (mode restored afterwards), never changed.
    data : DataLoader, Dataset, tuple (inputs, targets), mapping or iterable of batches
        The examples, streamed in ``config.batch_size`` batches when given as
        a tuple, a Dataset or one mapping of stacked tensors (a tokenizer's
        output). A batch is a pair ``(inputs, targets)`` or a mapping (a
        Hugging Face batch): the model is called with its keys as keyword
        arguments and the targets are ``batch["labels"]`` (with
        ``loss="causal_lm"`` and no ``"labels"``: ``batch["input_ids"]``, the
        positions whose ``attention_mask`` is 0 ignored). Padded positions
        contribute nothing.
    loss : "cross_entropy", "mse", "causal_lm" or callable, default="cross_entropy"
        Per-example loss. The built-ins read ``outputs.logits`` (or the first
        element of a tuple output); ``"cross_entropy"`` on ``(N, T, C)``
        logits with ``(N, T)`` targets sums the tokens' losses (``-100``
        ignored) and ``"causal_lm"`` does so on next-token pairs. A callable
        takes the raw ``(outputs, targets)`` and returns losses of shape
        ``(batch,)``.
    params : list of str, optional
        Names of the parameters to differentiate (default: all trainable, or
        the parameters a model-fitted ``projector`` was fitted on).
    config : ComputeConfig, optional
        ``dtype`` and ``device`` of the result; ``batch_size``; ``progress``.
        Default: the projector's config when ``projector`` is an attribkit
        estimator, else ``ComputeConfig()``.
    flatten : bool, default=True
        Return one ``(n, p)`` tensor (parameters flattened and concatenated
        in model order) instead of a dict ``name -> (n, *shape)``. Must be
        True with ``projector`` or ``out``.
    projector : fitted transformer, optional
        Each batch of gradients is projected before it is kept, so memory is
        one batch of gradients plus the ``(n, k)`` result. A
        :class:`~attribkit.RandomProjector` or other transformer fitted on
        the model differentiates the parameters it was fitted on; one fitted
        on arrays (or any fitted scikit-learn transformer) takes the flat
        gradients of ``params``, which must have its ``n_features_in_``
        entries. An attribkit estimator consumes the gradients through its
        :meth:`~attribkit.BaseEstimator.project_gradients`; a
        :class:`~attribkit.KroneckerProjector` never forms per-example
        gradients there: hooks capture each covered layer's inputs and
        output gradients and only their projections are multiplied.
    out : ndarray, np.memmap or torch.Tensor of shape (n, k), optional
        Preallocated result (``k = p`` without a projector) in
        ``config.dtype``, filled batch by batch and returned: for results
        larger than memory, e.g. ``np.lib.format.open_memmap(path, mode="w+",
        dtype="float32", shape=(n, k))``. Its type, ``ndim``, ``k``, dtype and
        (when ``data`` has a length: a tuple, a Dataset, a DataLoader with a
        sized sampler) ``n`` are checked before any work. For data of unknown
        length, a batch that would overflow ``out`` raises at once and too few
        examples raise at the end (the rows written stay written). A memmap
        is flushed before it is returned.

    Returns
    -------
    torch.Tensor, dict, or ``out``
        ``(n, p)`` tensor, a dict of ``(n, *shape)`` tensors, ``(n, k)``
        projections, or ``out`` itself, filled.

    Notes
    -----
    **How.** One ordinary forward and one backward per batch: hooks on the
    modules of known types (``nn.Linear``, Hugging Face's ``Conv1D``,
    ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, the norms, eval-mode
    BatchNorm) keep their inputs, the sum of the per-example losses is
    differentiated at their outputs, and each example's gradient follows
    from its own rows; a tied weight sums its uses. So padded attention
    masks and data-dependent model code work. Parameters no rule covers (a
    raw ``nn.Parameter``, ``nn.MultiheadAttention``'s projections, a
    weight also used outside its module) are differentiated by ``vmap``
    over a ``functional_call``, or, where ``vmap`` cannot run the model, by
    one autograd call per example. The result equals one autograd call per
    example to rounding; nothing is written to ``.grad``. Examples must not
    interact in the forward (as for any per-example gradient).

    **inference_mode.** It works inside ``torch.inference_mode()`` or
    ``torch.no_grad()`` (the pass turns gradients back on; inference tensors
    in the data are cloned); a model whose parameters were themselves made
    under ``inference_mode`` raises ``ValueError`` saying how to copy it.

    **Threads.** The model is held for the calling thread while this runs: a
    call from another thread on the same model (or on one sharing a
    submodule), or a ``fit`` on it, raises ``RuntimeError`` instead of
    corrupting both (the model is switched to eval mode and, for some
    projectors, hooked meanwhile). Use one ``copy.deepcopy(model)`` per thread.

    **Distributed.** This function never communicates. Under
    ``torch.distributed`` each rank passes its own shard of the data and
    computes (or writes into ``out``) its own rows only; with
    ``config.distributed`` on (the default ``"auto"``) a rank whose shard is
    empty and of known length (a tuple of tensors, a Dataset, a DataLoader,
    an empty list of batches) gets ``0`` rows instead of the empty-data
    error. To fill one file from every rank, give each rank its row slice of
    a shared memmap (a slice of an ``np.memmap`` is one)::

        import numpy as np, torch.distributed as dist
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = [None] * world
        dist.all_gather_object(sizes, len(shard))      # examples per rank
        start, n = sum(sizes[:rank]), sum(sizes)
        if rank == 0:                                  # one (n, k) file for all
            np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(n, k))
        dist.barrier()
        big = np.load(path, mmap_mode="r+")
        ak.per_example_gradients(model, shard, projector=proj,
                                 out=big[start : start + sizes[rank]])
        dist.barrier()                                 # now every row is written

    or gather the rows in memory (ranks may hold different numbers of rows,
    so pad to the largest)::

        G = ak.per_example_gradients(model, shard, projector=proj)
        rows = max(sizes)
        padded = G.new_zeros(rows, G.shape[1]); padded[: len(G)] = G
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        G_all = torch.cat([p[:m] for p, m in zip(parts, sizes)])  # rank order

    Examples
    --------
    >>> import torch, attribkit as ak
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> ak.per_example_gradients(model, (X, y)).shape
    torch.Size([5, 8])
    >>> proj = ak.RandomProjector(proj_dim=4).fit(model)
    >>> ak.per_example_gradients(model, (X, y), projector=proj).shape
    torch.Size([5, 4])
    """
    if config is None and projector is not None:
        config = getattr(projector, "_config", None)
    config = V.check_config("per_example_gradients", config)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "The 'model' argument of per_example_gradients must be a torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    # Held from the first look at the model: another thread's functional_call
    # swaps its parameters for detached copies while it runs.
    # autograd_on: differentiate even when called inside torch.inference_mode().
    with use_model(model, "per_example_gradients"), autograd_on():
        return _per_example_gradients(model, data, loss, params, config, flatten, projector, out)


def _per_example_gradients(model, data, loss, params, config, flatten, projector, out):
    device, dtype = config.torch_device, config.torch_dtype
    empty = known_length(data) == 0 or (isinstance(data, (list, tuple)) and len(data) == 0)
    if empty and reducer(config, "per_example_gradients").active:  # an empty shard: 0 rows
        return _no_rows(model, data, loss, params, config, flatten, projector, out)
    if projector is None and out is None:
        n, gathered = known_length(data), None
        batches = iter_gradients(model, data, loss=loss, params=params, config=config)
        with contextlib.closing(batches):
            for grads in batches:
                if gathered is None:
                    keys = ["flat"] if flatten else list(grads)
                    gathered = {k: _Gather(n, device, dtype) for k in keys}
                if flatten:
                    gathered["flat"].add([g.reshape(g.shape[0], -1) for g in grads.values()])
                else:
                    for k, g in grads.items():
                        gathered[k].add([g])
        if flatten:
            return gathered["flat"].result()
        return OrderedDict((k, v.result()) for k, v in gathered.items())
    _require_flat(flatten)
    batches, k = _row_source(model, data, loss, params, config, projector)
    rows = _Rows(out, known_length(data), k, config)
    # Closed on any error here: a suspended generator kept alive by the
    # traceback would hold the model (hooked, in eval mode) until then.
    closing = contextlib.closing if hasattr(batches, "close") else contextlib.nullcontext
    with closing(batches):
        for projected in batches:
            rows.add(projected)
    return rows.result()


class _Gather:
    """The ``(n, ...)`` result of per-example rows, gathered batch by batch.

    With the example count known the result is allocated once and each
    batch's parts are concatenated straight into its rows (peak memory: the
    result and one batch); otherwise the batches are kept and concatenated
    once at the end (also the rest, when ``data`` yields more than announced).
    """

    def __init__(self, n: int | None, device, dtype):
        self.n, self.device, self.dtype = n, device, dtype
        self.buffer, self.filled, self.chunks = None, 0, []

    def add(self, parts: list) -> None:
        """One batch: ``parts`` are ``(b, ...)`` tensors concatenated along dimension 1."""
        b = parts[0].shape[0]
        width = sum(p.shape[1] for p in parts) if len(parts) > 1 else None
        shape = (b, width) if width is not None else tuple(parts[0].shape)
        if self.buffer is None and self.n is not None and not self.chunks:
            self.buffer = torch.empty((self.n, *shape[1:]), device=self.device, dtype=self.dtype)
        if self.buffer is not None and self.filled + b <= self.buffer.shape[0]:
            rows = self.buffer[self.filled : self.filled + b]
            if len(parts) == 1:
                rows.copy_(parts[0])
            elif all(p.dtype == self.dtype and p.device == rows.device for p in parts):
                torch.cat(parts, dim=1, out=rows)
            else:
                rows.copy_(torch.cat(parts, dim=1))
            self.filled += b
            return
        if self.buffer is not None:  # more examples than announced: gather the rest
            self.chunks.append(self.buffer[: self.filled])
            self.buffer = None
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        self.chunks.append(joined.to(device=self.device, dtype=self.dtype))

    def result(self) -> torch.Tensor:
        if self.buffer is not None:
            return self.buffer[: self.filled] if self.filled < self.n else self.buffer
        return self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks)


def _row_source(model, data, loss, params, config, projector):
    """``(iterator of (b, k) rows, k)``: gradients, or their projections by ``projector``.

    Validates everything (parameters, the projector's fit and layout) before
    returning; the rows are computed as the iterator is consumed.
    """
    if projector is None:
        selected = select_params(model, params, "per_example_gradients")
        batches = (
            flatten_dict(grads, grads)
            for grads in iter_gradients(model, data, loss=loss, params=params, config=config)
        )
        return batches, sum(q.numel() for q in selected.values())
    if isinstance(projector, BaseEstimator):
        return projector.project_gradients(model, data, loss=loss, params=params, config=config)
    # Any other fitted transformer (scikit-learn's): numpy in, numpy out.
    names, p = layout_params(model, projector, params)
    k = _n_outputs(projector, p)

    def batches():
        for grads in iter_gradients(model, data, loss=loss, params=names, config=config):
            flat = flatten_dict(grads, names or grads).cpu().numpy()
            yield torch.as_tensor(np.asarray(projector.transform(flat)))

    return batches(), k


def _n_outputs(projector, n_features: int) -> int:
    """Width ``k`` of a transformer's output, preferably without running it."""
    k = getattr(projector, "_n_features_out", None)  # scikit-learn's projectors have it
    if k is None:  # any other transformer: one zero row tells
        probe = projector.transform(np.zeros((1, n_features)))
        k = np.asarray(probe).shape[1]
    return int(k)


def _require_flat(flatten: bool) -> None:
    if not flatten:
        raise ValueError(
            "The 'flatten' argument of per_example_gradients must be True when 'projector' or "
            "'out' is given (the result is one (n, k) array). Got False."
        )


def _no_rows(model, data, loss, params, config, flatten, projector, out):
    """The result for a rank whose shard is empty (``per_example_gradients``)."""
    device, dtype = config.torch_device, config.torch_dtype
    if projector is None and out is None:
        selected = select_params(model, params, "per_example_gradients")
        result = OrderedDict(
            (n, torch.zeros(0, *q.shape, device=device, dtype=dtype)) for n, q in selected.items()
        )
        if flatten:
            return torch.cat([g.reshape(0, math.prod(g.shape[1:])) for g in result.values()], 1)
        return result
    _require_flat(flatten)
    _, k = _row_source(model, data, loss, params, config, projector)  # never iterated
    rows = _Rows(out, 0, k, config)
    return rows.out if out is not None else torch.zeros(0, k, device=device, dtype=dtype)
