"""Fail a docs build on any warning, and list them where a CI log shows them.

``python docs/check_warnings.py WARNINGS_FILE`` reads the file that
``sphinx-build --keep-going -w WARNINGS_FILE`` wrote and fails (exit 1) when it
holds any warning, as ``make docs`` (``sphinx-build -W``) does. The build's own
output interleaves its warnings with the gallery's and autosummary's progress
lines; this prints each warning once at the end, sorted into those from
attribkit's docstrings (numpydoc validation, bad RST, unresolved references:
fix the docstring) and the others (the configuration, the guides, the gallery,
the API index).

``make docs-check`` (run by ``.ci/run``) builds the site and runs this.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def records(text: str) -> list[str]:
    """Split a warnings file into warnings; indented lines continue the previous one."""
    out: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith((" ", "\t")) and out:
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def from_docstring(record: str) -> bool:
    """Whether a warning is about a docstring of attribkit."""
    return bool(
        re.search(r":docstring of attribkit[.:]", record)
        or re.match(r"WARNING: \[numpydoc\] .* docstring for '?attribkit\.", record)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("warnings", type=Path, help="the file of sphinx-build -w")
    args = parser.parse_args(argv)
    # numpydoc reports some docstrings once per page that renders them: keep one of each.
    found = list(
        dict.fromkeys(r.replace(str(ROOT) + "/", "") for r in records(args.warnings.read_text()))
    )
    docstrings = [r for r in found if from_docstring(r)]
    others = [r for r in found if not from_docstring(r)]
    if docstrings:
        print(f"{len(docstrings)} warnings from attribkit's docstrings:", *docstrings, sep="\n")
    if others:
        print(f"{len(others)} warnings outside attribkit's docstrings:", *others, sep="\n")
    if found:
        return 1
    print("docs: no warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
