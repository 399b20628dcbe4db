"""Fits across processes (torch.distributed, gloo on 127.0.0.1) equal one process.

Each test spawns 2 or 3 CPU processes with ``torch.multiprocessing``; rank
``r`` fits every estimator on its shard of one small float64 data set (shards
uneven, one of them empty) and saves what it got; the parent fits the same
estimators on the whole data set in one process and compares (rel 1e-10).
Spawning is slow (every child imports torch), so one spawned run checks many
estimators. A hung collective cannot hang the suite: the process group has a
short timeout, the parent joins with a deadline and then kills the children,
and every test asserts that no child process is left.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import time
import traceback

import psutil
import pytest
import torch
import torch.multiprocessing as mp
from cases import PerToken, classification_data, linear, mlp
from reference import assert_close

import attribkit as ak
from attribkit._compute import checksum
from attribkit._compute import data as data_module
from attribkit._compute import distributed as _distributed

N = 11  # examples in the data set
BATCH = 3
#: Seconds a collective may wait for the other ranks before it fails.
PG_TIMEOUT = 60
#: Seconds the parent waits for a spawned run (children import torch first).
RUN_TIMEOUT = 300


# --------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, plan, out_dir):
    """Run the phases of ``plan`` this rank takes part in, saving each result.

    A phase is ``(name, world, port, pg_timeout, case, arg)``: ranks below
    ``world`` join a fresh gloo process group on ``port`` and run
    ``CASES[case](rank, world, arg)``; the group is destroyed afterwards, so
    one set of spawned processes (each of which imports torch once) serves
    groups of several sizes.
    """
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch.set_num_threads(1)
    import torch.distributed as dist

    for name, world, port, pg_timeout, case, arg in plan:
        if rank >= world:
            continue
        try:
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=pg_timeout),
            )
            result = ("ok", CASES[case](rank, world, arg))
        except BaseException:
            result = ("error", traceback.format_exc())
        with open(os.path.join(out_dir, f"{name}-rank{rank}.pkl"), "wb") as fh:
            pickle.dump(result, fh)
        if dist.is_initialized():
            dist.destroy_process_group()


def _children() -> list:
    """Live child processes, less multiprocessing's own long-lived resource tracker."""
    found = []
    for c in psutil.Process().children(recursive=True):
        try:
            if c.is_running() and "resource_tracker" not in " ".join(c.cmdline()):
                found.append(c)
        except psutil.NoSuchProcess:
            pass
    return found


