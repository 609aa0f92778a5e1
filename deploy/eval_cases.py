"""``medirag eval cases``: how well each similar-case leg finds cases that share a finding.

Why it exists: the similar-case card claims that the cases it shows resemble the patient's. This
evaluation measures that claim on the NIH ChestX-ray14 images, with the two rules that keep it
honest (see the shared data README):

* patient-disjoint: NIH patients recur across images, and another image of the query's own
  patient is not a "similar case" but the same person; every leg excludes the query's patient,
  and the rankings are checked for it afterwards;
* never circular: a query is searched by its image (or its labs) alone; its labels only decide,
  afterwards, which neighbours count as relevant. :func:`queries_for` is the one place that turns
  a labelled case into a query, and it drops the labels.

Every image is indexed as a case (its NIH patient as the patient, its own labels as the recorded
findings) in a scratch database that is never the service's index: the embedded PostgreSQL in
``<MEDIRAG_DATA_DIR>/eval/pg``, or the database ``medirag_eval_cases`` on ``MEDIRAG_DSN``'s
server. Ingestion goes through :func:`core.ingestion.ingest_cases`, skips cases already there,
and so a second run embeds nothing.

Legs, each giving the top :data:`K` other-patient cases:

* ``image-only``: cosine similarity of image embeddings, computed exactly over the stored image
  vectors (what an index built with fusion weights (1, 0) would return, without its HNSW
  approximation);
* ``fused``: the store's own search (:meth:`PgVectorStore.nearest_by_image`) over the cases
  indexed with the configured late fusion weights, searched by the query's image;
* ``labs``: with a folder of Synthea bundles, each NIH patient is paired (synthetically,
  deterministically) with a Synthea patient whose labs stand in for theirs, and the store's lab
  search runs on that profile. The labs are independent of the images by construction, so this
  leg measures chance.

Relevance: a neighbour is relevant when it shares at least one NIH label with the query
(``No Finding`` counts as a label). Each leg's precision is reported beside the prevalence of
relevant cases among the query's retrievable cases, which is what a random ranking scores, and
beside two baselines that ignore the query's image: a random ranking (every metric, computed
exactly) and a constant one returning cases of the most common label, which is what a leg that
merely favours that label scores.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection
from rich.console import Console
from rich.progress import Progress

from adapters.fhir.bundle_folder import BundleFolderRecords
from adapters.models.clip import OnnxClipEmbedder
from adapters.store.pgvector_store import PgVectorStore
from adapters.store.schema import IndexModelMismatch
from core.fusion import late_fuse, normalize
from core.ingestion import CaseSource, FusionWeights, IngestReport, ingest_cases
from core.labs import lab_profile
from core.metrics import average_precision_at_k, precision_at_k
from core.ports import CaseIndex
from core.types import (
    CaseRecord,
    ChestImage,
    ImagingResult,
    IndexedCase,
    LabProfile,
    LabResult,
    SkippedImage,
    Vector,
)
from deploy.eval_database import scratch_database
from deploy.eval_report import EvalReport, ModelInfo, ReportFiles, write_report
from deploy.settings import Settings
from deploy.wiring import session_settings
from fixtures.cxr_dicom import fixture_uid, grey_pixels
from fixtures.nih_labels import NihLabel, read_nih_labels
from fixtures.synthetic_cases import findings_text

__all__ = [
    "LEGS",
    "METRICS",
    "SCRATCH_DATABASE",
    "TOP_FINDINGS",
    "CaseEvalError",
    "CaseEvaluation",
    "EvalCase",
    "K",
    "LabPairing",
    "Query",
    "StoredCase",
    "check_patient_disjoint",
    "constant_rankings",
    "evaluate_cases",
    "exact_rankings",
    "finding_breakdown",
    "judgments",
    "leg_metrics",
    "open_scratch_store",
    "pair_labs",
    "prevalence",
    "queries_for",
    "random_baseline",
    "rank_legs",
    "read_eval_cases",
    "shares_finding",
]

K = 10
"""How many neighbours each leg returns per query."""

LEGS = ("image-only", "fused", "labs")
"""The legs, in report order."""

METRICS = ("P@1", "P@5", "P@10", "mAP@10", "prevalence")
"""The report's columns: precision and mean average precision at ``K`` (AP@K divided by
``min(K, relevant)``), and the baseline."""

SCRATCH_DATABASE = "medirag_eval_cases"
"""The database the evaluation indexes into (never the service's)."""

TOP_FINDINGS = 5
"""How many of the most common labels the per-finding table shows."""

_PAIRING_SALT = "medirag-cds eval-cases nih-synthea lab pairing v1"

# The scratch index holds no literature; the store still records a text model for its passages.
_NO_TEXT_MODEL = "none (case evaluation)"


class CaseEvalError(Exception):
    """The evaluation's inputs are unusable; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class EvalCase:
    """One NIH image: an indexed case, and (by its image alone) a query.

    Args:
        case_id: ``nih-<image stem>``.
        image_path: the PNG.
        patient_ref: ``Patient/nih-<NIH patient id>``; the query's own patient is excluded.
        findings: the image's own NIH labels (``("No Finding",)`` for a normal image).

    Example:
        >>> case = EvalCase("nih-00000001_000", Path("00000001_000.png"), "Patient/nih-1",
        ...                 ("Cardiomegaly",))
        >>> case.source.findings_text
        'Chest radiograph: cardiomegaly.'
    """

    case_id: str
    image_path: Path
    patient_ref: str
    findings: tuple[str, ...]

    @property
    def study_uid(self) -> str:
        """A UID standing for the image's study (the PNGs have none)."""
        return str(fixture_uid("nih-eval-study", self.image_path.name))

    @property
    def source(self) -> CaseSource:
        """The case as :func:`core.ingestion.ingest_cases` indexes it."""
        record = CaseRecord(
            case_id=self.case_id,
            patient_ref=self.patient_ref,
            study_uid=self.study_uid,
            findings=self.findings,
            provenance=f"NIH ChestX-ray14 image {self.image_path.name} (evaluation)",
        )
        return CaseSource(record=record, findings_text=findings_text(self.findings))


@dataclass(frozen=True, slots=True)
class Query:
    """What a leg may search with: the case's identity, its image embedding and its labs.

    It has no findings field: a query's labels are never used to find its neighbours.

    Args:
        case_id: the query case (excluded from its own results with its patient).
        patient_ref: the query's patient, whose cases are all excluded.
        image: the query image's embedding.
        labs: the query patient's lab profile, or ``None``.
    """

    case_id: str
    patient_ref: str
    image: Vector
    labs: LabProfile | None = None


@dataclass(frozen=True, slots=True)
class StoredCase:
    """A case's vectors as the scratch index holds them.

    Args:
        case_id: the case.
        patient_ref: its patient.
        image: its image embedding.
        fused: its fused image+findings vector.
        labs_measured: how many panel tests its lab profile has (0 without labs).
    """

    case_id: str
    patient_ref: str
    image: Vector
    fused: Vector
    labs_measured: int = 0


@dataclass(frozen=True, slots=True)
class LabPairing:
    """Which Synthea patient's labs stand in for each NIH patient's (a synthetic pairing).

    Args:
        synthea_for: ``{NIH patient_ref: Synthea Patient.id}``.
        results: ``{Synthea Patient.id: laboratory results}``.
        folder: the Synthea folder the labs came from.
    """

    synthea_for: Mapping[str, str]
    results: Mapping[str, tuple[LabResult, ...]]
    folder: Path

    def profile(self, patient_ref: str) -> LabProfile | None:
        """The lab profile standing in for the NIH patient's, or ``None`` if unpaired."""
        synthea_id = self.synthea_for.get(patient_ref)
        return None if synthea_id is None else lab_profile(self.results[synthea_id])

    async def laboratory_results(self, patient_id: str) -> tuple[LabResult, ...]:
        """:class:`core.ports.ClinicalRecords` for ingestion: the paired patient's results."""
        synthea_id = self.synthea_for.get(f"Patient/{patient_id}")
        return () if synthea_id is None else self.results[synthea_id]


class _NoLabs:
    """:class:`core.ports.ClinicalRecords` with no results: NIH patients have no labs."""

    async def laboratory_results(self, patient_id: str) -> tuple[LabResult, ...]:
        return ()


class _PngImages:
    """:class:`core.ports.ImagingArchive` over the evaluation's PNGs, one image per study."""

    def __init__(self, cases: Sequence[EvalCase]) -> None:
        self._by_study = {case.study_uid: case for case in cases}

    async def chest_images(
        self,
        patient_id: str,
        *,
        limit: int = 4,
        study_uid: str | None = None,
        accession_number: str | None = None,
    ) -> ImagingResult:
        case = self._by_study.get(study_uid or "")
        if case is None or case.patient_ref != f"Patient/{patient_id}":
            return ImagingResult(skipped=(SkippedImage(study_uid or "", "no such study"),))
        try:
            grey = await asyncio.to_thread(grey_pixels, case.image_path)
        except (OSError, ValueError) as error:
            return ImagingResult(skipped=(SkippedImage(case.study_uid, str(error)),))
        pixels = np.asarray(grey, dtype=np.float32) / 255.0
        return ImagingResult(images=(ChestImage(case.study_uid, "", "", pixels),))


def _nih_rows(labels: Path) -> tuple[NihLabel, ...]:
    try:
        return read_nih_labels(labels)
    except FileNotFoundError:
        raise CaseEvalError(f"no labels file at {labels}") from None
    except KeyError as error:
        raise CaseEvalError(
            f"{labels} is not a ChestX-ray14 labels.csv: no column {error}"
        ) from None
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise CaseEvalError(
            f"{labels} cannot be read as a ChestX-ray14 labels.csv: {error}"
        ) from None


def read_eval_cases(
    images: Path, labels: Path, *, limit: int | None = None
) -> tuple[EvalCase, ...]:
    """The evaluation's cases: the first ``limit`` rows of ``labels`` (all by default).

    Args:
        images: the folder of the PNGs ``labels`` names.
        labels: a ChestX-ray14 ``labels.csv``.
        limit: how many rows to take, in file order.

    Returns:
        One case per row, in file order.

    Raises:
        CaseEvalError: the folder or the file is missing or unreadable, an image it names is
            missing, ``limit`` is below 1, or the cases come from fewer than 2 NIH patients
            (nothing would be retrievable patient-disjointly).

    Example:
        >>> cases = read_eval_cases(nih / "images", nih / "labels.csv", limit=60)  # doctest: +SKIP
    """
    if limit is not None and limit < 1:
        raise CaseEvalError(f"--limit must be at least 1, got {limit}")
    if not images.is_dir():
        raise CaseEvalError(f"not a folder of images: {images}")
    rows = _nih_rows(labels)[:limit]
    if not rows:
        raise CaseEvalError(f"{labels} lists no images")
    cases = tuple(
        EvalCase(
            case_id=f"nih-{row.stem}",
            image_path=images / row.image_index,
            patient_ref=f"Patient/nih-{row.patient_id}",
            findings=row.findings,
        )
        for row in rows
    )
    if len({case.case_id for case in cases}) != len(cases):
        raise CaseEvalError(f"{labels} lists an image twice")
    missing = [case.image_path.name for case in cases if not case.image_path.is_file()]
    if missing:
        raise CaseEvalError(
            f"{len(missing)} image(s) listed in {labels} are not in {images} "
            f"(first: {', '.join(missing[:3])})"
        )
    if len({case.patient_ref for case in cases}) < 2:
        raise CaseEvalError(
            f"the {len(cases)} image(s) come from fewer than 2 NIH patients: a patient-disjoint "
            "search has nothing to find (raise --limit)"
        )
    return cases


async def pair_labs(cases: Sequence[EvalCase], bundles: Path, *, min_labs: int) -> LabPairing:
    """Pair each NIH patient with a Synthea patient whose labs will stand in for theirs.

    SYNTHETIC: no public dataset has one patient's labs and chest radiograph. The Synthea
    patient is chosen by a salted hash of the NIH patient id among the Synthea patients with at
    least ``min_labs`` of the panel's tests (so the lab search compares every case), so a patient
    keeps its pairing whatever subset of images is evaluated. Several NIH patients share each
    Synthea patient, and their lab profiles are then identical.

    Args:
        cases: the evaluation's cases.
        bundles: a folder of single-patient Synthea FHIR bundles.
        min_labs: the fewest measured panel tests the lab search compares.

    Returns:
        The pairing.

    Raises:
        CaseEvalError: ``bundles`` is not a folder, or no patient in it has ``min_labs`` tests.
        SourceUnavailable: a bundle cannot be read.
    """
    try:
        records = BundleFolderRecords(bundles)
    except NotADirectoryError as error:
        raise CaseEvalError(str(error)) from None
    results: dict[str, tuple[LabResult, ...]] = {}
    for patient_id in records.patient_ids():
        found = tuple(await records.laboratory_results(patient_id))
        if lab_profile(found).measured_count >= min_labs:
            results[patient_id] = found
    if not results:
        raise CaseEvalError(
            f"no patient in {bundles} has {min_labs} of the lab panel's tests measured"
        )
    eligible = sorted(results)
    synthea_for = {
        ref: eligible[
            int(hashlib.sha256(f"{_PAIRING_SALT}:{ref}".encode()).hexdigest(), 16) % len(eligible)
        ]
        for ref in sorted({case.patient_ref for case in cases})
    }
    return LabPairing(synthea_for=synthea_for, results=results, folder=bundles)


def queries_for(
    cases: Sequence[EvalCase], stored: Mapping[str, StoredCase], pairing: LabPairing | None
) -> list[Query]:
    """The queries of the indexed cases: identity, image embedding and labs, never labels.

    Args:
        cases: the cases (their ``findings`` are not read).
        stored: the indexed cases' vectors; a case not indexed (its image was unusable) is not
            a query.
        pairing: the synthetic lab pairing, if any.
    """
    return [
        Query(
            case_id=case.case_id,
            patient_ref=case.patient_ref,
            image=stored[case.case_id].image,
            labs=None if pairing is None else pairing.profile(case.patient_ref),
        )
        for case in cases
        if case.case_id in stored
    ]


def exact_rankings(
    queries: Sequence[Query], candidates: Sequence[StoredCase], *, vector: str, k: int
) -> dict[str, tuple[str, ...]]:
    """For each query, the ``k`` candidates of other patients most cosine-similar to its image.

    Exact (a full matrix product); ties keep the candidates' order.

    Args:
        queries: the queries.
        candidates: the indexed cases.
        vector: which stored vector the query image is compared with: ``"image"`` or
            ``"fused"``.
        k: how many neighbours per query.

    Returns:
        ``{query case_id: neighbour case_ids, most similar first}``.

    Example:
        >>> v = lambda *x: np.array(x, dtype=np.float32)
        >>> stored = [StoredCase("a", "Patient/1", v(1, 0), v(1, 0)),
        ...           StoredCase("b", "Patient/2", v(0, 1), v(0, 1)),
        ...           StoredCase("c", "Patient/3", v(1, 1), v(1, 1))]
        >>> exact_rankings([Query("a", "Patient/1", v(1, 0))], stored, vector="image", k=2)
        {'a': ('c', 'b')}
    """
    if not queries or not candidates:
        return {query.case_id: () for query in queries}
    matrix = normalize(np.stack([getattr(c, vector) for c in candidates]))
    patients = np.array([c.patient_ref for c in candidates])
    similarities = normalize(np.stack([q.image for q in queries])) @ matrix.T
    rankings: dict[str, tuple[str, ...]] = {}
    for row, query in zip(similarities, queries, strict=True):
        allowed = np.flatnonzero(patients != query.patient_ref)
        order = allowed[np.argsort(-row[allowed], kind="stable")[:k]]
        rankings[query.case_id] = tuple(candidates[i].case_id for i in order)
    return rankings


async def rank_legs(
    queries: Sequence[Query],
    stored: Sequence[StoredCase],
    *,
    index: CaseIndex,
    k: int,
    min_labs: int,
    with_labs: bool,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, tuple[str, ...]]]:
    """Every leg's ranking of every query: ``{leg: {query case_id: neighbour case_ids}}``.

    Args:
        queries: the queries (:func:`queries_for`).
        stored: the indexed cases (for the exact image-only leg).
        index: the scratch case index (fused and labs legs).
        k: how many neighbours per query.
        min_labs: the fewest measured tests the lab search compares.
        with_labs: whether to run the labs leg (queries without labs get no neighbours).
        on_progress: called with 1 after each query's store searches.
    """
    rankings: dict[str, dict[str, tuple[str, ...]]] = {
        "image-only": exact_rankings(queries, stored, vector="image", k=k),
        "fused": {},
    }
    if with_labs:
        rankings["labs"] = {}
    for query in queries:
        hits = await index.nearest_by_image(query.image, k=k, exclude_patient=query.patient_ref)
        rankings["fused"][query.case_id] = tuple(record.case_id for record, _ in hits)
        if with_labs:
            found = (
                await index.nearest_by_labs(
                    query.labs.vector,
                    k=k,
                    exclude_patient=query.patient_ref,
                    min_measured=min_labs,
                )
                if query.labs is not None and query.labs.measured_count >= min_labs
                else []
            )
            rankings["labs"][query.case_id] = tuple(record.case_id for record, _ in found)
        if on_progress is not None:
            on_progress(1)
    return rankings


