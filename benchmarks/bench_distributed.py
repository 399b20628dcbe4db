"""Fitting across processes: EKFACIFVP and ExplicitIFVP on 1 and 2 processes.

Each rank of a ``gloo`` process group on 127.0.0.1 fits on its half of the
data (``torch.multiprocessing``, spawned), exactly as under ``torchrun``. For
each estimator the table gives

* the fit time (median over repeats of the slowest rank, the ranks starting
  together after a barrier) for one process with 1 and with 2 threads and for
  two processes with 1 thread each; the ratio is against one process with
  the same total number of threads (2): on a machine with 2 cores two
  processes cannot beat one process using both cores by much, and the
  machine is shared, so read the ratios, not the seconds;
* the payload bytes each rank passed to collectives during one fit
  (``attribkit._compute.distributed.traffic``: an all-reduce counts its tensor, a
  broadcast counts it on every rank, an all-gather this rank's part),
  against the bytes of the fitted statistics themselves (ExplicitIFVP's
  dense form: the ``p x p`` float64 Fisher, all-reduced once; its kernel
  form, taken when ``n (n + p) < p^2``: the ``n x p`` kept gradients, of
  which each rank sends its share to the all-gather; EKFACIFVP: both
  covariances and Λ per layer, float64, where the eigenbases broadcast
  after pass 1 add about the covariances' size again): one reduction per
  pass means the ratio does not grow with the data;
* the largest relative difference of ``transform`` between the two-process
  and the one-process fit (float32 model and data, float64 statistics).

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distributed.py [--quick]``.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp
from _util import print_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(quick: bool):
    g = torch.Generator().manual_seed(0)
    n = 4000 if quick else 32000
    X = torch.randn(n, 128, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    ekfac_model = torch.nn.Sequential(
        torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    # ~2k parameters: the dense p x p form is the cheaper one at this n.
    explicit_model = torch.nn.Sequential(
        torch.nn.Linear(128, 14), torch.nn.Tanh(), torch.nn.Linear(14, 10)
    )
    return X, y, ekfac_model, explicit_model


#: Examples each estimator fits on (the first ones of the data set): EK-FAC
#: streams cheaply, ExplicitIFVP pays n p^2 for its dense Fisher.
SIZES = {"EKFACIFVP": 1.0, "ExplicitIFVP": 0.25}


def _estimators(cfg):
    import attribkit as ak

    return {
        "EKFACIFVP": (lambda: ak.EKFACIFVP(damping=0.1, config=cfg), "ekfac"),
        "ExplicitIFVP": (lambda: ak.ExplicitIFVP(damping=0.01, config=cfg), "explicit"),
    }


def _stat_bytes(name: str, est) -> int:
    if name == "EKFACIFVP":
        total = 0
        for layer in est.layers_:
            d_out, d_in = est.lambdas_[layer].shape
            total += 8 * (d_in * d_in + d_out * d_out + d_out * d_in)
        return total
    if est.solver_ == "woodbury":  # the kept gradients are the statistics
        return 8 * est.n_samples_ * est.n_features_in_
    return 8 * est.n_features_in_**2


def _worker(rank, world, port, threads, quick, repeats, queue):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    torch.set_num_threads(threads)
    import torch.distributed as dist

    import attribkit as ak
    from attribkit._compute import distributed as _distributed

    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=600),
        )
    X, y, ekfac_model, explicit_model = _problem(quick)
    cfg = ak.ComputeConfig(batch_size=256, progress=False)
    models = {"ekfac": ekfac_model, "explicit": explicit_model}
    out = {}
    for name, (make, which) in _estimators(cfg).items():
        model = models[which]
        n = int(SIZES[name] * X.shape[0])
        lo, hi = rank * n // world, (rank + 1) * n // world
        data = (X[lo:hi], y[lo:hi])
        times, sent = [], 0
        for _ in range(repeats):
            if world > 1:
                dist.barrier()
            before = _distributed.traffic()["bytes"]
            start = time.perf_counter()
            est = make().fit(model, data)
            elapsed = time.perf_counter() - start
            sent = _distributed.traffic()["bytes"] - before
            if world > 1:  # the slowest rank's time is the fit's time
                t = torch.tensor([elapsed], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                elapsed = float(t)
            times.append(elapsed)
        V = torch.randn(8, est.n_features_in_, generator=torch.Generator().manual_seed(1))
        out[name] = {
            "fit_s": statistics.median(times),
            "bytes": sent,
            "stat_bytes": _stat_bytes(name, est),
            "n": est.n_samples_,
            "label": f"{name} ({est.solver_})" if name == "ExplicitIFVP" else name,
            "T": est.transform(V).double().numpy(),  # numpy: no shared-memory handle
        }
    if rank == 0:
        queue.put(out)
    if world > 1:
        dist.destroy_process_group()


def _run(world: int, threads: int, quick: bool, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, threads, quick, repeats, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    while queue.empty() and any(p.is_alive() for p in procs):
        time.sleep(0.2)
    result = None if queue.empty() else queue.get()
    for p in procs:
        p.join(60)
    if result is None or any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    return result


def main():
    quick = "--quick" in sys.argv[1:]
    repeats = 1 if quick else 3
    runs = {
        ("1 process", 1): _run(1, 1, quick, repeats),
        ("1 process", 2): _run(1, 2, quick, repeats),
        ("2 processes", 1): _run(2, 1, quick, repeats),
    }
    rows = []
    for name in ("EKFACIFVP", "ExplicitIFVP"):
        single = runs[("1 process", 2)][name]
        one_thread = runs[("1 process", 1)][name]
        for (how, threads), res in runs.items():
            r = res[name]
            diff = abs(r["T"] - single["T"]).max() / abs(single["T"]).max()
            rows.append(
                {
                    "estimator": f"{r['label']} n={r['n']}",
                    "run": f"{how} x {threads} thread{'s' if threads > 1 else ''}",
                    "fit_s": r["fit_s"],
                    "ratio": single["fit_s"] / r["fit_s"],
                    "ratio1": one_thread["fit_s"] / r["fit_s"],
                    "mb": r["bytes"] / 2**20,
                    "stat_mb": r["stat_bytes"] / 2**20,
                    "bytes_ratio": r["bytes"] / r["stat_bytes"] if r["bytes"] else None,
                    "diff": float(diff),
                }
            )
    print_table(
        "Distributed fit, MLPs on n examples of 128 features (EKFACIFVP: 128-256-10, "
        "ExplicitIFVP: 128-14-10, p = 1956), float32, gloo on one 2-core machine shared "
        "with others (speed-up: 1 process x 2 threads time / this row's; vs 1 thread: 1 "
        "process x 1 thread time / this "
        "row's; MB sent: payload per rank per fit; x stats: MB sent / MB of the statistics; "
        "diff: max relative difference of transform from 1 process x 2 threads)",
        rows,
        [
            ("estimator", "estimator", ""),
            ("run", "run", ""),
            ("fit_s", "fit s", "{:.3f}"),
            ("ratio", "speed-up", "{:.2f}x"),
            ("ratio1", "vs 1 thread", "{:.2f}x"),
            ("mb", "MB sent", "{:.3f}"),
            ("stat_mb", "MB stats", "{:.3f}"),
            ("bytes_ratio", "x stats", "{:.3f}"),
            ("diff", "diff", "{:.1e}"),
        ],
    )


if __name__ == "__main__":
    main()
