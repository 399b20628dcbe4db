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

Interrupted fills (API section 9): with ``out``, any exception carries
``rows_written`` (rows ``[0, rows_written)`` of ``out`` are final, a memmap
flushed); ``start=k`` skips the first ``k`` examples of ``data`` without
running the model on them (:func:`attribkit._compute.data.skip_examples`)
and fills rows ``k..n-1``; ``checkpoint`` records the progress after every
batch, in a JSON file replaced atomically or through a callable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import OrderedDict

import numpy as np
import torch

from ._compute import validation as V
from ._compute.data import known_length, skip_examples
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


#: The ``format`` field of a checkpoint file (see ``per_example_gradients``).
_CHECKPOINT_FORMAT = "attribkit.per_example_gradients.checkpoint/1"


class _Rows:
    """The ``(n, k)`` result: filled batch by batch into ``out``, or collected.

    With ``out``, ``filled`` is the number of leading rows of ``out`` that are
    final (``start`` before the first batch); ``checkpoint`` (a path or a
    callable) is told after every batch.
    """

    def __init__(
        self, out, n: int | None, k: int, config: ComputeConfig, start: int = 0, checkpoint=None
    ):
        self.out, self.n, self.k, self.filled = out, n, k, int(start)
        self.dtype, self.device = config.torch_dtype, config.torch_device
        self.chunks: list[torch.Tensor] = []
        self.checkpoint = checkpoint
        if out is not None:
            self._check()
            if self.filled > out.shape[0]:
                raise ValueError(
                    "The 'start' argument of per_example_gradients must be at most the number "
                    f"of rows of 'out', {out.shape[0]}. Got {self.filled} instead."
                )

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
        if self.checkpoint is not None:
            self._flush()  # the record never claims rows that are not on disk yet
            self._record(complete=False)

    def result(self):
        if self.out is None:
            return torch.cat(self.chunks)
        if self.filled != self.out.shape[0]:
            raise ValueError(
                f"The 'out' argument of per_example_gradients has {self.out.shape[0]} rows "
                f"but 'data' yielded {self.filled} examples (rows {self.filled}: are unset)."
            )
        self._flush()
        if self.checkpoint is not None:
            self._record(complete=True)
        return self.out

    def _flush(self) -> None:
        if isinstance(self.out, np.memmap):
            self.out.flush()

    def _record(self, complete: bool) -> None:
        """Tell ``checkpoint`` that rows ``[0, filled)`` of ``out`` are final."""
        if callable(self.checkpoint):
            self.checkpoint(self.filled)
            return
        record = {
            "format": _CHECKPOINT_FORMAT,
            "rows_written": self.filled,
            "shape": [int(d) for d in self.out.shape],
            "dtype": str(self.dtype).removeprefix("torch."),
            "complete": complete,
        }
        _write_atomically(self.checkpoint, json.dumps(record, indent=1) + "\n")

    def interrupted(self, exc: BaseException) -> None:
        """Mark an exception raised during the fill with ``rows_written`` (and a note)."""
        try:
            self._flush()
        except Exception:  # pragma: no cover - never hide the original error
            pass
        try:
            exc.rows_written = self.filled
        except (AttributeError, TypeError):  # pragma: no cover - exceptions with __slots__
            return
        note = getattr(exc, "add_note", None)
        if note is not None:
            note(
                f"per_example_gradients: rows [0, {self.filled}) of 'out' are final "
                f"(exc.rows_written); resume with start={self.filled}."
            )


