"""How the example gallery runs ``examples/*.py`` at build time (sphinx-gallery hooks).

The examples are the runnable scripts users copy, unchanged: the gallery runs
each one in the sizes chosen here (:func:`reset_argv`), shows its printed
output, and shows the figures it saves to files (:data:`figure_file_scraper`),
since ``examples/quickstart.py`` writes its figures with ``savefig`` and closes
them instead of leaving them open for sphinx-gallery's matplotlib scraper.

conf.py names these hooks by their qualified names (``"_gallery.reset_argv"``)
so that Sphinx can cache its configuration.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sphinx_gallery.scrapers import figure_rst

# Where examples write their figures during the build; emptied before each example.
OUTPUT = Path(__file__).resolve().parent / "_build" / "example_output"

# Command-line arguments per example: the quick variants, so the whole build takes
# a few minutes on 2 cores. quickstart.py --quick and transformer_lora.py --quick are
# the variants tests/test_examples.py checks; the others are small at their defaults.
# distributed_ekfac.py runs as one process (it needs torchrun for more).
ARGV = {
    "quickstart.py": ["--quick", "--out", str(OUTPUT / "quickstart")],
    "transformer_lora.py": ["--quick"],
}

# Gallery order: the whole story first, then the single topics.
ORDER = [
    "quickstart.py",
    "label_noise.py",
    "transformer_lora.py",
    "pipeline.py",
    "distributed_ekfac.py",
]


def reset_argv(gallery_conf, script_vars) -> list[str]:
    """``sys.argv[1:]`` for the example being run."""
    name = Path(script_vars["src_file"]).name
    target = OUTPUT / name.removesuffix(".py")
    if target.exists():
        shutil.rmtree(target)
    return list(ARGV.get(name, []))


def example_order(filename: str) -> tuple[int, str]:
    """Sort key of an example file name: ORDER first, then alphabetical."""
    name = Path(filename).name
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


class FigureFileScraper:
    """Collect the PNG files an example saved under OUTPUT into the gallery page.

    After each code block, every PNG written under ``OUTPUT`` is moved to the
    gallery's image path for that example (so it becomes the page's figure and
    the first one its thumbnail), in the order the files were written.
    """

    def __repr__(self) -> str:
        return "FigureFileScraper"

    def __call__(self, block, block_vars, gallery_conf) -> str:
        if not OUTPUT.exists():
            return ""
        pngs = sorted(OUTPUT.rglob("*.png"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        images = []
        for png in pngs:
            path = block_vars["image_path_iterator"].next()
            shutil.move(str(png), path)
            images.append(path)
        # One full-width figure each (a list would become a row of thumbnails).
        return "".join(figure_rst([image], gallery_conf["src_dir"]) for image in images)


figure_file_scraper = FigureFileScraper()
