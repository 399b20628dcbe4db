"""ArnoldiProjector against dense truths: the Hessian by torch.func.hessian, G^T G / n by eigh."""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from cases import case, classification_data, mlp, regression_data
from reference import assert_close, dense_hessian
from torch.utils.data import DataLoader, TensorDataset

import attribkit as ak
import attribkit._compute.distributed as dist_mod
from attribkit.projection.arnoldi import eigenpairs, gram_matvec, lanczos, ritz_pairs

F64 = ak.ComputeConfig(dtype="float64")
#: The test MLP has 39 parameters; its Hessian has 5 zero eigenvalues and is indefinite.
P = 39


def top_by_magnitude(A, k):
    values, vectors = torch.linalg.eigh(A)
    order = torch.argsort(values.abs(), descending=True)[:k]
    return values[order], vectors[:, order].T


def projector_onto(rows):
    """Orthogonal projector onto the span of the rows of ``rows`` (any norm)."""
    Q, _ = torch.linalg.qr(rows.T.double())
    return Q @ Q.T


def fit_quiet(est, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return est.fit(*args)


@pytest.fixture(scope="module")
def problem():
    model = mlp()
    X, y = classification_data()
    return model, X, y, dense_hessian(model, X, y)


# ------------------------------------------------------------------ model mode vs dense Hessian
@pytest.mark.parametrize("k", [4, 10, 20])
def test_eigenpairs_equal_dense_hessian(problem, k):
    model, X, y, H = problem
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=k, max_iter=100, config=F64), model, (X, y))
    values, vectors = top_by_magnitude(H, k)
    assert est.n_iter_ < P  # invariant subspace found before max_iter (and before p)
    assert est.eigenvalues_.shape == (k,) and est.eigenvectors_.shape == (k, P)
    assert_close(est.eigenvalues_, values, rtol=1e-10)
    # The same subspace, and orthonormal rows that are eigenvectors of H.
    assert_close(
        projector_onto(est.eigenvectors_), projector_onto(vectors), rtol=1e-10, atol=1e-10
    )
    U = est.eigenvectors_
    assert_close(U @ U.T, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert_close(U @ H, est.eigenvalues_[:, None] * U, rtol=1e-10, atol=1e-12)


def test_ihvp_and_transform_equal_restricted_dense_inverse(problem):
    model, X, y, H = problem
    k = 10
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=k, config=F64), model, (X, y))
    values, vectors = top_by_magnitude(H, k)
    V = torch.randn(6, P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # ihvp: all k signed pairs.
    expected = V @ vectors.T @ torch.diag(1 / values) @ vectors
    assert_close(est.ihvp(V), expected, rtol=1e-10)
    # transform: the positive ones, scaled by 1/sqrt(eigenvalue).
    pos = values > 0
    assert est.proj_dim_ == int(pos.sum()) == 6
    Z = est.transform(V)
    assert Z.shape == (6, est.proj_dim_)
    gram = V @ vectors[pos].T @ torch.diag(1 / values[pos]) @ vectors[pos] @ V.T
    assert_close(Z @ Z.T, gram, rtol=1e-10)
    # Column by column, up to the eigenvectors' signs.
    dense_cols = (V @ vectors[pos].T) / values[pos].sqrt()
    assert_close(Z.abs(), dense_cols.abs(), rtol=1e-10)


def test_batchnorm_model_uses_running_statistics():
    """The Hessian is the eval-mode one (running statistics); the model keeps its mode."""
    model, X, y = case("batchnorm")
    model.train()
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=5, max_iter=200, config=F64), model, (X, y))
    assert model.training
    H = dense_hessian(model.eval(), X, y)
    values, _ = top_by_magnitude(H, 5)
    assert_close(est.eigenvalues_, values, rtol=1e-10)


