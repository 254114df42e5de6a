# One entry point for setup, the demo, the tests and the benchmarks.
# `make demo` and `make test` work on a fresh Debian machine: each runs the setup first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	$(BIN)/kdcache demo

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/kdcache bench

clean:
	rm -rf runs stores data .pytest_cache
