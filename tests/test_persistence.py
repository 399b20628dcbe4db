"""ak.save / ak.load (API section 9): safetensors + JSON + a checksum, never pickle.

Every estimator, fitted (array and model mode) or not, with several configs,
comes back with the same parameters, the same state as pickle keeps and
bit-identical transforms; every single-bit change of a saved file raises.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
from cases import classification_data, mlp
from sklearn.exceptions import NotFittedError

import attribkit as ak

F64 = ak.ComputeConfig(dtype="float64")
CONFIGS = {
    "default": None,
    "float64": F64,
    # a budget of a few KiB: RandomProjector streams, influence/fits work in blocks
    "float32-tiny-budget": ak.ComputeConfig(
        memory_budget=4096, batch_size=5, progress=False, distributed=False
    ),
    "bfloat16-auto": ak.ComputeConfig(device="auto", dtype="bfloat16", batch_size=3),
}

#: name -> factory(config); "model" marks estimators that fit only on a model.
ESTIMATORS = {
    "RandomProjector": lambda c: ak.RandomProjector(proj_dim=6, seed=3, config=c),
    "RandomProjector-normal": lambda c: ak.RandomProjector(6, proj_type="normal", config=c),
    "RandomProjector-sjlt": lambda c: ak.RandomProjector(
        6, proj_type="sjlt", sparsity=2, config=c
    ),
    "KroneckerProjector": lambda c: ak.KroneckerProjector(in_dim=3, out_dim=2, config=c),
    "ArnoldiProjector": lambda c: ak.ArnoldiProjector(proj_dim=4, damping=1.0, config=c),
    "ExplicitIFVP": lambda c: ak.ExplicitIFVP(damping=0.1, config=c),
    "ExplicitIFVP-woodbury-auto": lambda c: ak.ExplicitIFVP(
        damping="auto", solver="woodbury", config=c
    ),
    "DataInfIFVP": lambda c: ak.DataInfIFVP(config=c),
    "EKFACIFVP": lambda c: ak.EKFACIFVP(damping=0.1, fisher="true", config=c),
}
MODEL_ONLY = {"KroneckerProjector", "EKFACIFVP"}
METHODS = ("transform", "inverse_transform", "ihvp")


def gradients(n=20, p=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64)


def fitted(name, config, mode):
    """The estimator (fitted in ``mode``) and vectors for its transform."""
    est = ESTIMATORS[name](config)
    if mode == "unfitted":
        return est, None
    if mode == "array":
        G = gradients()
        return est.fit(G), G[:5]
    torch.manual_seed(0)  # fisher="true" samples targets
    model, data = mlp(), classification_data()
    est.fit(model, data)
    return est, ak.per_example_gradients(model, (data[0][:5], data[1][:5]), config=F64)


def _cases():
    for name in ESTIMATORS:
        for mode in ("unfitted", "array", "model"):
            if mode == "array" and name in MODEL_ONLY:
                continue
            for config in CONFIGS:
                yield name, mode, config


def assert_same_state(a, b, where="state"):
    """Equal values of identical types; tensors with equal dtype, shape, strides, bits."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), where
        assert a.device == b.device and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


@pytest.mark.parametrize("name, mode, config", list(_cases()))
def test_round_trip_is_exact(name, mode, config, tmp_path):
    est, V = fitted(name, CONFIGS[config], mode)
    path = tmp_path / "est.safetensors"
    ak.save(est, path)
    loaded = ak.load(path)
    assert type(loaded) is type(est)
    assert loaded.get_params() == est.get_params()
    # The state pickle keeps, value for value (types, dtypes, strides, bits).
    assert_same_state(loaded.__getstate__(), est.__getstate__())
    if mode == "unfitted":
        with pytest.raises(NotFittedError):
            loaded.transform(gradients(2))
        return
    for method in METHODS:
        if hasattr(est, method):
            got, want = getattr(loaded, method)(V), getattr(est, method)(V)
            if isinstance(want, dict):
                assert list(got) == list(want)
                assert all(torch.equal(got[k], want[k]) for k in want)
            else:
                assert torch.equal(got, want), method
    if est._is_ifvp:
        assert torch.equal(ak.influence(loaded, V, V[:2]), ak.influence(est, V, V[:2]))


def test_save_writes_safetensors_with_json_metadata_and_a_checksum(tmp_path):
    from safetensors import safe_open

    est, _ = fitted("EKFACIFVP", F64, "model")
    ak.save(est, tmp_path / "e.safetensors")
    with safe_open(tmp_path / "e.safetensors", framework="pt") as fh:
        meta = fh.metadata()
        names = list(fh.keys())
    assert set(meta) == {"attribkit", "sha256"} and len(meta["sha256"]) == 64
    doc = json.loads(meta["attribkit"])
    assert doc["format"] == "attribkit.estimator" and doc["version"] == 1
    assert doc["estimator"]["class"] == "attribkit.ifvp.ekfac.EKFACIFVP"
    assert doc["estimator"]["state"]["damping"] == 0.1
    # 5 fitted tensors per covered layer, 2 layers: each its own storage.
    assert len(names) == 10


