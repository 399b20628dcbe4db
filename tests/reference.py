"""Dense truths computed the slow, obvious way (float64), to test against."""

from __future__ import annotations

import torch


def loop_per_example_gradients(model, X, y, loss="cross_entropy", params=None):
    """Per-example gradients by one autograd call per example (the reference)."""
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else params
    names = [n for n in named if n in names]  # model order
    rows = []
    for i in range(X.shape[0]):
        out = model(X[i : i + 1])
        if loss == "cross_entropy":
            value = torch.nn.functional.cross_entropy(out, y[i : i + 1])
        elif loss == "mse":
            value = torch.nn.functional.mse_loss(out, y[i : i + 1].reshape(out.shape))
        else:
            value = loss(out, y[i : i + 1]).sum()
        grads = torch.autograd.grad(value, [named[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def damped_fisher(G: torch.Tensor, damping: float) -> torch.Tensor:
    """``G^T G / n + damping I`` in float64."""
    G = G.double()
    return G.T @ G / G.shape[0] + damping * torch.eye(G.shape[1], dtype=torch.float64)


def assert_close(actual, expected, rtol=1e-10, atol=0.0):
    """Relative error in the max norm, the way the numerical tests state tolerances."""
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    scale = expected.abs().max().clamp_min(1e-300)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale + atol, f"max abs err {err:.3e} > rtol {rtol:g} * {scale:.3e}"


def _flat_parameters(model, params=None):
    """Flat float64 values of the selected parameters and ``theta -> {name: tensor}``."""
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else params
    names = [n for n in named if n in names]  # model order
    shapes = [named[n].shape for n in names]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])

    def unflatten(t):
        parts = torch.split(t, [s.numel() for s in shapes])
        state = {n: p.detach() for n, p in named.items()}
        state.update({n: q.reshape(s) for n, q, s in zip(names, parts, shapes)})
        return state

    return theta, unflatten


def _per_example_loss(loss):
    """The per-example loss of ``(outputs, targets)`` for a built-in name or a callable."""
    if loss == "cross_entropy":
        return lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")
    if loss == "mse":
        return lambda out, t: (out - t.reshape(out.shape)).square().flatten(1).mean(1)
    return loss


def dense_gauss_newton(model, X, y, loss="cross_entropy", params=None):
    """``(1/n) sum_i J_i^T H_i J_i`` in float64, one example at a time.

    ``J_i`` is the Jacobian of example ``i``'s outputs in the flat parameters
    (``torch.func.jacrev``), ``H_i`` the Hessian of its loss in those outputs
    (``torch.func.hessian`` of the loss itself, for any loss and output shape).
    """
    from torch.func import functional_call, hessian, jacrev

    theta, unflatten = _flat_parameters(model, params)
    fn = _per_example_loss(loss)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for i in range(X.shape[0]):
        x, t = X[i : i + 1], y[i : i + 1]

        def f(th, x=x):
            return functional_call(model, unflatten(th), (x,))

        out = f(theta).detach()
        J = jacrev(f)(theta).reshape(out.numel(), -1)
        H = hessian(lambda o, t=t: fn(o, t).sum())(out).reshape(out.numel(), out.numel())
        total += J.T @ H @ J
    return total / X.shape[0]


def dense_hessian(model, X, y, loss="cross_entropy", params=None):
    """The Hessian of the mean loss in the flat parameters, by ``torch.func.hessian``."""
    from torch.func import functional_call, hessian

    theta, unflatten = _flat_parameters(model, params)
    fn = _per_example_loss(loss)

    def mean_loss(th):
        return fn(functional_call(model, unflatten(th), (X,)), y).mean()

    return hessian(mean_loss)(theta)