def _write_atomically(path, text: str) -> None:
    """Replace the file ``path`` by ``text`` so that it is always one complete version.

    The text goes to a temporary file in the same folder, which is flushed
    to disk (``fsync``) and renamed over ``path`` (``os.replace``, atomic on
    POSIX and Windows); then the folder is synced (where the OS allows), so
    the rename itself survives a power loss. A reader, or a process killed
    at any instant (``kill -9``), sees the old content or the new, never a
    mix or an empty file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - folders cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def per_example_gradients(
    model: torch.nn.Module,
    data,
    loss="cross_entropy",
    params=None,
    config: ComputeConfig | None = None,
    flatten: bool = True,
    projector=None,
    out=None,
    start: int = 0,
    checkpoint=None,
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
        is flushed before it is returned. Any exception raised while ``out``
        is filled carries ``rows_written``: rows ``[0, rows_written)`` of
        ``out`` are final (a memmap is flushed first).
    start : int, default=0
        Resume a fill (needs ``out``): differentiate only examples
        ``start..n-1`` of ``data`` and write rows ``start..n-1`` of ``out``;
        rows ``[0, start)`` are left as they are. The first ``start``
        examples are skipped without running the model on them: sliced
        from a tuple or a Dataset, left out of a DataLoader's sampler (never
        loaded), or dropped batch by batch from other iterables (loaded, not
        computed). ``data`` must give the examples in the order of the
        interrupted fill: a DataLoader that shuffles raises ``ValueError``.
        The rows equal those of an uninterrupted fill (to rounding: batches
        may be split differently).
    checkpoint : str, os.PathLike or callable, optional
        Record the progress of the fill (needs ``out``), after every batch
        once its rows are in ``out`` (a memmap flushed to disk first): a
        path names a JSON file, replaced atomically each time, holding
        ``{"rows_written": ..., "shape": [n, k], "dtype": ..., "complete":
        ..., "format": ...}``; a callable is called with the number of final
        rows. The file survives ``kill -9`` and a power loss with a value
        that is never ahead of ``out`` (see Notes).

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

    **Interrupted fills.** A long fill into a memmap can resume where it
    stopped. Within the process, catch the exception and pass
    ``start=exc.rows_written``. Across a crash or ``kill -9``, where no
    exception is raised, let the library record the progress in a sidecar
    file, and read it when you start again::

        import json, os
        import numpy as np
        path, ckpt = "grads.npy", "grads.npy.progress.json"
        if os.path.exists(ckpt):                       # resume
            out = np.load(path, mmap_mode="r+")
            start = json.load(open(ckpt))["rows_written"]
        else:                                          # first run
            out = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(n, k))
            start = 0
        ak.per_example_gradients(model, data, projector=proj, out=out,
                                 start=start, checkpoint=ckpt)

    Why the record survives: after each batch, the memmap is flushed
    (``msync``) before the record is written, so the record never counts a
    row that is not on disk; the record is written to a temporary file,
    ``fsync``-ed and renamed over the old one (``os.replace``, atomic), so a
    process killed at any instant leaves either the previous record or the
    new one, never a partial file. Rows after ``rows_written`` may hold
    part of the next batch; ``start=`` rewrites them.

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

    Resuming a fill that stopped after 3 rows (``exc.rows_written == 3``):

    >>> full = ak.per_example_gradients(model, (X, y))
    >>> out = torch.zeros(5, 8)
    >>> out[:3] = full[:3]  # the rows the interrupted fill had written
    >>> ak.per_example_gradients(model, (X, y), out=out, start=3) is out
    True
    >>> torch.allclose(out, full)
    True
    """
    if config is None and projector is not None:
        config = getattr(projector, "_config", None)
    config = V.check_config("per_example_gradients", config)
    start = _check_resume(start, out, checkpoint)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "The 'model' argument of per_example_gradients must be a torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    # Held from the first look at the model: another thread's functional_call
    # swaps its parameters for detached copies while it runs.
    # autograd_on: differentiate even when called inside torch.inference_mode().
    with use_model(model, "per_example_gradients"), autograd_on():
        if out is None:
            return _per_example_gradients(model, data, loss, params, config, flatten, projector)
        try:
            return _fill(
                model, data, loss, params, config, flatten, projector, out, start, checkpoint
            )
        except BaseException as exc:
            if not hasattr(exc, "rows_written"):  # failed before the first row: none new
                with contextlib.suppress(AttributeError, TypeError):
                    exc.rows_written = start
            raise


