# The two commands of the README, plus helpers. Every target installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench-store

setup:
	@bash .ci/setup $(VENV)

# The main job: full vs DISSect vs random on noisy Fashion-MNIST, 2 CPU ranks (~8 min).
demo: setup
	$(PY) -m dissect_dist.demo

# The test suite (what CI runs). pytest's exit 5 ("no tests ran") fails the target.
test: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

bench-store: setup
	$(PY) benchmarks/store_memory.py
