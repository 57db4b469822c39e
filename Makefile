# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint demo bench bench-smoke clean

$(STAMP): pyproject.toml setup.py pglogrepl_bridge/pgoutput/_fastrow.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## test: lint, type-check and run the whole suite against real PostgreSQL 15 to 18
test: lint
	$(BIN)/python -m pytest

## lint: ruff and mypy (strict, on the package and the tests)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check pglogrepl_bridge tests examples benchmarks
	$(BIN)/mypy

## demo: start an embedded PostgreSQL, stream a workload, replicate into SQLite, clean up
demo: $(STAMP)
	$(BIN)/pglogrepl-bridge demo

## bench: the decoding micro-benchmark (figures go to benchmarks/RESULTS.md by hand)
bench: $(STAMP)
	$(BIN)/python benchmarks/decode_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .pg-report.json build pglogrepl_bridge/pgoutput/*.so
