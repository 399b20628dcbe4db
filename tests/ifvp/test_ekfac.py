"""EKFACIFVP against its dense definition, exact cases, invariances and robustness."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import PooledTokens, StridedConv, Zoo, case, mlp_case
from reference import assert_close, ekfac_factors, ekfac_matrix
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import attribkit as ak
from attribkit.ifvp.ekfac import EKFACStatistics, ekfac_apply

F64 = ak.ComputeConfig(dtype="float64", batch_size=5, progress=False)
D64 = torch.float64


# ---------------------------------------------------------------- dense truth (reference.py)
def layer_matrix(G, weight, bias):
    """Per-example gradient matrices ``(n, d_out, d_in)`` (bias as the last column)."""
    n = G[weight].shape[0]
    w = G[weight].reshape(n, G[weight].shape[1], -1)
    return w if bias is None else torch.cat([w, G[bias].reshape(n, -1, 1)], dim=2)


def dense_ekfac(terms, damping):
    """The dense EK-FAC matrix of one layer and its ``Λ`` (``reference``'s definition).

    ``terms``: list of ``(a (n, T, d_in), s (n, T, d_out), G (n, d_out, d_in), w (n,))``
    (one term per target for the expected Fisher, weight 1 otherwise).
    """
    a0 = terms[0][0]
    roots = [w.sqrt()[:, None, None] for *_, w in terms]
    s_rows = [(s * r).reshape(-1, s.shape[-1]) for (_, s, _, _), r in zip(terms, roots)]
    grads = [G * r for (_, _, G, _), r in zip(terms, roots)]
    QS, QA, lam = ekfac_factors(a0.reshape(-1, a0.shape[-1]), s_rows, grads)
    return ekfac_matrix(QS, QA, lam, damping), lam.reshape(-1)


def check_against_dense(est, layers, V, damping):
    """``est.transform(V)`` and ``inverse_transform`` per layer against the dense matrices."""
    out = est.transform(V)
    back = est.inverse_transform(V)
    for (weight, bias), terms in layers:
        Fd, lam = dense_ekfac(terms, damping)
        name = weight.rsplit(".", 1)[0]
        assert_close(est.lambdas_[name].reshape(-1), lam, rtol=1e-9)
        v = layer_matrix(V, weight, bias).reshape(V[weight].shape[0], -1)
        expected = torch.linalg.solve(Fd, v.T).T
        assert_close(layer_matrix(out, weight, bias).reshape(v.shape), expected, rtol=1e-8)
        assert_close(layer_matrix(back, weight, bias).reshape(v.shape), v @ Fd, rtol=1e-9)


def random_vectors(est, m=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(m, *s, generator=g, dtype=D64) for k, s in est.param_shapes_.items()}


def ones(x):
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)


def grads_at(model, X, y, params, loss="cross_entropy"):
    return ak.per_example_gradients(
        model, (X, y), loss=loss, params=params, config=F64, flatten=False
    )


# ---------------------------------------------------------------------------- (a, s) by hand
def mlp_pairs(model, X, y, targets=None):
    """``a`` and ``s`` of both layers, computed by hand (no hooks)."""
    l0, l2 = model[0], model[2]
    z0 = l0(X)
    h = torch.tanh(z0)
    z2 = l2(h)
    y = y if targets is None else targets
    s0, s2 = torch.autograd.grad(F.cross_entropy(z2, y, reduction="sum"), [z0, z2])
    return [(ones(X)[:, None], s0[:, None]), (ones(h.detach())[:, None], s2[:, None])]


# --------------------------------------------------------------------------- exactness
def test_mlp_equals_dense_definition():
    model, X, y = mlp_case()
    est = ak.EKFACIFVP(damping=0.05, config=F64).fit(model, (X, y))
    assert est.layers_ == ["0", "2"] and est.skipped_layers_ == []
    G = grads_at(model, X, y, list(est.param_shapes_))
    pairs = mlp_pairs(model, X, y)
    w = torch.ones(len(X), dtype=D64)
    layers = []
    for (a, s), (weight, bias) in zip(pairs, [("0.weight", "0.bias"), ("2.weight", "2.bias")]):
        Gm = layer_matrix(G, weight, bias)
        assert_close(Gm, s.mT @ a, rtol=1e-12)  # the reference's own consistency
        layers.append(((weight, bias), [(a, s, Gm, w)]))
    check_against_dense(est, layers, random_vectors(est), 0.05)


def test_conv_with_padding_and_stride_equals_dense_definition():
    torch.manual_seed(0)
    model = StridedConv().double()
    X = torch.randn(10, 2, 8, 8, dtype=D64)
    y = torch.randint(0, 3, (10,))
    est = ak.EKFACIFVP(damping=0.1, config=F64).fit(model, (X, y))
    assert est.layers_ == ["conv", "fc"]
    assert est.param_shapes_["conv.weight"] == (3, 2, 3, 3)
    z = model.conv(X)
    h = torch.tanh(z).flatten(1)
    out = model.fc(h)
    s_conv, s_fc = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), [z, out])
    a_conv = ones(F.unfold(X, 3, padding=1, stride=2).transpose(1, 2))  # (n, 16, 19)
    s_conv = s_conv.flatten(2).transpose(1, 2)  # (n, 16, 3)
    G = grads_at(model, X, y, list(est.param_shapes_))
    w = torch.ones(10, dtype=D64)
    Gc = layer_matrix(G, "conv.weight", "conv.bias")
    assert_close(Gc, s_conv.mT @ a_conv, rtol=1e-12)
    layers = [
        (("conv.weight", "conv.bias"), [(a_conv, s_conv, Gc, w)]),
        (("fc.weight", "fc.bias"), [(ones(h.detach())[:, None], s_fc[:, None],
                                     layer_matrix(G, "fc.weight", "fc.bias"), w)]),
    ]  # fmt: skip
    check_against_dense(est, layers, random_vectors(est), 0.1)


def test_linear_on_tokens_equals_dense_definition():
    torch.manual_seed(0)
    model = PooledTokens().double()
    X = torch.randn(9, 6, 5, dtype=D64)
    y = torch.randint(0, 3, (9,))
    # A tiny memory budget forces one example per chunk in the weight-shared pass.
    cfg = ak.ComputeConfig(dtype="float64", batch_size=4, progress=False, memory_budget=64)
    est = ak.EKFACIFVP(damping=0.1, config=cfg).fit(model, (X, y))
    assert list(est.param_shapes_) == ["proj.weight", "proj.bias", "head.weight"]
    z = model.proj(X)
    h = torch.tanh(z).mean(1)
    out = model.head(h)
    s_z, s_out = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), [z, out])
    G = grads_at(model, X, y, list(est.param_shapes_))
    w = torch.ones(9, dtype=D64)
    Gp = layer_matrix(G, "proj.weight", "proj.bias")
    assert_close(Gp, s_z.mT @ ones(X), rtol=1e-12)
    layers = [
        (("proj.weight", "proj.bias"), [(ones(X), s_z, Gp, w)]),
        (("head.weight", None), [(h.detach()[:, None], s_out[:, None],
                                  layer_matrix(G, "head.weight", None), w)]),
    ]  # fmt: skip
    check_against_dense(est, layers, random_vectors(est), 0.1)


def test_both_weight_shared_orders_agree():
    """Rotating the factors first and forming the gradients first give the same Λ."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 40, 3, generator=g, dtype=D64)  # T large: gradient first
    s = torch.randn(7, 40, 2, generator=g, dtype=D64)
    b = torch.randn(7, 2, 3, generator=g, dtype=D64)  # T small: rotate first
    r = torch.randn(7, 2, 4, generator=g, dtype=D64)
    stats = EKFACStatistics([(3, 2), (3, 4)], device="cpu", dtype=D64)
    stats.update_covariances(0, a, s)
    stats.update_covariances(1, b, r)
    stats.finish_covariances()
    stats.update_lambda(0, a, s)
    stats.update_lambda(1, b, r)
    lam = stats.finish_lambda()
    for k, (x, y) in enumerate([(a, s), (b, r)]):
        G = y.mT @ x
        expected = ((stats.Q_S[k].T @ G @ stats.Q_A[k]) ** 2).mean(0)
        assert_close(lam[k], expected, rtol=1e-12)
        X = torch.randn(2, *G.shape[1:], generator=g, dtype=D64)
        # ekfac_apply with scale 1 is the identity (orthogonal bases).
        assert_close(ekfac_apply(stats.Q_S[k], stats.Q_A[k], torch.ones_like(lam[k]), X), X)


def test_one_example_equals_explicit_per_layer():
    """With one example each layer's EK-FAC block is exactly g g^T (K-FAC is exact)."""
    model, X, y = mlp_case(n=1)
    est = ak.EKFACIFVP(damping=0.3, config=F64).fit(model, (X, y))
    V = random_vectors(est)
    out = est.transform(V)
    for layer in ("0", "2"):
        params = [f"{layer}.weight", f"{layer}.bias"]
        explicit = ak.ExplicitIFVP(damping=0.3, params=params, config=F64).fit(model, (X, y))
        ref = explicit.transform({k: V[k] for k in params})
        for k in params:
            assert_close(out[k], ref[k], rtol=1e-9)


def test_single_linear_output_expected_mse_equals_explicit():
    """Linear(d -> 1) under the Gauss-Newton (expected) Fisher: K-FAC is exact."""
    torch.manual_seed(0)
    model = nn.Linear(6, 1).double()
    X = torch.randn(40, 6, dtype=D64) @ torch.randn(6, 6, dtype=D64)
    y = torch.randn(40, 1, dtype=D64)
    est = ak.EKFACIFVP(damping=0.01, fisher="expected", loss="mse", config=F64)
    est.fit(model, (X, y))
    # The expected Fisher of the MSE (D = 1) is the gradient at target f - sqrt(1/2).
    with torch.no_grad():
        targets = model(X) - 0.5**0.5
    G = ak.per_example_gradients(model, (X, targets), loss="mse", config=F64)
    explicit = ak.ExplicitIFVP(damping=0.01, config=F64).fit(G)
    V = torch.randn(4, 7, dtype=D64)
    assert_close(est.transform(V), explicit.transform(V), rtol=1e-9)
    assert_close(est.inverse_transform(V), explicit.inverse_transform(V), rtol=1e-9)
    # ... which is 2 E[a a^T] for the per-example MSE (1 output).
    a = ones(X)
    Fd = 2 * a.T @ a / 40 + 0.01 * torch.eye(7, dtype=D64)
    assert_close(est.transform(V), torch.linalg.solve(Fd, V.T).T, rtol=1e-9)


def test_expected_fisher_equals_class_weighted_expectation():
    model, X, y = mlp_case(n=10)
    est = ak.EKFACIFVP(damping=0.05, fisher="expected", config=F64).fit(model, (X, y))
    with torch.no_grad():
        probs = torch.softmax(model(X), dim=1)
    params = list(est.param_shapes_)
    terms = {0: [], 1: []}
    for c in range(3):
        yc = torch.full_like(y, c)
        G = grads_at(model, X, yc, params)
        for k, ((a, s), (weight, bias)) in enumerate(
            zip(mlp_pairs(model, X, y, yc), [("0.weight", "0.bias"), ("2.weight", "2.bias")])
        ):
            terms[k].append((a, s, layer_matrix(G, weight, bias), probs[:, c]))
    layers = [(("0.weight", "0.bias"), terms[0]), (("2.weight", "2.bias"), terms[1])]
    check_against_dense(est, layers, random_vectors(est), 0.05)


def test_quality_against_exact_inverse_hessian():
    """Linear(100 -> 1), 5000 samples, MSE, damping 0.1: EK-FAC tracks (H + 0.1 I)^{-1} v."""
    g = torch.Generator().manual_seed(0)
    n, d = 5000, 100
    scales = torch.logspace(-1, 0.5, d, dtype=D64)
    rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))[0]
    X = (torch.randn(n, d, generator=g, dtype=D64) * scales) @ rot
    w_true = torch.randn(d, 1, generator=g, dtype=D64)
    # Residual variance 1/2: the empirical Fisher E[4 r^2 x x^T] matches H = 2 E[x x^T].
    y = X @ w_true + 0.5**0.5 * torch.randn(n, 1, generator=g, dtype=D64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.T)
    cfg = ak.ComputeConfig(dtype="float64", batch_size=500, progress=False)
    est = ak.EKFACIFVP(damping=0.1, loss="mse", config=cfg).fit(model, (X, y))
    H = 2 * X.T @ X / n + 0.1 * torch.eye(d, dtype=D64)
    V = torch.randn(20, d, generator=g, dtype=D64)
    exact = torch.linalg.solve(H, V.T).T
    approx = est.transform(V)
    corr = [float(np.corrcoef(approx[i].numpy(), exact[i].numpy())[0, 1]) for i in range(20)]
    assert min(corr) > 0.95, corr  # measured: 0.99992
    # The Gauss-Newton (expected) Fisher of a linear model is its Hessian: exact.
    gn = ak.EKFACIFVP(damping=0.1, loss="mse", fisher="expected", config=cfg).fit(model, (X, y))
    assert_close(gn.transform(V), exact, rtol=1e-10)


