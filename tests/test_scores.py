"""influence and self_influence: exact scores block by block, top-k, Pipelines, memmaps."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from reference import assert_close, damped_fisher
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline, make_pipeline

import attribkit as ak

F64 = ak.ComputeConfig(dtype="float64", progress=False)
#: A budget of a few rows: every call runs over many blocks.
TINY = ak.ComputeConfig(dtype="float64", progress=False, memory_budget=600)


def data(n=40, m=7, p=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, p, generator=g, dtype=torch.float64)
    T = torch.randn(m, p, generator=g, dtype=torch.float64)
    return G, T


def dense_scores(G, T, damping):
    return T @ torch.linalg.solve(damped_fisher(G, damping), G.T)


@pytest.mark.parametrize("config", [F64, TINY], ids=["one-block", "many-blocks"])
def test_influence_equals_dense_reference(config):
    G, T = data()
    ifvp = ak.ExplicitIFVP(damping=0.1, config=config).fit(G)
    scores = ak.influence(ifvp, G, T)
    assert isinstance(scores, torch.Tensor) and scores.shape == (7, 40)
    assert_close(scores, dense_scores(G, T, 0.1), rtol=1e-10)
    as_numpy = ak.influence(ifvp, G.numpy(), T.numpy())
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float64
    assert_close(as_numpy, scores, rtol=1e-12)


def test_blocks_really_are_many():
    G, T = data()
    ifvp = ak.ExplicitIFVP(damping=0.1, config=TINY).fit(G)
    from attribkit._scores import _block_rows

    assert _block_rows(ifvp, G, T.shape[0]) < G.shape[0] // 4


def test_influence_dict_vectors_equal_flat():
    G, T = data(p=7)
    D = {"a": G[:, :6].reshape(-1, 3, 2), "b": G[:, 6:]}
    Dt = {"a": T[:, :6].reshape(-1, 3, 2), "b": T[:, 6:]}
    ifvp = ak.ExplicitIFVP(damping=0.1, config=TINY).fit(D)
    assert_close(ak.influence(ifvp, D, Dt), dense_scores(G, T, 0.1), rtol=1e-10)
    assert_close(ak.self_influence(ifvp, D), dense_scores(G, G, 0.1).diagonal(), rtol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 40])
def test_top_k_equals_topk_of_full_matrix(k):
    G, T = data()
    ifvp = ak.ExplicitIFVP(damping=0.1, config=TINY).fit(G)
    full = ak.influence(ifvp, G, T)
    top_v, top_i, bot_v, bot_i = ak.influence(ifvp, G, T, top_k=k)
    ref_top = torch.topk(full, k, dim=1, largest=True)
    ref_bot = torch.topk(full, k, dim=1, largest=False)
    assert top_v.shape == top_i.shape == bot_v.shape == bot_i.shape == (7, k)
    assert top_i.dtype == torch.int64
    assert torch.equal(top_i, ref_top.indices) and torch.equal(bot_i, ref_bot.indices)
    assert_close(top_v, ref_top.values, rtol=1e-12)
    assert_close(bot_v, ref_bot.values, rtol=1e-12)
    exact = dense_scores(G, T, 0.1)
    assert_close(top_v, torch.topk(exact, k, dim=1).values, rtol=1e-10)
    # numpy in, numpy out
    np_top = ak.influence(ifvp, G.numpy(), T.numpy(), top_k=k)
    assert all(isinstance(a, np.ndarray) for a in np_top)
    assert np.array_equal(np_top[1], ref_top.indices.numpy())


def test_top_k_rejects_bad_values():
    G, T = data()
    ifvp = ak.ExplicitIFVP(damping=0.1, config=F64).fit(G)
    for bad in (0, 41, 2.5, "3"):
        with pytest.raises(ValueError, match="'top_k' parameter of influence"):
            ak.influence(ifvp, G, T, top_k=bad)


def test_self_influence_equals_diagonal():
    G, _ = data()
    for est in (
        ak.ExplicitIFVP(damping=0.1, config=TINY),
        ak.ExplicitIFVP(damping=0.1, solver="woodbury", config=TINY),
        ak.DataInfIFVP(layers=[2, 4], config=TINY),
    ):
        est.fit(G)
        diag = ak.influence(est, G, G).diagonal()
        got = ak.self_influence(est, G)
        assert got.shape == (40,)
        assert_close(got, diag, rtol=1e-10)
        assert_close(ak.self_influence(est, G.numpy()), diag, rtol=1e-10)
    assert_close(
        ak.self_influence(ak.ExplicitIFVP(damping=0.1, config=F64).fit(G), G),
        dense_scores(G, G, 0.1).diagonal(),
        rtol=1e-10,
    )


def test_pipeline_equals_manual_composition():
    G, T = data(p=30)
    pipe = make_pipeline(
        ak.RandomProjector(proj_dim=8, config=F64), ak.ExplicitIFVP(damping=0.1, config=TINY)
    ).fit(G)
    proj, ifvp = pipe[0], pipe[-1]
    manual = ak.influence(ifvp, proj.transform(G), proj.transform(T))
    assert_close(ak.influence(pipe, G, T), manual, rtol=1e-12)
    assert_close(ak.influence(pipe, G.numpy(), T.numpy()), manual, rtol=1e-12)
    top = ak.influence(pipe, G, T, top_k=2)
    assert torch.equal(top[1], torch.topk(manual, 2, dim=1).indices)
    assert_close(
        ak.self_influence(pipe, G), ak.self_influence(ifvp, proj.transform(G)), rtol=1e-12
    )
    # A one-step Pipeline is its IFVP.
    alone = Pipeline([("ifvp", ak.ExplicitIFVP(damping=0.1, config=F64))]).fit(G)
    assert_close(ak.influence(alone, G, T), dense_scores(G, T, 0.1), rtol=1e-10)


def test_what_is_not_an_ifvp_is_a_type_error():
    G, T = data()
    proj = ak.RandomProjector(proj_dim=4).fit(G)
    with pytest.raises(TypeError, match="must be a fitted attribkit IFVP.*Got RandomProjector"):
        ak.influence(proj, G, T)
    with pytest.raises(TypeError, match="Pipeline whose last step is RandomProjector"):
        ak.influence(make_pipeline(ak.RandomProjector(proj_dim=4)).fit(G), G, T)
    with pytest.raises(TypeError, match="Got str"):
        ak.self_influence("ifvp", G)
    with pytest.raises(NotFittedError):
        ak.influence(ak.ExplicitIFVP(damping=0.1), G, T)
    with pytest.raises(NotFittedError):
        ak.influence(make_pipeline(ak.ExplicitIFVP(damping=0.1)), G, T)


def test_a_users_own_ifvp_opts_in():
    class Identity(ak.BaseEstimator):
        _is_ifvp = True

        def __init__(self, config=None):
            self.config = config

        def _fit_array(self, G, config):
            pass

        def _transform(self, V):
            return V

    G, T = data()
    assert_close(ak.influence(Identity(config=F64).fit(G), G, T), T @ G.T, rtol=1e-12)
    assert not ak.RandomProjector._is_ifvp
    assert ak.ExplicitIFVP._is_ifvp and ak.DataInfIFVP._is_ifvp


def test_bad_vectors_name_the_argument():
    G, T = data()
    ifvp = ak.ExplicitIFVP(damping=0.1, config=F64).fit(G)
    with pytest.raises(ValueError, match="train_vectors has 5 features"):
        ak.influence(ifvp, G[:, :5], T)
    with pytest.raises(ValueError, match="test_vectors has 5 features"):
        ak.influence(ifvp, G, T[:, :5])
    bad = G.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="train_vectors contains NaN"):
        ak.influence(ifvp, bad, T)
    with pytest.raises(ValueError, match="2-D"):
        ak.influence(ifvp, G[0], T)
    with pytest.raises(ValueError, match="0 rows"):
        ak.self_influence(ifvp, G[:0])


def test_memmap_train_vectors_read_block_by_block(tmp_path):
    n, p = 3000, 50
    rng = np.random.default_rng(0)
    mm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float64, shape=(n, p))
    mm[:] = rng.normal(size=(n, p))
    mm.flush()
    train = np.load(tmp_path / "g.npy", mmap_mode="r")
    T = rng.normal(size=(4, p))
    cfg = ak.ComputeConfig(dtype="float64", progress=False, memory_budget=64 * 2**10)
    ifvp = ak.ExplicitIFVP(damping=0.1, config=cfg).fit(train[:500])
    tracemalloc.start()
    try:
        scores = ak.influence(ifvp, train, T)
        top = ak.influence(ifvp, train, T, top_k=5)
        diag = ak.self_influence(ifvp, train)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < train.nbytes / 4  # numpy never copied the whole 1.2 MB file
    g = torch.from_numpy(np.array(train[:500]))
    ref = dense_scores(g, torch.from_numpy(T), 0.1)
    assert_close(scores[:, :500], ref, rtol=1e-10)
    assert np.array_equal(top[1], np.argsort(-scores, axis=1)[:, :5])
    assert_close(diag[:500], dense_scores(g, g, 0.1).diagonal(), rtol=1e-10)


def test_progress_bar_over_many_blocks(capsys):
    G, T = data()
    cfg = ak.ComputeConfig(dtype="float64", progress=True, memory_budget=600)
    ifvp = ak.ExplicitIFVP(damping=0.1, config=cfg).fit(G)
    ak.influence(ifvp, G, T)
    assert "influence" in capsys.readouterr().err
    ak.self_influence(ifvp, G)
    assert "self_influence" in capsys.readouterr().err
    quiet = ak.ExplicitIFVP(damping=0.1, config=TINY).fit(G)
    ak.influence(quiet, G, T)
    assert capsys.readouterr().err == ""


def test_many_test_vectors_are_preconditioned_in_blocks():
    G, _ = data()
    T = torch.randn(2500, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ifvp = ak.ExplicitIFVP(damping=0.1, config=F64).fit(G)
    assert_close(ak.influence(ifvp, G, T), dense_scores(G, T, 0.1), rtol=1e-10)
    assert_close(
        ak.self_influence(ifvp, T),
        dense_scores(G, T, 0.1).new_tensor(
            [float(t @ torch.linalg.solve(damped_fisher(G, 0.1), t)) for t in T]
        ),
        rtol=1e-10,
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_blocked_scores_equal_one_shot_in_the_same_container(dtype):
    G, T = data(n=53, m=9, p=6)
    budget = ak.ComputeConfig(dtype=dtype, progress=False, memory_budget=100)  # 1-2 rows a block
    one = ak.ComputeConfig(dtype=dtype, progress=False)
    tiny = ak.ExplicitIFVP(damping=0.1, config=budget).fit(G)
    roomy = ak.ExplicitIFVP(damping=0.1, config=one).fit(G)
    rtol = 1e-12 if dtype == "float64" else 1e-5
    for kind, (g, t) in {"numpy": (G.numpy(), T.numpy()), "torch": (G, T)}.items():
        blocked, one_shot = ak.influence(tiny, g, t), ak.influence(roomy, g, t)
        if kind == "numpy":
            assert isinstance(blocked, np.ndarray) and blocked.dtype == np.dtype(dtype)
            assert blocked.flags.c_contiguous and blocked.flags.writeable
        else:
            assert isinstance(blocked, torch.Tensor) and blocked.dtype == getattr(torch, dtype)
            assert blocked.is_contiguous()
        assert blocked.shape == (9, 53)
        assert_close(blocked, one_shot, rtol=rtol)
        train = g.T if kind == "numpy" else g.T.to(blocked.dtype)
        assert_close(blocked, roomy.transform(t) @ train, rtol=rtol)


def test_blocks_fit_the_budget_and_the_result_is_not_charged(monkeypatch):
    """Scores go straight into the result (output); a top-k block's scores are charged."""
    import attribkit._scores as scores_module

    G, T = data(n=200, m=7, p=6)
    row = 2 * 6 * 8  # raw copy + flat tensor of one float64 row
    budget = 40 * row
    cfg = ak.ComputeConfig(dtype="float64", progress=False, memory_budget=budget)
    ifvp = ak.ExplicitIFVP(damping=0.1, config=cfg).fit(G)
    sizes = []
    real_rows = scores_module._rows
    monkeypatch.setattr(
        scores_module, "_rows", lambda x, a, b: sizes.append(b - a) or real_rows(x, a, b)
    )
    ak.influence(ifvp, G, T)
    assert max(sizes) * row <= budget and max(sizes) == 40 and sum(sizes) == 200
    sizes.clear()
    ak.influence(ifvp, G, T, top_k=3)
    assert max(sizes) * (row + 7 * 8) + 4 * 7 * 3 * 16 <= budget and sum(sizes) == 200


