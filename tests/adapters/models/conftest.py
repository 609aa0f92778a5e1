"""Model directories built once per test session: the real MiniLM export and the tiny
BiomedCLIP-architecture model, both through the project's exporters, plus the tiny model's open_clip
source so that tests can compare the ONNX graphs with torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.models.export.minilm import export_minilm
from adapters.models.export.open_clip_onnx import load_open_clip
from adapters.models.export.tiny import build_tiny_biomedclip, write_tiny_biomedclip_source


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 exported to ONNX (real weights)."""
    return export_minilm(tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BiomedCLIP-architecture model, seed 0, exported to ONNX."""
    return build_tiny_biomedclip(tmp_path_factory.mktemp("tiny") / "tiny-biomedclip", seed=0)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's open_clip ``local-dir`` folder, seed 0 (the weights ``tiny_dir`` has)."""
    return write_tiny_biomedclip_source(tmp_path_factory.mktemp("tiny-source") / "source", seed=0)


@pytest.fixture(scope="session")
def tiny_torch(tiny_source: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the tiny model in torch, loaded by open_clip."""
    return load_open_clip(f"local-dir:{tiny_source}")
