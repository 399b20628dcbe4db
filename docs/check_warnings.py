"""Sort the warnings of a docs build: attribkit's docstrings, or everything else.

``python docs/check_warnings.py WARNINGS_FILE [--write]`` reads the file that
``sphinx-build -w WARNINGS_FILE`` wrote and

* fails (exit 1) on any warning that does not come from a docstring of
  attribkit: the configuration, the guides, the gallery and the API index must
  build clean;
* lists the warnings that come from attribkit's docstrings (numpydoc validation,
  bad RST, unresolved references) and fails on them too, unless
  ``docs/DOCSTRING_WARNINGS.txt`` exists: that file is the list of known ones,
  waiting for a docstring pass. Delete it once they are fixed, and this check is
  as strict as ``make docs`` (``sphinx-build -W``);
* with ``--write``, (re)writes ``docs/DOCSTRING_WARNINGS.txt`` with them.

``make docs-check`` (run by ``.ci/run``) builds the site and runs this.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KNOWN = ROOT / "docs" / "DOCSTRING_WARNINGS.txt"


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
    parser.add_argument("--write", action="store_true", help=f"rewrite {KNOWN.name}")
    args = parser.parse_args(argv)
    # numpydoc reports some docstrings once per page that renders them: keep one of each.
    found = list(
        dict.fromkeys(r.replace(str(ROOT) + "/", "") for r in records(args.warnings.read_text()))
    )
    docstrings = [r for r in found if from_docstring(r)]
    others = [r for r in found if not from_docstring(r)]
    if args.write:
        KNOWN.write_text("".join(r + "\n" for r in docstrings))
        print(f"wrote {len(docstrings)} docstring warnings to {KNOWN.relative_to(ROOT)}")
    status = 0
    if others:
        print(f"{len(others)} warnings outside attribkit's docstrings:", *others, sep="\n")
        status = 1
    if docstrings:
        if KNOWN.exists():
            print(
                f"{len(docstrings)} warnings from attribkit's docstrings, tolerated while "
                f"{KNOWN.relative_to(ROOT)} lists the known ones (delete it once they are fixed)"
            )
        else:
            print(f"{len(docstrings)} warnings from attribkit's docstrings:")
            print(*docstrings, sep="\n")
            status = 1
    if status == 0:
        print("docs: no warning outside the known docstring ones")
    return status


if __name__ == "__main__":
    sys.exit(main())
