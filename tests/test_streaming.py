"""Attribution at scale: projected gradients streamed into ``out`` (memmaps included)
and influence scored in blocks from memmaps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


# ----------------------------------------------------------------------------- interrupted fills
class _Recording(TensorDataset):
    """A TensorDataset that records which examples were loaded."""

    def __init__(self, *tensors):
        super().__init__(*tensors)
        self.loaded = []

    def __getitem__(self, i):
        self.loaded.append(int(i))
        return super().__getitem__(i)


def _rows_seen(model):
    """The model, and a list of the batch sizes its forward calls got (hooked calls only)."""
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    return model, seen


def _failing(batches, at):
    """Yield ``batches`` and raise at batch index ``at`` (a data pipeline that breaks)."""
    for i, batch in enumerate(batches):
        if i == at:
            raise OSError(f"the data pipeline broke at batch {at}")
        yield batch


@pytest.mark.parametrize("kind", ["none", "kronecker"])
def test_an_error_mid_fill_carries_rows_written(kind, tmp_path):
    model = mlp()
    projector = projectors(model)[kind]
    expected = reference(model, projector).numpy()
    X, y = data()
    path = tmp_path / "g.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype="float64", shape=expected.shape)
    batches = [(X[i : i + 3], y[i : i + 3]) for i in range(0, N, 3)]  # 3, 3, 3, 3, 1
    with pytest.raises(OSError, match="broke at batch 3") as info:
        ak.per_example_gradients(
            model, _failing(batches, 3), projector=projector, config=F64, out=out
        )
    assert info.value.rows_written == 9  # batches 0, 1 and 2
    assert "resume with start=9" in "\n".join(getattr(info.value, "__notes__", []))
    on_disk = np.array(np.load(path, mmap_mode="r"))  # flushed: another reader sees the rows
    assert_close(on_disk[:9], expected[:9], rtol=1e-10)
    # Resume over the whole data: the first 9 examples are skipped, not recomputed.
    got = ak.per_example_gradients(
        model, batches, projector=projector, config=F64, out=out, start=9
    )
    assert got is out
    assert_close(np.load(path), expected, rtol=1e-10)


def test_errors_before_the_first_row_and_interrupts_carry_rows_written():
    model = mlp()
    X, y = data()
    rp = ak.RandomProjector(6, config=F64).fit(model)
    out = np.zeros((N, 6))
    shuffled = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="draws a new order on every pass") as info:
        ak.per_example_gradients(model, shuffled, projector=rp, out=out, start=5)
    assert info.value.rows_written == 5  # nothing new: the caller's own rows stand

    def interrupted():
        yield X[:4], y[:4]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        ak.per_example_gradients(model, interrupted(), projector=rp, out=out)
    assert info.value.rows_written == 4


@pytest.mark.parametrize(
    "container", ["tuple", "numpy", "dataset", "loader", "loader-drop-last", "list", "generator"]
)
@pytest.mark.parametrize("kind", ["none", "kronecker"])
def test_resume_equals_an_uninterrupted_fill(container, kind):
    model, seen = _rows_seen(mlp())
    projector = projectors(model)[kind]
    X, y = data()
    recording = _Recording(X, y)
    n = 12 if container == "loader-drop-last" else N  # batches of 4: the last example dropped
    make = {
        "tuple": lambda: (X, y),
        "numpy": lambda: (X.numpy(), y.numpy()),
        "dataset": lambda: recording,
        "loader": lambda: DataLoader(recording, batch_size=4),
        "loader-drop-last": lambda: DataLoader(recording, batch_size=4, drop_last=True),
        "list": lambda: [(X[i : i + 4], y[i : i + 4]) for i in range(0, N, 4)],
        "generator": lambda: ((X[i : i + 4], y[i : i + 4]) for i in range(0, N, 4)),
    }[container]
    expected = reference(model, projector)[:n]
    k = expected.shape[1]
    for start in (0, 5, 8, n):
        out = np.full((n, k), np.nan)
        out[:start] = 7.0  # rows a previous call wrote: left alone
        seen.clear()
        recording.loaded.clear()
        ak.per_example_gradients(model, make(), projector=projector, config=F64, out=out,
                                 start=start)  # fmt: skip
        assert (out[:start] == 7.0).all()
        if start < n:
            assert_close(out[start:], expected[start:], rtol=1e-10)
        if kind == "kronecker":  # hooked forward calls: the model saw n - start examples
            assert sum(seen) == n - start, (start, seen)
        if container in ("dataset", "loader", "loader-drop-last"):
            assert sorted(set(recording.loaded)) == list(range(start, n))  # never loaded


def test_start_is_checked():
    model, calls = counted(mlp())
    rp = ak.RandomProjector(6, config=F64).fit(model)
    out = np.zeros((N, 6))
    for start, match in [
        (-1, "'start' parameter of per_example_gradients must be an int >= 0. Got -1"),
        (2.0, "'start' parameter .* an int >= 0. Got 2.0"),
        (True, "'start' parameter .* an int >= 0. Got True"),
        (N + 1, "'start' argument .* at most the number of rows of 'out', 13. Got 14"),
    ]:
        with pytest.raises(ValueError, match=match):
            ak.per_example_gradients(model, data(), projector=rp, out=out, start=start)
    with pytest.raises(ValueError, match="need 'out'.* Got start=3 without 'out'"):
        ak.per_example_gradients(model, data(), projector=rp, start=3)
    with pytest.raises(ValueError, match="need 'out'"):
        ak.per_example_gradients(model, data(), checkpoint="progress.json")
    with pytest.raises(TypeError, match="'checkpoint' argument .* Got int"):
        ak.per_example_gradients(model, data(), projector=rp, out=out, checkpoint=3)
    assert not calls
    X, y = data()
    short = ((X[i : i + 4], y[i : i + 4]) for i in range(0, 8, 4))  # 8 examples, start 10
    with pytest.raises(ValueError, match="start at example 10, but 'data' yielded only 8"):
        ak.per_example_gradients(model, short, projector=rp, out=out, start=10)


def test_checkpoint_records_each_batch(tmp_path):
    model = mlp()
    rp = ak.RandomProjector(6, config=F64).fit(model)
    X, y = data()
    batches = [(X[i : i + 5], y[i : i + 5]) for i in range(0, N, 5)]  # 5, 5, 3
    progress = []
    out = np.zeros((N, 6))
    ak.per_example_gradients(model, batches, projector=rp, out=out, checkpoint=progress.append)
    assert progress == [5, 10, 13, 13]  # after each batch, then once complete
    path = tmp_path / "progress.json"
    ak.per_example_gradients(model, batches, projector=rp, out=out, checkpoint=path)
    record = json.loads(path.read_text())
    assert record == {
        "format": "attribkit.per_example_gradients.checkpoint/1",
        "rows_written": 13,
        "shape": [13, 6],
        "dtype": "float64",
        "complete": True,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporary left


_KILLED_FILL = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from cases import classification_data, mlp
import attribkit as ak

X, y = classification_data(n={n})
model = mlp()
cfg = ak.ComputeConfig(dtype="float64")
proj = ak.KroneckerProjector(in_dim=3, out_dim=2, config=cfg).fit(model)
out = np.lib.format.open_memmap({path!r}, mode="w+", dtype="float64", shape=({n}, proj.proj_dim_))

def batches():
    for i, start in enumerate(range(0, {n}, 3)):
        if i == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # no exception, no clean-up: kill -9
        yield X[start : start + 3], y[start : start + 3]

ak.per_example_gradients(model, batches(), projector=proj, out=out, checkpoint={ckpt!r})
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX")
def test_a_fill_killed_with_sigkill_resumes_from_its_checkpoint(tmp_path):
    path, ckpt = str(tmp_path / "g.npy"), str(tmp_path / "g.progress.json")
    tests = os.path.dirname(os.path.abspath(__file__))
    script = _KILLED_FILL.format(tests=tests, n=N, path=path, ckpt=ckpt, kill_at=3)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ak.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    record = json.loads(open(ckpt).read())
    assert record["rows_written"] == 9 and not record["complete"]  # batches 0, 1 and 2
    model = mlp()
    kp = ak.KroneckerProjector(in_dim=3, out_dim=2, config=F64).fit(model)
    out = np.load(path, mmap_mode="r+")
    X, y = data()
    batches = [(X[i : i + 3], y[i : i + 3]) for i in range(0, N, 3)]
    ak.per_example_gradients(model, batches, projector=kp, out=out, start=record["rows_written"],
                             checkpoint=ckpt)  # fmt: skip
    del out
    uninterrupted = ak.per_example_gradients(model, batches, projector=kp)
    assert_close(np.load(path), uninterrupted, rtol=1e-10)
    assert json.loads(open(ckpt).read())["complete"]
