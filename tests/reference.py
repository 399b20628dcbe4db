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


#: Default relative tolerance per precision: float64 to ~1e-10, float32 to ~1e-6 (API
#: section 9: tolerances follow the dtype, never tighter than it allows).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _precision(*values) -> torch.dtype:
    """The lowest floating precision among ``values`` (float64 when none is floating)."""
    order = [torch.bfloat16, torch.float16, torch.float32]
    found = {torch.as_tensor(v).dtype for v in values}
    return next((d for d in order if d in found), torch.float64)


def assert_close(actual, expected, rtol=None, atol=0.0):
    """Relative error in the max norm, the way the numerical tests state tolerances.

    ``rtol`` defaults to :data:`RTOL` of the lower precision of the two
    values. An explicit ``rtol`` below that precision's machine epsilon (other
    than 0, which asks for exact equality) is refused: such a test could only
    pass by luck of rounding.
    """
    precision = _precision(actual, expected)
    if rtol is None:
        rtol = RTOL[precision]
    elif 0 < rtol < torch.finfo(precision).eps:
        raise AssertionError(
            f"rtol={rtol:g} is tighter than {precision} allows (eps "
            f"{torch.finfo(precision).eps:.2g}): use rtol >= ~{RTOL[precision]:g}, compute in "
            "float64, or rtol=0 for values that must be bit-identical."
        )
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    scale = expected.abs().max().clamp_min(1e-300)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale + atol, f"max abs err {err:.3e} > rtol {rtol:g} * {scale:.3e}"
