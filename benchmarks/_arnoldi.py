"""ArnoldiProjector against dattri 0.1.0's ``arnoldi_project`` and a dense truth.

Case (issue 9): an MLP of about 10k parameters (64 -> 128 -> 10, tanh, float32,
9,610 parameters), 1000 examples, cross-entropy, ``proj_dim=50``,
``max_iter=100``. Both methods see the same function, the mean loss over the
1000 examples in float32: dattri's ``arnoldi_project`` gets it as
``func(flat_params)``; ArnoldiProjector fits on ``(X, y)`` in one batch of
1000 (and, in one more row, streamed in batches of 100). The truth is
``torch.linalg.eigvalsh`` of the dense float64 Hessian (built from HVPs of a
float64 copy of the model, 200 basis vectors at a time).

Columns: median fit time over repetitions in which the methods take turns
(the machine is shared and noisy), including one ihvp of the test gradients
(dattri: building the projector plus its first projection call, where it runs
its iteration), peak resident-memory growth,
``rel err top-k``: the largest ``|est_i - true_i| / |true_i|`` over the ``k``
largest-magnitude eigenvalues (index by index); ``top-k within 1e-3``: how
many of the ``k`` match the true value at their index to relative 1e-3 (with
``max_iter=100`` on 9,610 parameters the smaller of the top 50 have not
converged, for either method); ``orth``: ``max |U U^T - I|`` of the returned
eigenvectors (dattri's Ritz vectors normalised first); ``max|ihvp|/max|v|``:
how much the inverse amplifies (a Ritz value at the rounding level of zero,
inverted, shows as a huge number); ``NaN``: the count of NaN entries in the
ihvp of the test gradients plus in the eigenvalues and eigenvectors.
Two small cases run both with all their defaults (``proj_dim=100``,
``max_iter=100``) on a 39-parameter MLP in float32 and float64, whose Hessian
has exactly zero eigenvalues and which is smaller than ``max_iter``.

dattri counts ``max_iter`` with its start vector (99 HVPs for ``max_iter=100``);
ArnoldiProjector makes ``max_iter`` HVPs.

Run ``OMP_WAIT_POLICY=PASSIVE python benchmarks/_arnoldi.py [--quick]``.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch
from _util import measure, print_table, set_threads
from torch.func import functional_call, grad, jvp, vmap

import attribkit as ak

SIZES = {"full": (64, 128, 10, 1000, 50, 100), "quick": (16, 32, 5, 200, 10, 30)}


def _mlp(d, hidden, classes, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes)
    )


def _flat_loss(model, X, y):
    """``f(flat_params)``: the mean cross-entropy over (X, y), and the flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(v):
        state, i = {}, 0
        for n, s in zip(names, shapes):
            state[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return torch.nn.functional.cross_entropy(functional_call(model, state, (X,)), y)

    return f, flat


def _dense_eigenvalues(model, X, y, chunk=200):
    """Eigenvalues of the float64 Hessian, largest magnitude first."""
    f, flat = _flat_loss(copy.deepcopy(model).double(), X.double(), y)
    p = flat.numel()
    hvp = vmap(lambda v: jvp(grad(f), (flat,), (v,))[1])
    H = torch.empty(p, p, dtype=torch.float64)
    eye = torch.eye(p, dtype=torch.float64)
    for s in range(0, p, chunk):
        H[s : s + chunk] = hvp(eye[s : s + chunk])
    H = (H + H.T) / 2
    values = torch.linalg.eigvalsh(H)
    return values[torch.argsort(values.abs(), descending=True)]


def _rel_err(est, truth, k):
    k = min(k, est.numel())
    return float(((est[:k].double() - truth[:k]).abs() / truth[:k].abs()).max())


def _good(est, truth, k, rtol=1e-3):
    """How many of the first ``k`` values match the true one at their index to ``rtol``."""
    k = min(k, est.numel())
    return int(((est[:k].double() - truth[:k]).abs() <= rtol * truth[:k].abs()).sum())


def _orth(U):
    U = U.double()
    U = U / U.norm(dim=1, keepdim=True)
    return float((U @ U.T - torch.eye(U.shape[0], dtype=torch.float64)).abs().max())


def _nan_count(*tensors):
    return sum(int(torch.isnan(t).sum()) for t in tensors)


def _blowup(out, V):
    """``max |ihvp(V)| / max |V|``: how far the inverse amplifies (inf/NaN when broken)."""
    return float(out.double().abs().max() / V.double().abs().max())


def _dattri():
    try:
        from dattri.func.projection import ArnoldiProjector as DattriArnoldi
        from dattri.func.projection import arnoldi_project
    except Exception as exc:
        return None, f"dattri 0.1.0 not importable: {type(exc).__name__}: {exc}"
    return (arnoldi_project, DattriArnoldi), None


def _run_dattri(dattri, f, flat, V, proj_dim, max_iter):
    arnoldi_project, _ = dattri
    # dattri draws its start vector with torch.rand in the default dtype, which
    # fails against a float64 function: run it under that default dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(flat.dtype)
    try:
        fn = arnoldi_project(flat.numel(), f, flat, proj_dim=proj_dim, max_iter=max_iter)
        out = fn(V.to(flat.dtype))
    finally:
        torch.set_default_dtype(previous)
    # The projector object sits in the closure; its eigenpairs are what it inverts.
    projector = fn.__closure__[0].cell_contents
    values, vectors = projector.eigvals, projector.eigvecs
    # dattri orders ascending by magnitude; compare largest first like the truth.
    order = torch.argsort(values.abs(), descending=True)
    return out, values[order], vectors[order]


def _case(name, model, X, y, V, proj_dim, max_iter, truth, repeats, dattri, note):
    """One row per method; the methods take turns in every repetition (a noisy machine)."""
    f, flat = _flat_loss(model, X, y)
    n = X.shape[0]
    dtype = "float64" if flat.dtype == torch.float64 else "float32"
    methods = {}
    for label, mode, batch in [
        ("ArnoldiProjector rev-fwd, 1 batch", "rev-fwd", n),
        ("ArnoldiProjector rev-rev, 1 batch", "rev-rev", n),
        (f"ArnoldiProjector rev-fwd, batches of {n // 10}", "rev-fwd", n // 10),
    ]:
        cfg = ak.ComputeConfig(batch_size=batch, progress=False, dtype=dtype)
        est = ak.ArnoldiProjector(proj_dim=proj_dim, max_iter=max_iter, mode=mode, config=cfg)
        methods[label] = lambda est=est: _run_ours(est, model, X, y, V)
    dattri_label = "dattri 0.1.0 arnoldi_project (rev-fwd)"
    if dattri is not None:
        methods[dattri_label] = lambda: _run_dattri(dattri, f, flat, V, proj_dim, max_iter)
    times = {label: [] for label in methods}
    peaks = dict.fromkeys(methods, 0.0)
    results, failed = {}, {}
    for _ in range(repeats):
        for label, fn in methods.items():
            if label in failed:
                continue
            try:
                _, peak, results[label] = measure(fn, 1, times=times[label])
            except Exception as exc:  # the reference's failure is a result
                failed[label] = f"{label} failed: {type(exc).__name__}: {exc}"
                continue
            peaks[label] = max(peaks[label], peak)
    rows = []
    for label in methods:
        if label in failed:
            rows.append(dict(case=name, method=failed[label]))
            continue
        out, values, vectors = results[label]
        rows.append(
            dict(
                case=name, method=label, fit_s=statistics.median(times[label]),
                peak_mb=peaks[label], k=values.numel(), err10=_rel_err(values, truth, 10),
                errk=_rel_err(values, truth, proj_dim), good=_good(values, truth, proj_dim),
                orth=_orth(vectors), nan=_nan_count(out, values, vectors), blowup=_blowup(out, V),
            )
        )  # fmt: skip
    if dattri is None:
        rows.append(dict(case=name, method=note))
    elif dattri_label not in failed:
        base = statistics.median(times[dattri_label])
        for row in rows:
            if "fit_s" in row:
                row["speedup"] = base / row["fit_s"]
    return rows


def _run_ours(est, model, X, y, V):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        est.fit(model, (X, y))
    return est.ihvp(V), est.eigenvalues_, est.eigenvectors_


def rows(repeats: int = 3, quick: bool = False) -> list[dict]:
    set_threads(2)
    d, hidden, classes, n, proj_dim, max_iter = SIZES["quick" if quick else "full"]
    dattri, note = _dattri()
    g = torch.Generator().manual_seed(0)
    model = _mlp(d, hidden, classes)
    X = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    p = sum(q.numel() for q in model.parameters())
    V = ak.per_example_gradients(model, (X[:100], y[:100]))
    truth = _dense_eigenvalues(model, X, y)
    name = f"MLP p={p:,} n={n} proj_dim={proj_dim} max_iter={max_iter}, float32"
    out = _case(name, model, X, y, V, proj_dim, max_iter, truth, repeats, dattri, note)
    # The seed's defaults on a model smaller than max_iter (39 parameters).
    for dtype in (torch.float32, torch.float64):
        tiny = _mlp(5, 4, 3).to(dtype)
        gt = torch.Generator().manual_seed(1)
        Xt = torch.randn(12, 5, generator=gt, dtype=dtype)
        yt = torch.randint(0, 3, (12,), generator=gt)
        tiny_truth = _dense_eigenvalues(tiny, Xt, yt)
        Vt = ak.per_example_gradients(tiny, (Xt, yt), config=ak.ComputeConfig(dtype=dtype))
        out += _case(
            f"tiny MLP p=39 n=12, defaults proj_dim=100 max_iter=100, {str(dtype)[6:]}",
            tiny, Xt, yt, Vt, 100, 100, tiny_truth, repeats, dattri, note,
        )  # fmt: skip
    return out


COLUMNS = [
    ("method", "method", ""),
    ("fit_s", "fit s", "{:.3f}"),
    ("speedup", "speed-up vs dattri", "{:.2f}x"),
    ("peak_mb", "peak MB", "{:.0f}"),
    ("k", "pairs", "{}"),
    ("err10", "rel err top-10", "{:.1e}"),
    ("errk", "rel err top-k", "{:.1e}"),
    ("good", "top-k within 1e-3", "{}"),
    ("orth", "orth", "{:.1e}"),
    ("blowup", "max|ihvp|/max|v|", "{:.2g}"),
    ("nan", "NaN", "{}"),
]

if __name__ == "__main__":
    table = rows(quick="--quick" in sys.argv[1:])
    print_table("ArnoldiProjector vs dattri arnoldi_project (2 threads)", table,
                [("case", "case", ""), *COLUMNS])  # fmt: skip