# --------------------------------------------------------------------------- invariances
def test_invariant_to_batching_shuffling_and_max_batches():
    model, X, y = mlp_case(n=23)
    V = torch.randn(4, 39, dtype=D64)
    ref = ak.EKFACIFVP(config=F64.__class__(dtype="float64", batch_size=23, progress=False))
    ref = ref.fit(model, (X, y)).transform(V)
    for bs in (1, 4, 7):
        cfg = ak.ComputeConfig(dtype="float64", batch_size=bs, progress=False)
        assert_close(ak.EKFACIFVP(config=cfg).fit(model, (X, y)).transform(V), ref)
    torch.manual_seed(3)
    loader = DataLoader(TensorDataset(X, y), batch_size=5, shuffle=True)  # ragged: 5,5,5,5,3
    assert_close(ak.EKFACIFVP(config=F64).fit(model, loader).transform(V), ref)
    full = ak.EKFACIFVP(max_batches=5, config=F64).fit(model, (X, y)).transform(V)
    assert_close(full, ref)
    assert_close(ak.EKFACIFVP(max_batches=50, config=F64).fit(model, (X, y)).transform(V), ref)
    first = ak.EKFACIFVP(max_batches=2, config=F64).fit(model, (X, y))
    assert first.n_samples_ == 10
    assert_close(
        first.transform(V), ak.EKFACIFVP(config=F64).fit(model, (X[:10], y[:10])).transform(V)
    )
    listed = [(X[i : i + 6], y[i : i + 6]) for i in range(0, 23, 6)]
    assert_close(ak.EKFACIFVP(config=F64).fit(model, listed).transform(V), ref)