def test_ihvp_containers(problem):
    model, X, y, _ = problem
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=8, config=F64), model, (X, y))
    grads = ak.per_example_gradients(model, (X, y), config=F64, flatten=False)
    flat = ak.per_example_gradients(model, (X, y), config=F64)
    out = est.ihvp(grads)
    assert isinstance(out, dict) and list(out) == list(est.param_shapes_)
    assert all(out[n].shape == grads[n].shape for n in grads)
    out_flat = torch.cat([v.reshape(12, -1) for v in out.values()], 1)
    assert_close(out_flat, est.ihvp(flat), rtol=1e-12)
    out_np = est.ihvp(flat.numpy())
    assert isinstance(out_np, np.ndarray) and out_np.shape == (12, P)
    assert_close(out_np, out_flat, rtol=1e-12)
    assert_close(est.transform(grads), est.transform(flat), rtol=1e-12)
    # Default config: float32 out whatever the input dtype.
    est32 = fit_quiet(ak.ArnoldiProjector(proj_dim=8), model, (X, y))
    assert est32.ihvp(flat.numpy()).dtype == np.float32
    assert est32.transform(flat).dtype == torch.float32
    assert est32.eigenvectors_.dtype == torch.float32
    assert_close(est32.ihvp(flat), out_flat, rtol=1e-5)


def test_projector_of_per_example_gradients(problem):
    model, X, y, _ = problem
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=10, config=F64), model, (X, y))
    direct = ak.per_example_gradients(model, (X, y), config=F64, projector=est)
    assert direct.shape == (12, est.proj_dim_)
    full = ak.per_example_gradients(model, (X, y), config=F64)
    assert_close(direct, est.transform(full), rtol=1e-12)
    names = est.get_feature_names_out()
    assert list(names) == [f"arnoldiprojector{i}" for i in range(est.proj_dim_)]


def test_rev_fwd_equals_rev_rev(problem):
    model, X, y, _ = problem
    a = fit_quiet(ak.ArnoldiProjector(proj_dim=12, mode="rev-fwd", config=F64), model, (X, y))
    b = fit_quiet(ak.ArnoldiProjector(proj_dim=12, mode="rev-rev", config=F64), model, (X, y))
    assert a.n_iter_ == b.n_iter_
    assert_close(a.eigenvalues_, b.eigenvalues_, rtol=1e-12)
    assert_close(a.eigenvectors_, b.eigenvectors_, rtol=1e-10)
    # One batch keeps its linearisation between iterations; several do not.
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    c = fit_quiet(ak.ArnoldiProjector(proj_dim=12, mode="rev-rev", config=F64), model, loader)
    assert_close(c.eigenvalues_, b.eigenvalues_, rtol=1e-12)
    assert_close(c.eigenvectors_, b.eigenvectors_, rtol=1e-10)


def _hvp(model, data, mode="rev-fwd"):
    from attribkit._compute.curvature import MeanLossHVP

    return MeanLossHVP(model, data, mode=mode, config=F64)


def test_rev_fwd_one_batch_equals_streamed(problem):
    model, X, y, H = problem
    one = _hvp(model, (X, y))  # one batch of 12
    loader = DataLoader(TensorDataset(X, y), batch_size=5)  # 5 + 5 + 2
    streamed = _hvp(model, loader)
    plain = _hvp(model, (X, y), mode="rev-rev")
    vs = torch.randn(4, P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    first = one(vs[0])
    for v in vs:
        out = one(v)
        assert_close(out, streamed(v), rtol=1e-10)
        assert_close(out, H @ v, rtol=1e-10)
        assert_close(out, plain(v), rtol=1e-10)
    assert streamed._kept is None and one._kept is None  # rev-fwd keeps no graph
    assert plain._kept is not None  # rev-rev on one batch keeps its pullback
    assert torch.equal(first, one(vs[0]))  # the same path every pass: bit for bit


def test_code_path_never_depends_on_the_clock(problem, monkeypatch):
    """API section 9: a slow (or busy) machine takes the very path a fast one takes.

    Before, rev-fwd on one batch switched to ``torch.func.linearize`` once its
    plain passes had taken 0.2 s (which segfaulted for loss="mse").
    """
    import time

    model, X, y, H = problem
    clock = [0.0]

    def slow_clock():  # every reading 1000 s after the last: the slowest machine
        clock[0] += 1000.0
        return clock[0]

    traced = []
    monkeypatch.setattr(time, "perf_counter", slow_clock)
    monkeypatch.setattr(time, "monotonic", slow_clock)
    monkeypatch.setattr(time, "time", slow_clock)
    monkeypatch.setattr(torch.func, "linearize", lambda *a, **k: traced.append(a))
    hvp = _hvp(model, (X, y))
    v = torch.linspace(-1, 1, P, dtype=torch.float64)
    results = [hvp(v) for _ in range(4)]
    assert traced == []
    for r in results:
        assert torch.equal(r, results[0])
        assert_close(r, H @ v, rtol=1e-10)
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=10, config=F64), model, (X, y))
    assert traced == []
    assert_close(est.eigenvalues_, top_by_magnitude(H, 10)[0], rtol=1e-10)