def check_patient_disjoint(
    rankings: Mapping[str, Mapping[str, Sequence[str]]], patient_of: Mapping[str, str]
) -> int:
    """Refuse rankings in which a query's neighbour belongs to the query's own patient.

    Args:
        rankings: ``{leg: {query case_id: neighbour case_ids}}``.
        patient_of: ``{case_id: patient_ref}`` of every case.

    Returns:
        How many neighbours were checked.

    Raises:
        RuntimeError: a neighbour shares its query's patient (an index broke the exclusion).

    Example:
        >>> check_patient_disjoint({"x": {"a": ["b"]}}, {"a": "Patient/1", "b": "Patient/1"})
        Traceback (most recent call last):
        ...
        RuntimeError: leg x returned case b of query a's own patient
    """
    checked = 0
    for leg, by_query in rankings.items():
        for query, neighbours in by_query.items():
            for neighbour in neighbours:
                if patient_of[neighbour] == patient_of[query]:
                    raise RuntimeError(
                        f"leg {leg} returned case {neighbour} of query {query}'s own patient"
                    )
                checked += 1
    return checked


def shares_finding(query: Collection[str], neighbour: Collection[str]) -> bool:
    """Whether a neighbour is relevant: it shares at least one label with the query.

    Examples:
        >>> shares_finding(("Effusion", "Mass"), ("Mass",))
        True
        >>> shares_finding(("No Finding",), ("No Finding",))
        True
        >>> shares_finding(("No Finding",), ("Effusion",))
        False
    """
    return not set(query).isdisjoint(neighbour)