def run_phases(phases, out_dir, timeout=RUN_TIMEOUT, target=_worker) -> dict:
    """Spawn ``max(world)`` processes that run ``phases`` one after the other.

    ``phases`` are ``(name, world, pg_timeout, case, arg)``. Returns
    ``name -> [(status, value) per rank]``; a phase whose result a rank never
    wrote maps that rank to ``("missing", reason)``. The parent waits at most
    ``timeout`` seconds, then terminates (and if need be kills) the children,
    and asserts that none is left; ``pytest.fail`` reports a run that
    timed out.
    """
    out_dir = str(out_dir)
    plan = [(n, w, _free_port(), t, c, a) for n, w, t, c, a in phases]
    size = max(w for _, w, *_ in phases)
    before = {c.pid for c in _children()}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, plan, out_dir), daemon=True) for r in range(size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    left = [c for c in _children() if c.pid not in before]
    assert not left, f"child processes left behind: {left}"
    if hung:
        pytest.fail(f"ranks {hung} did not finish within {timeout} s (killed)")
    results = {}
    for name, world, *_ in plan:
        results[name] = []
        for r in range(world):
            path = os.path.join(out_dir, f"{name}-rank{r}.pkl")
            if not os.path.exists(path):
                why = f"rank {r} died (exit code {procs[r].exitcode}) without a result"
                results[name].append(("missing", why))
                continue
            with open(path, "rb") as fh:
                results[name].append(pickle.load(fh))
    return results


def ok(results) -> list:
    """The values of a phase in which every rank must have succeeded."""
    errors = [f"rank {r}:\n{v}" for r, (status, v) in enumerate(results) if status != "ok"]
    assert not errors, "\n".join(errors)
    return [v for _, v in results]


# --------------------------------------------------------------------- problem
F64 = dict(dtype="float64", batch_size=BATCH, progress=False)


def _problem():
    X, y = classification_data(n=N, d=4, classes=3, seed=3)
    return X, y


def _probe(p: int, m: int = 3) -> torch.Tensor:
    return torch.randn(m, p, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _shard(sizes, rank):
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _fit_everything(rank: int, world: int, arg, distributed=True) -> dict:
    """Fit every estimator on ``rank``'s shard and report its state.

    Keys starting with ``"rows:"`` are row-sharded (this rank's rows of the
    single-process value); all others must equal the single-process value.
    The parent calls this with ``distributed=False`` and the whole data set.
    """
    sizes, out_dir = arg
    cfg = ak.ComputeConfig(**F64, distributed=distributed)
    X, y = _problem()
    s, e = _shard(sizes, rank)
    data = (X[s:e], y[s:e])
    out = {"traffic0": _distributed.traffic()["bytes"]}
    big, small = mlp(d=4, hidden=5, out=3, seed=1), linear(d=3, out=2, seed=2)
    small_data = (X[s:e, :3], y[s:e] % 2)
    regression = (X[s:e, :3], X[s:e, 1:3] ** 2)

    # ExplicitIFVP: woodbury (n < p), cholesky, auto switching mid-pass, expected Fisher.
    runs = {
        "wood": (ak.ExplicitIFVP(damping=0.05, config=cfg), big, data),
        "chol": (ak.ExplicitIFVP(damping=0.05, solver="cholesky", config=cfg), big, data),
        "auto": (ak.ExplicitIFVP(damping=0.05, config=cfg), small, small_data),
        "expected": (
            ak.ExplicitIFVP(damping=0.05, fisher="expected", config=cfg),
            small,
            small_data,
        ),
        "auto-damping": (ak.ExplicitIFVP(damping="auto", config=cfg), big, data),
        "undamped": (ak.ExplicitIFVP(loss="mse", config=cfg), small, regression),
    }
    for name, (est, model, d) in runs.items():
        est.fit(model, d)
        V = _probe(est.n_features_in_)
        out[f"explicit-{name}/solver"] = est.solver_
        out[f"explicit-{name}/n"] = est.n_samples_
        out[f"explicit-{name}/L"] = est.cholesky_
        if est.gradients_ is not None:
            out[f"explicit-{name}/G"] = est.gradients_
        out[f"explicit-{name}/T"] = est.transform(V)
        out[f"explicit-{name}/FVP"] = est.inverse_transform(V)
        if distributed and world > 1:
            out[f"explicit-{name}/pickle"] = pickle.dumps(est)

    # DataInfIFVP: each rank keeps its shard; transform is collective.
    for name, kwargs in {"auto": {}, "fixed": {"damping": 0.3, "layers": "parameter"}}.items():
        est = ak.DataInfIFVP(config=cfg, **kwargs).fit(big, data)
        V = _probe(est.n_features_in_)
        out[f"datainf-{name}/damping"] = torch.tensor(est.damping_, dtype=torch.float64)
        out[f"datainf-{name}/n"] = est.n_samples_
        out[f"datainf-{name}/T"] = est.transform(V)
        as_dict = est.transform(dict(zip(est.param_shapes_, _split(V, est.param_shapes_))))
        for key, value in as_dict.items():
            out[f"datainf-{name}/T-dict-{key}"] = value
        # influence / self_influence call the collective transform the same way.
        out[f"datainf-{name}/influence"] = ak.influence(est, _probe(est.n_features_in_, 5), V)
        out[f"datainf-{name}/self"] = ak.self_influence(est, V)
        for k, G in enumerate(est.train_gradients_):
            out[f"rows:datainf-{name}/G{k}"] = G
            out[f"rows:datainf-{name}/norms{k}"] = est.train_sq_norms_[k]
        if distributed and world > 1:
            assert est.shard_sizes_ == tuple(sizes), est.shard_sizes_
            out[f"datainf-{name}/pickle"] = pickle.dumps(est)

    # EKFACIFVP: covariances, counts and Λ reduced once per pass; bases identical.
    for name, kwargs in {
        "default": {},
        "auto": {"damping": "auto"},
        "expected": {"fisher": "expected"},
    }.items():
        est = ak.EKFACIFVP(config=cfg, **kwargs).fit(big, data)
        V = _probe(est.n_features_in_)
        out[f"ekfac-{name}/n"] = est.n_samples_
        out[f"ekfac-{name}/damping"] = torch.tensor(est.damping_, dtype=torch.float64)
        for layer in est.layers_:
            for side in ("input", "output"):
                w = getattr(est, f"{side}_eigenvalues_")[layer]
                Q = getattr(est, f"{side}_eigenvectors_")[layer]
                out[f"ekfac-{name}/{layer}-{side}-eigenvalues"] = w
                out[f"ekfac-{name}/{layer}-{side}-covariance"] = (Q * w) @ Q.T
            out[f"ekfac-{name}/{layer}-lambda"] = est.lambdas_[layer]
            out[f"ekfac-{name}/{layer}-QA"] = est.input_eigenvectors_[layer]
            out[f"ekfac-{name}/{layer}-QS"] = est.output_eigenvectors_[layer]
        out[f"ekfac-{name}/T"] = est.transform(V)
        out[f"ekfac-{name}/FVP"] = est.inverse_transform(V)
        if distributed and world > 1:
            out[f"ekfac-{name}/pickle"] = pickle.dumps(est)
        if distributed and world > 1:  # the very same bases on every rank (broadcast)
            for layer in est.layers_:
                out[f"same:ekfac-{name}/{layer}-QA"] = est.input_eigenvectors_[layer]
                out[f"same:ekfac-{name}/{layer}-QS"] = est.output_eigenvectors_[layer]

    # Token counts (sequence inputs) and a convolution's positions.
    g = torch.Generator().manual_seed(5)
    seq_x = torch.randn(N, 2, 4, generator=g, dtype=torch.float64)
    seq_y = torch.randint(0, 3, (N, 2), generator=g)
    img_x = torch.randn(N, 1, 4, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(6)
    others = {
        "seq": (PerToken(d=4, hidden=5, classes=3).double(), (seq_x[s:e], seq_y[s:e])),
        "conv": (
            torch.nn.Sequential(
                torch.nn.Conv2d(1, 2, 3),
                torch.nn.Tanh(),
                torch.nn.Flatten(),
                torch.nn.Linear(8, 3),
            ).double(),
            (img_x[s:e], y[s:e]),
        ),
    }
    for name, (model, d) in others.items():
        est = ak.EKFACIFVP(config=cfg).fit(model, d)
        out[f"ekfac-{name}/n"] = est.n_samples_
        for layer in est.layers_:
            out[f"ekfac-{name}/{layer}-lambda"] = est.lambdas_[layer]
        out[f"ekfac-{name}/T"] = est.transform(_probe(est.n_features_in_))

    # ArnoldiProjector: one all-reduced HVP per Lanczos iteration.
    convex = linear(d=4, out=3, seed=4)
    est = ak.ArnoldiProjector(proj_dim=4, damping=0.01, config=cfg).fit(convex, data)
    V = _probe(est.n_features_in_)
    out["arnoldi/n"] = est.n_samples_
    out["arnoldi/n_iter"] = est.n_iter_
    out["arnoldi/eigenvalues"] = est.eigenvalues_
    out["arnoldi/ihvp"] = est.ihvp(V)
    T = est.transform(V)
    out["arnoldi/gram"] = T @ T.T

    # Projectors need no communication: the same output on every rank.
    proj = ak.RandomProjector(proj_dim=6, config=cfg).fit(big)
    out["random/T"] = proj.transform(_probe(proj.n_features_in_))
    kron = ak.KroneckerProjector(in_dim=3, out_dim=2, config=cfg).fit(big)
    out["kronecker/T"] = kron.transform(_probe(kron.n_features_in_))

    # per_example_gradients: each rank gets (or writes) its own rows only.
    out["rows:pergrad/G"] = ak.per_example_gradients(big, data, config=cfg)
    if distributed and e == s:  # an empty list of batches is an empty shard too
        empty = ak.per_example_gradients(big, [], config=cfg, flatten=False)
        assert [tuple(t.shape) for t in empty.values()] == [(0, 5, 4), (0, 5), (0, 3, 5), (0, 3)]
    out["rows:pergrad/kron"] = ak.per_example_gradients(big, data, projector=kron, config=cfg)
    buf = torch.full((e - s, proj.proj_dim), float("nan"), dtype=torch.float64)
    got = ak.per_example_gradients(big, data, projector=proj, config=cfg, out=buf)
    assert got is buf
    out["rows:pergrad/random-out"] = buf
    if distributed and world > 1:
        out["pergrad/gathered"] = _gather_recipe(big, data, cfg, sizes)
        out["pergrad/memmap"] = _memmap_recipe(big, data, proj, cfg, sizes, out_dir)
    else:
        out["pergrad/gathered"] = ak.per_example_gradients(big, data, config=cfg)
        out["pergrad/memmap"] = ak.per_example_gradients(big, data, projector=proj, config=cfg)

    out["traffic"] = _distributed.traffic()["bytes"] - out.pop("traffic0")
    if distributed and e > s:  # array-mode fits stay local: no collective at all
        G = torch.randn(
            e - s, 6, generator=torch.Generator().manual_seed(rank), dtype=torch.float64
        )
        before = _distributed.traffic()["collectives"]
        assert ak.ExplicitIFVP(damping=0.1, config=cfg).fit(G).n_samples_ == e - s
        assert ak.DataInfIFVP(config=cfg).fit(G).shard_sizes_ == (e - s,)
        assert ak.ArnoldiProjector(proj_dim=2, config=cfg).fit(G).n_samples_ == e - s
        assert _distributed.traffic()["collectives"] == before
    return out


def _gather_recipe(model, shard, cfg, sizes):
    """The in-memory gather of per_example_gradients' docstring, as written there."""
    import torch.distributed as dist

    world = dist.get_world_size()
    G = ak.per_example_gradients(model, shard, config=cfg)
    rows = max(sizes)
    padded = G.new_zeros(rows, G.shape[1])
    padded[: len(G)] = G
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:m] for p, m in zip(parts, sizes)])


