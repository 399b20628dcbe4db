"""Conversion between the containers users pass and flat tensors.

Every estimator accepts vectors as a 2-D numpy array, a 2-D torch tensor or a
dict ``name -> (m, *shape)`` keyed like its ``param_shapes_``. This module is
the one place that turns them into a flat ``(m, n_features)`` tensor on the
working device and dtype (validating shape, layout and finiteness) and turns
results back into the container the user gave.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import scipy.sparse
import torch
from sklearn.utils.validation import check_array

#: The single key of ``param_shapes_`` for a plain 2-D array.
ARRAY_KEY = "features"


def layout_size(shapes: Mapping[str, tuple]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite, at the cost of one read-only reduction.

    NaN and infinities propagate through a sum, so a finite sum proves every
    entry finite without ``torch.isfinite``'s temporaries (a float copy and
    two boolean masks of the input's size on the CPU: 25x slower here). Only
    a non-finite sum, which huge finite entries can also give by overflow,
    takes the exact elementwise test. (The sum is in the tensor's own dtype:
    asking torch for a float64 sum of float32 makes a float64 copy first.)
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _finite_or_raise(tensor: torch.Tensor, name: str) -> None:
    if not all_finite(tensor):
        raise ValueError(f"Input {name} contains NaN or infinity.")


def _to_float_tensor(value, name: str) -> torch.Tensor:
    """A torch tensor from a tensor or an array-like, without sklearn's 2-D demand."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        array = np.asarray(value)
        if array.dtype == object or array.dtype.kind in "USV":
            raise ValueError(
                f"Input {name} must hold real numbers. Got an array of dtype {array.dtype}."
            )
        tensor = torch.from_numpy(np.array(array, copy=True))
    if tensor.is_complex():
        raise ValueError(f"Input {name} must hold real numbers. Got complex data.")
    if not tensor.is_floating_point():
        if tensor.dtype == torch.bool:
            tensor = tensor.to(torch.float32)
        else:
            tensor = tensor.to(torch.float64)
    return tensor


def _rows_agree(n: int | None, tensor: torch.Tensor, name: str, key: str) -> int:
    """The common row count of a dict's values (``None`` before the first)."""
    if n is not None and tensor.shape[0] != n:
        raise ValueError(
            f"All values of input {name} must have the same number of rows. "
            f"Got {n} and {tensor.shape[0]} (key {key!r})."
        )
    return tensor.shape[0]


def _numpy_to_tensor(value, name: str, check_finite: bool = True) -> torch.Tensor:
    array = check_array(
        value,
        dtype=[np.float64, np.float32, np.float16],
        ensure_all_finite=check_finite,
        input_name=name,
    )
    return torch.from_numpy(np.array(array, copy=True))


def _refuse_sparse(X, name: str) -> None:
    if scipy.sparse.issparse(X):
        raise TypeError(
            f"Sparse data was passed for input {name}, but dense data is required: "
            "use X.toarray() to convert to a dense array."
        )


def fit_layout(X, name: str = "X") -> tuple[OrderedDict, torch.Tensor]:
    """Layout and flat tensor of an array-mode ``fit`` input.

    ``X`` is a 2-D array-like (numpy, torch, anything ``check_array`` takes) or
    a dict ``name -> (n_samples, *shape)`` of per-example gradients.
    """
    _refuse_sparse(X, name)
    if isinstance(X, Mapping):
        if not X:
            raise ValueError(f"Input {name} is an empty dict; expected name -> (n, *shape).")
        shapes = OrderedDict()
        blocks = []
        n = None
        for key, value in X.items():
            if not isinstance(key, str):
                raise ValueError(f"Input {name} must have str keys. Got key {key!r}.")
            tensor = _to_float_tensor(value, f"{name}[{key!r}]")
            if tensor.ndim < 1:
                raise ValueError(
                    f"Input {name}[{key!r}] must have a leading example dimension. "
                    f"Got a 0-d value."
                )
            n = _rows_agree(n, tensor, name, key)
            shapes[key] = tuple(tensor.shape[1:])
            blocks.append(tensor.reshape(tensor.shape[0], -1))
        if n == 0:
            raise ValueError(f"Input {name} has 0 samples; expected at least 1.")
        dtype = torch.promote_types(blocks[0].dtype, torch.float32)
        for b in blocks[1:]:
            dtype = torch.promote_types(dtype, b.dtype)
        flat = torch.cat([b.to(dtype) for b in blocks], dim=1)
        _finite_or_raise(flat, name)
        return shapes, flat
    if isinstance(X, torch.Tensor):
        flat = _to_float_tensor(X, name)
        if flat.ndim != 2:
            raise ValueError(
                f"Expected a 2-D array for input {name}, (n_samples, n_features). "
                f"Got a {flat.ndim}-D tensor of shape {tuple(flat.shape)} instead."
            )
        if flat.shape[0] == 0 or flat.shape[1] == 0:
            raise ValueError(
                f"Input {name} of shape {tuple(flat.shape)} is empty; "
                "expected at least 1 sample and 1 feature."
            )
        _finite_or_raise(flat, name)
    else:
        flat = _numpy_to_tensor(X, name)
    return OrderedDict([(ARRAY_KEY, (flat.shape[1],))]), flat