def judgments(query: EvalCase, candidates: Sequence[EvalCase]) -> dict[str, int]:
    """The query's relevant cases among those a patient-disjoint search can return.

    Args:
        query: the query case (its labels are read here, and only here).
        candidates: the cases the leg can return.

    Returns:
        ``{case_id: 1}`` for each candidate of another patient sharing a label with the query.

    Example:
        >>> c = lambda i, p, *f: EvalCase(i, Path(i), p, f)
        >>> judgments(c("a", "P1", "Mass"), [c("a", "P1", "Mass"), c("b", "P1", "Mass"),
        ...                                  c("x", "P2", "Mass", "Edema"), c("y", "P3", "Edema")])
        {'x': 1}
    """
    labels = set(query.findings)
    return {
        case.case_id: 1
        for case in candidates
        if case.patient_ref != query.patient_ref and not labels.isdisjoint(case.findings)
    }


def _retrievable(query: EvalCase, candidates: Sequence[EvalCase]) -> int:
    return sum(case.patient_ref != query.patient_ref for case in candidates)


def prevalence(queries: Sequence[EvalCase], candidates: Sequence[EvalCase]) -> float:
    """The expected precision of a random ranking: for each query, the share of the other
    patients' candidates relevant to it, averaged over the queries.

    A query with no candidate of another patient is left out; ``nan`` when none is left.

    Args:
        queries: the query cases.
        candidates: the cases the leg can return.

    Example:
        >>> c = lambda i, p, *f: EvalCase(i, Path(i), p, f)
        >>> cases = [c("a", "P1", "No Finding"), c("b", "P1", "No Finding"),
        ...          c("x", "P2", "No Finding"), c("y", "P3", "Effusion")]
        >>> round(prevalence(cases, cases), 4)  # a, b: 1/2 each; x: 2/3; y: 0/3
        0.4167
    """
    shares = [
        len(judgments(query, candidates)) / total
        for query in queries
        if (total := _retrievable(query, candidates))
    ]
    return sum(shares) / len(shares) if shares else math.nan


