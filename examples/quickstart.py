"""Which training digits made the model say that, and can we trust the answer?
===========================================================================

The whole attribkit story on a real data set that ships with scikit-learn (the
UCI handwritten digits: 8x8 images, nothing is downloaded):

1. train two models to convergence with fixed seeds: a convex multinomial
   logistic regression ``nn.Linear(64, 10)`` and a small MLP 64-32-10 (tanh),
   both in float64 with full-batch L-BFGS on the mean cross entropy plus the
   weight decay ``1e-3 / 2 * ||theta||^2``;
2. fit every attribkit estimator (ExplicitIFVP with the expected and the
   empirical Fisher, EKFACIFVP, DataInfIFVP, ArnoldiProjector, RandomProjector
   + ExplicitIFVP as a TRAK-style projected method, IterativeIFVP's conjugate
   gradients on the exact Gauss-Newton matrix, plain and preconditioned by
   EK-FAC) and the plain gradient dot product, and score every training example
   for a set of test digits with ``ak.influence``;
3. show, for a handful of test digits (a misclassified one among them), the
   training digits that helped (proponents) and hurt (opponents) most;
4. check the scores against the ground truth of retraining, with
   ``attribkit.evaluation``: leave-one-out (LOO) retraining of the convex
   model for training points spanning the score range, and the linear
   datamodeling score (LDS) over random half-size subsets, for both models.
   Retraining is deterministic: L-BFGS warm-started from the trained optimum,
   run to a tight gradient tolerance (single-threaded, so the numbers do not
   depend on ``--workers``). It minimises the same *mean* loss over the
   remaining examples, so leaving one out also re-weights all others by
   ``n / (n - 1)``: a shift of each test loss common to all removals, which
   the per-test-digit correlations ignore and the LOO scatter shows as a band
   at small predicted effects;
5. print a results table and save three figures.

Damping: the trained objective is ``mean loss + lambda/2 ||theta||^2``, whose
curvature is ``H + lambda I``; so every curvature-based estimator gets
``damping = lambda = 1e-3`` (DataInfIFVP keeps its own ``"auto"`` damping: its
closed form is an approximation that needs a larger one).

Run ``make demo`` (or ``python examples/quickstart.py``; ``--quick`` for a
one-minute smoke run with fewer retrainings, ``--out DIR`` for the figures).
The full run takes a few minutes on 2 CPU cores; retraining runs in
``--workers`` processes (default: 2, or 1 on a single core).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import time
import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

import attribkit as ak
from attribkit.evaluation import lds, loo_correlation

LAMBDA = 1e-3  # the weight decay of both models, and the damping of the estimators
EXACT = "exact Hessian (H + λI)⁻¹"  # the limit: dense Hessian of the trained objective
CFG = ak.ComputeConfig(dtype="float64", batch_size=512)
CG = "IterativeIFVP(ggn)"
CG_EKFAC = "IterativeIFVP(ggn) + EK-FAC precond."
#: row name -> CG iterations (passes over the data) of an IterativeIFVP row, per model.
ITERATIONS: dict = {}


# ----------------------------------------------------------------------------- data
def load_data():
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    return X_train, X_test, y_train, y_test


def make_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "logistic":
        model = torch.nn.Linear(64, 10)
    else:
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
        )
    return model.double()


# ----------------------------------------------------------------------------- training
#: gradient tolerance (max abs entry) of each model's L-BFGS: tight for the convex
#: model, whose LOO effects are ~1e-4; the MLP's subset effects are far larger.
TOLERANCE = {"logistic": 1e-10, "mlp": 1e-6}


def objective(model, X, y):
    decay = sum(p.square().sum() for p in model.parameters())
    return F.cross_entropy(model(X), y) + LAMBDA / 2 * decay


def lbfgs(model, X, y, tol, max_iter=20000) -> int:
    """Full-batch L-BFGS with a strong-Wolfe line search; deterministic."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = objective(model, X, y)
        value.backward()
        return value

    opt.step(closure)
    for p in model.parameters():
        p.grad = None
    return int(opt.state[opt._params[0]]["n_iter"])


def test_losses(model, X, y) -> np.ndarray:
    with torch.no_grad():
        return F.cross_entropy(model(X), y, reduction="none").numpy()


