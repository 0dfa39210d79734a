# Quick start on a fresh machine:  make demo  &&  make test
# torch is constrained to the local CPU build (constraints.txt) so no CUDA wheels are pulled;
# pyproject.toml itself accepts any torch >= 2.1.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet -c constraints.txt

.PHONY: install install-test install-docs demo test docs slurm bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PIP) -e ".[docs]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

install-docs: $(VENV)/.installed-docs

# 2 torch threads: the README's demo block was made with them (tests/test_readme.py); the scores are
# byte-identical only at the same thread count
demo: install
	$(BIN)/perturbkit demo --threads 2 --force

test: install-test
	$(BIN)/python -m pytest -q

# the site: docs/_build/html/index.html (Sphinx, warnings as errors) with the tutorials as executed notebooks.
# Tutorials whose executed copy (docs/tutorials/NAME.ipynb, written by `make test` too) is missing or older than
# the script or the package are executed first; the build never executes them.
docs: install-docs
	$(BIN)/python docs/notebooks.py --stale
	$(BIN)/python -m sphinx -b html -E -W --keep-going -q docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# the SLURM system tests alone (tests/test_slurm.py): a throw-away single-node cluster on localhost runs the
# benchmark and tuning workers through Snakemake's SLURM executor. Needs root and Debian's slurm-wlm and munge
# (apt-get install slurm-wlm munge); fails rather than skips when they are missing.
slurm: install-test
	PERTURBKIT_SYSTEM_TESTS=1 $(BIN)/python -m pytest -q tests/test_slurm.py

bench: install
	$(BIN)/python benchmarks/bench_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build docs/tutorials tutorials/runs
