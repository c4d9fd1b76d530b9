# The usual targets. `make demo` and `make test` are the two commands of the README.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install lint test test-fast wheel-check demo bench bench-ledger chaos services clean mutation docs \
	docs-reference

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,devtools]"
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m coupon_devtools.migration_lint
	$(BIN)/python -m coupon_devtools.docs --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The documentation site in site/ (mkdocs.yml): --strict fails on a broken link or anchor and on
# a page missing from the navigation. `make lint` runs it too.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Regenerate the reference pages from the code: docs/reference/configuration.md from the
# settings' fields, docs/reference/cli.md from the click commands. A test fails when they are
# stale, naming this target.
docs-reference: install
	$(BIN)/python -m coupon_devtools.docs

# One run in seven processes. The disruptive tests' three groups (the restarts and the
# reconnect; the chaos run; the RabbitMQ cluster: SHARED_PROCESS in tests/conftest.py) are handed
# out first, each to a process that starts services of its own (a PostgreSQL cluster and a
# RabbitMQ node, or three RabbitMQ nodes); they mostly wait on those restarts, and the four
# other processes run the rest meanwhile. Ends with the coverage total.
# The ledger's tests also run through a PgBouncer in transaction mode that each process starts
# (Debian's pgbouncer; docs/pooler.md).
test: install
	$(BIN)/pytest -n 7 --cov --cov-report=term

# The suite a developer runs while working (under five minutes on two cores): everything but the
# slow suites, which `make test` (and so CI) still runs: real worker subprocesses, restarts,
# the browser, PgBouncer, the RabbitMQ cluster and the real Prometheus.
FAST := not slow and not disruptive and not browser and not pooler and not cluster and not prometheus
test-fast: install
	$(BIN)/pytest -n 3 -m "$(FAST)"

wheel-check: install
	./.ci/wheel-check

demo: install
	$(BIN)/coupon-worker demo

bench: install
	$(BIN)/coupon-worker bench

# The ledger at size (docs/benchmark-ledger-size.md): PostgreSQL only, a few minutes.
bench-ledger: install
	$(BIN)/coupon-worker bench --scenario ledger-size

chaos: install
	$(BIN)/coupon-worker chaos

# Mutants of the rules and of the ledger's claim / outcome code against the unit tests and the
# ledger contract (a few minutes; not in CI). Prints the survivors and the score.
mutation: install
	$(BIN)/python -m coupon_devtools.mutation

services:
	./.ci/services

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants site
