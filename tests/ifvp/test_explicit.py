"""ExplicitIFVP: exactness against dense solves, solver agreement, model/array
equivalence, the true Fisher's expectation, solver choice and errors."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from cases import classification_data, linear, mlp, regression_data
from reference import (
    assert_close,
    damped_fisher,
    loop_per_example_gradients,
    true_fisher_moments_ce,
    true_fisher_moments_mse,
)

from attribkit import ComputeConfig
from attribkit._compute import budget
from attribkit.ifvp.explicit import ExplicitIFVP

F64 = ComputeConfig(dtype="float64")
SOLVERS = ["cholesky", "woodbury"]


def _gradients(n, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64)


def _fitted_fisher(est, p):
    """F recovered from the fitted estimator: FVP of the identity, minus damping."""
    eye = torch.eye(p, dtype=torch.float64)
    return est.inverse_transform(eye) - est.damping * eye


# ----------------------------------------------------------------- exactness
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("n, p", [(30, 12), (8, 20)])
def test_transform_matches_dense_solve(solver, n, p):
    G, V = _gradients(n, p), _gradients(5, p, seed=1)
    est = ExplicitIFVP(damping=0.1, solver=solver, config=F64).fit(G)
    expected = torch.linalg.solve(damped_fisher(G, 0.1), V.T).T
    out = est.transform(V)
    assert est.solver_ == solver and est.n_samples_ == n and est.n_features_in_ == p
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert_close(out, expected, rtol=1e-10)
    # numpy in -> numpy out, same numbers (numpy fit too).
    est_np = ExplicitIFVP(damping=0.1, solver=solver, config=F64).fit(G.numpy())
    out_np = est_np.transform(V.numpy())
    assert isinstance(out_np, np.ndarray) and out_np.shape == (5, p)
    assert_close(out_np, expected, rtol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS)
def test_dict_in_dict_out(solver):
    G = _gradients(10, 14)
    grads = {"w": G[:, :12].reshape(10, 3, 4), "b": G[:, 12:]}
    est = ExplicitIFVP(damping=0.5, solver=solver, config=F64).fit(grads)
    assert list(est.param_shapes_.items()) == [("w", (3, 4)), ("b", (2,))]
    V = _gradients(3, 14, seed=2)
    out = est.transform({"w": V[:, :12].reshape(3, 3, 4), "b": V[:, 12:]})
    assert set(out) == {"w", "b"} and out["w"].shape == (3, 3, 4) and out["b"].shape == (3, 2)
    expected = torch.linalg.solve(damped_fisher(G, 0.5), V.T).T
    assert_close(torch.cat([out["w"].reshape(3, -1), out["b"]], 1), expected, rtol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("n, p", [(30, 12), (8, 20)])
def test_inverse_transform_is_fvp_and_inverts(solver, n, p):
    G, V = _gradients(n, p), _gradients(4, p, seed=3)
    est = ExplicitIFVP(damping=0.3, solver=solver, config=F64).fit(G)
    assert_close(est.inverse_transform(V), V @ damped_fisher(G, 0.3), rtol=1e-10)
    assert_close(est.inverse_transform(est.transform(V)), V, rtol=1e-10)
    assert_close(est.transform(est.inverse_transform(V)), V, rtol=1e-10)


@pytest.mark.parametrize("n, p", [(30, 12), (8, 20)])
def test_solvers_agree(n, p):
    G, V = _gradients(n, p), _gradients(6, p, seed=4)
    chol = ExplicitIFVP(damping=0.05, solver="cholesky", config=F64).fit(G)
    wood = ExplicitIFVP(damping=0.05, solver="woodbury", config=F64).fit(G)
    assert chol.cholesky_.shape == (p, p) and chol.gradients_ is None
    assert wood.cholesky_.shape == (n, n) and wood.gradients_.shape == (n, p)
    assert_close(wood.transform(V), chol.transform(V), rtol=1e-10)


def test_output_dtype_follows_config():
    G = _gradients(20, 6)
    est = ExplicitIFVP(damping=0.1).fit(G)  # float32 config, float64 input
    assert est.transform(G[:2]).dtype == torch.float32
    assert est.transform(G[:2].numpy()).dtype == np.float32
    assert est.cholesky_.dtype == torch.float64  # the factor stays float64
    expected = torch.linalg.solve(damped_fisher(G, 0.1), G[:2].T).T
    assert_close(est.transform(G[:2]), expected, rtol=1e-6)


def test_fit_does_not_alias_input():
    G = _gradients(5, 20)
    est = ExplicitIFVP(damping=0.1, solver="woodbury", config=F64).fit(G)
    V = G[:2].clone()
    before = est.transform(V)
    G.mul_(3.0)
    assert torch.equal(est.transform(V), before)


def test_pickle_round_trip():
    G = _gradients(6, 15)
    for solver in SOLVERS:
        est = ExplicitIFVP(damping=0.2, solver=solver, config=F64).fit(G)
        again = pickle.loads(pickle.dumps(est))
        assert again.solver_ == solver
        assert torch.equal(again.transform(G), est.transform(G))


# ----------------------------------------------------------------- model mode
@pytest.mark.parametrize("solver", ["cholesky", "woodbury", "auto"])
@pytest.mark.parametrize(
    "make_model, make_data, loss, params",
    [
        (lambda: mlp(), lambda: classification_data(), "cross_entropy", None),
        (lambda: mlp(), lambda: classification_data(), "cross_entropy", ["2.weight", "0.bias"]),
        (lambda: mlp(out=2), lambda: regression_data(), "mse", None),
    ],
)
def test_model_mode_equals_array_mode(solver, make_model, make_data, loss, params):
    model, (X, y) = make_model(), make_data()
    G = loop_per_example_gradients(model, X, y, loss=loss, params=params)
    cfg = ComputeConfig(dtype="float64", batch_size=5)  # 12 examples: 5 + 5 + 2
    est = ExplicitIFVP(damping=0.1, solver=solver, loss=loss, params=params, config=cfg)
    est.fit(model, (X, y))
    ref = ExplicitIFVP(damping=0.1, solver=solver, config=F64).fit(G)
    assert est.n_samples_ == 12 and est.n_features_in_ == G.shape[1]
    assert est.solver_ == ref.solver_
    named = dict(model.named_parameters())
    assert list(est.param_shapes_) == [n for n in named if params is None or n in params]
    V = _gradients(3, G.shape[1], seed=5)
    assert_close(est.transform(V), ref.transform(V), rtol=1e-10)
    assert_close(_fitted_fisher(est, G.shape[1]), damped_fisher(G, 0.0), rtol=1e-10)


@pytest.mark.parametrize("n, expected", [(10, "woodbury"), (12, "cholesky")])
def test_model_mode_auto_switches_like_array_mode(n, expected):
    # Linear 5 -> 3 has p = 18: the kernel form is preferred while n (n + 18) < 324,
    # i.e. n <= 11; with n = 12 the model-mode pass buffers 5 + 5 rows, then folds
    # them into F when the third batch arrives.
    model, (X, y) = linear(), classification_data(n=n)
    G = loop_per_example_gradients(model, X, y)
    cfg = ComputeConfig(dtype="float64", batch_size=5)
    est = ExplicitIFVP(damping=0.1, config=cfg).fit(model, (X, y))
    ref = ExplicitIFVP(damping=0.1, config=F64).fit(G)
    assert est.solver_ == ref.solver_ == expected
    V = _gradients(4, 18, seed=6)
    assert_close(est.transform(V), torch.linalg.solve(damped_fisher(G, 0.1), V.T).T, 1e-10)


# ----------------------------------------------------------------- true Fisher
@pytest.mark.parametrize(
    "loss, make_model, make_data, exact",
    [
        ("cross_entropy", lambda: linear(d=2, out=3), classification_data, true_fisher_moments_ce),
        ("mse", lambda: linear(d=2, out=2), regression_data, true_fisher_moments_mse),
    ],
)
def test_true_fisher_converges_to_expectation(loss, make_model, make_data, exact):
    model, (X, y) = make_model(), make_data(n=3, d=2, seed=1)
    copies = 4000
    data = (X.repeat(copies, 1), y.repeat(copies, *[1] * (y.ndim - 1)))
    p = sum(t.numel() for t in model.parameters())
    mean, var = exact(model, X)
    stderr = (var.clamp_min(0) / (X.shape[0] * copies)).sqrt()
    cfg = ComputeConfig(dtype="float64", batch_size=5000)
    est = ExplicitIFVP(damping=0.1, fisher="true", loss=loss, config=cfg)
    torch.manual_seed(0)
    sampled = _fitted_fisher(est.fit(model, data), p)
    assert ((sampled - mean).abs() <= 5 * stderr + 1e-12).all()
    # The test can tell: the empirical Fisher (fixed targets) is far from it.
    emp = ExplicitIFVP(damping=0.1, loss=loss, config=cfg).fit(model, data)
    assert ((_fitted_fisher(emp, p) - mean).abs() > 5 * stderr + 1e-12).any()


def test_true_fisher_is_reproducible_under_manual_seed():
    model, (X, y) = mlp(), classification_data()
    est = ExplicitIFVP(damping=0.1, fisher="true", config=F64)
    V = _gradients(2, 39, seed=7)
    results = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        results.append(est.fit(model, (X, y)).transform(V))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


# ----------------------------------------------------------------- solver choice
@pytest.mark.parametrize(
    "n, p, damping, expected",
    [
        (5, 100, 0.1, "woodbury"),
        (200, 10, 0.1, "cholesky"),
        (60, 100, 0.1, "woodbury"),
        (70, 100, 0.1, "cholesky"),
        (200, 10, 0.0, "cholesky"),
    ],
)
def test_auto_picks_the_cheaper_solver(n, p, damping, expected):
    # n (n + p) < p^2 is the kernel form's break-even point: 60 * 160 < 100^2 < 70 * 170.
    est = ExplicitIFVP(damping=damping, config=F64).fit(_gradients(n, p))
    assert est.solver_ == expected


def test_auto_falls_back_to_the_form_that_fits(monkeypatch):
    # n = 15, p = 20: cost prefers the dense form (15 * 35 > 400), which needs
    # 6400 bytes; the kernel form needs 8 * 15 * 20 + 16 * 225 = 6000.
    monkeypatch.setattr(budget, "available_bytes", lambda device: 0)
    cfg = ComputeConfig(dtype="float64", memory_budget=6200)
    G = _gradients(15, 20)
    est = ExplicitIFVP(damping=0.1, config=cfg).fit(G)
    assert est.solver_ == "woodbury"
    V = _gradients(2, 20, seed=8)
    assert_close(est.transform(V), torch.linalg.solve(damped_fisher(G, 0.1), V.T).T, 1e-10)


# ----------------------------------------------------------------- errors
def test_singular_fisher_raises_and_keeps_previous_fit():
    est = ExplicitIFVP(damping=0.0, config=F64).fit(_gradients(30, 10))
    V = _gradients(2, 10, seed=9)
    before, state = est.transform(V), est.cholesky_.clone()
    with pytest.raises(ValueError, match=r"singular.*damping > 0"):
        est.fit(_gradients(4, 10))  # rank 4 < 10
    assert est.n_samples_ == 30 and torch.equal(est.cholesky_, state)
    assert torch.equal(est.transform(V), before)


def test_rank_deficient_fisher_with_more_examples_raises():
    G = _gradients(40, 8)
    G[:, 3] = 0.0  # a parameter the loss never moves
    with pytest.raises(ValueError, match=r"singular.*damping > 0"):
        ExplicitIFVP(damping=0.0, solver="cholesky", config=F64).fit(G)
    G = _gradients(40, 5)
    G = torch.cat([G, G[:, :2] @ _gradients(2, 3, seed=1)], dim=1)  # rank 5 of 8
    with pytest.raises(ValueError, match=r"singular.*damping > 0"):
        ExplicitIFVP(damping=0.0, config=F64).fit(G)


@pytest.mark.parametrize("solver", SOLVERS)
def test_negligible_damping_is_singular_too(solver):
    with pytest.raises(ValueError, match=r"singular.*a larger damping"):
        ExplicitIFVP(damping=1e-300, solver=solver, config=F64).fit(_gradients(4, 10))


def test_woodbury_needs_positive_damping():
    with pytest.raises(ValueError, match=r"'damping' parameter .* > 0 with solver='woodbury'"):
        ExplicitIFVP(damping=0.0, solver="woodbury").fit(_gradients(3, 10))


def test_too_large_dense_matrix_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(budget, "available_bytes", lambda device: 0)
    cfg = ComputeConfig(memory_budget=1000)

    def untouchable():
        raise AssertionError("the data was read before the memory check")
        yield  # pragma: no cover

    # 16 * 20^2 = 6400 bytes > 1000: refused before the gradient pass starts.
    with pytest.raises(ValueError, match=r"16 \* p\^2 = .*GiB.*solver='woodbury'"):
        ExplicitIFVP(damping=0.1, solver="cholesky", config=cfg).fit(
            torch.nn.Linear(4, 4), untouchable()
        )
    with pytest.raises(ValueError, match=r"20 x 20 Fisher"):
        ExplicitIFVP(damping=0.0, config=cfg).fit(_gradients(50, 20))
    # The kernel form is checked as gradients arrive in model mode.
    with pytest.raises(ValueError, match=r"solver='woodbury' needs .*solver='cholesky'"):
        ExplicitIFVP(damping=0.1, solver="woodbury", config=cfg).fit(
            linear(), classification_data(n=30)
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"damping": -1},
            r"^The 'damping' parameter of ExplicitIFVP must be a float >= 0 or 'auto'\. "
            r"Got -1 instead\.$",
        ),
        ({"damping": float("nan")}, r"'damping' parameter .* float >= 0 or 'auto'"),
        ({"damping": "Auto"}, r"'damping' parameter .* float >= 0 or 'auto'. Got 'Auto'"),
        ({"solver": "lu"}, r"'solver' parameter .* one of 'auto', 'cholesky', 'woodbury'"),
        ({"fisher": "exact"}, r"'fisher' parameter"),
        ({"loss": "hinge"}, r"'loss' parameter"),
        ({"params": "weight"}, r"'params' parameter"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExplicitIFVP(**kwargs).fit(_gradients(10, 3))


def test_true_fisher_with_custom_loss_raises():
    def loss(out, t):
        return (out - t).pow(2).mean(1)

    model, (X, y) = mlp(out=2), regression_data()
    with pytest.raises(ValueError, match="fisher"):
        ExplicitIFVP(damping=0.1, fisher="true", loss=loss).fit(model, (X, y))


# ----------------------------------------------------------------- sklearn contract
def test_error_messages_are_finite():
    # Guard the suggestion in the singular-matrix message: a real number, not nan.
    with pytest.raises(ValueError) as info:
        ExplicitIFVP(damping=0.0).fit(torch.zeros(3, 4))
    suggested = float(info.value.args[0].split("damping=")[-1].split(" ")[0])
    assert math.isfinite(suggested) and suggested > 0
