"""Ports: what the domain needs from the world, as Protocols.

Each port has interchangeable implementations in ``adapters/``, in the way dicomweb-client's
``DICOMwebClient`` and ``DICOMfileClient`` share one interface: a FHIR server or a folder of
bundles behind :class:`ClinicalRecords`, a PACS over DICOMweb or a folder of DICOM files behind
:class:`ImagingArchive`, a PostgreSQL server or an embedded one behind the indexes. The embedded
implementations are first-class: the demo and the tests run on them.

Data ports are ``async`` because their implementations wait on networks and disks; model ports
are ``async`` so that an implementation can batch concurrent requests or run off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from core.types import (
    CaseRecord,
    ImagingResult,
    IndexedCase,
    LabResult,
    ModelCard,
    Passage,
    SparseWeights,
    Vector,
)

__all__ = [
    "CaseIndex",
    "ClinicalRecords",
    "DenseSparseTextEmbedder",
    "ImageEmbedder",
    "ImagingArchive",
    "LiteratureIndex",
    "Reranker",
    "SparseTextEmbedder",
    "TextEmbedder",
]


@runtime_checkable
class ClinicalRecords(Protocol):
    """A patient's clinical record (FHIR server, CDS Hooks prefetch, or a folder of bundles).

    Implementations raise :class:`core.errors.SourceUnavailable` when the source cannot answer.
    """

    async def laboratory_results(self, patient_id: str) -> Sequence[LabResult]:
        """All laboratory results of the patient that carry a numeric value."""
        ...


@runtime_checkable
class ImagingArchive(Protocol):
    """A patient's chest radiographs (a PACS over DICOMweb, or a folder of DICOM files).

    Implementations raise :class:`core.errors.SourceUnavailable` when the archive cannot answer;
    a study that exists but cannot be used is reported in ``ImagingResult.skipped``.
    """

    async def chest_images(
        self,
        patient_id: str,
        *,
        limit: int = 4,
        study_uid: str | None = None,
        accession_number: str | None = None,
    ) -> ImagingResult:
        """Decoded chest images of the patient, most recent first, at most ``limit``; only
        those of study ``study_uid`` and of the study with AccessionNumber
        ``accession_number`` when they are given (both must belong to the patient)."""
        ...


@runtime_checkable
class ImageEmbedder(Protocol):
    """The image tower of an image/text model; its text tower shares the embedding space."""

    card: ModelCard
    dimension: int

    async def embed_images(self, images: Sequence[Vector]) -> Vector:
        """L2-normalised embeddings, shape ``(len(images), dimension)``, of ``(H, W)`` images."""
        ...

    async def embed_findings(self, texts: Sequence[str]) -> Vector:
        """L2-normalised embeddings of findings texts in the image embedding space."""
        ...


@runtime_checkable
class TextEmbedder(Protocol):
    """A text embedding model for literature search."""

    card: ModelCard
    dimension: int

    async def embed_texts(self, texts: Sequence[str]) -> Vector:
        """L2-normalised embeddings, shape ``(len(texts), dimension)``."""
        ...


@runtime_checkable
class SparseTextEmbedder(Protocol):
    """A learned sparse text model (BGE-M3's lexical weights) for the lexical leg of literature
    search: it matches passages by the words they share with the query, which a dense vector
    can blur (drug names, rare findings, abbreviations)."""

    card: ModelCard

    async def embed_sparse(self, texts: Sequence[str]) -> list[SparseWeights]:
        """One :data:`core.types.SparseWeights` per text, in order; empty for a text the model
        keeps no token of."""
        ...


@runtime_checkable
class DenseSparseTextEmbedder(TextEmbedder, SparseTextEmbedder, Protocol):
    """A model that gives a text's dense vector and its sparse weights from one run (BGE-M3).

    Callers that need both for the same texts use :meth:`encode`, so the model runs once.
    """

    async def encode(self, texts: Sequence[str]) -> tuple[Vector, list[SparseWeights]]:
        """``(embed_texts(texts), embed_sparse(texts))`` from one run of the model."""
        ...


@runtime_checkable
class Reranker(Protocol):
    """A cross-encoder that reads a query and a passage together and scores their relevance,
    to reorder the few passages the index searches found."""

    card: ModelCard

    async def score(self, query: str, passages: Sequence[str]) -> npt.NDArray[np.float32]:
        """One relevance score per passage, shape ``(len(passages),)``; higher is more
        relevant."""
        ...


@runtime_checkable
class CaseIndex(Protocol):
    """Indexed past cases, searchable by fused image+findings vector, by recorded findings and by
    lab profile."""

    async def upsert_cases(self, cases: Sequence[IndexedCase]) -> None:
        """Insert or replace cases by ``case_id``; running it twice changes nothing."""
        ...

    async def case_ids(self) -> frozenset[str]:
        """The ids of all indexed cases (to resume an interrupted ingestion)."""
        ...

    async def nearest_by_image(
        self, query: Vector, *, k: int, exclude_patient: str
    ) -> Sequence[tuple[CaseRecord, float]]:
        """Cases whose fused vector is closest to an image embedding, with cosine similarity."""
        ...

    async def nearest_by_findings(
        self, query: Vector, *, k: int, exclude_patient: str
    ) -> Sequence[tuple[CaseRecord, float]]:
        """Cases whose recorded findings' embedding is closest to a text embedded by the image
        model's text tower (:meth:`ImageEmbedder.embed_findings`), with cosine similarity."""
        ...

    async def nearest_by_labs(
        self, query: Vector, *, k: int, exclude_patient: str, min_measured: int
    ) -> Sequence[tuple[CaseRecord, float]]:
        """Cases whose lab profile is closest (Euclidean distance) among those with at least
        ``min_measured`` measured tests."""
        ...


@runtime_checkable
class LiteratureIndex(Protocol):
    """Indexed literature passages, searchable by a dense vector and by sparse weights."""

    async def upsert_passages(
        self,
        passages: Sequence[Passage],
        vectors: Vector,
        sparse: Sequence[SparseWeights] | None = None,
    ) -> None:
        """Insert or replace passages by ``passage_id`` with their dense vectors and, when
        ``sparse`` is given (one per passage; an empty dict is a passage with no terms), their
        sparse weights."""
        ...

    async def passage_ids(self) -> frozenset[str]:
        """The ids of all indexed passages (to resume an interrupted ingestion)."""
        ...

    async def nearest_passages(self, query: Vector, *, k: int) -> Sequence[tuple[Passage, float]]:
        """Passages closest to a dense query vector, with cosine similarity, most similar
        first."""
        ...

    async def nearest_passages_sparse(
        self, query: SparseWeights, *, k: int
    ) -> Sequence[tuple[Passage, float]]:
        """Passages with the highest inner product of sparse weights with ``query`` (over the
        token ids they share), highest first; passages sharing no token are not returned."""
        ...
