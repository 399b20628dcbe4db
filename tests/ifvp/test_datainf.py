"""DataInfIFVP against a naive per-example loop of its formula (float64)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from cases import classification_data, mlp
from reference import assert_close, dense_datainf, loop_per_example_gradients
from sklearn.exceptions import NotFittedError

import attribkit as ak
from attribkit.config import ComputeConfig
from attribkit.ifvp.datainf import DataInfIFVP

F64 = ComputeConfig(dtype="float64", progress=False)


def naive_layerwise(G, V, index_sets, dampings):
    """``dense_datainf`` on each layer's coordinates (``index_sets``) of ``G`` and ``V``."""
    out = torch.empty_like(V, dtype=torch.float64)
    for idx, lam in zip(index_sets, dampings):
        idx = torch.as_tensor(idx)
        out[:, idx] = dense_datainf(G[:, idx], lam, V[:, idx])
    return out


def name_indices(model, groups):
    """Flat indices (model parameter order) of each group of parameter names."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = range(start, start + p.numel())
        start += p.numel()
    return [[i for name in group for i in offsets[name]] for group in groups]


def auto_damping(G, index_sets):
    return [0.1 * float((G[:, idx].double() ** 2).sum(1).mean()) / len(idx) for idx in index_sets]


@pytest.fixture
def mlp_case():
    model = mlp()  # Linear(5, 4) - Tanh - Linear(4, 3), float64
    X, y = classification_data(n=12)
    G = loop_per_example_gradients(model, X, y)
    return model, X, y, G


MODULE = [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
PARAMETER = [["0.weight"], ["0.bias"], ["2.weight"], ["2.bias"]]
# Non-contiguous layers, in an order that differs from the layout.
EXPLICIT = [["2.weight", "0.bias"], ["0.weight", "2.bias"]]


@pytest.mark.parametrize(
    "layers, groups",
    [("module", MODULE), ("parameter", PARAMETER), (EXPLICIT, EXPLICIT)],
    ids=["module", "parameter", "explicit"],
)
def test_model_mode_equals_naive_loop(mlp_case, layers, groups):
    model, X, y, G = mlp_case
    ifvp = DataInfIFVP(layers=layers, config=F64).fit(model, (X, y))
    expected_layers = [
        sorted(g, key=[n for n, _ in model.named_parameters()].index) for g in groups
    ]
    assert ifvp.layers_ == expected_layers
    idx = name_indices(model, expected_layers)
    assert ifvp.damping_ == pytest.approx(auto_damping(G, idx), rel=1e-12)
    V = torch.randn(4, G.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = naive_layerwise(G, V, idx, ifvp.damping_)
    assert_close(ifvp.transform(V), expected, rtol=1e-10)
    assert ifvp.n_samples_ == 12
    assert ifvp.n_features_in_ == G.shape[1]
    for k, group_idx in enumerate(idx):
        assert_close(ifvp.train_gradients_[k], G[:, torch.as_tensor(group_idx)], rtol=1e-12)


def test_array_mode_layer_sizes_numpy_in_numpy_out():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(15, 9))
    V = rng.normal(size=(4, 9))
    ifvp = DataInfIFVP(damping=[0.3, 0.05], layers=[4, 5], config=F64).fit(G)
    assert ifvp.layers_ == [(0, 4), (4, 9)]
    out = ifvp.transform(V)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    expected = naive_layerwise(
        torch.from_numpy(G), torch.from_numpy(V), [range(4), range(4, 9)], [0.3, 0.05]
    )
    assert_close(out, expected, rtol=1e-10)
    # torch in, torch out
    assert_close(ifvp.transform(torch.from_numpy(V)), expected, rtol=1e-10)


@pytest.mark.parametrize("layers", ["module", "parameter"])
def test_dict_of_per_example_gradients_equals_model_fit(mlp_case, layers):
    # The dict per_example_gradients(..., flatten=False) gives the model's layers.
    model, X, y, G = mlp_case
    grads = ak.per_example_gradients(model, (X, y), config=F64, flatten=False)
    from_model = DataInfIFVP(layers=layers, config=F64).fit(model, (X, y))
    from_dict = DataInfIFVP(layers=layers, config=F64).fit(grads)
    assert from_dict.layers_ == from_model.layers_ == (MODULE if layers == "module" else PARAMETER)
    assert from_dict.damping_ == pytest.approx(from_model.damping_, rel=1e-12)
    V = torch.randn(4, G.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_close(from_dict.transform(V), from_model.transform(V), rtol=1e-10)
    assert_close(ak.influence(from_dict, G, V), ak.influence(from_model, G, V), rtol=1e-10)
    assert_close(
        from_dict.transform(V),
        naive_layerwise(G, V, name_indices(model, from_model.layers_), from_model.damping_),
        rtol=1e-10,
    )


def test_array_mode_plain_array_is_one_layer():
    rng = np.random.default_rng(1)
    G, V = rng.normal(size=(10, 6)), rng.normal(size=(3, 6))
    for layers in ("module", "parameter"):
        ifvp = DataInfIFVP(damping=0.2, layers=layers, config=F64).fit(G)
        assert ifvp.layers_ == [["features"]]
        expected = dense_datainf(torch.from_numpy(G), 0.2, torch.from_numpy(V))
        assert_close(ifvp.transform(V), expected, rtol=1e-10)


def test_array_mode_dict_in_dict_out():
    g = torch.Generator().manual_seed(2)
    X = {"a": torch.randn(11, 2, 3, generator=g, dtype=torch.float64)}
    X["b"] = torch.randn(11, 4, generator=g, dtype=torch.float64)
    Vd = {"a": torch.randn(3, 2, 3, generator=g, dtype=torch.float64)}
    Vd["b"] = torch.randn(3, 4, generator=g, dtype=torch.float64)
    G = torch.cat([X["a"].reshape(11, -1), X["b"]], dim=1)
    Vf = torch.cat([Vd["a"].reshape(3, -1), Vd["b"]], dim=1)
    per_key = [range(6), range(6, 10)]

    # Keys without a module prefix share the empty one: "module" makes one layer.
    assert DataInfIFVP(config=F64).fit(X).layers_ == [["a", "b"]]
    ifvp = DataInfIFVP(layers="parameter", config=F64).fit(X)  # one layer per key
    assert ifvp.layers_ == [["a"], ["b"]]
    assert ifvp.damping_ == pytest.approx(auto_damping(G, per_key), rel=1e-12)
    out = ifvp.transform(Vd)
    assert isinstance(out, dict) and list(out) == ["a", "b"]
    assert out["a"].shape == (3, 2, 3) and out["b"].shape == (3, 4)
    expected = naive_layerwise(G, Vf, per_key, ifvp.damping_)
    assert_close(torch.cat([out["a"].reshape(3, -1), out["b"]], dim=1), expected, rtol=1e-10)
    assert_close(ifvp.transform(Vf), expected, rtol=1e-10)  # flat in, flat out

    # Lists of keys group them into one layer.
    both = DataInfIFVP(damping=0.4, layers=[["b", "a"]], config=F64).fit(X)
    assert both.layers_ == [["a", "b"]]
    assert_close(both.transform(Vf), dense_datainf(G, 0.4, Vf), rtol=1e-10)


def test_model_mode_equals_array_mode(mlp_case):
    model, X, y, G = mlp_case
    config = ComputeConfig(dtype="float64", batch_size=5, progress=False)  # 5 does not divide 12
    from_model = DataInfIFVP(config=config).fit(model, (X, y))
    sizes = [24, 15]  # Linear(5, 4) and Linear(4, 3), weight + bias
    from_array = DataInfIFVP(layers=sizes, config=config).fit(G)
    assert from_model.damping_ == pytest.approx(from_array.damping_, rel=1e-12)
    V = torch.randn(3, 39, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_close(from_model.transform(V), from_array.transform(V), rtol=1e-10)
    # Layer sizes are accepted in model mode too.
    by_size = DataInfIFVP(layers=sizes, config=config).fit(model, (X, y))
    assert by_size.layers_ == [(0, 24), (24, 39)]
    assert_close(by_size.transform(V), from_model.transform(V), rtol=1e-10)


def test_params_restrict_the_layers(mlp_case):
    model, X, y, G = mlp_case
    ifvp = DataInfIFVP(params=["2.weight", "2.bias"], config=F64).fit(model, (X, y))
    assert ifvp.layers_ == [["2.weight", "2.bias"]]
    G2 = G[:, 24:]
    V = torch.randn(2, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert_close(ifvp.transform(V), dense_datainf(G2, ifvp.damping_[0], V), rtol=1e-10)


@pytest.mark.parametrize("budget", [1, 8 * 4 * 5, 8 * 4 * 7 + 3])
def test_chunking_does_not_change_the_result(budget):
    # m=4 float64 vectors: a budget of 8*4*k bytes gives chunks of k examples.
    rng = np.random.default_rng(5)
    G, V = rng.normal(size=(23, 7)), rng.normal(size=(4, 7))
    reference = DataInfIFVP(layers=[3, 4], config=F64).fit(G).transform(V)
    tiny = ComputeConfig(dtype="float64", memory_budget=budget, progress=False)
    chunked = DataInfIFVP(layers=[3, 4], config=tiny).fit(G).transform(V)
    assert_close(chunked, reference, rtol=1e-12)


def test_float_and_list_damping(mlp_case):
    model, X, y, G = mlp_case
    idx = name_indices(model, MODULE)
    V = torch.randn(2, 39, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    single = DataInfIFVP(damping=0.25, config=F64).fit(model, (X, y))
    assert single.damping_ == [0.25, 0.25]
    assert_close(single.transform(V), naive_layerwise(G, V, idx, [0.25, 0.25]), rtol=1e-10)
    listed = DataInfIFVP(damping=[0.5, 0.01], config=F64).fit(model, (X, y))
    assert listed.damping_ == [0.5, 0.01]
    assert_close(listed.transform(V), naive_layerwise(G, V, idx, [0.5, 0.01]), rtol=1e-10)


@pytest.mark.parametrize("damping", [0, 0.0, -1.0, [0.1, 0.0], [0.1, -2], [], "bogus", None])
def test_bad_damping_raises(damping):
    with pytest.raises(ValueError, match="'damping' parameter of DataInfIFVP must be"):
        DataInfIFVP(damping=damping).fit(np.ones((3, 2)))


def test_wrong_damping_list_length_names_the_layer_count(mlp_case):
    model, X, y, _ = mlp_case
    with pytest.raises(ValueError, match="one value per layer: 4 layers"):
        DataInfIFVP(damping=[0.1, 0.2], layers="parameter").fit(model, (X, y))
    with pytest.raises(ValueError, match="one value per layer: 2 layers"):
        DataInfIFVP(damping=[0.1], layers=[1, 1]).fit(np.ones((3, 2)))


def test_auto_damping_on_all_zero_layer_names_it():
    X = {"a": np.random.default_rng(0).normal(size=(5, 3)), "b": np.zeros((5, 2))}
    with pytest.raises(ValueError, match=r"layer 1 \(\['b'\]\) are all zero"):
        DataInfIFVP(layers="parameter").fit(X)
    G = np.concatenate([X["a"], X["b"]], axis=1)
    with pytest.raises(ValueError, match="layer 1 \\(flat features 3:5\\) are all zero"):
        DataInfIFVP(layers=[3, 2]).fit(G)
    # A float damping is fine: the layer is then the identity divided by λ.
    ifvp = DataInfIFVP(damping=0.5, layers="parameter", config=F64).fit(X)
    out = ifvp.transform({"a": np.zeros((1, 3)), "b": np.ones((1, 2))})
    assert_close(out["b"], torch.full((1, 2), 2.0, dtype=torch.float64), rtol=1e-15)


def test_all_zero_model_layer_names_it(mlp_case):
    model, X, y, _ = mlp_case
    # Inputs of zero make the first layer's weight gradients all zero.
    with pytest.raises(ValueError, match=r"layer 0 \(\['0.weight'\]\) are all zero"):
        DataInfIFVP(layers="parameter").fit(model, (torch.zeros_like(X), y))


@pytest.mark.parametrize(
    "layers, message",
    [
        ("modules", "'layers' parameter of DataInfIFVP must be one of"),
        ([], "'layers' parameter of DataInfIFVP must be"),
        ([3, 0], "'layers' parameter of DataInfIFVP must be"),
        ([["0.weight"], "0.bias"], "'layers' parameter of DataInfIFVP must be"),
        ([[]], "'layers' parameter of DataInfIFVP must be"),
        ([10, 10], "summing to 20, but the vectors have n_features=39"),
        ([["0.weight", "0.bias"], ["2.weight"]], r"missing: \['2.bias'\]"),
        ([["0.weight", "0.bias", "2.bias"], ["2.weight", "2.bias"]], r"repeated: \['2.bias'\]"),
        ([["0.weight", "0.bias", "2.weight", "2.bias", "3.weight"]], r"Unknown: \['3.weight'\]"),
    ],
)
def test_bad_layers_raise(mlp_case, layers, message):
    model, X, y, _ = mlp_case
    with pytest.raises(ValueError, match=message):
        DataInfIFVP(layers=layers).fit(model, (X, y))


def test_failed_fit_leaves_fitted_estimator_unchanged(mlp_case):
    model, X, y, _ = mlp_case
    ifvp = DataInfIFVP(config=F64).fit(model, (X, y))
    V = torch.randn(2, 39, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    before, damping, layers = ifvp.transform(V), list(ifvp.damping_), ifvp.layers_
    ifvp.set_params(damping=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="one value per layer"):
        ifvp.fit(model, (X, y))
    ifvp.set_params(damping="auto", layers="parameter")
    with pytest.raises(ValueError, match="are all zero"):
        ifvp.fit(model, (torch.zeros_like(X), y))
    assert ifvp.damping_ == damping and ifvp.layers_ == layers
    assert_close(ifvp.transform(V), before, rtol=0)


def test_transform_before_fit_raises():
    with pytest.raises(NotFittedError):
        DataInfIFVP().transform(np.ones((1, 3)))


def test_transform_does_not_modify_input_and_pickles():
    rng = np.random.default_rng(8)
    G = torch.from_numpy(rng.normal(size=(9, 5)))
    V = torch.from_numpy(rng.normal(size=(3, 5)))
    V_copy = V.clone()
    ifvp = DataInfIFVP(config=F64).fit(G)
    out = ifvp.transform(V)
    assert torch.equal(V, V_copy)
    G[0] = 0.0  # the fitted state must not be a view of the caller's array
    assert_close(ifvp.transform(V), out, rtol=0)
    again = pickle.loads(pickle.dumps(ifvp))
    assert_close(again.transform(V), out, rtol=0)


def test_nan_gradients_raise(mlp_case):
    model, X, y, _ = mlp_case
    X = X.clone()
    X[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        DataInfIFVP().fit(model, (X, y))


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_lower_precision_close_to_float64(dtype, rtol):
    rng = np.random.default_rng(9)
    G, V = rng.normal(size=(40, 12)), rng.normal(size=(5, 12))
    exact = DataInfIFVP(layers=[5, 7], config=F64).fit(G).transform(V)
    low = DataInfIFVP(layers=[5, 7], config=ComputeConfig(dtype=dtype, progress=False)).fit(G)
    assert low.train_gradients_[0].dtype == getattr(torch, dtype)
    out = low.transform(torch.from_numpy(V))
    assert out.dtype == getattr(torch, dtype)
    assert_close(out, exact, rtol=rtol)


def test_datainf_is_close_to_exact_inverse_for_a_single_example():
    # With n = 1 the mean of inverses is the inverse: DataInf is exact.
    g = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    V = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    ifvp = DataInfIFVP(damping=0.3, config=F64).fit(g)
    F = g.T @ g + 0.3 * torch.eye(6, dtype=torch.float64)
    assert_close(ifvp.transform(V), torch.linalg.solve(F, V.T).T, rtol=1e-12)
    assert math.isclose(ifvp.damping_[0], 0.3)


# The one check that cannot pass by design (as in tests/test_common.py).
