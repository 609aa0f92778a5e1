"""Writing an exported model directory: all at once or not at all, with a record of who wrote it.

Why it exists: a model directory is trusted through its manifest, so an export that fails half-way
(a parity check, a full disk) must not leave a directory behind that looks usable, nor mix new
files with stale ones. Exporters write into a hidden staging directory beside the target and move
it into place only when everything, manifest included, is written.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["created_by", "staged_directory"]


@contextlib.contextmanager
def staged_directory(out_dir: Path | str) -> Iterator[Path]:
    """A fresh directory to write an export into, moved to ``out_dir`` on success.

    Args:
        out_dir: where the export must end up; it must not exist or be an empty directory.

    Yields:
        The staging directory (beside ``out_dir``, so that the final move is a rename).

    Raises:
        FileExistsError: ``out_dir`` exists and is not an empty directory.

    Example:
        >>> with staged_directory("/models/minilm") as staging:  # doctest: +SKIP
        ...     (staging / "model.onnx").write_bytes(graph)
    """
    target = Path(out_dir).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    )
    try:
        yield staging
        # mkdtemp makes the directory private (0700); a model directory is read by the service.
        staging.chmod(0o755)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def created_by(exporter: str, *distributions: str) -> str:
    """The ``created_by`` line of a manifest: the exporter and the versions of what it used.

    Example:
        >>> created_by("adapters.models.export.minilm", "torch", "onnx")  # doctest: +SKIP
        'adapters.models.export.minilm; torch 2.13.0, onnx 1.23.2'
    """
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in distributions)
    return f"{exporter}; {versions}"
