"""The manifest pins a model directory: tampered, missing or extra files are refused."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from adapters.models.clip import OnnxClipEmbedder
from adapters.models.manifest import (
    MANIFEST_NAME,
    ManifestError,
    hash_files,
    load_manifest,
    read_manifest,
    save_manifest,
)


@pytest.fixture
def model_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model directory that a test may damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def test_intact_directory_loads_with_its_identity(model_copy: Path) -> None:
    manifest = load_manifest(model_copy)
    graphs = {"image.onnx", "text.onnx"}
    variants = {graph.replace(".onnx", f".{p}.onnx") for graph in graphs for p in ("fp16", "int8")}
    assert set(manifest.files) == {*graphs, *variants, "tokenizer.json", "preprocess.json"}
    assert manifest.files == hash_files(model_copy)
    assert re.fullmatch(r"tiny-biomedclip@[0-9a-f]{12}", manifest.model_id)
    assert read_manifest(model_copy) == manifest


def test_changed_file_is_refused(model_copy: Path) -> None:
    graph = model_copy / "image.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"sha256 mismatch: image\.onnx"):
        load_manifest(model_copy)
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        OnnxClipEmbedder(model_copy)


def test_missing_file_is_refused(model_copy: Path) -> None:
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match=r"missing file\(s\): tokenizer\.json"):
        load_manifest(model_copy)


def test_unlisted_file_is_refused(model_copy: Path) -> None:
    (model_copy / "image.onnx.data").write_bytes(b"weights")
    with pytest.raises(ManifestError, match=r"not in the manifest: image\.onnx\.data"):
        load_manifest(model_copy)


def test_missing_or_malformed_manifest_is_refused(model_copy: Path) -> None:
    path = model_copy / MANIFEST_NAME
    raw = json.loads(path.read_text())
    path.unlink()
    with pytest.raises(ManifestError, match=r"manifest\.json is missing"):
        load_manifest(model_copy)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        read_manifest(model_copy)
    path.write_text(json.dumps({**raw, "dimension": "64"}))
    with pytest.raises(ManifestError, match="'dimension' has the wrong type"):
        read_manifest(model_copy)
    path.write_text(json.dumps({**raw, "description": "two\nlines"}))
    with pytest.raises(ManifestError, match="one non-empty line"):
        read_manifest(model_copy)
    path.write_text(json.dumps({**raw, "kind": "segmenter"}))
    with pytest.raises(ManifestError, match="unknown model kind"):
        read_manifest(model_copy)


def test_model_id_follows_the_files_not_the_wording(tiny_dir: Path) -> None:
    manifest = read_manifest(tiny_dir)
    reworded = dataclasses.replace(
        manifest,
        description="Another wording.",
        parity=dataclasses.replace(manifest.parity, min_cosine=0.99995),
        created_by="someone else",
    )
    assert reworded.model_id == manifest.model_id
    retrained = dataclasses.replace(manifest, files={**manifest.files, "image.onnx": "0" * 64})
    assert retrained.model_id != manifest.model_id
    truncated = dataclasses.replace(manifest, max_length=128)
    assert truncated.model_id != manifest.model_id


def test_save_refuses_a_manifest_that_does_not_match_the_directory(model_copy: Path) -> None:
    manifest = load_manifest(model_copy)
    (model_copy / "notes.txt").write_text("added after export")
    with pytest.raises(ManifestError, match=r"notes\.txt"):
        save_manifest(manifest, model_copy)
    updated = dataclasses.replace(manifest, files=hash_files(model_copy))
    save_manifest(updated, model_copy)
    assert load_manifest(model_copy) == updated