def _memmap_recipe(model, shard, proj, cfg, sizes, out_dir):
    """The shared-memmap fill of per_example_gradients' docstring: each rank its rows."""
    import numpy as np
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [None] * world
    dist.all_gather_object(counts, len(shard[0]))
    assert counts == list(sizes)
    start, n, k = sum(counts[:rank]), sum(counts), proj.proj_dim
    path = os.path.join(out_dir, "grads.npy")
    if rank == 0:
        np.lib.format.open_memmap(path, mode="w+", dtype="float64", shape=(n, k))
    dist.barrier()
    big = np.load(path, mmap_mode="r+")
    ak.per_example_gradients(
        model, shard, projector=proj, config=cfg, out=big[start : start + counts[rank]]
    )
    dist.barrier()
    return torch.as_tensor(np.load(path))


def _split(V, shapes):
    import math

    parts, start = [], 0
    for shape in shapes.values():
        size = math.prod(shape)
        parts.append(V[:, start : start + size].reshape(V.shape[0], *shape))
        start += size
    return parts


def _outcome(fn, *args):
    """``("ok", value)`` or ``(exception type name, message)`` of ``fn(*args)``."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:
        return (type(exc).__name__, str(exc))


def _failures(rank: int, world: int, arg) -> dict:
    """Misuse on some ranks: every rank must raise clearly, none may hang."""
    cfg = ak.ComputeConfig(**F64)
    X, y = _problem()
    model = mlp(d=4, hidden=5, out=3, seed=1)
    convex = linear(d=4, out=3, seed=4)
    fits = {
        "explicit": lambda d: ak.ExplicitIFVP(damping=0.1, config=cfg).fit(model, d),
        "datainf": lambda d: ak.DataInfIFVP(config=cfg).fit(model, d),
        "ekfac": lambda d: ak.EKFACIFVP(config=cfg).fit(model, d),
        "arnoldi": lambda d: ak.ArnoldiProjector(proj_dim=2, config=cfg).fit(convex, d),
    }
    out = {}
    for name, fit in fits.items():
        # Every shard empty: the single-process error, on every rank.
        out[f"empty/{name}"] = _outcome(fit, (X[:0], y[:0]))
        # Bad data on rank 1 only: rank 1 raises its error, rank 0 says so.
        shard = (X[:4], y[:4]) if rank == 0 else (X[4:8], y[4:7])
        out[f"bad/{name}"] = _outcome(fit, shard)
    est = ak.DataInfIFVP(config=cfg).fit(model, (X[:6], y[:6]) if rank == 0 else (X[6:], y[6:]))
    V = _probe(est.n_features_in_)
    out["transform/shapes"] = _outcome(lambda: est.transform(V[: 3 - rank]))
    out["transform/values"] = _outcome(lambda: est.transform(V + rank))
    bad = V if rank == 0 else torch.zeros(3, est.n_features_in_ + 1, dtype=torch.float64)
    out["transform/invalid"] = _outcome(lambda: est.transform(bad))
    out["transform/after"] = _outcome(lambda: est.transform(V))
    return out


def _hang(rank: int, world: int, pg_timeout) -> dict:
    """Rank 1 skips a collective transform: rank 0 must fail after the timeout."""
    cfg = ak.ComputeConfig(**F64)
    X, y = _problem()
    model = mlp(d=4, hidden=5, out=3, seed=1)
    est = ak.DataInfIFVP(config=cfg).fit(model, (X[:6], y[:6]) if rank == 0 else (X[6:], y[6:]))
    if rank == 1:
        time.sleep(pg_timeout + 3)  # never joins the transform
        return {"skipped": True}
    start = time.monotonic()
    outcome = _outcome(lambda: est.transform(_probe(est.n_features_in_)))
    return {"outcome": outcome[0], "seconds": time.monotonic() - start}


def _reducer_primitives(rank: int, world: int, arg) -> dict:
    """The Reducer's collectives on rank-dependent tensors (checked in the parent)."""
    red = _distributed.reducer(ak.ComputeConfig(), "test")
    assert red.active and (red.rank, red.world_size) == (rank, world)
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    small = base * (rank + 1)
    strided = (base * (rank + 1)).T  # not contiguous
    counts = torch.tensor([rank, 1], dtype=torch.int64)
    _distributed._PACK_BYTES, saved = 64, _distributed._PACK_BYTES  # force unpacked paths
    big = torch.full((20,), float(rank + 1), dtype=torch.float64)  # 160 bytes > 64
    try:
        red.sum_(small, strided, counts, big)
    finally:
        _distributed._PACK_BYTES = saved
    rows = torch.full((rank, 2), float(rank))  # rank r holds r rows (rank 0: none)
    out = {
        "small": small,
        "strided": strided,
        "counts": counts,
        "big": big,
        "sum_int": red.sum_int(rank + 1),
        "min_int": red.min_int(10 - rank),
        "gather_ints": red.gather_ints([rank, 2 * rank]),
        "gather_rows": red.gather_rows(rows),
    }
    bad = torch.zeros(1, 2 + rank)  # trailing shapes differ: every rank refuses
    out["gather_rows_bad"] = _outcome(red.gather_rows, bad)
    return out