def _check_resume(start, out, checkpoint) -> int:
    """Validate ``start`` and ``checkpoint``; both need ``out``."""
    start = V.check_int("per_example_gradients", "start", start, minimum=0)
    if out is None and (start or checkpoint is not None):
        given = f"start={start}" if start else f"checkpoint={checkpoint!r}"
        raise ValueError(
            f"The 'start' and 'checkpoint' arguments of per_example_gradients need 'out' (the "
            f"(n, k) array that a fill writes row by row). Got {given} without 'out'."
        )
    if checkpoint is not None and not (
        callable(checkpoint) or isinstance(checkpoint, (str, os.PathLike))
    ):
        raise TypeError(
            "The 'checkpoint' argument of per_example_gradients must be a path (str or "
            f"os.PathLike) or a callable taking the rows written. Got {type(checkpoint).__name__}."
        )
    return start


def _fill(model, data, loss, params, config, flatten, projector, out, start, checkpoint):
    """Write the rows ``start..n-1`` into ``out``; an exception gets ``rows_written``."""
    n = known_length(data)
    empty = n == 0 or (isinstance(data, (list, tuple)) and len(data) == 0)
    if empty and reducer(config, "per_example_gradients").active:  # an empty shard: 0 rows
        return _no_rows(model, data, loss, params, config, flatten, projector, out, start)
    _require_flat(flatten)
    rest = skip_examples(data, start)
    batches, k = _row_source(model, rest, loss, params, config, projector)
    rows = _Rows(out, n, k, config, start, checkpoint)
    # Closed on any error here: a suspended generator kept alive by the
    # traceback would hold the model (hooked, in eval mode) until then.
    closing = contextlib.closing if hasattr(batches, "close") else contextlib.nullcontext
    try:
        with closing(batches):
            if rows.filled < out.shape[0]:  # start == n: nothing left to compute
                for projected in batches:
                    rows.add(projected)
        return rows.result()
    except BaseException as exc:
        rows.interrupted(exc)
        raise


def _per_example_gradients(model, data, loss, params, config, flatten, projector):
    device, dtype = config.torch_device, config.torch_dtype
    empty = known_length(data) == 0 or (isinstance(data, (list, tuple)) and len(data) == 0)
    if empty and reducer(config, "per_example_gradients").active:  # an empty shard: 0 rows
        return _no_rows(model, data, loss, params, config, flatten, projector, None)
    if projector is None:
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
    rows = _Rows(None, known_length(data), k, config)
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
            self.chunks.append([self.buffer[: self.filled]])
            self.buffer = None
        # Kept as parts and concatenated once into the result: one copy of the
        # rows, not two (a batch's own concatenation, then the batches').
        self.chunks.append([p.to(device=self.device, dtype=self.dtype) for p in parts])

    def result(self) -> torch.Tensor:
        if self.buffer is not None:
            return self.buffer[: self.filled] if self.filled < self.n else self.buffer
        if len(self.chunks) == 1 and len(self.chunks[0]) == 1:
            return self.chunks[0][0]
        first = self.chunks[0][0]
        width = sum(p.shape[1] for p in self.chunks[0]) if len(self.chunks[0]) > 1 else None
        rows = sum(parts[0].shape[0] for parts in self.chunks)
        shape = (rows, width) if width is not None else (rows, *first.shape[1:])
        out = torch.empty(shape, device=self.device, dtype=self.dtype)
        start = 0
        for parts in self.chunks:
            b = parts[0].shape[0]
            if len(parts) == 1:
                out[start : start + b].copy_(parts[0])
            else:
                torch.cat(parts, dim=1, out=out[start : start + b])
            start += b
        self.chunks = []
        return out


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


def _no_rows(model, data, loss, params, config, flatten, projector, out, start=0):
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
    rows = _Rows(out, 0, k, config, start)
    return rows.out if out is not None else torch.zeros(0, k, device=device, dtype=dtype)
