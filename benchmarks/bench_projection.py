"""RandomProjector against the matmul limit, scikit-learn and dattri on the CPU.

For n = 256 rows, p in {1e5, 1e6} features and proj_dim in {512, 2048}
(float32, 2 threads) one table, measured side by side in one run: time
(median of several runs), ratio to the matmul limit (one ``torch.matmul`` of
the same X with a precomputed (p, proj_dim) matrix), peak extra resident
memory and the measured distortion of squared norms, max_i |‖Px_i‖²/‖x_i‖² - 1|.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_projection.py [--quick]``.
``--quick`` uses p in {1e4, 1e5} to check that everything runs.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics

import torch
from _util import measure, print_table, set_threads

import attribkit as ak

N = 256


def distortion(X: torch.Tensor, P) -> float:
    P = torch.as_tensor(P).double()
    ratio = P.pow(2).sum(1) / X.double().pow(2).sum(1)
    return float((ratio - 1).abs().max())


def limit(X, k, repeats, samples):
    """Time ``X @ M`` with the (p, k) matrix M precomputed (untimed) and freed after."""
    M = ak.RandomProjector(k, proj_type="normal").fit(X)._get_engine().matrix()
    _, mem, P = measure(lambda: X @ M, repeats, times=samples)
    M = None
    gc.collect()
    return mem, distortion(X, P)


def projector_rows(X, k, repeats):
    rows = []
    for proj_type, sparsity in (("rademacher", 1), ("normal", 1), ("sjlt", 1), ("sjlt", 4)):
        label = proj_type if proj_type != "sjlt" else f"sjlt (s={sparsity})"
        make = lambda: ak.RandomProjector(k, proj_type=proj_type, sparsity=sparsity, seed=1)  # noqa: E731
        t_first, m_first, P = measure(lambda: make().fit(X).transform(X), repeats)
        proj = make().fit(X)
        proj.transform(X)  # warm: builds the cache when the matrix fits the budget
        t_steady, m_steady, P = measure(lambda: proj.transform(X), repeats)
        proj = None
        rows.append(dict(method=f"attribkit {label}, first call", time=t_first, mem=m_first))
        rows.append(
            dict(
                method=f"attribkit {label}, steady",
                time=t_steady,
                mem=m_steady,
                dist=distortion(X, P),
            )
        )
        gc.collect()
    return rows


def sklearn_rows(X, k, repeats, mem_cap):
    from sklearn.random_projection import GaussianRandomProjection, SparseRandomProjection

    rows = []
    Xn = X.numpy()
    p = X.shape[1]
    if p * k * 8 <= mem_cap:  # sklearn's Gaussian matrix is dense float64
        t, m, P = measure(
            lambda: GaussianRandomProjection(k, random_state=0).fit(Xn).transform(Xn), repeats
        )
        rows.append(
            dict(method="sklearn Gaussian (fit+transform)", time=t, mem=m, dist=distortion(X, P))
        )
    else:
        rows.append(
            dict(method=f"sklearn Gaussian: skipped, needs {p * k * 8 / 2**30:.0f} GiB", time=None)
        )
    t, m, P = measure(
        lambda: SparseRandomProjection(k, random_state=0, dense_output=True).fit(Xn).transform(Xn),
        repeats,
    )
    rows.append(
        dict(method="sklearn Sparse (fit+transform)", time=t, mem=m, dist=distortion(X, P))
    )
    return rows


def dattri_rows(X, k):
    try:
        from dattri.func.projection import BasicProjector, ProjectionType, random_project
    except Exception as exc:  # any import failure means "not installed"
        return [dict(method=f"dattri: not installed ({type(exc).__name__})", time=None)]
    rows = []
    # random_project on the CPU always uses a normal matrix (float32 here).
    fn = lambda: random_project(X, N, k, 32, "cpu", 0, use_half_precision=False)(X)  # noqa: E731
    t, m, P = measure(fn, 1)
    rows.append(
        dict(
            method="dattri random_project (normal)",
            time=t,
            mem=m,
            dist=distortion(X, P / math.sqrt(k)),
        )
    )
    proj = lambda: BasicProjector(  # noqa: E731
        X.shape[1], k, 0, ProjectionType.rademacher, "cpu", dtype=torch.float32
    ).project(X, 0)
    t, m, P = measure(proj, 1)
    rows.append(
        dict(
            method="dattri BasicProjector (rademacher)",
            time=t,
            mem=m,
            dist=distortion(X, P / math.sqrt(k)),
        )
    )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small p, to check it runs")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    set_threads(2)
    sizes = [10_000, 100_000] if args.quick else [100_000, 1_000_000]
    dims = [512, 2048]
    mem_cap = 6 * 2**30
    for p in sizes:
        g = torch.Generator().manual_seed(0)
        X = torch.randn(N, p, generator=g)
        for k in dims:
            # The matmul limit, timed before and after the others with the
            # samples pooled: a slow spell on a shared machine skews ratios less.
            samples = []
            m_lim, d_lim = limit(X, k, args.repeats, samples)
            rows = [dict(method="limit: X @ M (M precomputed)", mem=m_lim, dist=d_lim)]
            rows += projector_rows(X, k, args.repeats)
            rows += sklearn_rows(X, k, args.repeats, mem_cap)
            rows += dattri_rows(X, k)
            limit(X, k, args.repeats, samples)
            t_lim = rows[0]["time"] = statistics.median(samples)
            for row in rows:
                if row.get("time") is not None:
                    row["ratio"] = row["time"] / t_lim
            matrix_gb = p * k * 4 / 2**30
            print_table(
                f"n={N}, p={p:,}, proj_dim={k}, float32, 2 threads "
                f"(matrix {matrix_gb:.2f} GiB; cache budget 2 GiB)",
                rows,
                [
                    ("method", "method", ""),
                    ("time", "median s", "{:.3f}"),
                    ("ratio", "x limit", "{:.2f}"),
                    ("mem", "peak MB", "{:.0f}"),
                    ("dist", "max |ratio-1|", "{:.3f}"),
                ],
            )
        X = None
        gc.collect()


if __name__ == "__main__":
    main()
