"""Safe persistence of estimators: ``ak.save(estimator, path)`` and ``ak.load(path)``.

A saved estimator is one `safetensors <https://huggingface.co/docs/safetensors>`_
file: its tensors are the file's tensors, and the file's text metadata holds
two entries,

* ``"attribkit"``: a JSON document with the format name and version, the
  versions that wrote it, the estimator's class (its module and qualified name)
  and its state: the attributes pickle would store (``_persist_state``), in a
  small type-tagged JSON encoding whose tensors refer to the file's tensors by
  name;
* ``"sha256"``: the SHA-256 of the whole content, that JSON document and every
  tensor (name, dtype, shape and bytes, in name order).

Loading parses JSON and reads tensors with safetensors; it never unpickles and
never imports anything, so a file from someone else cannot run code: the class
must be an :class:`~attribkit.BaseEstimator` subclass already defined in the
process (attribkit's own, or a user's subclass whose module was imported). A
file whose content does not match its checksum, or that is not such a file,
raises ``ValueError`` naming the path and what failed. (The checksum detects
corruption, not forgery: someone who edits the file can recompute it; what such
a file can do is limited to the plain data it holds.)

Plain data means: ``None``, ``bool``, ``int``, ``float`` (infinities and NaN
included), ``str``, lists, tuples, dicts and ``OrderedDict`` (any of these as
keys), ``frozenset``/``set``, torch tensors (saved detached, on the CPU),
numpy arrays of numbers (as tensors) or of strings, numpy scalars,
``torch.dtype``, ``torch.device``, :class:`~attribkit.ComputeConfig` and nested
attribkit estimators. Anything else (a callable ``loss``, a model, a data
loader) raises ``TypeError`` at ``save`` naming the attribute: a safe file
holds no code and no reference to live objects.

**Estimators holding more than plain data** override the hook pair of
:class:`~attribkit.BaseEstimator`:

* ``_persist_state(self) -> dict``: the attributes to write (default: what
  pickle stores, ``__getstate__``: every attribute but the ``_transient``
  caches, tensors detached on the CPU);
* ``_restore_state(self, state)``: set them on a new instance made without
  ``__init__`` (default: ``__setstate__``, as unpickling does: the transient
  caches are rebuilt and the state moves to ``config.device`` when that device
  is available, else stays on the CPU).

An estimator that keeps a model and data by reference (as an iterative solver
does) returns its state without them from ``_persist_state`` and says, in its
docstring and in what ``_restore_state`` leaves (e.g. an attribute naming what
must be attached again), that a saved file keeps only its fitted values.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections import OrderedDict

import numpy as np
import torch

from .base import BaseEstimator
from .config import _DEVICE_RE, ComputeConfig

__all__ = ["load", "save"]

FORMAT = "attribkit.estimator"
VERSION = 1
_KEYS = {"attribkit", "sha256"}
_CONFIG_FIELDS = ("device", "dtype", "batch_size", "progress", "memory_budget", "distributed")
_TENSOR_NAME = re.compile(r"^t[0-9]+$")


# --------------------------------------------------------------------------- encoding
class _Encoder:
    """Plain data -> JSON-able values; storages are collected under names ``t0, t1, ...``."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}  # name -> a whole storage, 1-D
        self._storages: dict[tuple, str] = {}  # (data pointer, bytes) -> name

    def tensor(self, t: torch.Tensor) -> dict:
        """A tensor as a view of a stored storage: its bytes, offset, shape and strides.

        Strides are kept as pickle keeps them (an eigenvector matrix from
        ``eigh`` is column-major), because a matmul on another memory layout may
        round differently, and ``load`` must give bit-identical results. Tensors
        that share a storage store it once.
        """
        t = t.detach().cpu()
        storage = t.untyped_storage()
        item = t.element_size()
        key = (storage.data_ptr(), storage.nbytes())
        name = self._storages.get(key) if storage.nbytes() else None
        if name is not None and self.tensors[name].dtype != t.dtype:
            t, storage = t.clone(), None  # one storage seen as two dtypes: keep its own copy
        if name is None or storage is None:
            storage = t.untyped_storage()
            if storage.nbytes() % item:  # pragma: no cover - not made by torch ops
                t = t.clone()
                storage = t.untyped_storage()
            base = torch.empty(0, dtype=t.dtype).set_(storage, 0, (storage.nbytes() // item,))
            name = f"t{len(self.tensors)}"
            self.tensors[name] = base
            if storage.nbytes():
                self._storages[(storage.data_ptr(), storage.nbytes())] = name
        return {
            "storage": name,
            "offset": t.storage_offset(),
            "shape": list(t.shape),
            "stride": list(t.stride()),
        }

    def encode(self, value, where: str):
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, np.generic):
            if value.dtype.kind not in "biuf":
                raise _unsupported(value, where)
            return {"$npscalar": value.dtype.name, "value": value.item()}
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            if math.isfinite(value):
                return float(value)
            return {"$float": repr(float(value))}  # 'nan', 'inf', '-inf'
        if isinstance(value, torch.Tensor):
            return {"$tensor": self.tensor(value)}
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "biuf":
                return {"$ndarray": self.tensor(torch.from_numpy(np.ascontiguousarray(value)))}
            if value.dtype.kind in "UO" and all(isinstance(v, str) for v in value.flat):
                return {
                    "$str_array": [str(v) for v in value.flat],
                    "shape": list(value.shape),
                    "object": value.dtype.kind == "O",
                }
            raise _unsupported(value, where)
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if isinstance(value, ComputeConfig):
            return {"$config": {f: self.encode(getattr(value, f), where) for f in _CONFIG_FIELDS}}
        if isinstance(value, BaseEstimator):
            return {"$estimator": self.estimator(value, where)}
        if isinstance(value, OrderedDict):
            return {"$odict": self._items(value, where)}
        if type(value) is dict:
            return {"$dict": self._items(value, where)}
        if type(value) is list:
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if type(value) is tuple:
            return {"$tuple": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if type(value) in (set, frozenset):
            items = [self.encode(v, f"{where} element") for v in value]
            items.sort(key=lambda v: json.dumps(v, sort_keys=True))  # a stable file
            return {"$set" if type(value) is set else "$frozenset": items}
        raise _unsupported(value, where)

    def _items(self, mapping, where: str) -> list:
        return [
            [self.encode(k, f"{where} key"), self.encode(v, f"{where}[{k!r}]")]
            for k, v in mapping.items()
        ]

    def estimator(self, est: BaseEstimator, where: str) -> dict:
        state = est._persist_state()
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise TypeError(
                f"{type(est).__name__}._persist_state must return a dict of attribute names "
                f"to values. Got {type(state).__name__}."
            )
        prefix = f"{where}." if where else ""
        return {
            "class": _class_name(type(est)),
            "state": {k: self.encode(v, f"{prefix}{k}") for k, v in state.items()},
        }


def _unsupported(value, where: str) -> TypeError:
    if where.rsplit(".", 1)[-1] == "loss":
        hint = (
            "A custom loss is code: save an estimator with a built-in loss name, or pickle "
            "it (and load such pickles only from trusted sources)."
        )
    else:
        hint = (
            "An estimator that holds such an object overrides _persist_state and "
            "_restore_state to say what a file keeps (see attribkit.persistence)."
        )
    return TypeError(
        f"ak.save cannot store {where} = {_short(value)} (of type {type(value).__name__}): a "
        "saved estimator holds plain data only (numbers, strings, containers, tensors, "
        "arrays; see attribkit.persistence), never code or live objects such as a function, "
        f"a model or a data loader. {hint}"
    )


def _short(value) -> str:
    if callable(value) and hasattr(value, "__qualname__"):
        return f"<{type(value).__name__} {value.__qualname__}>"
    text = repr(value).splitlines()[0] if repr(value) else ""
    return text if len(text) <= 60 else text[:57] + "..."


def _class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------- checksum
def _digest(document: str, tensors: dict) -> str:
    """SHA-256 of the JSON document and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(b"attribkit.save\0")
    h.update(document.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype!s}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# --------------------------------------------------------------------------- save
def save(estimator, path) -> None:
    """Save an estimator to one safetensors file, without pickle.

    Parameters
    ----------
    estimator : attribkit estimator
        Fitted or not, with any config. Its parameters and fitted state must
        be plain data (a callable ``loss`` is not: ``TypeError`` names it).
    path : str or os.PathLike
        The file to write (``.safetensors`` is the usual suffix). It is
        written to a temporary file in the same folder and then renamed, so an
        interrupted save never leaves a partial file at ``path``.

    Notes
    -----
    The file is one `safetensors <https://huggingface.co/docs/safetensors>`_
    file: the estimator's tensors are its tensors (detached, on the CPU), and
    its text metadata holds a JSON document (the format name and version, the
    versions of attribkit and torch that wrote it, the estimator's class and
    its parameters, layout and other fitted values, with tensors referred to
    by name) and a SHA-256 checksum of the whole content, which :func:`load`
    verifies. Transient caches (a projection matrix, scales) are not saved;
    they are rebuilt on first use after :func:`load`, as after unpickling.

    Plain data means ``None``, ``bool``, ``int``, ``float`` (infinities and
    NaN included), ``str``, lists, tuples, dicts and ``OrderedDict``,
    ``frozenset``/``set``, torch tensors, numpy arrays of numbers or strings,
    numpy scalars, ``torch.dtype``, ``torch.device``,
    :class:`~attribkit.ComputeConfig` and nested attribkit estimators (a
    fitted preconditioner). A saved :class:`~attribkit.IterativeIFVP` fitted
    on a model keeps its fitted values but not the model and data it holds
    by reference: after :func:`load`, give them back with
    :meth:`~attribkit.IterativeIFVP.attach`.

    Examples
    --------
    >>> import os, tempfile, torch, attribkit as ak
    >>> G = torch.randn(20, 5, dtype=torch.float64)
    >>> ifvp = ak.ExplicitIFVP(damping=0.1).fit(G)
    >>> path = os.path.join(tempfile.mkdtemp(), "ifvp.safetensors")
    >>> ak.save(ifvp, path)
    >>> loaded = ak.load(path)
    >>> torch.equal(loaded.transform(G), ifvp.transform(G))
    True
    """
    from safetensors.torch import save_file

    if not isinstance(estimator, BaseEstimator):
        raise TypeError(
            "The 'estimator' argument of save must be an attribkit estimator (a BaseEstimator). "
            f"Got {type(estimator).__name__} instead."
        )
    path = os.fspath(path)
    enc = _Encoder()
    content = {
        "format": FORMAT,
        "version": VERSION,
        "attribkit": _version(),
        "torch": torch.__version__,
        "estimator": enc.estimator(estimator, ""),
    }
    document = json.dumps(content, allow_nan=False, separators=(",", ":"))
    metadata = {"attribkit": document, "sha256": _digest(document, enc.tensors)}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".attribkit-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(enc.tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------- load
class _Corrupt(ValueError):
    """A problem with the file's content (re-raised naming the path)."""


def load(path):
    """Load an estimator saved by :func:`save`; never unpickles.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save`.

    Returns
    -------
    estimator
        A new estimator of the saved class with the same parameters
        (``get_params``) and fitted state: ``transform`` gives bit-identical
        results. Its state is on ``config.device`` when that device is
        available here, else on the CPU (as after unpickling).

    Raises
    ------
    ValueError
        When the file is not one :func:`save` wrote, is corrupted (its content
        does not match its SHA-256 checksum: every single-bit change of a saved
        file is caught), names a class that is not an attribkit estimator
        defined in this process, or holds malformed values. The message names
        the path and what failed.
    OSError
        When the file cannot be read (missing, a folder, no permission).

    Notes
    -----
    Loading parses JSON and reads tensors with safetensors; it never
    unpickles and never imports anything, so a file from someone else cannot
    run code: the saved class must be a :class:`~attribkit.BaseEstimator`
    subclass already defined in this process (attribkit's own, or a user's
    subclass whose module was imported). The checksum detects corruption,
    not forgery: whoever edits a file can recompute it, but what such a file
    can do is limited to the plain data it holds. Pickle and joblib also
    round-trip estimators; load only trusted files with them.

    Examples
    --------
    >>> import os, tempfile, torch, attribkit as ak
    >>> proj = ak.RandomProjector(proj_dim=8).fit(torch.randn(4, 100))
    >>> path = os.path.join(tempfile.mkdtemp(), "proj.safetensors")
    >>> ak.save(proj, path)
    >>> ak.load(path).get_params() == proj.get_params()
    True
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:  # OSError (missing, a folder, no permission) as is
        fh.read(0)
    try:
        return _load(path)
    except _Corrupt as exc:
        raise ValueError(f"ak.load cannot load {path!r}: {exc}") from None


def _load(path: str):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            metadata = fh.metadata()
            # Copied into fresh torch allocations: safetensors places tensors at
            # 8-byte offsets, and BLAS may round differently on memory of other
            # alignment, while load must give bit-identical transforms.
            tensors = {name: fh.get_tensor(name).clone() for name in fh.keys()}
    except Exception as exc:  # safetensors' own errors: header, offsets, sizes
        raise _Corrupt(
            f"it is not a readable safetensors file ({type(exc).__name__}: {exc}); it is "
            "truncated, corrupted or was not written by ak.save."
        ) from None
    if not isinstance(metadata, dict) or set(metadata) != _KEYS:
        keys = sorted(metadata) if isinstance(metadata, dict) else None
        raise _Corrupt(
            f"its metadata has the keys {keys}, not {sorted(_KEYS)}: it is corrupted or was "
            "not written by ak.save."
        )
    document = metadata["attribkit"]
    if _digest(document, tensors) != metadata["sha256"]:
        raise _Corrupt(
            "its content does not match the SHA-256 checksum stored when it was saved: the "
            "file is corrupted (or was changed after saving)."
        )
    try:
        content = json.loads(document)
    except ValueError as exc:
        raise _Corrupt(f"its JSON document is malformed ({exc}).") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise _Corrupt(f"it is not an attribkit estimator file (format {FORMAT!r} expected).")
    if content.get("version") != VERSION:
        raise _Corrupt(
            f"it has format version {content.get('version')!r}; this attribkit "
            f"({_version()}) reads version {VERSION}. Load it with the attribkit version that "
            f"wrote it ({content.get('attribkit')!r})."
        )
    dec = _Decoder(tensors)
    try:
        est = dec.estimator(content.get("estimator"))
    except _Corrupt:
        raise
    except Exception as exc:  # a malformed state met the class's own code
        raise _Corrupt(
            f"its estimator could not be rebuilt ({type(exc).__name__}: {exc})."
        ) from None
    unused = set(tensors) - dec.used
    if unused:
        raise _Corrupt(f"it holds tensors no attribute refers to: {sorted(unused)}.")
    return est


def _estimator_classes() -> dict:
    """``module.qualname -> class`` of every BaseEstimator subclass defined now."""
    found, todo = {}, [BaseEstimator]
    while todo:
        cls = todo.pop()
        name = _class_name(cls)
        if found.get(name, cls) is not cls:
            found[name] = None  # two live classes of that name: ambiguous
        else:
            found[name] = cls
        todo.extend(cls.__subclasses__())
    return found


class _Decoder:
    """The inverse of :class:`_Encoder`; refuses anything it does not know."""

    def __init__(self, tensors: dict):
        self.tensors = tensors
        self.used: set[str] = set()

    def tensor(self, body) -> torch.Tensor:
        if not isinstance(body, dict) or set(body) != {"storage", "offset", "shape", "stride"}:
            raise _Corrupt(f"it holds a malformed tensor entry {_short(body)}.")
        name = body["storage"]
        if not isinstance(name, str) or name not in self.tensors:
            raise _Corrupt(f"it refers to a tensor {name!r} it does not hold.")
        numbers = [body["offset"], *body["shape"], *body["stride"]]
        if len(body["shape"]) != len(body["stride"]) or not all(
            type(v) is int and v >= 0 for v in numbers
        ):
            raise _Corrupt(f"it holds a malformed tensor entry {_short(body)}.")
        self.used.add(name)
        # as_strided checks the view lies within the stored storage.
        return torch.as_strided(self.tensors[name], body["shape"], body["stride"], body["offset"])

    def decode(self, value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        if not isinstance(value, dict) or len(value) < 1:
            raise _Corrupt(f"it holds an unknown value {_short(value)}.")
        tag = next(iter(value))
        body = value[tag]
        if tag == "$tensor":
            return self.tensor(body)
        if tag == "$ndarray":
            return self.tensor(body).numpy()
        if tag == "$float":
            if body not in ("nan", "inf", "-inf"):
                raise _Corrupt(f"it holds a malformed float {body!r}.")
            return float(body)
        if tag == "$npscalar":
            dtype = np.dtype(body)
            if dtype.kind not in "biuf":
                raise _Corrupt(f"it holds a numpy scalar of dtype {body!r}.")
            return dtype.type(value["value"])
        if tag == "$str_array":
            shape = tuple(int(d) for d in value["shape"])
            kind = object if value["object"] else str
            return np.array([str(v) for v in body], dtype=kind).reshape(shape)
        if tag == "$dtype":
            dtype = getattr(torch, str(body), None)
            if not isinstance(dtype, torch.dtype):
                raise _Corrupt(f"it holds an unknown torch dtype {body!r}.")
            return dtype
        if tag == "$device":
            return torch.device(str(body))
        if tag == "$config":
            if not isinstance(body, dict):
                raise _Corrupt(f"it holds a malformed ComputeConfig {_short(body)}.")
            return _config({str(k): self.decode(v) for k, v in body.items()})
        if tag == "$estimator":
            return self.estimator(body)
        if tag == "$odict":
            return OrderedDict(self._items(body))
        if tag == "$dict":
            return dict(self._items(body))
        if tag == "$tuple":
            return tuple(self.decode(v) for v in body)
        if tag in ("$set", "$frozenset"):
            items = [self.decode(v) for v in body]
            return set(items) if tag == "$set" else frozenset(items)
        raise _Corrupt(f"it holds a value of unknown type {tag!r}.")

    def _items(self, body) -> list:
        return [(self.decode(k), self.decode(v)) for k, v in body]

    def estimator(self, body):
        if not isinstance(body, dict) or not isinstance(body.get("state"), dict):
            raise _Corrupt("its estimator entry is malformed.")
        name = body.get("class")
        cls = _estimator_classes().get(name) if isinstance(name, str) else None
        if cls is None:
            raise _Corrupt(
                f"it holds an estimator of class {name!r}, which is not an attribkit "
                "estimator class defined in this process (ak.load never imports: import the "
                "module that defines a custom estimator first)."
            )
        state = {str(k): self.decode(v) for k, v in body["state"].items()}
        est = object.__new__(cls)
        est._restore_state(state)
        return est


def _config(fields) -> ComputeConfig:
    """A ComputeConfig validated field by field; its device need not exist here."""
    if not isinstance(fields, dict) or not set(fields) <= set(_CONFIG_FIELDS):
        raise _Corrupt(f"it holds a malformed ComputeConfig {_short(fields)}.")
    device = fields.get("device", "cpu")
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise _Corrupt(f"it holds a ComputeConfig with device {device!r}.")
    config = ComputeConfig(**{**fields, "device": "cpu"})  # validates the other fields
    # As unpickling does: a CUDA config loads on a machine without CUDA (the
    # state then stays on the CPU; BaseEstimator.__setstate__).
    object.__setattr__(config, "device", device)
    return config
