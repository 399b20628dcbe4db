"""Sphinx configuration of the attribkit documentation (``make docs``).

The build runs offline by default and with warnings as errors. Switches, all
environment variables:

``ATTRIBKIT_DOCS_INTERSPHINX=1``
    Link the types of other projects (Python, numpy, torch, scikit-learn, scipy)
    to their documentation through intersphinx; needs the network. Off by
    default, because the machines that build the docs in CI reach only package
    registries and intersphinx has no offline fallback that stays silent under
    ``-W``. Without it those names render as plain text (``nitpick_ignore_regex``
    below); references to attribkit's own names are always checked (``nitpicky``).
``ATTRIBKIT_DOCS_GALLERY=0``
    Build the example gallery without running the examples (no figures), for a
    quick look at the other pages.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The checkout's attribkit, not another installed copy, is the one documented.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from numpydoc.xref import DEFAULT_LINKS  # noqa: E402
from sphinx.util import logging  # noqa: E402

import attribkit  # noqa: E402

logger = logging.getLogger(__name__)

project = "attribkit"
author = "the attribkit developers"
copyright = "the attribkit developers, BSD-3-Clause"
release = attribkit.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "sphinx_copybutton",
]

templates_path = ["_templates"]
exclude_patterns = ["_build"]
root_doc = "index"
default_role = "py:obj"
nitpicky = True
# Names that belong to other projects: plain text unless intersphinx can link them.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|scipy|sklearn|joblib|tqdm|transformers|peft|safetensors)(\..*)?"),
    (
        r"py:.*",
        r"(int|float|str|bool|bytes|dict|list|tuple|set|callable|object|None|True|False|type"
        r"|iterable|sequence|generator|scalar|array_like|contextlib\..*)",
    ),
    (r"py:.*", r"(os\.PathLike|pathlib\..*|collections\..*|typing\..*|Mapping|Sequence|Iterable)"),
    # numpydoc links int, str, True, array_like, ... to Python's and numpy's docs
    (r".*", r"(python|numpy):.*"),
]

# ------------------------------------------------------------------ autodoc / autosummary
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True}
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
autodoc_member_order = "groupwise"


def _skip_foreign_members(app, what, name, obj, skip, options):
    """Leave out what attribkit's classes inherit from scikit-learn.

    ``get_params``, ``set_params``, ``fit_transform``, ``set_output`` and the
    metadata-routing methods are scikit-learn's and documented there (the
    BaseEstimator page says so); their docstrings cross-reference scikit-learn's
    own user guide, which this site does not have. The same for what an
    exception inherits from Python's (``with_traceback``, ``add_note``): a
    method descriptor of a built-in class has no ``__module__``, only its
    ``__objclass__``.
    """
    module = getattr(obj, "__module__", None) or ""
    if not module and hasattr(obj, "__objclass__"):
        module = getattr(obj.__objclass__, "__module__", "") or ""
    if module.split(".")[0] in ("sklearn", "builtins"):
        return True
    return skip


# ------------------------------------------------------------------ numpydoc
numpydoc_show_class_members = False  # autosummary/autodoc list the members
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = True
# Only the names below become links in a "Parameters" type; shapes and words such as
# "(n_samples, n_features)" or "default" stay text (scikit-learn's choice).
numpydoc_xref_ignore = "all"
numpydoc_xref_aliases = {
    **{name: f"attribkit.{name}" for name in attribkit.__all__ if name[0].isupper()},
    "Module": "torch.nn.Module",
    "nn.Module": "torch.nn.Module",
    "Tensor": "torch.Tensor",
    "DataLoader": "torch.utils.data.DataLoader",
    "Dataset": "torch.utils.data.Dataset",
    "ndarray": "numpy.ndarray",
    "memmap": "numpy.memmap",
    "Pipeline": "sklearn.pipeline.Pipeline",
}
# Every docstring is checked against numpydoc's rules, except these optional parts:
# ES01 extended summary, SA01 See Also, GL01/GL02 where the summary starts (the
# house style starts it on the line of the opening quotes), and EX01 (an Examples
# section) on methods: _check_examples below asks it of every public class and
# function, as the project's guide does, not of each fit/transform.
numpydoc_validation_checks = {"all", "ES01", "SA01", "GL01", "GL02", "EX01"}
numpydoc_validation_exclude = {
    r"\.__\w+__$",  # dunder methods
    # a module-level constant: numpydoc would validate the docstring of its type (str)
    r"^attribkit\.functional\.EKFAC_CACHE_KEY$",
}

# ------------------------------------------------------------------ intersphinx
if os.environ.get("ATTRIBKIT_DOCS_INTERSPHINX", "0") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "scipy": ("https://docs.scipy.org/doc/scipy", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
        "sklearn": ("https://scikit-learn.org/stable", None),
    }
    numpydoc_xref_aliases["array-like"] = ":term:`array-like <sklearn:array-like>`"
else:
    intersphinx_mapping = {}
    # numpydoc links int, bool, array_like, ... to Python's and numpy's inventories
    # ("python:int"), which would show as that text here: name them plainly instead.
    numpydoc_xref_aliases["array-like"] = "array-like"  # not a name: stays text
    for _word, _link in DEFAULT_LINKS.items():
        _m = re.search(r"`(?:([^<`]+?) <)?(?:python:|numpy:)?([^<>`]+)>?`", _link)
        if _m and ("python:" in _link or "numpy:" in _link):
            numpydoc_xref_aliases.setdefault(_word, (_m.group(1) or _m.group(2)).strip())

# ------------------------------------------------------------------ gallery
_run_examples = os.environ.get("ATTRIBKIT_DOCS_GALLERY", "1") != "0"
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    # Every example runs at build time, in the quick sizes ExampleArgv passes;
    # distributed_ekfac.py runs as one process (torchrun is not used here).
    "filename_pattern": r".*\.py$" if _run_examples else r"^$",
    "plot_gallery": "True",
    "reset_argv": "_gallery.reset_argv",
    "image_scrapers": ("matplotlib", "_gallery.figure_file_scraper"),
    "within_subsection_order": "_gallery.example_order",
    "abort_on_example_error": True,
    "doc_module": ("attribkit",),
    "backreferences_dir": "api/generated/backreferences",
    "remove_config_comments": True,
    "download_all_examples": False,
    "show_memory": False,
    "min_reported_time": 1,
}

# ------------------------------------------------------------------ HTML
html_theme = "pydata_sphinx_theme"
html_title = f"attribkit {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 5,
    "secondary_sidebar_items": ["page-toc", "sourcelink"],
}
html_static_path = ["_static"]
html_css_files = ["attribkit.css"]
html_show_sourcelink = True
html_copy_source = True

# sphinx-copybutton: copy code without the >>> / ... prompts and without output lines
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True


def _docstring_location(obj, name: str) -> str | None:
    """Where Sphinx reports a docstring's warnings: "file:docstring of name"."""
    try:
        return f"{inspect.getsourcefile(inspect.unwrap(obj))}:docstring of {name}"
    except TypeError:
        return None


_warned_examples: set[str] = set()


def _check_examples(app, what, name, obj, options, lines):
    """Warn (once per name) when a public class or function has no Examples section."""
    if (
        what in ("class", "exception", "function")
        and name not in _warned_examples
        and not any(line.strip() == "Examples" for line in lines)
    ):
        _warned_examples.add(name)
        logger.warning(
            "[numpydoc] Validation warnings while processing docstring for %r:\n"
            "  EX01: No examples section found (required of public classes and functions)",
            name,
            location=_docstring_location(obj, name),
        )


def setup(app):
    app.connect("autodoc-skip-member", _skip_foreign_members)
    # Before numpydoc (priority 500) rewrites the sections into RST fields.
    app.connect("autodoc-process-docstring", _check_examples, priority=100)
