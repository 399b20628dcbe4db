"""attribkit.functional.random_project against RandomProjector and its promises."""

from __future__ import annotations

import math

import pytest
import torch
from reference import assert_close

from attribkit.config import ComputeConfig
from attribkit.functional import arnoldi_project, random_project
from attribkit.functional.projection import ensemble_seed
from attribkit.projection.arnoldi import ArnoldiProjector
from attribkit.projection.random import RandomProjector

F32 = ComputeConfig(dtype="float32", progress=False)


def _named_gradients(batch=6, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    # Shaped like model.named_parameters(), one row per example (as dattri 0.1.0's tests do).
    grads = {k: torch.randn(batch, p.numel()) for k, p in model.named_parameters()}
    shaped = {
        k: g.reshape(batch, *p.shape)
        for (k, p), g in zip(model.named_parameters(), grads.values())
    }
    return grads, shaped


def test_random_project_is_random_projector():
    X = torch.randn(10, 300)
    project = random_project(X, 10, 64, 32, "cpu", proj_seed=3, use_half_precision=False)
    est = RandomProjector(proj_dim=64, seed=3, config=F32).fit(X)
    out = project(X)
    assert out.shape == (10, 64) and out.dtype == torch.float32
    assert torch.equal(out, est.transform(X))
    # Any batch size, and one 1-D feature (the same matrix; BLAS rounds a row apart).
    assert_close(project(X[:3]), out[:3], rtol=1e-6)
    assert project(X[4]).shape == (64,)
    assert_close(project(X[4]), out[4], rtol=1e-6)


def test_random_project_dict_features_like_named_parameters():
    grads, shaped = _named_gradients()
    flat = torch.cat(list(grads.values()), dim=1)
    project = random_project(grads, 6, 32, 16, "cpu", use_half_precision=False)
    expected = RandomProjector(proj_dim=32, config=F32).fit(flat).transform(flat)
    assert torch.equal(project(grads), expected)
    # (batch, *param.shape) values: the same layout, the same projection.
    assert torch.equal(project(shaped), expected)
    shaped_project = random_project(shaped, 6, 32, 16, "cpu", use_half_precision=False)
    assert torch.equal(shaped_project(grads), expected)


def test_ensemble_ids_are_independent_and_reproducible():
    p, k = 400, 64
    eye = torch.eye(p)
    project = random_project(eye, p, k, 32, "cpu", proj_seed=5, use_half_precision=False)
    R = {i: project(eye, ensemble_id=i) * math.sqrt(k) for i in (0, 1, 2)}  # ±1 entries
    assert torch.equal(
        R[0],
        RandomProjector(proj_dim=k, seed=5, config=F32).fit(eye).transform(eye) * math.sqrt(k),
    )
    for i in (1, 2):
        assert torch.equal(project(eye, ensemble_id=i) * math.sqrt(k), R[i])  # same again
        again = random_project(eye, p, k, 32, "cpu", proj_seed=5, use_half_precision=False)
        assert torch.equal(again(eye, i) * math.sqrt(k), R[i])  # a new function, same matrix
    # Independent ±1 matrices agree on half their entries: 25,600 entries, sd 0.3%.
    for i, j in ((0, 1), (0, 2), (1, 2)):
        agreement = float((R[i] == R[j]).double().mean())
        assert abs(agreement - 0.5) < 0.02, (i, j, agreement)
    assert ensemble_seed(5, 0) == 5 and ensemble_seed(5, 1) != ensemble_seed(6, 1)
    assert ensemble_seed(0, 1) != ensemble_seed(100000, 0)  # the reference's seeds collide here


def test_random_project_preserves_squared_norms_in_expectation():
    torch.manual_seed(0)
    X = torch.randn(20, 2000)
    out = random_project(X, 20, 1024, 32, "cpu", use_half_precision=False)(X)
    ratio = out.square().sum(1) / X.square().sum(1)
    # JL with k = 1024: each ratio within a few times sqrt(2 / k) = 4.4% of 1.
    assert float((ratio - 1).abs().max()) < 0.2
    assert abs(float(ratio.mean()) - 1) < 0.03


def test_use_half_precision_on_cpu_gives_float16():
    X = torch.randn(8, 500)
    half = random_project(X, 8, 64, 32, "cpu")(X)  # the default: use_half_precision=True
    full = random_project(X, 8, 64, 32, "cpu", use_half_precision=False)(X)
    assert half.dtype == torch.float16
    # float16 rounding of the inputs and of the result: relative error ~1e-3.
    assert float((half.float() - full).abs().max() / full.abs().max()) < 5e-3
    with pytest.raises(ValueError, match="dtype"):
        random_project(X, 8, 64, 32, "cpu")(X * 1e5)  # beyond float16's range


@pytest.mark.cuda
def test_use_half_precision_on_cuda():
    X = torch.randn(8, 500)
    half = random_project(X, 8, 64, 32, "cuda")(X)
    full = random_project(X, 8, 64, 32, "cpu", use_half_precision=False)(X)
    assert half.dtype == torch.float16 and half.device.type == "cuda"
    assert float((half.float().cpu() - full).abs().max() / full.abs().max()) < 5e-3


def test_random_project_bad_input():
    X = torch.randn(8, 30)
    with pytest.raises(ValueError, match="'proj_dim' parameter of random_project"):
        random_project(X, 8, 0, 32, "cpu")
    with pytest.raises(ValueError, match="'feature_batch_size' parameter"):
        random_project(X, 0, 4, 32, "cpu")
    # The first dimension holds the examples (dattri 0.1.0 would take 240 // 7 = 34
    # features per example, or 40 // 5 = 8 for a (4, 10) tensor with 5 examples).
    shape = (
        r"of random_project must have shape \(feature_batch_size, ...\) = \({}, ...\).* "
        r"Got shape \({}\)"
    )
    with pytest.raises(ValueError, match="The 'feature' parameter " + shape.format(7, "8, 30")):
        random_project(X, 7, 4, 32, "cpu")
    with pytest.raises(ValueError, match=shape.format(5, "4, 10")):
        random_project(torch.randn(4, 10), 5, 4, 32, "cpu")
    with pytest.raises(ValueError, match=r"feature\['b'\] .*" + shape.format(4, "5, 2")):
        random_project({"a": torch.randn(4, 3), "b": torch.randn(5, 2)}, 4, 4, 32, "cpu")
    with pytest.raises(ValueError, match="no entries"):
        random_project(torch.randn(4, 0), 4, 4, 32, "cpu")
    assert random_project(torch.randn(30), 1, 4, 32, "cpu")(X).shape == (8, 4)  # one example
    with pytest.raises(ValueError, match="device"):
        random_project(X, 8, 4, 32, "tpu")
    with pytest.raises(TypeError, match="'feature' parameter"):
        random_project([1.0], 1, 4, 32, "cpu")
    with pytest.raises(ValueError, match="'use_half_precision' parameter"):
        random_project(X, 8, 4, 32, "cpu", use_half_precision="yes")
    project = random_project(X, 8, 4, 32, "cpu")
    with pytest.raises(ValueError, match=r"shape \(m, 30\)"):
        project(torch.randn(8, 31))
    with pytest.raises(ValueError, match="'ensemble_id' parameter"):
        project(X, ensemble_id=1.5)
    grads, _ = _named_gradients()
    project = random_project(grads, 6, 4, 32, "cpu")
    with pytest.raises(ValueError, match="keys it was built with"):
        project({k: v for k, v in list(grads.items())[:2]})
    with pytest.raises(ValueError, match="m=6 examples"):
        project({k: v[: 3 if k.endswith("bias") else 6] for k, v in grads.items()})


# ------------------------------------------------------------------ arnoldi_project
def _quadratic(p=8, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, p, generator=g, dtype=torch.float64)
    H = G.T @ G / n

    def f(x):
        return 0.5 * x @ H @ x

    x = torch.randn(p, generator=g, dtype=torch.float64)
    return f, x, H, G


def _restricted_inverse(H, k, V):
    values, vectors = torch.linalg.eigh(H)
    top = torch.argsort(values.abs(), descending=True)[:k]
    U, lam = vectors[:, top].T, values[top]
    return ((V @ U.T) / lam) @ U


def test_arnoldi_project_exact_inverse_hessian():
    def f(x):
        return (x**4).sum() / 4 + (x[:-1] * x[1:]).sum() + 2 * (x**2).sum()

    x = torch.linspace(-1.0, 1.5, 7, dtype=torch.float64)
    H = torch.func.hessian(f)(x)
    V = torch.randn(5, 7, dtype=torch.float64)
    project = arnoldi_project(7, f, x, proj_dim=7)
    assert_close(project(V), torch.linalg.solve(H, V.T).T)
    for mode in ("rev-rev", "rev-fwd"):
        shifted = arnoldi_project(7, f, x, proj_dim=7, regularization=0.5, mode=mode)
        assert_close(
            shifted(V), torch.linalg.solve(H + 0.5 * torch.eye(7, dtype=torch.float64), V.T).T
        )
    # norm_constant scales the result by its square, as in the reference.
    assert_close(arnoldi_project(7, f, x, proj_dim=7, norm_constant=3.0)(V), 9 * project(V))
    # One 1-D feature, and a dict of features shaped like named_parameters().
    assert_close(project(V[0]), project(V)[0])
    assert_close(project({"a": V[:, :3], "b": V[:, 3:].reshape(5, 2, 2)}), project(V))


def test_arnoldi_project_top_k_is_arnoldi_projector_ihvp():
    f, x, H, G = _quadratic()
    V = torch.randn(4, 8, dtype=torch.float64)
    # max_iter counts the start vector, as in the reference: max_iter - 1 products.
    project = arnoldi_project(8, f, x, proj_dim=3, max_iter=9, seed=4)
    assert_close(project(V), _restricted_inverse(H, 3, V), rtol=1e-8)
    est = ArnoldiProjector(proj_dim=3, max_iter=8, seed=4, config=ComputeConfig(dtype="float64"))
    assert_close(project(V), est.fit(G).ihvp(V), rtol=1e-8)
    # Fewer iterations: the same Krylov space as the estimator's.
    short = arnoldi_project(8, f, x, proj_dim=2, max_iter=5, seed=4)
    est = ArnoldiProjector(proj_dim=2, max_iter=4, seed=4, config=ComputeConfig(dtype="float64"))
    assert_close(short(V), est.fit(G).ihvp(V), rtol=1e-8)


def test_arnoldi_project_keeps_negative_curvature_and_torch_rng():
    x = torch.randn(10, dtype=torch.float64)
    V = torch.randn(20, 10, dtype=torch.float64)
    state = torch.get_rng_state()
    project = arnoldi_project(10, lambda x: torch.sin(x).sum(), x, proj_dim=10)
    assert torch.equal(torch.get_rng_state(), state)  # the reference reseeds torch
    assert_close(project(V), V / -torch.sin(x), rtol=1e-8)  # the Hessian is diag(-sin x)


def test_arnoldi_project_bad_input():
    f, x, _, _ = _quadratic()
    with pytest.raises(ValueError, match="'feature_dim' parameter of arnoldi_project"):
        arnoldi_project(7, f, x)
    with pytest.raises(ValueError, match="'argnums' parameter"):
        arnoldi_project(8, f, x, argnums=1)
    with pytest.raises(ValueError, match="'mode' parameter"):
        arnoldi_project(8, f, x, mode="fwd-fwd")
    with pytest.raises(ValueError, match="'regularization' parameter"):
        arnoldi_project(8, f, x, regularization=-1.0)
    with pytest.raises(TypeError, match="'x' parameter"):
        arnoldi_project(8, f, [x])
    with pytest.raises(ValueError, match="single-element tensor"):
        arnoldi_project(8, lambda x: x * 2, x)
    project = arnoldi_project(8, f, x, proj_dim=2)
    with pytest.raises(ValueError, match="feature_dim=8"):
        project(torch.randn(3, 9, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["rev-fwd", "rev-rev"])
@pytest.mark.parametrize(
    "func, value",
    [
        (lambda x: (x * float("nan")).sum(), "nan"),  # linear: its Hessian is NaN * 0 = 0
        (lambda x: torch.where(x > 10, x**2, float("nan")).sum(), "nan"),  # zero derivatives
        (lambda x: (x**2).sum() + float("inf"), "inf"),  # a finite Hessian of an inf value
    ],
    ids=["nan-linear", "nan-flat", "inf-quadratic"],
)
def test_arnoldi_project_non_finite_function(func, value, mode):
    # Reported as what it is, not as "the curvature is zero to rounding" (issue 16).
    x = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"arnoldi_project: func\(x\) returned {value} "):
        arnoldi_project(6, func, x, proj_dim=3, mode=mode)


@pytest.mark.parametrize("mode", ["rev-fwd", "rev-rev"])
def test_arnoldi_project_non_finite_hessian_names_the_iteration(mode):
    # func(x) is finite, its Hessian is not: sqrt at 0 has infinite curvature.
    x = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    message = r"the Hessian-vector product is not finite .* at Hessian-vector product 1 "
    with pytest.raises(ValueError, match=message):
        arnoldi_project(6, lambda x: torch.sqrt(x - 0.5).sum(), x, proj_dim=3, mode=mode)
