"""ImagingStudy and radiology DiagnosticReport resources as small typed records.

What the service needs of a patient's imaging in FHIR is little: which DICOM studies exist (to
find them in the archive) and what the radiologist concluded about them (the findings a past case
is indexed by). These records keep that and nothing else.

Choices a reader should know:

* A study's DICOM StudyInstanceUID is the identifier with system ``urn:dicom:uid`` (FHIR R4,
  ImagingStudy.identifier), or one with system ``urn:ietf:rfc:3986`` (what Synthea writes); its
  value is ``urn:oid:<uid>`` and the ``urn:oid:`` prefix is removed.
* The accession number is the identifier typed ``ACSN`` (HL7 v2 table 0203).
* A report is radiology when a category is ``RAD`` (HL7 v2 table 0074) or LOINC ``LP29684-5``
  (Radiology), in any system: the two codings EHRs use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy

__all__ = [
    "DICOM_UID_SYSTEMS",
    "RADIOLOGY_CATEGORIES",
    "ImagingStudyRecord",
    "RadiologyReport",
    "dicom_study_uid",
    "imaging_study_record",
    "is_radiology",
    "radiology_report",
]

logger = logging.getLogger(__name__)

DICOM_UID_SYSTEMS = frozenset({"urn:dicom:uid", "urn:ietf:rfc:3986"})
"""Identifier systems whose ``urn:oid:`` value is a DICOM UID."""

RADIOLOGY_CATEGORIES = frozenset({"RAD", "LP29684-5"})
"""DiagnosticReport category codes that mean radiology."""

_ACCESSION = "ACSN"


@dataclass(frozen=True, slots=True)
class ImagingStudyRecord:
    """What the service uses of an ImagingStudy.

    Args:
        resource_id: the FHIR id (``ImagingStudy/<resource_id>``).
        patient_ref: the subject (``Patient/<id>``), if it is a patient.
        study_uid: the DICOM StudyInstanceUID, if the resource gives one.
        modalities: the DICOM modality codes of the study and its series, without repeats.
        accession: the accession number, if any.
        started: when the study started, if known.
        description: the study's description, if any.
    """

    resource_id: str
    patient_ref: str | None
    study_uid: str | None
    modalities: tuple[str, ...]
    accession: str | None
    started: datetime | None
    description: str | None


@dataclass(frozen=True, slots=True)
class RadiologyReport:
    """What the service uses of a radiology DiagnosticReport.

    Args:
        resource_id: the FHIR id (``DiagnosticReport/<resource_id>``).
        patient_ref: the subject (``Patient/<id>``), if it is a patient.
        status: the report status (``final``, ``amended``, ``preliminary``, ...).
        conclusion: the conclusion text, if any.
        conclusion_codes: each ``conclusionCode`` in words: its text, else its first coding's
            display, else that coding's code.
        imaging_study_ids: the ids of the ImagingStudy resources it references.
        issued: when it was issued, if known.
        tags: the ``(code, display)`` of each ``meta.tag`` (fixtures mark themselves synthetic).
    """

    resource_id: str
    patient_ref: str | None
    status: str
    conclusion: str | None
    conclusion_codes: tuple[str, ...]
    imaging_study_ids: tuple[str, ...]
    issued: datetime | None
    tags: tuple[tuple[str, str], ...] = ()


def _datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    return None


def _patient_ref(reference: str | None) -> str | None:
    if reference and reference.startswith("Patient/") and reference.count("/") == 1:
        return reference
    return None


def dicom_study_uid(identifiers: Iterable[Any]) -> str | None:
    """The DICOM UID among FHIR identifiers (``urn:oid:`` removed), or ``None``.

    Examples:
        >>> from fhir.resources.R4B.identifier import Identifier
        >>> dicom_study_uid([Identifier(system="urn:dicom:uid", value="urn:oid:1.2.3")])
        '1.2.3'
    """
    for identifier in identifiers:
        value = str(identifier.value or "")
        if identifier.system in DICOM_UID_SYSTEMS and value.startswith("urn:oid:"):
            return value.removeprefix("urn:oid:")
    return None


def _accession(study: ImagingStudy) -> str | None:
    for identifier in study.identifier or ():
        codes = {c.code for c in (identifier.type.coding or ())} if identifier.type else set()
        if _ACCESSION in codes and identifier.value:
            return str(identifier.value)
    return None


def imaging_study_record(study: ImagingStudy) -> ImagingStudyRecord | None:
    """The record of a validated ImagingStudy, or ``None`` when it has no id.

    Examples:
        >>> from adapters.fhir.parse import parse_imaging_study
        >>> study = parse_imaging_study({
        ...     "resourceType": "ImagingStudy", "id": "s1", "status": "available",
        ...     "subject": {"reference": "Patient/p1"},
        ...     "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}],
        ...     "series": [{"uid": "1.2.3.4", "modality": {"code": "DX"}}]})
        >>> record = imaging_study_record(study)
        >>> record.study_uid, record.modalities, record.patient_ref
        ('1.2.3', ('DX',), 'Patient/p1')
    """
    if study.id is None:
        return None
    modalities: list[str] = []
    for coding in [*(study.modality or ()), *(s.modality for s in study.series or ())]:
        if coding.code and coding.code not in modalities:
            modalities.append(str(coding.code))
    return ImagingStudyRecord(
        resource_id=str(study.id),
        patient_ref=_patient_ref(study.subject.reference if study.subject else None),
        study_uid=dicom_study_uid(study.identifier or ()),
        modalities=tuple(modalities),
        accession=_accession(study),
        started=_datetime(study.started),
        description=str(study.description) if study.description else None,
    )


def is_radiology(report: DiagnosticReport) -> bool:
    """Whether a category of the report is radiology (``RAD`` or LOINC ``LP29684-5``)."""
    return any(
        coding.code in RADIOLOGY_CATEGORIES
        for category in report.category or ()
        for coding in category.coding or ()
    )


def _concept_words(concept: Any) -> str | None:
    if concept.text:
        return str(concept.text)
    for coding in concept.coding or ():
        if coding.display or coding.code:
            return str(coding.display or coding.code)
    return None


def radiology_report(report: DiagnosticReport) -> RadiologyReport | None:
    """The record of a validated radiology DiagnosticReport, or ``None`` when it is not
    radiology or has no id.

    Examples:
        >>> from adapters.fhir.parse import parse_diagnostic_report
        >>> report = parse_diagnostic_report({
        ...     "resourceType": "DiagnosticReport", "id": "r1", "status": "final",
        ...     "category": [{"coding": [{"code": "RAD"}]}], "code": {"text": "XR chest"},
        ...     "conclusion": "No acute finding.",
        ...     "imagingStudy": [{"reference": "ImagingStudy/s1"}]})
        >>> record = radiology_report(report)
        >>> record.conclusion, record.imaging_study_ids
        ('No acute finding.', ('s1',))
    """
    if report.id is None or not is_radiology(report):
        return None
    studies = tuple(
        str(ref.reference).removeprefix("ImagingStudy/")
        for ref in report.imagingStudy or ()
        if ref.reference and str(ref.reference).startswith("ImagingStudy/")
    )
    codes = tuple(
        words for words in (_concept_words(c) for c in report.conclusionCode or ()) if words
    )
    tags = tuple(
        (str(tag.code), str(tag.display or ""))
        for tag in (report.meta.tag or () if report.meta else ())
        if tag.code
    )
    return RadiologyReport(
        resource_id=str(report.id),
        patient_ref=_patient_ref(report.subject.reference if report.subject else None),
        status=str(report.status),
        conclusion=str(report.conclusion) if report.conclusion else None,
        conclusion_codes=codes,
        imaging_study_ids=studies,
        issued=_datetime(report.issued),
        tags=tags,
    )
