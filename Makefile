# Two entry points, both self-installing on a fresh machine (see README):
#   make train   the main job on its embedded default
#   make test    the test suite, offline
SHELL := /bin/bash

# uv needs a Python >= 3.12; pyenv machines have one that is not on PATH by default.
PYTHON := $(shell for p in python3.13 python3.12 $$(ls -d $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3 2>/dev/null); do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { command -v $$p; break; }; done)
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
EXTRAS ?= --extra libero
PYTEST_ARGS ?=

.PHONY: train test lint

.venv/.synced: pyproject.toml uv.lock
	@test -n "$(PYTHON)" || { echo "lerobot-pirl needs Python >= 3.12 (none found on PATH or in ~/.pyenv)"; exit 1; }
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	UV_PYTHON=$(PYTHON) $(UV) sync --frozen $(EXTRAS)
	@touch $@

train: .venv/.synced
	.venv/bin/lerobot-pirl-train $(ARGS)

test: .venv/.synced
	HF_HUB_OFFLINE=1 MUJOCO_GL=egl .venv/bin/python -m pytest -n 2 $(PYTEST_ARGS)

lint: .venv/.synced
	.venv/bin/ruff check src tests benchmarks plugins
	.venv/bin/ruff format --check src tests benchmarks plugins
