"""A folder of FHIR patient bundles as a clinical record (the embedded stand-in for a server).

The demo and the tests run without a FHIR server: their clinical records are Synthea bundles,
one patient per file (transaction or collection bundles). :class:`BundleFolderRecords` reads such
a folder the way a FHIR server would answer after loading it:

* the folder is indexed by ``Patient.id`` (not by file name: Synthea names files after a
  different UUID) on first use, reading each file once;
* references between entries (``urn:uuid:<id>`` in a transaction) are rewritten to
  ``<ResourceType>/<id>``, as a server assigns them;
* a patient's laboratory Observations are read on first request and their results cached, so a
  later request costs nothing.

An unknown patient has no results; that is an answer, not an error.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.fhir.observations import lab_results
from adapters.fhir.parse import InvalidFhirContent, parse_observation
from core.errors import SourceUnavailable
from core.types import LabResult

__all__ = ["BundleFolderRecords", "folder_resources"]

logger = logging.getLogger(__name__)

_SOURCE = "bundle folder"


def _is_laboratory_json(resource: Mapping[str, Any]) -> bool:
    """Whether raw Observation JSON has a ``laboratory`` category code.

    This is the match of the FHIR search ``Observation?category=laboratory`` (a token search on
    the code, in any system); :func:`adapters.fhir.observations.is_laboratory` is the stricter
    check applied when results are read.
    """
    return any(
        coding.get("code") == "laboratory"
        for category in resource.get("category", ())
        for coding in category.get("coding", ())
    )


def _rewrite_references(value: Any, targets: Mapping[str, str]) -> Any:
    """A copy of ``value`` with every ``reference`` found in ``targets`` replaced."""
    if isinstance(value, dict):
        rewritten = {key: _rewrite_references(item, targets) for key, item in value.items()}
        reference = value.get("reference")
        if isinstance(reference, str) and reference in targets:
            rewritten["reference"] = targets[reference]
        return rewritten
    if isinstance(value, list):
        return [_rewrite_references(item, targets) for item in value]
    return value


def _read_bundle(path: Path) -> dict[str, Any] | None:
    """The bundle in ``path``, or ``None`` when the file is not a JSON Bundle."""
    try:
        content = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("resourceType") != "Bundle":
        return None
    return content


def _resources(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        entry["resource"]
        for entry in bundle.get("entry", ())
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict)
    ]


def _patient_of(bundle: Mapping[str, Any]) -> dict[str, Any] | None:
    patients = [r for r in _resources(bundle) if r.get("resourceType") == "Patient" and r.get("id")]
    return patients[0] if len(patients) == 1 else None


@dataclass(frozen=True, slots=True)
class _PatientRecord:
    """What is kept of one patient's bundle: the Patient and its laboratory Observations."""

    patient: dict[str, Any]
    laboratory: tuple[dict[str, Any], ...]


def _targets(bundle: Mapping[str, Any]) -> dict[str, str]:
    """``urn:uuid:`` fullUrls of the bundle's entries and the ``<Type>/<id>`` they become."""
    return {
        str(entry["fullUrl"]): f"{entry['resource']['resourceType']}/{entry['resource']['id']}"
        for entry in bundle.get("entry", ())
        if isinstance(entry, dict)
        and str(entry.get("fullUrl", "")).startswith("urn:uuid:")
        and isinstance(entry.get("resource"), dict)
        and entry["resource"].get("id")
    }


def folder_resources(
    folder: str | os.PathLike[str], resource_types: Collection[str]
) -> Iterator[dict[str, Any]]:
    """The resources of the given types in every Bundle of a folder, as a server stores them.

    Unlike :class:`BundleFolderRecords`, this reads any bundle, not only single-patient ones
    (the fixture imaging bundle holds every patient's studies and reports).

    Args:
        folder: the folder of bundles (``*.json``; files that are not a Bundle are skipped).
        resource_types: the types wanted (``{"ImagingStudy", "DiagnosticReport"}``).

    Returns:
        The resources, file by file in name order, references rewritten to ``<Type>/<id>``.
    """
    for path in sorted(Path(folder).glob("*.json")):
        bundle = _read_bundle(path)
        if bundle is None:
            continue
        targets = _targets(bundle)
        for resource in _resources(bundle):
            if resource.get("resourceType") in resource_types:
                yield _rewrite_references(resource, targets)


