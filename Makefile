# jobtrace: `make run` serves on 127.0.0.1:50051, `make test` runs everything CI runs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/jobtrace/v1/*.proto)
# The released contract. Every change must be additive against it; refresh it
# (make baseline) only in a commit that says it releases.
BASELINE := proto/baseline/jobtrace-v1.binpb
# Test processes (pytest-xdist). The tests mostly wait (on timers, the network,
# the database), so more processes than cores pays; 0 runs them in this one.
TEST_WORKERS ?= 3

.DEFAULT_GOAL := help
.PHONY: help venv run test generate check-generated breaking baseline lint fmt bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install the pinned dependencies

run: $(STAMP) ## Serve gRPC on 127.0.0.1:50051 and HTTP (Connect, EventSource) on 127.0.0.1:8080 with ./jobtrace.db
	$(BIN)/jobtrace serve --http-listen 127.0.0.1:8080

generate: $(STAMP) ## Regenerate generated/ from proto/
	$(BIN)/python scripts/generate.py generated

check-generated: $(STAMP) ## Fail when generated/ is stale
	$(BIN)/python scripts/generate.py --check generated

breaking: $(STAMP) ## Fail when proto/ breaks the released contract (the baseline image)
	$(BIN)/buf breaking --against $(BASELINE)

baseline: $(STAMP) ## Release: write the current contract as the new baseline image
	$(BIN)/buf build -o $(BASELINE)

lint: $(STAMP) ## ruff, mypy, buf lint, buf format -d, buf breaking
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/buf lint
	$(BIN)/buf format -d --exit-code
	$(BIN)/buf breaking --against $(BASELINE)
	$(BIN)/mypy src

fmt: $(STAMP) ## Format Python and protos
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/buf format -w

test: $(STAMP) check-generated ## Contract checks and the whole test suite
	$(BIN)/buf lint
	$(BIN)/buf format -d --exit-code
	$(BIN)/buf breaking --against $(BASELINE)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/mypy src
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP) ## Run the benchmark with its defaults
	$(BIN)/jobtrace bench

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