def random_baseline(
    queries: Sequence[EvalCase], candidates: Sequence[EvalCase]
) -> dict[str, float]:
    """The metrics a uniformly random ranking of each query's retrievable cases scores, in
    expectation (exactly, not by sampling).

    With ``N`` retrievable cases of which ``R`` are relevant, rank ``i`` holds a relevant case
    with probability ``R / N``, and given that, each of the ``i - 1`` ranks above it does with
    probability ``(R - 1) / (N - 1)``. So ``E[P@c] = min(c, N) * R / (N * c)``, and since
    AP@10's denominator ``min(10, R)`` does not depend on the order, ``E[AP@10] =
    R / (N * min(10, R)) * sum over i <= min(10, N) of (1 + (i - 1)(R - 1) / (N - 1)) / i``
    (0 when ``R = 0``).

    Args:
        queries: the query cases; one with no retrievable case is left out.
        candidates: the cases a leg can return.

    Returns:
        ``{metric: value}`` for :data:`METRICS`; ``prevalence`` is the mean ``R / N``.

    Example:
        >>> c = lambda i, p, *f: EvalCase(i, Path(i), p, f)
        >>> cases = [c("a", "P1", "Mass"), c("b", "P2", "Mass"), c("d", "P3", "Edema")]
        >>> random_baseline(cases[:1], cases)  # a: N = 2, R = 1
        {'P@1': 0.5, 'P@5': 0.2, 'P@10': 0.1, 'mAP@10': 0.75, 'prevalence': 0.5}
        >>> many = [c(f"x{i}", f"P{i}", "Mass") for i in range(4, 16)]  # N = R = 12
        >>> random_baseline(cases[:1], [cases[0], *many])["mAP@10"]  # every order is perfect
        1.0
    """
    sums = dict.fromkeys(METRICS, 0.0)
    counted = 0
    for query in queries:
        n = _retrievable(query, candidates)
        if not n:
            continue
        r = len(judgments(query, candidates))
        counted += 1
        for cut in (1, 5, 10):
            sums[f"P@{cut}"] += min(cut, n) * r / (n * cut)
        if r:
            later = (r - 1) / (n - 1) if n > 1 else 0.0
            expected_sum = sum((1 + (i - 1) * later) / i for i in range(1, min(K, n) + 1))
            sums["mAP@10"] += r * expected_sum / (n * min(K, r))
        sums["prevalence"] += r / n
    return {metric: total / counted if counted else math.nan for metric, total in sums.items()}