def _patient_record(bundle: Mapping[str, Any]) -> _PatientRecord | None:
    """The bundle's Patient and laboratory Observations with references rewritten as a server
    would store them, or ``None`` when the bundle does not hold exactly one Patient."""
    patient = _patient_of(bundle)
    if patient is None:
        return None
    targets = _targets(bundle)
    return _PatientRecord(
        patient=_rewrite_references(patient, targets),
        laboratory=tuple(
            _rewrite_references(resource, targets)
            for resource in _resources(bundle)
            if resource.get("resourceType") == "Observation" and _is_laboratory_json(resource)
        ),
    )


class BundleFolderRecords:
    """Clinical records read from a folder of single-patient FHIR bundles (``*.json``).

    Implements :class:`core.ports.ClinicalRecords`. Files that are not a Bundle holding exactly
    one Patient are ignored (and counted in a warning).

    Args:
        folder: the folder of bundles (read only; nothing is written to it).

    Raises:
        NotADirectoryError: ``folder`` is not a directory.

    Examples:
        >>> # records = BundleFolderRecords("../shared/data/synthea")
        >>> # records.patient_ids()[:1]            -> ('018f428e-...',)
        >>> # await records.laboratory_results(pid) -> (LabResult(loinc='718-7', ...), ...)
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self._folder = Path(folder)
        if not self._folder.is_dir():
            raise NotADirectoryError(f"not a folder of FHIR bundles: {self._folder}")
        self._lock = threading.Lock()
        self._files: dict[str, Path] | None = None
        self._records: dict[str, _PatientRecord] = {}
        self._labs: dict[str, tuple[LabResult, ...]] = {}

    @property
    def folder(self) -> Path:
        """The folder of bundles."""
        return self._folder

    def _index(self) -> dict[str, Path]:
        with self._lock:
            if self._files is None:
                self._files = self._build_index()
            return self._files

    def _build_index(self) -> dict[str, Path]:
        files: dict[str, Path] = {}
        ignored = 0
        for path in sorted(self._folder.glob("*.json")):
            bundle = _read_bundle(path)
            patient = _patient_of(bundle) if bundle is not None else None
            if patient is None:
                ignored += 1
                continue
            patient_id = str(patient["id"])
            if patient_id in files:
                raise SourceUnavailable(_SOURCE, "two bundles hold the same Patient.id")
            files[patient_id] = path
        if ignored:
            logger.warning("ignored %d file(s) that are not single-patient bundles", ignored)
        return files

    def patient_ids(self) -> tuple[str, ...]:
        """The ids of the folder's patients, sorted.

        Raises:
            SourceUnavailable: two bundles hold the same patient.
        """
        return tuple(sorted(self._index()))

    def _record(self, patient_id: str) -> _PatientRecord | None:
        path = self._index().get(patient_id)
        if path is None:
            return None
        with self._lock:
            record = self._records.get(patient_id)
        if record is not None:
            return record
        bundle = _read_bundle(path)
        record = _patient_record(bundle) if bundle is not None else None
        if record is None:
            raise SourceUnavailable(_SOURCE, "a patient's bundle is no longer readable")
        with self._lock:
            return self._records.setdefault(patient_id, record)

    def patient(self, patient_id: str) -> dict[str, Any] | None:
        """The Patient resource as a FHIR server would return it (a copy), or ``None`` if
        unknown."""
        record = self._record(patient_id)
        return None if record is None else copy.deepcopy(record.patient)

    def laboratory_observations(self, patient_id: str) -> tuple[dict[str, Any], ...]:
        """The patient's Observations in category ``laboratory`` as FHIR JSON, references
        rewritten to ``<ResourceType>/<id>`` (copies); empty for an unknown patient."""
        record = self._record(patient_id)
        return () if record is None else copy.deepcopy(record.laboratory)

    def _read_labs(self, patient_id: str) -> tuple[LabResult, ...]:
        record = self._record(patient_id)
        try:
            observations = [parse_observation(r) for r in record.laboratory] if record else []
        except InvalidFhirContent as error:
            raise SourceUnavailable(_SOURCE, error.reason) from error
        labs = tuple(lab_results(observations, patient_id=patient_id))
        with self._lock:
            return self._labs.setdefault(patient_id, labs)

    async def laboratory_results(self, patient_id: str) -> tuple[LabResult, ...]:
        """The patient's numeric laboratory results (empty for an unknown patient).

        The first request for a patient reads its bundle in a worker thread; later ones are
        answered from the cache.

        Raises:
            SourceUnavailable: the folder holds two bundles of one patient, a bundle became
                unreadable, or a laboratory Observation is not valid FHIR.
        """
        cached = self._labs.get(patient_id)
        if cached is not None:
            return cached
        return await asyncio.to_thread(self._read_labs, patient_id)
