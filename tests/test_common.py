"""The contract every estimator shares (``attribkit.BaseEstimator``'s docstring).

One file runs every estimator through the same checks: scikit-learn's own
estimator checks in array mode, get_params/clone, NotFittedError, pickling,
dict/flat equivalence, container and dtype rules, atomic fit and the errors
for bad input.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict

import joblib
import numpy as np
import pytest
import sklearn
import torch
from cases import classification_data, mlp
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

import attribkit as ak
from attribkit._compute import vectors

F64 = ak.ComputeConfig(dtype="float64")

#: name -> factory of a small instance (fits p = 7 features or the test MLP).
FACTORIES = {
    "RandomProjector": lambda config=None: ak.RandomProjector(proj_dim=6, config=config),
    "RandomProjector-normal": lambda config=None: ak.RandomProjector(
        proj_dim=6, proj_type="normal", config=config
    ),
    "RandomProjector-sjlt": lambda config=None: ak.RandomProjector(
        proj_dim=6, proj_type="sjlt", sparsity=2, config=config
    ),
    "ExplicitIFVP": lambda config=None: ak.ExplicitIFVP(damping=0.1, config=config),
    "ExplicitIFVP-woodbury": lambda config=None: ak.ExplicitIFVP(
        damping=0.1, solver="woodbury", config=config
    ),
    "ExplicitIFVP-auto": lambda config=None: ak.ExplicitIFVP(damping="auto", config=config),
    "DataInfIFVP": lambda config=None: ak.DataInfIFVP(config=config),
    "IterativeIFVP": lambda config=None: ak.IterativeIFVP(damping=0.1, tol=1e-10, config=config),
    # A nested estimator: get_params(deep=True) has preconditioner__damping etc.
    "IterativeIFVP-preconditioned": lambda config=None: ak.IterativeIFVP(
        damping=0.1, tol=1e-10, preconditioner=ak.DataInfIFVP(damping=0.5), config=config
    ),
    # damping=1 makes the test MLP's indefinite Hessian (eigenvalues >= -0.59)
    # positive definite, so model mode keeps all proj_dim directions too.
    "ArnoldiProjector": lambda config=None: ak.ArnoldiProjector(
        proj_dim=6, damping=1.0, config=config
    ),
}
IFVPS = {
    "ExplicitIFVP",
    "ExplicitIFVP-woodbury",
    "ExplicitIFVP-auto",
    "DataInfIFVP",
    "IterativeIFVP",
    "IterativeIFVP-preconditioned",
}
NAMES = list(FACTORIES)


def make(name, config=None):
    return FACTORIES[name](config)


def gradients(n=20, p=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64)


def dict_gradients(n=20, seed=0):
    G = gradients(n, 7, seed)
    return OrderedDict([("a", G[:, :6].reshape(n, 3, 2)), ("b", G[:, 6:])]), G


def same(a, b, rtol=None):
    """Equal to rounding: default 1e-12 for float64, 1e-6 if either is float32; 0 = exact."""
    if rtol is None:
        low = {torch.as_tensor(a).dtype, torch.as_tensor(b).dtype} - {torch.float64}
        rtol = 1e-6 if low else 1e-12
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max().clamp_min(1)))


# ----------------------------------------------------------------- scikit-learn checks
#: Checks that cannot pass by design, with the reason.
EXPECTED_FAILED = {
    "check_fit_score_takes_y": (
        "attribkit's fit takes (model, data): in array mode `data` stands for sklearn's y"
    ),
}

#: scikit-learn expects an estimator with ``max_iter`` to set ``n_iter_`` in fit.
ITERATES_IN_TRANSFORM = {
    "check_transformer_n_iter": (
        "IterativeIFVP iterates in transform, per row (solve() returns info['n_iter']); "
        "fit runs no iteration, so there is no n_iter_"
    ),
}


@parametrize_with_checks(
    # and the defaults: RandomProjector's proj_dim=512, ArnoldiProjector's and
    # IterativeIFVP's damping=0
    [*(make(n) for n in NAMES), ak.RandomProjector(), ak.ArnoldiProjector(), ak.IterativeIFVP()],
    expected_failed_checks=lambda est: {
        **EXPECTED_FAILED,
        **(ITERATES_IN_TRANSFORM if isinstance(est, ak.IterativeIFVP) else {}),
    },
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_pipeline():
    X = gradients().numpy()
    pipe = Pipeline([("ifvp", ak.ExplicitIFVP(damping=0.1)), ("proj", ak.RandomProjector(4))])
    out = pipe.fit_transform(X)
    assert isinstance(out, np.ndarray) and out.shape == (20, 4) and out.dtype == np.float32
    expected = pipe[1].transform(pipe[0].transform(X))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# ----------------------------------------------------------------- parameters
@pytest.mark.parametrize("name", NAMES)
def test_clone_and_get_params(name):
    est = make(name).fit(gradients())
    params = est.get_params()
    assert not any(k.endswith("_") for k in params)  # no learned values among params
    twin = sklearn.base.clone(est)
    assert plain(twin.get_params()) == plain(params)  # nested estimators are cloned
    with pytest.raises(NotFittedError):
        twin.transform(gradients(3))
    assert repr(est).startswith(type(est).__name__ + "(")


def plain(params):
    """Parameters with nested estimators (a preconditioner) as their type and parameters."""
    return {
        k: (type(v), plain(v.get_params())) if hasattr(v, "get_params") else v
        for k, v in params.items()
    }


@pytest.mark.parametrize("name", NAMES)
def test_not_fitted(name):
    with pytest.raises(NotFittedError):
        make(name).transform(gradients(3))


# ----------------------------------------------------------------- containers
@pytest.mark.parametrize("name", NAMES)
def test_containers_and_dtypes(name):
    G = gradients()
    est = make(name).fit(G.numpy())
    assert est.n_features_in_ == 7 and list(est.param_shapes_.values()) == [(7,)]
    out_np = est.transform(G[:4].numpy())
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    out_t = est.transform(G[:4])
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    same(out_np, out_t)
    width = 7 if name in IFVPS else 6
    assert out_t.shape == (4, width)


@pytest.mark.parametrize("name", NAMES)
def test_dict_equals_flat(name):
    D, G = dict_gradients()
    est = make(name, F64).fit(D)
    assert est.param_shapes_ == OrderedDict([("a", (3, 2)), ("b", (1,))])
    assert est.n_features_in_ == 7
    flat = make(name, F64).fit(G)
    out_dict = est.transform({k: v[:5] for k, v in reversed(D.items())})  # key order free
    out_flat = flat.transform(G[:5])
    if name in IFVPS:
        assert isinstance(out_dict, dict) and list(out_dict) == ["a", "b"]
        assert out_dict["a"].shape == (5, 3, 2)
        out_dict = torch.cat([v.reshape(5, -1) for v in out_dict.values()], 1)
    assert isinstance(out_dict, torch.Tensor)
    same(out_dict, out_flat)


@pytest.mark.parametrize("name", NAMES)
def test_model_mode_layout(name):
    model = mlp()
    X, y = classification_data()
    est = make(name, F64).fit(model, (X, y))
    expected = OrderedDict((n, tuple(p.shape)) for n, p in model.named_parameters())
    assert est.param_shapes_ == expected
    assert est.n_features_in_ == sum(p.numel() for p in model.parameters())
    G = ak.per_example_gradients(model, (X, y), config=F64, flatten=False)
    out = est.transform(G)
    assert isinstance(out, dict) if name in IFVPS else out.shape == (12, 6)


# ----------------------------------------------------------------- pickling & devices
@pytest.mark.parametrize("name", NAMES)
def test_pickle_round_trip(name, tmp_path):
    G = gradients()
    est = make(name).fit(G)
    before = est.transform(G[:5])
    blob = pickle.dumps(est)
    loaded = pickle.loads(blob)
    same(loaded.transform(G[:5]), before, rtol=1e-6)
    joblib.dump(est, tmp_path / "est.joblib")
    same(joblib.load(tmp_path / "est.joblib").transform(G[:5]), before, rtol=1e-6)
    # the original still works after pickling (state was copied, not moved)
    same(est.transform(G[:5]), before, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_to_cpu_returns_self(name):
    est = make(name).fit(gradients())
    assert est.to("cpu") is est
    assert est.transform(gradients(2)).device.type == "cpu"


@pytest.mark.parametrize("name", NAMES)
def test_unavailable_device_is_refused(name):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="not available"):
        ak.ComputeConfig(device="cuda")
    est = make(name).fit(gradients())
    with pytest.raises(ValueError, match="not available"):
        est.to("cuda")


@pytest.mark.parametrize("device", ["gpu", "tpu:0", 3, None])
def test_to_refuses_a_malformed_device_clearly(device):
    est = make(NAMES[0]).fit(gradients())
    with pytest.raises(ValueError, match="'device' argument of .*to must be"):
        est.to(device)
    assert est.to(torch.device("cpu")) is est


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", NAMES)
def test_transform_bad_input(name):
    G = gradients()
    est = make(name).fit(G)
    with pytest.raises(ValueError, match="X has 6 features, but .* expecting 7 features"):
        est.transform(G[:, :6])
    bad = G[:3].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.transform(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="infinity"):
        est.transform(bad.numpy())
    with pytest.raises(ValueError, match="2-D"):
        est.transform(G[0])
    with pytest.raises(ValueError, match="2D"):
        est.transform(G[0].numpy())
    with pytest.raises(ValueError, match="keys"):
        est.transform({"features": G[:3], "other": G[:3]})


@pytest.mark.parametrize("name", NAMES)
def test_dict_input_checked(name):
    D, _ = dict_gradients()
    est = make(name).fit(D)
    with pytest.raises(ValueError, match="Missing: \\['b'\\]"):
        est.transform({"a": D["a"]})
    with pytest.raises(ValueError, match="shape"):
        est.transform({"a": D["a"].reshape(20, 6), "b": D["b"]})


@pytest.mark.parametrize("name", NAMES)
def test_failed_fit_leaves_estimator_unchanged(name):
    G = gradients()
    est = make(name).fit(G)
    before = est.transform(G[:4])
    state = dict(est.__dict__)
    bad = gradients(20, 9)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        est.fit(bad)
    assert est.__dict__.keys() == state.keys()
    assert est.n_features_in_ == 7
    same(est.transform(G[:4]), before, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_bad_fit_input(name):
    est = make(name)
    with pytest.raises(ValueError, match="2D|2-D"):
        est.fit(np.ones(5))
    with pytest.raises(ValueError, match="empty|0 sample"):
        est.fit(torch.empty(0, 4))
    with pytest.raises(ValueError, match="config"):
        type(est)(config="cpu").fit(gradients())


@pytest.mark.parametrize("name", sorted(IFVPS))
def test_model_mode_bad_data(name):
    model, (X, y) = mlp(), classification_data()
    with pytest.raises(ValueError, match="'data' argument is required"):
        make(name).fit(model)
    with pytest.raises(ValueError, match="empty"):
        make(name).fit(model, [])
    with pytest.raises(ValueError, match="'loss' parameter"):
        type(make(name))(loss="hinge").fit(model, (X, y))


# ----------------------------------------------------------------- model-mode-only estimators
#: Estimators whose layout only a model defines. KroneckerProjector projects each
#: layer's gradient as a (d_out, d_in) matrix; an array (or dict) of gradients does
#: not say which entries form which layer, so array-mode fit raises TypeError and
#: scikit-learn's estimator checks (all array mode) do not apply to them.
#: EKFACIFVP needs each layer's inputs and output gradients, which gradients alone
#: do not give (s a^T does not determine a a^T and s s^T): model mode only as well.
MODEL_ONLY = {
    "KroneckerProjector": lambda config=None: ak.KroneckerProjector(
        in_dim=3, out_dim=2, config=config
    ),
    "EKFACIFVP": lambda config=None: ak.EKFACIFVP(config=config),
}
MODEL_ONLY_NAMES = list(MODEL_ONLY)


def fit_model_only(name, config=None):
    model, (X, y) = mlp(), classification_data()
    est = MODEL_ONLY[name](config).fit(model, (X, y))
    G = ak.per_example_gradients(model, (X, y), config=F64, params=list(est.param_shapes_))
    return est, G


@pytest.mark.parametrize("name", MODEL_ONLY_NAMES)
def test_model_only_refuses_arrays(name):
    est = MODEL_ONLY[name]()
    for X in (gradients().numpy(), gradients(), dict_gradients()[0]):
        with pytest.raises(TypeError, match=f"{name} cannot fit from an array of gradients"):
            est.fit(X)
    assert not hasattr(est, "n_features_in_")


@pytest.mark.parametrize("name", MODEL_ONLY_NAMES)
def test_model_only_contract(name, tmp_path):
    est, G = fit_model_only(name)
    params = est.get_params()
    assert not any(k.endswith("_") for k in params)
    twin = sklearn.base.clone(est)
    assert twin.get_params() == params and repr(est).startswith(name + "(")
    with pytest.raises(NotFittedError):
        twin.transform(G)
    # layout: flat vectors, dicts keyed like param_shapes_, numpy in -> numpy out
    assert est.n_features_in_ == G.shape[1]
    out_t = est.transform(G)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    out_np = est.transform(G.numpy())
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32
    same(out_np, out_t)
    D = vectors.split(G, est.param_shapes_)
    out_d = est.transform(dict(reversed(D.items())))
    if est._is_ifvp:  # dict in, dict out, keyed and shaped like param_shapes_
        assert list(out_d) == list(est.param_shapes_)
        out_d = vectors.flatten_dict(out_d, est.param_shapes_)
    same(out_d, out_t)
    names = est.get_feature_names_out()
    assert len(names) == out_t.shape[1]
    if est._is_ifvp:  # IFVPs pass their input names through
        assert out_t.shape == G.shape and names[0] == f"{next(iter(est.param_shapes_))}[0]"
    else:
        assert names[0] == name.lower() + "0"
    # pickling: same output, original unchanged
    before = est.transform(G[:5])
    same(pickle.loads(pickle.dumps(est)).transform(G[:5]), before, rtol=1e-6)
    joblib.dump(est, tmp_path / "est.joblib")
    same(joblib.load(tmp_path / "est.joblib").transform(G[:5]), before, rtol=1e-6)
    same(est.transform(G[:5]), before, rtol=0)
    assert est.to("cpu") is est


@pytest.mark.parametrize("name", MODEL_ONLY_NAMES)
def test_model_only_bad_input_and_atomic_fit(name):
    est, G = fit_model_only(name)
    p = G.shape[1]
    with pytest.raises(ValueError, match=f"X has {p - 1} features, but .* expecting {p} features"):
        est.transform(G[:, :-1])
    bad = G[:3].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.transform(bad)
    with pytest.raises(ValueError, match="2-D"):
        est.transform(G[0])
    with pytest.raises(ValueError, match="keys"):
        est.transform({"features": G[:3]})
    before, state = est.transform(G[:4]), dict(est.__dict__)
    with pytest.raises(ValueError):
        type(est)(layers=["1"]).fit(mlp())  # a Tanh: not a supported layer
    with pytest.raises(ValueError):
        est.set_params(layers=["nope"]).fit(torch.nn.Linear(3, 2))
    assert est.__dict__.keys() == state.keys()
    same(est.transform(G[:4]), before, rtol=0)
    with pytest.raises(ValueError, match="config"):
        type(est)(config="cpu").fit(mlp())
