"""Attribution at scale: projected per-example gradients and influence from memmaps.

Model: 4 ``nn.Linear(1024, 1024)`` layers (tanh between, 4.2M parameters) on
``(batch, 16 tokens, 1024)`` inputs, mean-pooled into 1024 logits,
cross-entropy; 4,096 examples, float32, 2 threads, batches of 32. Rows:

(a) ``per_example_gradients(projector=RandomProjector(1024))``: per-example
    gradients materialised by ``vmap(grad)`` then projected per batch (its
    4.2M x 1024 matrix does not fit the 2 GiB budget, so most of it is
    regenerated per batch); measured on the first ``--n-dense`` examples;
(b) ``per_example_gradients(projector=KroneckerProjector(16, 16))``, the same
    total ``proj_dim`` (4 x 16 x 16 = 1024), into a ``np.memmap`` ``out``:
    the hook path, no per-example gradient is formed; at n/4 and n examples
    to show that peak memory does not grow with n;
(c) the floor: one forward and ``loss.backward()`` per batch over the same data;

then ``influence`` of 4,096 test x 4,096 training features (``proj_dim``
1024, ExplicitIFVP) read from the memmap of (b) with ``memory_budget`` 4 MiB
vs from an in-memory array with the default budget, and the JL distortion
of KroneckerProjector against a dense RandomProjector of the same total
dimension on real gradients (an MLP trained on sklearn's digits; the figures
the KroneckerProjector docstring reports).

Times are medians; "peak MB" is the peak resident memory above the start of
the call (VmHWM), which for memmaps includes the file pages it touched;
"numpy peak MB" (influence) is tracemalloc's peak of numpy buffers, i.e.
what was copied into memory. The machine is shared: compare ratios.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_scale.py [--quick]``.
``--quick``: 256-wide layers and 512 examples (a few seconds); ``--only
{throughput,influence,jl}`` runs one part (throughput includes influence on
(b)'s store).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import torch
from _util import measure, print_table, set_threads
from torch import nn

import attribkit as ak

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from cases import digits_model_and_gradients  # the test's JL setup


class TokenStack(nn.Module):
    def __init__(self, width: int, depth: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x.mean(1)  # (batch, width) logits


def make_data(n, tokens, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, tokens, width, generator=g)
    y = torch.randint(0, width, (n,), generator=g)
    return X, y


def floor(model, X, y, batch):
    model.eval()
    for s in range(0, len(X), batch):
        out = model(X[s : s + batch])
        nn.functional.cross_entropy(out, y[s : s + batch], reduction="sum").backward()
    model.zero_grad(set_to_none=True)


def throughput(args, cfg):
    torch.manual_seed(0)
    model = TokenStack(args.width)
    n, batch = args.n, args.batch
    X, y = make_data(n, args.tokens, args.width)
    kp = ak.KroneckerProjector(in_dim=16, out_dim=16, config=cfg).fit(model)
    rp = ak.RandomProjector(kp.proj_dim_, config=cfg).fit(model)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {len(model.layers)} x Linear({args.width}, {args.width}) on {args.tokens} "
        f"tokens, {params / 1e6:.2f}M parameters; n={n}, batch {batch}, proj_dim "
        f"{kp.proj_dim_}, float32, {torch.get_num_threads()} threads",
        flush=True,
    )
    rows = []
    tmp = tempfile.mkdtemp(prefix="bench_scale_")
    store = os.path.join(tmp, "train.npy")

    t, mem, _ = measure(lambda: floor(model, X, y, batch), args.repeats)
    rows.append(dict(method="(c) floor: forward + backward", n=n, time=t, eps=n / t, mem=mem))
    t_floor = t

    for m in (n // 4, n):

        def run_b(m=m):
            out = np.lib.format.open_memmap(
                store, mode="w+", dtype="float32", shape=(m, kp.proj_dim_)
            )
            ak.per_example_gradients(model, (X[:m], y[:m]), projector=kp, config=cfg, out=out)
            return out

        t, mem, out = measure(run_b, args.repeats)
        rows.append(dict(method="(b) KroneckerProjector hook path -> memmap", n=m, time=t,
                         eps=m / t, mem=mem, floor=t / (t_floor * m / n)))  # fmt: skip
    t_b = t
    del out
    gc.collect()

    nd = args.n_dense
    t, mem, _ = measure(
        lambda: ak.per_example_gradients(model, (X[:nd], y[:nd]), projector=rp, config=cfg),
        args.dense_repeats,
    )
    rows.append(dict(method="(a) materialise + RandomProjector per batch", n=nd, time=t,
                     eps=nd / t, mem=mem, floor=(t / nd) / (t_floor / n)))  # fmt: skip
    speedup = (t / nd) / (t_b / n)
    print_table(
        "Projected per-example gradients (CPU)",
        rows,
        [
            ("method", "method", ""),
            ("n", "examples", "{:d}"),
            ("time", "time s", "{:.2f}"),
            ("eps", "examples/s", "{:.1f}"),
            ("floor", "x floor time", "{:.2f}"),
            ("mem", "peak MB", "{:.0f}"),
        ],
    )
    print(f"(b) vs (a) throughput: {speedup:.1f}x; (b) time / floor time: {t_b / t_floor:.2f}x\n")
    return store, kp.proj_dim_


def numpy_peak(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def influence_rows(store, k, args):
    train = np.load(store, mmap_mode="r")
    n = train.shape[0]
    test = np.array(train)  # n_test = n_train
    in_memory = np.array(train)
    cfg = ak.ComputeConfig(memory_budget=4 * 2**20)
    ifvp_small = ak.ExplicitIFVP(damping=1e-3, config=cfg).fit(in_memory)
    ifvp_big = ak.ExplicitIFVP(damping=1e-3).fit(in_memory)
    rows, samples = [], {"memmap": [], "memory": []}
    # Interleaved runs: the machine is shared, so pair each blocked run with an in-memory one.
    for _ in range(max(5, args.repeats)):  # cheap, and noisy on a shared machine
        for key, est, tr in (("memmap", ifvp_small, train), ("memory", ifvp_big, in_memory)):
            gc.collect()
            start = time.perf_counter()
            ak.influence(est, tr, test)
            samples[key].append(time.perf_counter() - start)
    _, mem_small, scores = measure(lambda: ak.influence(ifvp_small, train, test), 1)
    _, np_small = numpy_peak(lambda: ak.influence(ifvp_small, train, test))
    _, mem_big, ref = measure(lambda: ak.influence(ifvp_big, in_memory, test), 1)
    _, np_big = numpy_peak(lambda: ak.influence(ifvp_big, in_memory, test))
    err = float(np.abs(scores - ref).max() / np.abs(ref).max())
    t_small, t_big = statistics.median(samples["memmap"]), statistics.median(samples["memory"])
    rows.append(dict(method="memmap, memory_budget 4 MiB", time=t_small, ratio=t_small / t_big,
                     mem=mem_small, npmem=np_small))  # fmt: skip
    rows.append(dict(method="in memory, default budget (one block)", time=t_big, ratio=1.0,
                     mem=mem_big, npmem=np_big))  # fmt: skip
    print_table(
        f"influence {n} test x {n} train, proj_dim {k} (ExplicitIFVP), float32",
        rows,
        [
            ("method", "training features", ""),
            ("time", "time s", "{:.3f}"),
            ("ratio", "vs in memory", "{:.2f}"),
            ("mem", "peak MB", "{:.0f}"),
            ("npmem", "numpy peak MB", "{:.1f}"),
        ],
    )
    print(
        f"max relative difference blocked vs one block: {err:.1e}; the score matrix itself "
        f"is {n * n * 4 / 2**20:.0f} MB and the store {train.nbytes / 2**20:.0f} MB; both numpy "
        f"peaks include the {test.nbytes / 2**20:.0f} MB copy of the test features (transformed "
        "at once); the in-memory one also a whole copy of the training features\n"
    )


# ----------------------------------------------------------------------------- JL quality
def distortion(G, P):
    norm = (P.pow(2).sum(1) / G.pow(2).sum(1) - 1).abs()
    n = G.norm(dim=1)
    ip = (P @ P.T - G @ G.T).abs() / (n[:, None] * n[None, :])
    iu = torch.triu_indices(len(G), len(G), 1)
    ip = ip[iu[0], iu[1]]
    return float(norm.median()), float(norm.max()), float(ip.median()), float(ip.quantile(0.99))


def jl_rows(args):
    model, G = digits_model_and_gradients()
    cfg = ak.ComputeConfig(dtype="float64")
    rows = []
    for k in args.jl_dims:
        found = {"KroneckerProjector": [], "RandomProjector": []}
        for seed in range(args.jl_seeds):
            kp = ak.KroneckerProjector(in_dim=k, out_dim=k, seed=seed, config=cfg).fit(model)
            found["KroneckerProjector"].append(distortion(G, kp.transform(G)))
            rp = ak.RandomProjector(kp.proj_dim_, seed=seed, config=cfg).fit(G)
            found["RandomProjector"].append(distortion(G, rp.transform(G)))
        for name, values in found.items():
            v = np.array(values)
            label = f"Kronecker {k} x {k}" if name == "KroneckerProjector" else "dense"
            rows.append(dict(method=label, dim=kp.proj_dim_, norm=v[:, 0].mean(),
                             norm_range=f"{v[:, 0].min():.3f}-{v[:, 0].max():.3f}",
                             norm_max=v[:, 1].mean(), ip=v[:, 2].mean(),
                             ip_range=f"{v[:, 2].min():.3f}-{v[:, 2].max():.3f}",
                             ip99=v[:, 3].mean()))  # fmt: skip
    print_table(
        f"JL distortion on {G.shape[0]} per-example gradients of an MLP 64-64-64-10 on digits "
        f"({G.shape[1]} parameters), mean over {args.jl_seeds} seeds (min-max)",
        rows,
        [
            ("method", "projection", ""),
            ("dim", "proj_dim", "{:d}"),
            ("norm", "median |ratio-1|", "{:.3f}"),
            ("norm_range", "(seeds)", ""),
            ("norm_max", "max |ratio-1|", "{:.3f}"),
            ("ip", "median ip err", "{:.4f}"),
            ("ip_range", "(seeds)", ""),
            ("ip99", "p99 ip err", "{:.3f}"),
        ],
    )
    print("ratio = ||xP||^2/||x||^2 per gradient; ip err = |<xP,yP> - <x,y>| / (||x|| ||y||) "
          "over pairs\n")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check it runs")
    parser.add_argument(
        "--only",
        choices=["throughput", "influence", "jl"],
        default=None,
        help="one part; 'influence' alone scores Gaussian features of (b)'s shape",
    )
    args = parser.parse_args()
    set_threads(2)
    if args.quick:
        args.width, args.tokens, args.n, args.batch = 256, 16, 512, 32
        args.n_dense, args.repeats, args.dense_repeats = 64, 3, 1
        args.jl_dims, args.jl_seeds = (16,), 5
    else:
        args.width, args.tokens, args.n, args.batch = 1024, 16, 4096, 32
        args.n_dense, args.repeats, args.dense_repeats = 64, 2, 1
        args.jl_dims, args.jl_seeds = (8, 16, 32), 20
    cfg = ak.ComputeConfig(batch_size=args.batch)
    if args.only in (None, "throughput"):
        store, k = throughput(args, cfg)
        influence_rows(store, k, args)
    if args.only == "influence":
        k = 4 * 16 * 16
        store = os.path.join(tempfile.mkdtemp(prefix="bench_scale_"), "train.npy")
        features = np.lib.format.open_memmap(store, mode="w+", dtype="float32", shape=(args.n, k))
        features[:] = np.random.default_rng(0).standard_normal((args.n, k), dtype=np.float32)
        features.flush()
        del features
        influence_rows(store, k, args)
    if args.only in (None, "jl"):
        jl_rows(args)


if __name__ == "__main__":
    main()
