# Common commands. `make demo` and `make test` are the two a newcomer runs (see README).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# GPU users: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128  (see README)
TORCH_INDEX ?=

.PHONY: help install demo test lint format bench
.DEFAULT_GOAL := help

help:
	@echo "make demo   - install into .venv, then run the nightly DAG once on generated sample audio"
	@echo "make test   - install into .venv, then run lint and the test suite (needs PostgreSQL)"
	@echo "make lint / format / bench / install"

$(BIN)/.installed: requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_INDEX)" ]; then $(BIN)/python -m pip install --quiet torch==2.13.0 --index-url $(TORCH_INDEX); fi
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m qwen_tasks.demo

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/workers.py
	$(BIN)/python bench/dag.py
