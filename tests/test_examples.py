"""Smoke tests of the runnable examples (each in a fresh interpreter, as a user runs it).

``quickstart.py --quick`` is the one-minute version of ``make demo``: it
retrains the models fewer times and itself asserts that the exact method's
mean LOO Spearman stays above 0.9; here its table and figures are checked too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(name, *args, timeout=900):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_quickstart_quick(tmp_path):
    pytest.importorskip("matplotlib")
    out = run_example("quickstart.py", "--quick", "--out", str(tmp_path))
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(.+?)\s{2,}(-?\d\.\d{3})\s+(-?\d\.\d{3})\s+(-?\d\.\d{3})\s+(\S+)", line)
        if m:
            rows[m.group(1).strip()] = [float(m.group(k)) for k in (2, 3, 4)]
    expected = rows['ExplicitIFVP fisher="expected"']
    exact = rows["exact Hessian (H + λI)⁻¹"]
    assert expected[1] > 0.9  # LOO Spearman
    assert abs(expected[2] - exact[2]) < 0.02  # LDS at the limit
    assert len(rows) == 10, rows  # every method reported
    for cg in ("IterativeIFVP(ggn)", "IterativeIFVP(ggn) + EK-FAC precond."):
        assert abs(rows[cg][2] - expected[2]) < 0.005  # CG reaches the Gauss-Newton limit
    for name in ("influence.png", "loo.png", "lds.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(path) in out  # printed where it is


@pytest.mark.slow
def test_pipeline_example():
    out = run_example("pipeline.py")
    assert "reloaded it in a fresh process: max |score difference| = 0" in out


@pytest.mark.slow
def test_label_noise_example():
    out = run_example("label_noise.py")
    found = re.search(r"ExplicitIFVP \((\w+) solver\)\s+(\d\.\d\d)", out)
    assert found and float(found.group(2)) > 0.5, out  # chance is 0.05


@pytest.mark.slow
def test_transformer_lora_quick():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = run_example("transformer_lora.py", "--quick")
    before, after = map(float, re.search(r"(\d+\.\d\d) before, (\d+\.\d\d) after", out).groups())
    assert after < before / 2, out  # the fine-tune learned the new templates
    assert "EK-FAC on 16 LoRA layers" in out
    share = int(re.search(r"EK-FAC influence\s+(\d+)%", out).group(1))
    assert share >= 75, out  # same-topic proponents; chance is 25%
    assert out.count("[generated]") == 2