class _NoAgreement(ak.ExplicitIFVP):
    """ExplicitIFVP without the agreement, to count what the agreement costs."""

    _agree_on_fit = False


def _agreement(rank: int, world: int, arg) -> dict:
    """Ranks that fit different things: every rank must raise, naming the difference."""
    cfg = ak.ComputeConfig(**F64)
    X, y = _problem()
    data = (X[:6], y[:6]) if rank == 0 else (X[6:], y[6:])
    same = mlp(d=4, hidden=5, out=3, seed=1)
    models = {
        "arch": mlp(d=4, hidden=5 + rank, out=3, seed=1),  # a wider hidden layer on rank 1
        "weights": mlp(d=4, hidden=5, out=3, seed=1 + rank),  # same shapes, other weights
    }
    makers = {
        "explicit": lambda: ak.ExplicitIFVP(damping=0.1, config=cfg),
        "datainf": lambda: ak.DataInfIFVP(config=cfg),
        "ekfac": lambda: ak.EKFACIFVP(config=cfg),
        "arnoldi": lambda: ak.ArnoldiProjector(proj_dim=2, damping=0.1, config=cfg),
    }
    out = {}
    for case, model in models.items():
        for name, make in makers.items():
            out[f"{case}/{name}"] = _outcome(lambda m=make, x=model: m().fit(x, data))
    # One hyper-parameter (or the config's dtype) differs on rank 1.
    other = {
        "fisher": lambda: ak.ExplicitIFVP(
            damping=0.1, fisher=("empirical", "true")[rank], config=cfg
        ),
        "damping-datainf": lambda: ak.DataInfIFVP(damping=0.1 * (rank + 1), config=cfg),
        "damping-ekfac": lambda: ak.EKFACIFVP(damping=0.1 * (rank + 1), config=cfg),
        "dtype": lambda: ak.ArnoldiProjector(
            proj_dim=2, config=ak.ComputeConfig(**{**F64, "dtype": ("float64", "float32")[rank]})
        ),
    }
    for case, make in other.items():
        out[case] = _outcome(lambda m=make: m().fit(same, data))
    # Rank 1 fails before it can describe its fit (its model has no such parameter).
    names = ["0.weight"] if rank == 0 else ["no.such"]
    out["failed"] = _outcome(
        lambda: ak.ExplicitIFVP(damping=0.1, params=names, config=cfg).fit(same, data)
    )
    # The group is still in step; equal fits agree (bitwise-equal weights on every rank).
    calls = []
    for cls in (ak.ExplicitIFVP, _NoAgreement):
        before = _distributed.traffic()
        est = cls(damping=0.1, config=cfg).fit(same, data)
        calls.append(_distributed.traffic()["collectives"] - before["collectives"])
        out[f"equal/{cls.__name__}"] = est.transform(_probe(est.n_features_in_))
    out["equal-extra-collectives"] = calls[0] - calls[1]
    red = _distributed.reducer(cfg, "test")
    before = _distributed.traffic()
    red.agree_fit("test", {"a": 1}, {"w": torch.ones(3, dtype=torch.float64)})
    after = _distributed.traffic()
    out["cost"] = (after["collectives"] - before["collectives"], after["bytes"] - before["bytes"])
    return out


