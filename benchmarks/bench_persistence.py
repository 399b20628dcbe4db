"""Single-bit corruption of saved estimators: ``ak.save`` files vs pickle.

For each estimator (fitted on the test MLP or a small gradient matrix) the
script saves it with ``ak.save`` and with ``pickle.dumps``, flips one bit of
the bytes at a time and loads the result. Each load ends one of four ways:

* **raises**: loading fails (the corruption is reported);
* **same**: loads, with the very same state (every attribute, bit for bit) and
  parameters (the bit was one the loader does not use, e.g. a pickle memo);
* **wrong (silent)**: loads without error, but some attribute or parameter
  differs (``transform`` of a fixed probe too, or only a fitted value it does
  not read, such as EK-FAC's eigenvalues): a silently wrong estimator;
* **fails later**: loads, then ``transform`` raises.

``ak.save`` files are tried at every bit (``--quick``: 2,000 seeded bits per
file); pickles at 2,000 seeded bits over the whole byte string and 2,000 over
the bytes of the fitted tensors' data only. A fixed seed: the counts are
reproducible.

Run: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_persistence.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import sys
import tempfile
import warnings

import torch
from _util import print_table, set_threads

import attribkit as ak

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from cases import classification_data, mlp

F64 = ak.ComputeConfig(dtype="float64")


def estimators():
    """name -> (fitted estimator, probe vectors)."""
    model, data = mlp(), classification_data(n=40)
    G = torch.randn(40, 39, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = G[:4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "EKFACIFVP (model)": (ak.EKFACIFVP(damping=0.1, config=F64).fit(model, data), probe),
            "ExplicitIFVP (array)": (ak.ExplicitIFVP(damping=0.1, config=F64).fit(G), probe),
            "DataInfIFVP (array)": (ak.DataInfIFVP(config=F64).fit(G), probe),
            "ArnoldiProjector (model)": (
                ak.ArnoldiProjector(proj_dim=5, damping=1.0, config=F64).fit(model, data),
                probe,
            ),
        }


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _equal(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _outcome(load, reference, probe) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = load()
    except Exception:
        return "raises"
    try:
        state, expected = est.__getstate__(), reference.__getstate__()
        same = type(est) is type(reference) and _equal(state, expected)
        out = est.transform(probe)
        same = same and torch.equal(out, reference.transform(probe))
    except Exception:
        return "fails later"
    return "same" if same else "wrong (silent)"


def _tensor_bytes(blob: bytes, est) -> list[int]:
    """Bit positions of the fitted tensors' data inside a pickle (found by search)."""
    bits = []
    for value in est.__getstate__().values():
        tensors = value.values() if isinstance(value, dict) else [value]
        if isinstance(value, list):
            tensors = value
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()  # pickled whole, in memory order
                raw = torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes()
                start = blob.find(raw)
                if start >= 0:
                    bits.extend(range(8 * start, 8 * (start + len(raw))))
    return bits


def run(quick: bool) -> None:
    rng = random.Random(0)
    rows = []
    folder = tempfile.mkdtemp()
    for name, (est, probe) in estimators().items():
        path = os.path.join(folder, "est.safetensors")
        ak.save(est, path)
        with open(path, "rb") as fh:
            saved = fh.read()
        blob = pickle.dumps(est)
        corrupted = os.path.join(folder, "corrupted.safetensors")

        def load_saved(data):
            with open(corrupted, "wb") as fh:
                fh.write(data)
            return ak.load(corrupted)

        everywhere = range(8 * len(saved))
        bits = rng.sample(everywhere, 2000) if quick else everywhere
        trials = [
            ("ak.save", "whole file", saved, bits, load_saved),
            ("pickle", "whole bytes", blob, rng.sample(range(8 * len(blob)), 2000), pickle.loads),
        ]
        data_bits = _tensor_bytes(blob, est)
        if data_bits:
            picked = rng.sample(data_bits, min(2000, len(data_bits)))
            trials.append(("pickle", "tensor data", blob, picked, pickle.loads))
        for fmt, where, data, positions, loader in trials:
            counts = dict.fromkeys(("raises", "same", "wrong (silent)", "fails later"), 0)
            for bit in positions:
                flipped = _flip(data, bit)
                counts[_outcome(lambda f=flipped: loader(f), est, probe)] += 1
            n = len(positions)
            rows.append(
                {
                    "estimator": name,
                    "format": fmt,
                    "bits": where,
                    "bytes": len(data),
                    "tried": n,
                    **{k: f"{v} ({100 * v / n:.1f}%)" for k, v in counts.items()},
                }
            )
    print_table(
        "Single-bit flips: what loading a corrupted file gives (seed 0)",
        rows,
        [
            ("estimator", "estimator", ""),
            ("format", "format", ""),
            ("bits", "flipped in", ""),
            ("bytes", "bytes", "{}"),
            ("tried", "flips", "{}"),
            ("raises", "raises", ""),
            ("same", "same", ""),
            ("wrong (silent)", "wrong (silent)", ""),
            ("fails later", "fails later", ""),
        ],
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 seeded flips per file")
    args = parser.parse_args()
    set_threads()
    run(args.quick)
