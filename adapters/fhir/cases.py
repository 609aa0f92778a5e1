"""Past cases found in FHIR records: one per final radiology report on a DICOM study.

Ingestion indexes past cases (:class:`core.ingestion.CaseSource`): a patient, a DICOM study, and
what the radiologist recorded. The three FHIR ingestion sources (a folder of bundles, a live
server, a Bulk Data export) all hold these as DiagnosticReport and ImagingStudy resources; this
module turns them into cases the same way for all three.

A radiology DiagnosticReport becomes a case when it is final (``final``, ``amended``,
``corrected``, ``appended``), is about a Patient, has a conclusion, and references an
ImagingStudy of the same source that has a DICOM study UID (the first such, when it references
several). Every other radiology report is listed as skipped, with the reason.

What a case gets:

* ``case_id``: the report's identifier in system :data:`CASE_ID_SYSTEM` when it has one (the
  fixture cases carry theirs), else ``study-<study UID>``: stable across sources and runs.
* ``findings``: the report's ``conclusionCode`` concepts in words (their text, else the first
  coding's display or code); an empty tuple when it has none. Findings are never mined from
  the free text: a label that is not recorded is not a finding.
* ``findings_text``: the conclusion, as the radiologist wrote it.
* ``provenance``: the source and the report (``FHIR server: DiagnosticReport/<id>``), after the
  display of a ``synthetic`` ``meta.tag``, so that a synthetic case keeps saying what it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adapters.fhir.bulk import NdjsonRecords
from adapters.fhir.bundle_folder import folder_resources
from adapters.fhir.client import FhirClient
from adapters.fhir.parse import InvalidFhirContent, parse_diagnostic_report, parse_imaging_study
from adapters.fhir.radiology import (
    RADIOLOGY_CATEGORIES,
    ImagingStudyRecord,
    RadiologyReport,
    imaging_study_record,
    radiology_report,
)
from core.ingestion import CaseSource
from core.types import CaseRecord

__all__ = [
    "CASE_ID_SYSTEM",
    "SYNTHETIC_TAG",
    "CaseDiscovery",
    "cases_from_bundle_folder",
    "cases_from_ndjson",
    "cases_from_resources",
    "cases_from_server",
    "discover_cases",
]

logger = logging.getLogger(__name__)

CASE_ID_SYSTEM = "urn:medirag:case-id"
"""The DiagnosticReport identifier system whose value is the case id."""

SYNTHETIC_TAG = "synthetic"
"""The ``meta.tag`` code of synthetic records; its display is kept in the provenance."""

_FINAL = frozenset({"final", "amended", "corrected", "appended"})
_TYPES = frozenset({"ImagingStudy", "DiagnosticReport"})


@dataclass(frozen=True, slots=True)
class CaseDiscovery:
    """The cases found, and each radiology report that is not one, with why.

    Args:
        cases: the cases, in the order of their reports.
        skipped: ``(DiagnosticReport/<id>, reason)`` for each report left out.
    """

    cases: tuple[CaseSource, ...]
    skipped: tuple[tuple[str, str], ...]


def _case_id(raw_identifiers: Iterable[Mapping[str, Any]]) -> str:
    """The report's case id identifier, or ``""`` when it has none."""
    for identifier in raw_identifiers:
        if identifier.get("system") == CASE_ID_SYSTEM and identifier.get("value"):
            return str(identifier["value"])
    return ""


def discover_cases(
    reports: Iterable[tuple[RadiologyReport, str]],
    studies: Iterable[ImagingStudyRecord],
    *,
    source: str,
) -> CaseDiscovery:
    """Cases from radiology report records and the ImagingStudy records they may reference.

    Args:
        reports: each report with its case id (see :data:`CASE_ID_SYSTEM`; ``""`` to derive it
            from the study UID).
        studies: the ImagingStudy records of the same source.
        source: the source in words, for the provenance (``"FHIR server"``).

    Returns:
        The cases and the skipped reports (see the module docstring).
    """
    by_id = {study.resource_id: study for study in studies}
    cases: list[CaseSource] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for report, case_id in reports:
        name = f"DiagnosticReport/{report.resource_id}"
        study = next(
            (by_id[i] for i in report.imaging_study_ids if i in by_id and by_id[i].study_uid),
            None,
        )
        reason = None
        if report.status not in _FINAL:
            reason = f"not final (status {report.status})"
        elif report.patient_ref is None:
            reason = "not about a Patient"
        elif not report.conclusion:
            reason = "no conclusion"
        elif not report.imaging_study_ids:
            reason = "references no ImagingStudy"
        elif study is None:
            reason = "no referenced ImagingStudy with a DICOM study UID in the source"
        if reason is not None:
            skipped.append((name, reason))
            continue
        assert study is not None
        assert study.study_uid is not None
        assert report.patient_ref is not None
        identifier = case_id or f"study-{study.study_uid}"
        if identifier in seen:
            skipped.append((name, "a second report of the same case"))
            continue
        seen.add(identifier)
        notes = [display for code, display in report.tags if code == SYNTHETIC_TAG and display]
        provenance = "; ".join([*notes, f"{source}: {name}"])
        record = CaseRecord(
            case_id=identifier,
            patient_ref=report.patient_ref,
            study_uid=study.study_uid,
            findings=report.conclusion_codes,
            provenance=provenance,
        )
        cases.append(CaseSource(record=record, findings_text=str(report.conclusion)))
    if skipped:
        logger.info("%d radiology report(s) are not cases", len(skipped))
    return CaseDiscovery(cases=tuple(cases), skipped=tuple(skipped))


