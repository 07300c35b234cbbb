# llm-service developer commands. Every target bootstraps .venv when missing.
# `make help` lists them.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv run run-dev test test-unit test-integration test-live test-real \
	test-cov test-connection test-api lint format clean lock local-llm system-packages \
	model-server-install

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
		sed -e 's/$$(HOST)/$(HOST)/g' -e 's/$$(PORT)/$(PORT)/g' | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt setup.cfg setup.py
	@echo ">> preparing $(VENV): installing pinned dependencies (first run only)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check \
		-r requirements-dev.txt
	@$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)
	@echo ">> $(VENV) is ready"

venv: $(STAMP) ## create .venv with the pinned dependencies

run: $(STAMP) ## serve on http://$(HOST):$(PORT) (starts the bundled model server when nothing listens)
	@GUNICORN_BIND=$(HOST):$(PORT) $(PY) scripts/run_gateway.py

local-llm: $(STAMP) ## run the bundled llama.cpp model server on 127.0.0.1:1234 (foreground)
	@$(PY) -m local_backend --port $(or $(LLM_PORT),1234)

run-dev: $(STAMP) ## flask development server with reload and debug
	@LLM_SERVICE_DEBUG=true LLM_SERVICE_LOG_FORMAT=text \
		$(BIN)/flask --debug run --host $(HOST) --port $(PORT) --reload

test: $(STAMP) system-packages model-server-install ## every test (unit, integration, browser, fuzz, live); installs Chromium, Redis, Prometheus, the bundled model
	@$(BIN)/pytest tests $(PYTEST_ARGS)

# The live tests use the configured upstream when it answers, else the bundled
# llama.cpp server: install that here, with visible progress, not inside pytest.
model-server-install: $(STAMP)
	@case "$$SKIP_REAL_LLM_TESTS" in true|1|yes) exit 0;; esac; \
	url="$${LLM_SERVICE_LM_STUDIO_URL:-http://$${LLM_SERVICE_LM_STUDIO_HOST:-localhost}:$${LLM_SERVICE_LM_STUDIO_PORT:-1234}}"; \
	if $(PY) -m local_backend --probe "$$url" >/dev/null 2>&1; then \
		echo ">> live tests will use the model server at $$url"; \
	else \
		echo ">> live tests will use the bundled llama.cpp model server"; \
		$(PY) -m local_backend --install-only; \
	fi

system-packages: ## install the Debian packages the tests need (Chromium, Redis, Prometheus)
	@bash scripts/install-system-packages.sh

test-unit: $(STAMP) ## unit tests (upstream mocked with responses)
	@$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP) ## real gunicorn in front of the fake LM Studio
	@$(BIN)/pytest tests/integration $(PYTEST_ARGS)

test-real: $(STAMP) model-server-install ## live tests against a real model server
	@$(BIN)/pytest tests/live -m real_llm $(PYTEST_ARGS)

test-live: test-real

test-cov: $(STAMP) ## every test with a coverage report
	@$(BIN)/pytest tests --cov --cov-report=term-missing $(PYTEST_ARGS)

test-connection: $(STAMP) ## diagnose the configured LM Studio step by step
	@$(BIN)/flask lmstudio check --generate

test-api: $(STAMP) ## manual smoke test of a running gateway (make run first)
	@$(PY) scripts/api_smoke.py --url http://$(HOST):$(PORT)

lint: $(STAMP) ## ruff lint and format check
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .

format: $(STAMP) ## ruff fix and format
	@$(BIN)/ruff check --fix .
	@$(BIN)/ruff format .

lock: $(STAMP) ## re-pin requirements*.txt from requirements*.in
	@$(PY) scripts/lock.py

clean: ## remove caches and build output (keeps .venv)
	@rm -rf build dist *.egg-info .pytest_cache .ruff_cache .coverage htmlcov .tox
	@find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

.PHONY: fuzz
FUZZ_MAX_EXAMPLES ?= 500

fuzz: $(STAMP) ## long schemathesis run on a new seed (FUZZ_MAX_EXAMPLES=500)
	@FUZZ_MAX_EXAMPLES=$(FUZZ_MAX_EXAMPLES) FUZZ_SEED=$(FUZZ_SEED) \
		$(BIN)/pytest tests/fuzz -s --timeout 3600 $(PYTEST_ARGS)

.PHONY: bench bench-smoke bench-hardening
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	@$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	@touch $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP) ## full benchmark vs direct, naive proxy, bare Flask, LiteLLM (10-15 min)
	@bash bench/install-tools.sh
	@$(PY) -m bench.run $(BENCH_ARGS)

bench-smoke: $(STAMP) $(BENCH_STAMP) ## quick benchmark, no LiteLLM (~1 min; CI)
	@bash bench/install-tools.sh
	@$(PY) -m bench.run --smoke $(BENCH_ARGS)

bench-hardening: $(STAMP) $(BENCH_STAMP) ## hostile clients and upstreams: slowloris, slow readers, big answers, frozen Redis (~4 min)
	@$(PY) -m bench.slowloris
	@$(PY) -m bench.slow_reader
	@$(PY) -m bench.frozen_redis
