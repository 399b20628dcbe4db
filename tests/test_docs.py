"""The documentation's code runs: guides (doctests), README's first example, API index.

The site itself is built by ``make docs`` / ``make docs-check`` (the latter in
``.ci/run``); these checks need no Sphinx and run with the test suite.

* Every ``docs/guide/*.rst`` is a doctest file: its ``>>>`` examples run in
  order in one namespace, and their printed output must match. No guide is
  skipped: every part of the API they document has landed, so a skip would
  hide a regression.
* README's "In ten lines" code blocks run as written.
* ``docs/api/index.rst`` lists every public name, so that no new name is left
  without its reference page.
"""

from __future__ import annotations

import doctest
import re
import warnings
from pathlib import Path

import pytest
import torch

import attribkit as ak

ROOT = Path(__file__).resolve().parent.parent
GUIDES = sorted(p for p in (ROOT / "docs" / "guide").glob("*.rst") if p.name != "index.rst")
# Guides without >>> examples: tables measured by benchmarks/, code from examples/.
NO_CODE = {"benchmarks.rst", "distributed.rst"}


@pytest.mark.parametrize("path", GUIDES, ids=[p.name for p in GUIDES])
def test_guide_doctests(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a guide writes land here
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # attribkit's warnings (UserWarning and its subclasses) must not surprise a reader
        warnings.simplefilter("error", UserWarning)
        result = doctest.testfile(
            str(path),
            module_relative=False,
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
            raise_on_error=False,
        )
    assert result.attempted > 0 or path.name in NO_CODE, f"{path.name} has no >>> examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


def _readme_section(title: str) -> str:
    text = (ROOT / "README.rst").read_text()
    start = text.index(f"\n{title}\n{'=' * len(title)}\n")
    end = re.search(r"\n[^\n]+\n=+\n", text[start + len(title) + 2 :])
    return text[start : start + len(title) + 2 + (end.start() if end else len(text))]


def _code_blocks(rst: str) -> list[str]:
    blocks = []
    for m in re.finditer(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", rst):
        lines = [line[4:] for line in m.group(1).splitlines()]
        blocks.append("\n".join(lines))
    return blocks


def test_readme_first_example_runs():
    blocks = _code_blocks(_readme_section("In ten lines"))
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.rst", "exec"), namespace)
    scores, top_idx = namespace["scores"], namespace["top_idx"]
    assert scores.shape == (5, 1347) and top_idx.shape == (5, 3)
    # the strongest proponent has the largest score
    assert torch.equal(top_idx[:, 0], scores.argmax(1))


def _api_index_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    module = None
    in_table = False
    for line in (ROOT / "docs" / "api" / "index.rst").read_text().splitlines():
        if m := re.match(r"\.\. currentmodule:: (\S+)", line):
            module = m.group(1)
        elif line.startswith(".. autosummary::"):
            in_table = True
        elif in_table and re.match(r"   [A-Za-z_]\w*$", line):
            names.setdefault(module, set()).add(line.strip())
        elif in_table and line and not line.startswith("   "):
            in_table = False
    return names


def test_api_index_lists_every_public_name():
    import attribkit.evaluation
    import attribkit.functional

    listed = _api_index_names()
    modules = (ak, attribkit.functional, attribkit.evaluation)
    for module in modules:
        public = {n for n in module.__all__ if not _is_submodule(getattr(module, n))}
        assert listed.get(module.__name__, set()) == public, (
            f"docs/api/index.rst must list exactly the public names of {module.__name__}: "
            f"missing {sorted(public - listed.get(module.__name__, set()))}, "
            f"extra {sorted(listed.get(module.__name__, set()) - public)}"
        )


def _is_submodule(obj) -> bool:
    return type(obj).__name__ == "module"


def test_readme_transformers_example_runs():
    """README's "Transformers and LoRA" blocks, as written: raw peft GPT-2, dict batches."""
    pytest.importorskip("peft")
    blocks = _code_blocks(_readme_section("Transformers and LoRA"))
    assert len(blocks) == 2
    namespace: dict = {}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for block in blocks:
            exec(compile(block, "README.rst", "exec"), namespace)
    lora, ekfac, top_idx = namespace["lora"], namespace["ekfac"], namespace["top_idx"]
    adapters = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert list(ekfac.param_shapes_) == adapters and len(ekfac.layers_) == 8
    assert top_idx.shape == (8, 5)
    # The test batch is the first training batch: each sequence is its own top proponent.
    assert top_idx[:, 0].tolist() == list(range(8))