def _sleep_forever(rank, plan, out_dir):
    time.sleep(3600)


CASES = {
    "everything": _fit_everything,
    "failures": _failures,
    "hang": _hang,
    "reducer": _reducer_primitives,
    "agreement": _agreement,
}
HANG_TIMEOUT = 6
SIZES = {"two": [7, 4], "three": [6, 0, 5]}


def _compare(ranks: list[dict], sizes) -> None:
    ref = _reference(tuple(sizes))
    for key in ranks[0]:
        if key.startswith("same:"):  # bitwise the same on every rank
            for got in ranks[1:]:
                assert torch.equal(got[key], ranks[0][key]), key
    for r, got in enumerate(ranks):
        s, e = _shard(sizes, r)
        assert got["traffic"] > 0
        for key, want in ref.items():
            if key == "traffic":
                continue
            if key.startswith("rows:"):
                want = want[s:e]
            have = got[key]
            if isinstance(want, torch.Tensor):
                assert have.shape == want.shape, (r, key, have.shape, want.shape)
                if want.numel():
                    assert_close(have, want, rtol=1e-10)
            elif isinstance(want, bytes):
                continue
            else:
                assert type(have) is type(want) and have == want, (r, key, have, want)


_REFERENCES: dict = {}


def _reference(sizes: tuple) -> dict:
    if sum(sizes) not in _REFERENCES:
        _REFERENCES[sum(sizes)] = _fit_everything(0, 1, ([sum(sizes)], None), distributed=False)
    return _REFERENCES[sum(sizes)]


