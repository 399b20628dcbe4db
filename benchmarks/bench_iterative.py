"""IterativeIFVP: iterations and time to relative residual 1e-6, with and without EK-FAC.

Conjugate gradients on the exact Gauss-Newton matrix plus ``damping = 1e-3`` (the
weight decay), solving for a block of test gradients; each iteration is one pass
over the training data. Cases (CPU, 2 threads, digits from scikit-learn):

* ``mlp``: the demo's MLP 64-32-10 (tanh, float64, p = 2,410), trained as
  ``examples/quickstart.py`` trains it (L-BFGS on the mean cross entropy plus
  ``1e-3/2 ||theta||^2``), 1,347 training digits, 50 test gradients;
* ``large``: an MLP 64-256-256-10 (tanh, float32, p = 85,002), trained with
  Adam on the same objective; ExplicitIFVP's float64 ``p x p`` Fisher and
  factor would need ``16 p^2`` = 115 GB, far beyond the 2 GiB default budget
  (its kernel form, ``n C = 13,470`` pseudo-gradients of ``fisher="expected"``,
  ``8 n C p + 16 (n C)^2`` = 12 GB); 10 test gradients;
* ``issue``: the setup of issue 19's measurement, the digits softmax
  regression ``Linear(64, 10)`` (float64) on the first 600 training digits,
  tol 1e-8, 50 test gradients.

Methods: plain CG, and CG preconditioned by ``EKFACIFVP(fisher="expected")``
with the same damping (1e-3) and with 100 times it (0.1). ``iters``: passes
over the data of the solve (the most any row needed; the median row's in
brackets); ``fit s``: the fit (the EK-FAC fit, the probe pass); ``solve s``:
the solve; ``x epoch``: solve time / one forward+backward epoch of the same
model on the same data and batches (mean loss, parameter gradients, as in
training), in wall-clock time and in this process's CPU time (``x epoch
CPU``: less sensitive to other jobs on a shared machine); ``CPU x epoch / row
/ iter``: the CPU ratio per test gradient and iteration, the cost of one
row's curvature-vector product in epochs. Repetitions are interleaved:
epochs, then each method followed by epochs; a ratio uses the mean of the
epoch times (each the median of 5 epochs) just before and after the solve;
medians over repetitions.
The machine is shared and noisy: read the ratios and iteration counts (exact,
the same every run), not the seconds.

Run ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_iterative.py [--quick]``
(``make bench``; ``--quick``: one repetition, the ``large`` case on 4 rows).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE, os.path.join(ROOT, "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np
import torch
import torch.nn.functional as F
from _util import print_table, set_threads
from sklearn.exceptions import ConvergenceWarning
from torch import nn

import attribkit as ak

LAMBDA = 1e-3
BATCH = 512


def digits():
    import quickstart

    return quickstart.load_data()


def case_mlp(rows: int):
    import quickstart

    X_train, X_test, y_train, y_test = digits()
    model = quickstart.make_model("mlp")
    quickstart.lbfgs(model, X_train, y_train, quickstart.TOLERANCE["mlp"])
    cfg = ak.ComputeConfig(dtype="float64", batch_size=BATCH, progress=False)
    return model, (X_train, y_train), (X_test[:rows], y_test[:rows]), cfg, 1e-6


def case_large(rows: int):
    X_train, X_test, y_train, y_test = digits()
    X_train, X_test = X_train.float(), X_test.float()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):  # full batch: a well-fitted network, as influence assumes
        opt.zero_grad()
        decay = sum(p.square().sum() for p in model.parameters())
        (F.cross_entropy(model(X_train), y_train) + LAMBDA / 2 * decay).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    cfg = ak.ComputeConfig(batch_size=BATCH, progress=False)
    return model, (X_train, y_train), (X_test[:rows], y_test[:rows]), cfg, 1e-6


def case_issue(rows: int):
    import quickstart

    X_train, X_test, y_train, y_test = digits()
    X_train, y_train = X_train[:600], y_train[:600]
    model = quickstart.make_model("logistic")
    quickstart.lbfgs(model, X_train, y_train, quickstart.TOLERANCE["logistic"])
    cfg = ak.ComputeConfig(dtype="float64", batch_size=BATCH, progress=False)
    return model, (X_train, y_train), (X_test[:rows], y_test[:rows]), cfg, 1e-8


def epoch(model, data):
    X, y = data
    for s in range(0, len(X), BATCH):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(X[s : s + BATCH]), y[s : s + BATCH]).backward()
    model.zero_grad(set_to_none=True)


def timed(fn):
    """``((wall s, process CPU s), fn())``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def epoch_time(model, data, repeats=5):
    """Median wall and CPU time of a few epochs: an epoch takes milliseconds, a solve seconds."""
    samples = [timed(lambda: epoch(model, data))[0] for _ in range(repeats)]
    return tuple(statistics.median(t[i] for t in samples) for i in range(2))


