"""BM25 scores as Lucene's BM25Similarity does, on a corpus small enough to score by hand."""

from __future__ import annotations

import math

import pytest

from core.bm25 import BM25, STOPWORDS, tokenize

CORPUS = {
    "effusion": "Right pleural effusion with adjacent atelectasis.",
    "pneumonia": "Lobar pneumonia of the right lower lobe; no pleural effusion.",
    "heart": "Cardiomegaly. The heart is enlarged.",
    "long": "Pleural thickening, pleural plaques and calcified pleural plaques from old asbestos "
    "exposure, unchanged since the prior radiograph of the chest taken last year.",
}


def idf(df: int, n: int) -> float:
    return math.log(1 + (n - df + 0.5) / (df + 0.5))


def term(tf: int, length: int, average: float, df: int, n: int, k1: float, b: float) -> float:
    return idf(df, n) * tf / (tf + k1 * (1 - b + b * length / average))


def test_tokenize_lowercases_splits_on_non_alphanumerics_and_drops_stopwords() -> None:
    assert tokenize("The Heart-size IS normal; no effusion (CT 2023).") == [
        "heart",
        "size",
        "normal",
        "effusion",
        "ct",
        "2023",
    ]
    assert tokenize("Épanchement pleural_droit") == ["épanchement", "pleural", "droit"]
    assert tokenize("the and of") == []
    assert len(STOPWORDS) == 33


def test_a_score_is_lucenes_bm25_worked_by_hand() -> None:
    index = BM25(CORPUS, k1=0.9, b=0.4)
    lengths = {doc: len(tokenize(text)) for doc, text in CORPUS.items()}
    assert lengths == {"effusion": 5, "pneumonia": 7, "heart": 3, "long": 19}
    average = sum(lengths.values()) / 4
    # "pleural" is in three documents (three times in "long"), "atelectasis" in one.
    expected = term(1, 5, average, 3, 4, 0.9, 0.4) + term(1, 5, average, 1, 4, 0.9, 0.4)
    scores = dict(index.search("pleural atelectasis", k=10))
    assert scores["effusion"] == pytest.approx(expected)
    assert scores["long"] == pytest.approx(term(3, 19, average, 3, 4, 0.9, 0.4))


def test_ranking_on_a_toy_corpus() -> None:
    index = BM25(CORPUS)
    assert [doc for doc, _ in index.search("pleural effusion", k=10)] == [
        "effusion",
        "pneumonia",
        "long",
    ]
    assert index.search("enlarged heart", k=10)[0][0] == "heart"
    assert index.search("asbestos", k=10) == [
        ("long", pytest.approx(term(1, 19, 34 / 4, 1, 4, 0.9, 0.4)))
    ]


def test_rare_terms_weigh_more_and_long_documents_less() -> None:
    index = BM25({"a": "fever cough", "b": "fever", "c": "fever", "d": "fever rash rash rash"})
    # "cough" (df 1) outweighs "fever" (df 4) although both occur once in "a".
    assert index.search("cough", k=1)[0][1] > index.search("fever", k=4)[0][1]
    # Same tf of "fever": the shorter document scores higher.
    scores = dict(index.search("fever", k=4))
    assert scores["b"] > scores["a"] > scores["d"]


def test_a_repeated_query_term_counts_once_per_repetition() -> None:
    index = BM25(CORPUS)
    once = dict(index.search("atelectasis", k=10))
    twice = dict(index.search("atelectasis atelectasis", k=10))
    assert twice["effusion"] == pytest.approx(2 * once["effusion"])


def test_documents_sharing_no_term_are_left_out_and_k_caps_the_list() -> None:
    index = BM25(CORPUS)
    assert index.search("fracture of the femur", k=10) == []
    assert index.search("", k=10) == []
    assert len(index.search("pleural", k=2)) == 2
    assert len(index) == 4


def test_ties_keep_the_documents_order_also_at_the_cut() -> None:
    index = BM25({"x": "cough", "y": "cough", "z": "cough", "w": "fever"})
    assert [doc for doc, _ in index.search("cough", k=2)] == ["x", "y"]
    assert [doc for doc, _ in index.search("cough", k=3)] == ["x", "y", "z"]


def test_an_empty_corpus_finds_nothing() -> None:
    assert BM25({}).search("pleural", k=5) == []
    assert BM25({"a": "", "b": "the of"}).search("the", k=5) == []


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="k1"):
        BM25(CORPUS, k1=-0.1)
    with pytest.raises(ValueError, match="b must"):
        BM25(CORPUS, b=1.5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        BM25(CORPUS).search("pleural", k=0)