# --------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One spawned run of 3 processes for every phase (spawning costs seconds each)."""
    out = tmp_path_factory.mktemp("ranks")
    phases = [
        ("reducer", 3, PG_TIMEOUT, "reducer", None),
        ("three", 3, PG_TIMEOUT, "everything", (SIZES["three"], str(out))),
        ("two", 2, PG_TIMEOUT, "everything", (SIZES["two"], str(out))),
        ("failures", 2, PG_TIMEOUT, "failures", None),
        ("hang", 2, HANG_TIMEOUT, "hang", HANG_TIMEOUT),
        # Last: on code without the agreement a rank of this phase aborts (SIGABRT).
        ("agreement", 2, PG_TIMEOUT, "agreement", None),
    ]
    return run_phases(phases, out)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["two", "three"], ids=["2-ranks-uneven", "3-ranks-one-empty"])
def test_every_estimator_equals_one_process(session, phase):
    ranks = ok(session[phase])
    _compare(ranks, SIZES[phase])


@pytest.mark.slow
def test_reducer_collectives(session):
    ranks = ok(session["reducer"])
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    for got in ranks:  # ranks 0, 1, 2: factors 1 + 2 + 3
        assert torch.equal(got["small"], 6 * base)
        assert torch.equal(got["strided"], 6 * base.T)
        assert got["counts"].tolist() == [3, 3]
        assert torch.equal(got["big"], torch.full((20,), 6.0, dtype=torch.float64))
        assert got["sum_int"] == 6 and got["min_int"] == 8
        assert got["gather_ints"] == [[0, 0], [1, 2], [2, 4]]
        want = torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]])  # rank order, none from 0
        assert torch.equal(got["gather_rows"], want)
        kind, message = got["gather_rows_bad"]
        assert kind == "ValueError" and "rank 0: (1, 2), rank 1: (1, 3)" in message
    assert ranks[0]["gather_rows"].dtype == torch.float32


@pytest.mark.slow
def test_distributed_fits_pickle_into_one_process(session):
    # No process group travels in the pickle: the state alone, usable anywhere.
    got, ref = ok(session["two"])[0], _reference(tuple(SIZES["two"]))
    keys = [k for k in got if k.endswith("/pickle") and not k.startswith("datainf")]
    assert len(keys) == 9  # six ExplicitIFVP fits, three EKFACIFVP fits
    for key in keys:
        est = pickle.loads(got[key])
        prefix = key.rsplit("/", 1)[0]
        assert_close(est.transform(_probe(est.n_features_in_)), ref[f"{prefix}/T"], rtol=1e-10)


@pytest.mark.slow
def test_sharded_datainf_refuses_to_transform_alone(session):
    est = pickle.loads(ok(session["two"])[0]["datainf-auto/pickle"])
    with pytest.raises(RuntimeError, match="fitted across 2 processes.*rank 0's shard"):
        est.transform(_probe(est.n_features_in_))


@pytest.mark.slow
def test_collective_transform_writes_nothing_to_the_estimator(session):
    # Pickled after transform, influence and self_influence ran collectively: every
    # attribute is a parameter or was set by fit (API section 9: transform may run
    # in several threads at once, so it must not keep per-call state on the estimator).
    est = pickle.loads(ok(session["two"])[0]["datainf-auto/pickle"])
    assert set(est.__dict__) - est._fit_keys - set(est.get_params()) == set()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["explicit", "datainf", "ekfac", "arnoldi"])
def test_failures_on_one_rank_fail_every_rank(session, name):
    ranks = ok(session["failures"])
    for r in range(2):
        kind, message = ranks[r][f"empty/{name}"]
        assert kind == "EmptyDataError", (r, kind, message)
        assert "yielded no example" in message
    kind, message = ranks[1][f"bad/{name}"]
    assert kind == "ValueError" and "as many targets as inputs" in message, (kind, message)
    kind, message = ranks[0][f"bad/{name}"]
    assert kind == "RuntimeError" and "rank" in message, (kind, message)


