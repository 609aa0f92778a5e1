"""Ranking metrics for retrieval evaluations, with the conventions BEIR reports.

Why it exists: ``medirag eval`` compares retrieval legs (BM25, dense, sparse, hybrid, reranked)
on public benchmarks, and its numbers are only comparable with published ones if each metric is
computed as the benchmark's tooling computes it. BEIR scores with ``pytrec_eval`` (trec_eval's
measures ``ndcg_cut``, ``recall``, ``map_cut``, ``P``) and its own MRR; this module follows
them:

* a document is relevant when its grade in the qrels is ``> 0``; unjudged documents are not
  relevant;
* nDCG uses the grade itself as the gain (trec_eval's default, not ``2**grade - 1``), a
  ``log2(rank + 1)`` discount, and the ideal ranking of all judged documents of the query;
* Recall@k and AP@k divide by the number of relevant documents in the qrels (not by
  ``min(k, relevant)``); MAP@k is the mean of AP@k. :func:`average_precision_at_k` can divide by
  ``min(k, relevant)`` instead (``denominator="capped"``), for evaluations whose queries have
  far more relevant documents than ``k``, where trec_eval's AP@k cannot exceed ``k / relevant``;
* P@k divides by ``k`` even when fewer than ``k`` documents were returned;
* RR@k is ``1 / rank`` of the first relevant document within ``k``, else 0; MRR@k its mean.

Means (:func:`mean_metrics`) are over every query of the qrels, as BEIR's are (it averages
pytrec_eval's per-query scores over the queries it ran, which are the qrels' queries, and its
MRR over ``len(qrels)``): a query whose judgments are all 0 scores 0, and a query missing from
the run counts as an empty ranking. Rankings are taken in the order given: ties must be broken
before (trec_eval breaks score ties by document id, which callers here never need, since they
pass ranks, not scores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

__all__ = [
    "average_precision_at_k",
    "mean_metrics",
    "ndcg_at_k",
    "precision_at_k",
    "recall_at_k",
    "reciprocal_rank_at_k",
]


def _top(ranked: Sequence[str], k: int) -> Sequence[str]:
    """The first ``k`` documents, after checking ``k`` and that no document repeats."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(set(ranked)) != len(ranked):
        raise ValueError("a document appears twice in one ranking")
    return ranked[:k]


def _relevant_count(qrels: Mapping[str, int]) -> int:
    return sum(1 for grade in qrels.values() if grade > 0)


def ndcg_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """Normalised discounted cumulative gain of the first ``k`` documents.

    ``DCG = sum(grade(d_i) / log2(i + 1))`` over ranks ``i = 1..k``, divided by the DCG of the
    qrels' own documents sorted by grade, cut at ``k``. Negative grades count as 0.

    Args:
        ranked: document ids, best first, each at most once.
        qrels: the query's judged documents and their grades.
        k: the cut-off, ``>= 1``.

    Returns:
        A value in ``[0, 1]``; 0 when the query has no relevant document.

    Raises:
        ValueError: ``k < 1`` or a document repeats.

    Example:
        >>> round(ndcg_at_k(["a", "b", "c"], {"b": 2, "c": 1}, 3), 4)
        0.6697
    """
    top = _top(ranked, k)
    dcg = sum(max(qrels.get(doc, 0), 0) / math.log2(i + 2) for i, doc in enumerate(top))
    ideal_grades = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(ideal_grades))
    return dcg / ideal if ideal > 0 else 0.0


def recall_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """The share of the query's relevant documents found in the first ``k``.

    Args:
        ranked: document ids, best first, each at most once.
        qrels: the query's judged documents and their grades.
        k: the cut-off, ``>= 1``.

    Returns:
        A value in ``[0, 1]``; 0 when the query has no relevant document.

    Raises:
        ValueError: ``k < 1`` or a document repeats.

    Example:
        >>> recall_at_k(["a", "b", "c"], {"b": 1, "x": 1}, 2)
        0.5
    """
    relevant = _relevant_count(qrels)
    if relevant == 0:
        _top(ranked, k)
        return 0.0
    return sum(1 for doc in _top(ranked, k) if qrels.get(doc, 0) > 0) / relevant


def precision_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """The share of the first ``k`` ranks holding a relevant document (missing ranks count as
    not relevant).

    Args:
        ranked: document ids, best first, each at most once.
        qrels: the query's judged documents and their grades.
        k: the cut-off, ``>= 1``.

    Returns:
        A value in ``[0, 1]``.

    Raises:
        ValueError: ``k < 1`` or a document repeats.

    Example:
        >>> precision_at_k(["a", "b"], {"b": 1}, 4)
        0.25
    """
    return sum(1 for doc in _top(ranked, k) if qrels.get(doc, 0) > 0) / k