def test_float32_model_close_to_float64():
    model, X, y = mlp_case(n=200)
    V = torch.randn(4, 39, dtype=D64)
    ref = ak.EKFACIFVP(config=F64).fit(model, (X, y)).transform(V)
    model32 = mlp_case(n=1)[0].float()
    est = ak.EKFACIFVP(config=ak.ComputeConfig(progress=False)).fit(model32, (X, y))
    out = est.transform(V)
    assert out.dtype == torch.float32 and est.lambdas_["0"].dtype == torch.float32
    assert_close(out, ref, rtol=1e-4)


def test_damping_auto_and_inverse():
    model, X, y = mlp_case()
    est = ak.EKFACIFVP(damping="auto", config=F64).fit(model, (X, y))
    expected = [0.1 * float(est.lambdas_[n].mean()) for n in est.layers_]
    assert est.damping_ == pytest.approx(expected, rel=1e-12)
    V = torch.randn(3, 39, dtype=D64)
    assert_close(est.inverse_transform(est.transform(V)), V, rtol=1e-9)
    # Cross-entropy output gradients sum to zero, so the last layer's Λ is singular
    # with damping 0; MSE's is not.
    Y = torch.randn(len(X), 3, dtype=D64)
    undamped = ak.EKFACIFVP(damping=0.0, loss="mse", config=F64).fit(model, (X, Y))
    assert_close(undamped.damping_, [0.0, 0.0])


