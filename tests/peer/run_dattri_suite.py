"""Run dattri 0.1.0's own tests of its functional API against attribkit.functional.

``make peer-test`` installs ``dattri==0.1.0`` (``pip install --no-deps``: its
tests need only torch and numpy besides dattri itself) and runs this script.
For each seed it copies dattri's ``test/dattri/func/test_fisher.py`` and
``test_proj.py`` (shipped in the wheel) to a temporary folder twice:

* ``dattri``: unmodified, against dattri itself;
* ``attribkit``: with only the imports of those functions rewritten to
  ``attribkit.functional`` (dattri's helpers, ``ihvp_at_x_explicit``,
  ``flatten_func`` and its projector classes, stay dattri's: they are the
  oracle the tests compare with),

and runs every test of ``test_fisher.py`` and ``test_proj.py::TestGetProjection``
(the CUDA ones skip without a GPU) with a conftest that seeds ``random``,
``numpy`` and ``torch`` before each test. dattri's own
``np.random.default_rng()`` calls without a seed are given the test's seed too
(otherwise they draw OS entropy and no run could be reproduced).

Prints the table of seeds x tests for both targets and exits non-zero when a
test that passes against dattri fails against attribkit for the same seed.
Some of dattri's tests are loose statistical checks that dattri itself fails
on some seeds; those cells do not count.

    python tests/peer/run_dattri_suite.py [--seeds 0 1 2] [--target both|dattri|attribkit]

This file only runs as a script: pytest imports it (``--doctest-modules``)
and finds nothing to run.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

SEED_FUNCTIONS = {
    "dattri.func.fisher": {
        "ifvp_explicit",
        "ifvp_at_x_explicit",
        "ifvp_datainf",
        "ifvp_at_x_datainf",
        "ifvp_at_x_ekfac",
        "MLPCache",
        "IFVPUsageError",
        "manual_cache_forward",
        "EKFAC_CACHE_KEY",
    },
    "dattri.func.projection": {"random_project", "arnoldi_project"},
}
TEST_FILES = ("test/dattri/func/test_fisher.py", "test/dattri/func/test_proj.py")
SELECTION = ("test_fisher.py", "test_proj.py::TestGetProjection")

CONFTEST = '''"""Seed random, numpy and torch before each test (from run_dattri_suite.py)."""

import os
import random

import numpy as np
import pytest
import torch

SEED = int(os.environ["PEER_SEED"])
_default_rng = np.random.default_rng


@pytest.fixture(autouse=True)
def _seed_everything(monkeypatch):
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    # Unseeded default_rng() draws OS entropy: give it the test's seed instead.
    monkeypatch.setattr(
        np.random,
        "default_rng",
        lambda seed=None: _default_rng(SEED if seed is None else seed),
    )
    yield
'''

PYTEST_INI = "[pytest]\naddopts = -p no:cacheprovider\n"


def dattri_test_files() -> dict[str, str]:
    """Paths of dattri's shipped test files, by base name."""
    import importlib.metadata as md

    try:
        files = md.files("dattri") or []
    except md.PackageNotFoundError:
        sys.exit("dattri is not installed: pip install --no-deps dattri==0.1.0")
    version = md.version("dattri")
    if version != "0.1.0":
        sys.exit(f"dattri {version} is installed; the peer suite is dattri 0.1.0's.")
    found = {str(f): str(f.locate()) for f in files if str(f) in TEST_FILES}
    missing = [t for t in TEST_FILES if t not in found]
    if missing:
        sys.exit(f"dattri 0.1.0's wheel should ship {missing}; not found.")
    return {os.path.basename(k): v for k, v in found.items()}