def _is_radiology_json(resource: Mapping[str, Any]) -> bool:
    return any(
        coding.get("code") in RADIOLOGY_CATEGORIES
        for category in resource.get("category") or ()
        for coding in category.get("coding") or ()
    )


def cases_from_resources(resources: Iterable[Mapping[str, Any]], *, source: str) -> CaseDiscovery:
    """Cases from FHIR JSON resources (other types than ImagingStudy and DiagnosticReport, and
    non-radiology reports, are ignored).

    Args:
        resources: the resources, references as a server stores them (``ImagingStudy/<id>``).
        source: the source in words, for the provenance.

    Returns:
        The cases; a radiology report that is not valid FHIR is skipped with the reason, an
        invalid ImagingStudy is left out (its reports then say they lack one).

    Examples:
        >>> found = cases_from_resources([
        ...     {"resourceType": "ImagingStudy", "id": "s1", "status": "available",
        ...      "subject": {"reference": "Patient/p1"},
        ...      "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}]},
        ...     {"resourceType": "DiagnosticReport", "id": "r1", "status": "final",
        ...      "category": [{"coding": [{"code": "RAD"}]}], "code": {"text": "XR chest"},
        ...      "subject": {"reference": "Patient/p1"}, "conclusion": "Clear lungs.",
        ...      "imagingStudy": [{"reference": "ImagingStudy/s1"}]}], source="example")
        >>> found.cases[0].record
        CaseRecord(case_id='study-1.2.3', patient_ref='Patient/p1', study_uid='1.2.3', findings=(), provenance='example: DiagnosticReport/r1')
    """  # noqa: E501
    studies: list[ImagingStudyRecord] = []
    reports: list[tuple[RadiologyReport, str]] = []
    skipped: list[tuple[str, str]] = []
    for resource in resources:
        kind = resource.get("resourceType")
        try:
            if kind == "ImagingStudy":
                study = imaging_study_record(parse_imaging_study(resource))
                if study is not None:
                    studies.append(study)
            elif kind == "DiagnosticReport" and _is_radiology_json(resource):
                report = radiology_report(parse_diagnostic_report(resource))
                if report is not None:
                    reports.append((report, _case_id(resource.get("identifier") or ())))
        except InvalidFhirContent as error:
            if kind == "DiagnosticReport":
                skipped.append((f"DiagnosticReport/{resource.get('id')}", error.reason))
            else:
                logger.warning("left out an ImagingStudy: %s", error.reason)
    found = discover_cases(reports, studies, source=source)
    return CaseDiscovery(cases=found.cases, skipped=(*skipped, *found.skipped))


def cases_from_bundle_folder(folder: str | os.PathLike[str]) -> CaseDiscovery:
    """Cases from every bundle in a folder (Synthea's and the fixture imaging bundle alike)."""
    return cases_from_resources(folder_resources(folder, _TYPES), source="bundle folder")


def cases_from_ndjson(records: NdjsonRecords) -> CaseDiscovery:
    """Cases from a Bulk Data export folder."""
    resources = [*records.resources("ImagingStudy"), *records.resources("DiagnosticReport")]
    return cases_from_resources(resources, source="FHIR bulk export")


async def cases_from_server(client: FhirClient) -> CaseDiscovery:
    """Cases from a live server: every ImagingStudy, and every radiology DiagnosticReport.

    Raises:
        SourceUnavailable: a search failed (see :meth:`FhirClient.fetch`).
    """
    studies = await client.search_resources("ImagingStudy")
    reports = await client.search_resources("DiagnosticReport?category=LP29684-5,RAD")
    return cases_from_resources([*studies, *reports], source="FHIR server")
