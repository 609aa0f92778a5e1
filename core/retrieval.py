"""Retrieval: similar past cases from independent searches, and literature.

Similar cases come from searches ("legs") that never see each other's scores:

* the image leg searches the indexed cases' fused image+findings vectors with the query's image
  alone (the query's own findings are never used: that would be circular);
* the lab leg searches the indexed cases' lab profiles with the query's lab profile;
* the reason leg searches the indexed cases' recorded findings with a draft order's reason,
  embedded by the same text tower the findings were (:func:`reason_leg`).

Their rankings are merged by reciprocal rank fusion (:func:`merge_legs`), so a leg with larger
raw similarities cannot drown the others, and the query's own patient is excluded from all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from core.fusion import reciprocal_rank_fusion
from core.ports import CaseIndex, LiteratureIndex, TextEmbedder
from core.types import CaseHit, CaseRecord, LabProfile, LegMatch, PassageHit, Vector

__all__ = [
    "CaseSearchSettings",
    "LegResult",
    "LiteratureSearchSettings",
    "image_leg",
    "lab_leg",
    "literature_query",
    "merge_legs",
    "reason_leg",
    "reason_literature_query",
    "search_literature",
]


@dataclass(frozen=True, slots=True)
class CaseSearchSettings:
    """How similar cases are searched.

    Args:
        k: how many merged cases to return.
        leg_k: how many candidates each leg contributes before merging.
        rrf_k: the reciprocal rank fusion constant.
        min_labs: the fewest measured panel tests a lab profile needs to be compared, for the
            query and for each candidate.
    """

    k: int = 5
    leg_k: int = 20
    rrf_k: int = 60
    min_labs: int = 3


@dataclass(frozen=True, slots=True)
class LiteratureSearchSettings:
    """How literature is searched.

    Args:
        k: how many passages to return, each from a different article.
        candidates: how many passages to fetch before keeping the best one per article.
    """

    k: int = 3
    candidates: int = 30


@dataclass(frozen=True, slots=True)
class LegResult:
    """One leg's ranking of cases, best first.

    Args:
        name: the leg's name, as the cards show it.
        metric: ``"cos"`` when higher scores are closer, ``"dist"`` when lower are.
        hits: ``(case, score)`` pairs, best first, each case at most once.
    """

    name: str
    metric: Literal["cos", "dist"]
    hits: tuple[tuple[CaseRecord, float], ...]


def merge_legs(
    legs: Sequence[LegResult], *, patient_ref: str, k: int, rrf_k: int
) -> tuple[CaseHit, ...]:
    """Merge legs by reciprocal rank fusion, never returning the query's own patient.

    The index is asked to exclude the patient; anything it returns anyway is dropped here
    before ranks are counted, so the invariant does not rest on one adapter.

    Args:
        legs: the legs' rankings.
        patient_ref: the query patient (``Patient/<id>``).
        k: how many merged cases to return.
        rrf_k: the reciprocal rank fusion constant.
    """
    records: dict[str, CaseRecord] = {}
    matches: dict[str, list[LegMatch]] = {}
    rankings: list[list[str]] = []
    for leg in legs:
        ranking: list[str] = []
        for record, score in leg.hits:
            if record.patient_ref == patient_ref:
                continue
            ranking.append(record.case_id)
            records.setdefault(record.case_id, record)
            matches.setdefault(record.case_id, []).append(
                LegMatch(leg=leg.name, rank=len(ranking), score=score, metric=leg.metric)
            )
        rankings.append(ranking)
    merged = reciprocal_rank_fusion(rankings, k=rrf_k)
    return tuple(
        CaseHit(case=records[case_id], score=score, legs=tuple(matches[case_id]))
        for case_id, score in merged[:k]
    )


async def _best_similarity(
    vectors: Vector,
    search: Callable[[Vector], Awaitable[Sequence[tuple[CaseRecord, float]]]],
) -> tuple[tuple[CaseRecord, float], ...]:
    """Every case ``search`` finds for any of ``vectors``, once, at its best cosine similarity,
    most similar first."""
    best: dict[str, tuple[CaseRecord, float]] = {}
    for vector in vectors:
        for record, similarity in await search(vector):
            if record.case_id not in best or similarity > best[record.case_id][1]:
                best[record.case_id] = (record, similarity)
    return tuple(sorted(best.values(), key=lambda hit: hit[1], reverse=True))


async def image_leg(
    image_vectors: Vector, *, patient_ref: str, index: CaseIndex, k: int
) -> LegResult:
    """Cases nearest to the query's images (fused vectors, cosine).

    With several images a case ranks by its best similarity to any of them.
    """
    hits = await _best_similarity(
        image_vectors,
        lambda vector: index.nearest_by_image(vector, k=k, exclude_patient=patient_ref),
    )
    return LegResult(name="image", metric="cos", hits=hits)


async def reason_leg(
    reason_vectors: Vector, *, patient_ref: str, index: CaseIndex, k: int
) -> LegResult:
    """Cases whose recorded findings are nearest to an order's reasons (cosine, in the image
    model's text space, where the cases' findings are indexed).

    With several reasons (several orders) a case ranks by its best similarity to any of them,
    as in :func:`image_leg`.

    Args:
        reason_vectors: the reasons embedded by the image model's text tower, shape ``(N, D)``.
        patient_ref: the query patient, whose own cases are excluded.
        index: the case index.
        k: how many cases each reason contributes at most.
    """
    hits = await _best_similarity(
        reason_vectors,
        lambda vector: index.nearest_by_findings(vector, k=k, exclude_patient=patient_ref),
    )
    return LegResult(name="reason", metric="cos", hits=hits)


async def lab_leg(
    labs: LabProfile | None, *, patient_ref: str, index: CaseIndex, settings: CaseSearchSettings
) -> LegResult | str:
    """Cases nearest to the query's lab profile (Euclidean), or why the leg cannot run."""
    have = 0 if labs is None else labs.measured_count
    if labs is None or have < settings.min_labs:
        return (
            f"lab comparison skipped: {have} of the panel's tests measured, "
            f"{settings.min_labs} needed"
        )
    hits = await index.nearest_by_labs(
        labs.vector, k=settings.leg_k, exclude_patient=patient_ref, min_measured=settings.min_labs
    )
    return LegResult(name="labs", metric="dist", hits=tuple(hits))


