# brats-lightning: every command a user needs. `make demo` and `make test` work from a clean clone.
# Variables can be overridden: `make install TORCH="torch==2.13.0 --index-url ..."`, `make train ARGS="fold=1"`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip command as everything else, so pip never picks a different build.
TORCH ?= torch==2.13.0
ARGS ?=
DEMO_NAME ?= demo

.PHONY: install test demo train ensemble lint bench bench-gpu clean-demo

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[dev,cluster]"
	touch $@

install: $(BIN)/.installed  ## create .venv and install the package with its dependencies

test: install  ## run the test suite (CPU, about 10 minutes on 2 cores)
	WANDB_MODE=disabled $(BIN)/python -m pytest

lint: install  ## static checks
	$(BIN)/ruff check brats_lightning tests benchmarks train.py
