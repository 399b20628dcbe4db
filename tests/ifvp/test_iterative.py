"""IterativeIFVP against dense truths (float64): the Gauss-Newton matrix, the Hessian, G^T G / n.

Products are checked against the dense matrices of ``reference.py`` at rel
1e-10; solves at rel 1e-8 against ``ExplicitIFVP(fisher="expected")`` and
``torch.linalg.solve`` on the dense damped curvature.
"""

from __future__ import annotations

import pickle
import threading
import warnings

import numpy as np
import pytest
import torch
from cases import classification_data, linear, mlp, regression_data
from reference import assert_close, dense_gauss_newton, dense_hessian
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from torch.utils.data import DataLoader, TensorDataset

import attribkit as ak
from attribkit._compute import distributed as dist_mod
from attribkit._compute.ggn import MeanLossGGN
from attribkit.ifvp.iterative import batched_pcg

F64 = ak.ComputeConfig(dtype="float64")
TIGHT = dict(tol=1e-13, max_iter=500)


def probe(p, m=3, seed=7):
    return torch.randn(m, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_solve(A, damping, V):
    A = A + damping * torch.eye(A.shape[0], dtype=torch.float64)
    return torch.linalg.solve(A, V.T).T


def smooth_ce(out, t):
    """A callable loss the closed forms do not know: cross-entropy plus a quadratic."""
    return torch.nn.functional.cross_entropy(out, t, reduction="none") + 0.1 * out.square().sum(1)


PROBLEMS = {
    "mlp-ce": (lambda: mlp(), lambda: classification_data(), "cross_entropy"),
    "linear-ce": (lambda: linear(), lambda: classification_data(), "cross_entropy"),
    "mlp-mse": (lambda: mlp(out=2), lambda: regression_data(), "mse"),
    "mlp-custom": (lambda: mlp(), lambda: classification_data(), smooth_ce),
}


# ----------------------------------------------------------------- the curvature products
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_ggn_product_equals_dense_gauss_newton(name):
    make_model, make_data, loss = PROBLEMS[name]
    model, (X, y) = make_model(), make_data()
    G = dense_gauss_newton(model, X, y, loss)
    loader = DataLoader(TensorDataset(X, y), batch_size=5)  # 5 + 5 + 2: ragged
    for data in ((X, y), loader):
        ggn = MeanLossGGN(model, data, loss=loss, config=F64)
        V = probe(G.shape[0], 4)
        assert_close(ggn(V), V @ G, rtol=1e-10)
        assert_close(ggn(V[1]), G @ V[1], rtol=1e-10)
        ggn.max_rows = 3  # chunks of rows within a batch: still one pass, same numbers
        assert_close(ggn(V), V @ G, rtol=1e-10)
    assert ggn.n_samples == 12


@pytest.mark.parametrize("name", ["mlp-ce", "linear-ce", "mlp-mse"])
def test_ggn_product_equals_expected_fisher(name):
    make_model, make_data, loss = PROBLEMS[name]
    model, (X, y) = make_model(), make_data()
    fisher = ak.ExplicitIFVP(damping=1.0, fisher="expected", loss=loss, config=F64)
    fisher.fit(model, (X, y))
    V = probe(fisher.n_features_in_, 4)
    ggn = MeanLossGGN(model, (X, y), loss=loss, config=F64)
    assert_close(ggn(V), fisher.inverse_transform(V) - V, rtol=1e-10)


def test_ggn_of_sequence_outputs_with_ignored_tokens():
    # API section 7's layout: (N, T, C) logits, (N, T) targets, -100 ignored, the
    # per-example loss the sum over tokens. A callable here: the product is generic.
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5)
            )

        def forward(self, x):
            return self.net(x)

    def token_ce(out, t):
        losses = torch.nn.functional.cross_entropy(out.transpose(1, 2), t, reduction="none")
        return losses.sum(1)  # ignored tokens give 0

    torch.manual_seed(0)
    model = Tokens().double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (6, 4), generator=g)
    y[0, 1] = y[3, 0] = y[3, 3] = -100
    G = dense_gauss_newton(model, X, y, token_ce)
    ggn = MeanLossGGN(
        model, DataLoader(TensorDataset(X, y), batch_size=4), loss=token_ce, config=F64
    )
    V = probe(G.shape[0], 3)
    assert_close(ggn(V), V @ G, rtol=1e-10)
    est = ak.IterativeIFVP(damping=0.1, loss=token_ce, config=F64, **TIGHT).fit(model, (X, y))
    assert_close(est.transform(V), dense_solve(G, 0.1, V), rtol=1e-8)


class _Box:
    """A model output that is not a pytree: nothing for torch.func to differentiate."""

    def __init__(self, logits):
        self.logits = logits