# ----------------------------------------------------------------- corruption
def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize(
    "name, mode",
    [("EKFACIFVP", "model"), ("ExplicitIFVP", "array"), ("RandomProjector", "unfitted")],
)
def test_every_single_bit_flip_raises(name, mode, tmp_path):
    est, _ = fitted(name, F64, mode)
    path = tmp_path / "est.safetensors"
    ak.save(est, path)
    data = path.read_bytes()
    rng = random.Random(0)
    # 400 seeded positions over the whole file, plus every bit of the 8-byte
    # header length and of the first 64 bytes of the header.
    bits = sorted(set(rng.sample(range(8 * len(data)), 400)) | set(range(8 * 72)))
    corrupted = tmp_path / "corrupted.safetensors"
    for bit in bits:
        corrupted.write_bytes(_flip(data, bit))
        with pytest.raises(ValueError, match=r"ak\.load cannot load .*corrupted\.safetensors"):
            ak.load(corrupted)
    corrupted.write_bytes(data)
    ak.load(corrupted)  # the untouched bytes load


def test_truncated_foreign_and_missing_files(tmp_path):
    est, _ = fitted("ExplicitIFVP", F64, "array")
    path = tmp_path / "est.safetensors"
    ak.save(est, path)
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for content in (data[:-1], data[: len(data) // 2], data[:7], b"", data + b"\0"):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="bad.safetensors"):
            ak.load(bad)
    bad.write_bytes(pickle.dumps(est))  # a pickle is not loaded, whatever its name
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ak.load(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, bad, metadata={"format": "pt"})  # someone else's file
    with pytest.raises(ValueError, match="metadata has the keys"):
        ak.load(bad)
    with pytest.raises(FileNotFoundError):
        ak.load(tmp_path / "missing.safetensors")


def _rewrite(path, edit):
    """Rewrite a saved file's JSON with ``edit`` and a matching checksum (a forgery)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from attribkit.persistence import _digest

    with safe_open(path, framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    doc = json.loads(meta["attribkit"])
    edit(doc)
    text = json.dumps(doc)
    save_file(tensors, path, metadata={"attribkit": text, "sha256": _digest(text, tensors)})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["estimator"].update({"class": "os.system"}), "not an attribkit estimator"),
        (lambda d: d["estimator"].update({"class": "pickle.Unpickler"}), "never imports"),
        (lambda d: d["estimator"]["state"].update({"x": {"$pickle": "gASV"}}), "unknown type"),
        (lambda d: d["estimator"]["state"].update({"x": {"$dtype": "manual_seed"}}), "dtype"),
        (lambda d: d.update({"version": 99}), "format version 99"),
        (lambda d: d.update({"format": "pickle"}), "not an attribkit estimator file"),
    ],
)
def test_load_never_runs_what_a_file_names(edit, message, tmp_path, monkeypatch):
    est, _ = fitted("ExplicitIFVP", F64, "array")
    path = tmp_path / "est.safetensors"
    ak.save(est, path)
    _rewrite(path, edit)

    def refuse(*args, **kwargs):
        raise AssertionError("ak.load unpickled")

    for target, attr in (
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ):
        monkeypatch.setattr(target, attr, refuse)
    with pytest.raises(ValueError, match=message):
        ak.load(path)


def test_a_tensor_view_outside_its_storage_is_refused(tmp_path):
    est, _ = fitted("ExplicitIFVP", F64, "array")
    path = tmp_path / "est.safetensors"
    ak.save(est, path)
    _rewrite(path, lambda d: d["estimator"]["state"]["cholesky_"]["$tensor"].update(offset=10**6))
    with pytest.raises(ValueError, match="could not be rebuilt.*out of bounds"):
        ak.load(path)


# ----------------------------------------------------------------- what a file holds
def test_code_and_live_objects_are_refused_naming_the_attribute(tmp_path):
    def my_loss(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")

    path = tmp_path / "est.safetensors"
    with pytest.raises(
        TypeError, match=r"cannot store loss = <function .*my_loss> .*plain data.*built-in loss"
    ):
        ak.save(ak.EKFACIFVP(loss=my_loss), path)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary left
    good, _ = fitted("ExplicitIFVP", F64, "array")
    ak.save(good, path)
    est, _ = fitted("ExplicitIFVP", F64, "array")
    est.extra_ = {"model": torch.nn.Linear(2, 2)}
    with pytest.raises(TypeError, match=r"extra_\['model'\] = Linear"):
        ak.save(est, path)
    assert os.listdir(tmp_path) == ["est.safetensors"]  # the earlier file is intact
    assert ak.load(path).get_params() == good.get_params()
    with pytest.raises(TypeError, match="must be an attribkit estimator"):
        ak.save(torch.nn.Linear(2, 2), path)


def test_plain_values_keep_their_types(tmp_path):
    est, _ = fitted("ExplicitIFVP", F64, "array")
    est.extra_ = OrderedDict(
        [
            ("floats", [1.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-310]),
            ("ints", (0, -(2**70), True, None)),
            (3, {("a", 1): frozenset({"x", "y"}), 2.5: {1, 2}}),
            ("numpy", [np.float32(1.5), np.int64(-3), np.bool_(True)]),
            ("arrays", (np.arange(6, dtype=np.int16).reshape(2, 3), np.array(["a", "bc"]))),
            ("names", np.array(["w[0]", "w[1]"], dtype=object)),  # as feature_names_in_
            (
                "torch",
                (torch.float16, torch.device("cpu"), torch.ones(2, 3, dtype=torch.bfloat16)),
            ),
            ("views", [est.cholesky_[1:3, ::2], est.cholesky_.mT, torch.zeros(0, 4)]),
            ("config", ak.ComputeConfig(device="auto", dtype="float16", distributed=True)),
        ]
    )
    ak.save(est, tmp_path / "e.safetensors")
    loaded = ak.load(tmp_path / "e.safetensors")
    assert_same_state(loaded.extra_, est.extra_, "extra_")
    views = loaded.extra_["views"]  # views of one storage share it again, as after pickle
    assert views[1].untyped_storage().data_ptr() == loaded.cholesky_.untyped_storage().data_ptr()


def test_a_config_for_a_missing_device_loads_on_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    est, V = fitted("ExplicitIFVP", F64, "array")
    # What a GPU machine's fit pickles: a CUDA config, the state on the CPU.
    cuda = ak.ComputeConfig(dtype="float64")
    object.__setattr__(cuda, "device", "cuda")
    est._config = cuda
    ak.save(est, tmp_path / "e.safetensors")
    loaded = ak.load(tmp_path / "e.safetensors")
    assert loaded._config.device == "cuda" and loaded._device == torch.device("cpu")
    assert torch.equal(loaded.transform(V), pickle.loads(pickle.dumps(est)).transform(V))


class _HoldsAModel(ak.ExplicitIFVP):
    """Keeps the model it was fitted on by reference (as an iterative solver would)."""

    def _fit_model(self, model, data, config):
        super()._fit_model(model, data, config)
        self.model_ = model


class _SavesWithoutTheModel(_HoldsAModel):
    """A saved file keeps the fitted values; the model is attached again after load."""

    def _persist_state(self):
        state = super()._persist_state()
        state["model_"] = None
        state["model_class_"] = type(self.model_).__name__
        return state


def test_the_hook_decides_what_a_file_keeps(tmp_path):
    model, data = mlp(), classification_data()
    held = _HoldsAModel(damping=0.1, config=F64).fit(model, data)
    with pytest.raises(TypeError, match=r"model_ = Sequential\(.*overrides _persist_state"):
        ak.save(held, tmp_path / "e.safetensors")
    est = _SavesWithoutTheModel(damping=0.1, config=F64).fit(model, data)
    ak.save(est, tmp_path / "e.safetensors")
    loaded = ak.load(tmp_path / "e.safetensors")
    assert type(loaded) is _SavesWithoutTheModel
    assert loaded.model_ is None and loaded.model_class_ == "Sequential"
    V = gradients(3, est.n_features_in_)
    assert torch.equal(loaded.transform(V), est.transform(V))


class _Nested(ak.ExplicitIFVP):
    """An estimator holding a fitted estimator (a preconditioner, say)."""

    def _fit_model(self, model, data, config):
        self.inner_ = ak.EKFACIFVP(damping=0.1, config=config).fit(model, data)
        super()._fit_model(model, data, config)


def test_nested_estimators_round_trip(tmp_path):
    est = _Nested(damping=0.1, config=F64).fit(mlp(), classification_data())
    ak.save(est, tmp_path / "e.safetensors")
    loaded = ak.load(tmp_path / "e.safetensors")
    assert type(loaded.inner_) is ak.EKFACIFVP
    V = gradients(3, est.n_features_in_)
    assert torch.equal(loaded.inner_.transform(V), est.inner_.transform(V))
    assert torch.equal(loaded.transform(V), est.transform(V))
