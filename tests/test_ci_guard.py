"""The CI guard: a test that crashes the interpreter fails the run and is named."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

GUARD = os.path.join(os.path.dirname(__file__), os.pardir, ".ci", "pytest_guarded.py")


def test_segfault_fails_the_run_and_names_the_test(tmp_path):
    (tmp_path / "test_crash.py").write_text(
        textwrap.dedent(
            """
            import ctypes

            def test_fine():
                pass

            def test_segfaults():
                ctypes.string_at(0)  # reads address 0: SIGSEGV

            def test_never_reached():
                pass
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, GUARD, "-q", "-p", "no:cacheprovider", "test_crash.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "killed by SIGSEGV while running test_crash.py::test_segfaults" in proc.stderr
    assert "Fatal Python error: Segmentation fault" in proc.stderr  # faulthandler's traceback


def test_passing_and_failing_runs_keep_their_status(tmp_path):
    (tmp_path / "test_ok.py").write_text("def test_ok():\n    pass\n")
    (tmp_path / "test_bad.py").write_text("def test_bad():\n    assert False\n")
    run = [sys.executable, GUARD, "-q", "-p", "no:cacheprovider"]
    ok = subprocess.run([*run, "test_ok.py"], cwd=tmp_path, capture_output=True, timeout=120)
    bad = subprocess.run([*run, "test_bad.py"], cwd=tmp_path, capture_output=True, timeout=120)
    assert ok.returncode == 0 and bad.returncode == 1
