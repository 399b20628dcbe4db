"""One command for a machine with an NVIDIA GPU: the CUDA tests and a short benchmark.

``make gpu-check`` (or ``python benchmarks/gpu_check.py``) prints ONE table:

* **CUDA tests**: ``pytest -m cuda`` over ``tests/`` (the log goes to a file;
  the table has its summary line);
* **projection**: examples/s of ``RandomProjector`` with the ``fast_jl`` CUDA
  kernel (the ``cuda`` extra) and with the portable torch kernel, and their
  ratio, at ``p`` = 1M features, ``proj_dim`` 2,048 (a matrix of 8 GB, so the
  torch kernel regenerates it block by block, like fast_jl);
* **bit-identity**: the ``RandomProjector`` matrix (read as ``transform`` of
  identity rows, exact in any GEMM) is the same bits on the CPU and on CUDA,
  for every ``proj_type`` in float32 and float64;
* **GPT-2**: ``EKFACIFVP`` fit (the 48 ``Conv1D`` layers of the 12 blocks; the
  50,257-word output layer is left out, its ``S`` factor alone would be 20 GB)
  and ``per_example_gradients`` (all 124M parameters) on GPT-2 small, built from
  a ``GPT2Config`` with random weights (nothing is downloaded), on random
  token sequences, in float32 and bfloat16: time as a ratio to one plain
  forward+backward epoch over the same sequences in the same dtype, and the
  largest error of the bfloat16 results relative to the float32 ones;
* **nccl, 1 process**: an EK-FAC fit with ``ComputeConfig(distributed=True)``
  in a one-rank ``nccl`` group equals the local fit.

Without a CUDA device it prints one line and exits 0. ``--dry-run`` runs every
row on the CPU at tiny sizes instead (the projection with the torch kernel
only, bit-identity CPU against CPU, ``gloo`` for ``nccl``), so the script's
code is exercised on any machine. Exit status 1 when a row fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# Sizes of the real run (GPU) and of --dry-run (CPU).
SIZES = {
    "gpu": {
        "proj": {"n": 256, "p": 1_000_000, "k": 2048, "batch": 32},
        "ident": {"p": 20_000, "k": 512},
        "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab": 50257, "seq": 128},
        "ekfac_n": 32,
        "grad_n": 16,
        "batch": 8,
    },
    "dry": {
        "proj": {"n": 64, "p": 20_000, "k": 512, "batch": 32},
        "ident": {"p": 1_000, "k": 512},
        "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab": 128, "seq": 16},
        "ekfac_n": 16,
        "grad_n": 8,
        "batch": 4,
    },
}


class Table:
    """Rows of (check, setting, result, status) printed once at the end."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []
        self.failures: list[str] = []

    def add(self, check: str, setting: str, result: str, status: str = "ok") -> None:
        self.rows.append((check, setting, result, status))

    def fail(self, check: str, setting: str, err: BaseException) -> None:
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        self.add(check, setting, message[:70] + ("..." if len(message) > 70 else ""), "FAIL")
        self.failures.append(f"{check} ({setting}):\n{traceback.format_exc()}")

    def print(self, title: str) -> None:
        head = ("check", "setting", "result", "status")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(4)]
        line = "  ".join("-" * w for w in widths)
        print(f"\n{title}\n{line}")
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
        print(line)
        for r in self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        print(line)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3, warmup: bool = True):
    """Median seconds of ``fn()`` over ``repeats`` runs (after a warm-up run); its last result."""
    if warmup:
        fn()
        sync(device)
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