@pytest.mark.slow
def test_collective_transform_disagreements_raise_on_every_rank(session):
    ranks = ok(session["failures"])
    for r in range(2):
        kind, message = ranks[r]["transform/shapes"]
        assert kind == "ValueError" and "same shape" in message, (r, kind, message)
        assert "rank 0: (3, 43), rank 1: (2, 43)" in message
        kind, message = ranks[r]["transform/values"]
        assert kind == "ValueError" and "same arguments" in message, (r, kind, message)
    kind, message = ranks[1]["transform/invalid"]
    assert kind == "ValueError" and "44" in message, (kind, message)
    kind, message = ranks[0]["transform/invalid"]
    assert kind == "ValueError" and "rank(s) [1] failed before" in message, (kind, message)
    # ... and the group is still in step: the next collective call works.
    (k0, a), (k1, b) = ranks[0]["transform/after"], ranks[1]["transform/after"]
    assert k0 == k1 == "ok"
    assert torch.equal(a, b)


@pytest.mark.slow
def test_a_missing_rank_times_out_instead_of_hanging(session):
    rank0, rank1 = ok(session["hang"])
    assert rank1 == {"skipped": True}
    assert rank0["outcome"] != "ok"
    assert rank0["seconds"] < HANG_TIMEOUT + 20


@pytest.mark.slow
@pytest.mark.parametrize("name", ["explicit", "datainf", "ekfac", "arnoldi"])
def test_ranks_with_different_architectures_all_raise(session, name):
    # API section 9: before (not instead of) a collective of mismatched sizes,
    # which aborted EK-FAC's rank (gloo) and hung ExplicitIFVP until the timeout.
    ranks = ok(session["agreement"])
    for r in range(2):
        kind, message = ranks[r][f"arch/{name}"]
        assert kind == "ValueError", (r, kind, message)
        assert f"this is rank {r}" in message
        assert "covered parameters (param_shapes_" in message, message
        assert "'0.weight' is [5, 4] on rank 0, [6, 4] on rank 1" in message, message


@pytest.mark.slow
@pytest.mark.parametrize("name", ["explicit", "datainf", "ekfac", "arnoldi"])
def test_ranks_with_different_weights_all_raise(session, name):
    # Same shapes, other values: the fit would silently mix statistics.
    ranks = ok(session["agreement"])
    for r in range(2):
        kind, message = ranks[r][f"weights/{name}"]
        assert kind == "ValueError", (r, kind, message)
        assert "values of the model's parameters and buffers" in message, message
        assert "rank 1's differ from rank 0's in '0.weight', '0.bias', '2.weight'" in message


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, field, values",
    [
        ("fisher", "the estimator parameter 'fisher'", ('"empirical"', '"true"')),
        ("damping-datainf", "the estimator parameter 'damping'", ("0.1", "0.2")),
        ("damping-ekfac", "the estimator parameter 'damping'", ("0.1", "0.2")),
        ("dtype", "the config field 'dtype'", ('"float64"', '"float32"')),
    ],
)
def test_ranks_with_different_settings_all_raise(session, case, field, values):
    ranks = ok(session["agreement"])
    for r in range(2):
        kind, message = ranks[r][case]
        assert kind == "ValueError", (r, kind, message)
        assert f"{field}: rank 0 has {values[0]}, rank 1 has {values[1]}" in message, message


@pytest.mark.slow
def test_a_rank_failing_before_the_agreement_fails_every_rank(session):
    rank0, rank1 = ok(session["agreement"])
    kind, message = rank1["failed"]  # its own error, as raised
    assert kind == "ValueError" and "no.such" in message, (kind, message)
    kind, message = rank0["failed"]  # no hang: told why
    assert kind == "ValueError", (kind, message)
    assert "rank(s) [1] failed before the ranks could compare" in message
    assert "rank 1: ValueError" in message and "no.such" in message


@pytest.mark.slow
def test_equal_ranks_agree_in_one_small_collective(session):
    ranks = ok(session["agreement"])
    X, y = _problem()
    cfg = ak.ComputeConfig(**F64, distributed=False)
    ref = ak.ExplicitIFVP(damping=0.1, config=cfg).fit(mlp(d=4, hidden=5, out=3, seed=1), (X, y))
    want = ref.transform(_probe(ref.n_features_in_))
    for got in ranks:
        assert_close(got["equal/ExplicitIFVP"], want, rtol=1e-10)
        assert torch.equal(got["equal/ExplicitIFVP"], got["equal/_NoAgreement"])
        assert got["cost"] == (1, 64)  # one all-gather of 64 bytes per rank
        assert got["equal-extra-collectives"] == 1


def test_a_hung_run_is_killed_and_fails(tmp_path):
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not finish within 1 s"):
        run_phases([("sleep", 2, 1, "none", None)], tmp_path, timeout=1, target=_sleep_forever)
    assert time.monotonic() - start < 30
    assert not _children()