def rewrite_imports(source: str, filename: str) -> str:
    """Point the imports of those functions at attribkit.functional; nothing else."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom) or node.module not in SEED_FUNCTIONS:
            continue
        ours = [a for a in node.names if a.name in SEED_FUNCTIONS[node.module]]
        if not ours:
            continue
        theirs = [a for a in node.names if a.name not in SEED_FUNCTIONS[node.module]]

        def names(aliases):
            return ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in aliases)

        new = ""
        if theirs:
            new += f"from {node.module} import {names(theirs)}\n"
        new += f"from attribkit.functional import {names(ours)}\n"
        edits.append((node.lineno - 1, node.end_lineno, new))
    if not edits:
        raise SystemExit(f"{filename}: no import of dattri's functions found to rewrite.")
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = [new]
    return "".join(lines)


def prepare(folder: str, sources: dict[str, str], target: str) -> None:
    os.makedirs(folder)
    for name, path in sources.items():
        with open(path) as f:
            text = f.read()
        if target == "attribkit":
            text = rewrite_imports(text, name)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    with open(os.path.join(folder, "conftest.py"), "w") as f:
        f.write(CONFTEST)
    with open(os.path.join(folder, "pytest.ini"), "w") as f:
        f.write(PYTEST_INI)


def run(folder: str, seed: int, timeout: float) -> dict[str, str]:
    """Outcome (passed / failed / error / skipped) of each selected test."""
    report = os.path.join(folder, f"junit-{seed}.xml")
    env = dict(os.environ, PEER_SEED=str(seed))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, "-m", "pytest", "-q", f"--junitxml={report}", *SELECTION]
    proc = subprocess.run(
        cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )
    if not os.path.exists(report):
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"pytest wrote no report in {folder} (exit {proc.returncode}).")
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test = f"{case.get('classname').rpartition('.')[2]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[test] = (
            "failed"
            if "failure" in kinds
            else "error"
            if "error" in kinds
            else "skipped"
            if "skipped" in kinds
            else "passed"
        )
    if proc.returncode not in (0, 1):
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    failing = [t for t, o in outcomes.items() if o in ("failed", "error")]
    if failing:
        # Keep the reasons: the short summary lines name each failure.
        summary = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        outcomes["_summary"] = "\n".join(summary)
    return outcomes


def table(results: dict, targets, seeds) -> str:
    """Rows: tests; columns: seeds; cells: the outcome per target, ``dattri/attribkit``."""
    tests = sorted({t for r in results.values() for t in r if not t.startswith("_")})
    short = {"passed": "pass", "failed": "FAIL", "error": "ERR", "skipped": "skip"}
    label = "cells: " + "/".join(targets)
    width = max(len(label), *(len(t) for t in tests))
    cell = max(7, 5 * len(targets) - 1)
    rows = [f"{label:<{width}}  " + "  ".join(f"{f'seed {s}':>{cell}}" for s in seeds)]
    rows.append("-" * len(rows[0]))
    for t in tests:
        cells = [
            "/".join(short.get(results[(tg, s)].get(t, "-"), "-") for tg in targets) for s in seeds
        ]
        rows.append(f"{t:<{width}}  " + "  ".join(f"{c:>{cell}}" for c in cells))
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--target", choices=("both", "dattri", "attribkit"), default="both")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    targets = ("dattri", "attribkit") if args.target == "both" else (args.target,)
    sources = dattri_test_files()
    root = tempfile.mkdtemp(prefix="attribkit-peer-")
    results = {}
    try:
        for target in targets:
            prepare(os.path.join(root, target), sources, target)
        for seed in args.seeds:  # seed by seed, so a partial run compares like with like
            for target in targets:
                outcome = run(os.path.join(root, target), seed, args.timeout)
                results[(target, seed)] = outcome
                cells = ", ".join(
                    f"{t.partition('::')[2]}={o}"
                    for t, o in sorted(outcome.items())
                    if not t.startswith("_") and o != "skipped"
                )
                print(f"{target:>9} seed {seed}: {cells}", flush=True)
                if outcome.get("_summary"):
                    print("    " + outcome["_summary"].replace("\n", "\n    "), flush=True)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(results, targets, args.seeds))
    if set(targets) != {"dattri", "attribkit"}:
        return 0
    regressions = [
        (seed, test)
        for seed in args.seeds
        for test, outcome in results[("dattri", seed)].items()
        if outcome == "passed" and results[("attribkit", seed)].get(test) != "passed"
    ]
    print()
    if regressions:
        print("FAILED: tests that pass against dattri but not against attribkit:")
        for seed, test in regressions:
            print(f"  seed {seed}: {test} ({results[('attribkit', seed)].get(test)})")
        return 1
    print("OK: every test that passes against dattri passes against attribkit.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
