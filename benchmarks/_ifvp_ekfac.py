"""EKFACIFVP on an MLP 784-512-256-10 against one training epoch, kronfluence and dattri.

Measured side by side in one run, CPU, 2 threads, float32, synthetic data
(10,000 examples; ``--quick``: 1,000), batches of 128 everywhere:

* the floor: one forward+backward epoch over the same data (sum of the
  per-example cross-entropies, parameter gradients as in training);
* ``EKFACIFVP(damping="auto")`` fit (both passes and the float64
  eigendecompositions) and ``transform`` of 100 per-example gradients (one
  flat ``(100, p)`` tensor; a dict input adds the base class's conversion, a
  copy of the input), against
  the matrix products that transform needs (``V Q_A``, ``Q_S^T .``, ``Q_S .``,
  ``. Q_A^T`` per layer, on ready-made contiguous operands);
* kronfluence's EK-FAC (when ``import kronfluence`` works), its covariance,
  eigendecomposition and lambda stages timed one by one, with
  ``use_empirical_fisher=True`` (the data's labels, as ``fisher="empirical"``)
  and its default damping heuristic ``0.1 * mean(lambda)`` (the same as our
  ``damping="auto"``). Agreement: per layer, the correlation between our
  transformed vectors and kronfluence's preconditioning (its own formula on
  its own factors) of the same 100 gradients;
* dattri 0.1.0's ``ifvp_at_x_ekfac`` (when installed) on the same MLP
  rewritten with its ``manual_cache_forward``/``MLPCache`` (one backward pass
  per example, as dattri does; its time is linear in n, so it is timed on
  1,024 examples and scaled to the data set, as the row says).

Medians over repeats (kronfluence and dattri: one run each, they take
minutes). ``x epoch`` = this row's fit time / the epoch's time: for
EKFACIFVP the median over fits each timed between two epochs (ratio to their
mean), for the peers their time over the median epoch; ``x GEMMs`` likewise
pairs each transform with runs of its matrix products. The machine is shared
and noisy: read the ratios, not the absolute seconds.

Run ``OMP_WAIT_POLICY=PASSIVE python benchmarks/_ifvp_ekfac.py [--quick]``.
"""

from __future__ import annotations

import copy
import itertools
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch
import torch.nn.functional as F
from _util import measure, print_table, set_threads
from torch import nn

from attribkit import EKFACIFVP, ComputeConfig, per_example_gradients

BATCH = 128
DATTRI_BATCHES = 8
N_VECTORS = 100
SIZES = (784, 512, 256, 10)


def make_problem(n: int):
    """The MLP and synthetic data: inputs N(0, I), labels of a random teacher MLP."""
    torch.manual_seed(0)
    layers = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(SIZES)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    X = torch.randn(n, SIZES[0])
    with torch.no_grad():
        teacher = copy.deepcopy(model)
        for p in teacher.parameters():
            p.normal_(0, 0.05)
        logits = teacher(X)
        y = torch.distributions.Categorical(logits=4 * logits / logits.std()).sample()
    return model, X, y


def epoch(model, X, y):
    for s in range(0, len(X), BATCH):
        model.zero_grad(set_to_none=True)
        out = model(X[s : s + BATCH])
        F.cross_entropy(out, y[s : s + BATCH], reduction="sum").backward()
    model.zero_grad(set_to_none=True)


def layer_blocks(V: dict, names):
    """``{layer: (m, d_out, d_in + 1)}`` from a dict of weight and bias vectors."""
    return {n: torch.cat([V[f"{n}.weight"], V[f"{n}.bias"][..., None]], dim=2) for n in names}


def gemm_floor(est, m):
    """The four products per layer that transform needs, on contiguous operands."""
    ops = []
    for name in est.layers_:
        QA, QS = est.input_eigenvectors_[name], est.output_eigenvectors_[name]
        X = torch.randn(m, QS.shape[0], QA.shape[0])
        ops.append((QA, QS, X))

    def run():
        for QA, QS, X in ops:
            Y = torch.mm(X.view(-1, QA.shape[0]), QA).view(X.shape)
            Y = torch.matmul(QS.T, Y)
            Y = torch.matmul(QS, Y)
            torch.mm(Y.view(-1, QA.shape[0]), QA.T)

    return run


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


