# Loom: two commands on a fresh machine — `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv debs proto proto-check run test unit integration lint bench clean

help:
	@echo "make run    start the whole mesh locally (NATS, Triton, six services)"
	@echo "make test   install and run the whole test suite"
	@echo "make bench  measure Triton direct vs through the gateway (writes BENCHMARKS.md)"
	@echo "make proto  regenerate services/common/pb from protos/"
	@echo "make lint   ruff and mypy"

# The venv is rebuilt whenever the pinned set changes.
$(STAMP): requirements.lock requirements-nodeps.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Loom needs Python 3.11 (Triton python backend stub)"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .   # loomctl into $(BIN)
	touch $@

venv: $(STAMP)

# Debian packages the tests use (espeak-ng and sox make speech, DejaVu draws OCR text).
debs:
	@bash tools/debian_deps.sh

proto: $(STAMP)
	$(BIN)/python tools/gen_protos.py

run: $(STAMP)
	$(BIN)/python -m services.common.launch

test: $(STAMP) debs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

integration: $(STAMP) debs
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check services tests tools
	$(BIN)/ruff format --check services tests tools
	$(BIN)/mypy services tools

bench: $(STAMP) debs
	$(BIN)/python -m tools.bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
