# Birb Nest — `make run` and `make test` are all a newcomer needs. `make help` lists the rest.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements/*.txt | sha1sum | cut -c1-12)

.DEFAULT_GOAL := help
.PHONY: help run test tools layers lint format venv clean-data

help: ## list the targets
	@grep -hE '^[a-z][a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

$(STAMP): requirements/base.txt requirements/stack.txt requirements/dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP) ## create .venv and install the pinned requirements (done by run/test)

run: $(STAMP) ## start PostgreSQL, Redis, NATS (unless *_URL are set), migrate, serve API + worker
	@$(PY) -m tools.stack run

.PHONY: cluster
cluster: $(STAMP) ## Redis Cluster 3+3, 3 NATS (JetStream R3), PostgreSQL, 2 APIs, 2 workers on loopback (var/cluster/)
	@$(PY) -m tools.cluster $(CLUSTER_ARGS)

.PHONY: restart stop start
restart: ## restart one piece of a running `make run` (another terminal): SERVICE=postgres|redis|nats|api|worker|dashboard|jobs
	@$(PY) -m tools.stack restart $(SERVICE)

stop: ## stop one piece of a running `make run`; it stays down until `make start` (SERVICE=api: stop writes)
	@$(PY) -m tools.stack stop $(SERVICE)

start: ## start again a piece that `make stop` stopped (SERVICE=…)
	@$(PY) -m tools.stack start $(SERVICE)

test: $(STAMP) tools layers ## the layering check, then the whole test suite against real servers (started on free ports)
	$(PY) -m pytest $(PYTEST_ARGS)

tools: ## install the Debian tools tests use when missing (chromium for browser tests, docker-compose, promtool)
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing with apt-get"; \
	    apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1; } || \
	    echo "could not install$$missing (browser tests fail without chromium)"; \
	  else \
	    echo "missing:$$missing (install with apt-get as root; browser tests fail without chromium)"; \
	  fi; \
	fi

layers: $(STAMP) ## imports point down only (import-linter contracts in pyproject.toml)
	$(VENV)/bin/lint-imports --no-cache --no-logo

lint: $(STAMP) layers ## the layering check, ruff lint + format check, mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP) ## ruff format + autofix
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean-data: ## delete var/ (all data of the servers `make run` started)
	rm -rf var/

.PHONY: bench bench-large
bench: $(STAMP) ## Birb Nest beside Redis, Webdis, nats-py (~3 min), then the cost curves (~17 min; BENCH_ARGS, CURVES_ARGS; apt-installs wrk, redis-tools, webdis as root)
	$(PY) -m bench.run --install-tools $(BENCH_ARGS)
	$(PY) -m bench.curves --install-tools $(CURVES_ARGS)

bench-large: $(STAMP) ## the cost curves with 10M rows too (bench.curves --large; long, never in CI)
	$(PY) -m bench.curves --install-tools --large $(CURVES_ARGS)