def constant_rankings(
    queries: Sequence[Query], candidates: Sequence[EvalCase], label: str, *, k: int = K
) -> dict[str, tuple[str, ...]]:
    """A ranking that ignores the query: the first ``k`` other-patient cases labelled ``label``.

    With ``label`` the most common finding, it is the baseline any leg biased toward that
    class scores: P@k and mAP@k near the share of queries having the label (a query with the
    label gets only relevant cases, AP@k 1), well above the prevalence.
    It reads the indexed cases' labels, never the query's.

    Args:
        queries: the queries.
        candidates: the indexed cases, in a fixed order.
        label: the label every returned case has.
        k: how many cases per query.

    Example:
        >>> c = lambda i, p, *f: EvalCase(i, Path(i), p, f)
        >>> cases = [c("a", "P1", "No Finding"), c("b", "P2", "No Finding"), c("d", "P3", "Mass")]
        >>> q = Query("a", "P1", np.ones(2, np.float32))
        >>> constant_rankings([q], cases, "No Finding")
        {'a': ('b',)}
    """
    return {
        query.case_id: tuple(
            case.case_id
            for case in candidates
            if case.patient_ref != query.patient_ref and label in case.findings
        )[:k]
        for query in queries
    }


def leg_metrics(
    rankings: Mapping[str, Sequence[str]],
    cases: Mapping[str, EvalCase],
    candidates: Sequence[EvalCase],
) -> dict[str, float]:
    """P@1, P@5, P@10, mAP@10 of one leg, and the prevalence baseline beside them.

    Every query with at least one retrievable case of another patient counts (with precision 0
    where the leg returned nothing); AP@10 judges against the query's relevant cases among
    ``candidates`` (:func:`judgments`), the cases the leg can return, and divides by
    ``min(10, R)`` with ``R`` their number (``denominator="capped"`` of
    :func:`core.metrics.average_precision_at_k`): queries here have hundreds of relevant cases,
    and trec_eval's division by ``R`` would hold AP@10 below ``10 / R``.

    Args:
        rankings: ``{query case_id: neighbour case_ids}``.
        cases: every case by id (for the labels that judge relevance).
        candidates: the cases the leg can return.

    Returns:
        ``{metric: value}`` for :data:`METRICS` (``nan`` when no query counts).

    Example:
        >>> c = lambda i, p, *f: EvalCase(i, Path(i), p, f)
        >>> cases = {x.case_id: x for x in [c("a", "P1", "Mass"), c("b", "P2", "Mass"),
        ...                                  c("d", "P3", "Edema")]}
        >>> m = leg_metrics({"a": ["d", "b"]}, cases, list(cases.values()))
        >>> m["P@1"], m["P@5"], m["prevalence"]
        (0.0, 0.2, 0.5)
    """
    sums = dict.fromkeys(METRICS, 0.0)
    counted = 0
    for query_id, ranking in rankings.items():
        total = _retrievable(cases[query_id], candidates)
        if not total:
            continue
        counted += 1
        ranked = list(ranking)
        qrels = judgments(cases[query_id], candidates)
        for cut in (1, 5, 10):
            sums[f"P@{cut}"] += precision_at_k(ranked, qrels, cut)
        sums["mAP@10"] += average_precision_at_k(ranked, qrels, K, denominator="capped")
        sums["prevalence"] += len(qrels) / total  # as prevalence() computes it
    return {metric: value / counted if counted else math.nan for metric, value in sums.items()}


def finding_breakdown(
    rankings: Mapping[str, Mapping[str, Sequence[str]]],
    cases: Mapping[str, EvalCase],
    candidates: Mapping[str, Sequence[EvalCase]],
    *,
    top: int = TOP_FINDINGS,
    k: int = K,
) -> list[dict[str, Any]]:
    """P@k per finding for the ``top`` most common labels among the queries.

    For a label L, only the queries labelled L count, and a neighbour counts when it has L;
    the prevalence beside it is, per query, the share of the other patients' candidates with
    L, averaged.

    Args:
        rankings: ``{leg: {query case_id: neighbour case_ids}}``.
        cases: every case by id.
        candidates: per leg, the cases it can return.
        top: how many labels.
        k: the precision cut-off.

    Returns:
        One entry per label, most common first: ``{"finding", "queries", "prevalence",
        "P@10": {leg: value}}`` (prevalence of the first leg's candidates; the legs' candidate
        sets differ only when some cases have no labs).
    """
    queries = [cases[q] for q in next(iter(rankings.values()), {})]
    counts = Counter(label for case in queries for label in case.findings)
    rows: list[dict[str, Any]] = []
    for label, _ in counts.most_common(top):
        labelled = [case for case in queries if label in case.findings]
        first = next(iter(candidates.values()))
        shares = [
            sum(c.patient_ref != q.patient_ref and label in c.findings for c in first) / total
            for q in labelled
            if (total := _retrievable(q, first))
        ]
        per_leg: dict[str, float] = {}
        for leg, by_query in rankings.items():
            hits = [
                sum(label in cases[n].findings for n in list(by_query[q.case_id])[:k]) / k
                for q in labelled
                if _retrievable(q, candidates[leg])
            ]
            per_leg[leg] = sum(hits) / len(hits) if hits else math.nan
        rows.append(
            {
                "finding": label,
                "queries": len(labelled),
                "prevalence": sum(shares) / len(shares) if shares else math.nan,
                f"P@{k}": per_leg,
            }
        )
    return rows