def average_precision_at_k(
    ranked: Sequence[str],
    qrels: Mapping[str, int],
    k: int,
    *,
    denominator: Literal["relevant", "capped"] = "relevant",
) -> float:
    """Average precision cut at ``k``: the precision at the rank of each relevant document
    within ``k``, summed, divided by the number of relevant documents in the qrels (as
    trec_eval's ``map_cut``, so relevant documents not found by rank ``k`` count as 0) or, with
    ``denominator="capped"``, by ``min(k, relevant)``.

    The capped form is the usual retrieval-at-k convention: a ranking whose ``k`` ranks all hold
    relevant documents scores 1 however many more relevant documents there are, whereas
    trec_eval's scores at most ``k / relevant``.

    Args:
        ranked: document ids, best first, each at most once.
        qrels: the query's judged documents and their grades.
        k: the cut-off, ``>= 1``.
        denominator: ``"relevant"`` (trec_eval's ``map_cut``, the default) or ``"capped"``
            (``min(k, relevant)``).

    Returns:
        A value in ``[0, 1]``; 0 when the query has no relevant document.

    Raises:
        ValueError: ``k < 1``, a document repeats, or ``denominator`` is neither form.

    Example:
        >>> average_precision_at_k(["a", "b", "c", "d"], {"b": 1, "d": 1, "z": 1}, 4)
        0.3333333333333333
        >>> qrels = {"a": 1, "b": 1, "c": 1, "d": 1}
        >>> average_precision_at_k(["a", "x", "b"], qrels, 2)  # (1/1) / 4
        0.25
        >>> average_precision_at_k(["a", "x", "b"], qrels, 2, denominator="capped")  # (1/1) / 2
        0.5
    """
    if denominator not in ("relevant", "capped"):
        raise ValueError(f"denominator must be 'relevant' or 'capped', got {denominator!r}")
    top = _top(ranked, k)
    relevant = _relevant_count(qrels)
    if relevant == 0:
        return 0.0
    hits = 0
    total = 0.0
    for i, doc in enumerate(top, start=1):
        if qrels.get(doc, 0) > 0:
            hits += 1
            total += hits / i
    return total / (min(k, relevant) if denominator == "capped" else relevant)


def reciprocal_rank_at_k(ranked: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """``1 / rank`` of the first relevant document within the first ``k``, else 0.

    Args:
        ranked: document ids, best first, each at most once.
        qrels: the query's judged documents and their grades.
        k: the cut-off, ``>= 1``.

    Returns:
        A value in ``[0, 1]``.

    Raises:
        ValueError: ``k < 1`` or a document repeats.

    Example:
        >>> reciprocal_rank_at_k(["a", "b", "c"], {"c": 1}, 10)
        0.3333333333333333
    """
    for i, doc in enumerate(_top(ranked, k), start=1):
        if qrels.get(doc, 0) > 0:
            return 1.0 / i
    return 0.0


def mean_metrics(
    runs: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    ndcg_k: int = 10,
    recall_k: int = 100,
    map_k: int = 100,
    mrr_k: int = 10,
) -> dict[str, float]:
    """BEIR's headline metrics, each the mean over the queries of ``qrels``.

    Args:
        runs: per query id, the document ids retrieved, best first; a query of ``qrels``
            missing here counts as an empty ranking, and queries not in ``qrels`` are ignored.
        qrels: per query id, the judged documents and their grades.
        ndcg_k: the cut-off of nDCG.
        recall_k: the cut-off of recall.
        map_k: the cut-off of MAP.
        mrr_k: the cut-off of MRR.

    Returns:
        ``{"nDCG@10": ..., "Recall@100": ..., "MAP@100": ..., "MRR@10": ...}`` (the names
        carry the cut-offs given).

    Raises:
        ValueError: ``qrels`` is empty, a cut-off is ``< 1``, or a document repeats in a
            ranking.

    Example:
        >>> mean_metrics({"q1": ["a", "b"], "q2": ["c"]}, {"q1": {"b": 1}, "q2": {"d": 1}})
        {'nDCG@10': 0.31546487678572877, 'Recall@100': 0.5, 'MAP@100': 0.25, 'MRR@10': 0.25}
    """
    measures = (
        (f"nDCG@{ndcg_k}", ndcg_at_k, ndcg_k),
        (f"Recall@{recall_k}", recall_at_k, recall_k),
        (f"MAP@{map_k}", average_precision_at_k, map_k),
        (f"MRR@{mrr_k}", reciprocal_rank_at_k, mrr_k),
    )
    for _, _, k in measures:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
    if not qrels:
        raise ValueError("no queries in the qrels: nothing to average")
    totals = dict.fromkeys((name for name, _, _ in measures), 0.0)
    for query, judged in qrels.items():
        ranked = runs.get(query, ())
        for name, measure, k in measures:
            totals[name] += measure(ranked, judged, k)
    return {name: total / len(qrels) for name, total in totals.items()}
