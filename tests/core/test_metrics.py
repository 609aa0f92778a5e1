"""The ranking metrics give the values trec_eval and BEIR give, on examples worked by hand."""

from __future__ import annotations

import math

import pytest

from core.metrics import (
    average_precision_at_k,
    mean_metrics,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    reciprocal_rank_at_k,
)

MEASURES = (ndcg_at_k, recall_at_k, precision_at_k, average_precision_at_k, reciprocal_rank_at_k)


def test_ndcg_uses_the_grade_as_gain_and_the_ideal_of_the_qrels() -> None:
    # Ranks 2 and 4 hold grades 2 and 1; a judged grade-3 document was never retrieved.
    qrels = {"b": 2, "d": 1, "z": 3, "n": 0}
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    ideal = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(["a", "b", "c", "d"], qrels, 10) == pytest.approx(dcg / ideal)
    # Exponential gains (2**grade - 1) would give another value.
    exponential = (3 / math.log2(3) + 1 / math.log2(5)) / (7 + 3 / math.log2(3) + 1 / math.log2(4))
    assert ndcg_at_k(["a", "b", "c", "d"], qrels, 10) != pytest.approx(exponential)


def test_ndcg_cuts_both_the_ranking_and_the_ideal_at_k() -> None:
    qrels = {"a": 1, "b": 1, "c": 1}
    assert ndcg_at_k(["a", "b", "x", "c"], qrels, 2) == pytest.approx(1.0)
    # Within k=3, "x" takes the third rank the ideal fills with "c".
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(["a", "b", "x", "c"], qrels, 3) == pytest.approx(
        (1 + 1 / math.log2(3)) / ideal
    )


def test_ndcg_of_a_perfect_ranking_is_one_and_of_no_relevant_document_zero() -> None:
    assert ndcg_at_k(["a", "b"], {"a": 3, "b": 1}, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["b", "a"], {"a": 3, "b": 1}, 10) < 1.0
    assert ndcg_at_k(["a", "b"], {"a": 0, "b": -1}, 10) == 0.0
    assert ndcg_at_k([], {"a": 1}, 10) == 0.0


def test_recall_divides_by_all_relevant_documents_not_by_k() -> None:
    qrels = {"a": 1, "b": 2, "c": 1, "n": 0}
    assert recall_at_k(["a", "b", "c"], qrels, 2) == pytest.approx(2 / 3)
    assert recall_at_k(["x", "n", "c"], qrels, 100) == pytest.approx(1 / 3)
    assert recall_at_k(["a"], {"a": 0}, 10) == 0.0


def test_precision_counts_missing_ranks_as_not_relevant() -> None:
    assert precision_at_k(["a", "x", "b"], {"a": 1, "b": 1}, 5) == pytest.approx(2 / 5)
    assert precision_at_k(["a", "x", "b"], {"a": 1, "b": 1}, 2) == pytest.approx(1 / 2)


def test_average_precision_is_trec_evals_map_cut() -> None:
    # Relevant at ranks 1 and 3, a third relevant document never found: (1/1 + 2/3) / 3.
    qrels = {"a": 1, "c": 2, "z": 1, "b": 0}
    ranked = ["a", "b", "c", "d", "e"]
    assert average_precision_at_k(ranked, qrels, 100) == pytest.approx((1 + 2 / 3) / 3)
    # Cut at 2, only the first hit counts, and the denominator stays 3.
    assert average_precision_at_k(ranked, qrels, 2) == pytest.approx(1 / 3)
    assert average_precision_at_k(ranked, {"b": 0}, 10) == 0.0


def test_capped_average_precision_divides_by_min_of_k_and_relevant() -> None:
    # Five relevant documents, k = 3, hits at ranks 1 and 3: the sum is 1/1 + 2/3.
    qrels = {"a": 1, "c": 1, "y": 1, "z": 1, "w": 2, "b": 0}
    ranked = ["a", "b", "c", "d"]
    assert average_precision_at_k(ranked, qrels, 3) == pytest.approx((1 + 2 / 3) / 5)
    assert average_precision_at_k(ranked, qrels, 3, denominator="capped") == pytest.approx(
        (1 + 2 / 3) / 3
    )
    # Every one of the k ranks relevant: 1 capped, only k / relevant in trec_eval's form.
    full = ["a", "c", "y", "z", "w"]
    assert average_precision_at_k(full, qrels, 3, denominator="capped") == pytest.approx(1.0)
    assert average_precision_at_k(full, qrels, 3) == pytest.approx(3 / 5)