_MSE_SUBSET_SCRIPT = """
import json, torch, attribkit as ak
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
X, y = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
for mode in ("rev-fwd", "rev-rev"):
    est = ak.ArnoldiProjector(proj_dim=5, loss="mse", params=["0.weight", "0.bias"], mode=mode,
                              config=ak.ComputeConfig(dtype="float64"))
    est.fit(model, (X, y))
    print(json.dumps([mode, est.eigenvalues_.tolist()]))
"""


def test_mse_params_subset_in_a_subprocess():
    """The fit that segfaulted under the timing-based linearisation, isolated in a
    subprocess so that a crash fails this test instead of killing the suite."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _MSE_SUBSET_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stderr[-3000:]}"
    results = dict(json.loads(line) for line in proc.stdout.strip().splitlines())
    torch.manual_seed(0)  # the script's model and data, rebuilt here
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    X, y = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    H = dense_hessian(model, X, y, loss="mse", params=["0.weight", "0.bias"])
    expected = top_by_magnitude(H, 5)[0]
    for mode in ("rev-fwd", "rev-rev"):
        assert_close(torch.tensor(results[mode], dtype=torch.float64), expected, rtol=1e-10)


def test_batch_size_invariance_with_ragged_loader(problem):
    model, X, y, H = problem
    ref = fit_quiet(ak.ArnoldiProjector(proj_dim=10, config=F64), model, (X, y))  # one batch of 64
    loader = DataLoader(TensorDataset(X, y), batch_size=5)  # 5 + 5 + 2: ragged last batch
    rag = fit_quiet(ak.ArnoldiProjector(proj_dim=10, config=F64), model, loader)
    fours = ak.ComputeConfig(dtype="float64", batch_size=4)
    by_four = fit_quiet(ak.ArnoldiProjector(proj_dim=10, config=fours), model, (X, y))
    for est in (rag, by_four):
        assert est.n_samples_ == 12 and est.n_iter_ == ref.n_iter_
        assert_close(est.eigenvalues_, ref.eigenvalues_, rtol=1e-12)
        assert_close(est.eigenvectors_, ref.eigenvectors_, rtol=1e-10)
    assert_close(rag.eigenvalues_, top_by_magnitude(H, 10)[0], rtol=1e-10)


def test_damping_shifts_eigenvalues(problem):
    model, X, y, H = problem
    d = 0.3
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=10, damping=d, config=F64), model, (X, y))
    shifted = H + d * torch.eye(P, dtype=torch.float64)
    values, vectors = top_by_magnitude(shifted, 10)
    assert_close(est.eigenvalues_, values, rtol=1e-10)
    assert_close(projector_onto(est.eigenvectors_), projector_onto(vectors), atol=1e-10)
    # Array mode: the ordering is preserved (PSD), so the shift is entrywise.
    G = torch.randn(40, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base = ak.ArnoldiProjector(proj_dim=9, config=F64).fit(G)
    damped = ak.ArnoldiProjector(proj_dim=9, damping=d, config=F64).fit(G)
    assert_close(damped.eigenvalues_, base.eigenvalues_ + d, rtol=1e-12)
    assert_close(damped.eigenvectors_, base.eigenvectors_, rtol=1e-9)


def test_params_subset_and_mse():
    model = mlp(out=2)
    X, y = regression_data()
    names = ["0.weight", "0.bias"]
    est = fit_quiet(
        ak.ArnoldiProjector(proj_dim=5, loss="mse", params=names, config=F64), model, (X, y)
    )
    H = dense_hessian(model, X, y, loss="mse", params=names)
    assert list(est.param_shapes_) == names and est.n_features_in_ == 24
    assert_close(est.eigenvalues_, top_by_magnitude(H, 5)[0], rtol=1e-10)


# ------------------------------------------------------------------ array mode
def test_array_mode_equals_eigh_of_gram():
    G = torch.randn(30, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gram = G.T @ G / 30
    est = ak.ArnoldiProjector(proj_dim=6, config=F64).fit(G.numpy())
    values, vectors = top_by_magnitude(gram, 6)
    assert est.n_iter_ == 12 and est.n_samples_ == 30 and est.proj_dim_ == 6
    assert_close(est.eigenvalues_, values, rtol=1e-10)
    assert_close(projector_onto(est.eigenvectors_), projector_onto(vectors), atol=1e-10)
    V = G[:4]
    inv = vectors.T @ torch.diag(1 / values) @ vectors
    assert_close(est.ihvp(V), V @ inv, rtol=1e-10)
    Z = est.transform(V)
    assert_close(Z @ Z.T, V @ inv @ V.T, rtol=1e-10)
    # float32 gradients: the products still run in float64.
    est32 = ak.ArnoldiProjector(proj_dim=6, config=F64).fit(G.float())
    G32 = G.float().double()
    assert_close(est32.eigenvalues_, top_by_magnitude(G32.T @ G32 / 30, 6)[0], rtol=1e-10)


def test_array_mode_rank_deficient_keeps_what_there_is():
    G = torch.randn(4, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with pytest.warns(UserWarning, match="found 4 eigenpair.*fewer than proj_dim=6"):
        est = ak.ArnoldiProjector(proj_dim=6, config=F64).fit(G)
    assert est.n_iter_ == 5  # the 4-dimensional range plus one null direction, then invariant
    values = torch.linalg.eigvalsh(G @ G.T / 4).flip(0)
    assert_close(est.eigenvalues_, values, rtol=1e-10)
    assert torch.isfinite(est.ihvp(G)).all() and torch.isfinite(est.transform(G)).all()


def test_zero_curvature_raises():
    with pytest.raises(ValueError, match="zero to rounding.*damping > 0"):
        ak.ArnoldiProjector(proj_dim=2).fit(np.zeros((5, 3)))


def test_gram_matvec_blocks_equal_whole():
    G = torch.randn(50, 7, generator=torch.Generator().manual_seed(5))
    v = torch.randn(7, dtype=torch.float64)
    whole = gram_matvec(G, 0.5)(v)
    blocks = gram_matvec(G, 0.5, memory_budget=8 * 7 * 3)(v)  # 3 rows per block
    G64 = G.double()
    assert_close(whole, G64.T @ (G64 @ v) / 50 + 0.5 * v, rtol=1e-14)
    assert_close(blocks, whole, rtol=1e-14)


# ------------------------------------------------------------------ indefinite, defaults, NaN
def test_indefinite_hessian_drops_negative_directions_from_transform(problem):
    model, X, y, _ = problem
    with pytest.warns(UserWarning, match="4 of the 10 kept eigenvalues are negative"):
        est = ak.ArnoldiProjector(proj_dim=10, config=F64).fit(model, (X, y))
    assert int((est.eigenvalues_ < 0).sum()) == 4 and est.proj_dim_ == 6
    V = torch.randn(3, P, dtype=torch.float64)
    assert est.transform(V).shape == (3, 6)
    # ihvp keeps them, signed.
    neg = est.eigenvectors_[est.eigenvalues_ < 0]
    out = est.ihvp(neg)
    assert_close(out, neg / est.eigenvalues_[est.eigenvalues_ < 0][:, None], rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_defaults_give_no_nan(problem, dtype):
    _, X, y, _ = problem
    model = mlp(dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = ak.ArnoldiProjector().fit(model, (X, y))  # float64 inputs cast to the model's dtype
    messages = [str(w.message) for w in caught]
    assert any("fewer than proj_dim=100" in m for m in messages)
    assert any("eigenvalues are negative" in m for m in messages)
    grads = ak.per_example_gradients(model, (X.to(dtype), y))
    for value in (est.eigenvalues_, est.eigenvectors_, est.transform(grads), est.ihvp(grads)):
        assert torch.isfinite(value).all()
    assert 0 < est.proj_dim_ <= est.eigenvalues_.numel() <= est.n_iter_ <= P


def test_float32_basis_stays_orthogonal():
    # dattri 0.1.0's arnoldi_project loses orthogonality in float32 after ~19 iterations.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    X = torch.randn(64, 10)
    y = torch.randint(0, 4, (64,))
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=40, max_iter=80), model, (X, y))
    assert est.n_iter_ == 80
    U = est.eigenvectors_.double()
    assert_close(U @ U.T, torch.eye(U.shape[0], dtype=torch.float64), atol=1e-6)
    # No ghost copies: the top eigenvalues match the dense Hessian to float32 rounding.
    H = dense_hessian(model.double(), X.double(), y)
    values = top_by_magnitude(H, 10)[0]
    assert_close(est.eigenvalues_[:10], values, rtol=1e-5)


# ------------------------------------------------------------------ iteration, determinism
def test_max_iter_limits_iterations_and_top_converges_first(problem):
    model, X, y, H = problem
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=3, max_iter=20, config=F64), model, (X, y))
    assert est.n_iter_ == 20
    top = top_by_magnitude(H, 1)[0]
    assert abs(float(est.eigenvalues_[0] - top[0])) < 1e-6 * abs(float(top[0]))


def test_deterministic_and_seed_independent_when_converged(problem):
    model, X, y, _ = problem
    a = fit_quiet(ak.ArnoldiProjector(proj_dim=10, config=F64), model, (X, y))
    b = fit_quiet(ak.ArnoldiProjector(proj_dim=10, config=F64), model, (X, y))
    assert torch.equal(a.eigenvalues_, b.eigenvalues_)
    assert torch.equal(a.eigenvectors_, b.eigenvectors_)
    c = fit_quiet(ak.ArnoldiProjector(proj_dim=10, seed=7, config=F64), model, (X, y))
    assert_close(c.eigenvalues_, a.eigenvalues_, rtol=1e-10)


def test_norm_constant_scales_as_in_the_seed(problem):
    model, X, y, _ = problem
    c = 3.0
    one = fit_quiet(ak.ArnoldiProjector(proj_dim=8, config=F64), model, (X, y))
    big = fit_quiet(ak.ArnoldiProjector(proj_dim=8, norm_constant=c, config=F64), model, (X, y))
    assert_close(big.eigenvalues_, one.eigenvalues_, rtol=1e-14)
    assert_close(
        big.eigenvectors_.norm(dim=1), torch.full((8,), c, dtype=torch.float64), rtol=1e-12
    )
    V = torch.randn(3, P, dtype=torch.float64)
    assert_close(big.transform(V), c * one.transform(V), rtol=1e-12)
    assert_close(big.ihvp(V), c**2 * one.ihvp(V), rtol=1e-12)


def test_one_all_reduce_per_iteration(problem, monkeypatch):
    # A fake two-rank group with identical shards: every reduction doubles.
    # Sums and counts double together, so the fit must equal the one-process fit.
    model, X, y, _ = problem
    calls = []

    class Doubling(dist_mod.Reducer):
        def __init__(self):
            super().__init__(False)
            self.active, self.world_size = True, 2

        def sum_(self, *tensors):
            calls.append(len(tensors))
            for t in tensors:
                t.mul_(2)

        def _all_reduce(self, t, op=None):  # any other collective the pass makes
            t.mul_(2)

        def _gather_objects(self, obj):
            return [obj, obj]

    monkeypatch.setattr(dist_mod, "reducer", lambda *args, **kwargs: Doubling())
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=10, config=F64), model, (X, y))
    monkeypatch.undo()
    ref = fit_quiet(ak.ArnoldiProjector(proj_dim=10, config=F64), model, (X, y))
    assert calls == [1] * est.n_iter_  # one collective (one tensor) per iteration
    assert est.n_samples_ == 24
    assert_close(est.eigenvalues_, ref.eigenvalues_, rtol=1e-14)


def test_core_lanczos_on_a_callable():
    # The core takes any symmetric matvec: here the Hessian of f(x) = sum(x^4) / 4 + x^T A x / 2.
    g = torch.Generator().manual_seed(6)
    B = torch.randn(8, 8, generator=g, dtype=torch.float64)
    A = B @ B.T
    x = torch.randn(8, generator=g, dtype=torch.float64)
    dense = A + torch.diag(3 * x**2)

    def f(z):
        return (z**4).sum() / 4 + z @ A @ z / 2

    def matvec(v):
        return torch.func.jvp(torch.func.grad(f), (x,), (v,))[1]

    res = lanczos(matvec, 8, max_iter=50, seed=1)
    assert res.n_iter == 8 and res.invariant
    values, vectors = ritz_pairs(res)
    assert_close(values, torch.linalg.eigvalsh(dense).flip(0), rtol=1e-10)
    assert_close(vectors @ dense, values[:, None] * vectors, rtol=1e-10, atol=1e-12)
    top, top_vectors, _, n_zero = eigenpairs(matvec, 8, 3, max_iter=50)
    assert n_zero == 0 and top.shape == (3,) and top_vectors.shape == (3, 8)
    # A matvec that returns its input (the identity) must not corrupt the basis.
    ident = lanczos(lambda v: v, 8, max_iter=5)
    assert ident.n_iter == 1 and ident.invariant
    values, vectors = ritz_pairs(ident)
    assert_close(values, torch.ones(1, dtype=torch.float64), rtol=1e-15)
    assert_close(vectors.norm(dim=1), torch.ones(1, dtype=torch.float64), rtol=1e-15)
    with pytest.raises(ValueError, match=r"must return a \(8,\) tensor"):
        lanczos(lambda v: v[:4], 8)
    with pytest.raises(ValueError, match="not finite"):
        lanczos(lambda v: v * float("nan"), 8)


# ------------------------------------------------------------------ the model is left alone
def test_model_left_as_it_was():
    model = mlp()
    model.train()
    model[0].bias.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    X, y = classification_data()
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=4, config=F64), model, (X, y))
    assert model.training and not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert "0.bias" not in est.param_shapes_  # frozen parameters are not differentiated
    # A failing fit restores the mode too.
    with pytest.raises(ValueError):
        ak.ArnoldiProjector(loss=lambda out, t: out.sum()).fit(model, (X, y))
    assert model.training


def test_dropout_model_is_evaluated_in_eval_mode():
    torch.manual_seed(0)
    body = [torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(6, 3)]
    model = torch.nn.Sequential(*body).double().train()
    X, y = classification_data()
    a = fit_quiet(ak.ArnoldiProjector(proj_dim=5, config=F64), model, (X, y))
    b = fit_quiet(ak.ArnoldiProjector(proj_dim=5, config=F64), model.eval(), (X, y))
    assert torch.equal(a.eigenvalues_, b.eigenvalues_)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(proj_dim=0), "'proj_dim' parameter of ArnoldiProjector must be an int >= 1"),
        (dict(max_iter=0), "'max_iter' parameter .* an int >= 1. Got 0 "),
        (dict(damping=-1.0), "'damping' parameter .* a float >= 0. Got -1.0"),
        (dict(tol=-1e-3), "'tol' parameter"),
        (dict(norm_constant=0.0), "'norm_constant' parameter .* a float > 0"),
        (dict(mode="fwd-fwd"), "'mode' parameter .* 'rev-fwd', 'rev-rev'. Got 'fwd-fwd'"),
        (dict(seed=1.5), "'seed' parameter"),
        (dict(loss="hinge"), "'loss' parameter"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ak.ArnoldiProjector(**kwargs).fit(np.eye(3))


def test_bad_data():
    model, (X, y) = mlp(), classification_data()
    with pytest.raises(ValueError, match="re-iterable.*generator"):
        ak.ArnoldiProjector().fit(model, ((X[i : i + 2], y[i : i + 2]) for i in range(0, 12, 2)))
    with pytest.raises(ValueError, match="'data' argument is required"):
        ak.ArnoldiProjector().fit(model)
    with pytest.raises(ValueError, match="empty"):
        ak.ArnoldiProjector().fit(model, [])
    with pytest.raises(ValueError, match="params"):
        ak.ArnoldiProjector(params=["nope"]).fit(model, (X, y))


def test_memory_refused_before_allocating(monkeypatch):
    from attribkit._compute import budget

    monkeypatch.setattr(budget, "available_bytes", lambda device: 1000)
    cfg = ak.ComputeConfig(memory_budget=1000)
    G = np.ones((3, 40))  # basis 8 * 40 * 40 = 12,800 bytes > both limits
    with pytest.raises(ValueError, match="Krylov basis of max_iter x p = 40 x 40 .* max_iter"):
        ak.ArnoldiProjector(config=cfg).fit(G)
    est = fit_quiet(ak.ArnoldiProjector(max_iter=3, config=cfg), G)  # 960 bytes: fits
    assert est.n_iter_ == 2  # rank one: one eigenpair and one null direction


def test_pickle_keeps_ihvp(problem):
    model, X, y, _ = problem
    est = fit_quiet(ak.ArnoldiProjector(proj_dim=6, config=F64), model, (X, y))
    V = torch.randn(2, P, dtype=torch.float64)
    loaded = pickle.loads(pickle.dumps(est))
    assert_close(loaded.ihvp(V), est.ihvp(V), rtol=0)
    assert_close(loaded.transform(V), est.transform(V), rtol=0)
    assert math.isclose(float(loaded.eigenvalues_[0]), float(est.eigenvalues_[0]))


# ------------------------------------------------------------------ errors with context
class _NoJvpTanh(torch.autograd.Function):
    """tanh as a custom Function with a backward and no jvp: no forward-mode rule."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _Net(torch.nn.Module):
    """Linear, tanh, Linear; ``tanh`` may be the custom one, or the model may fail."""

    def __init__(self, custom=False, fail_rows=None):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(4, 5).double(), torch.nn.Linear(5, 3).double()
        self.custom, self.fail_rows = custom, fail_rows

    def forward(self, x):
        if x.shape[0] == self.fail_rows:
            raise RuntimeError(f"my layer cannot take {self.fail_rows} rows")
        h = self.a(x)
        return self.b(_NoJvpTanh.apply(h) if self.custom else torch.tanh(h))