@pytest.mark.parametrize("wrap", ["dict with a non-tensor", "opaque object"])
def test_callable_loss_gets_the_model_output_back(wrap):
    # A Hugging Face ModelOutput carries objects that are not tensors (GPT-2's cache):
    # the floating-point tensors are differentiated, the rest passed through.
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            out = self.net(x)
            if wrap == "opaque object":
                return _Box(out)
            return {"logits": out, "cache": object(), "ids": torch.arange(len(x))}

    def ce(out, t):
        logits = out.logits if wrap == "opaque object" else out["logits"]
        return torch.nn.functional.cross_entropy(logits, t, reduction="none")

    model, (X, y) = Wrapped().double(), classification_data()
    ggn = MeanLossGGN(model, (X, y), loss=ce, config=F64)
    V = probe(39, 2)  # the MLP's 5 * 4 + 4 + 4 * 3 + 3 parameters
    if wrap == "opaque object":
        with pytest.raises(ValueError, match=r"(?s)batch 0 \(a _Box\).*torch.utils._pytree"):
            ggn(V)
        return
    G = dense_gauss_newton(model.net, X, y, "cross_entropy")
    assert_close(ggn(V), V @ G, rtol=1e-10)


def test_cross_entropy_ignores_targets_of_minus_100():
    model, (X, y) = mlp(), classification_data()
    y = y.clone()
    y[[2, 7]] = -100
    G = dense_gauss_newton(model, X, y, "cross_entropy")
    V = probe(G.shape[0])
    assert_close(MeanLossGGN(model, (X, y), config=F64)(V), V @ G, rtol=1e-10)


# ----------------------------------------------------------------- solves
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_ggn_solve_equals_dense_and_explicit_expected(name):
    make_model, make_data, loss = PROBLEMS[name]
    model, (X, y) = make_model(), make_data()
    damping = 0.01
    G = ak.per_example_gradients(model, (X[:3], y[:3]), loss=loss, config=F64)
    V = torch.cat([G, probe(G.shape[1], 2)])
    want = dense_solve(dense_gauss_newton(model, X, y, loss), damping, V)
    est = ak.IterativeIFVP(damping=damping, loss=loss, config=F64, **TIGHT).fit(model, (X, y))
    X_out, info = est.solve(V)
    assert_close(X_out, want, rtol=1e-8)
    assert info["converged"].all() and (info["residual"] <= 1e-13).all()
    assert info["n_iter"].dtype == np.int64 and (info["n_iter"] >= 1).all()
    if not callable(loss):
        exact = ak.ExplicitIFVP(damping=damping, fisher="expected", loss=loss, config=F64)
        assert_close(X_out, exact.fit(model, (X, y)).transform(V), rtol=1e-8)


@pytest.mark.parametrize("name, damping", [("mlp-ce", 1.0), ("linear-ce", 0.01), ("mlp-mse", 2.0)])
def test_hessian_solve_equals_dense_hessian(name, damping):
    # Dampings above the magnitude of the most negative eigenvalue (-0.59 and -1.70 for
    # the test MLPs, away from a minimum) make the Hessian positive definite.
    make_model, make_data, loss = PROBLEMS[name]
    model, (X, y) = make_model(), make_data()
    H = dense_hessian(model, X, y, loss)
    V = probe(H.shape[0])
    est = ak.IterativeIFVP(damping=damping, curvature="hessian", loss=loss, config=F64, **TIGHT)
    loader = DataLoader(TensorDataset(X, y), batch_size=5)
    assert_close(est.fit(model, loader).transform(V), dense_solve(H, damping, V), rtol=1e-8)


def test_streamed_ragged_batches_equal_one_batch():
    model, (X, y) = mlp(), classification_data()
    V = probe(sum(p.numel() for p in model.parameters()), 4)
    outs = []
    for data in (
        (X, y),  # one batch
        DataLoader(TensorDataset(X, y), batch_size=5),  # 5 + 5 + 2
        [(X[:1], y[:1]), (X[1:8], y[1:8]), (X[8:], y[8:])],  # a list of ragged batches
    ):
        est = ak.IterativeIFVP(damping=0.05, config=F64, **TIGHT).fit(model, data)
        outs.append(est.solve(V))
    for X_out, info in outs[1:]:
        assert_close(X_out, outs[0][0], rtol=1e-10)
        assert (info["n_iter"] == outs[0][1]["n_iter"]).all()