def test_capped_average_precision_equals_trec_evals_with_fewer_relevant_than_k() -> None:
    qrels = {"a": 1, "c": 2, "z": 1, "b": 0}
    ranked = ["a", "b", "c", "d", "e"]
    capped = average_precision_at_k(ranked, qrels, 10, denominator="capped")
    assert capped == pytest.approx((1 + 2 / 3) / 3)
    assert capped == average_precision_at_k(ranked, qrels, 10)
    assert average_precision_at_k(ranked, {"b": 0}, 10, denominator="capped") == 0.0


def test_average_precision_refuses_an_unknown_denominator() -> None:
    with pytest.raises(ValueError, match="denominator must be 'relevant' or 'capped'"):
        average_precision_at_k(["a"], {"a": 1}, 10, denominator="min")  # type: ignore[arg-type]


def test_reciprocal_rank_is_of_the_first_relevant_document_within_k() -> None:
    assert reciprocal_rank_at_k(["x", "y", "a", "b"], {"a": 1, "b": 2}, 10) == pytest.approx(1 / 3)
    assert reciprocal_rank_at_k(["x", "y", "a"], {"a": 1}, 2) == 0.0
    assert reciprocal_rank_at_k(["x", "a"], {"x": 0, "a": 1}, 10) == pytest.approx(1 / 2)


@pytest.mark.parametrize("measure", MEASURES)
def test_a_repeated_document_or_a_cut_off_below_one_is_refused(measure: object) -> None:
    assert callable(measure)
    with pytest.raises(ValueError, match="twice"):
        measure(["a", "b", "a"], {"a": 1}, 10)
    with pytest.raises(ValueError, match="k must be >= 1"):
        measure(["a"], {"a": 1}, 0)


def test_mean_metrics_follow_beir() -> None:
    qrels = {
        "q1": {"a": 1},  # found at rank 2
        "q2": {"b": 1, "c": 1},  # one of two found at rank 1
        "q3": {"d": 0},  # judged, nothing relevant: scores 0 and still counts
        "q4": {"e": 1},  # not in the run: an empty ranking
    }
    runs = {"q1": ["x", "a"], "q2": ["b", "y"], "q3": ["d"], "unjudged": ["e"]}
    means = mean_metrics(runs, qrels)
    assert list(means) == ["nDCG@10", "Recall@100", "MAP@100", "MRR@10"]
    ndcg_q2 = 1 / (1 + 1 / math.log2(3))
    assert means["nDCG@10"] == pytest.approx((1 / math.log2(3) + ndcg_q2) / 4)
    assert means["Recall@100"] == pytest.approx((1 + 0.5) / 4)
    assert means["MAP@100"] == pytest.approx((0.5 + 0.5) / 4)
    assert means["MRR@10"] == pytest.approx((0.5 + 1) / 4)


def test_mean_metrics_name_their_cut_offs() -> None:
    means = mean_metrics({"q": ["x", "a"]}, {"q": {"a": 1}}, ndcg_k=5, recall_k=1, map_k=2, mrr_k=1)
    assert means == {"nDCG@5": pytest.approx(1 / math.log2(3)), "Recall@1": 0.0,
                     "MAP@2": 0.5, "MRR@1": 0.0}  # fmt: skip


def test_mean_metrics_refuse_empty_qrels_and_bad_cut_offs() -> None:
    with pytest.raises(ValueError, match="no queries"):
        mean_metrics({"q": ["a"]}, {})
    with pytest.raises(ValueError, match="k must be >= 1"):
        mean_metrics({"q": ["a"]}, {"q": {"a": 1}}, recall_k=0)


def test_mean_metrics_agree_with_pytrec_eval() -> None:
    # The reference values were computed once by pytrec_eval (the pytrec-eval-terrier 0.5.11
    # wheel) on this run, with measures ndcg_cut.10, recall.100,
    # map_cut.100 and recip_rank: graded judgments, a judged-non-relevant document retrieved,
    # a relevant document never retrieved.
    qrels = {
        "q1": {"d1": 2, "d2": 1, "d3": 0, "d9": 1},
        "q2": {"d4": 1},
        "q3": {"d5": 3, "d6": 1},
    }
    runs = {
        "q1": ["d3", "d2", "d7", "d1", "d8"],
        "q2": ["d1", "d2", "d3", "d4"],
        "q3": ["d6", "d5"],
    }
    means = mean_metrics(runs, qrels, mrr_k=1000)
    assert means["nDCG@10"] == pytest.approx(0.5680034164174709, abs=1e-12)
    assert means["Recall@100"] == pytest.approx(0.8888888888888888, abs=1e-12)
    assert means["MAP@100"] == pytest.approx(0.5277777777777778, abs=1e-12)
    assert means["MRR@1000"] == pytest.approx(0.5833333333333334, abs=1e-12)
