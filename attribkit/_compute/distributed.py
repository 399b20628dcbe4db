"""Reductions of fitted statistics over a ``torch.distributed`` process group.

Every estimator that fits across processes goes through one ``Reducer``
: each rank streams its own shard of the data, sums its
sufficient statistics, and calls the reducer once per pass; afterwards every
rank holds the statistics of the union of the shards. Only
``torch.distributed`` collectives are used (``gloo`` on the CPU, ``nccl`` on
CUDA), on the estimator's device; with one process (or
``config.distributed=False``) every method is a no-op, so single-process code
pays nothing.

A pass over a rank's shard is wrapped in :meth:`Reducer.shard_pass`, which
ends it with one small collective: the global example count, and a clear
error on *every* rank when any rank failed (instead of the others waiting in
the next collective until the process group times out). A rank whose shard is
empty is allowed (its ``EmptyDataError`` is swallowed there) as long as the
union of the shards is not; an empty union raises the single-process error on
every rank.

Shards: the union of the ranks' shards, in rank order, is what one process
would see. ``torch.utils.data.DistributedSampler`` pads the shards to equal
length by repeating examples (unless the data set size divides evenly), so
the union then counts those examples twice; for exactly the single-process
fit give each rank a contiguous ``Subset(dataset, range(lo, hi))`` or
slices of the tensors (uneven and empty shards are fine).

Agreement (API section 9): before a distributed fit communicates, the ranks
check that they fit the same thing, with :meth:`Reducer.agree_fit`: one
all-gather of a fixed 64-byte row per rank (a failure flag, the SHA-256 of a
canonical JSON of the estimator's parameters, the config fields that matter,
the covered parameter names and shapes and the model's structure, and a
float64 fingerprint of the model's parameter and buffer values). Any
difference makes every rank raise a ``ValueError`` naming it, instead of a
collective of mismatched sizes that hangs or aborts the process, or a fit on
mixed statistics. Only then (a second collective) are the ranks' descriptions
gathered, to say what differs.

The payload bytes of every collective are counted in a module-level tally
(:func:`traffic`, :func:`reset_traffic`), for the distributed benchmark.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..config import ComputeConfig
from .checksum import FINGERPRINT_RTOL
from .data import EMPTY_DATA_MESSAGE, EmptyDataError

__all__ = [
    "Reducer",
    "canonical",
    "reducer",
    "reset_traffic",
    "traffic",
]

#: Tensors up to this many bytes are packed into one buffer per all-reduce.
_PACK_BYTES = 16 * 2**20
#: Fixed width of the descriptors :meth:`Reducer.agree` exchanges.
_MAX_DIMS = 8
_MAX_PRINTS = 4

_TRAFFIC = {"bytes": 0, "collectives": 0}


def traffic() -> dict:
    """Payload bytes this process has passed to collectives (and their number).

    ``bytes`` counts, per collective, the tensors this rank contributes (an
    all-reduce of a ``(p, p)`` float64 matrix counts ``8 p^2``; on the wire a
    ring all-reduce moves about ``2 (W - 1) / W`` times that per rank).
    """
    return dict(_TRAFFIC)


def reset_traffic() -> None:
    """Set the :func:`traffic` tally back to zero."""
    _TRAFFIC["bytes"] = 0
    _TRAFFIC["collectives"] = 0


def _count(nbytes: int) -> None:
    _TRAFFIC["bytes"] += int(nbytes)
    _TRAFFIC["collectives"] += 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def canonical(value):
    """``value`` as plain JSON data that is the same on every rank for equal settings.

    Containers recurse (tuples become lists, mapping keys strings);
    :class:`~attribkit.ComputeConfig` keeps only ``dtype`` (the other fields
    may differ per rank without changing the fit: the device index, the
    progress bar, the memory budget (ranks agree on the smallest), the batch
    size); an estimator becomes its class and parameters; a ``torch.dtype``
    its name; a function or class its qualified name; any other object its
    type's name (never a ``repr`` with a memory address).

    Examples
    --------
    >>> import torch, attribkit as ak
    >>> from attribkit._compute.distributed import canonical
    >>> canonical({"damping": 0.1, "layers": ("a", "b"), "config": ak.ComputeConfig()})
    {'damping': 0.1, 'layers': ['a', 'b'], 'config': {'dtype': 'float32'}}
    >>> canonical(torch.nn.functional.mse_loss)
    'torch.nn.functional.mse_loss'
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, ComputeConfig):
        return {"dtype": str(value.torch_dtype).removeprefix("torch.")}
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (torch.device, torch.Size)):
        return str(value) if isinstance(value, torch.device) else list(value)
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if hasattr(value, "get_params") and not isinstance(value, type):
        cls = type(value)
        return {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "params": canonical(value.get_params(deep=False)),
        }
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:  # numpy/torch scalars
        return canonical(item())
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    cls = type(value)
    return f"<{cls.__module__}.{cls.__qualname__}>"