def test_array_mode_equals_dense_gram_solve():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(30, 8, generator=g, dtype=torch.float64)
    V = probe(8, 4)
    want = dense_solve(G.T @ G / 30, 0.1, V)
    est = ak.IterativeIFVP(damping=0.1, **TIGHT).fit(G.numpy())  # float32 output by default
    out = est.transform(V.numpy())
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert_close(out, want, rtol=1e-6)
    est64 = ak.IterativeIFVP(damping=0.1, config=F64, **TIGHT).fit(G)
    assert_close(est64.transform(V), want, rtol=1e-10)
    assert est64.n_samples_ == 30 and est64.gradients_.dtype == torch.float64
    G[0, 0] = 99.0  # the fitted gradients are a copy, never the caller's array
    assert_close(est64.transform(V), want, rtol=1e-10)


def test_array_mode_exact_inverse_as_preconditioner_converges_in_one_iteration():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(40, 6, generator=g, dtype=torch.float64)
    exact = ak.ExplicitIFVP(damping=0.1, config=F64)
    est = ak.IterativeIFVP(damping=0.1, preconditioner=exact, config=F64, tol=1e-12)
    X_out, info = est.fit(G).solve(probe(6))
    assert (info["n_iter"] == 1).all()
    assert_close(X_out, dense_solve(G.T @ G / 40, 0.1, probe(6)), rtol=1e-10)
    assert not hasattr(exact, "n_features_in_")  # the user's object is left unfitted


def test_pipeline_and_influence_in_array_mode():
    from sklearn.pipeline import make_pipeline

    g = torch.Generator().manual_seed(4)
    G = torch.randn(40, 30, generator=g, dtype=torch.float64)
    test = torch.randn(3, 30, generator=g, dtype=torch.float64)
    cfg = F64
    pipe = make_pipeline(
        ak.RandomProjector(proj_dim=8, config=cfg),
        ak.IterativeIFVP(damping=0.1, config=cfg, tol=1e-12),
    ).fit(G.numpy())
    projected = pipe[0].transform(G)
    want = dense_solve(projected.T @ projected / 40, 0.1, pipe[0].transform(test))
    assert_close(pipe.transform(test.numpy()), want, rtol=1e-10)
    scores = ak.influence(pipe, G, test)
    assert_close(scores, want @ projected.T, rtol=1e-10)
    assert pipe.get_params()["iterativeifvp__damping"] == 0.1


def test_containers_model_mode():
    model, (X, y) = mlp(), classification_data()
    est = ak.IterativeIFVP(damping=0.05, config=F64, **TIGHT).fit(model, (X, y))
    grads = ak.per_example_gradients(model, (X[:4], y[:4]), config=F64, flatten=False)
    flat = torch.cat([g.reshape(4, -1) for g in grads.values()], 1)
    out_t = est.transform(flat)
    out_d = est.transform(dict(reversed(grads.items())))  # key order is free
    out_np = est.transform(flat.numpy())
    assert isinstance(out_d, dict) and list(out_d) == list(est.param_shapes_)
    assert {k: tuple(v.shape) for k, v in out_d.items()} == {
        k: tuple(v.shape) for k, v in grads.items()
    }
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float64
    assert_close(torch.cat([v.reshape(4, -1) for v in out_d.values()], 1), out_t, rtol=1e-12)
    assert_close(out_np, out_t, rtol=1e-12)
    X_d, info = est.solve(grads)
    assert isinstance(X_d, dict) and info["n_iter"].shape == (4,)


def test_rows_converge_at_different_iterations_and_are_frozen():
    g = torch.Generator().manual_seed(2)
    G = torch.randn(50, 10, generator=g, dtype=torch.float64)
    _, _, Vh = torch.linalg.svd(G, full_matrices=False)
    V = torch.cat([Vh[:1], torch.zeros(1, 10, dtype=torch.float64), probe(10, 2)])
    est = ak.IterativeIFVP(damping=0.1, config=F64, tol=1e-12).fit(G)
    X_out, info = est.solve(V)
    # An eigenvector converges in one iteration, a zero row in none, the others later.
    assert info["n_iter"][0] == 1 and info["n_iter"][1] == 0 and (info["n_iter"][2:] > 1).all()
    assert info["residual"][1] == 0.0 and torch.equal(X_out[1], torch.zeros(10).double())
    want = dense_solve(G.T @ G / 50, 0.1, V)
    assert_close(X_out, want, rtol=1e-10)
    for i in range(4):  # each row alone: the same iterations and solution (to rounding)
        alone, info_i = est.solve(V[i : i + 1])
        assert info_i["n_iter"][0] == info["n_iter"][i]
        assert_close(alone[0], X_out[i], rtol=1e-12, atol=1e-300)


