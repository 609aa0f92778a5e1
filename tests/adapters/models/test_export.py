"""Exporters: the tiny model is reproducible, and failed or unsafe exports leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adapters.models.export.open_clip_onnx import export_open_clip
from adapters.models.export.output import staged_directory
from adapters.models.export.parity import ParityError, require_parity
from adapters.models.export.tiny import build_tiny_biomedclip, write_tiny_biomedclip_source
from adapters.models.manifest import load_manifest


def test_tiny_model_manifest(tiny_dir: Path) -> None:
    manifest = load_manifest(tiny_dir)
    assert manifest.name == "tiny-biomedclip"
    assert manifest.kind == "image-text-embedder"
    assert (manifest.dimension, manifest.image_size, manifest.max_length) == (64, 224, 256)
    assert "seed 0" in manifest.source
    assert "CustomTextCLIP" in manifest.architecture
    assert "token ids identical" in manifest.parity.compared
    preprocess = json.loads((tiny_dir / "preprocess.json").read_text())
    assert preprocess["resize_mode"] == "shortest"
    assert preprocess["interpolation"] == "bicubic"
    assert preprocess["mean"] == [0.48145466, 0.4578275, 0.40821073]


def test_same_seed_same_files_other_seed_other_model(tiny_dir: Path, tmp_path: Path) -> None:
    again = load_manifest(build_tiny_biomedclip(tmp_path / "again", seed=0))
    other = load_manifest(build_tiny_biomedclip(tmp_path / "other", seed=1))
    first = load_manifest(tiny_dir)
    assert again.files == first.files
    assert again.model_id == first.model_id
    assert other.files["image.onnx"] != first.files["image.onnx"]
    assert other.files["text.onnx"] != first.files["text.onnx"]
    assert other.files["tokenizer.json"] == first.files["tokenizer.json"]
    assert other.model_id != first.model_id


def test_export_refuses_a_source_without_weights(tmp_path: Path) -> None:
    source = write_tiny_biomedclip_source(tmp_path / "source", seed=0)
    (source / "open_clip_model.safetensors").unlink()
    with pytest.raises(RuntimeError, match="could not be loaded"):
        export_open_clip(f"local-dir:{source}", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_directory_with_files(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.onnx").write_bytes(b"stale")
    with pytest.raises(FileExistsError):
        build_tiny_biomedclip(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.onnx"]


def _export_failing_parity(target: Path) -> None:
    with staged_directory(target) as staging:
        (staging / "model.onnx").write_bytes(b"half written")
        require_parity(np.eye(2), np.array([[1.0, 0.0], [1.0, 1.0]]), "test graph")


def test_failed_export_leaves_no_directory(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match=r"test graph: min cosine 0\.707107 < 0\.9999"):
        _export_failing_parity(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_successful_staging_moves_into_an_empty_target(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    with staged_directory(target) as staging:
        (staging / "model.onnx").write_bytes(b"graph")
    assert (target / "model.onnx").read_bytes() == b"graph"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert target.stat().st_mode & 0o777 == 0o755