def test_true_fisher_is_seeded_and_differs_from_empirical():
    model, X, y = mlp_case(n=30)
    V = torch.randn(2, 39, dtype=D64)
    torch.manual_seed(5)
    first = ak.EKFACIFVP(fisher="true", config=F64).fit(model, (X, y)).transform(V)
    torch.manual_seed(5)
    again = ak.EKFACIFVP(fisher="true", config=F64).fit(model, (X, y)).transform(V)
    assert_close(first, again, rtol=0)
    empirical = ak.EKFACIFVP(config=F64).fit(model, (X, y)).transform(V)
    assert not torch.allclose(first, empirical, rtol=1e-3)
    est = ak.EKFACIFVP(fisher="true", loss="mse", config=F64)
    assert est.fit(model, (X, torch.randn(30, 3, dtype=D64))).lambdas_["2"].shape == (3, 5)


# --------------------------------------------------------------------------- layers
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)
        self.act = nn.ReLU(inplace=True)
        self.grouped = nn.Conv1d(1, 1, 1)  # unsupported type
        self.out = nn.Linear(3, 2)

    def forward(self, tokens):
        h = self.norm(self.emb(tokens)).mean(1)
        return self.out(self.act(self.fc(h)))


def test_batchnorm_is_skipped_and_evaluated_with_running_statistics():
    """BatchNorm is not covered (listed as skipped); the pass uses its running statistics."""
    model, X, y = case("batchnorm")
    running = model[1].running_mean.clone()
    model.train()
    est = ak.EKFACIFVP(damping=0.1, config=F64).fit(model, (X, y))
    assert est.layers_ == ["0", "3"] and est.skipped_layers_ == ["1"]
    assert model.training and torch.equal(model[1].running_mean, running)
    # The eval-mode model gives the same statistics: train mode was never used.
    frozen = ak.EKFACIFVP(damping=0.1, config=F64).fit(model.eval(), (X, y))
    for layer in est.layers_:
        assert_close(est.lambdas_[layer], frozen.lambdas_[layer], rtol=0)


