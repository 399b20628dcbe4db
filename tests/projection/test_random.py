"""RandomProjector as an estimator: parameters, layout, determinism, JL quality, pickling."""

import math
import pickle

import numpy as np
import pytest
import torch
from cases import mlp

import attribkit as ak

F64 = ak.ComputeConfig(dtype="float64")
TYPES = [("rademacher", 1), ("normal", 1), ("sjlt", 1), ("sjlt", 4)]


def data(n=50, p=3000, seed=0):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("proj_type, sparsity", TYPES)
def test_jl_norms_and_inner_products(proj_type, sparsity):
    # k = 2048, 50 vectors: JL with eps = 0.2 holds with overwhelming probability
    # (tail ~ 2 exp(-k eps^2 / 8) per vector ~ 1e-8) for each type; fixed seed.
    X = data()
    P = ak.RandomProjector(2048, proj_type=proj_type, sparsity=sparsity, config=F64).fit(X)
    Y = P.transform(X)
    ratio = Y.pow(2).sum(1) / X.pow(2).sum(1)
    assert (ratio - 1).abs().max() < 0.2
    # Inner products: |<Pa,Pb> - <a,b>| <= eps * |a| |b|.
    gram, gram_p = X @ X.T, Y @ Y.T
    norms = X.norm(dim=1)
    assert ((gram_p - gram).abs() / torch.outer(norms, norms)).max() < 0.2


@pytest.mark.parametrize("proj_type, sparsity", TYPES)
def test_determinism_across_instances_and_batches(proj_type, sparsity):
    X = data(20, 500)
    a = ak.RandomProjector(64, proj_type=proj_type, sparsity=sparsity, seed=3, config=F64).fit(X)
    b = ak.RandomProjector(64, proj_type=proj_type, sparsity=sparsity, seed=3, config=F64).fit(X)
    full = a.transform(X)
    assert torch.equal(full, b.transform(X))
    rows = torch.cat([a.transform(X[i : i + 3]) for i in range(0, 20, 3)])
    torch.testing.assert_close(rows, full, rtol=1e-12, atol=1e-12)
    other = ak.RandomProjector(64, proj_type=proj_type, sparsity=sparsity, seed=4, config=F64)
    assert not torch.allclose(other.fit(X).transform(X), full)


@pytest.mark.parametrize("proj_type", ["rademacher", "normal", "sjlt"])
def test_streamed_equals_cached(proj_type):
    X = data(10, 2000)
    cached = ak.RandomProjector(128, proj_type=proj_type, config=F64).fit(X).transform(X)
    tiny = ak.ComputeConfig(dtype="float64", memory_budget=64 * 1024)  # forces small blocks
    streamed = ak.RandomProjector(128, proj_type=proj_type, config=tiny).fit(X).transform(X)
    torch.testing.assert_close(streamed, cached, rtol=1e-12, atol=1e-12)


def test_dense_prefix_property():
    X = data(5, 300)
    small = ak.RandomProjector(64, proj_type="normal", config=F64).fit(X).transform(X)
    big = ak.RandomProjector(128, proj_type="normal", config=F64).fit(X).transform(X)
    torch.testing.assert_close(big[:, :64] * math.sqrt(128 / 64), small, rtol=1e-12, atol=1e-12)


