"""attribkit.functional.fisher against exact dense answers and the estimators (float64)."""

from __future__ import annotations

import types

import pytest
import torch
from cases import classification_data, mlp
from reference import assert_close, dense_datainf

from attribkit.config import ComputeConfig
from attribkit.functional import (
    EKFAC_CACHE_KEY,
    IFVPUsageError,
    MLPCache,
    ifvp_at_x_datainf,
    ifvp_at_x_explicit,
    ifvp_datainf,
    ifvp_explicit,
    manual_cache_forward,
)
from attribkit.ifvp.datainf import DataInfIFVP
from attribkit.ifvp.explicit import ExplicitIFVP

F64 = ComputeConfig(dtype="float64", progress=False)
D = torch.float64


def _regression(n=20, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    y = torch.randn(n, generator=g, dtype=D)
    w = torch.randn(d, generator=g, dtype=D)
    return w, X, y


def _mse(w, X, y):
    return ((X @ w - y) ** 2).mean()


# ------------------------------------------------------------------ explicit
def test_ifvp_explicit_is_the_outer_product_fim():
    w, X, y = _regression()
    v = torch.randn(4, 6, dtype=D)
    g = torch.func.grad(_mse)(w, X, y)
    F = torch.outer(g, g) + 0.3 * torch.eye(6, dtype=D)
    truth = torch.linalg.solve(F, v.T).T
    assert_close(ifvp_explicit(_mse, regularization=0.3)((w, X, y), v), truth)
    assert_close(ifvp_at_x_explicit(_mse, w, X, y, regularization=0.3)(v), truth)
    # ... and it is ExplicitIFVP's answer on the single gradient row (dense solver too).
    est = ExplicitIFVP(damping=0.3, solver="cholesky", config=F64).fit(g[None])
    assert_close(ifvp_explicit(_mse, 0, 0.3)((w, X, y), v), est.transform(v))
    # Not the reference's scalar g @ g.T: that would be v / (|g|^2 + 0.3).
    assert (ifvp_explicit(_mse, 0, 0.3)((w, X, y), v) - v / (g @ g + 0.3)).abs().max() > 1e-3


def test_ifvp_explicit_shapes_dtype_and_argnums():
    w, X, y = _regression()
    ifvp = ifvp_at_x_explicit(_mse, w, X, y, regularization=0.1)
    v = torch.randn(6, dtype=D)
    out = ifvp(v)
    assert out.shape == (6,) and out.dtype == D
    assert_close(out, ifvp(v[None])[0])
    # argnums picks the argument: the gradient with respect to X (n * d entries).
    ifvp_x = ifvp_at_x_explicit(_mse, w, X, y, argnums=1, regularization=0.1)
    gX = torch.func.grad(_mse, argnums=1)(w, X, y).reshape(-1)
    vX = torch.randn(2, X.numel(), dtype=D)
    F = torch.outer(gX, gX) + 0.1 * torch.eye(X.numel(), dtype=D)
    assert_close(ifvp_x(vX), torch.linalg.solve(F, vX.T).T)
    # float32 functions give float32 answers.
    ifvp32 = ifvp_at_x_explicit(_mse, w.float(), X.float(), y.float(), regularization=0.1)
    assert ifvp32(v.float()).dtype == torch.float32


def test_ifvp_at_x_explicit_tuple_argnums_and_dict_arguments():
    w, X, y = _regression()
    b = torch.tensor(0.5, dtype=D)

    def loss(w, b, X, y):
        return ((X @ w + b - y) ** 2).mean()

    gw, gb = torch.func.grad(loss, argnums=(0, 1))(w, b, X, y)
    g = torch.cat([gw, gb.reshape(1)])
    F = torch.outer(g, g) + 0.2 * torch.eye(7, dtype=D)
    v = torch.randn(3, 7, dtype=D)
    truth = torch.linalg.solve(F, v.T).T
    assert_close(
        ifvp_at_x_explicit(loss, w, b, X, y, argnums=(0, 1), regularization=0.2)(v), truth
    )

    # A dict argument (as model.named_parameters() gives) is flattened in its order.
    def loss_dict(params, X, y):
        return loss(params["w"], params["b"], X, y)

    ifvp = ifvp_at_x_explicit(loss_dict, {"w": w, "b": b}, X, y, regularization=0.2)
    assert_close(ifvp(v), truth)


def test_ifvp_explicit_without_regularization():
    # A single parameter: g g^T = g^2 is invertible, and the answer is v / g^2.
    def loss(w):
        return (w - 3.0).pow(2).sum()

    w = torch.tensor([1.0], dtype=D)
    assert_close(
        ifvp_at_x_explicit(loss, w)(torch.tensor([2.0], dtype=D)), torch.tensor([0.125], dtype=D)
    )
    # More parameters: rank 1, singular; the error names the way out.
    w, X, y = _regression()
    with pytest.raises(ValueError, match="regularization > 0"):
        ifvp_at_x_explicit(_mse, w, X, y)
    with pytest.raises(ValueError, match="regularization > 0"):
        ifvp_explicit(_mse)((w, X, y), torch.randn(6, dtype=D))


def test_ifvp_explicit_bad_input():
    w, X, y = _regression()
    with pytest.raises(TypeError, match="'func' parameter of ifvp_explicit"):
        ifvp_explicit("loss")
    with pytest.raises(ValueError, match="'regularization' parameter of ifvp_at_x_explicit"):
        ifvp_at_x_explicit(_mse, w, X, y, regularization=-1.0)
    with pytest.raises(ValueError, match="'argnums' parameter of ifvp_explicit"):
        ifvp_explicit(_mse, argnums=-1)
    with pytest.raises(ValueError, match=r"shape \(6,\) or \(m, 6\)"):
        ifvp_at_x_explicit(_mse, w, X, y, regularization=0.1)(torch.randn(5, dtype=D))
    with pytest.raises(TypeError, match="tuple of arguments"):
        ifvp_explicit(_mse, regularization=0.1)(w, torch.randn(6, dtype=D))


# ------------------------------------------------------------------ DataInf
def _mlp_case(n=15):
    model = mlp(d=4, hidden=3, out=3)
    X, y = classification_data(n=n, d=4, classes=3)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def ce_flat(params, inputs, labels):
        state = {k: p.view(s) for k, p, s in zip(names, params, shapes)}
        out = torch.func.functional_call(model, state, (inputs.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, labels.unsqueeze(0))

    params = tuple(p.detach().reshape(-1) for _, p in model.named_parameters())
    return model, X, y, ce_flat, params


def test_ifvp_datainf_layer_map_matches_dense_truth_and_estimator():
    model, X, y, ce, params = _mlp_case()
    G = torch.func.vmap(torch.func.grad(ce), in_dims=(None, 0, 0))(params, X, y)
    G = [torch.cat(G[:2], dim=1), torch.cat(G[2:], dim=1)]  # layers 0 and 1 of the map
    v = (torch.randn(3, 15, dtype=D), torch.randn(3, 12, dtype=D))
    out = ifvp_datainf(ce, 0, (None, 0, 0), [0.2, 0.5], param_layer_map=[0, 0, 1, 1])(
        (params, X, y), v
    )
    for k, lam in enumerate([0.2, 0.5]):
        assert out[k].shape == v[k].shape
        assert_close(out[k], dense_datainf(G[k], lam, v[k]))
    # The estimator in model mode ("module" layers = the same two layers) agrees.
    est = DataInfIFVP(damping=[0.2, 0.5], config=F64).fit(model, (X, y))
    assert_close(torch.cat(out, dim=1), est.transform(torch.cat(v, dim=1)))
    # Fixed x: the same numbers.
    at_x = ifvp_at_x_datainf(
        ce, 0, (None, 0, 0), [0.2, 0.5], params, X, y, param_layer_map=[0, 0, 1, 1]
    )
    for a, b in zip(at_x(v), out):
        assert_close(a, b)


def test_ifvp_datainf_seed_in_dims_example_and_one_vector_per_layer():
    # The seed's in_dims example: arguments (inputs, weights, labels) -> (0, None, 0).
    X, y = classification_data(n=12, d=5, classes=3)
    W = torch.randn(3, 5, dtype=D)

    def ce(inputs, weights, label):
        return torch.nn.functional.cross_entropy(inputs @ weights.T, label)

    G = torch.func.vmap(torch.func.grad(ce, argnums=1), in_dims=(0, None, 0))(X, W, y)
    G = G.reshape(12, 15)
    v = torch.randn(15, dtype=D)
    out = ifvp_at_x_datainf(ce, 1, (0, None, 0), 0.1, X, W, y)((v,))
    assert out[0].shape == (15,)
    assert_close(out[0], dense_datainf(G, 0.1, v[None])[0])
    # A one-tensor layer also takes vectors in the parameter's shape.
    out_shaped = ifvp_datainf(ce, 1, (0, None, 0), 0.1)((X, W, y), (v.reshape(3, 5),))
    assert out_shaped[0].shape == (3, 5)
    assert_close(out_shaped[0].reshape(15), out[0])


def test_ifvp_datainf_default_regularization_is_the_automatic_damping():
    model, X, y, ce, params = _mlp_case()
    v = (torch.randn(2, 15, dtype=D), torch.randn(2, 12, dtype=D))
    out = ifvp_datainf(ce, 0, (None, 0, 0), param_layer_map=[0, 0, 1, 1])((params, X, y), v)
    assert all(bool(torch.isfinite(t).all()) for t in out)  # the reference divides by 0 here
    est = DataInfIFVP(damping="auto", config=F64).fit(model, (X, y))
    assert_close(torch.cat(out, dim=1), est.transform(torch.cat(v, dim=1)))
    G = torch.func.vmap(torch.func.grad(ce), in_dims=(None, 0, 0))(params, X, y)
    G0 = torch.cat(G[:2], dim=1)
    lam0 = 0.1 * float(G0.square().sum(1).mean()) / G0.shape[1]
    assert_close(out[0], dense_datainf(G0, lam0, v[0]))


def test_ifvp_datainf_dict_parameters_like_named_parameters():
    model, X, y, _, _ = _mlp_case()
    params = {k: p.detach() for k, p in model.named_parameters()}

    def ce(params, inputs, labels):
        out = torch.func.functional_call(model, params, (inputs.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, labels.unsqueeze(0))

    v = tuple(torch.randn(2, *p.shape, dtype=D) for p in params.values())
    out = ifvp_at_x_datainf(ce, 0, (None, 0, 0), 0.3, params, X, y)(v)
    # Without a map each parameter tensor is a layer: DataInfIFVP layers="parameter".
    est = DataInfIFVP(damping=0.3, layers="parameter", config=F64).fit(model, (X, y))
    truth = est.transform(dict(zip(params, v)))
    for t, key in zip(out, params):
        assert t.shape == truth[key].shape
        assert_close(t, truth[key])


def test_ifvp_datainf_regularization_lists():
    _, X, y, ce, params = _mlp_case()
    x = (params, X, y)
    v = (torch.randn(15, dtype=D), torch.randn(12, dtype=D))
    per_layer = ifvp_datainf(ce, 0, (None, 0, 0), [0.15, 0.15], param_layer_map=[0, 0, 1, 1])
    # The reference's own tests pass one entry per parameter tensor with a map.
    per_param = ifvp_datainf(ce, 0, (None, 0, 0), [0.15] * 4, param_layer_map=[0, 0, 1, 1])
    scalar = ifvp_datainf(ce, 0, (None, 0, 0), 0.15, param_layer_map=[0, 0, 1, 1])
    for a, b, c in zip(per_layer(x, v), per_param(x, v), scalar(x, v)):
        assert_close(a, b)
        assert_close(a, c)
    with pytest.raises(IFVPUsageError, match="layer 0"):
        ifvp_datainf(ce, 0, (None, 0, 0), [0.1, 0.2, 0.3, 0.3], param_layer_map=[0, 0, 1, 1])
    with pytest.raises(IFVPUsageError, match="number of layers"):
        ifvp_datainf(ce, 0, (None, 0, 0), [0.1, 0.2, 0.3], param_layer_map=[0, 0, 1, 1])
    with pytest.raises(IFVPUsageError, match="number of layers"):  # no map: 4 layers
        ifvp_at_x_datainf(ce, 0, (None, 0, 0), [0.1, 0.2], *x)
    with pytest.raises(ValueError, match="divide by zero"):
        ifvp_datainf(ce, 0, (None, 0, 0), 0.0, param_layer_map=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="divide by zero"):
        ifvp_at_x_datainf(ce, 0, (None, 0, 0), [0.1, 0.0, 0.1, 0.1], *x)


def test_ifvp_datainf_bad_input():
    _, X, y, ce, params = _mlp_case()
    x = (params, X, y)
    with pytest.raises(IFVPUsageError, match="one entry per parameter tensor"):
        ifvp_at_x_datainf(ce, 0, (None, 0, 0), None, *x, param_layer_map=[0, 1])
    with pytest.raises(IFVPUsageError, match="without gaps"):
        ifvp_datainf(ce, 0, (None, 0, 0), param_layer_map=[0, 0, 2, 2])
    with pytest.raises(ValueError, match="'param_layer_map' parameter"):
        ifvp_datainf(ce, 0, (None, 0, 0), param_layer_map="0011")
    with pytest.raises(ValueError, match="'in_dims' parameter"):
        ifvp_datainf(ce, 0, [None, 0, 0])
    ifvp = ifvp_at_x_datainf(ce, 0, (None, 0, 0), 0.1, *x, param_layer_map=[0, 0, 1, 1])
    with pytest.raises(IFVPUsageError, match="one tensor per layer"):
        ifvp((torch.randn(15, dtype=D),))
    with pytest.raises(ValueError, match=r"v\[1\]"):
        ifvp((torch.randn(15, dtype=D), torch.randn(13, dtype=D)))
    with pytest.raises(ValueError, match="same number of vectors"):
        ifvp((torch.randn(2, 15, dtype=D), torch.randn(3, 12, dtype=D)))


# ------------------------------------------------------------------ MLPCache
def test_mlp_caches_do_not_share_a_list():
    a, b = MLPCache(), MLPCache()
    a.input_hidden_pairs.append((torch.zeros(1), torch.zeros(1)))
    assert b.input_hidden_pairs == [] and len(a.input_hidden_pairs) == 1
    a.clear()
    assert a.input_hidden_pairs == []


def test_manual_cache_forward_records_pairs_and_their_gradients():
    model = torch.nn.Module()
    model.linear = torch.nn.Linear(3, 2, bias=False).double()

    @manual_cache_forward
    def forward(self, x):
        y = self.linear(x)
        if hasattr(self, EKFAC_CACHE_KEY):
            getattr(self, EKFAC_CACHE_KEY).input_hidden_pairs.append((x, y))
        return y

    model.forward = types.MethodType(forward, model)
    x = torch.randn(4, 3, dtype=D)
    model(x)  # no cache: plain forward
    cache = MLPCache()
    setattr(model, EKFAC_CACHE_KEY, cache)
    model(x)
    out = model(x)  # each forward clears the cache first
    assert len(cache.input_hidden_pairs) == 1
    (out**2).sum().backward()
    a, s = cache.input_hidden_pairs[0]
    assert a is x and a.grad is None
    assert_close(s.grad, 2 * out.detach())
    cache.zero_grad()
    assert s.grad is None

    @manual_cache_forward
    def bad_forward(self, x):
        getattr(self, EKFAC_CACHE_KEY).input_hidden_pairs.append((x, "hidden"))
        return x

    model.forward = types.MethodType(bad_forward, model)
    with pytest.raises(IFVPUsageError, match="torch.Tensor"):
        model(x)
    assert issubclass(IFVPUsageError, ValueError)
