# `make demo` and `make test` are the whole quick start: each creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rsedge-installed
# TORCH_INDEX=cpu: torch and torchvision from PyTorch's CPU-only wheel index first (no GPU: this
# skips several GB of CUDA libraries); any other name of that index works too, e.g. cu126.
TORCH_INDEX ?=

.PHONY: setup demo test test-all lint clean

# torch and torchvision come from the registry together (the newest torchvision pins its torch);
# a separately installed torch would not match torchvision's compiled operators.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet torch torchvision \
		--index-url https://download.pytorch.org/whl/$(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[host,dev]'
	@touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/rsedge demo

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/vermin -q --no-tips --violations -t=3.6- --eval-annotations runtime
	bash docker/lint.sh

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
