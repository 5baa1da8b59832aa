# ovseg-lab. First two commands on a fresh machine: `make quickstart`, then `make test`.
# Every target creates/uses the virtual environment in .venv (override with VENV=...).
SHELL := /bin/bash
VENV ?= .venv
PYTHON_BOOT ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install quickstart test test-slow lint tables-toy clean-outputs help

help:
	@echo "make quickstart   train CAT-Seg + evaluate on the toy benchmark (offline, CPU, ~4 minutes)"
	@echo "make test         fast test suite (< 10 min on 2 cores)"
	@echo "make test-slow    heavier tests (DDP, notebooks, kill-and-resume, ViT-L counts)"
	@echo "make lint         ruff check + ruff format --check (configured in pyproject.toml)"
	@echo "make tables-toy   every paper table in toy mode (all *_toy sweeps + make_table) -> outputs/tables_toy/"

# torch and torchvision are resolved together from the package registry (never pin a local CPU torch
# wheel: the registry's torchvision would not match it).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PY) train.py experiment=quickstart

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --durations=20

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

tables-toy: $(STAMP)
	$(PY) scripts/make_tables_toy.py

clean-outputs:
	rm -rf outputs