# ----------------------------------------------------------------------------- rows
def cuda_tests(table: Table, log: Path) -> None:
    """``pytest -m cuda`` in a child process; its summary line goes in the table."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = re.sub(r"[=]+", "", lines[-1]).strip() if lines else "no output"
    # 5: no test selected (no test carries the marker)
    status = "ok" if proc.returncode in (0, 5) else "FAIL"
    table.add("CUDA tests", "pytest -m cuda", summary, status)
    if status == "FAIL":
        table.failures.append(f"pytest -m cuda (exit {proc.returncode}): see {log}")


def projection(table: Table, device: torch.device, sizes: dict) -> None:
    import attribkit as ak

    n, p, k, batch = sizes["n"], sizes["p"], sizes["k"], sizes["batch"]
    setting = f"n={n} p={p:,} k={k} rademacher f32"
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, p, generator=g).to(device)
    cfg = ak.ComputeConfig(device=str(device), progress=False)
    rates = {}
    for backend in ("fast_jl", "torch"):
        label = f"projection {backend}"
        if backend == "fast_jl" and device.type != "cuda":
            table.add(label, setting, "skipped: fast_jl needs a CUDA device (dry run)", "skip")
            continue
        try:
            import importlib.util

            if backend == "fast_jl" and importlib.util.find_spec("fast_jl") is None:
                table.add(label, setting, "skipped: fast_jl not installed ('.[cuda]')", "skip")
                continue
            proj = ak.RandomProjector(
                proj_dim=k, backend=backend, max_batch_size=batch, config=cfg
            ).fit(X[:1])
            seconds, out = timed(lambda proj=proj: proj.transform(X), device)
            assert out.shape == (n, k) and torch.isfinite(out).all()
            rates[backend] = n / seconds
            table.add(label, setting, f"{n / seconds:,.0f} examples/s ({seconds * 1e3:.1f} ms)")
        except Exception as err:  # a row reports its failure; the others still run
            table.fail(label, setting, err)
    if len(rates) == 2:
        ratio = rates["fast_jl"] / rates["torch"]
        table.add("projection ratio", "fast_jl / torch", f"{ratio:.2f}x")


def bit_identity(table: Table, device: torch.device, sizes: dict) -> None:
    import attribkit as ak

    p, k = sizes["p"], sizes["k"]
    other = device if device.type == "cuda" else torch.device("cpu")
    note = "CPU vs CUDA" if other.type == "cuda" else "CPU vs CPU (dry run)"
    for proj_type in ("rademacher", "normal", "sjlt"):
        for dtype in ("float32", "float64"):
            setting = f"{proj_type} {dtype} p={p:,} k={k}"
            try:
                mats = []
                for dev in (torch.device("cpu"), other):
                    cfg = ak.ComputeConfig(device=str(dev), dtype=dtype, progress=False)
                    proj = ak.RandomProjector(
                        proj_dim=k, proj_type=proj_type, sparsity=4, backend="torch", config=cfg
                    ).fit(torch.zeros(1, p, dtype=cfg.torch_dtype))
                    # Row i of transform(I) is row i of the matrix: one nonzero product per
                    # sum, exact in every GEMM (TF32 aside, which torch leaves off by default).
                    eye = torch.eye(p, dtype=cfg.torch_dtype)
                    rows = [proj.transform(eye[i : i + 4096].to(dev)) for i in range(0, p, 4096)]
                    mats.append(torch.cat([r.cpu() for r in rows]))
                same = torch.equal(mats[0], mats[1])
                differing = int((mats[0] != mats[1]).sum())
                table.add(
                    "bit-identity",
                    setting,
                    f"{note}: {'identical' if same else f'{differing} entries differ'}",
                    "ok" if same else "FAIL",
                )
                if not same:
                    table.failures.append(f"bit-identity {setting}: {differing} entries differ")
            except Exception as err:
                table.fail("bit-identity", setting, err)


def _gpt2(sizes: dict, device: torch.device, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    s = sizes["gpt2"]
    config = GPT2Config(
        vocab_size=s["vocab"],
        n_positions=max(1024, s["seq"]),
        n_embd=s["n_embd"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()  # eval: no dropout, so every pass is the same
    return model.to(device=device, dtype=dtype)


def _token_batches(sizes: dict, n: int, device: torch.device) -> list[dict]:
    """Random token sequences as a collator makes them; every fourth one padded to 3/4."""
    s = sizes["gpt2"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, s["vocab"], (n, s["seq"]), generator=g)
    mask = torch.ones_like(ids)
    mask[::4, 3 * s["seq"] // 4 :] = 0
    ids = ids * mask
    b = sizes["batch"]
    return [
        {"input_ids": ids[i : i + b].to(device), "attention_mask": mask[i : i + b].to(device)}
        for i in range(0, n, b)
    ]


def _epoch(model, batches) -> None:
    """One plain forward+backward pass over the batches (Hugging Face's own LM loss)."""
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model.zero_grad(set_to_none=True)
        model(**batch, labels=labels).loss.backward()
    model.zero_grad(set_to_none=True)


def _relative_error(got, ref) -> float:
    if isinstance(ref, dict):
        num = max((got[k].float() - ref[k].float()).abs().max().item() for k in ref)
        den = max(ref[k].float().abs().max().item() for k in ref)
    else:
        num = (got.float() - ref.float()).abs().max().item()
        den = ref.float().abs().max().item()
    return num / den if den else float("nan")


def gpt2(table: Table, device: torch.device, sizes: dict) -> None:
    s = sizes["gpt2"]
    name = "GPT-2 small" if s["n_layer"] == 12 else "tiny GPT-2 (dry run)"
    reference: dict = {}  # float32 results, which the bfloat16 ones are compared with
    for dtype_name in ("float32", "bfloat16"):
        setting = f"{name} seq={s['seq']} {dtype_name}"
        try:
            model = _gpt2(sizes, device, getattr(torch, dtype_name))
        except Exception as err:
            table.fail("GPT-2 model", setting, err)
            return
        _gpt2_rows(table, model, sizes, device, dtype_name, setting, reference)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _gpt2_rows(table, model, sizes, device, dtype_name, setting, reference) -> None:
    import attribkit as ak

    dtype = getattr(torch, dtype_name)
    cfg = ak.ComputeConfig(
        device=str(device), dtype=dtype_name, batch_size=sizes["batch"], progress=False
    )
    # The Conv1D projections of the transformer blocks (GPT-2's lm_head is left out).
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]

    def fit(batches):
        est = ak.EKFACIFVP(damping="auto", layers=layers, loss="causal_lm", config=cfg)
        return est.fit(model, batches)

    def gradients(batches):
        return ak.per_example_gradients(model, batches, loss="causal_lm", config=cfg)

    for what, n, run in (
        ("EKFACIFVP fit", sizes["ekfac_n"], fit),
        ("per_example_gradients", sizes["grad_n"], gradients),
    ):
        batches = _token_batches(sizes, n, device)
        label = f"{what} n={n}"
        try:
            epoch, _ = timed(lambda b=batches: _epoch(model, b), device)
            seconds, out = timed(lambda b=batches, run=run: run(b), device, 1, warmup=False)
            if what == "EKFACIFVP fit":
                g = torch.Generator().manual_seed(2)
                V = {
                    k: torch.randn(2, *shape, generator=g).to(device=device, dtype=dtype)
                    for k, shape in out.param_shapes_.items()
                }
                result = {k: v.float().cpu() for k, v in out.transform(V).items()}
            else:
                result = out.float().cpu()
            text = f"{seconds:.2f} s = {seconds / epoch:.1f} epochs"
            if dtype_name == "float32":
                reference[what] = result
            elif what in reference:
                text += f"; max err vs f32 {_relative_error(result, reference[what]):.1e}"
            table.add(label, setting, text)
        except Exception as err:
            table.fail(label, setting, err)


