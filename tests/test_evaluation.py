"""attribkit.evaluation: LOO correlation and LDS on cases whose answer is known."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import attribkit as ak
from attribkit.evaluation import lds, loo_correlation


def _case(n_test=4, n_train=30, n_removed=12, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_test, n_train))
    removed = rng.choice(n_train, n_removed, replace=False)
    loss_changes = rng.normal(size=(n_removed, n_test))
    return scores, removed, loss_changes


# --------------------------------------------------------------------- LOO
def test_loo_monotone_and_reversed_scores():
    scores, removed, _ = _case()
    # Any increasing function of the scores is a perfect rank prediction.
    changes = np.exp(scores[:, removed].T) / 30
    np.testing.assert_allclose(loo_correlation(scores, removed, changes), 1.0, atol=1e-12)
    np.testing.assert_allclose(loo_correlation(-scores, removed, changes), -1.0, atol=1e-12)
    # Pearson is 1 only for a positive affine relation.
    affine = 3.0 * scores[:, removed].T / 30 - 2.0
    np.testing.assert_allclose(
        loo_correlation(scores, removed, affine, method="pearson"), 1.0, atol=1e-12
    )
    assert (loo_correlation(scores, removed, changes, method="pearson") < 1 - 1e-3).all()


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_loo_equals_scipy_per_test_example(method):
    scores, removed, changes = _case(n_test=5, seed=1)
    changes[:3, 0] = changes[3, 0]  # ties in the measurements
    scores[0, removed[5]] = scores[0, removed[6]]  # and in the scores
    func = stats.spearmanr if method == "spearman" else stats.pearsonr
    expected = [func(scores[t, removed], changes[:, t])[0] for t in range(5)]
    np.testing.assert_allclose(
        loo_correlation(scores, removed, changes, method), expected, rtol=1e-12, atol=1e-14
    )


def test_loo_uses_the_removed_columns_in_order():
    scores, removed, changes = _case(n_test=3)
    perm = np.random.default_rng(3).permutation(len(removed))
    np.testing.assert_allclose(
        loo_correlation(scores, removed[perm], changes[perm]),
        loo_correlation(scores, removed, changes),
        rtol=1e-14,
    )


def test_loo_containers_agree():
    scores, removed, changes = _case()
    expected = loo_correlation(scores, removed, changes)
    got = loo_correlation(
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(removed),
        torch.tensor(changes),
    )
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (4,)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(
        loo_correlation(scores.tolist(), list(removed), changes.tolist()), expected
    )


def test_loo_constant_series_gives_nan_with_warning():
    scores, removed, changes = _case(n_test=3)
    changes[:, 1] = 0.5
    with pytest.warns(UserWarning, match=r"undefined for 1 test example\(s\) \(indices 1\)"):
        result = loo_correlation(scores, removed, changes)
    assert np.isnan(result[1]) and np.isfinite(result[[0, 2]]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_changes": np.zeros((12, 5))}, r"shape \(len\(removed\), n_test\) = \(12, 4\)"),
        ({"loss_changes": np.zeros((11, 4))}, r"Got \(11, 4\)"),
        ({"removed": np.arange(12) + 25}, r"indices in \[0, n_train\) = \[0, 30\)"),
        ({"removed": np.array([1, 2, 2])}, r"must not repeat an index.*\[2\]"),
        ({"removed": np.array([1.0, 2.0])}, "integer indices"),
        ({"removed": np.ones(30, dtype=bool)}, "integer indices"),
        ({"removed": np.array([3])}, "at least 2 indices"),
        ({"scores": np.zeros(30)}, r"'scores' argument of loo_correlation must be a 2-D"),
        ({"method": "kendall"}, r"'method' argument .* \('spearman', 'pearson'\)"),
    ],
)
def test_loo_bad_input(kwargs, match):
    scores, removed, changes = _case()
    args = {"scores": scores, "removed": removed, "loss_changes": changes, **kwargs}
    if kwargs.get("removed") is not None and "loss_changes" not in kwargs:
        args["loss_changes"] = np.zeros((len(args["removed"]), 4))
    with pytest.raises(ValueError, match=match):
        loo_correlation(**args)


def test_loo_non_finite_input():
    scores, removed, changes = _case()
    changes[2, 1] = np.nan
    with pytest.raises(ValueError, match="'loss_changes' argument .* must be finite. Got 1"):
        loo_correlation(scores, removed, changes)
    with pytest.raises(TypeError, match="'scores' argument .* numeric array-like"):
        loo_correlation("abc", removed, changes)


# --------------------------------------------------------------------- LDS
def _subsets(n_models=40, n_train=30, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_train) < n_train // 2 for _ in range(n_models)])


def test_lds_of_an_exact_linear_datamodel_is_one():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 30))
    subsets = _subsets()
    additive = subsets @ scores.T  # outputs that add up exactly like the scores
    np.testing.assert_allclose(lds(scores, subsets, additive), 1.0, atol=1e-12)
    # A rank correlation: any increasing transform of the outputs keeps it at 1 ...
    np.testing.assert_allclose(lds(scores, subsets, np.tanh(additive / 5)), 1.0, atol=1e-12)
    # ... and reversed scores give -1.
    np.testing.assert_allclose(lds(-scores, subsets, additive), -1.0, atol=1e-12)


def test_lds_equals_scipy_spearman_of_subset_sums():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(4, 30))
    subsets = _subsets(seed=1)
    outputs = subsets @ scores.T + rng.normal(scale=3.0, size=(40, 4))
    expected = [stats.spearmanr(subsets @ scores[t], outputs[:, t])[0] for t in range(4)]
    got = lds(scores, subsets, outputs)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert (got > 0.1).all() and (got < 0.99).all()  # noisy, so neither 0 nor 1
    # 0/1 integer masks and torch inputs give the same numbers.
    np.testing.assert_allclose(lds(torch.tensor(scores), subsets.astype(int), outputs), got)
    np.testing.assert_allclose(lds(scores, torch.tensor(subsets), torch.tensor(outputs)), got)


def test_lds_of_unrelated_scores_is_near_zero():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(200, 30))
    subsets = _subsets(n_models=60, seed=2)
    outputs = rng.normal(size=(60, 200))
    result = lds(scores, subsets, outputs)
    assert abs(result.mean()) < 0.05  # standard error 1/sqrt(60 * 200) ~ 0.01


def test_lds_constant_outputs_nan_with_warning():
    scores = np.ones((2, 30))
    scores[1, 0] = 2.0
    subsets = _subsets(n_models=5)
    # All half-size subsets have the same sum of constant scores.
    with pytest.warns(UserWarning, match=r"lds: the correlation is undefined .*\(indices 0\)"):
        result = lds(scores, subsets, np.random.default_rng(0).normal(size=(5, 2)))
    assert np.isnan(result[0]) and np.isfinite(result[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"outputs": np.zeros((40, 2))}, r"shape \(n_models, n_test\) = \(40, 3\)"),
        ({"outputs": np.zeros((3, 40))}, r"Got \(3, 40\)"),
        ({"subsets": np.ones((40, 29), dtype=bool)}, r"n_train = 30 columns"),
        ({"subsets": np.ones(30, dtype=bool)}, r"2-D \(n_models, n_train\)"),
        ({"subsets": np.full((40, 30), 2)}, "boolean mask .* values other than 0 and 1"),
        (
            {"subsets": np.ones((1, 30), dtype=bool), "outputs": np.zeros((1, 3))},
            "at least 2 models",
        ),
        ({"scores": np.full((3, 30), np.inf)}, "'scores' argument of lds must be finite"),
    ],
)
def test_lds_bad_input(kwargs, match):
    args = {
        "scores": np.zeros((3, 30)),
        "subsets": _subsets(),
        "outputs": np.zeros((40, 3)),
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        lds(**args)


# --------------------------------------------------------------------- end to end
def test_influence_sign_convention_predicts_ridge_retraining():
    """Exact influence of ridge regression ranks exact LOO retraining correctly.

    Linear least squares with L2 penalty: the objective is
    ``mean_i (x_i^T w + b - y_i)^2 + lam/2 ||theta||^2``; its Hessian is the
    expected Fisher of the MSE plus ``lam I``, and retraining has a closed form.
    """
    torch.manual_seed(0)
    n, d, lam = 80, 6, 1e-2
    X = torch.randn(n, d, dtype=torch.float64)
    y = X @ torch.randn(d, dtype=torch.float64) + 0.5 * torch.randn(n, dtype=torch.float64)
    Xt = torch.randn(5, d, dtype=torch.float64)
    yt = Xt @ torch.randn(d, dtype=torch.float64)
    A = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    At = torch.cat([Xt, torch.ones(5, 1, dtype=torch.float64)], 1)

    def solve(keep):
        Ak, yk = A[keep], y[keep]
        m = len(yk)
        H = 2 * Ak.T @ Ak / m + lam * torch.eye(d + 1, dtype=torch.float64)
        return torch.linalg.solve(H, 2 * Ak.T @ yk / m)

    def test_losses(theta):
        return (At @ theta - yt) ** 2

    theta = solve(torch.ones(n, dtype=torch.bool))
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:d].unsqueeze(0))
        model.bias.copy_(theta[d:])
    cfg = ak.ComputeConfig(dtype="float64")
    ifvp = ak.ExplicitIFVP(damping=lam, fisher="expected", loss="mse", config=cfg)
    ifvp.fit(model, (X, y.unsqueeze(1)))
    G = ak.per_example_gradients(model, (X, y.unsqueeze(1)), loss="mse", config=cfg)
    Gt = ak.per_example_gradients(model, (Xt, yt.unsqueeze(1)), loss="mse", config=cfg)
    scores = ak.influence(ifvp, G, Gt)

    removed = np.arange(0, n, 2)
    base = test_losses(theta)
    changes = []
    for i in removed:
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        changes.append((test_losses(solve(keep)) - base).numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rho = loo_correlation(scores, removed, np.array(changes))
    # The expected Fisher + lam I is the objective's exact Hessian: the scores
    # rank the exact retraining effects almost perfectly ...
    assert (rho > 0.99).all(), rho
    assert (loo_correlation(-scores, removed, np.array(changes)) < -0.99).all()
    # ... better than the empirical Fisher, whose weights r_i^2 distort the ranking.
    emp = ak.ExplicitIFVP(damping=lam, loss="mse", config=cfg).fit(model, (X, y.unsqueeze(1)))
    rho_emp = loo_correlation(ak.influence(emp, G, Gt), removed, np.array(changes))
    assert rho_emp.mean() < rho.mean() - 0.02, (rho_emp, rho)
