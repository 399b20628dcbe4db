"""attribkit.functional.ifvp_at_x_ekfac against the dense EK-FAC definition and EKFACIFVP."""

from __future__ import annotations

import pytest
import torch
from reference import assert_close, ekfac_factors, ekfac_ifvp
from torch import nn

from attribkit.config import ComputeConfig
from attribkit.functional import (
    EKFAC_CACHE_KEY,
    IFVPUsageError,
    MLPCache,
    ifvp_at_x_ekfac,
    manual_cache_forward,
)
from attribkit.ifvp.ekfac import EKFACIFVP
from attribkit.ifvp.explicit import ExplicitIFVP

D = torch.float64
F64 = ComputeConfig(dtype="float64", progress=False)


class TwoLayer(nn.Module):
    """``y = W2 tanh(W1 x)``, both linear maps cached (works on (b, d) and (b, t, d))."""

    def __init__(self, d_in=4, hidden=3, d_out=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(d_in, hidden, bias=False).double()
        self.l2 = nn.Linear(hidden, d_out, bias=False).double()

    @manual_cache_forward
    def forward(self, x):
        h = self.l1(x)
        t = torch.tanh(h)
        y = self.l2(t)
        if hasattr(self, EKFAC_CACHE_KEY):
            getattr(self, EKFAC_CACHE_KEY).input_hidden_pairs.extend([(x, h), (t, y)])
        return y


def _cached(model):
    cache = MLPCache()
    setattr(model, EKFAC_CACHE_KEY, cache)
    return cache


def _dense_ekfac(rows_a, rows_s, per_example, damping, V):
    """EK-FAC's IFVP of ``V`` from its definition (``reference``), one layer's truth."""
    QS, QA, lam = ekfac_factors(rows_a, [rows_s], [torch.stack(per_example)])
    return ekfac_ifvp(QS, QA, lam, damping, V)


def _per_example_truth(model, X, Y, mask=None):
    """(a rows, s rows, per-example ∇W) of both layers, one example at a time."""
    out = [([], [], []), ([], [], [])]
    for i in range(X.shape[0]):
        h = model.l1(X[i : i + 1])
        t = torch.tanh(h)
        y = model.l2(t)
        err = (y - Y[i : i + 1]) ** 2
        if mask is not None:
            err = err * mask[i : i + 1, ..., None]
        gh, gy = torch.autograd.grad(err.sum(), [h, y])
        for k, (a, s) in enumerate([(X[i : i + 1], gh), (t, gy)]):
            a, s = a.reshape(-1, a.shape[-1]).detach(), s.reshape(-1, s.shape[-1])
            keep = slice(None) if mask is None else mask[i].reshape(-1) != 0
            out[k][0].append(a[keep])
            out[k][1].append(s[keep])
            out[k][2].append(s.T @ (a if mask is None else a * mask[i].reshape(-1, 1)))
    return [(torch.cat(a), torch.cat(s), g) for a, s, g in out]


def test_ekfac_matches_the_dense_definition_and_any_batch_size():
    model = TwoLayer()
    cache = _cached(model)
    X, Y = torch.randn(40, 4, dtype=D), torch.randn(40, 2, dtype=D)

    def losses(X, Y):
        return ((model(X) - Y) ** 2).sum(-1)

    V = [[torch.randn(5, 3, 4, dtype=D), torch.randn(2, 3, dtype=D)]]
    truth = _per_example_truth(model, X, Y)
    expected = [_dense_ekfac(*truth[k], 0.05, V[0][k]) for k in range(2)]
    for batch_size in (1, 7, 40):
        out = ifvp_at_x_ekfac(losses, X, Y, batch_size=batch_size, mlp_cache=cache, damping=0.05)
        res = out(V)
        assert len(res) == 1 and len(res[0]) == 2
        for k in range(2):
            assert res[0][k].shape == V[0][k].shape
            assert_close(res[0][k], expected[k])
    assert all(p.grad is None for p in model.parameters())  # no .grad side effects
    with torch.no_grad():  # the caller's grad mode does not matter
        res = ifvp_at_x_ekfac(losses, X, Y, batch_size=40, mlp_cache=cache, damping=0.05)(V)
    assert_close(res[0][1], expected[1])


def test_ekfac_is_exact_where_kfac_is_and_equals_the_estimator():
    # One output with |ds| constant: F = c^2 A, so EK-FAC is the exact Fisher.
    torch.manual_seed(1)
    lin = nn.Linear(5, 1, bias=False).double()
    model = nn.Module()
    model.lin = lin

    @manual_cache_forward
    def forward(self, x):
        y = self.lin(x)
        if hasattr(self, EKFAC_CACHE_KEY):
            getattr(self, EKFAC_CACHE_KEY).input_hidden_pairs.append((x, y))
        return y

    import types

    model.forward = types.MethodType(forward, model)
    cache = _cached(model)
    X = torch.randn(30, 5, dtype=D)
    signs = torch.where(torch.rand(30) < 0.5, -1.0, 1.0).to(D)
    ifvp = ifvp_at_x_ekfac(
        lambda X, c: 1.5 * c * model(X)[:, 0], X, signs, batch_size=8, mlp_cache=cache,
        damping=0.01,
    )  # fmt: skip
    G = 1.5 * signs[:, None] * X  # per-example gradients of the weight (1 x 5)
    V = torch.randn(3, 1, 5, dtype=D)
    exact = ExplicitIFVP(damping=0.01, config=F64).fit(G).transform(V.reshape(3, 5))
    assert_close(ifvp([[V]])[0][0].reshape(3, 5), exact)

    # The estimator on the same layer and per-example losses gives the same numbers.
    net = TwoLayer()
    cache = _cached(net)
    Xs, Ys = torch.randn(24, 4, dtype=D), torch.randn(24, 2, dtype=D)
    ours = ifvp_at_x_ekfac(
        lambda X, Y: ((net(X) - Y) ** 2).mean(-1), Xs, Ys, batch_size=5, mlp_cache=cache,
        damping=0.1,
    )  # fmt: skip
    delattr(net, EKFAC_CACHE_KEY)
    est = EKFACIFVP(damping=0.1, loss="mse", config=F64).fit(net, (Xs, Ys))
    assert list(est.param_shapes_) == ["l1.weight", "l2.weight"]
    V = {"l1.weight": torch.randn(2, 3, 4, dtype=D), "l2.weight": torch.randn(2, 2, 3, dtype=D)}
    theirs = est.transform(V)
    res = ours([[V["l1.weight"], V["l2.weight"]]])[0]
    assert_close(res[0], theirs["l1.weight"])
    assert_close(res[1], theirs["l2.weight"])


def test_ekfac_sequences_with_a_mask():
    model = TwoLayer()
    cache = _cached(model)
    X, Y = torch.randn(12, 5, 4, dtype=D), torch.randn(12, 5, 2, dtype=D)
    mask = (torch.rand(12, 5) < 0.7).to(D)
    mask[:, 0] = 1

    def losses(X, Y, mask):
        return (((model(X) - Y) ** 2) * mask[..., None]).sum((1, 2)), mask

    V = [[torch.randn(3, 4, dtype=D), torch.randn(2, 2, 3, dtype=D)]]
    res = ifvp_at_x_ekfac(losses, X, Y, mask, batch_size=5, mlp_cache=cache, damping=0.1)(V)
    truth = _per_example_truth(model, X, Y, mask)
    for k in range(2):
        assert_close(res[0][k], _dense_ekfac(*truth[k], 0.1, V[0][k]))


def test_ekfac_max_iter_uses_the_first_batches_of_one_permutation():
    model = TwoLayer()
    cache = _cached(model)
    X, Y = torch.randn(30, 4, dtype=D), torch.randn(30, 2, dtype=D)

    def losses(X, Y):
        return ((model(X) - Y) ** 2).sum(-1)

    torch.manual_seed(3)
    ifvp = ifvp_at_x_ekfac(losses, X, Y, batch_size=6, max_iter=2, mlp_cache=cache, damping=0.1)
    torch.manual_seed(3)
    used = torch.randperm(30)[:12]
    V = [[torch.randn(3, 4, dtype=D), torch.randn(2, 3, dtype=D)]]
    truth = _per_example_truth(model, X[used], Y[used])
    res = ifvp(V)
    for k in range(2):
        assert_close(res[0][k], _dense_ekfac(*truth[k], 0.1, V[0][k]))


def test_ekfac_several_caches_and_in_dims():
    a, b = TwoLayer(seed=0), TwoLayer(d_in=2, hidden=2, d_out=2, seed=1)
    ca, cb = _cached(a), _cached(b)
    X, Y = torch.randn(20, 4, dtype=D), torch.randn(20, 2, dtype=D)
    shift = torch.tensor(0.5, dtype=D)  # shared by every example: in_dims None

    def losses(X, Y, shift):
        return ((b(a(X) + shift) - Y) ** 2).sum(-1)

    ifvp = ifvp_at_x_ekfac(
        losses, X, Y, shift, in_dims=(0, 0, None), batch_size=4, mlp_cache=[ca, cb], damping=0.2
    )
    V = [
        [torch.randn(3, 4, dtype=D), torch.randn(2, 3, dtype=D)],
        [torch.randn(2, 2, dtype=D), torch.randn(2, 2, dtype=D)],
    ]
    res = ifvp(V)
    assert [[t.shape for t in layer] for layer in res] == [[t.shape for t in layer] for layer in V]
    assert all(bool(torch.isfinite(t).all()) for layer in res for t in layer)


def test_ekfac_errors():
    model = TwoLayer()
    cache = _cached(model)
    X, Y = torch.randn(10, 4, dtype=D), torch.randn(10, 2, dtype=D)

    def losses(X, Y):
        return ((model(X) - Y) ** 2).sum(-1)

    with pytest.raises(IFVPUsageError, match="one entry per argument"):
        ifvp_at_x_ekfac(losses, X, Y, in_dims=(0,), mlp_cache=cache)
    with pytest.raises(IFVPUsageError, match="batch size mismatch"):
        ifvp_at_x_ekfac(losses, X, Y[:5], mlp_cache=cache)
    with pytest.raises(ValueError, match="'damping' parameter"):
        ifvp_at_x_ekfac(losses, X, Y, mlp_cache=cache, damping=-1.0)
    with pytest.raises(ValueError, match="'mlp_cache' parameter"):
        ifvp_at_x_ekfac(losses, X, Y, mlp_cache="cache")
    with pytest.raises(IFVPUsageError, match="recorded no"):
        ifvp_at_x_ekfac(losses, X, Y, mlp_cache=MLPCache())
    with pytest.raises(IFVPUsageError, match=r"shape \(batch_size,\)"):
        ifvp_at_x_ekfac(lambda X, Y: losses(X, Y).sum(), X, Y, mlp_cache=cache)
    # 10 examples cannot fill a 4 x 3 Λ of the first layer: zero entries, damping 0.
    with pytest.raises(ValueError, match="damping > 0"):
        ifvp_at_x_ekfac(losses, X[:2], Y[:2], batch_size=2, mlp_cache=cache)
    ifvp = ifvp_at_x_ekfac(losses, X, Y, batch_size=5, mlp_cache=cache, damping=0.1)
    with pytest.raises(IFVPUsageError, match="one list per cache"):
        ifvp([torch.randn(3, 4, dtype=D)])
    with pytest.raises(ValueError, match=r"\(3, 4\) or \(m, 3, 4\)"):
        ifvp([[torch.randn(4, 3, dtype=D), torch.randn(2, 3, dtype=D)]])
