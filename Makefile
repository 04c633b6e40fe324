# The two commands: `make run` serves the API on 127.0.0.1:8000 (CUSTOMERS_BIND=host:port to
# choose another), `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint system-packages bench

# The webhook deliverer runs beside gunicorn and stops with it: Ctrl-C or a SIGTERM to make
# (which make passes on to this shell) stops both; gunicorn ending alone stops the deliverer.
run: $(VENV)/.installed
	@$(BIN)/python -m customers_service customers init-db
	@$(BIN)/python -m customers_service customers deliver-webhooks & deliverer=$$!; \
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app & server=$$!; \
	trap 'kill -TERM $$server $$deliverer 2>/dev/null' INT TERM; \
	wait $$server; status=$$?; wait $$server 2>/dev/null; again=$$?; \
	[ $$again -eq 127 ] || status=$$again; \
	kill -TERM $$deliverer 2>/dev/null; wait $$deliverer; exit $$status

test: $(VENV)/.installed lint system-packages
	$(BIN)/python -m pytest -n 0 $(PYTEST_ARGS)

# Tests use Debian's Chromium (the docs page in a real browser), nginx (the slow-client set-up and
# the load balancer of several hosts), curl (the README's example), PostgreSQL's server (a
# throwaway cluster per run) and iproute2 (network namespaces for several hosts).
system-packages:
	@if ! command -v chromium >/dev/null || ! test -x /usr/sbin/nginx || ! command -v curl >/dev/null \
		|| ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v ip >/dev/null; \
	then \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium nginx-light curl postgresql iproute2 >/dev/null; \
	fi

# By hand, never in CI: about 30 minutes of load on 127.0.0.1, the service and its FastAPI peer
# (see bench/README.md).
bench: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test,postgres,bench]'
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/import_live.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,postgres]'
	touch $@