def test_batched_pcg_core_on_a_callable():
    g = torch.Generator().manual_seed(3)
    B = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = B @ B.T + torch.eye(12, dtype=torch.float64)
    V = probe(12, 5)
    res = batched_pcg(lambda D: D @ A, V, max_iter=200, tol=1e-13)
    assert res.converged.all() and (res.n_iter <= 24).all()
    assert_close(res.X, torch.linalg.solve(A, V.T).T, rtol=1e-10)
    # With A^-1 as the preconditioner: one iteration.
    inv = torch.linalg.inv(A)
    res = batched_pcg(lambda D: D @ A, V, lambda R: R @ inv, tol=1e-10)
    assert (res.n_iter == 1).all()


def test_preconditioned_by_ekfac_unfitted_and_fitted():
    model, (X, y) = mlp(), classification_data()
    damping = 0.01
    exact = ak.ExplicitIFVP(damping=damping, fisher="expected", config=F64).fit(model, (X, y))
    V = probe(exact.n_features_in_)
    want = exact.transform(V)
    ekfac = ak.EKFACIFVP(damping=damping, fisher="expected")
    est = ak.IterativeIFVP(damping=damping, preconditioner=ekfac, config=F64, **TIGHT)
    X_out, info = est.fit(model, (X, y)).solve(V)
    assert_close(X_out, want, rtol=1e-8)
    assert est.preconditioner_ is not ekfac and not hasattr(ekfac, "layers_")  # a clone
    assert est.preconditioner_.config == F64  # this estimator's config, as its own was None
    assert est.identity_scale_ == 1.0  # EK-FAC covers every Linear layer: all parameters
    # get_params(deep=True) reaches into the preconditioner
    params = est.get_params(deep=True)
    assert params["preconditioner__damping"] == damping
    assert params["preconditioner__fisher"] == "expected"
    # A fitted preconditioner is used as given, not refitted.
    fitted = ak.EKFACIFVP(damping=damping, fisher="expected", config=F64).fit(model, (X, y))
    est2 = ak.IterativeIFVP(damping=damping, preconditioner=fitted, config=F64, **TIGHT)
    X2, info2 = est2.fit(model, (X, y)).solve(V)
    assert est2.preconditioner_ is fitted
    assert_close(X2, want, rtol=1e-8)
    assert (info2["n_iter"] == info["n_iter"]).all()