def nccl_one_process(table: Table, device: torch.device) -> None:
    import torch.distributed as dist

    import attribkit as ak

    backend = "nccl" if device.type == "cuda" else "gloo"
    setting = f"{backend}, world size 1, EKFACIFVP"
    if device.type != "cuda":
        setting += " (dry run)"
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
        try:
            g = torch.Generator().manual_seed(3)
            X, y = torch.randn(512, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)
            ).to(device)
            data = (X.to(device), y.to(device))
            fits = {}
            for distributed in (True, False):
                cfg = ak.ComputeConfig(
                    device=str(device), dtype="float64", distributed=distributed, progress=False
                )
                fits[distributed] = ak.EKFACIFVP(damping=0.1, config=cfg).fit(model, data)
            V = torch.randn(4, fits[False].n_features_in_, generator=g, dtype=torch.float64)
            a = fits[True].transform(V.to(device)).cpu()
            b = fits[False].transform(V.to(device)).cpu()
            err = _relative_error(a, b)
            ok = err <= 1e-12
            result = f"max rel. diff vs local {err:.1e}"
            table.add("distributed fit", setting, result, "ok" if ok else "FAIL")
            if not ok:
                table.failures.append(f"distributed fit ({setting}): differs by {err:.1e}")
        finally:
            dist.destroy_process_group()
    except Exception as err:
        table.fail("distributed fit", setting, err)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="every row on the CPU at tiny sizes"
    )
    parser.add_argument(
        "--log", type=Path, default=ROOT / "gpu_check_pytest.log", help="pytest -m cuda log"
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: skipped: no CUDA device visible to torch (--dry-run runs it on the CPU)")
        return 0
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    if args.dry_run:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    where = (
        "CPU (dry run, tiny sizes)"
        if args.dry_run
        else f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    )
    start = time.perf_counter()
    table = Table()
    cuda_tests(table, args.log)
    projection(table, device, sizes["proj"])
    bit_identity(table, device, sizes["ident"])
    gpt2(table, device, sizes)
    nccl_one_process(table, device)
    table.print(
        f"attribkit GPU check, {datetime.date.today()}: {where}; torch {torch.__version__}; "
        f"medians of 3 after a warm-up (fits and gradients: one run, after a warm-up epoch); "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    for failure in table.failures:
        print(f"\nFAILED {failure}", file=sys.stderr)
    return 1 if table.failures else 0


if __name__ == "__main__":
    sys.exit(main())
