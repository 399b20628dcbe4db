# attribkit developer entry points. Run `make` (or `make help`) for a list.

PYTHON ?= python3
PIP := $(PYTHON) -m pip
# CPU-only torch release installed when no torch is present and no NVIDIA GPU is found.
TORCH_CPU_VERSION ?= 2.13.0
LINT_PATHS := $(wildcard attribkit tests benchmarks examples docs)

# Keep idle OpenMP threads from spinning (the test/bench machines have few cores).
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY

.DEFAULT_GOAL := help
.PHONY: help install demo test lint bench peer-test docs docs-check gpu-check

help:  ## list the targets
	@echo "attribkit make targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /\1\t/' | awk -F '\t' '{printf "  %-11s %s\n", $$1, $$2}'

install:  ## install torch if missing (CPU wheel without a GPU) and attribkit in editable mode
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') already installed; keeping it"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "nvidia-smi found: installing the default (CUDA) torch build"; \
		$(PIP) install torch; \
	else \
		echo "no torch and no NVIDIA GPU: installing torch==$(TORCH_CPU_VERSION)"; \
		$(PIP) install "torch==$(TORCH_CPU_VERSION)"; \
	fi
	$(PIP) install -e .

demo: install  ## set up and run examples/quickstart.py (digits: scores, LOO/LDS, figures)
	$(PIP) install -e ".[examples]"
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PYTHON) examples/quickstart.py

# .ci/pytest_guarded.py runs pytest in a child process: a test that crashes the
# interpreter (segfault, abort) fails the run and is named, instead of passing unnoticed.
test: install  ## set up and run the test suite
	$(PIP) install -e ".[test]"
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PYTHON) .ci/pytest_guarded.py -q

lint:  ## ruff check + format check
	$(PIP) install ruff
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)

bench: install  ## set up and run every benchmark (dattri, kronfluence best-effort)
	$(PIP) install -e ".[bench]"
	$(PIP) install --no-deps dattri==0.1.0 || echo "dattri not installed; skipping it"
	$(PIP) install --no-deps kronfluence==1.0.1 einops==0.8.2 opt-einsum==3.4.0 einconv==0.1.0 \
		accelerate || echo "kronfluence not installed; skipping it"
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PYTHON) benchmarks/run.py

# dattri's own tests of the functions attribkit.functional mirrors, against attribkit.functional (needs PyPI).
# Not part of `make test`: it installs dattri 0.1.0 (--no-deps: its tests import only
# torch and numpy besides dattri) and takes minutes (several seeds, both libraries).
PEER_SEEDS ?= 0 1 2 3 4
peer-test: install  ## run dattri 0.1.0's func tests against attribkit.functional
	$(PIP) install --no-deps dattri==0.1.0
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PYTHON) tests/peer/run_dattri_suite.py --seeds $(PEER_SEEDS)

# The Sphinx site: API reference, guides, and the gallery, which runs examples/*.py
# (quick variants; about 2 minutes on 2 cores). Always a clean build, so that a page
# generated for a name that no longer exists cannot linger. DOCS_SPHINXOPTS=--keep-going
# builds without -W while editing; docs/conf.py lists the other switches.
DOCS_SPHINXOPTS ?= -W --keep-going
DOCS_CLEAN := docs/_build docs/api/generated docs/auto_examples docs/sg_execution_times.rst
docs: install  ## build the documentation site into docs/_build/html (warnings are errors)
	$(PIP) install -e ".[docs]"
	rm -rf $(DOCS_CLEAN)
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PYTHON) -m sphinx $(DOCS_SPHINXOPTS) -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

# What .ci/run builds: `make docs`, equally strict (any warning fails it), but the build
# goes on to the end and docs/check_warnings.py lists every warning once, at the end of
# the log, sorted into attribkit's docstrings and the rest.
docs-check: install  ## build the site; fail on any warning, listed at the end
	$(PIP) install -e ".[docs]"
	rm -rf $(DOCS_CLEAN)
	mkdir -p docs/_build
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PYTHON) -m sphinx --keep-going -w docs/_build/warnings.txt -b html docs docs/_build/html
	$(PYTHON) docs/check_warnings.py docs/_build/warnings.txt

# On a machine with an NVIDIA GPU: `pytest -m cuda` and a short benchmark (fast_jl and
# torch projection, CPU/CUDA bit-identity, EK-FAC and per-example gradients on GPT-2
# small in float32 and bfloat16, nccl) in one table, within about 5 minutes; fast_jl
# (the `cuda` extra) is installed when missing and it builds. Without a GPU: one line,
# exit 0. `python benchmarks/gpu_check.py --dry-run` runs every row on the CPU, tiny.
gpu-check:  ## CUDA tests + a short GPU benchmark, one table (skips without a GPU)
	@if $(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
		$(MAKE) --no-print-directory install && \
		$(PIP) install -q -e ".[test]" transformers && \
		{ $(PYTHON) -c "import fast_jl" 2>/dev/null || $(PIP) install -q -e ".[cuda]" \
			|| echo "gpu-check: fast_jl did not install; its row is skipped"; } && \
		OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PYTHON) benchmarks/gpu_check.py; \
	else \
		echo "gpu-check: skipped: no CUDA GPU visible to torch"; \
	fi