# --------------------------------------------------------------------------- kronfluence
def kronfluence_rows(model, X, y, grads, ours, epoch_s):
    try:
        import kronfluence  # noqa: F401
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.factor.config import FactorConfig
        from kronfluence.task import Task
        from kronfluence.utils.dataset import DataLoaderKwargs
    except ImportError as exc:
        return [dict(method=f"kronfluence: not installed ({exc.name})")]

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:  # pragma: no cover - use_empirical_fisher=True
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    kmodel = prepare_model(copy.deepcopy(model), Classification())
    dataset = torch.utils.data.TensorDataset(X, y)
    with tempfile.TemporaryDirectory() as out_dir:
        analyzer = Analyzer(
            "bench", kmodel, Classification(), cpu=True, disable_tqdm=True, output_dir=out_dir
        )
        args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        kw = dict(factors_name="ekfac", factor_args=args, overwrite_output_dir=True)
        loader = DataLoaderKwargs(num_workers=0)
        stages = {}
        start = time.perf_counter()
        analyzer.fit_covariance_matrices(
            dataset=dataset, per_device_batch_size=BATCH, dataloader_kwargs=loader, **kw
        )
        stages["covariance"] = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.perform_eigendecomposition(**kw)
        stages["eigendecomposition"] = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.fit_lambda_matrices(
            dataset=dataset, per_device_batch_size=BATCH, dataloader_kwargs=loader, **kw
        )
        stages["lambda"] = time.perf_counter() - start
        storage = {}
        for factors in (
            analyzer.load_eigendecomposition("ekfac"),
            analyzer.load_lambda_matrices("ekfac"),
        ):
            for factor, per_module in factors.items():
                for module, tensor in per_module.items():
                    storage.setdefault(module, {})[factor] = tensor
    config = FactorConfig.CONFIGS["ekfac"]
    score_args = ScoreArguments(damping_factor=None)  # 0.1 * mean(lambda), as "auto"
    blocks = layer_blocks(grads, ours.layers_)
    ours_out = layer_blocks(ours.transform(grads), ours.layers_)
    agreement = []
    for name in ours.layers_:
        config.prepare(storage[name], score_args, torch.device("cpu"))
        theirs = config.precondition_gradient(blocks[name], storage[name])
        agreement.append(f"{name}: {correlation(ours_out[name], theirs):.8f}")
    total = sum(stages.values())
    stage_text = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
    return [
        dict(method=f"kronfluence EK-FAC fit ({stage_text})", fit_s=total,
             x_epoch=total / epoch_s, agreement="corr vs ours " + "; ".join(agreement)),
    ]  # fmt: skip