def test_model_mode_and_dict_input():
    model = mlp()
    P = ak.RandomProjector(32, config=F64).fit(model, None)
    assert list(P.param_shapes_) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert P.n_features_in_ == 39
    G = {n: torch.randn(4, *p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    flat = torch.cat([g.reshape(4, -1) for g in G.values()], 1)
    assert torch.equal(P.transform(G), P.transform(flat))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype):
    X = data(8, 1000).float()
    ref = ak.RandomProjector(256).fit(X).transform(X)
    half = ak.RandomProjector(256, config=ak.ComputeConfig(dtype=dtype)).fit(X)
    out = half.transform(X)
    assert out.dtype == getattr(torch, dtype)
    # inputs rounded to half, float32 accumulation, output rounded to half
    tol = 1e-2 if dtype == "float16" else 4e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert half.transform(X.numpy()).dtype == (np.float16 if dtype == "float16" else np.float32)


def test_pickle_is_tiny_whatever_the_dimension():
    X = torch.randn(2, 200_000)
    P = ak.RandomProjector(1024).fit(X)
    P.transform(X)  # builds and caches the (200000, 1024) matrix: 800 MB
    blob = pickle.dumps(P)
    assert len(blob) < 4096
    torch.testing.assert_close(pickle.loads(blob).transform(X), P.transform(X))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"proj_dim": 0}, "'proj_dim' parameter of RandomProjector must be an int >= 1. Got 0"),
        ({"proj_dim": 2.5}, "'proj_dim'"),
        ({"proj_type": "gaussian"}, "'proj_type'"),
        ({"backend": "cuda"}, "'backend'"),
        ({"sparsity": 0}, "'sparsity'"),
        ({"proj_type": "sjlt", "proj_dim": 4, "sparsity": 5}, "'sparsity'"),
        ({"seed": "a"}, "'seed'"),
        ({"max_batch_size": 0}, "'max_batch_size'"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ak.RandomProjector(**kwargs).fit(np.ones((3, 10)))


def test_fast_jl_refused_where_it_cannot_run():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here; see the cuda tests")
    with pytest.raises(ValueError, match="fast_jl.*CUDA device"):
        ak.RandomProjector(512, backend="fast_jl").fit(np.ones((3, 10)))
    assert ak.RandomProjector(512).fit(np.ones((3, 10))).backend_ == "torch"


@pytest.mark.cuda
def test_cuda_matches_cpu_bit_for_bit():
    X = data(6, 5000).float()
    for proj_type in ("rademacher", "normal", "sjlt"):
        cpu = ak.RandomProjector(512, proj_type=proj_type, backend="torch").fit(X)
        gpu = ak.RandomProjector(
            512, proj_type=proj_type, backend="torch", config=ak.ComputeConfig(device="cuda")
        ).fit(X)
        assert torch.equal(cpu._get_engine().matrix(), gpu._get_engine().matrix().cpu())
        torch.testing.assert_close(gpu.transform(X).cpu(), cpu.transform(X), rtol=1e-4, atol=1e-4)


def test_params_restrict_the_model_layout():
    # A last-layer projection: fit(model, params) learns only those parameters' layout.
    model = mlp()  # Linear(5, 4) - Tanh - Linear(4, 3)
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    last = ["2.weight", "2.bias"]
    proj = ak.RandomProjector(proj_dim=8, params=last, config=F64).fit(model)
    assert list(proj.param_shapes_) == last and proj.n_features_in_ == 15
    G = ak.per_example_gradients(model, (X, y), params=last, config=F64)
    full = ak.RandomProjector(proj_dim=8, config=F64).fit(model)
    assert_same = torch.testing.assert_close
    assert_same(proj.transform(G), ak.RandomProjector(proj_dim=8, config=F64).fit(G).transform(G))
    assert full.n_features_in_ == 39
    with pytest.raises(ValueError, match="'params' parameter of RandomProjector names"):
        ak.RandomProjector(params=["nope"]).fit(model)
    with pytest.raises(ValueError, match="'params' parameter of RandomProjector"):
        ak.RandomProjector(params="2.weight").fit(model)
    assert ak.RandomProjector(params=last).get_params()["params"] == last


def test_warns_when_proj_dim_exceeds_n_features():
    from sklearn.exceptions import DataDimensionalityWarning

    with pytest.warns(DataDimensionalityWarning, match=r"n_features < proj_dim \(10 < 16\)"):
        ak.RandomProjector(proj_dim=16).fit(torch.randn(4, 10))
    with pytest.warns(DataDimensionalityWarning):
        ak.RandomProjector(proj_dim=64).fit(mlp())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ak.RandomProjector(proj_dim=10).fit(torch.randn(4, 10))


@pytest.mark.parametrize("proj_type", ["rademacher", "sjlt"])
def test_progress_bar_when_blocks_are_regenerated(proj_type, capsys):
    X = data(n=3, p=6000)
    # 6000 x 64 float64 = 3 MB (sjlt index 48 kB): a 64 KiB budget regenerates blocks.
    cfg = ak.ComputeConfig(dtype="float64", progress=True, memory_budget=64 * 2**10)
    proj = ak.RandomProjector(proj_dim=64, proj_type=proj_type, config=cfg).fit(X)
    streamed = proj.transform(X)
    assert "RandomProjector blocks" in capsys.readouterr().err
    cached = ak.RandomProjector(proj_dim=64, proj_type=proj_type, config=F64).fit(X)
    torch.testing.assert_close(streamed, cached.transform(X), rtol=1e-12, atol=1e-12)
    quiet = ak.ComputeConfig(dtype="float64", progress=False, memory_budget=64 * 2**10)
    ak.RandomProjector(proj_dim=64, proj_type=proj_type, config=quiet).fit(X).transform(X)
    assert capsys.readouterr().err == ""
