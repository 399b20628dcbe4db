"""Declared dependencies match the code (setup.cfg's install_requires and extras).

Every third-party package that attribkit imports at module level is declared,
and each declared floor is at least the release that introduced the newest
API attribkit uses from that package (the table below says which API; the
whole suite was run at these floors, torch excepted).
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: import name -> distribution name, for the packages attribkit imports.
DISTRIBUTIONS = {
    "torch": "torch",
    "numpy": "numpy",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "tqdm": "tqdm",
    "safetensors": "safetensors",
}
#: Imported only inside functions, for optional features (an extra or none).
OPTIONAL = {"fast_jl": "cuda"}

#: distribution -> (lowest version that has it, what attribkit uses).
NEEDS = {
    "torch": ("2.3", "copy_ from torch.uint16 tensors (projection/_generator.py)"),
    "scikit-learn": (
        "1.6",
        "sklearn.utils.validation._check_feature_names and check_array(ensure_all_finite=)",
    ),
    "scipy": ("1.14", "scipy.stats.pearsonr(..., axis=0) (evaluation.py)"),
    "safetensors": ("0.4.4", "reading back a file without tensors (persistence.py)"),
    "numpy": ("1.24", "the oldest numpy the suite was run with"),
    "tqdm": ("4.60", "tqdm.auto (the oldest tested)"),
}


def _version(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _requirements(value: str) -> dict:
    """``name -> (operator, version)`` of a setup.cfg requirement list."""
    found = {}
    for line in value.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:(>=|==)\s*([0-9][0-9A-Za-z.]*))?", line)
        assert match, f"unparsed requirement {line!r}"
        found[match.group(1).lower()] = (match.group(2), match.group(3))
    return found


@pytest.fixture(scope="module")
def setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _module_level_imports() -> set:
    """Top-level package names attribkit imports outside functions."""
    names = set()
    for path in (ROOT / "attribkit").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            nodes = [node]
            if isinstance(node, ast.Try):  # try: import ... except ImportError
                nodes = node.body
            for item in nodes:
                if isinstance(item, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in item.names)
                elif isinstance(item, ast.ImportFrom) and item.level == 0 and item.module:
                    names.add(item.module.split(".")[0])
    return names


def _all_imports() -> set:
    names = set()
    for path in (ROOT / "attribkit").rglob("*.py"):
        for item in ast.walk(ast.parse(path.read_text())):
            if isinstance(item, ast.Import):
                names.update(alias.name.split(".")[0] for alias in item.names)
            elif isinstance(item, ast.ImportFrom) and item.level == 0 and item.module:
                names.add(item.module.split(".")[0])
    return names


def test_every_imported_package_is_declared(setup_cfg):
    required = _requirements(setup_cfg["options"]["install_requires"])
    stdlib = set(sys.stdlib_module_names) | {"attribkit", "__future__"}
    third_party = _module_level_imports() - stdlib
    unmapped = third_party - set(DISTRIBUTIONS)
    assert not unmapped, f"imports of packages this test does not know: {unmapped}"
    for name in third_party:
        assert DISTRIBUTIONS[name] in required, f"{name} is imported but not in install_requires"
    extras = {k: _requirements(v) for k, v in setup_cfg["options.extras_require"].items()}
    for name in _all_imports() - stdlib - set(DISTRIBUTIONS):
        assert name in OPTIONAL, f"{name} is imported but declared nowhere"
        assert name in extras[OPTIONAL[name]]


@pytest.mark.parametrize("dist", sorted(NEEDS))
def test_floors_cover_the_apis_used(setup_cfg, dist):
    required = _requirements(setup_cfg["options"]["install_requires"])
    operator, floor = required[dist]
    needed, what = NEEDS[dist]
    assert operator == ">=" and _version(floor) >= _version(needed), (
        f"install_requires allows {dist}>={floor}, but attribkit uses {what}, new in {needed}"
    )
    # ... and the installed version is one the floor admits.
    assert _version(importlib.metadata.version(dist)) >= _version(floor)


def test_hugging_face_packages_are_pinned_in_the_test_extra(setup_cfg):
    test = _requirements(setup_cfg["options.extras_require"]["test"])
    assert test["transformers"] == ("==", "5.24.0")
    assert test["peft"] == ("==", "0.21.2")
