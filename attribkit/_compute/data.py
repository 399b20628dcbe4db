"""One data normaliser for every estimator in model mode.

``data`` may be a ``torch.utils.data.DataLoader``, a ``Dataset`` (batched
here, in order), a tuple ``(inputs, targets)`` of tensors or arrays, a
mapping of stacked tensors (a whole tokenized data set, batched here like a
tuple), or any iterable of batches. A batch is

* a pair ``(inputs, targets)``: inputs a tensor, a tuple of tensors
  (positional arguments of the model) or a dict (keyword arguments);
  targets a tensor, an array or a list of numbers; or
* a ``Mapping`` (a Hugging Face batch, e.g. from a tokenizer and
  ``DataCollatorWithPadding``; API section 7): the inputs are the model's
  keyword arguments, every key but ``"labels"``, and the targets are
  ``batch["labels"]``. With ``loss="causal_lm"`` and no ``"labels"`` key
  the targets are ``batch["input_ids"]`` with the positions whose
  ``attention_mask`` is 0 set to ``-100`` (ignored). Any other mapping
  without ``"labels"`` is a ``ValueError`` saying so. Values that are
  neither tensors nor arrays (strings, flags) are passed to the model
  untouched: the model is called exactly as ``model(**inputs)``, which is
  what the user would write, and dropping a key would change the call.

Floating-point inputs and targets are cast to the model's parameter dtype
(``iter_batches(dtype=)``), integer ones (labels, token ids, masks) are left
alone. Tensors made under ``torch.inference_mode()`` are cloned into normal
tensors, which autograd can use. Every batch is checked (API section 9): a
batch that is not a pair or a mapping, a single (0-d) target, or targets
whose first dimension differs from the inputs' raises ``ValueError`` naming
the batch index.
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


def _keyword_value(x):
    """A mapping batch's value as the model gets it: arrays as tensors, the rest untouched."""
    return torch.as_tensor(x) if isinstance(x, np.ndarray) else x


def _normal(t):
    """A tensor autograd can use: a clone of an inference tensor, else itself."""
    if isinstance(t, torch.Tensor) and t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


def to_device(x, device: torch.device | None, dtype: torch.dtype | None = None):
    """Move a tensor, or the tensors of a (normalised) batch, to ``device``.

    With ``dtype``, floating-point tensors are also cast to it (integer and
    boolean tensors, such as labels, token ids or masks, keep their dtype).
    Inference tensors (made under ``torch.inference_mode()``) come back as
    normal tensors, so that autograd can save them.
    """

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = _normal(t)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(device=device, dtype=dtype)
        return t if device is None else t.to(device)

    # Only the batch's own containers (dicts and tuples, see _as_tensor) are
    # walked: any other value (a list of strings of a mapping batch) is passed on
    # as the very same object.
    return tree_map(move, x, is_leaf=_foreign)


def _foreign(x) -> bool:
    return type(x) is not dict and type(x) is not tuple


def batch_len(inputs) -> int:
    """Number of examples in a batch of inputs (first dim of its first tensor)."""
    for leaf in tree_flatten(inputs)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0:
            return leaf.shape[0]
    raise ValueError(
        "The inputs of a batch of 'data' must hold at least one tensor with a batch "
        f"dimension. Got {_describe(inputs)}."
    )


def _describe(x) -> str:
    """Shapes and type names of a batch's leaves, for error messages."""
    return str(
        tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__, x)
    )


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


def _mapping_rows(data: Mapping) -> int:
    """Examples in a mapping of stacked tensors (a whole tokenized data set)."""
    for value in data.values():
        if _is_array(value) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError(
        "The 'data' argument is a mapping without any tensor or array: a mapping of stacked "
        f"tensors (e.g. a tokenizer's output) is a whole data set. Got keys {list(data)}."
    )


def _slice_mapping(data: Mapping, n: int, start: int, stop: int) -> dict:
    """Rows ``[start, stop)`` of every tensor or array of ``data`` with ``n`` rows."""
    return {
        k: v[start:stop] if _is_array(v) and v.ndim > 0 and v.shape[0] == n else v
        for k, v in data.items()
    }


def _targets(targets, index: int):
    """A batch's targets as a tensor with a batch dimension (``ValueError`` otherwise)."""
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
    return targets


