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