def _digest(fields: Mapping) -> bytes:
    text = json.dumps(canonical(fields), separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).digest()


def _close(a: float, b: float, scale: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return repr(a) == repr(b)
    return abs(a - b) <= FINGERPRINT_RTOL * scale


def _show(value, limit: int = 120) -> str:
    text = json.dumps(canonical(value), allow_nan=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_label(key: str) -> str:
    if key == "estimator":
        return "the estimator class"
    if key.startswith("params."):
        return f"the estimator parameter {key[len('params.') :]!r}"
    if key.startswith("config."):
        return f"the config field {key[len('config.') :]!r}"
    if key == "param_shapes_":
        return "the covered parameters (param_shapes_: names and shapes)"
    if key == "model":
        return "the model's structure (parameter and buffer names, shapes and dtypes)"
    return f"{key!r}"


def _field_differences(mine: Mapping, theirs: Mapping, r: int, limit: int = 4) -> list[str]:
    """What differs between rank 0's fields ``mine`` and rank ``r``'s ``theirs``."""
    found = []
    for key in list(mine) + [k for k in theirs if k not in mine]:
        a, b = mine.get(key, "<absent>"), theirs.get(key, "<absent>")
        if canonical(a) == canonical(b):
            continue
        label = _field_label(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            parts = []
            for name in list(a) + [n for n in b if n not in a]:
                va, vb = a.get(name, "absent"), b.get(name, "absent")
                if canonical(va) != canonical(vb):
                    parts.append(
                        f"{name!r} is {_show(va, 40)} on rank 0, {_show(vb, 40)} on rank {r}"
                    )
            if not parts:
                parts = ["the same entries in another order"]
            more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
            found.append(f"{label}: " + "; ".join(parts[:limit]) + more)
        else:
            found.append(f"{label}: rank 0 has {_show(a)}, rank {r} has {_show(b)}")
    return found


class _ShardPass:
    """Context of one pass over this rank's shard (see :meth:`Reducer.shard_pass`).

    Attributes
    ----------
    count : int
        Examples this rank has seen; the caller adds to it as batches arrive.
    total : int or None
        The sum of ``count`` over ranks, set when the pass ends without error.
    """

    def __init__(self, red: Reducer, owner: str):
        self._red = red
        self._owner = owner
        self.count = 0
        self.total = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        red = self._red
        if not red.active:
            if exc_type is None:
                self.total = int(self.count)
            return False
        if exc_type is not None and not issubclass(exc_type, Exception):
            return False  # KeyboardInterrupt and the like: no collective
        empty = isinstance(exc, EmptyDataError) and self.count == 0
        failed = exc is not None and not empty
        flags = torch.tensor(
            [0 if failed else int(self.count), int(failed)], dtype=torch.int64, device=red.device
        )
        red._all_reduce(flags)
        if int(flags[1]) > 0:
            note = f"{type(exc).__name__}: {exc}" if failed else None
            notes = red._gather_objects(note)
            if failed:
                return False  # this rank's own error, as raised
            failures = "; ".join(f"rank {r}: {m}" for r, m in enumerate(notes) if m is not None)
            raise RuntimeError(
                f"{self._owner} failed on {int(flags[1])} of {red.world_size} ranks, so it "
                f"stops on every rank (this is rank {red.rank}). {failures}"
            )
        self.total = int(flags[0])
        if self.total == 0:
            raise EmptyDataError(
                f"{EMPTY_DATA_MESSAGE} It was empty on all {red.world_size} ranks of the "
                "process group."
            ) from None
        return empty  # an empty shard on this rank is fine: the union is not empty


class Reducer:
    """Collectives over the default process group, or no-ops when inactive.

    Parameters
    ----------
    active : bool
        Whether to communicate.
    device : torch.device, optional
        Where small tensors (counts, flags, descriptors) are made for the
        collectives: the estimator's device (``nccl`` needs CUDA tensors).

    Attributes
    ----------
    active : bool
        Whether statistics are reduced (an initialised group of > 1 rank).
    rank, world_size : int
        This process's rank and the number of ranks (0 and 1 when inactive).
    device : torch.device
        The device of the small tensors the reducer makes itself.
    """

    def __init__(self, active: bool, device: torch.device | str | None = None, owner: str = "fit"):
        self.active = bool(active)
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1
        self.device = torch.device("cpu" if device is None else device)
        if self.active:
            backend = str(dist.get_backend()).lower()
            if backend == "nccl" and self.device.type != "cuda":
                raise RuntimeError(
                    f"{owner}: the default process group uses the 'nccl' backend, which "
                    f"communicates CUDA tensors only, but the estimator computes on "
                    f"{str(self.device)!r}. Use ComputeConfig(device='cuda') (after "
                    "torch.cuda.set_device(local_rank)), a 'gloo' process group for CPU "
                    "estimators, or distributed=False."
                )

    def __repr__(self) -> str:
        if not self.active:
            return "Reducer(inactive)"
        return f"Reducer(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    # ------------------------------------------------------------ primitives
    def _all_reduce(self, t: torch.Tensor, op=None) -> None:
        _count(_nbytes(t))
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)

    def _gather_objects(self, obj) -> list:
        out = [None] * self.world_size
        _count(len(pickle.dumps(obj)))
        dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------ sums
    def sum_(self, *tensors: torch.Tensor) -> None:
        """All-reduce (sum) each tensor in place.

        Small tensors of one dtype and device are packed into one buffer, so
        a call costs one collective per ``16 MiB`` of small statistics
        (e.g. all of EK-FAC's per-layer covariances) plus one per large
        tensor. Non-contiguous tensors are reduced through a contiguous copy.
        """
        if not self.active:
            return
        pack: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            if _nbytes(t) > _PACK_BYTES or t.numel() == 0:
                if t.numel():
                    self._reduce_one(t)
                continue
            pack.setdefault((t.dtype, t.device), []).append(t)
        for group in pack.values():
            while group:
                chunk, size = [], 0
                while group and (not chunk or size + _nbytes(group[0]) <= _PACK_BYTES):
                    size += _nbytes(group[0])
                    chunk.append(group.pop(0))
                if len(chunk) == 1:
                    self._reduce_one(chunk[0])
                    continue
                flat = torch.cat([t.reshape(-1) for t in chunk])
                self._all_reduce(flat)
                start = 0
                for t in chunk:
                    t.copy_(flat[start : start + t.numel()].view_as(t))
                    start += t.numel()

    def _reduce_one(self, t: torch.Tensor) -> None:
        if t.is_contiguous():
            self._all_reduce(t)
        else:
            tmp = t.contiguous()
            self._all_reduce(tmp)
            t.copy_(tmp)

    def sum_int(self, value: int, device: torch.device | None = None) -> int:
        """The sum over ranks of a Python integer (an example count, say)."""
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=device or self.device)
        self._all_reduce(t)
        return int(t.item())

    def min_int(self, value: int, device: torch.device | None = None) -> int:
        """The minimum over ranks of a Python integer (a memory limit, say)."""
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=device or self.device)
        self._all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` on every rank with rank ``src``'s."""
        if self.active:
            _count(_nbytes(tensor))
            dist.broadcast(tensor, src=src)

    # ------------------------------------------------------------ gathers
    def gather_ints(self, values) -> list[list[int]]:
        """Every rank's list of ``len(values)`` integers, in rank order."""
        values = [int(v) for v in values]
        if not self.active:
            return [values]
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        _count(_nbytes(t))
        dist.all_gather(out, t)
        return [[int(v) for v in o.tolist()] for o in out]

    def gather_rows(self, local: torch.Tensor, what: str = "rows") -> torch.Tensor:
        """Concatenate every rank's ``(n_r, *shape)`` tensor along dim 0, in rank order.

        Ranks may hold different numbers of rows (zero included); the trailing
        shape must agree (``ValueError`` on every rank otherwise). Costs two
        collectives: the row counts, then an all-gather of the rows padded to
        the largest count, so it briefly holds ``world_size * max_r n_r`` rows
        besides the result.
        """
        if not self.active:
            return local
        trailing = list(local.shape[1:])
        if len(trailing) > _MAX_DIMS:
            raise ValueError(f"gather_rows takes at most {_MAX_DIMS} trailing dimensions.")
        desc = [local.ndim, local.shape[0], *trailing, *([0] * (_MAX_DIMS - len(trailing)))]
        descs = self.gather_ints(desc)
        if any(d[0] != desc[0] or d[2:] != desc[2:] for d in descs):
            shapes = [tuple(d[1 : 1 + d[0]]) for d in descs]
            raise ValueError(
                f"The ranks hold {what} of different shapes, which cannot be gathered: "
                + ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
                + ". Every rank must fit the same model and parameters."
            )
        rows = [d[1] for d in descs]
        most = max(rows)
        buf = local
        if local.shape[0] != most or not local.is_contiguous():
            buf = local.new_zeros((most, *local.shape[1:]))
            buf[: local.shape[0]] = local
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        _count(_nbytes(buf))
        dist.all_gather(out, buf)
        return torch.cat([o[:r] for o, r in zip(out, rows)])

    def agree(
        self, what: str, shape=None, fingerprint=(), rtol: float = 1e-8, failed: bool = False
    ) -> None:
        """Raise ``ValueError`` on every rank unless all ranks pass the same thing.

        Each rank gives the ``shape`` of its argument and optionally a few
        floats ``fingerprint`` (sums of its entries, say) that must agree to
        ``rtol`` relative to the largest one's magnitude (so equal arguments
        pass whatever the summation order). ``failed=True`` says this rank
        could not even get that far (its own error is re-raised by the
        caller); the others then raise here instead of waiting forever in a
        collective this rank never joins. One all-gather of a few numbers.
        """
        if not self.active:
            return
        shape = () if shape is None else tuple(int(s) for s in shape)
        fingerprint = tuple(float(f) for f in fingerprint)
        if len(shape) > _MAX_DIMS or len(fingerprint) > _MAX_PRINTS:
            raise ValueError("agree() takes a short shape and fingerprint.")
        row = [float(failed), float(len(shape)), *map(float, shape)]
        row += [0.0] * (2 + _MAX_DIMS - len(row))
        row += [float(len(fingerprint)), *fingerprint]
        row += [0.0] * (3 + _MAX_DIMS + _MAX_PRINTS - len(row))
        t = torch.tensor(row, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        _count(_nbytes(t))
        dist.all_gather(out, t)
        rows = [o.tolist() for o in out]
        failed_ranks = [r for r, v in enumerate(rows) if v[0]]
        if failed_ranks:
            if failed:
                return  # the caller raises this rank's own error
            raise ValueError(
                f"{what}: rank(s) {failed_ranks} failed before the collective step, so it "
                f"stops on every rank (this is rank {self.rank}); see their error."
            )
        shapes = [tuple(int(s) for s in v[2 : 2 + int(v[1])]) for v in rows]
        start = 2 + _MAX_DIMS
        prints = [v[start + 1 : start + 1 + int(v[start])] for v in rows]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(
                f"{what} must be called by every rank with arguments of the same shape. Got "
                + ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
                + "."
            )
        if not all(math.isfinite(f) for p in prints for f in p):
            return  # NaN/Inf arguments: the caller's finiteness check says so
        scale = max((abs(f) for p in prints for f in p), default=0.0)
        for r, p in enumerate(prints):
            if len(p) != len(prints[0]) or any(
                abs(a - b) > rtol * scale for a, b in zip(p, prints[0])
            ):
                raise ValueError(
                    f"{what} must be called by every rank with the same arguments, but rank "
                    f"{r}'s differ from rank 0's (checksums {p} and {prints[0]})."
                )

    def agree_fit(
        self,
        owner: str,
        fields: Mapping | None = None,
        prints: Mapping[str, torch.Tensor] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Raise ``ValueError`` on every rank unless all ranks fit the same thing.

        Called by every rank at the start of a distributed fit, before any
        other collective (``BaseEstimator.fit`` does it as soon as the layout
        is known). ``fields`` is a mapping of plain settings (the estimator's
        class and parameters, the config fields that matter, the covered
        parameter names and shapes, the model's structure; see
        :func:`canonical`) that must be equal on every rank; ``prints`` maps
        the names of the model's tensors to their :func:`fingerprints` rows,
        whose column sums must agree to :data:`FINGERPRINT_RTOL` of the L1
        norm. ``error`` says this rank failed before it could describe its
        fit: it takes part all the same (flagged), so the others raise a
        ``ValueError`` quoting it instead of waiting forever; the caller then
        raises its own error.

        Cost when the ranks agree: one all-gather of 64 bytes per rank (a flag,
        a SHA-256 digest of the fields, three float64 sums). Only when they
        do not, a second collective gathers every rank's fields,
        fingerprints and error to name what differs.
        """
        if not self.active:
            return
        failed = error is not None
        fields = {} if fields is None else fields
        prints = {} if prints is None else prints
        sums = (
            torch.stack(list(prints.values())).sum(0)
            if prints
            else torch.zeros(3, dtype=torch.float64)
        )
        digest = torch.frombuffer(bytearray(_digest(fields)), dtype=torch.int64)
        row = torch.cat(
            [torch.tensor([int(failed)]), digest, sums.to(torch.float64).view(torch.int64)]
        )
        row = row.to(self.device)
        out = [torch.empty_like(row) for _ in range(self.world_size)]
        _count(_nbytes(row))
        dist.all_gather(out, row)
        rows = [o.cpu() for o in out]
        flags = [int(r[0]) for r in rows]
        digests = [r[1:5].tolist() for r in rows]
        values = [r[5:8].view(torch.float64).tolist() for r in rows]
        scale = max(abs(v[0]) for v in values)
        differ = [
            r
            for r in range(1, self.world_size)
            if digests[r] != digests[0]
            or not all(_close(a, b, scale) for a, b in zip(values[r], values[0]))
        ]
        if not any(flags) and not differ:
            return
        note = f"{type(error).__name__}: {error}" if failed else None
        mine = {"fields": canonical(fields), "prints": {k: v.tolist() for k, v in prints.items()}}
        notes = self._gather_objects({**mine, "error": note})
        if failed:
            return  # the caller raises this rank's own error
        here = f"so the fit stops on every rank (this is rank {self.rank})"
        failures = [(r, n["error"]) for r, n in enumerate(notes) if n["error"] is not None]
        if failures:
            raise ValueError(
                f"{owner}: rank(s) {[r for r, _ in failures]} failed before the ranks could "
                f"compare their fits, {here}. " + "; ".join(f"rank {r}: {m}" for r, m in failures)
            )
        problems = []
        for r in differ:
            found = _field_differences(notes[0]["fields"], notes[r]["fields"], r)
            if not found:
                found = [self._value_differences(notes[0]["prints"], notes[r]["prints"], r)]
            problems.extend(found)
        raise ValueError(
            f"{owner}: the ranks of the process group must fit the same estimator on the "
            f"same model, {here}. They differ in " + "; in ".join(problems) + ". Give every "
            "rank the same estimator parameters and the same model (e.g. load the same "
            "checkpoint on every rank), and only its own shard of the data."
        )

    @staticmethod
    def _value_differences(first: Mapping, other: Mapping, r: int, limit: int = 4) -> str:
        """Name the tensors whose fingerprints differ between rank 0 and rank ``r``."""
        names = []
        for name, a in first.items():
            b = other.get(name)
            scale = max(abs(a[0]), abs(b[0])) if b is not None else 0.0
            if b is None or not all(_close(x, y, scale) for x, y in zip(a, b)):
                names.append(name)
        shown = ", ".join(repr(n) for n in names[:limit])
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        what = f"{shown}{more}" if names else "several tensors (each within rounding alone)"
        return (
            f"the values of the model's parameters and buffers: rank {r}'s differ from rank "
            f"0's in {what} (checksums compared to {FINGERPRINT_RTOL:g} of their L1 norm)"
        )

    # ------------------------------------------------------------ passes
    def shard_pass(self, owner: str) -> _ShardPass:
        """Context manager around one pass over this rank's shard.

        Add the examples seen to its ``count``; on exit (one all-reduce of two
        integers) ``total`` is the count over all ranks. If the body raised on
        any rank, every rank raises: the failing ones their own error, the
        others a ``RuntimeError`` quoting it. An ``EmptyDataError`` from an
        empty shard is swallowed unless every shard is empty. Inactive: the
        body's exceptions pass through unchanged and ``total = count``.

        Examples
        --------
        >>> from attribkit._compute.distributed import Reducer
        >>> red = Reducer(False)
        >>> with red.shard_pass("fit") as shard:
        ...     shard.count += 5
        >>> shard.total
        5
        """
        return _ShardPass(self, owner)


def reducer(
    config: ComputeConfig, owner: str = "fit", device: torch.device | str | None = None
) -> Reducer:
    """The reducer ``config.distributed`` asks for at this moment.

    ``"auto"``: active when ``torch.distributed`` is available, initialised
    and has more than one rank. ``True``: a process group must be
    initialised (``RuntimeError`` otherwise). ``False``: never active.
    ``device`` (default ``config.torch_device``) is where the reducer makes
    its own small tensors; a ``nccl`` group with a CPU device raises
    ``RuntimeError`` saying what to change.

    Examples
    --------
    >>> import attribkit as ak
    >>> from attribkit._compute.distributed import reducer
    >>> reducer(ak.ComputeConfig()).active  # no process group initialised
    False
    """
    setting = config.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if setting is True and not initialised:
        raise RuntimeError(
            f"{owner}: ComputeConfig(distributed=True) needs an initialised torch.distributed "
            "process group (torch.distributed.init_process_group, or run under torchrun). "
            "None is initialised; use distributed='auto' or False for a single process."
        )
    if setting is False or not initialised:
        return Reducer(False)
    device = config.torch_device if device is None else device
    return Reducer(dist.get_world_size() > 1, device=device, owner=owner)
