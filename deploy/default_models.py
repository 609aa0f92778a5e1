"""The default models, built on first use: the tiny image/text model and the real MiniLM.

Building needs the ``export`` extra (torch, open_clip, transformers), which ``make demo`` and
``make test`` install; serving never does. A model directory that already holds an export is
left alone: the embedders verify it against its manifest when they load it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from adapters.models.manifest import MANIFEST_NAME

__all__ = [
    "DEFAULT_IMAGE_MODEL",
    "DEFAULT_TEXT_MODEL",
    "ExportUnavailable",
    "ensure_default_models",
]

DEFAULT_IMAGE_MODEL = "tiny-biomedclip"
DEFAULT_TEXT_MODEL = "minilm"


class ExportUnavailable(Exception):
    """A model must be built but the export dependencies are not installed."""


def _build(name: str, target: Path) -> None:
    try:
        if name == DEFAULT_IMAGE_MODEL:
            from adapters.models.export.tiny import build_tiny_biomedclip

            build_tiny_biomedclip(target)
        else:
            from adapters.models.export.minilm import export_minilm

            export_minilm(target)
    except ImportError as error:
        raise ExportUnavailable(
            f"building {name} needs the export dependencies ({error.name} is missing): "
            "`make demo` installs them"
        ) from error


def ensure_default_models(
    models_dir: Path,
    *,
    image_model: str = DEFAULT_IMAGE_MODEL,
    text_model: str = DEFAULT_TEXT_MODEL,
    say: Callable[[str], None] = lambda _: None,
) -> list[str]:
    """Build whichever default model is missing from ``models_dir``.

    Models with other names are not built here (they come from ``medirag models export`` on a
    connected machine); a missing one is reported when the service loads it.

    Args:
        models_dir: the folder of model directories.
        image_model: the configured image/text model's folder name.
        text_model: the configured text model's folder name.
        say: receives a line per model being built.

    Returns:
        The names of the models built now.

    Raises:
        ExportUnavailable: a model must be built and torch or open_clip is not installed.
    """
    built = []
    for name in (image_model, text_model):
        target = models_dir / name
        default = name in (DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL)
        if not default or (target / MANIFEST_NAME).is_file():
            continue
        say(f"building model {name} into {target}")
        _build(name, target)
        built.append(name)
    return built
