"""The tiny model's open_clip source and torch model, so that tests can compare the ONNX graphs
with torch. The exported model directories (``minilm_dir``, ``tiny_dir``) come from
tests/conftest.py, shared with the rest of the suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.models.export.open_clip_onnx import load_open_clip
from adapters.models.export.tiny import write_tiny_biomedclip_source


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's open_clip ``local-dir`` folder, seed 0 (the weights ``tiny_dir`` has)."""
    return write_tiny_biomedclip_source(tmp_path_factory.mktemp("tiny-source") / "source", seed=0)


@pytest.fixture(scope="session")
def tiny_torch(tiny_source: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the tiny model in torch, loaded by open_clip."""
    return load_open_clip(f"local-dir:{tiny_source}")
