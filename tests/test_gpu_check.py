"""``benchmarks/gpu_check.py --dry-run``: every row of ``make gpu-check`` runs on the CPU.

The real check needs an NVIDIA GPU; its dry run exercises the same code at tiny
sizes, so the script cannot rot on machines without one. The GPT-2 rows
(dict batches, ``loss="causal_lm"``, ``Conv1D`` in EK-FAC) need transformers.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    path = ROOT / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


CPU = torch.device("cpu")


def rows_ok(table, allowed=("ok", "skip")):
    assert table.rows, "no row"
    assert all(r[3] in allowed for r in table.rows), table.failures or table.rows
    return table.rows


def test_projection_rows(gpu_check):
    table = gpu_check.Table()
    gpu_check.projection(table, CPU, gpu_check.SIZES["dry"]["proj"])
    rows = rows_ok(table)
    assert [r[3] for r in rows] == ["skip", "ok"]  # fast_jl needs CUDA; torch runs
    assert "examples/s" in rows[1][2]


def test_bit_identity_rows(gpu_check):
    table = gpu_check.Table()
    gpu_check.bit_identity(table, CPU, gpu_check.SIZES["dry"]["ident"])
    rows = rows_ok(table, allowed=("ok",))
    assert len(rows) == 6 and all("identical" in r[2] for r in rows)


def test_distributed_row(gpu_check):
    table = gpu_check.Table()
    gpu_check.nccl_one_process(table, CPU)
    (row,) = rows_ok(table, allowed=("ok",))
    assert row[1].startswith("gloo")


@pytest.mark.skipif(
    not importlib.util.find_spec("transformers"), reason="needs transformers for GPT-2"
)
def test_gpt2_rows(gpu_check):
    table = gpu_check.Table()
    gpu_check.gpt2(table, CPU, gpu_check.SIZES["dry"])
    rows = rows_ok(table, allowed=("ok",))
    assert len(rows) == 4
    assert all("max err vs f32" in r[2] for r in rows if "bfloat16" in r[1])


def test_no_gpu_is_one_line(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real check would run")
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.count("\n") == 1
