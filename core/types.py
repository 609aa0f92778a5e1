"""Domain values: what the service reasons about, independent of where it came from.

Everything here is immutable and free of I/O. Adapters translate FHIR, DICOM and database rows
into these types; the CDS Hooks layer translates them into cards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "Brief",
    "CaseHit",
    "CaseRecord",
    "ChestImage",
    "ImagingOrder",
    "ImagingOrders",
    "ImagingResult",
    "IndexedCase",
    "LabProfile",
    "LabResult",
    "LegMatch",
    "ModelCard",
    "OrderModality",
    "Passage",
    "PassageHit",
    "SkippedImage",
    "SparseWeights",
    "Vector",
]

Vector = npt.NDArray[np.float32]
"""A float32 array: one embedding of shape ``(D,)`` or a batch of shape ``(N, D)``."""

SparseWeights = dict[int, float]
"""A learned sparse representation of a text: vocabulary token id -> positive weight.

Only the tokens the model kept appear; an empty dict is a text with no terms. Two texts are
compared by the inner product of their weights over the token ids they share.
"""


@dataclass(frozen=True, slots=True)
class LabResult:
    """One laboratory result as the source recorded it.

    Args:
        loinc: LOINC code of the test.
        display: human-readable name of the test.
        value: numeric result.
        unit: UCUM unit code of ``value``.
        effective: when the specimen was taken, if known.
        source: a reference to the record this came from (``Observation/<id>``), for attribution.
        reference_low: lower bound of the reference range the source gave, if any.
        reference_high: upper bound of the reference range the source gave, if any.
        interpretation: the source's interpretation code (HL7 v3 ObservationInterpretation: ``L``,
            ``H``, ``N``, ...), if any.
    """

    loinc: str
    display: str
    value: float
    unit: str
    effective: datetime | None
    source: str
    reference_low: float | None = None
    reference_high: float | None = None
    interpretation: str | None = None


@dataclass(frozen=True, slots=True)
class LabProfile:
    """A patient's labs as a fixed-length vector for similarity search.

    Args:
        vector: one value per test of the panel, scaled so that the reference range maps to
            ``[-1, 1]``; an unmeasured test is ``0``.
        measured: for each test of the panel, whether the patient has a result for it.
        abnormal: ``(display, "low" | "high")`` for each measured test outside its range.
    """

    vector: Vector
    measured: tuple[bool, ...]
    abnormal: tuple[tuple[str, str], ...] = ()

    @property
    def measured_count(self) -> int:
        """How many tests of the panel have a result."""
        return sum(self.measured)


@dataclass(frozen=True, slots=True)
class ChestImage:
    """A decoded chest radiograph ready for an image model.

    Args:
        study_uid: DICOM StudyInstanceUID.
        series_uid: DICOM SeriesInstanceUID.
        sop_instance_uid: DICOM SOPInstanceUID.
        pixels: float32 array of shape ``(H, W)`` in ``[0, 1]``, where 0 is black as displayed
            (MONOCHROME1 sources are already inverted).
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    pixels: Vector


@dataclass(frozen=True, slots=True)
class SkippedImage:
    """An image or study that was not used, and why (shown to the clinician)."""

    study_uid: str
    reason: str


@dataclass(frozen=True, slots=True)
class ImagingResult:
    """What the imaging archive returned for a patient: usable chest images and what was skipped."""

    images: tuple[ChestImage, ...] = ()
    skipped: tuple[SkippedImage, ...] = ()


OrderModality = Literal["XR", "CT"]
"""The chest imaging an order asks for: a radiograph (``XR``) or a computed tomography (``CT``)."""


@dataclass(frozen=True, slots=True)
class ImagingOrder:
    """A draft chest imaging order, as far as a brief needs it.

    Args:
        order_ref: the order (``ServiceRequest/<id>``), or ``None`` when it has no id.
        modality: what it asks for.
        reason: why, in the words the order gives (its reason codes' text, or the conditions it
            names), or ``None`` when it gives none.
    """

    order_ref: str | None
    modality: OrderModality
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ImagingOrders:
    """The chest imaging orders found among a call's draft orders, and what could not be read.

    Args:
        orders: the chest imaging orders, in the order the call listed them.
        skipped: for each draft order that could not be read, why (safe to show and log: it
            names entries and element paths, never values).
    """

    orders: tuple[ImagingOrder, ...] = ()
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CaseRecord:
    """A past case in the index, as it is shown and attributed.

    Args:
        case_id: stable identifier of the case in the index.
        patient_ref: the case's patient (``Patient/<id>``); a query never matches its own patient.
        study_uid: the DICOM study the case's image came from.
        findings: the case's own recorded findings (never the query's).
        provenance: where the case came from, in words (shown on the card).
    """

    case_id: str
    patient_ref: str
    study_uid: str
    findings: tuple[str, ...]
    provenance: str