# --------------------------------------------------------------------------- dattri
def dattri_rows(model, X, y, epoch_s):
    try:
        from dattri.func.fisher import (
            EKFAC_CACHE_KEY,
            MLPCache,
            ifvp_at_x_ekfac,
            manual_cache_forward,
        )
    except ImportError as exc:
        return [dict(method=f"dattri 0.1.0 ifvp_at_x_ekfac: not installed ({exc.name})")]

    class CachedMLP(nn.Module):
        def __init__(self, src):
            super().__init__()
            linears = [copy.deepcopy(m) for m in src if isinstance(m, nn.Linear)]
            self.layers = nn.ModuleList(linears)

        @manual_cache_forward
        def forward(self, x):
            cache = getattr(self, EKFAC_CACHE_KEY, None)
            for i, layer in enumerate(self.layers):
                out = layer(x)
                if cache is not None:
                    cache.input_hidden_pairs.append((x, out))
                x = torch.relu(out) if i < len(self.layers) - 1 else out
            return x

    cached = CachedMLP(model)
    cache = MLPCache()
    setattr(cached, EKFAC_CACHE_KEY, cache)

    def losses(x, t):
        return F.cross_entropy(cached(x), t, reduction="none")

    # Its cost is linear in n (one backward pass per example and pass): it is
    # timed on DATTRI_BATCHES batches and scaled to the whole data set.
    batches = min(DATTRI_BATCHES, -(-len(X) // BATCH))
    start = time.perf_counter()
    ifvp_at_x_ekfac(losses, X, y, batch_size=BATCH, max_iter=batches, mlp_cache=cache, damping=0.1)
    fit_s = (time.perf_counter() - start) * len(X) / min(len(X), batches * BATCH)
    how = "measured" if batches * BATCH >= len(X) else f"{batches * BATCH:,} examples, scaled"
    return [
        dict(method=f"dattri 0.1.0 ifvp_at_x_ekfac fit ({how}; per-example backward loop)",
             fit_s=fit_s, x_epoch=fit_s / epoch_s),
    ]  # fmt: skip


# --------------------------------------------------------------------------- rows
def rows(repeats: int = 3, quick: bool = False, peers: bool = True) -> list[dict]:
    set_threads(2)
    n = 1000 if quick else 10_000
    model, X, y = make_problem(n)
    config = ComputeConfig(batch_size=BATCH, progress=False)
    est = EKFACIFVP(damping="auto", config=config)
    grads = per_example_gradients(model, (X[:N_VECTORS], y[:N_VECTORS]), flatten=False)
    epoch(model, X[: 4 * BATCH], y[: 4 * BATCH])  # warm-up
    # Paired: each fit is timed between two epochs (each transform between two
    # runs of its GEMMs) and its ratio taken to their mean, so a ratio compares
    # runs under the same machine load; the table gives medians over pairs.
    epochs, fits, x_epoch, transforms, gemms, x_gemm = [], [], [], [], [], []
    fit_mb = tr_mb = 0.0
    measure(lambda: epoch(model, X, y), 1, times=epochs)
    for _ in range(repeats + 2):
        fit_mb = max(fit_mb, measure(lambda: est.fit(model, (X, y)), 1, times=fits)[1])
        measure(lambda: epoch(model, X, y), 1, times=epochs)
        x_epoch.append(fits[-1] / statistics.mean(epochs[-2:]))
    floor = gemm_floor(est, N_VECTORS)
    flat = torch.cat([g.reshape(N_VECTORS, -1) for g in grads.values()], dim=1)
    measure(floor, 1, times=gemms)
    for _ in range(repeats):
        tr_mb = max(tr_mb, measure(lambda: est.transform(flat), 1, times=transforms)[1])
        measure(floor, 1, times=gemms)
        x_gemm.append(transforms[-1] / statistics.mean(gemms[-2:]))
    epoch_s, fit_s = statistics.median(epochs), statistics.median(fits)
    transform_s, floor_s = statistics.median(transforms), statistics.median(gemms)
    case = f"MLP 784-512-256-10, n={n:,}, batch {BATCH}, float32"
    out = [
        dict(method="one forward+backward epoch (the floor)", fit_s=epoch_s, x_epoch=1.0),
        dict(method="EKFACIFVP fit (2 passes + float64 eigh)", fit_s=fit_s,
             x_epoch=statistics.median(x_epoch), peak_mb=fit_mb),
        dict(method=f"EKFACIFVP transform, {N_VECTORS} flat gradients", transform_s=transform_s,
             vs_floor=statistics.median(x_gemm), peak_mb=tr_mb),
        dict(method="its matrix products alone (4 GEMMs per layer)", transform_s=floor_s,
             vs_floor=1.0),
    ]  # fmt: skip
    if peers:
        kron = kronfluence_rows(model, X, y, grads, est, epoch_s)
        for row in kron:
            if "fit_s" in row:
                row["speedup"] = row["fit_s"] / fit_s
        out += kron
        dat = dattri_rows(model, X, y, epoch_s)
        for row in dat:
            if "fit_s" in row:
                row["speedup"] = row["fit_s"] / fit_s
        out += dat
    for row in out:
        row["case"] = case
    return out


COLUMNS = [
    ("method", "method", ""),
    ("fit_s", "fit s", "{:.2f}"),
    ("x_epoch", "x epoch", "{:.2f}"),
    ("speedup", "EKFACIFVP faster by", "{:.1f}x"),
    ("transform_s", "transform s", "{:.3f}"),
    ("vs_floor", "x GEMMs", "{:.2f}"),
    ("peak_mb", "peak MB", "{:.0f}"),
    ("agreement", "agreement", ""),
]

if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    table = rows(quick=quick, peers="--no-peers" not in sys.argv[1:])
    print_table(
        f"EKFACIFVP ({table[0]['case']}; 2 threads; medians)",
        table,
        COLUMNS,
    )