def test_preconditioner_on_a_parameter_subset_and_identity_elsewhere():
    model, (X, y) = mlp(), classification_data()
    damping = 0.05
    G = dense_gauss_newton(model, X, y)
    V = probe(G.shape[0])
    subset = ak.ExplicitIFVP(damping=damping, fisher="expected", params=["2.weight", "2.bias"])
    est = ak.IterativeIFVP(damping=damping, preconditioner=subset, config=F64, **TIGHT)
    assert_close(est.fit(model, (X, y)).transform(V), dense_solve(G, damping, V), rtol=1e-8)
    assert list(est.preconditioner_.param_shapes_) == ["2.weight", "2.bias"]
    # The scale on the uncovered parameters: 1 / (u^T C u / u^T u + damping) for the
    # fixed Rademacher probe u, zero on the covered ones (the last 15 of 39).
    u = torch.randint(0, 2, (39,), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    u[24:] = 0
    c = float(u @ G @ u / (u @ u))
    assert est.curvature_scale_ == pytest.approx(c, rel=1e-10)
    assert est.identity_scale_ == pytest.approx(1 / (c + damping), rel=1e-10)
    # The mapping of the layouts survives pickling (with attach) and to().
    loaded = pickle.loads(pickle.dumps(est)).attach(model, (X, y))
    assert_close(loaded.to("cpu").transform(V), est.transform(V), rtol=1e-12)


def test_datainf_preconditioner_and_params_passed_on():
    model, (X, y) = mlp(), classification_data()
    names = ["2.weight", "2.bias"]
    G = dense_gauss_newton(model, X, y, params=names)
    V = probe(G.shape[0])
    pre = ak.DataInfIFVP(damping=0.1)
    est = ak.IterativeIFVP(damping=0.01, preconditioner=pre, params=names, config=F64, **TIGHT)
    assert_close(est.fit(model, (X, y)).transform(V), dense_solve(G, 0.01, V), rtol=1e-8)
    assert list(est.preconditioner_.param_shapes_) == names  # the same params


def test_ekfac_preconditioner_follows_params():
    model, (X, y) = mlp(), classification_data()
    names = ["2.weight", "2.bias"]
    est = ak.IterativeIFVP(
        damping=0.05, preconditioner=ak.EKFACIFVP(damping=0.05), params=names, config=F64
    ).fit(model, (X, y))
    assert est.preconditioner_.layers_ == ["2"]


def test_preconditioner_covering_a_frozen_weight_is_compressed():
    # EK-FAC covers layer 0 whole, but its weight is frozen: not among our parameters.
    model, (X, y) = mlp(), classification_data()
    model[0].weight.requires_grad_(False)
    G = dense_gauss_newton(model, X, y)
    V = probe(G.shape[0])
    pre = ak.EKFACIFVP(damping=0.05, config=F64).fit(model, (X, y))
    assert "0.weight" in pre.param_shapes_
    est = ak.IterativeIFVP(damping=0.05, preconditioner=pre, config=F64, **TIGHT)
    assert_close(est.fit(model, (X, y)).transform(V), dense_solve(G, 0.05, V), rtol=1e-8)
    assert est.identity_scale_ == 1.0  # everything of ours is covered


def test_incompatible_fitted_preconditioner_raises():
    model, (X, y) = mlp(), classification_data()
    other = ak.EKFACIFVP().fit(mlp(hidden=6), (X, y))
    with pytest.raises(ValueError, match="preconditioner.*does not match.*other shapes"):
        ak.IterativeIFVP(damping=0.1, preconditioner=other).fit(model, (X, y))
    subset = ak.ExplicitIFVP(damping=0.1, params=["0.weight"]).fit(model, (X, y))
    with pytest.raises(ValueError, match=r"none of its parameters \['0.weight'\] are among"):
        ak.IterativeIFVP(damping=0.1, preconditioner=subset, params=["2.weight"]).fit(
            model, (X, y)
        )


class _NegativeIFVP(ak.BaseEstimator):
    """An 'IFVP' that is negative definite: not a valid preconditioner."""

    _is_ifvp = True

    def __init__(self, config=None):
        self.config = config

    def _fit_array(self, G, config):
        pass

    def _transform(self, V):
        return -V


def test_indefinite_preconditioner_raises():
    G = probe(6, 20)
    est = ak.IterativeIFVP(damping=0.1, preconditioner=_NegativeIFVP()).fit(G)
    with pytest.raises(ValueError, match="preconditioner.*not positive definite"):
        est.transform(probe(6))


# ----------------------------------------------------------------- failures and warnings
def test_convergence_warning_reports_the_residual():
    model, (X, y) = mlp(), classification_data()
    est = ak.IterativeIFVP(damping=0.01, max_iter=2, config=F64).fit(model, (X, y))
    with pytest.warns(ConvergenceWarning, match=r"max_iter=2 .* relative residual up to \d"):
        X_out, info = est.solve(probe(est.n_features_in_))
    assert (info["n_iter"] == 2).all() and not info["converged"].any()
    assert (info["residual"] > 1e-6).all() and bool(torch.isfinite(X_out).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough iterations: no warning
        est.set_params(max_iter=200).fit(model, (X, y)).transform(probe(est.n_features_in_))


def test_negative_curvature_of_the_hessian_names_the_damping():
    model, (X, y) = mlp(), classification_data()
    H = dense_hessian(model, X, y)
    values, vectors = torch.linalg.eigh(H)
    assert values[0] < -0.1  # the test MLP is away from a minimum
    est = ak.IterativeIFVP(damping=0.0, curvature="hessian", config=F64).fit(model, (X, y))
    with pytest.raises(ValueError, match="damping=0.0.*positive definite.*curvature='ggn'"):
        est.transform(vectors[:, 0][None])  # the most negative direction
    with pytest.raises(ValueError, match="non-positive curvature"):
        est.transform(probe(H.shape[0]))  # random rows meet it too


def test_singular_gauss_newton_without_damping_raises():
    # Softmax ignores a shift of all logits: the bias direction (1, ..., 1) has
    # zero Gauss-Newton curvature, so damping=0 cannot be solved.
    model, (X, y) = linear(), classification_data()
    est = ak.IterativeIFVP(config=F64).fit(model, (X, y))
    v = torch.zeros(1, est.n_features_in_, dtype=torch.float64)
    v[0, -3:] = 1.0
    with pytest.raises(ValueError, match="Gauss-Newton.*use damping > 0"):
        est.transform(v)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"damping": -1.0}, "'damping' parameter of IterativeIFVP must be a float >= 0"),
        ({"damping": "auto"}, "'damping' parameter of IterativeIFVP must be a float >= 0"),
        ({"curvature": "fisher"}, "'curvature' parameter of IterativeIFVP must be one of"),
        ({"preconditioner": "ekfac"}, "'preconditioner' parameter of IterativeIFVP must be"),
        ({"preconditioner": ak.RandomProjector()}, "'preconditioner' parameter .* IFVP"),
        ({"max_iter": 0}, "'max_iter' parameter of IterativeIFVP must be an int >= 1"),
        ({"max_iter": 2.5}, "'max_iter' parameter of IterativeIFVP must be an int"),
        ({"tol": -1e-3}, "'tol' parameter of IterativeIFVP must be a float >= 0"),
        ({"tol": 1.0}, r"'tol' parameter of IterativeIFVP must be a float in \[0, 1\)"),
        ({"loss": "hinge"}, "'loss' parameter of IterativeIFVP"),
        ({"params": "0.weight"}, "'params' parameter of IterativeIFVP"),
    ],
)
def test_bad_parameters(kwargs, match):
    model, (X, y) = mlp(), classification_data()
    with pytest.raises(ValueError, match=match):
        ak.IterativeIFVP(**kwargs).fit(model, (X, y))
    with pytest.raises(ValueError, match=match):
        ak.IterativeIFVP(**kwargs).fit(probe(4, 10))


