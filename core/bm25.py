"""Okapi BM25 over an in-memory collection: the lexical baseline of retrieval evaluations.

Why it exists: a learned retriever is only worth its cost if it beats BM25 on the same passages,
so ``medirag eval literature`` ranks every query with BM25 too, in the same run. The scoring
follows Lucene's ``BM25Similarity`` as Pyserini's BEIR baselines use it (``k1=0.9, b=0.4``):

* ``idf(t) = log(1 + (N - df + 0.5) / (df + 0.5))``;
* ``score(d, q) = sum over query terms t of qtf(t) * idf(t) * tf / (tf + k1 * (1 - b + b *
  len(d) / avglen))``, a repeated query term counting once per repetition as in Pyserini's
  bag-of-words queries (Lucene 8 dropped the constant ``(k1 + 1)`` factor, which changes no
  ranking, and so does this).

The analyzer is simpler than Lucene's English one, so the numbers are close to, not equal to,
Pyserini's: text is lowercased, split into runs of letters and digits (any script), and the 33
words of Lucene's default English stop set (:data:`STOPWORDS`) are dropped; there is no
stemming, and document lengths are exact rather than Lucene's one-byte approximations.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

__all__ = ["BM25", "STOPWORDS", "tokenize"]

STOPWORDS = frozenset(
    {
        *("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into"),
        *("is", "it", "no", "not", "of", "on", "or", "such", "that", "the", "their", "then"),
        *("there", "these", "they", "this", "to", "was", "will", "with"),
    }
)
"""Lucene's ``EnglishAnalyzer.ENGLISH_STOP_WORDS_SET`` (33 words)."""

_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """The terms BM25 indexes and searches: lowercase runs of letters and digits, without
    :data:`STOPWORDS`.

    Args:
        text: any text.

    Returns:
        The terms, in text order, repeats kept.

    Example:
        >>> tokenize("The IL-6 level, in COVID-19 patients.")
        ['il', '6', 'level', 'covid', '19', 'patients']
    """
    return [word for word in _WORD.findall(text.lower()) if word not in STOPWORDS]


class BM25:
    """A BM25 index of documents, searched one query at a time.

    Each term's postings (the documents holding it and their precomputed term weights) are
    numpy arrays, so a query costs one vectorised addition per distinct query term.

    Args:
        documents: document id to text; ids are returned by :meth:`search`.
        k1: term frequency saturation, ``>= 0``.
        b: length normalisation, in ``[0, 1]``.

    Raises:
        ValueError: ``k1`` or ``b`` out of range.

    Example:
        >>> index = BM25({"d1": "pleural effusion", "d2": "cardiomegaly", "d3": "effusion"})
        >>> [doc for doc, _ in index.search("right pleural effusion", k=5)]
        ['d1', 'd3']
    """

    def __init__(self, documents: Mapping[str, str], *, k1: float = 0.9, b: float = 0.4) -> None:
        if k1 < 0:
            raise ValueError(f"k1 must be >= 0, got {k1}")
        if not 0 <= b <= 1:
            raise ValueError(f"b must be in [0, 1], got {b}")
        self.k1 = k1
        self.b = b
        self._ids = list(documents)
        counts = [Counter(tokenize(text)) for text in documents.values()]
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        average = float(lengths.mean()) if len(lengths) and lengths.mean() > 0 else 1.0
        norms = k1 * (1 - b + b * lengths / average)
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for doc, counter in enumerate(counts):
            for term, frequency in counter.items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(doc)
                tfs.append(frequency)
        total = len(self._ids)
        self._postings: dict[str, tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]] = {}
        for term, (docs, tfs) in postings.items():
            idf = math.log(1 + (total - len(docs) + 0.5) / (len(docs) + 0.5))
            where = np.array(docs, dtype=np.intp)
            frequencies = np.array(tfs, dtype=np.float64)
            weights = idf * frequencies / (frequencies + norms[where])
            self._postings[term] = (where, weights)

    def __len__(self) -> int:
        """The number of documents indexed."""
        return len(self._ids)

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` best documents for ``query``.

        Args:
            query: the query text, tokenized as the documents were.
            k: how many documents to return at most, ``>= 1``.

        Returns:
            ``(document id, score)`` pairs, highest score first, ties in the documents' order;
            documents sharing no term with the query are left out.

        Raises:
            ValueError: ``k < 1``.

        Example:
            >>> BM25({"a": "x y", "b": "y"}).search("y", k=1)[0][0]
            'b'
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = np.zeros(len(self._ids), dtype=np.float64)
        matched = np.zeros(len(self._ids), dtype=bool)
        for term, repeats in Counter(tokenize(query)).items():
            posting = self._postings.get(term)
            if posting is not None:
                where, weights = posting
                scores[where] += repeats * weights
                matched[where] = True
        candidates = np.flatnonzero(matched)
        if len(candidates) > k:
            # Keep everything tied with the k-th score, then sort stably so ties keep doc order.
            threshold = np.partition(scores[candidates], len(candidates) - k)[len(candidates) - k]
            candidates = candidates[scores[candidates] >= threshold]
        order = candidates[np.argsort(-scores[candidates], kind="stable")][:k]
        return [(self._ids[i], float(scores[i])) for i in order]