def _mapping_pair(batch: Mapping, index: int, loss):
    """``(inputs, targets)`` of a mapping batch (API section 7)."""
    inputs = {k: _keyword_value(v) for k, v in batch.items() if k != "labels"}
    if "labels" in batch:
        labels = batch["labels"]
        if labels is None:
            raise ValueError(
                f"Batch {index} of 'data' has 'labels' set to None; the targets of a mapping "
                "batch are batch['labels']."
            )
        return inputs, _targets(labels, index)
    if not (isinstance(loss, str) and loss == "causal_lm"):
        raise ValueError(
            f"Batch {index} of 'data' is a dict with keys {list(batch)} and no 'labels' key: "
            "the model is called with a mapping batch's keys as keyword arguments and the "
            "targets are batch['labels'] (which keys are the targets cannot be guessed). Add "
            "'labels' to each batch (e.g. a collate_fn that returns {..., 'labels': y}), use "
            "loss='causal_lm' for a language model whose targets are its input_ids, or make "
            "each batch a pair (inputs, targets)."
        )
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        got = _describe(ids) if "input_ids" in inputs else "no 'input_ids' key"
        raise ValueError(
            f"Batch {index} of 'data' is a dict without 'labels': with loss='causal_lm' its "
            "targets are batch['input_ids'], a (batch, tokens) tensor of token ids. Got "
            f"{got} (keys {list(batch)})."
        )
    mask = inputs.get("attention_mask")
    if mask is None:
        return inputs, ids
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"Batch {index} of 'data' has an 'attention_mask' of shape {_describe(mask)} "
            f"for 'input_ids' of shape {tuple(ids.shape)}; with loss='causal_lm' and no "
            "'labels' the mask must have the shape of the ids (0 at padded positions)."
        )
    return inputs, ids.masked_fill(mask == 0, -100)


def _pair(batch, index: int, loss=None):
    if isinstance(batch, Mapping):
        inputs, targets = _mapping_pair(batch, index, loss)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = _as_tensor(batch[0]), _targets(batch[1], index)
    else:
        raise ValueError(
            "Each batch of 'data' must be a pair (inputs, targets) or a mapping of the "
            f"model's keyword arguments with its 'labels'. Got {type(batch).__name__} at batch "
            f"{index} instead."
        )
    n = batch_len(inputs)
    if targets.shape[0] != n:
        raise ValueError(
            f"Batch {index} of 'data' has {n} examples of inputs (first dimension of "
            f"{_describe(inputs)}) but {targets.shape[0]} targets (shape "
            f"{tuple(targets.shape)}): each batch must hold as many targets as inputs."
        )
    return inputs, targets


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
    loss=None,
) -> Iterator[tuple[object, torch.Tensor]]:
    """Yield ``(inputs, targets)`` batches from any supported ``data``.

    Targets may be a tensor, an array or a list of numbers. With ``device``
    the batches are moved there; with ``dtype`` (the model's parameter dtype)
    floating-point inputs and targets are cast to it, so float64 numpy data
    feeds a float32 model. A mapping batch gives its keys but ``"labels"``
    as the inputs and ``batch["labels"]`` as the targets; ``loss`` (the
    consumer's loss) tells whether a mapping without ``"labels"`` is a
    language-model batch (``"causal_lm"``: targets from ``input_ids``).
    Inference tensors are cloned into normal ones.

    Raises ``ValueError`` when ``data`` is ``None``, of an unsupported kind,
    yields no example at all, or yields a bad batch (naming its index).
    """
    if data is None:
        raise ValueError(
            "The 'data' argument is required when fitting on a torch.nn.Module: pass a "
            "DataLoader, a Dataset, a tuple (inputs, targets) or an iterable of batches."
        )
    total = None
    bs = config.batch_size
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
        batches: Iterable = [
            (_slice(all_inputs, s, s + bs), all_targets[s : s + bs]) for s in range(0, n, bs)
        ]
        total = -(-n // bs)
    elif isinstance(data, Mapping):
        n = _mapping_rows(data)
        batches = [_slice_mapping(data, n, s, s + bs) for s in range(0, n, bs)]
        total = -(-n // bs)
    elif isinstance(data, DataLoader):
        batches = data
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        batches = DataLoader(data, batch_size=bs, shuffle=False)
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        batches = data
    else:
        raise ValueError(
            "The 'data' argument must be a DataLoader, a Dataset, a tuple (inputs, targets) "
            "of tensors, a mapping of stacked tensors or an iterable of batches. Got "
            f"{type(data).__name__}."
        )
    seen = 0
    for i, batch in enumerate(bar(batches, enabled=config.show_progress, total=total, desc=desc)):
        inputs, targets = _pair(batch, i, loss)
        if batch_len(inputs) == 0:
            continue
        seen += batch_len(inputs)
        yield to_device(inputs, device, dtype), to_device(targets, device, dtype)
    if seen == 0:
        raise EmptyDataError(EMPTY_DATA_MESSAGE)


def known_length(data) -> int | None:
    """Number of examples ``data`` will yield, when it can be told without iterating."""
    try:
        if _is_pair_of_arrays(data):
            return int(batch_len(_as_tensor(data[0])))
        if isinstance(data, Mapping):
            return _mapping_rows(data)
        if isinstance(data, DataLoader):
            if data.batch_size is None:  # a custom batch_sampler: sizes unknown
                return None
            size = len(data.sampler)
            return size - size % data.batch_size if data.drop_last else size
        if isinstance(data, Dataset):
            return len(data)
    except (TypeError, ValueError):  # no __len__ (an IterableDataset, say), no tensor
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
