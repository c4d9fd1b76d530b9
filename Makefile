# The usual targets. `make demo` and `make test` are the two commands of the README.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install lint test demo bench chaos services clean mutation

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

test: install
	$(BIN)/pytest --cov --cov-report=term

demo: install
	$(BIN)/coupon-worker demo

bench: install
	$(BIN)/coupon-worker bench

chaos: install
	$(BIN)/coupon-worker chaos

# Mutants of the rules and of the ledger's claim / outcome code against the unit tests and the
# ledger contract (a few minutes; not in CI). Prints the survivors and the score.
mutation: install
	$(BIN)/python -m coupon_devtools.mutation

services:
	./.ci/services

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache mutants
