"""ExplicitIFVP(fisher="expected"): the exact Gauss-Newton matrix, in both solver forms."""

from __future__ import annotations

import pytest
import torch
from cases import classification_data, linear, mlp, regression_data
from reference import assert_close, dense_gauss_newton, dense_hessian

from attribkit import ComputeConfig, ExplicitIFVP

F64 = ComputeConfig(dtype="float64")


def _vectors(m, p, seed=0):
    return torch.randn(m, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("solver", ["cholesky", "woodbury"])
@pytest.mark.parametrize(
    "loss, make_model, make_data",
    [
        ("cross_entropy", lambda: mlp(d=5, hidden=4, out=3), classification_data),
        ("mse", lambda: mlp(d=5, hidden=4, out=2), regression_data),
    ],
)
def test_expected_fisher_is_the_dense_gauss_newton_matrix(solver, loss, make_model, make_data):
    model, (X, y) = make_model(), make_data(n=7)
    damping = 0.05
    cfg = ComputeConfig(dtype="float64", batch_size=3)  # several batches, a ragged last one
    est = ExplicitIFVP(damping=damping, solver=solver, fisher="expected", loss=loss, config=cfg)
    est.fit(model, (X, y))
    p = est.n_features_in_
    GN = dense_gauss_newton(model, X, y, loss) + damping * torch.eye(p, dtype=torch.float64)
    V = _vectors(4, p)
    assert est.solver_ == solver and est.n_samples_ == 7
    assert_close(est.inverse_transform(V), V @ GN, rtol=1e-10)
    assert_close(est.transform(V), torch.linalg.solve(GN, V.T).T, rtol=1e-10)
    if solver == "woodbury":  # K = C classes or D outputs: K pseudo-gradients per example
        K = 3 if loss == "cross_entropy" else 2
        assert est.gradients_.shape == (7 * K, p)


@pytest.mark.parametrize("solver", ["cholesky", "woodbury"])
@pytest.mark.parametrize(
    "loss, make_data, out",
    [("cross_entropy", classification_data, 3), ("mse", regression_data, 2)],
)
def test_expected_fisher_equals_the_hessian_of_a_linear_model(solver, loss, make_data, out):
    """For a linear model the Gauss-Newton matrix is the Hessian (torch.func.hessian)."""
    model, (X, y) = linear(d=4, out=out), make_data(n=9, d=4, seed=2)
    damping = 1e-3
    est = ExplicitIFVP(damping=damping, solver=solver, fisher="expected", loss=loss, config=F64)
    est.fit(model, (X, y))
    p = est.n_features_in_
    H = dense_hessian(model, X, y, loss) + damping * torch.eye(p, dtype=torch.float64)
    V = _vectors(3, p, seed=1)
    assert_close(est.inverse_transform(V), V @ H, rtol=1e-10)
    assert_close(est.transform(V), torch.linalg.solve(H, V.T).T, rtol=1e-10)


def test_expected_fisher_is_invariant_to_batch_size_and_ignores_targets():
    model, (X, y) = mlp(), classification_data(n=10)
    V = _vectors(2, sum(t.numel() for t in model.parameters()))
    results = []
    for batch_size, targets in [(10, y), (3, y), (4, (y + 1) % 3)]:
        cfg = ComputeConfig(dtype="float64", batch_size=batch_size)
        est = ExplicitIFVP(damping=0.1, fisher="expected", config=cfg).fit(model, (X, targets))
        results.append(est.transform(V))
    for r in results[1:]:
        assert_close(r, results[0], rtol=1e-12)
    # It is not the empirical Fisher.
    emp = ExplicitIFVP(damping=0.1, config=F64).fit(model, (X, y))
    assert (emp.transform(V) - results[0]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "n, expected",
    [
        (3, "woodbury"),  # 9 pseudo-gradient rows: 9 * (9 + 27) < 27^2
        (6, "cholesky"),  # 18 rows: 18 * 45 > 27^2, though 6 examples alone would pass
    ],
)
def test_auto_solver_counts_the_pseudo_gradient_rows(n, expected):
    model, (X, y) = linear(d=8, out=3), classification_data(n=n, d=8)
    est = ExplicitIFVP(damping=0.01, fisher="expected", config=F64).fit(model, (X, y))
    assert est.solver_ == expected and est.n_samples_ == n
    # Empirical: n (n + p) < p^2 in both cases.
    assert ExplicitIFVP(damping=0.01, config=F64).fit(model, (X, y)).solver_ == "woodbury"
    # Both forms give the same numbers.
    other = "cholesky" if expected == "woodbury" else "woodbury"
    twin = ExplicitIFVP(damping=0.01, solver=other, fisher="expected", config=F64)
    V = _vectors(3, 27)
    assert_close(twin.fit(model, (X, y)).transform(V), est.transform(V), rtol=1e-10)


def test_rank_deficient_expected_fisher_without_damping_raises():
    # 2 examples x 3 classes = 6 rows < p = 27: singular without damping.
    model, (X, y) = linear(d=8, out=3), classification_data(n=2, d=8)
    with pytest.raises(ValueError, match=r"rank at most n K \(the pseudo-gradients\) = 6 < p"):
        ExplicitIFVP(damping=0.0, fisher="expected", config=F64).fit(model, (X, y))


def test_expected_fisher_needs_a_builtin_loss():
    model, data = linear(), classification_data()

    def loss(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="none")

    with pytest.raises(ValueError, match="'fisher' parameter of ExplicitIFVP is 'expected'"):
        ExplicitIFVP(damping=0.1, fisher="expected", loss=loss).fit(model, data)


def test_expected_fisher_of_sequence_outputs_raises():
    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4).double()

        def forward(self, x):  # (b, tokens, 3) -> (b, classes=4, tokens)
            return self.lin(x).transpose(1, 2)

    X = torch.randn(5, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (5, 6))
    with pytest.raises(ValueError, match=r"outputs of shape \(batch, classes\)"):
        ExplicitIFVP(damping=0.1, fisher="expected", config=F64).fit(Seq(), (X, y))


def test_expected_fisher_leaves_the_model_unchanged_and_pickles():
    import pickle

    model, data = mlp(), classification_data()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = ExplicitIFVP(damping=0.1, fisher="expected", config=F64).fit(model, data)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    V = _vectors(2, est.n_features_in_)
    assert_close(pickle.loads(pickle.dumps(est)).transform(V), est.transform(V), rtol=1e-14)
