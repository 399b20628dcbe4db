"""Threads (API section 9): concurrent transforms give the serial result; one
``nn.Module`` used by two threads at once raises in the second thread.

No test here depends on timing: concurrent calls start together at a
``threading.Barrier``, an overlap of two uses of a model is made certain by a
forward pass that waits on an ``Event`` the test sets, and every wait and join
is bounded so that a failure cannot hang the suite.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from cases import classification_data, mlp
from reference import assert_close
from torch import nn

import attribkit as ak
from attribkit._compute import guard

F64 = ak.ComputeConfig(dtype="float64")
TIMEOUT = 120  # seconds: only ever reached when something is broken
THREADS = 8


def run_together(fn, n=THREADS):
    """``fn()`` in ``n`` threads released at once by a barrier; their results in order."""
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def work(i):
        try:
            barrier.wait(TIMEOUT)
            results[i] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def rtol_of(dtype) -> float:
    # The same products on the same data: equal up to the dtype's rounding
    # (BLAS may block a call differently with other memory alignment).
    return 1e-12 if dtype == torch.float64 else 1e-6


def gradients(n=40, p=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=dtype)


# ---------------------------------------------------------------- concurrent transforms
#: name -> (fitted estimator factory, input); each factory returns a fresh
#: estimator whose caches are empty, so the threads race to fill them.
def _random(proj_type, budget, dtype="float32", sparsity=1):
    def make():
        cfg = ak.ComputeConfig(dtype=dtype, memory_budget=budget)
        X = gradients(64, 4000, dtype=cfg.torch_dtype)
        est = ak.RandomProjector(256, proj_type=proj_type, sparsity=sparsity, config=cfg)
        return est.fit(X), X

    return make


def _model_fit(make_est):
    def make():
        X, y = classification_data(n=24)
        model = mlp()
        est = make_est().fit(model, (X, y))
        return est, ak.per_example_gradients(model, (X, y), config=F64)

    return make


def _array_fit(make_est):
    def make():
        G = gradients()
        return make_est().fit(G), G

    return make


# RandomProjector: 4000 x 256 float32 = 4 MiB; a budget of a third of that streams
# it (and caches a prefix), one of 64 KiB streams it in many small blocks.
TRANSFORMS = {
    "random-streamed": _random("rademacher", 4000 * 256 * 4 // 3),
    "random-streamed-small-blocks": _random("rademacher", 64 * 2**10),
    "random-normal-streamed": _random("normal", 4000 * 256 * 4 // 3),
    "random-float64-streamed": _random("rademacher", 4000 * 256 * 8 // 3, dtype="float64"),
    "random-cached": _random("rademacher", 2**30),
    "random-sjlt-cached": _random("sjlt", 2**30, sparsity=4),
    "random-sjlt-streamed": _random("sjlt", 64 * 2**10, sparsity=4),
    "kronecker": _model_fit(lambda: ak.KroneckerProjector(in_dim=3, out_dim=2, config=F64)),
    "arnoldi": _array_fit(lambda: ak.ArnoldiProjector(proj_dim=4, damping=0.1, config=F64)),
    "explicit-cholesky": _array_fit(lambda: ak.ExplicitIFVP(damping=0.1, config=F64)),
    "explicit-woodbury": _array_fit(
        lambda: ak.ExplicitIFVP(damping=0.1, solver="woodbury", config=F64)
    ),
    "datainf": _array_fit(lambda: ak.DataInfIFVP(config=F64)),
    "ekfac": _model_fit(lambda: ak.EKFACIFVP(damping=0.1, config=F64)),
    "ekfac-float32": _model_fit(
        lambda: ak.EKFACIFVP(damping=0.1, config=ak.ComputeConfig(dtype="float32"))
    ),
}

METHODS = {
    "transform": lambda est, X: est.transform(X),
    "inverse_transform": lambda est, X: est.inverse_transform(X),
    "ihvp": lambda est, X: est.ihvp(X),
    "influence": lambda est, X: ak.influence(est, X, X[:5]),
    "influence-top_k": lambda est, X: torch.cat(ak.influence(est, X, X[:5], top_k=3)[::2], 1),
    "self_influence": lambda est, X: ak.self_influence(est, X),
}


def _cases():
    for name in TRANSFORMS:
        yield name, "transform"
        if name.startswith(("explicit", "ekfac")):
            yield name, "inverse_transform"
        if name == "arnoldi":
            yield name, "ihvp"
        if name.startswith(("explicit", "datainf", "ekfac")):
            yield name, "influence"
            yield name, "self_influence"
        if name == "explicit-cholesky":
            yield name, "influence-top_k"


@pytest.mark.parametrize("name, method", list(_cases()))
def test_concurrent_calls_give_the_serial_result(name, method):
    est, X = TRANSFORMS[name]()
    twin = copy.deepcopy(est)  # the same fitted state, caches empty (not shared)
    call = METHODS[method]
    expected = call(twin, X)
    for got in run_together(lambda: call(est, X)):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert_close(got, expected, rtol=rtol_of(expected.dtype))
    # ... and the caches they filled serve later calls with the same numbers.
    assert_close(call(est, X), expected, rtol=rtol_of(expected.dtype))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_never_writes_the_fitted_state(name):
    # Only the declared caches (_transient) may change in a transform; shared
    # attributes written per call are what concurrent calls would trip over.
    est, X = TRANSFORMS[name]()
    before = {k: v for k, v in est.__dict__.items() if k not in est._transient}
    est.transform(X)
    if hasattr(est, "inverse_transform"):
        est.inverse_transform(X)
    after = {k: v for k, v in est.__dict__.items() if k not in est._transient}
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


# ---------------------------------------------------------------- one model, two threads
class Gate:
    """Stops the first forward pass of a :class:`Gated` model until released."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()