def test_layer_resolution_and_skipped():
    torch.manual_seed(0)
    model = Mixed().double()
    tokens = torch.randint(0, 10, (8, 5))
    y = torch.randint(0, 2, (8,))
    with pytest.warns(UserWarning, match=r"covers 31.5% .*'emb' \(Embedding, 40\)"):
        est = ak.EKFACIFVP(config=F64).fit(model, (tokens, y))
    assert est.layers_ == ["fc", "out"]
    assert est.skipped_layers_ == ["emb", "norm", "grouped"]
    assert list(est.skipped_reasons_) == est.skipped_layers_
    assert est.skipped_reasons_["norm"].startswith("LayerNorm: not a supported type")
    assert list(est.param_shapes_) == ["fc.weight", "fc.bias", "out.weight", "out.bias"]
    only = ak.EKFACIFVP(layers=["out"], config=F64).fit(model, (tokens, y))
    assert only.layers_ == ["out"] and only.skipped_layers_ == []
    assert_close(only.lambdas_["out"], est.lambdas_["out"], rtol=1e-12)
    with pytest.raises(ValueError, match="'norm' of type LayerNorm"):
        ak.EKFACIFVP(layers=["norm"]).fit(model, (tokens, y))
    with pytest.raises(ValueError, match="does not have: 'nope'"):
        ak.EKFACIFVP(layers=["fc", "nope"]).fit(model, (tokens, y))
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)).double()
    xg = torch.randn(3, 2, 3, 3, dtype=D64)
    with pytest.warns(UserWarning, match="covers 20.0%"):
        fitted = ak.EKFACIFVP(config=F64).fit(grouped, (xg, torch.tensor([0, 1, 0])))
    assert fitted.layers_ == ["2"] and fitted.skipped_layers_ == ["0"]
    assert "grouped convolution (groups=2)" in fitted.skipped_reasons_["0"]
    with pytest.raises(ValueError, match="grouped convolution"):
        ak.EKFACIFVP(layers=["0"]).fit(grouped, (xg, torch.tensor([0, 1, 0])))


