"""DataInfIFVP.transform against the reference's per-example vmap and the matmul limit.

One layer of p = 50,000 parameters, n = 1,000 training gradients, m = 100
vectors, float32, ``torch.set_num_threads(2)``. Three methods:

* ``attribkit`` - ``DataInfIFVP(damping=λ).fit(G).transform(V)``, timing
  ``transform`` only (validation and container handling included);
* ``vmap (dattri 0.1.0)`` - dattri 0.1.0's formulation, reimplemented:
  for each vector ``v`` separately, ``torch.func.vmap`` over the training
  examples of ``(v − (vᵀg)/(λ + ‖g‖²) g) / λ`` (an ``(n, p)`` temporary per
  vector, norms recomputed per call), then the mean over examples;
* ``two-matmul limit`` - ``((V @ G.T) * c) @ G`` alone, with ``c``
  precomputed: the floor for any implementation of the closed form.

Each method runs in a fresh subprocess, so its peak memory is its own: after
the data and fitted state exist, ``_util.measure`` resets the process's
peak-RSS mark before each timed call, and ``peak_mb`` is the largest peak RSS
during a call minus the RSS just before it (the inputs, the stored gradients
and the fitted state are not counted; the output is). ``transform_s`` is the
median of ``repeats`` timed calls after one warm-up on two vectors.
``ratio_vs_vmap`` is the vmap time over this method's time (a speed-up;
target >= 10 for attribkit); ``ratio_vs_matmul_limit`` is this method's time
over the limit's (a slow-down; target <= 1.3 for attribkit). The three
results are checked to agree. ``rows(quick=True)`` shrinks the case
(p = 5,000, n = 200, m = 20) to check that everything runs.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/_ifvp_datainf.py [--quick]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.abspath(__file__)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np
import torch
from _util import measure, print_table, set_threads

SIZES = {"full": (1000, 50_000, 100), "quick": (200, 5_000, 20)}  # (n, p, m)
METHODS = ("attribkit", "vmap (dattri 0.1.0)", "two-matmul limit")


def _data(n, p, m):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(n, p, generator=g) * 0.01
    V = torch.randn(m, p, generator=g) * 0.01
    sq_norms = torch.linalg.vector_norm(G, dim=1, dtype=torch.float64).square()
    damping = 0.1 * float(sq_norms.mean()) / p  # the paper's automatic choice
    return G, V, sq_norms, damping


def _vmap_reference(G, damping):
    """The dattri 0.1.0 formulation: one vmap over the examples per vector."""
    from torch.func import vmap

    def single(v, g):
        coef = (v @ g) / (damping + torch.sum(g**2))
        return (v - coef * g) / damping

    def apply(V):
        rows = [vmap(lambda g, v=v: single(v, g))(G).mean(dim=0) for v in V]
        return torch.stack(rows)

    return apply


def _prepare(method, n, p, m):
    G, V, sq_norms, damping = _data(n, p, m)
    if method == "attribkit":
        from attribkit.config import ComputeConfig
        from attribkit.ifvp.datainf import DataInfIFVP

        est = DataInfIFVP(damping=damping, config=ComputeConfig(progress=False)).fit(G)
        del G  # the estimator keeps its own copy: hold one, as the others do
        return est.transform, V, lambda out: out
    if method == "vmap (dattri 0.1.0)":
        return _vmap_reference(G, damping), V, lambda out: out
    if method == "two-matmul limit":
        c = (1.0 / (n * (damping + sq_norms))).to(G.dtype)
        # Untimed completion to the full IFVP, only to check agreement.
        return (lambda V: ((V @ G.T) * c) @ G), V, lambda out: (V[:4] - out[:4]) / damping
    raise ValueError(f"unknown method {method!r}")


def _run_one(method, size, repeats, out_path):
    """Time one method in this (fresh) process; print a JSON line."""
    set_threads(2)
    fn, V, finish = _prepare(method, *SIZES[size])
    fn(V[:2])  # warm-up
    seconds, peak_mb, out = measure(lambda: fn(V), repeats)
    np.save(out_path, finish(out)[:4].double().numpy())
    print(json.dumps({"method": method, "transform_s": seconds, "peak_mb": peak_mb}))


def rows(repeats: int = 3, quick: bool = False) -> list[dict]:
    """Run the three methods, each in a fresh subprocess; one row per method."""
    size = "quick" if quick else "full"
    n, p, m = SIZES[size]
    case = f"DataInf, 1 layer, p={p:,} n={n:,} m={m}, float32"
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, method in enumerate(METHODS):
            path = os.path.join(tmp, f"{i}.npy")
            proc = subprocess.run(
                [sys.executable, SCRIPT, "--one", method, size, str(repeats), path],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark {method!r} failed:\n{proc.stderr}")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[method] = np.load(path)
    reference = outputs["vmap (dattri 0.1.0)"]
    for method, out in outputs.items():
        err = np.abs(out - reference).max() / np.abs(reference).max()
        if err > 1e-4:
            raise AssertionError(f"{method} disagrees with the reference: rel err {err:.2e}")
    vmap_s = results["vmap (dattri 0.1.0)"]["transform_s"]
    limit_s = results["two-matmul limit"]["transform_s"]
    return [
        {
            "case": case,
            "method": method,
            "transform_s": r["transform_s"],
            "ratio_vs_vmap": vmap_s / r["transform_s"],
            "ratio_vs_matmul_limit": r["transform_s"] / limit_s,
            "peak_mb": r["peak_mb"],
        }
        for method, r in results.items()
    ]


COLUMNS = [
    ("method", "method", ""),
    ("transform_s", "transform (s)", "{:.4f}"),
    ("ratio_vs_vmap", "speed-up vs vmap", "{:.1f}x"),
    ("ratio_vs_matmul_limit", "time / matmul limit", "{:.2f}"),
    ("peak_mb", "peak extra MB", "{:.1f}"),
]


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--one":
        _run_one(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        table = rows(quick="--quick" in sys.argv[1:])
        print_table(table[0]["case"] + " (2 threads)", table, COLUMNS)
