#!/usr/bin/env python
"""Run pytest so that a crash (segfault, abort) in one test cannot pass unnoticed.

``python .ci/pytest_guarded.py [pytest args...]`` runs ``python -m pytest -p
faulthandler -p pytest_guarded [args...]`` in a child process. This file is
also that plugin: as each test starts, it writes the test's node id into the
file named by ``ATTRIBKIT_LAST_TEST``. When the child dies by a signal, the
script prints which test was running and exits with status 1, so
``make test`` and ``.ci/run`` fail and name the test; faulthandler's
traceback of the crashing thread is printed above it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile


def pytest_runtest_logstart(nodeid, location):
    """Plugin hook (in the pytest child): record the test that is starting."""
    path = os.environ.get("ATTRIBKIT_LAST_TEST")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(nodeid)


def main(argv: list[str]) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="attribkit-pytest-") as tmp:
        last = os.path.join(tmp, "last-test")
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, ATTRIBKIT_LAST_TEST=last, PYTHONPATH=path)
        cmd = [sys.executable, "-m", "pytest", "-p", "faulthandler", "-p", "pytest_guarded"]
        status = subprocess.call([*cmd, *argv], env=env)
        if status >= 0:
            return status
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        test = "(no test had started)"
        if os.path.exists(last):
            with open(last, encoding="utf-8") as fh:
                test = fh.read().strip() or test
        print(
            f"\n*** pytest was killed by {name} while running {test}\n"
            "*** The suite did not finish, so this run FAILS. Reproduce with: "
            f"python -m pytest -p faulthandler '{test}'",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