async def open_scratch_store(
    dsn: str, *, image_model: str, image_dim: int, say: Callable[[str], None] = print
) -> PgVectorStore:
    """The scratch case index for an image model; one built with another model is dropped and
    rebuilt (it is the evaluation's own, never the service's).

    Args:
        dsn: the scratch database (:func:`deploy.eval_database.scratch_database`).
        image_model: the image model's id.
        image_dim: its embedding dimension.
        say: where to say that the index is being rebuilt.

    Raises:
        SourceUnavailable: the database cannot be reached.

    Example:
        >>> store = await open_scratch_store(  # doctest: +SKIP
        ...     dsn, image_model="tiny-biomedclip@44611ecc686a", image_dim=64)
    """

    async def open_store() -> PgVectorStore:
        return await PgVectorStore.open(
            dsn,
            image_model=image_model,
            image_dim=image_dim,
            text_model=_NO_TEXT_MODEL,
            text_dim=1,
        )

    try:
        return await open_store()
    except IndexModelMismatch:
        say("the scratch index was built with another model: dropping it and indexing again")
        await PgVectorStore.drop(dsn)
        return await open_store()


_STORED_ROWS = """
    SELECT case_id, patient_ref, findings, image, findings_embedding, fused, labs, labs_measured
    FROM cases
"""


async def _stored_rows(dsn: str) -> dict[str, tuple[Any, ...]]:
    # The store's ports give no way to read the vectors back; the evaluation reads its own
    # scratch tables directly rather than keeping a second copy of the embeddings.
    async with await AsyncConnection.connect(dsn) as conn:
        await register_vector_async(conn)
        cursor = await conn.execute(_STORED_ROWS)
        return {row[0]: row for row in await cursor.fetchall()}


async def _delete(dsn: str, case_ids: Collection[str]) -> None:
    async with await AsyncConnection.connect(dsn) as conn:
        await conn.execute("DELETE FROM cases WHERE case_id = ANY(%s)", (list(case_ids),))


def _float32(value: Any) -> Vector:
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, np.float32)


@dataclass(slots=True)
class _IndexSummary:
    report: IngestReport
    removed: int = 0
    refreshed: int = 0
    seconds: float = 0.0
    stored: dict[str, StoredCase] = field(default_factory=dict)


async def _prepare_index(
    cases: Sequence[EvalCase],
    *,
    dsn: str,
    store: PgVectorStore,
    model: OnnxClipEmbedder,
    weights: FusionWeights,
    pairing: LabPairing | None,
    progress: Progress,
) -> _IndexSummary:
    """Make the scratch index hold exactly ``cases``, embedding only what is not there yet.

    Rows of other images (an earlier run on another subset) or whose patient or labels changed
    are removed; rows indexed with other fusion weights or another lab pairing get their fused
    vector and labs recomputed from their stored embeddings, without embedding again.
    """
    started = time.perf_counter()
    wanted = {case.case_id: case for case in cases}
    present = await _stored_rows(dsn)
    stale = [
        case_id
        for case_id, row in present.items()
        if case_id not in wanted
        or row[1] != wanted[case_id].patient_ref
        or tuple(row[2]) != wanted[case_id].findings
    ]
    if stale:
        await _delete(dsn, stale)
    task = progress.add_task("embedding and indexing cases", total=len(cases))
    report = await ingest_cases(
        [case.source for case in cases],
        records=pairing if pairing is not None else _NoLabs(),
        imaging=_PngImages(cases),
        image_model=model,
        index=store,
        weights=weights,
        on_progress=lambda n: progress.advance(task, n),
    )
    rows = await _stored_rows(dsn)
    refresh: list[IndexedCase] = []
    stored: dict[str, StoredCase] = {}
    for case_id, row in rows.items():
        case = wanted[case_id]
        image, findings = _float32(row[3]), _float32(row[4])
        fused = late_fuse(image, findings, w_image=weights.image, w_findings=weights.findings)
        labs = None if pairing is None else pairing.profile(case.patient_ref)
        labs = labs if labs is not None and labs.measured_count else None
        stored_labs = None if row[6] is None else _float32(row[6])
        same_labs = (labs is None and stored_labs is None) or (
            labs is not None
            and stored_labs is not None
            and row[7] == labs.measured_count
            and np.allclose(stored_labs, labs.vector, atol=1e-6)
        )
        if not same_labs or not np.allclose(_float32(row[5]), fused, atol=1e-5):
            refresh.append(
                IndexedCase(
                    record=case.source.record,
                    findings_text=case.source.findings_text,
                    image=image,
                    findings=findings,
                    fused=fused,
                    labs=labs,
                )
            )
        stored[case_id] = StoredCase(
            case_id=case_id,
            patient_ref=case.patient_ref,
            image=image,
            fused=fused,
            labs_measured=0 if labs is None else labs.measured_count,
        )
    if refresh:
        await store.upsert_cases(refresh)
    await store.analyze()
    return _IndexSummary(
        report=report,
        removed=len(stale),
        refreshed=len(refresh),
        seconds=time.perf_counter() - started,
        stored={c.case_id: stored[c.case_id] for c in cases if c.case_id in stored},
    )