def test_distributed_true_needs_a_process_group():
    G = torch.randn(5, 3, dtype=torch.float64)
    est = ak.ExplicitIFVP(damping=0.1, config=ak.ComputeConfig(distributed=True))
    with pytest.raises(RuntimeError, match="distributed=True.*needs an initialised"):
        est.fit(mlp(d=4, hidden=5, out=3), _problem())
    # Array-mode fits stay local and never ask for a group ... but True still requires it.
    est_local = ak.ExplicitIFVP(damping=0.1, config=ak.ComputeConfig(distributed=False))
    assert est_local.fit(G).n_samples_ == 5


@pytest.mark.parametrize(
    "make_fit",
    [
        lambda c: ak.ExplicitIFVP(damping=0.1, config=c).fit(torch.randn(5, 3)),
        lambda c: ak.DataInfIFVP(config=c).fit(torch.randn(5, 3)),
        lambda c: ak.RandomProjector(proj_dim=2, config=c).fit(mlp(d=4, hidden=5, out=3)),
        lambda c: ak.KroneckerProjector(config=c).fit(mlp(d=4, hidden=5, out=3)),
    ],
    ids=["explicit-array", "datainf-array", "random-model", "kronecker-model"],
)
def test_distributed_true_needs_a_process_group_even_for_local_fits(make_fit):
    # API section 1: True requires an initialised process group (clear error
    # otherwise), also where the fit itself is local and communicates nothing.
    with pytest.raises(RuntimeError, match="distributed=True.*needs an initialised"):
        make_fit(ak.ComputeConfig(distributed=True))
    make_fit(ak.ComputeConfig(distributed="auto"))


def test_single_process_empty_data_error_is_unchanged():
    X, y = _problem()
    with pytest.raises(ValueError, match="The 'data' argument is empty: it yielded no example"):
        ak.ExplicitIFVP(damping=0.1).fit(mlp(d=4, hidden=5, out=3), (X[:0], y[:0]))


def test_inactive_reducer_is_a_no_op():
    red = _distributed.reducer(ak.ComputeConfig())  # no process group here
    assert not red.active and (red.rank, red.world_size) == (0, 1)
    t = torch.arange(4.0)
    before = _distributed.traffic()
    red.sum_(t)
    red.broadcast_(t)
    red.agree("x", shape=(1, 2), fingerprint=(1.0,))
    red.agree_fit("x", {"a": 1}, {"w": torch.ones(3, dtype=torch.float64)})
    assert torch.equal(t, torch.arange(4.0))
    assert red.gather_rows(t[:2]) is not None and red.gather_ints([3]) == [[3]]
    assert red.sum_int(5) == 5 and red.min_int(7) == 7
    assert _distributed.traffic() == before  # nothing was sent
    with red.shard_pass("fit") as shard:
        shard.count += 3
    assert shard.total == 3
    # One process: the empty-data error passes through unchanged.
    X, y = _problem()
    with pytest.raises(ValueError, match="yielded no example"):
        with red.shard_pass("fit"):
            list(data_module.iter_batches((X[:0], y[:0]), ak.ComputeConfig()))
    assert not _distributed.reducer(ak.ComputeConfig(distributed=False)).active


def test_fingerprints_see_every_value_and_its_place():
    # What the agreement compares, to FINGERPRINT_RTOL of the L1 norm.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 4096 + 17, generator=g)  # whole rows of the table and a tail
    y = torch.randn(6, 5, generator=g, dtype=torch.float64)
    base = checksum.fingerprints([x, y])
    assert torch.equal(base, checksum.fingerprints([x.clone(), y.clone()]))
    # The documented definition, summed directly.
    for t, v in enumerate((x, y)):
        v = v.double().reshape(-1)
        a = torch.arange(v.numel(), dtype=torch.float64) * checksum._PHI + t * checksum._PSI
        want = torch.stack([v.abs().sum(), (v * a.cos()).sum(), (v * a.sin()).sum()])
        assert_close(base[t], want, rtol=1e-12)

    def differs(other):
        scale = float(base[:, 0].sum())
        gap = (other.sum(0) - base.sum(0)).abs().max()
        return bool(gap > checksum.FINGERPRINT_RTOL * scale)

    nudged = x.clone()
    nudged[5000] += 1e-7 * float(base[:, 0].sum())  # one value, 1e-7 of the L1 mass
    assert differs(checksum.fingerprints([nudged, y]))
    assert differs(checksum.fingerprints([x.flip(0), y]))  # same values, other places
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert differs(checksum.fingerprints([x, z])) and not differs(base)
    swapped = checksum.fingerprints([y, x])  # two tensors trade places
    assert differs(swapped)