def test_frozen_layers_and_requested_frozen_layer():
    model, X, y = mlp_case()
    model[0].requires_grad_(False)
    est = ak.EKFACIFVP(config=F64).fit(model, (X, y))
    assert est.layers_ == ["2"]
    both = ak.EKFACIFVP(layers=["0", "2"], config=F64).fit(model, (X, y))
    assert both.layers_ == ["0", "2"]
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    assert all(p.grad is None for p in model.parameters())


class InPlaceAfterFrozen(nn.Module):
    """A frozen first layer whose output is changed in place (``relu_``), as in ResNets."""

    def __init__(self, in_place):
        super().__init__()
        self.a, self.b, self.in_place = nn.Linear(4, 6), nn.Linear(6, 3), in_place

    def forward(self, x):
        h = self.a(x)
        return self.b(h.relu_() if self.in_place else torch.relu(h))


@pytest.mark.parametrize("estimator", ["ekfac", "kronecker"])
def test_requested_frozen_layer_followed_by_an_in_place_op(estimator):
    # Its output does not require grad, so the capture differentiates at a fresh
    # leaf; the model must go on with a copy, or relu_ on that leaf fails.
    torch.manual_seed(0)
    plain = InPlaceAfterFrozen(in_place=False).double()
    plain.a.requires_grad_(False)
    inplace = InPlaceAfterFrozen(in_place=True).double()
    inplace.load_state_dict(plain.state_dict())
    inplace.a.requires_grad_(False)
    X, y = torch.randn(12, 4, dtype=D64), torch.randint(0, 3, (12,))

    def run(model):
        if estimator == "ekfac":
            est = ak.EKFACIFVP(layers=["a", "b"], damping=0.1, config=F64).fit(model, (X, y))
            return est.transform(torch.eye(51, dtype=D64)[:5])
        kp = ak.KroneckerProjector(2, 2, layers=["a", "b"], config=F64).fit(model)
        return ak.per_example_gradients(model, (X, y), projector=kp, config=F64)

    assert_close(run(inplace), run(plain))
    assert not any(p.requires_grad for p in inplace.a.parameters())


# --------------------------------------------------------------------------- robustness
class Exploding(nn.Module):
    """Raises inside its forward on the given call."""

    def __init__(self, fail_at):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3))
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom inside the model")
        return self.body(x)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


#: A budget too small to keep pass 1's (a, s): pass 2 runs the model again.
STREAM = ak.ComputeConfig(dtype="float64", batch_size=5, progress=False, memory_budget=64)


