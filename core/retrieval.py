"""Retrieval: similar past cases from independent searches, and literature.

Similar cases come from searches ("legs") that never see each other's scores:

* the image leg searches the indexed cases' fused image+findings vectors with the query's image
  alone (the query's own findings are never used: that would be circular);
* the lab leg searches the indexed cases' lab profiles with the query's lab profile;
* the reason leg searches the indexed cases' recorded findings with a draft order's reason,
  embedded by the same text tower the findings were (:func:`reason_leg`).

Their rankings are merged by reciprocal rank fusion (:func:`merge_legs`), so a leg with larger
raw similarities cannot drown the others, and the query's own patient is excluded from all.

Literature is searched the same way (:func:`search_literature`): a dense leg (meaning) and, when
a sparse model is given, a sparse leg (shared words) are fused by reciprocal rank fusion
(:func:`fuse_passages`); a cross-encoder, when given, then reorders the best of the fused
candidates (:func:`rerank_passages`), reading query and passage together as neither leg can.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from core.fusion import reciprocal_rank_fusion
from core.ports import (
    CaseIndex,
    DenseSparseTextEmbedder,
    LiteratureIndex,
    Reranker,
    SparseTextEmbedder,
    TextEmbedder,
)
from core.types import (
    CaseHit,
    CaseRecord,
    LabProfile,
    LegMatch,
    Passage,
    PassageHit,
    SparseWeights,
    Vector,
)

__all__ = [
    "CaseSearchSettings",
    "LegResult",
    "LiteratureSearchSettings",
    "RankedPassages",
    "fuse_passages",
    "image_leg",
    "lab_leg",
    "literature_legs",
    "literature_query",
    "merge_legs",
    "reason_leg",
    "reason_literature_query",
    "rerank_passages",
    "search_literature",
]

RankedPassages = list[tuple[Passage, float]]
"""Passages best first, each with its score in that ranking."""

_LEG_METRICS: dict[str, Literal["cos", "ip"]] = {"dense": "cos", "sparse": "ip"}


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
        candidates: how many passages each leg fetches (at least ``k``) before fusion,
            reranking and keeping the best one per article.
        rrf_k: the reciprocal rank fusion constant of the dense and sparse legs.
        rerank_top_n: how many of the fused passages, best first, a reranker reorders; the
            rest follow them in fused order.

    Raises:
        ValueError: a value is below 1.

    Examples:
        >>> LiteratureSearchSettings(k=5).candidates
        30
        >>> LiteratureSearchSettings(rerank_top_n=0)
        Traceback (most recent call last):
        ...
        ValueError: literature search rerank_top_n must be >= 1, got 0
    """

    k: int = 3
    candidates: int = 30
    rrf_k: int = 60
    rerank_top_n: int = 20

    def __post_init__(self) -> None:
        for name in ("k", "candidates", "rrf_k", "rerank_top_n"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"literature search {name} must be >= 1, got {value}")


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


async def _embed_query(
    query: str, embedder: TextEmbedder, sparse_embedder: SparseTextEmbedder | None
) -> tuple[Vector, SparseWeights | None]:
    """The query's dense vector and, with a sparse model, its sparse weights; one run of the
    model when one model gives both (BGE-M3)."""
    if sparse_embedder is None:
        return (await embedder.embed_texts([query]))[0], None
    if isinstance(embedder, DenseSparseTextEmbedder) and sparse_embedder is embedder:
        dense, sparse = await embedder.encode([query])
    else:
        dense, sparse = await asyncio.gather(
            embedder.embed_texts([query]), sparse_embedder.embed_sparse([query])
        )
    return dense[0], sparse[0]


async def literature_legs(
    query: str,
    *,
    embedder: TextEmbedder,
    index: LiteratureIndex,
    k: int,
    sparse_embedder: SparseTextEmbedder | None = None,
) -> dict[str, RankedPassages]:
    """The literature index's rankings of passages for ``query``, one per search leg.

    Args:
        query: the search text.
        embedder: the text model the passages' dense vectors come from.
        index: the literature index.
        k: how many passages each leg returns at most.
        sparse_embedder: the model the passages' sparse weights come from; ``None`` runs the
            dense leg alone. It may be ``embedder`` itself.

    Returns:
        ``{"dense": ...}`` (cosine similarities) and, with a sparse model, ``"sparse"`` (inner
        products of sparse weights; empty when the model keeps no token of the query), each
        best first.

    Example:
        >>> legs = await literature_legs(  # doctest: +SKIP
        ...     "pleural effusion", embedder=bge_m3, index=store, k=30, sparse_embedder=bge_m3
        ... )
        >>> sorted(legs)  # doctest: +SKIP
        ['dense', 'sparse']
    """
    vector, weights = await _embed_query(query, embedder, sparse_embedder)
    if weights is None:
        return {"dense": list(await index.nearest_passages(vector, k=k))}
    if not weights:
        return {"dense": list(await index.nearest_passages(vector, k=k)), "sparse": []}
    dense, sparse = await asyncio.gather(
        index.nearest_passages(vector, k=k), index.nearest_passages_sparse(weights, k=k)
    )
    return {"dense": list(dense), "sparse": list(sparse)}