class Gated(nn.Module):
    """The test MLP; with a gate set, its first forward waits for the test."""

    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.gate = None

    def forward(self, x):
        gate = self.gate
        if gate is not None and not gate.entered.is_set():
            gate.entered.set()
            if not gate.release.wait(TIMEOUT):
                raise RuntimeError("the test never released the gate")
        return self.body(x)


DATA = classification_data(n=12)
PROBE = gradients(3, 39, seed=5)  # 39 = the MLP's parameter count


def _kronecker_gradients(model):
    kp = ak.KroneckerProjector(in_dim=2, out_dim=2, config=F64).fit(model)  # no forward
    return lambda: ak.per_example_gradients(model, DATA, projector=kp)


#: name -> model -> (zero-argument use of the model, its result as one tensor)
USES = {
    "ExplicitIFVP.fit": lambda m: (
        lambda: ak.ExplicitIFVP(damping=0.1, config=F64).fit(m, DATA).transform(PROBE)
    ),
    "DataInfIFVP.fit": lambda m: lambda: ak.DataInfIFVP(config=F64).fit(m, DATA).transform(PROBE),
    "EKFACIFVP.fit": lambda m: (
        lambda: ak.EKFACIFVP(damping=0.1, config=F64).fit(m, DATA).transform(PROBE)
    ),
    "ArnoldiProjector.fit": lambda m: (
        lambda: (
            ak.ArnoldiProjector(proj_dim=3, max_iter=20, damping=1.0, config=F64)
            .fit(m, DATA)
            .transform(PROBE)
        )
    ),
    "per_example_gradients": lambda m: lambda: ak.per_example_gradients(m, DATA, config=F64),
    "per_example_gradients-kronecker": _kronecker_gradients,
}
SECOND = ["per_example_gradients", "EKFACIFVP.fit", "ArnoldiProjector.fit"]


def _modes(model):
    return [m.training for m in model.modules()]


def _mixed_modes(model):
    model.train()
    model.body[2].eval()  # a part in eval mode must come back in eval mode
    return model