@pytest.mark.parametrize("fail_at", [1, 4])  # first pass / second pass
def test_model_left_as_it_was_after_failing_fit(fail_at):
    torch.manual_seed(0)
    model = Exploding(fail_at).double().train()
    X, y = torch.randn(12, 5, dtype=D64), torch.randint(0, 3, (12,))
    est = ak.EKFACIFVP(config=STREAM)  # batches of 5: 3 per pass
    # A model error in any batch is a ValueError naming the batch (API section 9).
    with pytest.raises(ValueError, match=rf"batch {(fail_at - 1) % 3}\b.*RuntimeError: boom"):
        est.fit(model, (X, y))
    assert hook_count(model) == 0 and model.training and model.body[1].training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not hasattr(est, "layers_")
    model.fail_at = 0
    est.fit(model, (X, y))
    assert hook_count(model) == 0 and model.training
    assert all(p.grad is None for p in model.parameters())


def test_second_pass_reuses_pass_one_within_budget():
    """Pass 1's captured (a, s) feed pass 2 when they fit memory_budget: same numbers."""
    torch.manual_seed(0)
    model = Exploding(0).double()
    X, y = torch.randn(12, 5, dtype=D64), torch.randint(0, 3, (12,))
    kept = ak.EKFACIFVP(config=F64).fit(model, (X, y))
    assert model.calls == 3  # one pass of 3 batches
    streamed = ak.EKFACIFVP(config=STREAM).fit(model, (X, y))
    assert model.calls == 9  # two passes more
    for name in kept.layers_:
        assert_close(kept.lambdas_[name], streamed.lambdas_[name], rtol=1e-13)
    V = torch.randn(3, 39, dtype=D64)
    assert_close(kept.transform(V), streamed.transform(V), rtol=1e-12)