@dataclass(frozen=True, slots=True)
class IndexedCase:
    """A case with the vectors it is searched by.

    Args:
        record: the case as shown.
        findings_text: the recorded findings as the text that was embedded.
        image: embedding of the case's image.
        findings: embedding of ``findings_text`` in the image model's space.
        fused: ``normalize(w_image * image + w_findings * findings)``.
        labs: the case's lab profile, or ``None`` when it has none.
    """

    record: CaseRecord
    findings_text: str
    image: Vector
    findings: Vector
    fused: Vector
    labs: LabProfile | None


@dataclass(frozen=True, slots=True)
class LegMatch:
    """How one search leg ranked a case or a passage.

    Args:
        leg: the leg's name (cases: ``"image"``, ``"labs"``, ``"reason"``; passages:
            ``"dense"``, ``"sparse"``, ``"rerank"``).
        rank: 1-based rank of the case or passage in that leg.
        score: the leg's own measure: a cosine similarity, a distance, an inner product of
            sparse weights or a reranker's relevance.
        metric: ``"cos"`` (higher is closer), ``"dist"`` (lower is closer), ``"ip"`` (inner
            product of sparse weights, higher is closer) or ``"relevance"`` (a cross-encoder's
            score, higher is more relevant).
    """

    leg: str
    rank: int
    score: float
    metric: Literal["cos", "dist", "ip", "relevance"]


@dataclass(frozen=True, slots=True)
class CaseHit:
    """A similar case found for a query, with how each search leg ranked it.

    Args:
        case: the matched case.
        score: the fused reciprocal-rank score.
        legs: the legs that returned the case, in the order the legs were run.
    """

    case: CaseRecord
    score: float
    legs: tuple[LegMatch, ...] = ()

    def leg(self, name: str) -> LegMatch | None:
        """The match in leg ``name``, or ``None`` when that leg did not return the case."""
        return next((m for m in self.legs if m.leg == name), None)


@dataclass(frozen=True, slots=True)
class Passage:
    """A literature passage with the identifiers needed to cite it.

    Args:
        passage_id: stable identifier in the index (``<pmid>:<section index>``).
        pmid: PubMed identifier of the source article.
        text: the passage text.
        section: the section label the source gave (``METHODS``, ``RESULTS``, ...), if any.
        year: publication year, if known.
        title: the article title, if the corpus has it.
        doi: the article's DOI (``10.1056/...``, without a resolver prefix), if the corpus has it.
    """

    passage_id: str
    pmid: str
    text: str
    section: str | None = None
    year: str | None = None
    title: str | None = None
    doi: str | None = None


@dataclass(frozen=True, slots=True)
class PassageHit:
    """A retrieved passage, its score in the final ranking, and how each search leg ranked it.

    Args:
        passage: the passage, with the identifiers needed to cite it.
        score: its score in the final ranking (see :func:`core.retrieval.search_literature`).
        legs: the legs that returned it (``"dense"``, ``"sparse"``) and, when it was reranked,
            ``"rerank"``, in that order.
    """

    passage: Passage
    score: float
    legs: tuple[LegMatch, ...] = ()

    def leg(self, name: str) -> LegMatch | None:
        """The match in leg ``name``, or ``None`` when that leg did not return the passage."""
        return next((m for m in self.legs if m.leg == name), None)


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What the clinician is told about a model that produced a result.

    Args:
        name: short name (``all-MiniLM-L6-v2``).
        description: one line, which says plainly if the model is a tiny random placeholder.
    """

    name: str
    description: str


@dataclass(frozen=True, slots=True)
class Brief:
    """Everything retrieved for one patient, before it becomes cards.

    Args:
        patient_ref: the patient in context (``Patient/<id>``).
        cases: similar past cases, best first.
        passages: literature passages, best first.
        literature_query: the text the literature was searched with.
        literature_basis: where that text came from, in words for the clinician.
        omissions: what could not be used and why (``"imaging unavailable: ..."``).
        models: the models behind the results.
    """

    patient_ref: str
    cases: tuple[CaseHit, ...] = ()
    passages: tuple[PassageHit, ...] = ()
    literature_query: str | None = None
    literature_basis: str | None = None
    omissions: tuple[str, ...] = ()
    models: tuple[ModelCard, ...] = field(default_factory=tuple)