def _hnsw_agreement(
    fused: Mapping[str, Sequence[str]], exact: Mapping[str, Sequence[str]]
) -> float:
    """Mean share of the exact top ``K`` that the store's approximate fused search returned."""
    shares = [len(set(fused[q]) & set(exact[q])) / len(exact[q]) for q in exact if exact[q]]
    return sum(shares) / len(shares) if shares else math.nan


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "images"


async def evaluate_cases(
    settings: Settings,
    *,
    images: Path,
    labels: Path,
    bundles: Path | None = None,
    limit: int | None = None,
    image_model: Path | None = None,
    console: Console,
) -> CaseEvaluation:
    """Index the images as cases in the scratch database, run every leg, and judge them.

    Args:
        settings: the deployment's settings (data directory or DSN, image model, fusion
            weights, ``min_labs``, ONNX Runtime settings).
        images: the folder of ChestX-ray14 PNGs.
        labels: their ``labels.csv``.
        bundles: a folder of Synthea bundles for the (synthetic) labs leg; without it the leg
            is not run.
        limit: evaluate only the first ``limit`` images of ``labels``.
        image_model: an exported image/text model folder; the service's configured image model
            by default.
        console: where progress and remarks go (stderr).

    Returns:
        The report, and the rankings it was computed from.

    Raises:
        CaseEvalError: unusable inputs.
        ManifestError: the image model folder is missing or not an image/text model.
        ConfigurationError: an ONNX Runtime setting is invalid.
        SourceUnavailable: the scratch database cannot be reached or created, or a Synthea
            bundle cannot be read.

    Example:
        >>> evaluation = await evaluate_cases(  # doctest: +SKIP
        ...     Settings(), images=nih, labels=nih / "labels.csv", console=Console(stderr=True))
    """
    started = time.perf_counter()
    cases = read_eval_cases(images, labels, limit=limit)
    pairing = (
        None if bundles is None else await pair_labs(cases, bundles, min_labs=settings.min_labs)
    )
    session, batching = session_settings(settings)
    model = OnnxClipEmbedder(
        image_model or settings.models_path / settings.image_model,
        session=session,
        batching=batching,
    )
    info = ModelInfo.of("image", model)
    weights = FusionWeights(settings.fusion_image_weight, settings.fusion_findings_weight)

    def say(line: str) -> None:
        console.print(f"[dim]{line}[/dim]")

    async with AsyncExitStack() as stack:
        stack.push_async_callback(model.aclose)
        dsn = await stack.enter_async_context(scratch_database(settings, SCRATCH_DATABASE))
        store = await open_scratch_store(
            dsn, image_model=model.model_id, image_dim=model.dimension, say=say
        )
        stack.push_async_callback(store.close)
        progress = stack.enter_context(Progress(console=console, transient=True))
        index = await _prepare_index(
            cases,
            dsn=dsn,
            store=store,
            model=model,
            weights=weights,
            pairing=pairing,
            progress=progress,
        )
        stored = list(index.stored.values())
        queries = queries_for(cases, index.stored, pairing)
        task = progress.add_task("searching", total=len(queries))
        search_started = time.perf_counter()
        rankings = await rank_legs(
            queries,
            stored,
            index=store,
            k=K,
            min_labs=settings.min_labs,
            with_labs=pairing is not None,
            on_progress=lambda n: progress.advance(task, n),
        )
        search_s = time.perf_counter() - search_started
    by_id = {case.case_id: case for case in cases}
    checked = check_patient_disjoint(rankings, {c.case_id: c.patient_ref for c in cases})
    indexed = [by_id[s.case_id] for s in stored]
    candidates: dict[str, Sequence[EvalCase]] = {"image-only": indexed, "fused": indexed}
    if pairing is not None:
        candidates["labs"] = [
            by_id[s.case_id] for s in stored if s.labs_measured >= settings.min_labs
        ]
    rows = {leg: leg_metrics(rankings[leg], by_id, candidates[leg]) for leg in rankings}
    rows["random (expected)"] = random_baseline([by_id[q.case_id] for q in queries], indexed)
    majority = Counter(label for case in indexed for label in case.findings).most_common(1)[0][0]
    rows[f"constant: {majority}"] = leg_metrics(
        constant_rankings(queries, indexed, majority), by_id, indexed
    )
    breakdown = finding_breakdown(rankings, by_id, candidates)
    exact_fused = exact_rankings(queries, stored, vector="fused", k=K)
    report = EvalReport(
        name=f"cases-{_slug(images.name)}" + (f"-first{limit}" if limit is not None else ""),
        title=(
            f"Similar cases, NIH {images.name} ({len(indexed)} images, "
            f"{len({c.patient_ref for c in indexed})} patients), patient-disjoint top {K}"
            + (": RANDOM image model, meaningless" if _placeholder(info) else "")
        ),
        metrics=METRICS,
        rows=rows,
        not_run={}
        if pairing is not None
        else {"labs": "not run: NIH patients have no labs (--bundles pairs them synthetically)"},
        models=(info,),
        notes=_notes(info, weights, pairing, settings.min_labs, majority),
        details={
            "images": len(cases),
            "indexed": len(indexed),
            "patients": len({c.patient_ref for c in indexed}),
            "queries": len(queries),
            "skipped": [f"{case_id}: {reason}" for case_id, reason in index.report.skipped],
            "embedded_now": index.report.indexed,
            "already_indexed": index.report.already_indexed,
            "rows_removed": index.removed,
            "rows_refreshed": index.refreshed,
            "fusion_weights": {"image": weights.image, "findings": weights.findings},
            "neighbours_checked_patient_disjoint": checked,
            "fused_hnsw_agreement_at_10": _hnsw_agreement(rankings["fused"], exact_fused),
            "lab_pairing": None
            if pairing is None
            else {
                "synthea_folder": str(pairing.folder),
                "synthea_patients_used": len(set(pairing.synthea_for.values())),
                "nih_patients": len(pairing.synthea_for),
            },
            "index_s": round(index.seconds, 2),
            "search_s": round(search_s, 2),
            "total_s": round(time.perf_counter() - started, 2),
        },
    )
    return CaseEvaluation(
        report=report,
        breakdown=breakdown,
        cases=cases,
        stored=tuple(stored),
        rankings=rankings,
        pairing=pairing,
    )