def _net_data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (8,), generator=g
    )


@pytest.mark.parametrize("mode", ["rev-fwd", "rev-rev"])
def test_a_model_error_is_reported_as_itself_with_its_batch(mode):
    # Batches of 3, 3, 2: the model fails on the last one only. Not blamed on forward-mode AD.
    cfg = ak.ComputeConfig(dtype="float64", batch_size=3)
    with pytest.raises(ValueError) as info:
        ak.ArnoldiProjector(proj_dim=2, mode=mode, config=cfg).fit(_Net(fail_rows=2), _net_data())
    message = str(info.value)
    assert "failed on batch 2 of 'data' (inputs of shape (2, 4)" in message
    assert "RuntimeError: my layer cannot take 2 rows" in message
    assert "forward-mode" not in message and "use mode='rev-rev'" not in message


def test_an_operator_without_forward_rule_suggests_rev_rev():
    cfg = ak.ComputeConfig(dtype="float64", batch_size=3)
    X, y = _net_data()
    with pytest.raises(RuntimeError, match="no forward-mode rule; use mode='rev-rev'"):
        ak.ArnoldiProjector(proj_dim=3, config=cfg).fit(_Net(custom=True), (X, y))
    # ... which then gives the eigenpairs of the same model built from torch.tanh.
    a = ak.ArnoldiProjector(proj_dim=3, mode="rev-rev", config=cfg).fit(_Net(custom=True), (X, y))
    b = ak.ArnoldiProjector(proj_dim=3, mode="rev-rev", config=cfg).fit(_Net(), (X, y))
    assert_close(a.eigenvalues_, b.eigenvalues_, rtol=1e-10)


