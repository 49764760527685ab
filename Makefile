# The two commands of the README: `make demo` and `make test`. Both create .venv when it is absent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required, found " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned to 2.13.0, so that where pip's configuration offers the CPU wheel (torch-2.13.0+cpu in the
# local wheel folder of this project's machines) pip takes it instead of resolving a multi-GB CUDA build. A torch
# already in .venv is kept: install your own build there first (a CUDA one; pyproject.toml asks for torch>=2.4).
$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,hdf5]"
	touch $@

demo: $(INSTALLED)
	$(BIN)/dynmm demo

lint: $(INSTALLED)
	$(BIN)/ruff check platform tests bench examples

test: lint
	$(BIN)/python -m pytest

# the inner loop: everything that starts nothing (no Ray, no Train run, no server); tests are marked by what they start
test-fast: lint
	$(BIN)/python -m pytest -m "not integration"

bench: $(INSTALLED)
	$(BIN)/python bench/dynamic_inference.py
	$(BIN)/python bench/latency_vs_flops.py
	$(BIN)/python bench/data_throughput.py

clean:
	rm -rf .dynmm
