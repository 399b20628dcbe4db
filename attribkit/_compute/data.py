"""One data normaliser for every estimator in model mode.

``data`` may be a ``torch.utils.data.DataLoader``, a ``Dataset`` (batched
here, in order), a tuple ``(inputs, targets)`` of tensors or arrays, or any
iterable of ``(inputs, targets)`` batches. Inputs may be a tensor, a tuple of
tensors (positional arguments of the model) or a dict (keyword arguments);
targets a tensor, an array or a list of numbers. Floating-point inputs and
targets are cast to the model's parameter dtype (``iter_batches(dtype=)``),
integer ones (labels, token ids) are left alone. A batch that is a dict, or a
pair with a single (0-d) target, raises ``ValueError`` saying how to adapt the
data (which keys are the targets cannot be guessed; single examples want a
``DataLoader``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from ..config import ComputeConfig
from .progress import bar


def _is_array(x) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray))


def _as_tensor(x):
    """The normal form of a batch: numpy arrays as tensors, dicts and tuples as containers.

    Hand-written rather than ``tree_map`` because it changes containers: any
    Mapping becomes a dict and a list a tuple (positional arguments), so the
    later walkers (``tree_map``) and the model call see only those.
    """
    if isinstance(x, np.ndarray):
        return torch.as_tensor(x)
    if isinstance(x, Mapping):
        return {k: _as_tensor(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(_as_tensor(v) for v in x)
    return x


def to_device(x, device: torch.device | None, dtype: torch.dtype | None = None):
    """Move a tensor, or the tensors of a (normalised) batch, to ``device``.

    With ``dtype``, floating-point tensors are also cast to it (integer and
    boolean tensors, such as labels, token ids or masks, keep their dtype).
    """

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(device=device, dtype=dtype)
        return t if device is None else t.to(device)

    return tree_map(move, x)


def batch_len(inputs) -> int:
    """Number of examples in a batch of inputs (first dim of its first tensor)."""
    return tree_flatten(inputs)[0][0].shape[0]


def _is_number_list(x) -> bool:
    """A non-empty list of plain numbers (targets given as a Python list)."""
    return (
        isinstance(x, list)
        and len(x) > 0
        and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in x)
    )


def _is_pair_of_arrays(data) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and (_is_array(data[0]) or isinstance(data[0], (tuple, Mapping)))
        and (_is_array(data[1]) or _is_number_list(data[1]))
    )


def _slice(x, start, stop):
    return tree_map(lambda v: v[start:stop], x)


def _pair(batch, index: int):
    if isinstance(batch, Mapping):
        raise ValueError(
            "Each batch of 'data' must be a pair (inputs, targets). Got a dict with keys "
            f"{list(batch)} at batch {index}: which keys are the targets cannot be guessed. "
            "Make each dataset item a pair (inputs, target), or give the DataLoader a "
            "collate_fn that returns a pair, e.g. lambda rows: ({'input_ids': ...}, labels); "
            "the inputs may themselves be a dict of the model's keyword arguments."
        )
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = _as_tensor(batch[0]), batch[1]
        if _is_number_list(targets):
            targets = torch.as_tensor(targets)
        targets = _as_tensor(targets)
        if not isinstance(targets, torch.Tensor) or targets.ndim == 0:
            raise ValueError(
                "Each batch of 'data' must be a pair (inputs, targets) with a batch of "
                f"targets. Got a single target {targets!r} at batch {index}: an iterable of "
                "single examples wants a DataLoader, torch.utils.data.DataLoader(examples, "
                "batch_size=...), or a tuple (X, y) of stacked arrays."
            )
        return inputs, targets
    raise ValueError(
        "Each batch of 'data' must be a pair (inputs, targets). "
        f"Got {type(batch).__name__} at batch {index} instead."
    )


EMPTY_DATA_MESSAGE = (
    "The 'data' argument is empty: it yielded no example. (A generator can only be "
    "iterated once; pass a DataLoader or a tuple to estimators that need two passes.)"
)


class EmptyDataError(ValueError):
    """``data`` yielded no example (a ``ValueError``).

    Its own class so that a distributed fit (``attribkit._compute.distributed``) can
    tell an empty shard on one rank, which is allowed, from other errors.
    """


def iter_batches(
    data,
    config: ComputeConfig,
    device: torch.device | None = None,
    desc: str | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[object, torch.Tensor]]:
    """Yield ``(inputs, targets)`` batches from any supported ``data``.

    Targets may be a tensor, an array or a list of numbers. With ``device``
    the batches are moved there; with ``dtype`` (the model's parameter dtype)
    floating-point inputs and targets are cast to it, so float64 numpy data
    feeds a float32 model. A batch must be a pair; a dict batch (a
    ``DataLoader`` over a dataset of dicts) raises ``ValueError`` saying how
    to adapt it, since which keys are the targets cannot be guessed.

    Raises ``ValueError`` when ``data`` is ``None``, of an unsupported kind, or
    yields no example at all.
    """
    if data is None:
        raise ValueError(
            "The 'data' argument is required when fitting on a torch.nn.Module: pass a "
            "DataLoader, a Dataset, a tuple (inputs, targets) or an iterable of batches."
        )
    total = None
    if _is_pair_of_arrays(data):
        all_inputs, all_targets = _as_tensor(data[0]), data[1]
        if _is_number_list(all_targets):
            all_targets = torch.as_tensor(all_targets)
        all_targets = _as_tensor(all_targets)
        n = batch_len(all_inputs)
        if all_targets.shape[0] != n:
            raise ValueError(
                "The 'data' tuple (inputs, targets) must have as many targets as inputs. "
                f"Got {n} inputs and {all_targets.shape[0]} targets."
            )
        bs = config.batch_size
        batches: Iterable = [
            (_slice(all_inputs, s, s + bs), all_targets[s : s + bs]) for s in range(0, n, bs)
        ]
        total = -(-n // bs)
    elif isinstance(data, DataLoader):
        batches = data
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        batches = DataLoader(data, batch_size=config.batch_size, shuffle=False)
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        batches = data
    else:
        raise ValueError(
            "The 'data' argument must be a DataLoader, a Dataset, a tuple (inputs, targets) "
            f"of tensors or an iterable of (inputs, targets) batches. Got {type(data).__name__}."
        )
    seen = 0
    for i, batch in enumerate(bar(batches, enabled=config.show_progress, total=total, desc=desc)):
        inputs, targets = _pair(batch, i)
        if batch_len(inputs) == 0:
            continue
        seen += batch_len(inputs)
        if device is not None or dtype is not None:
            inputs, targets = to_device(inputs, device, dtype), to_device(targets, device, dtype)
        yield inputs, targets
    if seen == 0:
        raise EmptyDataError(EMPTY_DATA_MESSAGE)


def known_length(data) -> int | None:
    """Number of examples ``data`` will yield, when it can be told without iterating."""
    try:
        if _is_pair_of_arrays(data):
            return int(batch_len(_as_tensor(data[0])))
        if isinstance(data, DataLoader):
            if data.batch_size is None:  # a custom batch_sampler: sizes unknown
                return None
            size = len(data.sampler)
            return size - size % data.batch_size if data.drop_last else size
        if isinstance(data, Dataset):
            return len(data)
    except TypeError:  # no __len__ (an IterableDataset, say)
        return None
    return None


# --------------------------------------------------------------------------- resuming
#: Samplers that draw another order on every pass: "the first k examples" is not defined.
_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
#: DataLoader arguments a resumed loader takes over from the user's.
_LOADER_ARGS = (
    "num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
    "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers",
    "pin_memory_device", "in_order",
)  # fmt: skip


def skip_examples(data, start: int, owner: str = "per_example_gradients"):
    """``data`` less its first ``start`` examples, in the same order, never loading them if it can.

    The examples ``start, start + 1, ...`` come in the same order as from
    ``data`` itself, so that a resumed pass continues an interrupted one
    (:func:`attribkit.per_example_gradients` with ``start=``). How:

    * a tuple ``(inputs, targets)`` of arrays, or a mapping of stacked
      tensors: sliced (views, nothing copied);
    * a ``Dataset`` with a length: a ``Subset`` from ``start`` on;
    * a ``DataLoader`` with its default batching over a map-style dataset:
      a new ``DataLoader`` over the same dataset, collate function and worker
      settings, whose sampler starts at the ``start``-th index of the
      original's (the indices are listed, the examples before ``start`` are
      never loaded; ``drop_last`` keeps the original's last full batch);
    * anything else (a generator, a list of batches, an ``IterableDataset``,
      a custom ``batch_sampler``): iterated, whole batches before ``start``
      dropped and the batch that straddles it sliced; the model never sees
      them, but they are loaded.

    A ``DataLoader`` whose sampler draws a new order on each pass
    (``shuffle=True``, a random or weighted sampler, a shuffling
    ``DistributedSampler``) raises ``ValueError``: the first ``start``
    examples of one pass are not those of another. Data that yields fewer
    than ``start`` examples raises ``ValueError`` when that shows.

    Examples
    --------
    >>> import torch
    >>> from attribkit._compute.data import skip_examples
    >>> X, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    >>> skip_examples((X, y), 3)[1]
    tensor([3, 4])
    >>> [b[1].tolist() for b in skip_examples([(X[:2], y[:2]), (X[2:], y[2:])], 3)]
    [[3, 4]]
    """
    if start == 0:
        return data
    if _is_pair_of_arrays(data):
        inputs, targets = data
        return (tree_map(lambda v: v[start:], inputs), targets[start:])
    if isinstance(data, Mapping):
        rows = _leading_rows(data)
        return {k: v[start:] if _has_rows(v, rows) else v for k, v in data.items()}
    if isinstance(data, DataLoader):
        sampler = data.sampler
        if isinstance(sampler, _RANDOM_SAMPLERS) or (
            isinstance(sampler, DistributedSampler) and sampler.shuffle
        ):
            raise ValueError(
                f"{owner} cannot resume (start={start}) over a DataLoader whose sampler "
                f"({type(sampler).__name__}) draws a new order on every pass: its first "
                f"{start} examples are not those of the interrupted pass. Resume over the "
                "same data in a fixed order (shuffle=False, or a Subset in the order used)."
            )
        if (
            type(data) is DataLoader
            and data.batch_size is not None
            and not isinstance(data.dataset, IterableDataset)
        ):
            return _resumed_loader(data, start)
        return _skip_rows(data, start, owner)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        try:
            n = len(data)
        except TypeError:
            return _skip_rows(data, start, owner)
        return torch.utils.data.Subset(data, range(min(start, n), n))
    return _skip_rows(data, start, owner)


def _has_rows(v, rows: int) -> bool:
    return _is_array(v) and v.ndim > 0 and v.shape[0] == rows


def _leading_rows(batch: Mapping) -> int | None:
    for v in batch.values():
        if _is_array(v) and v.ndim > 0:
            return int(v.shape[0])
    return None


def _resumed_loader(loader: DataLoader, start: int) -> DataLoader:
    """A loader like ``loader`` whose examples begin at its ``start``-th one."""
    indices = list(loader.sampler)  # indices only: no example is loaded
    stop = len(indices)
    if loader.drop_last:
        stop -= stop % loader.batch_size
    accepted = inspect.signature(DataLoader.__init__).parameters
    kwargs = {a: getattr(loader, a) for a in _LOADER_ARGS if a in accepted and hasattr(loader, a)}
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=indices[start:stop],
        drop_last=False,
        **kwargs,
    )


def _batch_rows(batch, owner: str) -> int:
    """Examples in one raw batch (a pair or a mapping), before any normalisation."""
    if isinstance(batch, Mapping):
        rows = _leading_rows(batch)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        targets = batch[1]
        if _is_array(targets) and targets.ndim > 0:
            rows = int(targets.shape[0])
        elif _is_number_list(targets):
            rows = len(targets)
        else:
            leaves = [t for t in tree_flatten(_as_tensor(batch[0]))[0] if _is_array(t)]
            rows = int(leaves[0].shape[0]) if leaves and leaves[0].ndim else None
    else:
        rows = None
    if rows is None:
        raise ValueError(
            f"{owner} cannot skip examples (start=) in a batch of type "
            f"{type(batch).__name__}: each batch must be a pair (inputs, targets) or a mapping "
            "of tensors whose first dimension is the batch."
        )
    return rows


def _slice_batch(batch, k: int):
    """A raw batch less its first ``k`` examples."""
    if isinstance(batch, Mapping):
        rows = _leading_rows(batch)
        return {key: v[k:] if _has_rows(v, rows) else v for key, v in batch.items()}
    inputs, targets = batch
    return type(batch)((tree_map(lambda v: v[k:] if _is_array(v) else v, inputs), targets[k:]))


def _skip_rows(batches, start: int, owner: str):
    """Iterate ``batches``, dropping the first ``start`` examples (sliced at the boundary)."""
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes)):
        return batches  # not data at all: iter_batches says what is wrong

    def rows():
        seen = 0
        for batch in batches:
            if seen >= start:
                yield batch
                continue
            b = _batch_rows(batch, owner)
            if seen + b > start:
                yield _slice_batch(batch, start - seen)
            seen += b
        if seen < start:
            raise ValueError(
                f"{owner} was asked to start at example {start}, but 'data' yielded only "
                f"{seen} examples."
            )

    return rows()