def test_forward_ad_errors_are_told_from_the_rest():
    from torch.func import grad, jvp

    from attribkit._compute.curvature import forward_ad_error

    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises(Exception) as info:
        jvp(grad(lambda z: _NoJvpTanh.apply(z).sum()), (x,), (x,))
    assert forward_ad_error(info.value)
    wrapped = ValueError("while fitting")
    wrapped.__cause__ = info.value
    assert forward_ad_error(wrapped)  # found through the chain
    assert not forward_ad_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not forward_ad_error(KeyError("forward AD"))  # only torch's error types count


@pytest.mark.parametrize("mode", ["rev-fwd", "rev-rev"])
def test_a_nan_loss_is_not_a_zero_curvature(mode):
    # A NaN that does not depend on the parameters has zero derivatives: it looked like
    # a zero curvature ("no eigenpair to invert"). Now: the batch and the product.
    X, y = _net_data()
    cfg = ak.ComputeConfig(dtype="float64", batch_size=3)

    def loss(outputs, targets):
        bad = (torch.arange(len(targets)) == 0) & (targets.shape[0] == 2)
        ce = torch.nn.functional.cross_entropy(outputs, targets, reduction="none")
        return torch.where(bad, float("nan"), ce)

    message = r"on batch 2 of 'data', the loss is nan at Hessian-vector product 1 of this fit"
    with pytest.raises(ValueError, match=message):
        ak.ArnoldiProjector(proj_dim=2, mode=mode, loss=loss, config=cfg).fit(_Net(), (X, y))
    # NaN in the data of a later batch: the same report.
    X[7, 0] = float("nan")
    with pytest.raises(ValueError, match="on batch 2 of 'data', the loss is nan"):
        ak.ArnoldiProjector(proj_dim=2, mode=mode, config=cfg).fit(_Net(), (X, y))