METHODS = {
    "CG": None,
    "CG + EK-FAC (damping 1e-3)": LAMBDA,
    "CG + EK-FAC (damping 0.1)": 0.1,
}


def run_case(name, make, rows, repeats):
    model, train, test, cfg, tol = make(rows)
    p = sum(q.numel() for q in model.parameters())
    V = ak.per_example_gradients(model, test, config=cfg)
    case = f"{name}: p={p:,} n={len(train[0]):,} m={rows} tol={tol:g}"
    print(case, flush=True)
    samples = {m: {"fit": [], "solve": [], "ratio": [], "cpu": []} for m in METHODS}
    iters = {}
    epoch(model, train)  # warm-up
    for _ in range(repeats):
        before = epoch_time(model, train)
        for method, pre_damping in METHODS.items():
            pre = None
            if pre_damping is not None:
                pre = ak.EKFACIFVP(damping=pre_damping, fisher="expected")
            est = ak.IterativeIFVP(
                damping=LAMBDA, preconditioner=pre, max_iter=2000, tol=tol, config=cfg
            )
            fit_s, _ = timed(lambda: est.fit(model, train))
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConvergenceWarning)
                solve_s, (_, info) = timed(lambda: est.solve(V))
            after = epoch_time(model, train)
            samples[method]["fit"].append(fit_s[0])
            samples[method]["solve"].append(solve_s[0])
            for k, key in enumerate(("ratio", "cpu")):
                samples[method][key].append(solve_s[k] / ((before[k] + after[k]) / 2))
            iters[method] = (int(info["n_iter"].max()), int(np.median(info["n_iter"])))
            before = after
    out = []
    for method, s in samples.items():
        ratio, cpu = statistics.median(s["ratio"]), statistics.median(s["cpu"])
        most, median = iters[method]
        out.append(
            {
                "case": case,
                "method": method,
                "iters": f"{most} ({median})",
                "fit_s": statistics.median(s["fit"]),
                "solve_s": statistics.median(s["solve"]),
                "x_epoch": ratio,
                "x_epoch_cpu": cpu,
                "x_epoch_row_iter": cpu / rows / most,
            }
        )
        case = ""
    return out


def main():
    quick = "--quick" in sys.argv[1:]
    set_threads(2)
    repeats = 1 if quick else 3
    rows = []
    rows += run_case("issue", case_issue, 50, repeats)
    rows += run_case("mlp", case_mlp, 50, repeats)
    rows += run_case("large", case_large, 4 if quick else 10, repeats)
    print_table(
        "IterativeIFVP, CPU, 2 threads: conjugate gradients on the exact Gauss-Newton matrix + "
        "1e-3 I (iters: passes over the data, most rows (median row); x epoch: solve time / "
        "one forward+backward epoch, wall and CPU; medians of interleaved repetitions)",
        rows,
        [
            ("case", "case", ""),
            ("method", "method", ""),
            ("iters", "iters", ""),
            ("fit_s", "fit s", "{:.2f}"),
            ("solve_s", "solve s", "{:.2f}"),
            ("x_epoch", "x epoch", "{:.0f}"),
            ("x_epoch_cpu", "x epoch CPU", "{:.0f}"),
            ("x_epoch_row_iter", "CPU x epoch / row / iter", "{:.2f}"),
        ],
    )


if __name__ == "__main__":
    main()
