"""Parity between a torch model and its ONNX export, as cosine similarity of embeddings.

Why it exists: an export is only accepted when the graphs reproduce the original model's
embeddings. Every exporter measures it on real inputs, records the smallest cosine similarity in
the manifest, and refuses to write a model below :data:`MIN_COSINE`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["MIN_COSINE", "ParityError", "min_cosine", "require_parity"]

MIN_COSINE = 0.9999
"""The smallest acceptable cosine similarity between an original and an exported embedding."""


class ParityError(RuntimeError):
    """An exported graph does not reproduce the original model closely enough."""


def min_cosine(expected: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """The smallest row-wise cosine similarity between two ``(N, D)`` arrays.

    Example:
        >>> round(min_cosine([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]), 4)
        0.7071
    """
    a = np.asarray(expected, dtype=np.float64)
    b = np.asarray(actual, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"need two non-empty (N, D) arrays of one shape: {a.shape}, {b.shape}")
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cosine.min())


def require_parity(expected: npt.ArrayLike, actual: npt.ArrayLike, what: str) -> float:
    """:func:`min_cosine`, raising :class:`ParityError` below :data:`MIN_COSINE`.

    Args:
        expected: embeddings from the original model.
        actual: embeddings of the same inputs from the export.
        what: what was compared, for the error message (``"image tower"``).

    Returns:
        The smallest cosine similarity.
    """
    measured = min_cosine(expected, actual)
    if not measured >= MIN_COSINE:
        raise ParityError(f"{what}: min cosine {measured:.6f} < {MIN_COSINE}")
    return measured