def test_bad_data():
    model, (X, y) = mlp(), classification_data()
    with pytest.raises(ValueError, match="re-iterable"):
        ak.IterativeIFVP().fit(model, ((X[i : i + 4], y[i : i + 4]) for i in (0, 4)))
    with pytest.raises(ValueError, match="'data' argument is required"):
        ak.IterativeIFVP().fit(model)
    with pytest.raises(ValueError, match="empty"):
        ak.IterativeIFVP().fit(model, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="names parameters the model does not have"):
        ak.IterativeIFVP(params=["nope"]).fit(model, (X, y))


def test_failed_fit_leaves_a_fitted_estimator_unchanged():
    model, (X, y) = mlp(), classification_data()
    est = ak.IterativeIFVP(damping=0.05, config=F64).fit(model, (X, y))
    V = probe(est.n_features_in_)
    before, state = est.transform(V), dict(est.__dict__)
    with pytest.raises(ValueError):
        est.fit(model, (X[:5], y[:4]))  # 5 inputs, 4 targets
    assert est.__dict__.keys() == state.keys() and est._binding is state["_binding"]
    assert torch.equal(est.transform(V), before)


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double()
    model.train()
    model[0].weight.requires_grad_(False)
    X, y = classification_data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pre = ak.EKFACIFVP(damping=0.1)
    for curvature in ("ggn", "hessian"):
        est = ak.IterativeIFVP(damping=1.0, curvature=curvature, preconditioner=pre, config=F64)
        est.fit(model, (X, y)).transform(probe(est.n_features_in_))
        # Eval mode inside (no dropout): the frozen weight is not a parameter here.
        assert list(est.param_shapes_) == ["0.bias", "3.weight", "3.bias"]
    assert all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_dropout_is_off_in_the_products():
    # Eval mode: the solve is deterministic and equals the model without dropout.
    torch.manual_seed(0)
    with_dropout = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(4, 3)
    ).double()
    plain = torch.nn.Sequential(with_dropout[0], with_dropout[1], with_dropout[3])
    X, y = classification_data()
    V = probe(sum(p.numel() for p in plain.parameters()))
    a = ak.IterativeIFVP(damping=0.1, config=F64, **TIGHT).fit(with_dropout.train(), (X, y))
    b = ak.IterativeIFVP(damping=0.1, config=F64, **TIGHT).fit(plain, (X, y))
    assert_close(a.transform(V), b.transform(V), rtol=1e-12)


# ----------------------------------------------------------------- pickling and attach
def test_pickle_keeps_no_model_and_no_data_and_attach_restores():
    model, (X, y) = mlp(), classification_data(n=400)
    data = DataLoader(TensorDataset(X, y), batch_size=64)
    est = ak.IterativeIFVP(damping=0.05, preconditioner=ak.EKFACIFVP(damping=0.05), config=F64)
    est.fit(model, data)
    V = probe(est.n_features_in_)
    before = est.transform(V)
    blob = pickle.dumps(est)
    assert b"torch.nn.modules" not in blob and b"DataLoader" not in blob
    assert len(blob) < X.numel() * 8  # the data (400 x 5 float64) is not in it
    loaded = pickle.loads(blob)
    with pytest.raises(RuntimeError, match=r"attach\(model, data\)"):
        loaded.transform(V)
    assert loaded.attach(model, data) is loaded
    assert_close(loaded.transform(V), before, rtol=1e-12)
    assert type(loaded.preconditioner_) is ak.EKFACIFVP  # kept, not refitted
    # the original keeps working; a copy of the model with the same values attaches too
    assert torch.equal(est.transform(V), before)
    twin = mlp()
    assert_close(pickle.loads(blob).attach(twin, (X, y)).transform(V), before, rtol=1e-10)


