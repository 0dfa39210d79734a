# Quick start on a fresh machine:  make demo  &&  make test
# torch is constrained to the local CPU build (constraints.txt) so no CUDA wheels are pulled;
# pyproject.toml itself accepts any torch >= 2.1.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.perturbkit-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/perturbkit demo --force

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