@pytest.mark.parametrize("second", SECOND)
@pytest.mark.parametrize("first", list(USES))
def test_a_model_used_by_two_threads_raises_in_the_second(first, second):
    model = _mixed_modes(Gated())
    modes = _modes(model)
    use = USES[first](model)
    model.gate = gate = Gate()
    result, errors = [], []

    def work():
        try:
            result.append(use())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        assert gate.entered.wait(TIMEOUT), "the first thread never reached the model"
        # The first thread is inside a forward pass of its use: the model is its.
        holder = first.split("-")[0]
        with pytest.raises(RuntimeError) as info:
            USES[second](model)()
        message = str(info.value)
        assert "(Gated)" in message and "in use in another thread" in message
        assert f"held by {holder}" in message and "copy.deepcopy(model)" in message
        # The refused use changed nothing: the model is still in the first's eval mode.
        assert not any(_modes(model))
    finally:
        gate.release.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert not errors, errors
    assert _modes(model) == modes
    # The first thread's result is the one a use alone gives.
    twin = _mixed_modes(Gated())
    assert_close(result[0], USES[first](twin)(), rtol=1e-12)
    # Released: the second use now works.
    USES[second](model)()
    assert _modes(model) == modes


def test_two_models_sharing_a_submodule_conflict():
    a = _mixed_modes(Gated())
    b = nn.Sequential(a.body, nn.Linear(3, 2).double())  # shares a's MLP
    data_b = (DATA[0], gradients(12, 2, seed=1))
    modes = _modes(b)
    a.gate = gate = Gate()
    thread = threading.Thread(target=USES["per_example_gradients"](a), daemon=True)
    thread.start()
    try:
        assert gate.entered.wait(TIMEOUT)
        with pytest.raises(RuntimeError, match=r"\(Sequential\).*submodule '0' \(Sequential\)"):
            ak.per_example_gradients(b, data_b, loss="mse", config=F64)
    finally:
        gate.release.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert _modes(b) == modes
    assert ak.per_example_gradients(b, data_b, loss="mse", config=F64).shape == (12, 47)


class _Preconditioned(ak.ExplicitIFVP):
    """Fits an EKFACIFVP on the same model inside its own fit (a nested estimator)."""

    def _fit_model(self, model, data, config):
        self.inner_ = ak.EKFACIFVP(damping=0.1, config=config).fit(model, data)
        super()._fit_model(model, data, config)


def test_the_same_thread_may_reenter():
    model = _mixed_modes(Gated())
    modes = _modes(model)
    est = _Preconditioned(damping=0.1, config=F64).fit(model, DATA)
    assert_close(est.transform(PROBE), USES["ExplicitIFVP.fit"](model)(), rtol=1e-12)
    assert_close(est.inner_.transform(PROBE), USES["EKFACIFVP.fit"](model)(), rtol=1e-12)
    with guard.use_model(model, "an outer use"):
        G = ak.per_example_gradients(model, DATA, config=F64)
        with guard.use_model(model.body, "an inner use"):
            assert torch.equal(ak.per_example_gradients(model, DATA, config=F64), G)
    assert _modes(model) == modes
    assert model not in guard._HOLDS and model.body not in guard._HOLDS


def test_a_failed_use_releases_the_model():
    model = _mixed_modes(Gated())
    modes = _modes(model)
    kp = ak.KroneckerProjector(in_dim=2, out_dim=2, config=F64).fit(model)
    batches = list(zip(DATA[0].split(4), DATA[1].split(4)))  # a length not known in advance
    too_small = torch.empty(5, kp.proj_dim_, dtype=torch.float64)
    with pytest.raises(ValueError, match="has 5 rows but 'data' yields more") as info:
        ak.per_example_gradients(model, batches, projector=kp, out=too_small)
    # While the exception (and its traceback) is alive, the model is free and restored.
    assert info.value is not None and _modes(model) == modes
    assert model not in guard._HOLDS
    with pytest.raises(ValueError):
        ak.EKFACIFVP(config=F64).fit(model, (DATA[0], DATA[1][:5]))
    assert model not in guard._HOLDS
    other = threading.Thread(target=USES["per_example_gradients"](model), daemon=True)
    other.start()
    other.join(TIMEOUT)
    assert not other.is_alive() and _modes(model) == modes