def test_attach_refuses_another_model_or_data():
    model, (X, y) = mlp(), classification_data()
    est = ak.IterativeIFVP(damping=0.05, config=F64).fit(model, (X, y))
    loaded = pickle.loads(pickle.dumps(est))
    other = mlp(seed=1)
    with pytest.raises(ValueError, match="values of the model's parameters .* differ"):
        loaded.attach(other, (X, y))
    with pytest.raises(ValueError, match="not the layout"):
        loaded.attach(mlp(hidden=6), (X, y))
    loaded.attach(model, (X[:6], y[:6]))  # other data: found in the next pass
    with pytest.raises(ValueError, match="yielded 6 examples in one pass and 12"):
        loaded.transform(probe(est.n_features_in_))
    array = ak.IterativeIFVP(damping=0.1).fit(probe(4, 10))
    with pytest.raises(ValueError, match="fitted on an array"):
        array.attach(model, (X, y))
    with pytest.raises(NotFittedError):
        ak.IterativeIFVP().attach(model, (X, y))


def test_a_model_changed_after_fit_is_refused():
    model, (X, y) = mlp(), classification_data()
    est = ak.IterativeIFVP(damping=0.05, config=F64).fit(model, (X, y))
    V = probe(est.n_features_in_)
    est.transform(V)
    with torch.no_grad():
        model[2].bias.add_(1e-3)  # training went on
    with pytest.raises(ValueError, match=r"\['2.bias'\] changed since IterativeIFVP was fitted"):
        est.transform(V)


def test_array_mode_pickles_its_gradients():
    G = probe(5, 30)
    est = ak.IterativeIFVP(damping=0.1, config=F64).fit(G)
    V = probe(5)
    assert_close(pickle.loads(pickle.dumps(est)).transform(V), est.transform(V), rtol=0)


# ----------------------------------------------------------------- threads and processes
def test_threads_share_a_fitted_estimator():
    model, (X, y) = mlp(), classification_data()
    est = ak.IterativeIFVP(damping=0.05, config=F64, **TIGHT).fit(model, (X, y))
    inputs = [probe(est.n_features_in_, 2, seed=s) for s in range(4)]
    serial = [est.transform(v) for v in inputs]
    results = [None] * 4

    def work(i):
        results[i] = est.transform(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for got, want in zip(results, serial):
        assert torch.equal(got, want)


class _Doubling(dist_mod.Reducer):
    """A fake two-rank group with identical shards: every reduction doubles."""

    def __init__(self, calls):
        super().__init__(False)
        self.active, self.world_size, self.calls = True, 2, calls

    def sum_(self, *tensors):
        self.calls.append(len(tensors))
        for t in tensors:
            t.mul_(2)

    def _all_reduce(self, t, op=None):
        t.mul_(2)

    def agree(self, *args, **kwargs):
        self.calls.append("agree")

    def broadcast_(self, tensor, src=0):
        self.calls.append("broadcast")


def test_one_all_reduce_per_iteration(monkeypatch):
    model, (X, y) = mlp(), classification_data()
    ref = ak.IterativeIFVP(damping=0.05, config=F64, **TIGHT).fit(model, (X, y))
    V = probe(ref.n_features_in_)
    want, want_info = ref.solve(V)
    calls: list = []
    monkeypatch.setattr(dist_mod, "reducer", lambda *args, **kwargs: _Doubling(calls))
    est = ak.IterativeIFVP(damping=0.05, config=F64, **TIGHT).fit(model, (X, y))
    assert calls == [1] and est.n_samples_ == 24  # the probe: one tensor, counts doubled
    calls.clear()
    got, info = est.solve(V)
    # the ranks agree on the vectors and take rank 0's, then one all-reduce of one tensor
    # per iteration
    assert calls == ["agree", "broadcast"] + [1] * int(info["n_iter"].max())
    assert (info["n_iter"] == want_info["n_iter"]).all()
    assert_close(got, want, rtol=1e-12)


# ----------------------------------------------------------------- torch.distributed (gloo)
DIST_N, DIST_BATCH = 11, 3
DIST_SIZES = {"two": [7, 4], "three": [6, 0, 5]}


def _dist_fits(rank: int, world: int, sizes, distributed=True) -> dict:
    """Every rank fits on its shard and solves the same vectors; the parent, on all of it."""
    cfg = ak.ComputeConfig(
        dtype="float64", batch_size=DIST_BATCH, progress=False, distributed=distributed
    )
    X, y = classification_data(n=DIST_N, d=4, classes=3, seed=3)
    lo = sum(sizes[:rank])
    shard = (X[lo : lo + sizes[rank]], y[lo : lo + sizes[rank]])
    model = mlp(d=4, hidden=5, out=3, seed=1)
    runs = {
        "ggn": dict(damping=0.05),
        "ggn-ekfac": dict(damping=0.05, preconditioner=ak.EKFACIFVP(damping=0.05)),
        "ggn-explicit-subset": dict(
            damping=0.05, preconditioner=ak.ExplicitIFVP(damping=0.05, params=["2.weight"])
        ),
        "hessian": dict(damping=1.0, curvature="hessian"),
    }
    out = {}
    for name, kwargs in runs.items():
        est = ak.IterativeIFVP(config=cfg, tol=1e-12, max_iter=300, **kwargs).fit(model, shard)
        X_out, info = est.solve(probe(est.n_features_in_))
        out[f"{name}/X"] = X_out
        out[f"{name}/n_iter"] = info["n_iter"].tolist()
        out[f"{name}/n"] = est.n_samples_
        out[f"{name}/scale"] = torch.tensor(est.identity_scale_, dtype=torch.float64)
    return out


def _dist_failures(rank: int, world: int, arg) -> dict:
    cfg = ak.ComputeConfig(dtype="float64", batch_size=DIST_BATCH, progress=False)
    X, y = classification_data(n=DIST_N, d=4, classes=3, seed=3)
    model = mlp(d=4, hidden=5, out=3, seed=1)
    out = {}
    bad = (X[:4], y[:4]) if rank == 0 else (X[4:8], y[4:7])  # 4 inputs, 3 targets on rank 1
    try:
        ak.IterativeIFVP(damping=0.1, config=cfg).fit(model, bad)
        out["bad-data"] = ("ok", "")
    except Exception as exc:
        out["bad-data"] = (type(exc).__name__, str(exc))
    shard = (X[:6], y[:6]) if rank == 0 else (X[6:], y[6:])
    est = ak.IterativeIFVP(damping=0.1, config=cfg).fit(model, shard)
    V = probe(est.n_features_in_)
    invalid = V if rank == 0 else torch.zeros(3, est.n_features_in_ + 1, dtype=torch.float64)
    for key, vectors in (("other-vectors", V + rank), ("invalid", invalid), ("after", V)):
        try:
            out[key] = ("ok", est.transform(vectors))
        except Exception as exc:
            out[key] = (type(exc).__name__, str(exc))
    return out


def _dist_worker(rank, plan, out_dir):
    import test_distributed

    test_distributed.CASES["iterative"] = _dist_fits
    test_distributed.CASES["iterative-failures"] = _dist_failures
    test_distributed._worker(rank, plan, out_dir)


@pytest.fixture(scope="module")
def dist_session(tmp_path_factory):
    from test_distributed import PG_TIMEOUT, run_phases

    phases = [
        ("two", 2, PG_TIMEOUT, "iterative", DIST_SIZES["two"]),
        ("three", 3, PG_TIMEOUT, "iterative", DIST_SIZES["three"]),
        ("failures", 2, PG_TIMEOUT, "iterative-failures", None),
    ]
    return run_phases(phases, tmp_path_factory.mktemp("iterative-ranks"), target=_dist_worker)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["two", "three"], ids=["2-ranks-uneven", "3-ranks-one-empty"])
