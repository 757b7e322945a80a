# Common commands. `make demo` and `make test` are the two a newcomer runs (see README).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# GPU users: make install TORCH_INDEX=https://download.pytorch.org/whl/cu128  (see README)
TORCH_INDEX ?=

.PHONY: help install demo test test-fast test-middle test-qwen-audio lint format bench install-qwen-audio install-label-studio
.DEFAULT_GOAL := help

help:
	@echo "make demo   - install into .venv, then run the nightly DAG once on generated sample audio"
	@echo "make test   - install into .venv, then run lint and the test suite (embedded PostgreSQL if none runs)"
	@echo "make test-fast - lint and the ~1260 tests that need no PostgreSQL and no model (2-3.5 min on 2 busy cores)"
	@echo "make test-middle - the other ~240 tests not marked slow: PostgreSQL, the tiny model (about 11 min on 2 busy cores)"
	@echo "make lint / format / bench / install"
	@echo "make install-qwen-audio - .venv-qwen-audio (transformers 4.53.3) for the original Qwen-Audio (docs/models.md)"
	@echo "make test-qwen-audio QWEN_AUDIO_CODE_DIR=DIR - the original Qwen-Audio's tests, which CI skips (docs/models.md)"
	@echo "make install-label-studio - .venv-label-studio (label-studio 1.23.2) for the live review tests (docs/review.md)"

$(BIN)/.installed: requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_INDEX)" ]; then $(BIN)/python -m pip install --quiet torch==2.13.0 --index-url $(TORCH_INDEX); fi
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

install: $(BIN)/.installed

# The original Qwen-Audio's remote code needs transformers 4.x: a second environment, its own lock file,
# the project installed without Airflow. --no-deps: the lock is the whole set, so pip adds nothing (no
# CUDA libraries either); the check after it refuses a CUDA torch unless TORCH_INDEX asked for one.
QA_VENV := .venv-qwen-audio
QA_BIN  := $(QA_VENV)/bin

$(QA_BIN)/.installed: requirements-qwen-audio.lock pyproject.toml
	@test -x $(QA_BIN)/python || $(PYTHON) -m venv $(QA_VENV)
	$(QA_BIN)/python -m pip install --quiet --upgrade pip
	@if [ -n "$(TORCH_INDEX)" ]; then $(QA_BIN)/python -m pip install --quiet torch==2.13.0 --index-url $(TORCH_INDEX); fi
	$(QA_BIN)/python -m pip install --quiet --no-deps -r requirements-qwen-audio.lock
	$(QA_BIN)/python -m pip install --quiet --no-deps -e .
	@$(QA_BIN)/python -c "import torch, transformers; assert '$(TORCH_INDEX)' or torch.version.cuda is None, 'a CUDA torch was installed without TORCH_INDEX'; print('$(QA_VENV): torch', torch.__version__, 'transformers', transformers.__version__)"
	@command -v ffmpeg >/dev/null || echo "note: ffmpeg is not on PATH; only the Qwen-Audio backend's features=remote path needs it (apt-get install ffmpeg / brew install ffmpeg)"
	@touch $@

install-qwen-audio: $(QA_BIN)/.installed

# Label Studio's own pins clash with ours: its own environment, used by the live review-sync tests
# (tests/label_studio_server.py starts a server from it) and handy to run a local server (docs/review.md).
LS_VENV := .venv-label-studio

$(LS_VENV)/bin/.installed:
	@test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet label-studio==1.23.2
	@touch $@

install-label-studio: $(LS_VENV)/bin/.installed

demo: install
	$(BIN)/python -m qwen_tasks.dev.demo

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# The lanes (README, "Development"). `db` and `model` are set from the fixtures a test uses
# (tests/conftest.py), `slow` by hand on the end-to-end tests (DAG runs, Airflow stacks, CLI subprocesses
# with a model). The fast lane needs neither PostgreSQL nor a model; the middle lane is the other tests not
# marked slow; `make test` is the full suite and what CI runs. tests/test_lanes.py reads FAST_LANE here.
FAST_LANE   := not db and not model and not slow
MIDDLE_LANE := not slow and not ($(FAST_LANE))

test-fast: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "$(FAST_LANE)"

test-middle: install
	$(BIN)/python -m pytest -m "$(MIDDLE_LANE)"

# The original Qwen-Audio's tests, which skip without a copy of its GitHub code (CI has none) and without
# .venv-qwen-audio: here a skip for either is a failure (QWEN_TASKS_REQUIRE_QWEN_AUDIO, tests/services.py).
QWEN_AUDIO_TESTS := tests/labelling/test_qwen_audio.py tests/labelling/test_mean_logprob.py

test-qwen-audio: install install-qwen-audio
	@test -n "$(QWEN_AUDIO_CODE_DIR)" || { echo "set QWEN_AUDIO_CODE_DIR to a copy of https://github.com/QwenLM/Qwen-Audio (docs/models.md)"; exit 2; }
	QWEN_AUDIO_CODE_DIR="$(QWEN_AUDIO_CODE_DIR)" QWEN_TASKS_REQUIRE_QWEN_AUDIO=1 $(BIN)/python -m pytest -rs $(QWEN_AUDIO_TESTS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# bench/dag.py --celery adds (e), the DAG on a real CeleryExecutor stack: about a minute more (2 min 49 s
# for the whole of bench/dag.py here) and Redis at 127.0.0.1:6379, which `make test` needs already.
bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/workers.py
	$(BIN)/python bench/dag.py --celery
	$(BIN)/python bench/finetune.py
