"""CDS Hooks prefetch as a clinical record, and prefetch content for an EHR simulator.

A CDS Hooks service declares prefetch templates; the CDS client (the EHR) runs them and sends the
results with the hook request. The specification (CDS Hooks 2.0, "Providing FHIR Resources to a
CDS Service") gives the three cases :class:`PrefetchRecords` distinguishes:

* the key is present with a resource: the prefetched data, equivalent to what the service would
  get from the FHIR server with the same query;
* the key is absent: the client chose not to, or could not, prefetch; the service asks the FHIR
  server itself (the ``fallback``), and without one cannot answer (the hook answers 412);
* the value is ``null``: the client has no data for the query; the patient has no results.

An ``OperationOutcome`` in place of the data, or one with an error issue inside the Bundle, is
the client reporting that its own query failed, which the specification means to spare the
service a follow-up query: it is reported as unavailable, without asking the server. A value
that is not a valid FHIR Bundle does not satisfy the template, so the fallback is asked when
there is one.

The helpers at the end build what an EHR would send for the service's templates (``Patient/<id>``
and ``Observation?patient=<id>&category=laboratory&_sort=-date``) from a
:class:`~adapters.fhir.bundle_folder.BundleFolderRecords`; the demo's EHR simulator uses them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from adapters.fhir.bundle_folder import BundleFolderRecords
from adapters.fhir.observations import lab_results
from adapters.fhir.parse import (
    InvalidFhirContent,
    bundle_resources,
    next_link,
    parse_bundle,
    reports_error,
)
from core.errors import SourceUnavailable
from core.ports import ClinicalRecords
from core.types import LabResult

__all__ = ["PrefetchRecords", "laboratory_bundle", "patient_resource", "prefetch_content"]

logger = logging.getLogger(__name__)

_SOURCE = "CDS Hooks prefetch"

_UNDATED = datetime.min.replace(tzinfo=UTC)


class PrefetchRecords:
    """Laboratory results from one CDS Hooks request's prefetch, or from the FHIR server.

    Implements :class:`core.ports.ClinicalRecords` for one hook request.

    Args:
        prefetch: the request's ``prefetch`` object (``None`` when the request had none).
        labs_key: the prefetch key of the laboratory search in the service's discovery.
        fallback: where to ask when the prefetch does not have the labs (normally a
            :class:`~adapters.fhir.client.FhirClient` for the request's ``fhirServer``).

    Examples:
        >>> import asyncio
        >>> asyncio.run(PrefetchRecords({"labs": None}).laboratory_results("123"))
        ()
        >>> # PrefetchRecords({}) with no fallback raises SourceUnavailable (the hook answers 412)
    """

    __slots__ = ("_fallback", "_labs_key", "_prefetch")

    def __init__(
        self,
        prefetch: Mapping[str, Any] | None,
        *,
        labs_key: str = "labs",
        fallback: ClinicalRecords | None = None,
    ) -> None:
        self._prefetch = prefetch
        self._labs_key = labs_key
        self._fallback = fallback

    async def _from_fallback(self, patient_id: str, why: str) -> tuple[LabResult, ...]:
        if self._fallback is None:
            raise SourceUnavailable(_SOURCE, f"{why} and no FHIR server to ask")
        return tuple(await self._fallback.laboratory_results(patient_id))

    async def laboratory_results(self, patient_id: str) -> tuple[LabResult, ...]:
        """The patient's numeric laboratory results from the prefetch, else from the fallback.

        Args:
            patient_id: the hook context's ``patientId``; results about any other patient in
                the prefetch are dropped.

        Returns:
            The results of the prefetched Bundle (its ``next`` link, if any, is not followed),
            an empty tuple when the prefetch value is ``null``, or the fallback's results.

        Raises:
            SourceUnavailable: the client reported an error (an ``OperationOutcome``), or the
                labs are missing or invalid and there is no fallback; or the fallback raised it.
        """
        key = self._labs_key
        if self._prefetch is None or key not in self._prefetch:
            return await self._from_fallback(patient_id, f"no '{key}' prefetch")
        value = self._prefetch[key]
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            return await self._from_fallback(patient_id, f"'{key}' is not a FHIR resource")
        reported = f"the CDS client reported an error for '{key}'"
        if value.get("resourceType") == "OperationOutcome":
            raise SourceUnavailable(_SOURCE, reported)
        try:
            bundle = parse_bundle(value)
        except InvalidFhirContent as error:
            logger.warning("prefetch '%s' unusable: %s", key, error.reason)
            return await self._from_fallback(patient_id, f"'{key}' is unusable ({error.reason})")
        resources = bundle_resources(bundle)
        if reports_error(resources):
            raise SourceUnavailable(_SOURCE, reported)
        if next_link(bundle) is not None:
            logger.warning("prefetch '%s' is paginated; only its first page is used", key)
        return tuple(lab_results(resources, patient_id=patient_id))


def patient_resource(records: BundleFolderRecords, patient_id: str) -> dict[str, Any] | None:
    """The Patient as a FHIR server answers ``Patient/<id>``.

    Returns:
        The Patient resource, or ``None`` for an unknown patient (the prefetch value then is
        ``null``).
    """
    return records.patient(patient_id)


def _effective_key(observation: Mapping[str, Any]) -> datetime:
    """When the Observation was made, for ``_sort=-date`` (undated ones sort last)."""
    period = observation.get("effectivePeriod")
    text = (
        observation.get("effectiveDateTime")
        or observation.get("effectiveInstant")
        or (period.get("start") if isinstance(period, dict) else None)
    )
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        return _UNDATED
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def laboratory_bundle(
    records: BundleFolderRecords, patient_id: str, *, base_url: str | None = None
) -> dict[str, Any]:
    """The searchset Bundle a FHIR server answers to
    ``Observation?patient=<id>&category=laboratory&_sort=-date``.

    Args:
        records: the folder the patient's bundle is in.
        patient_id: the patient.
        base_url: the simulated server's base URL; when given, entries get a ``fullUrl`` and the
            ``self`` link is absolute, as a real server's are.

    Returns:
        A ``searchset`` Bundle of the patient's Observations in category ``laboratory`` (all of
        them, whatever their value type, as the search returns them), newest first, each
        referring to its patient as ``Patient/<id>``; empty (``total`` 0) for an unknown
        patient. It is one page: nothing is paginated.

    Examples:
        >>> # bundle = laboratory_bundle(records, pid, base_url="http://localhost:8080/fhir")
        >>> # bundle["type"], bundle["total"], bundle["entry"][0]["search"]
        >>> # ('searchset', 34, {'mode': 'match'})
    """
    prefix = f"{base_url.rstrip('/')}/" if base_url else ""
    query = urlencode({"patient": patient_id, "category": "laboratory", "_sort": "-date"})
    observations = sorted(
        records.laboratory_observations(patient_id), key=_effective_key, reverse=True
    )
    entries: list[dict[str, Any]] = []
    for observation in observations:
        entry: dict[str, Any] = {"resource": observation, "search": {"mode": "match"}}
        if prefix:
            entry = {"fullUrl": f"{prefix}Observation/{observation['id']}", **entry}
        entries.append(entry)
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries),
        "link": [{"relation": "self", "url": f"{prefix}Observation?{query}"}],
        "entry": entries,
    }


def prefetch_content(
    records: BundleFolderRecords,
    patient_id: str,
    *,
    base_url: str | None = None,
    patient_key: str = "patient",
    labs_key: str = "labs",
) -> dict[str, Any]:
    """The ``prefetch`` object an EHR sends for the Patient read and the laboratory search.

    Returns:
        ``{patient_key: <Patient or None>, labs_key: <searchset Bundle or None>}``; a value is
        ``None`` (JSON ``null``) when there is no data for it, as the specification requires.
    """
    labs = laboratory_bundle(records, patient_id, base_url=base_url)
    return {
        patient_key: patient_resource(records, patient_id),
        labs_key: labs if labs["total"] else None,
    }