def test_distributed_solve_equals_one_process(dist_session, phase):
    from test_distributed import ok

    ranks = ok(dist_session[phase])
    ref = _dist_fits(0, 1, [DIST_N], distributed=False)
    for got in ranks:
        for key, want in ref.items():
            if key.endswith("/n_iter"):
                # Sums in another order: a row may cross tol=1e-12 one iteration apart.
                assert all(abs(a - b) <= 1 for a, b in zip(got[key], want)), (key, got[key])
            elif isinstance(want, torch.Tensor):
                assert_close(got[key], want, rtol=1e-10)
            else:
                assert got[key] == want, (key, got[key], want)
        for key, value in got.items():  # the ranks agree exactly: same decisions, same bits
            same = torch.equal if isinstance(value, torch.Tensor) else (lambda a, b: a == b)
            assert same(value, ranks[0][key]), key


@pytest.mark.slow
def test_distributed_failures_raise_on_every_rank(dist_session):
    from test_distributed import ok

    rank0, rank1 = ok(dist_session["failures"])
    assert rank1["bad-data"][0] == "ValueError" and "as many targets" in rank1["bad-data"][1]
    assert rank0["bad-data"][0] == "RuntimeError" and "rank" in rank0["bad-data"][1]
    for got in (rank0, rank1):  # different vectors on the ranks: every rank refuses
        kind, message = got["other-vectors"]
        assert kind == "ValueError" and "same arguments" in message, (kind, message)
    kind, message = rank1["invalid"]  # invalid input on rank 1 only
    assert kind == "ValueError" and "features" in message, (kind, message)
    kind, message = rank0["invalid"]
    assert kind == "ValueError" and "rank(s) [1] failed before" in message, (kind, message)
    assert rank0["after"][0] == rank1["after"][0] == "ok"  # the group is still in step
    assert torch.equal(rank0["after"][1], rank1["after"][1])