def literature_query(cases: Sequence[CaseHit], labs: LabProfile | None) -> str | None:
    """The text to search literature with, built only from attributable facts.

    It names the findings recorded in the similar cases (most frequent first, "No Finding"
    left out) and the patient's abnormal labs. It never uses the query patient's own image
    labels, which the service does not have.

    Returns:
        The query, or ``None`` when there is nothing to search for.

    Examples:
        >>> from core.types import CaseRecord, CaseHit
        >>> hit = CaseHit(CaseRecord("c1", "Patient/p", "1.2", ("Effusion",), "demo"), 0.1)
        >>> literature_query([hit], None)
        'chest radiograph findings: effusion'
    """
    counts = Counter(
        finding
        for hit in cases
        for finding in hit.case.findings
        if finding.lower() not in {"no finding", "normal"}
    )
    parts: list[str] = []
    if counts:
        findings = ", ".join(f.replace("_", " ").lower() for f, _ in counts.most_common(4))
        parts.append(f"chest radiograph findings: {findings}")
    abnormal = _abnormal_labs(labs)
    if abnormal:
        parts.append(abnormal)
    return "; ".join(parts) or None


def _abnormal_labs(labs: LabProfile | None) -> str | None:
    """The patient's abnormal labs as a part of a literature query, if there are any."""
    if labs is None or not labs.abnormal:
        return None
    abnormal = ", ".join(f"{flag} {name.lower()}" for name, flag in labs.abnormal[:4])
    return f"laboratory results: {abnormal}"


def reason_literature_query(reasons: Sequence[str], labs: LabProfile | None) -> str:
    """The text to search literature with for an order: its reasons and the patient's abnormal
    labs (the similar cases' findings are left out: the reason says what is being looked for).

    Args:
        reasons: the reasons the orders give, at least one.
        labs: the patient's lab profile, if any.

    Examples:
        >>> reason_literature_query(["Cough and fever"], None)
        'reason for chest imaging: Cough and fever'
    """
    parts = [f"reason for chest imaging: {', '.join(reasons)}"]
    abnormal = _abnormal_labs(labs)
    if abnormal:
        parts.append(abnormal)
    return "; ".join(parts)


async def search_literature(
    query: str,
    *,
    embedder: TextEmbedder,
    index: LiteratureIndex,
    settings: LiteratureSearchSettings = LiteratureSearchSettings(),
) -> tuple[PassageHit, ...]:
    """Dense search of the literature index for ``query``, one passage per article.

    Sections of one abstract are often each other's nearest neighbours; keeping only the best
    section of each article gives the clinician ``k`` sources rather than one source ``k`` times.

    Returns:
        Passages best first, each carrying the identifiers needed to cite it.
    """
    vector = (await embedder.embed_texts([query]))[0]
    found = await index.nearest_passages(vector, k=max(settings.k, settings.candidates))
    best: dict[str, PassageHit] = {}
    for passage, score in found:
        if passage.pmid not in best:
            best[passage.pmid] = PassageHit(passage=passage, score=score)
    return tuple(best.values())[: settings.k]
