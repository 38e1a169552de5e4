# Entry points for a fresh machine (see README): `make setup` (the environment only), `make run`
# (environment + default pipeline) and `make test`.
# Each creates .venv on first use; later calls reuse it (delete .venv to start over).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 from PyPI is the CUDA build on Linux x86-64 (it also runs on CPU); mirrors that
# carry a CPU-only wheel of that version (like this project's CI machines) install that instead.
# Pick another build with e.g.  make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# pytest-xdist workers, one torch thread each (tests/conftest.py). One more than this project's
# 2-core CI machines have: a fifth of the suite's time is spent waiting on dvc, MLflow servers
# and stage subprocesses, and a third worker fills it. Measured on one 2-core machine on
# 2026-12-01: 17m19s against 17m56s with 2 workers on the same tree; the machine's own speed
# varied more than that within the hour (the same suite took 13m50s earlier).
TEST_WORKERS ?= 3

# DVC runs stage commands (`python -m stages.X`) through the shell: this venv's python must win.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS ?= 1
export PYTHONUNBUFFERED ?= 1

.PHONY: setup run test lint format clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[pipeline]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-base
	$(BIN)/pip install --quiet -e ".[pipeline,dev]"
	touch $@

## setup: only create .venv with the pipeline extra (then `. .venv/bin/activate`); no data, no training
setup: $(VENV)/.installed-base

## run: set up .venv and run the default DVC pipeline (download -> tokenize -> train -> evaluate -> sample)
run: $(VENV)/.installed-base
	$(BIN)/dvc repro
	@echo
	@$(BIN)/dvc metrics show
	@echo
	@head -n 20 samples/samples.md

## test: set up .venv (with dev extras) and run lint, format check and the test suite
test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .ci/check_dvc_lock.py
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format:
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
