# brats-lightning: every command a user needs. `make demo` and `make test` work from a clean clone.
# Variables can be overridden: `make install TORCH="torch==2.13.0 --index-url ..."`, `make train ARGS="fold=1"`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip command as everything else, so pip never picks a different build.
TORCH ?= torch==2.13.0
ARGS ?=
DEMO_NAME ?= demo

.PHONY: install test test-full demo train ensemble paper lint bench bench-gpu gpu-check

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[dev,cluster]"
	touch $@

install: $(BIN)/.installed  ## create .venv and install the package with its dependencies

test: install  ## run the test suite (CPU, about 6 minutes on 2 cores)
	WANDB_MODE=disabled $(BIN)/python -m pytest

# The paper-size CPU checks `make test` leaves out (pytest marker "full"): the full-size path (1 mm cases,
# EquiUnet w=48 on 128^3 crops, A and B, predict, merge; about 10 GB of RAM, tens of minutes on 2 cores) and
# the memory plan against the measured peak RSS.
test-full: install  ## the paper-size CPU tests (pytest -m full; tens of minutes, ~10 GB RAM)
	WANDB_MODE=disabled $(BIN)/python -m pytest -m full

lint: install  ## static checks
	$(BIN)/ruff check brats_lightning tests benchmarks experiments train.py ensemble.py

train: install  ## one training job (or a sweep): make train ARGS="-m fold=0,1,2,3,4 pipeline=A"
	$(BIN)/python train.py $(ARGS)

# The CPU demo: 20 synthetic cases at 2 mm (generated on first use), pipelines A and B on fold 0, then the
# out-of-fold ensembles of both pipelines on fold 0's validation cases, their merge, and the BraTS scores.
demo: install  ## train A and B on synthetic data, ensemble, merge, score (< 10 minutes on 2 CPU cores)
	$(BIN)/python train.py experiment=demo_A $(ARGS)
	$(BIN)/python train.py experiment=demo_B $(ARGS)
	$(BIN)/python ensemble.py runs=outputs/$(DEMO_NAME) dataset=data/synthetic oof=true oof_cases=held_out
	$(BIN)/brats-lightning cv-report outputs/$(DEMO_NAME)

# Pipeline A and B ensembles with TTA on a data set, their merge, and the scores when labels exist.
# Paths come from conf/ensemble.yaml; override them: make ensemble ARGS="runs=outputs/default dataset=/path/to/val"
# From a model package (brats-lightning export): make ensemble ARGS="model=model.zip dataset=/path/to/val"
ensemble: install  ## ensemble pipelines A and B, merge them, evaluate (conf/ensemble.yaml)
	$(BIN)/python ensemble.py $(ARGS)

# The paper's whole reproduction (experiments/paper_brats2020/README.md); ARGS: --launcher, --folds, overrides.
paper: install  ## the paper's sweeps, ensembles, merge and comparison table: make paper DATA=/path/to/data
	$(BIN)/python experiments/paper_brats2020/recipe.py $(if $(DATA),--data $(DATA),$(error make paper needs DATA=/path/to/MICCAI_BraTS2020_TrainingData)) $(ARGS)

bench: install  ## CPU benchmarks (< 5 minutes); results appended to benchmarks/RESULTS.md
	$(BIN)/python -m benchmarks.run_all $(ARGS)

bench-gpu: install  ## the paper-size GPU benchmarks, one table against the targets
	$(BIN)/python -m benchmarks.run_all --gpu $(ARGS)

gpu-check: install  ## GPU acceptance: 16-mixed + compile, kill/resume, fast SWA, fp16 TTA, DDP, bench-gpu
	$(BIN)/python -m benchmarks.gpu_check $(ARGS)
