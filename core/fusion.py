"""Vector fusion and rank fusion.

Late fusion builds one vector per indexed case from its image and its recorded findings; rank
fusion merges independent searches (image leg, lab leg; dense leg, sparse leg) so that no single
modality drowns the others.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

import numpy as np

from core.types import Vector

__all__ = ["late_fuse", "normalize", "reciprocal_rank_fusion"]

K = TypeVar("K", bound=Hashable)


def normalize(vectors: Vector) -> Vector:
    """L2-normalise a vector or each row of a matrix; a zero vector stays zero.

    Examples:
        >>> normalize(np.array([3.0, 4.0], dtype=np.float32)).tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    out: Vector = np.divide(array, norms, out=np.zeros_like(array), where=norms > 0)
    return out


def late_fuse(image: Vector, findings: Vector, *, w_image: float, w_findings: float) -> Vector:
    """``normalize(w_image * normalize(image) + w_findings * normalize(findings))``.

    Both inputs must live in the same embedding space (the image and text towers of one model).
    Each is normalised first so that the weights, not the vectors' norms, set their shares.

    Args:
        image: image embedding(s), shape ``(D,)`` or ``(N, D)``.
        findings: findings-text embedding(s) of the same shape.
        w_image: weight of the image, ``>= 0``.
        w_findings: weight of the findings, ``>= 0``; the two may not both be 0.

    Examples:
        >>> v = late_fuse(np.array([1.0, 0.0]), np.array([0.0, 1.0]), w_image=1, w_findings=1)
        >>> [round(x, 4) for x in v.tolist()]
        [0.7071, 0.7071]
    """
    if w_image < 0 or w_findings < 0 or w_image + w_findings == 0:
        raise ValueError(f"fusion weights must be >= 0 and not both 0: {w_image}, {w_findings}")
    if np.shape(image) != np.shape(findings):
        raise ValueError(f"shape mismatch: {np.shape(image)} vs {np.shape(findings)}")
    return normalize(w_image * normalize(image) + w_findings * normalize(findings))


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[K]], *, k: int = 60
) -> list[tuple[K, float]]:
    """Merge rankings by reciprocal rank fusion: ``score(d) = sum over rankings of 1/(k + rank)``.

    Every ranking contributes on the same scale whatever its raw scores were, so a modality with
    larger similarities cannot dominate. Ties keep the order in which items were first seen.

    Args:
        rankings: each a sequence of item keys, best first; an item appears at most once per
            ranking.
        k: the RRF constant (60 in Cormack et al., 2009); larger flattens the rank discount.

    Returns:
        ``(key, score)`` pairs, best first.

    Examples:
        >>> reciprocal_rank_fusion([["a", "b"], ["b", "c"]], k=60)[0][0]
        'b'
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores: dict[K, float] = {}
    for ranking in rankings:
        if len(set(ranking)) != len(ranking):
            raise ValueError("an item appears twice in one ranking")
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: item[1], reverse=True)
