"""Imports run down: no cycle, no estimator family importing another, a low layer that stays low.

Every ``import`` of the package is read from the source (``ast``), at module
level and inside functions alike (a function-level import is how a cycle
hides until the function runs), relative ones resolved against the module's
package. An import of ``attribkit.a.b.c`` is an edge to that module and to
each package on its way that the importer is not itself inside (importing
``attribkit.ifvp.explicit`` from ``attribkit.projection`` runs
``attribkit/ifvp/__init__.py`` too); ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``.

The layers, from the bottom (see ``attribkit/_compute/__init__.py``)::

    config < _compute < base < projection, ifvp < gradients, _scores, persistence
           < functional < attribkit/__init__      (evaluation: on its own)
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "attribkit"

#: Rank of each top-level part of the package: an import may only point at
#: a part of lower rank (or its own part); equal ranks of different parts
#: are siblings that must not import each other.
RANKS = {
    "config": 0,
    "_compute": 1,
    "base": 2,
    "projection": 3,
    "ifvp": 3,
    "gradients": 4,
    "_scores": 4,
    "persistence": 4,
    "functional": 5,
    "evaluation": 0,
    "": 6,  # attribkit/__init__.py
}


def _modules(root: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    """``dotted name -> file`` of every module of the package under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(importer: str, level: int, target: str | None, modules: dict) -> str:
    """The absolute name of a (possibly relative) import in ``importer``."""
    if not level:
        return target or ""
    base = importer.split(".")
    if not _is_package(importer, modules):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _edges(root: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """``module -> attribkit modules it imports`` (see the module docstring)."""
    modules = _modules(root)
    top = root.name
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, node.level, node.module, modules)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target != top and not target.startswith(top + "."):
                    continue
                # The target and the packages on its way that the importer is not inside.
                parts = target.split(".")
                for i in range(2, len(parts) + 1):
                    step = ".".join(parts[:i])
                    if step in modules and not (name + ".").startswith(step + "."):
                        edges[name].add(step)
    return edges


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports that point up or sideways between the layers of ``RANKS``."""
    bad = []
    for importer, targets in sorted(edges.items()):
        here = _part(importer)
        for target in sorted(targets):
            there = _part(target)
            if there == here:
                continue
            if there not in RANKS or here not in RANKS or RANKS[there] >= RANKS[here]:
                bad.append((importer, target))
    return bad


def check(root: pathlib.Path = PACKAGE) -> list[str]:
    """Every violation as a sentence (empty when the layering holds)."""
    edges = _edges(root)
    problems = [f"import cycle: {' <-> '.join(c)}" for c in find_cycles(edges)]
    unranked = sorted({_part(m) for m in edges} - set(RANKS))
    problems += [f"attribkit.{part} is in no layer (RANKS)" for part in unranked]
    for importer, target in upward_imports(edges):
        problems.append(f"{importer} imports {target}, which is not below it")
    return problems


# --------------------------------------------------------------------------- the tests
def test_no_import_cycle():
    assert find_cycles(_edges()) == []


def test_projection_never_imports_ifvp():
    edges = _edges()
    bad = [
        (m, t)
        for m, targets in edges.items()
        if _part(m) == "projection"
        for t in targets
        if _part(t) == "ifvp"
    ]
    assert bad == []


def test_compute_imports_only_itself_and_config():
    edges = _edges()
    bad = [
        (m, t)
        for m, targets in edges.items()
        if _part(m) == "_compute"
        for t in targets
        if _part(t) not in ("_compute", "config")
    ]
    assert bad == []


#: What the low layer may import besides the standard library and attribkit.config.
LOW_LAYER_LIBRARIES = {"torch", "numpy", "scipy", "sklearn", "tqdm"}


def test_compute_imports_only_the_numerical_stack():
    bad = []
    for name, path in _modules().items():
        if _part(name) != "_compute":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [node.module.split(".")[0]]
            else:
                continue
            allowed = LOW_LAYER_LIBRARIES | set(sys.stdlib_module_names) | {"attribkit"}
            bad += [(name, top) for top in tops if top not in allowed]
    assert bad == []


def test_imports_only_run_down():
    assert check() == []


# --------------------------------------------------------------------------- the checker itself
def _tree(tmp_path, files: dict[str, str]) -> pathlib.Path:
    root = tmp_path / "attribkit"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


BASE = {
    "__init__.py": "from .projection import P\n",
    "config.py": "import torch\n",
    "_compute/__init__.py": "",
    "_compute/curvature.py": "from ..config import C\n",
    "base.py": "from ._compute import curvature\n",
    "projection/__init__.py": "from .arnoldi import P\n",
    "projection/arnoldi.py": "from .._compute.curvature import H\nfrom ..base import B\n",
    "ifvp/__init__.py": "from .explicit import E\n",
    "ifvp/explicit.py": "from ..base import B\n",
}


def test_checker_accepts_a_layered_tree(tmp_path):
    assert check(_tree(tmp_path, BASE)) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (  # a function-level import closes a cycle through a package __init__
            {"_compute/curvature.py": "def f():\n    from ..projection import P\n"},
            "import cycle: attribkit._compute.curvature <-> attribkit.base <-> "
            "attribkit.projection <-> attribkit.projection.arnoldi",
        ),
        (
            {"projection/arnoldi.py": "from ..ifvp.explicit import E\n"},
            "attribkit.projection.arnoldi imports attribkit.ifvp, which is not below it",
        ),
        (
            {"_compute/curvature.py": "import attribkit.base\n"},
            "attribkit._compute.curvature imports attribkit.base, which is not below it",
        ),
    ],
)
def test_checker_finds_violations(tmp_path, change, expected):
    problems = check(_tree(tmp_path, {**BASE, **change}))
    assert any(p.startswith(expected) for p in problems), problems