# Retraining jobs run in forked worker processes; they read this dict.
_JOBS: dict = {}


def _retrain(task):
    kind, keep = task
    job = _JOBS[kind]
    model = copy.deepcopy(job["model"])  # warm start from the trained optimum
    lbfgs(model, job["X"][keep], job["y"][keep], TOLERANCE[kind])
    return test_losses(model, job["X_eval"], job["y_eval"])


def _init_worker():
    torch.set_num_threads(1)


def retrain_all(kind, masks, workers, desc) -> np.ndarray:
    """Test losses ``(len(masks), n_eval)`` of the model retrained on each mask.

    Every retraining runs single-threaded, in ``workers`` processes or in this
    one, so the numbers do not depend on ``workers``.
    """
    tasks = [(kind, torch.as_tensor(m)) for m in masks]
    bar = dict(total=len(tasks), desc=desc, disable=None, leave=False)
    if workers <= 1 or "fork" not in mp.get_all_start_methods():  # Windows: one process
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return np.stack([_retrain(t) for t in tqdm(tasks, **bar)])
        finally:
            torch.set_num_threads(threads)
    with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
        return np.stack(list(tqdm(pool.imap(_retrain, tasks), **bar)))


# ----------------------------------------------------------------------------- exact limit
def dense_hessian(model, X, y) -> torch.Tensor:
    """Hessian of the mean cross entropy in the flat parameters (torch.func HVPs)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(t):
        parts = torch.split(t, [s.numel() for s in shapes])
        params = {n: q.reshape(s) for n, q, s in zip(names, parts, shapes)}
        return F.cross_entropy(functional_call(model, params, (X,)), y)

    def hvp(v):
        return jvp(grad(loss), (theta,), (v,))[1]

    eye = torch.eye(len(theta), dtype=theta.dtype)
    return torch.cat([vmap(hvp)(eye[s : s + 128]) for s in range(0, len(theta), 128)])


# ----------------------------------------------------------------------------- methods
def attribution_methods():
    """name -> function(model, train, G_train, G_test) -> scores (n_test, n_train)."""

    def exact_hessian(model, train, G, G_test):
        H = dense_hessian(model, *train)
        H.diagonal().add_(LAMBDA)
        return G_test @ torch.linalg.solve(H, G.T)

    def explicit(fisher):
        def run(model, train, G, G_test):
            ifvp = ak.ExplicitIFVP(damping=LAMBDA, fisher=fisher, config=CFG).fit(model, train)
            return ak.influence(ifvp, G, G_test)

        return run

    def ekfac(model, train, G, G_test):
        ifvp = ak.EKFACIFVP(damping=LAMBDA, fisher="expected", config=CFG).fit(model, train)
        return ak.influence(ifvp, G, G_test)

    def datainf(model, train, G, G_test):
        ifvp = ak.DataInfIFVP(config=CFG).fit(model, train)  # damping="auto"
        return ak.influence(ifvp, G, G_test)

    def arnoldi(model, train, G, G_test):
        p = G.shape[1]
        k = min(200, p // 2)
        proj = ak.ArnoldiProjector(proj_dim=k, max_iter=2 * k, damping=LAMBDA, config=CFG)
        with warnings.catch_warnings():  # the MLP's few negative directions are dropped
            warnings.simplefilter("ignore", UserWarning)
            proj.fit(model, train)
        return proj.transform(G_test) @ proj.transform(G).T

    def projected(model, train, G, G_test):
        pipe = Pipeline(
            [
                ("project", ak.RandomProjector(proj_dim=512, config=CFG)),
                ("ifvp", ak.ExplicitIFVP(damping=LAMBDA, config=CFG)),
            ]
        ).fit(G)
        return ak.influence(pipe, G, G_test)

    def iterative(name, preconditioner):
        def run(model, train, G, G_test):
            cg = ak.IterativeIFVP(
                damping=LAMBDA, preconditioner=preconditioner, max_iter=300, config=CFG
            )
            X, info = cg.fit(model, train).solve(G_test)
            ITERATIONS.setdefault(name, []).append(int(info["n_iter"].max()))
            return X @ G.T  # what ak.influence(cg, G, G_test) computes

        return run

    def dot(model, train, G, G_test):
        return G_test @ G.T

    return OrderedDict(
        [
            (EXACT, exact_hessian),
            ('ExplicitIFVP fisher="expected"', explicit("expected")),
            ('ExplicitIFVP fisher="empirical"', explicit("empirical")),
            ('EKFACIFVP fisher="expected"', ekfac),
            ("DataInfIFVP", datainf),
            ("ArnoldiProjector(k=200)", arnoldi),
            ("RandomProjector(512) + ExplicitIFVP", projected),
            (CG, iterative(CG, None)),
            # A preconditioner damps more than the curvature it preconditions: with
            # damping=LAMBDA, EK-FAC's underestimated directions are amplified 1000x and
            # CG on the MLP needs more passes than without it (benchmarks/bench_iterative.py).
            (CG_EKFAC, iterative(CG_EKFAC, ak.EKFACIFVP(damping=0.1, fisher="expected"))),
            ("gradient dot product", dot),
        ]
    )


def score_all(kind, model, train, test, progress, skip=()):
    """Scores of every method (but those in ``skip``), its wall time, the gradients.

    The IterativeIFVP rows also record their iterations (the passes over the
    training data their solve took) in ``ITERATIONS``.
    """
    t0 = time.perf_counter()
    G = ak.per_example_gradients(model, train, config=CFG)
    G_test = ak.per_example_gradients(model, test, config=CFG)
    grad_time = time.perf_counter() - t0
    scores, times = OrderedDict(), OrderedDict()
    methods = OrderedDict((k, v) for k, v in attribution_methods().items() if k not in skip)
    for name, run in tqdm(methods.items(), desc=f"{kind}: fit estimators", disable=progress):
        t0 = time.perf_counter()
        s = run(model, train, G, G_test)
        times[name] = time.perf_counter() - t0
        scores[name] = np.asarray(torch.as_tensor(s, dtype=torch.float64))
    return scores, times, G, grad_time


# ----------------------------------------------------------------------------- figures
def figure_examples(path, X_train, y_train, X_show, y_show, pred_show, top, bottom, method):
    import matplotlib.pyplot as plt

    top_v, top_i = top
    bot_v, bot_i = bottom
    rows, k = len(X_show), top_i.shape[1]
    ratios = [1, 0.35] + [1] * k + [0.35] + [1] * k
    fig, axes = plt.subplots(
        rows,
        len(ratios),
        figsize=(1.05 * sum(ratios), 1.45 * rows + 0.7),
        gridspec_kw={"width_ratios": ratios, "wspace": 0.08, "hspace": 0.75},
    )
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=1 - 0.95 / (1.45 * rows + 0.7))
    for r in range(rows):
        for ax in axes[r]:
            ax.set_axis_off()
        ax = axes[r, 0]
        ax.imshow(X_show[r].reshape(8, 8), cmap="gray_r")
        right = int(pred_show[r]) == int(y_show[r])
        ax.set_title(
            f"test {int(y_show[r])}\npredicted {int(pred_show[r])}",
            fontsize=8,
            color="black" if right else "red",
            fontweight="bold",
        )
        for j in range(k):
            for col, values, index, colour in (
                (2 + j, top_v, top_i, "tab:green"),
                (k + 3 + j, bot_v, bot_i, "tab:red"),
            ):
                i = int(index[r, j])
                ax = axes[r, col]
                ax.imshow(X_train[i].reshape(8, 8), cmap="gray_r")
                ax.set_title(
                    f"#{i}: {int(y_train[i])}\n{float(values[r, j]):+.3g}",
                    fontsize=7,
                    color=colour,
                )
    top_edge = axes[0, 2].get_position().y1
    for col, text, colour in (
        (2, "top proponents (training label, score)", "tab:green"),
        (k + 3, "top opponents (training label, score)", "tab:red"),
    ):
        fig.text(axes[0, col].get_position().x0, top_edge + 0.06, text, fontsize=9, color=colour)
    fig.suptitle(
        f"Influence on the test loss (at the true label), logistic model, {method}",
        fontsize=10,
        y=0.995,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_loo(path, scores, removed, changes, rho, r_pearson, n_train):
    import matplotlib.pyplot as plt

    names = list(scores)
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows))
    axes = np.atleast_2d(axes)
    actual = changes.T  # (n_test, n_removed)
    # Effects span five decades and both signs: symmetric-log axes, linear near 0.
    linthresh = 10.0 ** np.floor(np.log10(np.quantile(np.abs(actual), 0.2)))
    from matplotlib.ticker import SymmetricalLogLocator

    colours = plt.get_cmap("tab20")(np.arange(actual.shape[0]) % 20)
    for ax, name in zip(axes.flat, names):
        predicted = scores[name][:, removed] / n_train
        for t in range(actual.shape[0]):
            ax.scatter(predicted[t], actual[t], s=4, alpha=0.6, color=colours[t], lw=0)
        lo = min(predicted.min(), actual.min())
        hi = max(predicted.max(), actual.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        for axis, set_scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale)):
            set_scale("symlog", linthresh=linthresh)
            axis.set_major_locator(SymmetricalLogLocator(linthresh=linthresh, base=100))
        ax.axhline(0, color="0.8", lw=0.5, zorder=0)
        ax.axvline(0, color="0.8", lw=0.5, zorder=0)
        ax.set_title(
            f"{name}\nSpearman {np.nanmean(rho[name]):.3f}, "
            f"Pearson {np.nanmean(r_pearson[name]):.3f}",
            fontsize=8,
        )
        ax.set_xlabel("predicted: score / n_train", fontsize=8)
        ax.set_ylabel("actual LOO change of test loss", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_axis_off()
    fig.suptitle(
        f"Leave-one-out retraining of the logistic model: {changes.shape[0]} removed training "
        f"points x {changes.shape[1]} test digits (one colour per test digit; symmetric log "
        "axes; dashed: y = x; titles: means over test digits)\nThe band near -1e-4 at small "
        "predicted effects: retraining on the n - 1 others re-weights each by n / (n - 1), a "
        "shift common to all removals for a test digit, which its correlation ignores",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_lds(path, rho, lds_values):
    import matplotlib.pyplot as plt

    names = list(rho)
    ypos = np.arange(len(names))[::-1]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.6), sharey=True)
    a1.barh(ypos, [np.nanmean(rho[n]) for n in names], color="tab:blue", alpha=0.6)
    for y0, n in zip(ypos, names):
        a1.scatter(rho[n], np.full(len(rho[n]), y0), s=4, color="k", alpha=0.4)
    a1.set_yticks(ypos, names, fontsize=8)
    a1.set_xlim(-0.5, 1.0)
    a1.axvline(0, color="0.6", lw=0.6)
    a1.set_title("LOO Spearman, logistic model (bar: mean; dots: test digits)", fontsize=9)
    width = 0.38
    for offset, (model_name, per_method) in zip((width / 2, -width / 2), lds_values.items()):
        values = [np.nanmean(per_method[n]) if n in per_method else np.nan for n in names]
        a2.barh(ypos + offset, values, height=width, label=model_name)
        for y0, v in zip(ypos + offset, values):
            label = "not run" if np.isnan(v) else f"{v:.2f}"
            a2.text(0.01 if np.isnan(v) else max(v, 0) + 0.01, y0, label, va="center", fontsize=7)
    a2.set_xlim(-0.2, 1.1)
    a2.axvline(0, color="0.6", lw=0.6)
    a2.legend(fontsize=8, loc="lower right")
    a2.set_title("LDS per method (mean over test digits)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer retrainings (~1 minute)")
    parser.add_argument("--out", default="quickstart_figures", help="folder for the figures")
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="retraining processes"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    n_eval, n_loo, n_subsets, n_mlp_subsets = (20, 20, 20, 6) if args.quick else (50, 40, 50, 50)
    quiet = None  # progress bars when stderr is a terminal

    X_train, X_test, y_train, y_test = load_data()
    n_train = len(y_train)
    train = (X_train, y_train)

    # ---------------------------------------------------------------- 1. train
    models, accuracy = {}, {}
    for kind in ("logistic", "mlp"):
        t0 = time.perf_counter()
        model = make_model(kind)
        iters = lbfgs(model, X_train, y_train, TOLERANCE[kind])
        with torch.no_grad():
            pred = model(X_test).argmax(1)
        accuracy[kind] = float((pred == y_test).double().mean())
        models[kind] = model
        print(
            f"trained the {kind} model ({sum(p.numel() for p in model.parameters())} params): "
            f"{iters} L-BFGS iterations, {time.perf_counter() - t0:.1f} s, test accuracy "
            f"{accuracy[kind]:.3f}"
        )

    # Test digits to evaluate: a handful to show (3 right, 1 misclassified by the
    # logistic model, 1 misclassified by the MLP when it differs), then the first others.
    with torch.no_grad():
        pred_lr = models["logistic"](X_test).argmax(1)
        pred_mlp = models["mlp"](X_test).argmax(1)
    right = torch.nonzero((pred_lr == y_test) & (pred_mlp == y_test)).ravel()
    wrong = torch.nonzero(pred_lr != y_test).ravel()
    show = [int(i) for i in right[:3]] + [int(wrong[0])]
    wrong_mlp = [int(i) for i in torch.nonzero(pred_mlp != y_test).ravel() if int(i) not in show]
    if wrong_mlp:
        show.append(wrong_mlp[0])
    rest = [i for i in range(len(y_test)) if i not in show]
    eval_idx = np.array(show + rest[: n_eval - len(show)])
    test = (X_test[eval_idx], y_test[eval_idx])
    print(
        f"digits: {n_train} training / {len(y_test)} test images; evaluating {n_eval} test "
        f"digits, showing {len(show)} (misclassified by the logistic model: test #{show[3]})"
    )

    # ---------------------------------------------------------------- 2. scores
    all_scores, all_times = {}, {}
    for kind, model in models.items():
        # The MLP's dense Hessian (2,410 x 2,410 by HVPs) is left out of the quick run.
        skip = [EXACT] if args.quick and kind == "mlp" else []
        scores, times, _, grad_time = score_all(kind, model, train, test, quiet, skip)
        all_scores[kind], all_times[kind] = scores, times
        print(
            f"{kind}: per-example gradients of all examples in {grad_time:.1f} s; methods fitted"
        )

    # ---------------------------------------------------------------- 3. explain predictions
    best = 'ExplicitIFVP fisher="expected"'
    lr = models["logistic"]
    ifvp = ak.ExplicitIFVP(damping=LAMBDA, fisher="expected", config=CFG).fit(lr, train)
    G_train = ak.per_example_gradients(lr, train, config=CFG)
    G_show = ak.per_example_gradients(lr, (X_test[show], y_test[show]), config=CFG)
    top_v, top_i, bot_v, bot_i = ak.influence(ifvp, G_train, G_show, top_k=5)
    print(f"\nmost influential training digits ({best}, logistic model):")
    for r, t in enumerate(show):
        pro = ", ".join(
            f"#{int(i)} ({int(y_train[i])}) {float(v):+.2f}"
            for v, i in zip(top_v[r, :3], top_i[r, :3])
        )
        opp = ", ".join(
            f"#{int(i)} ({int(y_train[i])}) {float(v):+.2f}"
            for v, i in zip(bot_v[r, :3], bot_i[r, :3])
        )
        print(f"  test #{t} (label {int(y_test[t])}, predicted {int(pred_lr[t])})")
        print(f"    proponents: {pro}")
        print(f"    opponents:  {opp}")

    # ---------------------------------------------------------------- 4. ground truth
    # LOO: training points spanning the range of the exact scores (evenly spaced
    # ranks of their mean absolute exact score over the evaluated test digits).
    limit = all_scores["logistic"][EXACT]
    order = np.argsort(-np.abs(limit).mean(0))
    removed = order[np.unique(np.linspace(0, n_train - 1, n_loo).round().astype(int))]
    _JOBS.update(
        {
            kind: {"model": m, "X": X_train, "y": y_train, "X_eval": test[0], "y_eval": test[1]}
            for kind, m in models.items()
        }
    )
    base = {kind: test_losses(m, *test) for kind, m in models.items()}
    masks = []
    for i in removed:
        keep = np.ones(n_train, dtype=bool)
        keep[i] = False
        masks.append(keep)
    t0 = time.perf_counter()
    loo_losses = retrain_all("logistic", masks, args.workers, "LOO retraining (logistic)")
    loss_changes = loo_losses - base["logistic"]
    print(
        f"\nLOO: retrained the logistic model {len(removed)} times in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    rng = np.random.default_rng(0)
    subsets = np.stack([rng.permutation(n_train) < n_train // 2 for _ in range(n_subsets)])
    outputs = {}
    for kind, count in (("logistic", n_subsets), ("mlp", n_mlp_subsets)):
        t0 = time.perf_counter()
        losses = retrain_all(kind, subsets[:count], args.workers, f"LDS retraining ({kind})")
        outputs[kind] = -losses  # higher = better for the test digit
        print(
            f"LDS: retrained the {kind} model on {count} half-size subsets in "
            f"{time.perf_counter() - t0:.1f} s"
        )

    # ---------------------------------------------------------------- 5. results
    rho, r_pearson, lds_values = {}, {}, {"logistic": {}, "mlp": {}}
    for name in all_scores["logistic"]:
        s = all_scores["logistic"][name]
        rho[name] = loo_correlation(s, removed, loss_changes)
        r_pearson[name] = loo_correlation(s, removed, loss_changes, method="pearson")
        for kind, count in (("logistic", n_subsets), ("mlp", n_mlp_subsets)):
            if name in all_scores[kind]:
                lds_values[kind][name] = lds(
                    all_scores[kind][name], subsets[:count], outputs[kind]
                )

    header = (
        f"{'method':38s} {'LOO Pearson':>11s} {'LOO Spearman':>12s} {'LDS':>6s} "
        f"{'LDS MLP':>8s} {'time (s)':>9s} {'time MLP':>9s} {'CG iters':>9s}"
    )
    print(
        f"\nResults: means over {n_eval} test digits; LOO over {len(removed)} removed "
        f"training points (logistic model); LDS over {n_subsets} (logistic) and "
        f"{n_mlp_subsets} (MLP) half-size subsets; time = fit + scores; CG iters = passes "
        "over the training data of IterativeIFVP's solve to relative residual 1e-6 "
        "(logistic / MLP)"
    )
    print(header)
    print("-" * len(header))
    for name in rho:
        mlp_lds = (
            f"{np.nanmean(lds_values['mlp'][name]):8.3f}"
            if name in all_scores["mlp"]
            else (f"{'-':>8s}")
        )
        mlp_time = f"{all_times['mlp'][name]:9.2f}" if name in all_times["mlp"] else f"{'-':>9s}"
        iters = " / ".join(str(n) for n in ITERATIONS[name]) if name in ITERATIONS else "-"
        print(
            f"{name:38s} {np.nanmean(r_pearson[name]):11.3f} {np.nanmean(rho[name]):12.3f} "
            f"{np.nanmean(lds_values['logistic'][name]):6.3f} {mlp_lds} "
            f"{all_times['logistic'][name]:9.2f} {mlp_time} {iters:>9s}"
        )

    # ---------------------------------------------------------------- 6. figures
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, f) for f in ("influence.png", "loo.png", "lds.png")]
    figure_examples(
        paths[0],
        X_train,
        y_train,
        X_test[show],
        y_test[show],
        pred_lr[show],
        (top_v, top_i),
        (bot_v, bot_i),
        best,
    )
    figure_loo(paths[1], all_scores["logistic"], removed, loss_changes, rho, r_pearson, n_train)
    figure_lds(
        paths[2],
        rho,
        {"logistic regression": lds_values["logistic"], "MLP 64-32-10": lds_values["mlp"]},
    )
    print("\nfigures:")
    for p in paths:
        print(f"  {os.path.abspath(p)}")
    print(f"total time {time.perf_counter() - start:.0f} s")

    exact_rho = float(np.nanmean(rho[best]))
    assert exact_rho > 0.9, f"{best} LOO Spearman {exact_rho:.3f} <= 0.9"
    return {"loo_spearman": rho, "loo_pearson": r_pearson, "lds": lds_values, "times": all_times}


if __name__ == "__main__":
    main()
