# gsrl: the two commands of the README are `make run` and `make test`; both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
CONFIG ?= configs/state_ppo.yaml
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1

.PHONY: help setup proto run train-long test test-unit test-integration test-e2e lint format clean bench

help:
	@echo "make run         train state-based PutCubeOnPlate-v0 locally (configs/state_ppo.yaml; ARGS='key=value ...')"
	@echo "                 CONFIG=configs/gs_ppo.yaml: from Gaussian-splat images (GSEnv-PutCubeOnPlate-v0)"
	@echo "make train-long  the longer preset that trains to a useful policy (configs/state_ppo_long.yaml)"
	@echo "make test        lint + unit, integration and e2e tests (gpu tests skip without CUDA)"
	@echo "make setup       system packages, .venv with CPU torch, generated gRPC code (run by the others)"
	@echo "make proto       regenerate gsrl/v1 from proto/"
	@echo "make bench       time each stage beside a baseline from the same run (ARGS='--smoke|--full --out DIR')"

setup:
	@bash scripts/bootstrap.sh

proto: setup
	$(PY) -m gsrl.protogen

run: setup
	$(VENV)/bin/gsrl train -c $(CONFIG) $(ARGS)

train-long: setup
	$(VENV)/bin/gsrl train -c configs/state_ppo_long.yaml $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: setup
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench $(ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info gsrl/v1/*_pb2*.py gsrl/v1/*_pb2*.pyi