def test_one_block_of_copies_at_a_time(tmp_path):
    """The numpy copies alive at once are one block's, as the budget counts them."""
    n, p = 3000, 50
    mm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float64, shape=(n, p))
    mm[:] = np.random.default_rng(1).normal(size=(n, p))
    mm.flush()
    train = np.load(tmp_path / "g.npy", mmap_mode="r")
    budget = 64 * 2**10  # a block's raw copy (numpy) is half of it, its flat tensor the rest
    cfg = ak.ComputeConfig(dtype="float64", progress=False, memory_budget=budget)
    ifvp = ak.ExplicitIFVP(damping=0.1, config=cfg).fit(train[:200])
    T = np.asarray(train[:3])
    for top_k in (None, 4):
        tracemalloc.start()
        try:
            ak.influence(ifvp, train, T, top_k=top_k)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < budget, (top_k, peak)  # two blocks alive: 82 kB and 69 kB


# ----------------------------------------------------------------- overflow (API section 9)
F32_TINY = ak.ComputeConfig(dtype="float32", progress=False, memory_budget=600)
OVERFLOW = r"ExplicitIFVP produced non-finite {} from finite vectors: .*config\.dtype='float32'"


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("config", [ak.ComputeConfig(dtype="float32"), F32_TINY])
def test_influence_raises_when_finite_vectors_overflow_the_dtype(config, top_k):
    G, _ = data()
    G = G.float()
    ifvp = ak.ExplicitIFVP(damping="auto", config=config).fit(G)
    # The issue's case: every score ~1e40 > float32's max, although every input is finite.
    with pytest.raises(ValueError, match=OVERFLOW.format("influence scores")):
        ak.influence(ifvp, G * 1e20, G[:3] * 1e20, top_k=top_k)
    # One overflowing training row, in the last block when blocks are many: no
    # ranking is returned with an inf or NaN in it.
    train = G.clone()
    train[-1] *= 1e38
    with pytest.raises(ValueError, match=OVERFLOW.format("influence scores")):
        ak.influence(ifvp, train, G[:3], top_k=top_k)
    # Test vectors whose preconditioned values already overflow: 1e37 along a
    # direction the Fisher lacks is multiplied by 1 / damping = 1e3.
    flat = G.clone()
    flat[:, 0] = 0
    ifvp_flat = ak.ExplicitIFVP(damping=1e-3, config=config).fit(flat)
    test = torch.zeros(3, flat.shape[1])
    test[:, 0] = 1e37
    with pytest.raises(ValueError, match=OVERFLOW.format("influence scores")):
        ak.influence(ifvp_flat, flat, test, top_k=top_k)
    # self_influence says it the same way.
    with pytest.raises(ValueError, match=OVERFLOW.format("self-influence")):
        ak.self_influence(ifvp, G * 1e20)