def _placeholder(model: ModelInfo) -> bool:
    """Whether the model card says the model is a random placeholder (the tiny models do)."""
    return "random" in model.description.lower()


def _notes(
    model: ModelInfo,
    weights: FusionWeights,
    pairing: LabPairing | None,
    min_labs: int,
    majority: str,
) -> tuple[str, ...]:
    notes = []
    if _placeholder(model):
        notes.append(
            f"THE IMAGE MODEL ({model.name}) IS A RANDOM PLACEHOLDER, never trained: its "
            "similarities are meaningless, and so are the image-only and fused numbers; they "
            "show the pipeline runs, not that it finds similar cases."
        )
    notes += [
        "Relevant: the neighbour shares at least one NIH label with the query ('No Finding' "
        "counts as a label, so a normal image finding a normal one is relevant).",
        "Patient-disjoint: every leg excludes all images of the query's own NIH patient, and "
        "the rankings are checked for it. Queries are searched by their image (or labs) alone; "
        "their labels only judge the results.",
        "prevalence: per query, the share of the other patients' retrievable cases that are "
        "relevant to it, averaged over the queries: the expected P@k of a random ranking. "
        "'random (expected)' gives every metric of a random ranking, computed exactly.",
        f"'constant: {majority}' returns the same {majority} cases (of other patients) to "
        "every query, ignoring it: a leg biased toward the most common label scores like it, "
        "above the prevalence. A leg is only useful if it beats both baselines, in the "
        "per-finding table too.",
        f"mAP@{K}: mean over queries of AP@{K}, judged against the query's R relevant cases "
        "among the cases the leg can return (other patients only): the precision at each "
        f"relevant rank within the top {K}, summed, divided by min({K}, R) (so 1 when the "
        f"first min({K}, R) ranks are all relevant), not by R as trec_eval's map_cut does: "
        f"queries here have hundreds of relevant cases, and dividing by R would keep AP@{K} "
        f"below {K}/R.",
        "image-only: exact cosine search over the stored image embeddings (an index with "
        "fusion weights (1, 0)); fused: the store's HNSW search of vectors fused with weights "
        f"image {weights.image}, findings {weights.findings}, searched by the query's image.",
    ]
    if pairing is not None:
        notes.append(
            "labs: SYNTHETIC pairing. NIH patients have no labs; each is paired by a salted "
            f"hash with one of the Synthea patients in {pairing.folder.name} that have at least "
            f"{min_labs} panel tests. The labs are independent of the images, so this leg "
            "measures chance by construction; NIH patients sharing a Synthea patient have "
            "identical profiles (distance 0), ordered among themselves by the database."
        )
    return tuple(notes)


def _cell(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "n/a"


@dataclass(frozen=True, slots=True)
class CaseEvaluation:
    """One run of the evaluation: its report, and what it was computed from.

    Args:
        report: the metrics table, models, notes and details.
        breakdown: P@10 per finding (:func:`finding_breakdown`).
        cases: the evaluated cases.
        stored: the indexed cases' vectors, in case order.
        rankings: ``{leg: {query case_id: neighbour case_ids}}``.
        pairing: the synthetic lab pairing, if the labs leg ran.
    """

    report: EvalReport
    breakdown: list[dict[str, Any]]
    cases: tuple[EvalCase, ...]
    stored: tuple[StoredCase, ...]
    rankings: dict[str, dict[str, tuple[str, ...]]]
    pairing: LabPairing | None

    def to_json(self) -> dict[str, Any]:
        """The report's JSON with the per-finding breakdown added (``per_finding``)."""
        finite = [
            {**row, f"P@{K}": {leg: _finite(v) for leg, v in row[f"P@{K}"].items()}}
            | {"prevalence": _finite(row["prevalence"])}
            for row in self.breakdown
        ]
        return self.report.to_json() | {"per_finding": finite}

    def to_markdown(self) -> str:
        """The report's markdown followed by the per-finding table."""
        legs = list(self.breakdown[0][f"P@{K}"]) if self.breakdown else []
        lines = [
            "",
            f"P@{K} by finding ({TOP_FINDINGS} most common labels among the queries; for a "
            "label, only the queries that have it count, and a neighbour counts when it has it):",
            "",
            "| finding | queries | prevalence | " + " | ".join(legs) + " |",
            "|---" * (len(legs) + 3) + "|",
        ]
        for row in self.breakdown:
            cells = [_cell(row[f"P@{K}"][leg]) for leg in legs]
            lines.append(
                f"| {row['finding']} | {row['queries']} | {_cell(row['prevalence'])} | "
                + " | ".join(cells)
                + " |"
            )
        return self.report.to_markdown() + "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> ReportFiles:
        """Write ``<name>.json``, ``.md`` (both with the per-finding breakdown) and ``.png``.

        Raises:
            PlotUnavailable: matplotlib is not installed.
            OSError: ``out_dir`` cannot be written.
        """
        files = write_report(self.report, out_dir)
        files.json.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        files.markdown.write_text(self.to_markdown(), encoding="utf-8")
        return files


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
