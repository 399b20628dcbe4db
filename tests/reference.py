"""Every dense truth the tests compare against, computed the slow, obvious way (float64).

* per-example gradients by one autograd call per example (any model:
  :func:`loop_gradients`);
* curvature matrices: the empirical Fisher ``G^T G / n``, the Hessian of the
  mean loss and the Gauss-Newton matrix (``torch.func``), and the exact
  moments of the true Fisher;
* the approximations from their definitions: EK-FAC (eigenbases of the
  covariances, ``Λ`` of the rotated gradients), DataInf (the mean of the
  inverses of the damped rank-one terms, by dense solves) and the Kronecker
  (LoGra) projection;
* :func:`assert_close`, the relative max-norm error the tolerances state.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, hessian, jacrev

D64 = torch.float64


# --------------------------------------------------------------------------- gradients
def loop_per_example_gradients(model, X, y, loss="cross_entropy", params=None):
    """Per-example gradients by one autograd call per example (the reference).

    The model is evaluated in eval mode, as attribkit evaluates it, and its
    mode is restored afterwards.
    """
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else params
    names = [n for n in named if n in names]  # model order
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    rows = []
    try:
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
    finally:
        for module, training in modes:
            module.training = training
    return torch.stack(rows)


def loop_gradients(model, example_losses, params=None):
    """Per-example gradients of any model, one autograd call per example (the reference).

    ``example_losses`` yields, per example, a zero-argument callable that
    runs the model on that example alone (unpadded, as a batch of one) and
    returns its scalar loss; gradients are taken with respect to ``params``
    (names; default every parameter that requires grad), in the order of
    ``model.named_parameters()`` (a tied weight under its first name, its
    gradient the sum over its uses), flattened and concatenated. Eval mode,
    restored afterwards; a parameter the loss does not reach has gradient 0.
    """
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if (p.requires_grad if params is None else n in params)]
    modes = [(m, m.training) for m in model.modules()]
    flags = {n: p.requires_grad for n, p in named.items()}
    model.eval()
    rows = []
    try:
        for n in names:
            named[n].requires_grad_(True)
        for example_loss in example_losses:
            value = example_loss()
            grads = torch.autograd.grad(value, [named[n] for n in names], allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(named[n]) if g is None else g).reshape(-1)
                        for n, g in zip(names, grads)
                    ]
                )
            )
    finally:
        for module, training in modes:
            module.training = training
        for n, flag in flags.items():
            named[n].requires_grad_(flag)
    return torch.stack(rows)


# --------------------------------------------------------------------------- curvature
def empirical_fisher(G: torch.Tensor) -> torch.Tensor:
    """``G^T G / n`` in float64."""
    G = G.double()
    return G.T @ G / G.shape[0]


def damped_fisher(G: torch.Tensor, damping: float) -> torch.Tensor:
    """``G^T G / n + damping I`` in float64."""
    return empirical_fisher(G) + damping * torch.eye(G.shape[1], dtype=D64)


def true_fisher_moments_ce(model, X):
    """Exact ``E_{y~p}[g g^T]`` over inputs of a softmax model, and the per-sample variance."""
    with torch.no_grad():
        probs = torch.softmax(model(X), dim=1)
    mean, var = 0.0, 0.0
    for k in range(X.shape[0]):
        classes = range(probs.shape[1])
        outer = [
            (lambda g: torch.outer(g, g))(
                loop_per_example_gradients(model, X[k : k + 1], torch.tensor([c]))[0]
            )
            for c in classes
        ]
        m = sum(probs[k, c] * outer[c] for c in classes)
        mean = mean + m
        var = var + sum(probs[k, c] * outer[c] ** 2 for c in classes) - m**2
    return mean / X.shape[0], var / X.shape[0]


def true_fisher_moments_mse(model, X):
    """Exact Gauss-Newton ``(2/D) J^T J`` averaged over inputs, and the per-sample variance."""
    params = dict(model.named_parameters())
    mean, var = 0.0, 0.0
    for k in range(X.shape[0]):
        out = model(X[k : k + 1])[0]
        rows = []
        for o in range(out.shape[0]):
            grads = torch.autograd.grad(out[o], list(params.values()), retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        J = torch.stack(rows)
        S = (2.0 / out.shape[0]) * J.T @ J  # covariance of the Gaussian g
        mean = mean + S
        var = var + torch.outer(S.diagonal(), S.diagonal()) + S**2  # Isserlis
    return mean / X.shape[0], var / X.shape[0]


# --------------------------------------------------------------------------- EK-FAC
def ekfac_factors(a_rows, s_rows, gradients):
    """EK-FAC of one layer from its definition: ``(Q_S, Q_A, Λ)``.

    ``a_rows`` ``(N, d_in)``: the layer's inputs over all rows (tokens,
    positions) of all examples; ``s_rows``: a list of ``(N, d_out)`` output
    gradients, one per target (the expected Fisher's targets pre-scaled by
    ``sqrt(w)``; one plain entry otherwise); ``gradients``: a list of
    per-example gradient matrices ``(n, d_out, d_in)`` scaled alike.
    ``A = E_rows[a a^T]``, ``S = E_rows[sum_k s_k s_k^T]`` with eigenvectors as
    columns, and ``Λ = E_i[sum_k (Q_S^T G_ik Q_A)^2]`` of shape ``(d_out, d_in)``.
    """
    n_rows = a_rows.shape[0]
    A = a_rows.T @ a_rows / n_rows
    S = sum(s.T @ s for s in s_rows) / n_rows
    QA, QS = torch.linalg.eigh(A)[1], torch.linalg.eigh(S)[1]
    n = gradients[0].shape[0]
    lam = sum(((QS.T @ G @ QA) ** 2).sum(0) for G in gradients) / n
    return QS, QA, lam


def ekfac_of_model(model, X, y, layers, loss="cross_entropy"):
    """EK-FAC of the named layers of a model from its definition: ``name -> (Q_S, Q_A, Λ)``.

    Independent of attribkit's capture: plain forward hooks record each
    layer's input and output (``nn.Linear`` on ``(n, *tokens, d)``;
    ``nn.Conv2d`` unfolded with ``F.unfold``, zero padding only), ``s`` is the
    gradient of the summed loss at the outputs, and the per-example gradients
    come from one autograd call per example (the weight, and bias as the last
    column). The model is evaluated in eval mode (mode restored afterwards);
    ``loss`` is ``"cross_entropy"`` or a per-example callable.
    """
    F = torch.nn.functional
    modules = dict(model.named_modules())
    loss_fn = (
        (lambda o, t: F.cross_entropy(o, t, reduction="none")) if loss == "cross_entropy" else loss
    )
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    seen = {}

    def hook(name):
        def record(module, args, output):
            seen[name] = (args[0].detach(), output)

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        total = loss_fn(model(X), y).sum()
        outs = torch.autograd.grad(total, [seen[n][1] for n in layers])
        rows = {}
        for name, g in zip(layers, outs):
            module, x = modules[name], seen[name][0]
            if isinstance(module, torch.nn.Conv2d):
                a = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
                a, s = a.transpose(1, 2), g.flatten(2).transpose(1, 2)
            else:
                a, s = (
                    x.reshape(x.shape[0], -1, x.shape[-1]),
                    g.reshape(g.shape[0], -1, g.shape[-1]),
                )
            if module.bias is not None:
                a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=2)
            rows[name] = (a.reshape(-1, a.shape[-1]), s.reshape(-1, s.shape[-1]))
        for h in handles:
            h.remove()
        handles = []
        grads = {n: [] for n in layers}
        for i in range(X.shape[0]):
            value = loss_fn(model(X[i : i + 1]), y[i : i + 1]).sum()
            params = [
                p for n in layers for p in (modules[n].weight, modules[n].bias) if p is not None
            ]
            flat = list(torch.autograd.grad(value, params))
            for n in layers:
                w = flat.pop(0)
                G = w.reshape(w.shape[0], -1)
                if modules[n].bias is not None:
                    G = torch.cat([G, flat.pop(0)[:, None]], dim=1)
                grads[n].append(G)
    finally:
        for h in handles:
            h.remove()
        for module, training in modes:
            module.training = training
    return {n: ekfac_factors(rows[n][0], [rows[n][1]], [torch.stack(grads[n])]) for n in layers}


def ekfac_matrix(QS, QA, lam, damping):
    """The dense EK-FAC curvature ``(Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)^T + damping I``.

    On row-major ``vec`` of ``(d_out, d_in)`` matrices.
    """
    K = torch.kron(QS, QA)  # column i * d_in + j is QS[:, i] ⊗ QA[:, j]
    return K @ torch.diag(lam.reshape(-1)) @ K.T + damping * torch.eye(K.shape[0], dtype=D64)


def ekfac_ifvp(QS, QA, lam, damping, V):
    """``Q_S ((Q_S^T V Q_A) / (Λ + damping)) Q_A^T`` for ``V`` ``(..., d_out, d_in)``."""
    return QS @ ((QS.T @ V @ QA) / (lam + damping)) @ QA.T


# --------------------------------------------------------------------------- DataInf
def dense_datainf(G: torch.Tensor, damping: float, V: torch.Tensor) -> torch.Tensor:
    """DataInf's definition: ``(1/n) Σ_i (g_i g_iᵀ + λ I)⁻¹`` applied to the rows of ``V``."""
    G, V = G.double(), V.double()
    eye = torch.eye(G.shape[1], dtype=D64)
    total = sum(torch.linalg.solve(torch.outer(g, g) + damping * eye, V.T) for g in G)
    return (total / G.shape[0]).T