class FlatInput:
    """A validated flat input and what is needed to give results back in kind."""

    __slots__ = ("device", "flat", "kind")

    def __init__(self, flat: torch.Tensor, kind: str, device: torch.device):
        self.flat = flat
        self.kind = kind  # "numpy", "torch" or "dict"
        self.device = device


def flatten_input(
    vectors,
    shapes: Mapping[str, tuple],
    owner: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    name: str = "X",
    check_finite: bool = True,
) -> FlatInput:
    """Validate ``vectors`` against the fitted layout and flatten them.

    Returns the flat ``(m, n_features)`` tensor on ``device`` in ``dtype``.
    ``check_finite=False`` leaves the NaN/infinity test to the caller (who
    may test a smaller result instead, see ``BaseEstimator._apply``).
    """
    n_features = layout_size(shapes)
    _refuse_sparse(vectors, name)
    if isinstance(vectors, Mapping):
        missing = [k for k in shapes if k not in vectors]
        extra = [k for k in vectors if k not in shapes]
        if missing or extra:
            raise ValueError(
                f"The keys of input {name} must match param_shapes_ of {owner} "
                f"({list(shapes)}). Missing: {missing}; unexpected: {extra}."
            )
        blocks = []
        m = None
        for key, shape in shapes.items():
            tensor = _to_float_tensor(vectors[key], f"{name}[{key!r}]")
            if tuple(tensor.shape[1:]) != tuple(shape) or tensor.ndim != len(shape) + 1:
                raise ValueError(
                    f"Input {name}[{key!r}] must have shape (m, {', '.join(map(str, shape))}"
                    f"{',' if len(shape) == 1 else ''}) to match param_shapes_ of {owner}. "
                    f"Got shape {tuple(tensor.shape)} instead."
                )
            m = _rows_agree(m, tensor, name, key)
            blocks.append(tensor.reshape(tensor.shape[0], -1).to(device=device, dtype=dtype))
        flat = torch.cat(blocks, dim=1)
        if check_finite:
            _finite_or_raise(flat, name)
        return FlatInput(flat, "dict", device)
    if isinstance(vectors, torch.Tensor):
        kind = "torch"
        tensor = _to_float_tensor(vectors, name)
        if tensor.ndim != 2:
            raise ValueError(
                f"Expected a 2-D array for input {name}, (m, n_features) with "
                f"n_features={n_features}. Got a {tensor.ndim}-D tensor of shape "
                f"{tuple(tensor.shape)} instead."
            )
        if check_finite:
            _finite_or_raise(tensor, name)
    else:
        kind = "numpy"
        tensor = _numpy_to_tensor(vectors, name, check_finite)
    if tensor.shape[1] != n_features:
        raise ValueError(
            f"{name} has {tensor.shape[1]} features, but {owner} is expecting "
            f"{n_features} features as input."
        )
    return FlatInput(tensor.to(device=device, dtype=dtype), kind, device)


def unflatten_output(flat: torch.Tensor, kind: str, shapes: Mapping[str, tuple] | None):
    """Give a flat result back as ``kind``; ``shapes`` splits it for dict input.

    ``shapes=None`` keeps dict input's result flat (projectors: torch out).
    """
    if kind == "numpy":
        if flat.dtype == torch.bfloat16:
            # numpy has no bfloat16: give float32, the narrowest exact superset.
            flat = flat.float()
        return flat.detach().cpu().numpy()
    if kind == "dict" and shapes is not None:
        return split(flat, shapes)
    return flat


def offsets(shapes: Mapping[str, tuple]) -> OrderedDict:
    """``name -> (start, stop)``: each block's columns in a flat vector of the layout."""
    out, start = OrderedDict(), 0
    for key, shape in shapes.items():
        out[key] = (start, start + math.prod(shape))
        start += math.prod(shape)
    return out


def split(flat: torch.Tensor, shapes: Mapping[str, tuple]) -> OrderedDict:
    """Split ``(m, n_features)`` into a dict ``name -> (m, *shape)`` (views)."""
    return OrderedDict(
        (key, flat[:, s:e].reshape(flat.shape[0], *shapes[key]))
        for key, (s, e) in offsets(shapes).items()
    )


def flatten_dict(tensors: Mapping[str, torch.Tensor], order) -> torch.Tensor:
    """Concatenate ``name -> (m, *shape)`` flattened, in the order of the keys of ``order``.

    ``order`` is a layout (``param_shapes_``), a list of names, or ``tensors``
    itself; no validation: internal use.
    """
    return torch.cat([tensors[k].reshape(tensors[k].shape[0], -1) for k in order], dim=1)