def test_large_finite_scores_are_not_an_overflow():
    # 40 scores near float32's max, all positive, so their sum overflows: each
    # is finite, so they are returned (the cheap test is a sum; a non-finite
    # sum is checked entry by entry before anything is called an overflow).
    G, T = data(n=40, m=1)
    ifvp = ak.ExplicitIFVP(damping=0.1, config=F64).fit(G)
    train = T.repeat(40, 1) * torch.linspace(0.5, 1.0, 40, dtype=torch.float64)[:, None]
    exact = ak.influence(ifvp, train, T)
    assert bool((exact > 0).all())
    scale = float((1e38 / exact.max()).sqrt())
    cfg32 = ak.ComputeConfig(dtype="float32", progress=False)
    ifvp32 = ak.ExplicitIFVP(damping=0.1, config=cfg32).fit(G)
    scores = ak.influence(ifvp32, train * scale, T * scale)
    assert bool(torch.isfinite(scores).all()) and not bool(torch.isfinite(scores.sum()))
    assert_close(scores, exact * scale**2, rtol=1e-6)
    top, top_idx, bottom, bottom_idx = ak.influence(ifvp32, train * scale, T * scale, top_k=3)
    assert top_idx[0].tolist() == [39, 38, 37] and bottom_idx[0].tolist() == [0, 1, 2]
    assert_close(top, scores[:, [39, 38, 37]], rtol=0)
    assert_close(bottom, scores[:, [0, 1, 2]], rtol=0)