# --------------------------------------------------------------------------- Kronecker
def kronecker_projection(projector, layers, V):
    """``P_out^T W P_in`` per covered layer, flattened and concatenated (LoGra's definition).

    ``layers``: the projector's covered layers (``capture.resolve_layers``),
    whose ``params_to_matrix`` turns each layer's weight and bias in ``V``
    into the ``(m, d_out, d_in)`` matrix ``W``.
    """
    from attribkit._compute.capture import params_to_matrix

    parts, start = {}, 0
    for name, shape in projector.param_shapes_.items():
        size = int(torch.Size(shape).numel())
        parts[name] = V[:, start : start + size].reshape(V.shape[0], *shape)
        start += size
    out = []
    for layer in layers:
        bias = parts[layer.bias_name] if layer.has_bias else None
        W = params_to_matrix(layer, parts[layer.weight_name], bias)
        P_in, P_out = projector.matrices(layer.name)
        out.append(torch.einsum("do,mdi,ik->mok", P_out, W, P_in).reshape(V.shape[0], -1))
    return torch.cat(out, 1)


# --------------------------------------------------------------------------- comparison
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

    theta, unflatten = _flat_parameters(model, params)
    fn = _per_example_loss(loss)

    def mean_loss(th):
        return fn(functional_call(model, unflatten(th), (X,)), y).mean()

    return hessian(mean_loss)(theta)
