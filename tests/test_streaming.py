"""Attribution at scale: projected gradients streamed into ``out`` (memmaps included)
and influence scored in blocks from memmaps."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from cases import classification_data, mlp
from reference import assert_close
from sklearn.decomposition import PCA
from torch.utils.data import DataLoader, TensorDataset

import attribkit as ak

F64 = ak.ComputeConfig(dtype="float64", batch_size=5)
N = 13


def data():
    return classification_data(n=N)


def counted(model):
    """The model, and a list that grows by one per forward call."""
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return model, calls


def projectors(model):
    return {
        "none": None,
        "random": ak.RandomProjector(6, config=F64).fit(model),
        "kronecker": ak.KroneckerProjector(in_dim=3, out_dim=2, config=F64).fit(model),
    }


def reference(model, projector):
    X, y = data()
    if projector is None:
        return ak.per_example_gradients(model, (X, y), config=F64)
    params = list(projector.param_shapes_)
    return projector.transform(ak.per_example_gradients(model, (X, y), params=params, config=F64))


# ----------------------------------------------------------------------------- out=
@pytest.mark.parametrize("kind", ["none", "random", "kronecker"])
@pytest.mark.parametrize("container", ["numpy", "memmap", "tensor"])
def test_out_is_filled_and_returned(kind, container, tmp_path):
    model = mlp()
    projector = projectors(model)[kind]
    expected = reference(model, projector)
    shape = tuple(expected.shape)
    if container == "numpy":
        out = np.full(shape, np.nan)
    elif container == "memmap":
        out = np.lib.format.open_memmap(
            tmp_path / "g.npy", mode="w+", dtype="float64", shape=shape
        )
    else:
        out = torch.full(shape, float("nan"), dtype=torch.float64)
    got = ak.per_example_gradients(model, data(), projector=projector, config=F64, out=out)
    assert got is out
    assert_close(torch.as_tensor(np.asarray(got)), expected, rtol=1e-10)


def test_memmap_round_trip(tmp_path):
    model = mlp()
    kp = ak.KroneckerProjector(in_dim=3, out_dim=3).fit(model)  # float32 default
    path = tmp_path / "features.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(N, kp.proj_dim_))
    ak.per_example_gradients(model, data(), projector=kp, out=out)
    del out  # closed; the file holds the result
    again = np.load(path, mmap_mode="r")
    in_memory = ak.per_example_gradients(model, data(), projector=kp)
    assert again.dtype == np.float32 and again.shape == (N, kp.proj_dim_)
    np.testing.assert_array_equal(np.asarray(again), in_memory.numpy())


def test_invariant_to_batch_size_and_container():
    model = mlp()
    rp = ak.RandomProjector(6, config=F64).fit(model)
    X, y = data()
    ref = ak.per_example_gradients(model, (X, y), projector=rp)
    for batches in (
        DataLoader(TensorDataset(X, y), batch_size=1),
        [(X[:7], y[:7]), (X[7:], y[7:])],
        ((X[i : i + 4], y[i : i + 4]) for i in range(0, N, 4)),
    ):
        out = np.zeros((N, 6))
        ak.per_example_gradients(model, batches, projector=rp, out=out)
        assert_close(out, ref, rtol=1e-12)


# ----------------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    "out, match",
    [
        (np.zeros((N, 5)), r"shape \(13, 6\). Got \(13, 5\)"),
        (np.zeros((N + 1, 6)), r"shape \(13, 6\). Got \(14, 6\)"),
        (np.zeros(N * 6), r"shape \(13, 6\)"),
        (np.zeros((N, 6), dtype=np.float32), "dtype float64"),
        (torch.zeros(N, 6), "dtype torch.float64"),
        (torch.zeros(N, 6, dtype=torch.float64, requires_grad=True), "require grad"),
        ([[0.0] * 6] * N, "numpy array .* or a torch tensor. Got list"),
    ],
)
def test_out_checked_before_any_work(out, match):
    model, calls = counted(mlp())
    rp = ak.RandomProjector(6).fit(model)
    with pytest.raises((ValueError, TypeError), match=match):
        ak.per_example_gradients(model, data(), projector=rp, config=F64, out=out)
    assert not calls


def test_read_only_memmap_refused(tmp_path):
    path = tmp_path / "g.npy"
    np.save(path, np.zeros((N, 6)))
    model, calls = counted(mlp())
    rp = ak.RandomProjector(6).fit(model)
    with pytest.raises(ValueError, match="writeable"):
        ak.per_example_gradients(
            model, data(), projector=rp, config=F64, out=np.load(path, mmap_mode="r")
        )
    assert not calls


def test_length_known_for_dataloaders():
    model, calls = counted(mlp())
    X, y = data()
    rp = ak.RandomProjector(6, config=F64).fit(model)  # float64: the 1e-10 below is float64's
    loader = DataLoader(TensorDataset(X, y), batch_size=5, drop_last=True)  # yields 10
    with pytest.raises(ValueError, match=r"shape \(10, 6\)"):
        ak.per_example_gradients(model, loader, projector=rp, config=F64, out=np.zeros((N, 6)))
    assert not calls
    out = ak.per_example_gradients(model, loader, projector=rp, config=F64, out=np.zeros((10, 6)))
    assert_close(out, reference(model, rp)[:10], rtol=1e-10)


def test_unknown_length_overflow_and_underflow():
    model = mlp()
    X, y = data()
    rp = ak.RandomProjector(6, config=F64).fit(model)
    batches = ((X[i : i + 4], y[i : i + 4]) for i in range(0, N, 4))  # 4, 4, 4, 1
    out = np.zeros((10, 6))
    with pytest.raises(ValueError, match="has 10 rows but 'data' yields more examples"):
        ak.per_example_gradients(model, batches, projector=rp, config=F64, out=out)
    # raised at the third batch, before writing it (one check call + three batches)
    assert_close(out[:8], reference(model, rp)[:8], rtol=1e-10)
    assert not out[8:].any()
    batches = ((X[i : i + 4], y[i : i + 4]) for i in range(0, N, 4))
    with pytest.raises(ValueError, match="yielded 13 examples .rows 13: are unset"):
        ak.per_example_gradients(model, batches, projector=rp, config=F64, out=np.zeros((20, 6)))


def test_flatten_false_refused_with_projector():
    model = mlp()
    with pytest.raises(ValueError, match="'flatten'"):
        ak.per_example_gradients(
            model, data(), projector=ak.RandomProjector(6).fit(model), flatten=False
        )


# ----------------------------------------------------------------------------- projectors
def test_array_fitted_and_foreign_transformers():
    model = mlp()
    G = reference(model, None)
    # A projector fitted on arrays takes the flat gradients of `params`.
    rp = ak.RandomProjector(6, config=F64).fit(G.numpy())
    assert_close(ak.per_example_gradients(model, data(), projector=rp), rp.transform(G))
    sub = ak.RandomProjector(6, config=F64).fit(G[:, :24])  # 0.weight + 0.bias
    got = ak.per_example_gradients(model, data(), projector=sub, params=["0.weight", "0.bias"])
    assert_close(got, sub.transform(G[:, :24]), rtol=1e-10)
    with pytest.raises(ValueError, match="expects 24 features, but .* have 39"):
        ak.per_example_gradients(model, data(), projector=sub)
    # Any fitted scikit-learn transformer (numpy in, numpy out).
    pca = PCA(3).fit(G.numpy())
    got = ak.per_example_gradients(model, data(), projector=pca, config=F64)
    assert_close(got, pca.transform(G.numpy()), rtol=1e-10)
    with pytest.raises(TypeError, match="'projector'"):
        ak.per_example_gradients(model, data(), projector="random")


def test_arnoldi_projector():
    model = mlp()
    G = reference(model, None)
    arnoldi = ak.ArnoldiProjector(proj_dim=4, config=F64).fit(G)
    k = arnoldi.transform(G[:1]).shape[1]
    out = np.zeros((N, k))
    ak.per_example_gradients(model, data(), projector=arnoldi, config=F64, out=out)
    assert_close(out, arnoldi.transform(G), rtol=1e-10)


def test_model_fitted_projector_must_match_model():
    model = mlp()
    rp = ak.RandomProjector(6).fit(mlp(hidden=6))
    with pytest.raises(ValueError, match="other shapes"):
        ak.per_example_gradients(model, data(), projector=rp)
    with pytest.raises(ValueError, match="'params'"):
        ak.per_example_gradients(model, data(), projector=ak.RandomProjector(6).fit(model),
                                 params=["0.weight"])  # fmt: skip


# ----------------------------------------------------------------------------- influence
def peak_numpy_bytes(fn):
    """Peak of the numpy allocations ``fn()`` makes (tracemalloc traces numpy's buffers).

    A memmap can only be copied into memory by numpy (``np.array``,
    ``check_array``, ``np.ascontiguousarray``) before torch sees it, so this
    sees a whole-store copy; reading pages of the memmap allocates nothing.
    """
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    rng = np.random.default_rng(0)
    n, p = 3000, 1000
    path = tmp_path_factory.mktemp("store") / "train.npy"
    train = np.lib.format.open_memmap(path, mode="w+", dtype="float64", shape=(n, p))
    for start in range(0, n, 500):
        train[start : start + 500] = rng.standard_normal((500, p))
    train.flush()
    test = rng.standard_normal((7, p))
    return np.load(path, mmap_mode="r"), test


def test_influence_in_blocks_equals_one_shot(stores):
    train, test = stores
    fit_on = np.asarray(train[:400])
    big = ak.ExplicitIFVP(damping=0.5, config=ak.ComputeConfig(dtype="float64")).fit(fit_on)
    tiny_cfg = ak.ComputeConfig(dtype="float64", memory_budget=64 * 1024)  # ~3 rows a block
    tiny = ak.ExplicitIFVP(damping=0.5, config=tiny_cfg).fit(fit_on)
    full = big.transform(test) @ np.asarray(train).T
    one_shot = ak.influence(big, np.asarray(train), test)
    blocked = ak.influence(tiny, train, test)
    assert isinstance(blocked, np.ndarray) and blocked.shape == (7, 3000)
    assert_close(blocked, one_shot, rtol=1e-12)
    assert_close(blocked, full, rtol=1e-12)
    top, top_i, _, bottom_i = ak.influence(tiny, train, test, top_k=5)
    order = np.argsort(-full, axis=1)
    np.testing.assert_array_equal(top_i, order[:, :5])
    np.testing.assert_array_equal(bottom_i, order[:, ::-1][:, :5])
    assert_close(top, np.take_along_axis(full, order[:, :5], 1), rtol=1e-12)


def test_influence_reads_a_memmap_block_by_block(stores):
    """Peak allocation stays near the budget, far below the 24 MB store."""
    train, test = stores
    assert train.nbytes == 24_000_000
    budget = 2 * 2**20
    cfg = ak.ComputeConfig(dtype="float64", memory_budget=budget)
    ifvp = ak.ExplicitIFVP(damping=0.5, config=cfg).fit(np.asarray(train[:300]))
    for top_k in (None, 10):
        peak = peak_numpy_bytes(lambda k=top_k: ak.influence(ifvp, train, test, top_k=k))
        assert peak < 2 * budget, peak
    # The measurement does see a whole copy: with the default 2 GiB budget the
    # store is one block.
    roomy = ak.ExplicitIFVP(damping=0.5, config=ak.ComputeConfig(dtype="float64"))
    roomy.fit(np.asarray(train[:300]))
    assert peak_numpy_bytes(lambda: ak.influence(roomy, train, test)) > train.nbytes * 0.9


def test_end_to_end_store_then_score(tmp_path):
    """Kronecker projections streamed into a store, then influence from the store."""
    model = mlp()
    X, y = classification_data(n=40, seed=3)
    kp = ak.KroneckerProjector(in_dim=4, out_dim=3, config=F64).fit(model)
    path = tmp_path / "train.npy"
    store = np.lib.format.open_memmap(path, mode="w+", dtype="float64", shape=(40, kp.proj_dim_))
    ak.per_example_gradients(model, DataLoader(TensorDataset(X, y), batch_size=7),
                             projector=kp, out=store)  # fmt: skip
    del store
    train = np.load(path, mmap_mode="r")
    test = ak.per_example_gradients(model, (X[:5], y[:5]), projector=kp).numpy()
    tiny = ak.ComputeConfig(dtype="float64", memory_budget=512)
    ifvp = ak.ExplicitIFVP(damping=0.1, config=tiny).fit(np.asarray(train))
    scores = ak.influence(ifvp, train, test)
    G = ak.per_example_gradients(model, (X, y), params=list(kp.param_shapes_), config=F64)
    P = kp.transform(G).numpy()
    expected = ak.ExplicitIFVP(damping=0.1, config=F64).fit(P).transform(test) @ P.T
    assert_close(scores, expected, rtol=1e-10)
    _, top_i, _, _ = ak.influence(ifvp, train, test, top_k=3)
    np.testing.assert_array_equal(top_i, np.argsort(-expected, axis=1)[:, :3])
