"""In-memory implementations of the core ports, for testing the domain logic alone.

The adapters have their own tests against the real systems (PostgreSQL, ONNX Runtime, DICOM);
these doubles only let the orchestration be checked without them. The model doubles are
deterministic and mean nothing beyond "texts sharing words are similar".
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from core.errors import SourceUnavailable
from core.fusion import normalize
from core.types import ChestImage, ImagingResult, IndexedCase, LabResult, ModelCard, Passage


@dataclass
class MemoryCases:
    cases: dict[str, IndexedCase] = field(default_factory=dict)
    leak_patient: bool = False  # simulate an index that forgets to exclude the query patient

    async def upsert_cases(self, cases):
        for case in cases:
            self.cases[case.record.case_id] = case

    async def case_ids(self):
        return frozenset(self.cases)

    async def nearest_by_image(self, query, *, k, exclude_patient):
        rows = [
            (c.record, float(np.dot(normalize(query), c.fused)))
            for c in self.cases.values()
            if self.leak_patient or c.record.patient_ref != exclude_patient
        ]
        return sorted(rows, key=lambda r: r[1], reverse=True)[:k]

    async def nearest_by_findings(self, query, *, k, exclude_patient):
        rows = [
            (c.record, float(np.dot(normalize(query), normalize(c.findings))))
            for c in self.cases.values()
            if self.leak_patient or c.record.patient_ref != exclude_patient
        ]
        return sorted(rows, key=lambda r: r[1], reverse=True)[:k]

    async def nearest_by_labs(self, query, *, k, exclude_patient, min_measured):
        rows = [
            (c.record, float(np.linalg.norm(query - c.labs.vector)))
            for c in self.cases.values()
            if c.labs is not None
            and c.labs.measured_count >= min_measured
            and (self.leak_patient or c.record.patient_ref != exclude_patient)
        ]
        return sorted(rows, key=lambda r: r[1])[:k]


@dataclass
class MemoryLiterature:
    """Passages with dense vectors and, when upserted with them, sparse weights; an upsert
    without sparse weights replaces a passage's with none."""

    passages: dict[str, tuple[Passage, np.ndarray]] = field(default_factory=dict)
    sparse: dict[str, dict[int, float]] = field(default_factory=dict)
    upserts: list[tuple[list[str], bool]] = field(default_factory=list)  # (ids, with sparse)

    async def upsert_passages(self, passages, vectors, sparse=None):
        if sparse is not None and len(sparse) != len(passages):
            raise ValueError(f"{len(sparse)} sparse weights for {len(passages)} passages")
        self.upserts.append(([p.passage_id for p in passages], sparse is not None))
        for i, (p, v) in enumerate(zip(passages, vectors, strict=True)):
            self.passages[p.passage_id] = (p, normalize(v))
            if sparse is None:
                self.sparse.pop(p.passage_id, None)
            else:
                self.sparse[p.passage_id] = dict(sparse[i])

    async def passage_ids(self):
        return frozenset(self.passages)

    async def nearest_passages(self, query, *, k):
        rows = [(p, float(np.dot(normalize(query), v))) for p, v in self.passages.values()]
        return sorted(rows, key=lambda r: r[1], reverse=True)[:k]

    async def nearest_passages_sparse(self, query, *, k):
        rows = [
            (self.passages[pid][0], sum(query[t] * weights[t] for t in shared))
            for pid, weights in self.sparse.items()
            if (shared := query.keys() & weights.keys())
        ]
        return sorted(rows, key=lambda r: r[1], reverse=True)[:k]


class MeanImageModel:
    """Embeds an image as a fixed projection of its row means; findings by a word hash."""

    card = ModelCard("test-image", "test double")
    dimension = 8

    async def embed_images(self, images):
        rows = [np.resize(np.asarray(i, dtype=np.float32).mean(axis=1), 8) + 0.01 for i in images]
        return normalize(np.array(rows, dtype=np.float32).reshape(len(images), 8))

    async def embed_findings(self, texts):
        return TextDouble(8).vectors(texts)


class TextDouble:
    """A bag of hashed words: texts sharing words are similar."""

    card = ModelCard("test-text", "test double")

    def __init__(self, dimension=256):
        self.dimension = dimension

    def vectors(self, texts):
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                out[i, zlib.crc32(word.encode()) % self.dimension] += 1.0
        return normalize(out)

    async def embed_texts(self, texts):
        return self.vectors(texts)


def word_weights(texts, vocabulary=30_000):
    """Each distinct word of each text as a hashed token id with weight 1."""
    return [
        {zlib.crc32(word.encode()) % vocabulary: 1.0 for word in re.findall(r"[a-z]+", t.lower())}
        for t in texts
    ]


class SparseDouble:
    """A sparse model: each distinct word of a text weighs 1; records the texts of each call."""

    card = ModelCard("test-sparse", "test double")

    def __init__(self):
        self.calls = []

    async def embed_sparse(self, texts):
        self.calls.append(list(texts))
        return word_weights(texts)


class DenseSparseDouble(TextDouble):
    """One model giving dense vectors and sparse weights (as BGE-M3 does); records which method
    each run came from, so that a caller can be checked to run it once for both."""

    card = ModelCard("test-dense-sparse", "test double")

    def __init__(self, dimension=256):
        super().__init__(dimension)
        self.runs = []

    async def embed_texts(self, texts):
        self.runs.append("dense")
        return self.vectors(texts)

    async def embed_sparse(self, texts):
        self.runs.append("sparse")
        return word_weights(texts)

    async def encode(self, texts):
        self.runs.append("encode")
        return self.vectors(texts), word_weights(texts)


class TableReranker:
    """A reranker scoring each passage text from a fixed table (0 for texts not in it);
    records the passages of each call."""

    card = ModelCard("test-reranker", "test double")

    def __init__(self, scores):
        self.scores = scores
        self.calls = []

    async def score(self, query, passages):
        self.calls.append(list(passages))
        return np.array([self.scores.get(p, 0.0) for p in passages], dtype=np.float32)


@dataclass
class FixedImaging:
    by_patient: dict[str, list[ChestImage]] = field(default_factory=dict)
    failure: str | None = None

    async def chest_images(self, patient_id, *, limit=4, study_uid=None):
        if self.failure:
            raise SourceUnavailable("imaging", self.failure)
        images = [
            i for i in self.by_patient.get(patient_id, []) if study_uid in (None, i.study_uid)
        ]
        return ImagingResult(images=tuple(images[:limit]))


@dataclass
class FixedRecords:
    by_patient: dict[str, list[LabResult]] = field(default_factory=dict)
    failure: str | None = None

    async def laboratory_results(self, patient_id):
        if self.failure:
            raise SourceUnavailable("FHIR server", self.failure)
        return self.by_patient.get(patient_id, [])