def fuse_passages(
    rankings: Sequence[Sequence[tuple[Passage, float]]], *, rrf_k: int
) -> RankedPassages:
    """Merge passage rankings by reciprocal rank fusion on ``passage_id``.

    A passage that several rankings return outranks one returned by a single ranking at the
    same rank, whatever the scales of the rankings' own scores.

    Args:
        rankings: each ``(passage, score)`` pairs, best first, a passage at most once.
        rrf_k: the reciprocal rank fusion constant.

    Returns:
        ``(passage, fused score)`` pairs, best first.

    Raises:
        ValueError: ``rrf_k`` is below 1, or a passage appears twice in one ranking.

    Examples:
        >>> a, b, c = (Passage(f"{i}:0", str(i), "text") for i in range(3))
        >>> fused = fuse_passages([[(a, 0.9), (b, 0.8)], [(b, 7.0), (c, 2.0)]], rrf_k=60)
        >>> [p.passage_id for p, _ in fused]
        ['1:0', '0:0', '2:0']
    """
    passages = {p.passage_id: p for ranking in rankings for p, _ in ranking}
    merged = reciprocal_rank_fusion(
        [[p.passage_id for p, _ in ranking] for ranking in rankings], k=rrf_k
    )
    return [(passages[passage_id], score) for passage_id, score in merged]


async def rerank_passages(
    query: str, ranked: Sequence[tuple[Passage, float]], *, reranker: Reranker, top_n: int
) -> RankedPassages:
    """Reorder the first ``top_n`` passages by a cross-encoder's relevance to ``query``.

    Only the best of the ranking is read by the (slow) cross-encoder; the rest follow the
    reranked passages in their given order, with their given scores. Equal relevance keeps the
    given order.

    Args:
        query: the search text.
        ranked: ``(passage, score)`` pairs, best first.
        reranker: the cross-encoder.
        top_n: how many passages, from the top, to rerank.

    Returns:
        The reranked passages with their relevance scores, then the rest.

    Raises:
        ValueError: ``top_n`` is below 1, or the reranker returned the wrong number of scores.

    Example:
        >>> fused = fuse_passages([dense, sparse], rrf_k=60)  # doctest: +SKIP
        >>> reranked = await rerank_passages(  # doctest: +SKIP
        ...     "pleural effusion", fused, reranker=cross_encoder, top_n=20
        ... )
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    head, tail = list(ranked[:top_n]), list(ranked[top_n:])
    if not head:
        return tail
    scores = await reranker.score(query, [passage.text for passage, _ in head])
    if len(scores) != len(head):
        raise ValueError(f"the reranker returned {len(scores)} scores for {len(head)} passages")
    # sorted is stable, so equal relevance keeps the fused order.
    order = sorted(range(len(head)), key=lambda i: -float(scores[i]))
    return [(head[i][0], float(scores[i])) for i in order] + tail


async def search_literature(
    query: str,
    *,
    embedder: TextEmbedder,
    index: LiteratureIndex,
    settings: LiteratureSearchSettings = LiteratureSearchSettings(),
    sparse_embedder: SparseTextEmbedder | None = None,
    reranker: Reranker | None = None,
) -> tuple[PassageHit, ...]:
    """Search the literature index for ``query``, one passage per article.

    The dense leg (and the sparse leg, with ``sparse_embedder``) each fetch ``candidates``
    passages; two legs are fused by reciprocal rank fusion (one leg keeps its own order and
    scores); ``reranker``, when given, reorders the first ``rerank_top_n``. Sections of one
    abstract are often each other's nearest neighbours; keeping only the best section of each
    article then gives the clinician ``k`` sources rather than one source ``k`` times.

    Args:
        query: the search text.
        embedder: the text model the passages were indexed with.
        index: the literature index.
        settings: depths and constants of the search.
        sparse_embedder: the sparse model the passages' sparse weights came from; ``None``
            searches by dense vector alone.
        reranker: a cross-encoder to reorder the best candidates; ``None`` keeps the legs' order.

    Returns:
        Passages best first, each carrying the identifiers needed to cite it, with its score in
        the final ranking: the cosine similarity (dense leg alone), the fused score (two legs),
        or the reranker's relevance (a reranked passage); and its rank and score in each leg
        that returned it, and in the reranking.

    Example:
        >>> hits = await search_literature(  # doctest: +SKIP
        ...     "pleural effusion drainage",
        ...     embedder=bge_m3,
        ...     index=store,
        ...     sparse_embedder=bge_m3,
        ...     reranker=cross_encoder,
        ... )
        >>> [hit.passage.pmid for hit in hits]  # doctest: +SKIP
        ['21830965', '25123456', '19234567']
    """
    legs = await literature_legs(
        query,
        embedder=embedder,
        index=index,
        k=max(settings.k, settings.candidates),
        sparse_embedder=sparse_embedder,
    )
    matches: dict[str, list[LegMatch]] = {}
    for name, hits in legs.items():
        for rank, (passage, score) in enumerate(hits, start=1):
            matches.setdefault(passage.passage_id, []).append(
                LegMatch(leg=name, rank=rank, score=score, metric=_LEG_METRICS[name])
            )
    ranked = (
        legs["dense"]
        if len(legs) == 1
        else fuse_passages(list(legs.values()), rrf_k=settings.rrf_k)
    )
    if reranker is not None:
        ranked = await rerank_passages(
            query, ranked, reranker=reranker, top_n=settings.rerank_top_n
        )
        for rank, (passage, score) in enumerate(ranked[: settings.rerank_top_n], start=1):
            matches[passage.passage_id].append(
                LegMatch(leg="rerank", rank=rank, score=score, metric="relevance")
            )
    best: dict[str, PassageHit] = {}
    for passage, score in ranked:
        if passage.pmid not in best:
            best[passage.pmid] = PassageHit(
                passage=passage, score=score, legs=tuple(matches[passage.passage_id])
            )
    return tuple(best.values())[: settings.k]
