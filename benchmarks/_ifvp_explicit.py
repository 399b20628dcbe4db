"""ExplicitIFVP against dattri 0.1.0's per-call dense solve.

dattri 0.1.0's ``ifvp_explicit`` answers every call with
``torch.linalg.solve(F + damping I, v.T)``: an LU factorisation of the
``p x p`` matrix per call (and, in the reference, the Fisher rebuilt from the
gradients per call too). ExplicitIFVP factorises once at fit and answers a
call with two triangular solves (dense form) or two thin products and an
``n x n`` Cholesky solve (kernel form).

Baselines, float32 like dattri with a float32 model: the per-call solve on
the prebuilt damped matrix (the issue's baseline; building it is reported as
its fit time) and the whole per-call work of the reference (build ``GᵀG/n +
damping I`` from the gradients, then solve). ExplicitIFVP runs with the
default float32 config (float32 in and out, float64 factor and solves).
``speedup`` = baseline (per-call solve) time / this row's transform time;
``peak_mb`` = peak resident-memory growth during one call (fit + transform
for ExplicitIFVP).

Run ``OMP_WAIT_POLICY=PASSIVE python benchmarks/_ifvp_explicit.py [--quick]``.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch
from _util import measure, print_table, set_threads

from attribkit import ComputeConfig, ExplicitIFVP

DAMPING = 0.1
CASES = {
    "full": [("dense", 5000, 2000, 100), ("kernel", 1000, 10000, 100)],
    "quick": [("dense", 1000, 400, 20), ("kernel", 200, 2000, 20)],
}


def rows(repeats: int = 3, quick: bool = False) -> list[dict]:
    """One row per (case, method): median fit and transform seconds, speed-up, peak MB."""
    set_threads(2)
    out = []
    for form, n, p, m in CASES["quick" if quick else "full"]:
        case = f"Explicit ({form} form), p={p:,} n={n:,} m={m}, float32"
        gen = torch.Generator().manual_seed(0)
        G = torch.randn(n, p, generator=gen)
        V = torch.randn(m, p, generator=gen)

        def build(G=G, n=n):
            A = G.T @ G / n
            A.diagonal().add_(DAMPING)
            return A

        build_s, _, A = measure(build, 1)
        solve_s, solve_mb, _ = measure(lambda A=A, V=V: torch.linalg.solve(A, V.T).T, repeats)
        A = None
        seed_s, seed_mb, _ = measure(lambda: torch.linalg.solve(build(), V.T).T, repeats)
        est = ExplicitIFVP(damping=DAMPING, config=ComputeConfig(progress=False))
        fit_s, fit_mb, _ = measure(lambda est=est, G=G: est.fit(G), repeats)
        ours_s, ours_mb, _ = measure(lambda est=est, V=V: est.transform(V), repeats)
        out += [
            dict(case=case, method="per-call torch.linalg.solve on prebuilt F + dI",
                 fit_s=build_s, transform_s=solve_s, speedup=1.0, peak_mb=solve_mb),
            dict(case=case, method="dattri 0.1.0 style per call: build F + dI, solve",
                 transform_s=seed_s, speedup=solve_s / seed_s, peak_mb=seed_mb),
            dict(case=case, method=f"ExplicitIFVP (solver_={est.solver_!r})", fit_s=fit_s,
                 transform_s=ours_s, speedup=solve_s / ours_s, peak_mb=max(fit_mb, ours_mb)),
        ]  # fmt: skip
    return out


COLUMNS = [
    ("method", "method", ""),
    ("fit_s", "fit s", "{:.3f}"),
    ("transform_s", "transform s", "{:.4f}"),
    ("speedup", "speed-up vs per-call solve", "{:.1f}x"),
    ("peak_mb", "peak MB", "{:.0f}"),
]

if __name__ == "__main__":
    table = rows(quick="--quick" in sys.argv[1:])
    print_table("ExplicitIFVP (2 threads)", table, [("case", "case", ""), *COLUMNS])