def test_nonfinite_lambda_names_the_pass():
    """A model that goes wrong in the second pass only: Λ's check names that pass."""

    class LateNaN(nn.Sequential):
        calls = 0

        def forward(self, x):
            LateNaN.calls += 1
            out = super().forward(x)
            return out * float("nan") if LateNaN.calls == 5 else out

    torch.manual_seed(0)
    model = LateNaN(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(12, 5, dtype=D64), torch.randint(0, 3, (12,))
    with pytest.raises(ValueError, match=r"correction .* of layer '0'.*batch 1 .*correction pass"):
        ak.EKFACIFVP(config=STREAM).fit(model, (X, y))
    assert hook_count(model) == 0


def test_nonfinite_covariance_names_layer_and_batch():
    model, X, y = mlp_case(n=20)
    X = X.clone()
    X[13, 2] = float("nan")  # batch 2 of size 5
    with pytest.raises(ValueError, match=r"layer '0' is not finite.*batch 2 \(0-based\)"):
        ak.EKFACIFVP(config=F64).fit(model, (X, y))
    X[13, 2] = float("inf")
    with pytest.raises(ValueError, match=r"layer '0' is not finite.*batch 2"):
        ak.EKFACIFVP(config=F64).fit(model, (X, y))
    assert hook_count(model) == 0


def test_generator_data_and_array_mode_refused():
    model, X, y = mlp_case()
    gen = ((X[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4))
    with pytest.raises(ValueError, match="two passes"):
        ak.EKFACIFVP().fit(model, gen)
    with pytest.raises(TypeError, match="inputs and output gradients"):
        ak.EKFACIFVP().fit(torch.randn(10, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(damping=-1.0), "'damping' parameter of EKFACIFVP must be a float >= 0 or 'auto'"),
        (dict(damping="big"), "'damping'"),
        (dict(layers="fc"), "'layers'"),
        (dict(layers=[]), "'layers'"),
        (dict(fisher="exact"), "'fisher'"),
        (dict(loss="hinge"), "'loss'"),
        (dict(max_batches=0), "'max_batches'"),
        (dict(fisher="expected", loss=lambda o, t: (o - t).pow(2).sum(1)), "custom loss"),
    ],
)
def test_bad_parameters(kwargs, match):
    model, X, y = mlp_case()
    with pytest.raises(ValueError, match=match):
        ak.EKFACIFVP(**kwargs).fit(model, (X, y))


def test_zero_damping_on_zero_layer_is_refused():
    model, X, y = mlp_case()
    with torch.no_grad():
        model[2].weight.zero_()  # no gradient reaches layer 0
    with pytest.raises(ValueError, match="layer '0'.*zero entries"):
        ak.EKFACIFVP(damping="auto", config=F64).fit(model, (X, y))


class Unpicklable(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        self.callback = lambda: None  # a model in the pickle would fail to pickle


def test_pickle_round_trip_without_model():
    torch.manual_seed(0)
    model = Unpicklable().double()
    X, y = torch.randn(12, 5, dtype=D64), torch.randint(0, 3, (12,))
    est = ak.EKFACIFVP(config=F64).fit(model, (X, y))
    V = torch.randn(3, 39, dtype=D64)
    before = est.transform(V)
    loaded = pickle.loads(pickle.dumps(est))
    assert_close(loaded.transform(V), before, rtol=0)
    assert_close(loaded.inverse_transform(V), est.inverse_transform(V), rtol=0)
    assert loaded.layers_ == est.layers_ and loaded.get_params() == est.get_params()


# --------------------------------------------------------------------------- capture
def test_capture_gives_per_example_gradients():
    from attribkit._compute.capture import (
        LayerCapture,
        matrix_to_params,
        param_layout,
        resolve_layers,
    )

    torch.manual_seed(0)
    model = Zoo().double()
    X, y = torch.randn(6, 2, 8, 7, dtype=D64), torch.randint(0, 3, (6,))
    layers, skipped = resolve_layers(model)
    assert [layer.name for layer in layers] == ["c1", "c2", "c3", "tok", "fc"] and not skipped
    G = grads_at(model, X, y, list(param_layout(layers)))
    with LayerCapture(model, layers) as capture:
        pairs = capture.backward(F.cross_entropy(model(X), y, reduction="sum"))
        assert hook_count(model) == 5
    assert hook_count(model) == 0
    assert [tuple(a.shape) for a, _ in pairs][3:] == [(6, 8, 3), (6, 2, 4)]  # T: tokens, calls
    for layer, (a, s) in zip(layers, pairs):
        weight, bias = matrix_to_params(layer, s.mT @ a)
        assert_close(weight, G[layer.weight_name], rtol=1e-12)
        if bias is not None:
            assert_close(bias, G[layer.bias_name], rtol=1e-12)
    V = torch.randn(2, sum(p.numel() for p in model.parameters()), dtype=D64)
    est = ak.EKFACIFVP(config=F64).fit(model, (X, y))
    assert_close(est.inverse_transform(est.transform(V)), V, rtol=1e-9)


def test_bad_data_and_half_precision_state():
    model, X, y = mlp_case()
    with pytest.raises(ValueError, match="'data' argument is required"):
        ak.EKFACIFVP().fit(model)
    with pytest.raises(ValueError, match="empty"):
        ak.EKFACIFVP().fit(model, [])
    cfg = ak.ComputeConfig(dtype="bfloat16", batch_size=5, progress=False)
    est = ak.EKFACIFVP(config=cfg).fit(model, (X, y))
    assert est.input_eigenvectors_["0"].dtype == torch.bfloat16
    V = torch.randn(2, 39, dtype=D64)
    out = est.transform(V)
    assert out.dtype == torch.bfloat16
    ref = ak.EKFACIFVP(config=F64).fit(model, (X, y)).transform(V)
    assert_close(out, ref, rtol=3e-2)


def test_zero_damping_with_rounding_level_lambda_is_refused():
    # The output-gradient covariance of a 2-class softmax layer is singular in
    # exact arithmetic: Λ has entries at rounding level, whose inverse is noise.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="layer '2'.*rounding level"):
        ak.EKFACIFVP(damping=0.0, config=F64).fit(model, (X, y))
    est = ak.EKFACIFVP(damping=1e-3, config=F64).fit(model, (X, y))
    assert torch.isfinite(est.transform(torch.randn(2, 23, dtype=torch.float64))).all()
