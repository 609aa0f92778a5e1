"""Retrieval: similar past cases from independent searches, and literature.

Similar cases come from two searches that never see each other's scores:

* the image leg searches the indexed cases' fused image+findings vectors with the query's image
  alone (the query's own findings are never used: that would be circular);
* the lab leg searches the indexed cases' lab profiles with the query's lab profile.

Their rankings are merged by reciprocal rank fusion, so a leg with larger raw similarities
cannot drown the other, and the query's own patient is excluded from both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from core.fusion import reciprocal_rank_fusion
from core.ports import CaseIndex, LiteratureIndex, TextEmbedder
from core.types import CaseHit, CaseRecord, LabProfile, PassageHit, Vector

__all__ = [
    "CaseSearchSettings",
    "LiteratureSearchSettings",
    "literature_query",
    "search_literature",
    "similar_cases",
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


async def similar_cases(
    *,
    patient_ref: str,
    image_vectors: Vector | None,
    labs: LabProfile | None,
    index: CaseIndex,
    settings: CaseSearchSettings = CaseSearchSettings(),
) -> tuple[tuple[CaseHit, ...], tuple[str, ...]]:
    """Find past cases similar to a patient by image and by labs, merged.

    Args:
        patient_ref: the query patient (``Patient/<id>``), excluded from the results: the index
            is asked to exclude it and anything it returns anyway is dropped.
        image_vectors: embeddings of the patient's chest images, shape ``(N, D)``, or ``None``.
            With several images a case ranks by its best similarity to any of them.
        labs: the patient's lab profile, or ``None``.
        index: where the cases are.
        settings: search sizes.

    Returns:
        The hits, best first, and notes on legs that could not run and why.
    """
    notes: list[str] = []
    image_hits: dict[str, tuple[CaseRecord, float]] = {}
    if image_vectors is not None and len(image_vectors):
        for vector in image_vectors:
            found = await index.nearest_by_image(
                vector, k=settings.leg_k, exclude_patient=patient_ref
            )
            for record, similarity in found:
                if record.patient_ref == patient_ref:
                    continue
                best = image_hits.get(record.case_id)
                if best is None or similarity > best[1]:
                    image_hits[record.case_id] = (record, similarity)
    image_ranking = sorted(image_hits, key=lambda cid: image_hits[cid][1], reverse=True)

    lab_hits: dict[str, tuple[CaseRecord, float]] = {}
    if labs is None or labs.measured_count < settings.min_labs:
        have = 0 if labs is None else labs.measured_count
        notes.append(
            f"lab comparison skipped: {have} of the panel's tests measured, "
            f"{settings.min_labs} needed"
        )
    else:
        found = await index.nearest_by_labs(
            labs.vector,
            k=settings.leg_k,
            exclude_patient=patient_ref,
            min_measured=settings.min_labs,
        )
        lab_hits = {
            record.case_id: (record, distance)
            for record, distance in found
            if record.patient_ref != patient_ref
        }
    lab_ranking = list(lab_hits)

    merged = reciprocal_rank_fusion([image_ranking, lab_ranking], k=settings.rrf_k)
    image_rank = {cid: r for r, cid in enumerate(image_ranking, start=1)}
    lab_rank = {cid: r for r, cid in enumerate(lab_ranking, start=1)}
    hits: list[CaseHit] = []
    for case_id, score in merged[: settings.k]:
        record = (image_hits.get(case_id) or lab_hits[case_id])[0]
        hits.append(
            CaseHit(
                case=record,
                score=score,
                image_rank=image_rank.get(case_id),
                image_similarity=image_hits[case_id][1] if case_id in image_hits else None,
                lab_rank=lab_rank.get(case_id),
                lab_distance=lab_hits[case_id][1] if case_id in lab_hits else None,
            )
        )
    return tuple(hits), tuple(notes)


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
    if labs is not None and labs.abnormal:
        abnormal = ", ".join(f"{flag} {name.lower()}" for name, flag in labs.abnormal[:4])
        parts.append(f"laboratory results: {abnormal}")
    return "; ".join(parts) or None


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
