"""Reading FHIR R4 JSON into validated ``fhir.resources`` models.

Every FHIR source of the service (a FHIR server, a CDS Hooks prefetch, a folder of bundles) hands
over JSON that may be malformed, of the wrong resource type, or not conform to FHIR. This module
is the one place where that JSON is checked, with ``fhir.resources.R4B`` (FHIR 4.3, which reads
R4 content; the package's default models are R5), and where a failure becomes
:class:`InvalidFhirContent`, whose reason is safe to log: it names resource types and element
paths, never values.

``InvalidFhirContent`` is a :class:`core.errors.MedicalDataError` and not a
:class:`core.errors.SourceUnavailable`, because parsing does not know which source sent the
content. The ``ClinicalRecords`` adapters translate it into ``SourceUnavailable`` naming their
source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import pydantic
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.resource import Resource
from fhir.resources.R4B.servicerequest import ServiceRequest

from core.errors import MedicalDataError

__all__ = [
    "InvalidFhirContent",
    "bundle_resources",
    "next_link",
    "parse_bundle",
    "parse_condition",
    "parse_diagnostic_report",
    "parse_imaging_study",
    "parse_observation",
    "parse_patient",
    "parse_service_request",
    "reports_error",
    "resource_type_of",
]

FhirContent = str | bytes | Mapping[str, Any]
"""FHIR JSON as text, or already decoded into a mapping."""

_Model = TypeVar("_Model", bound=Resource)

# FHIR resource type names are letters only; anything else is not echoed back in a reason.
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")


class InvalidFhirContent(MedicalDataError):
    """FHIR JSON that is not JSON, not the expected resource type, or not valid FHIR R4.

    Args:
        reason: what is wrong, naming resource types and element paths but no values, so that it
            is safe to log.

    Examples:
        >>> str(InvalidFhirContent("not valid JSON"))
        'invalid FHIR content: not valid JSON'
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid FHIR content: {reason}")
        self.reason = reason


def resource_type_of(content: Mapping[str, Any]) -> str:
    """The ``resourceType`` of decoded FHIR JSON, in words safe to log.

    Returns:
        The resource type name, ``"no resourceType"`` when it is missing, or
        ``"an unknown resourceType"`` when it is not a FHIR type name.
    """
    value = content.get("resourceType")
    if value is None:
        return "no resourceType"
    if isinstance(value, str) and _RESOURCE_TYPE.fullmatch(value):
        return value
    return "an unknown resourceType"


def _decode(content: FhirContent) -> Mapping[str, Any]:
    if isinstance(content, Mapping):
        return content
    try:
        decoded = json.loads(content)
    except json.JSONDecodeError as error:
        # The position says where, without echoing the content.
        raise InvalidFhirContent(
            f"not valid JSON (line {error.lineno}, column {error.colno})"
        ) from error
    except UnicodeDecodeError as error:
        raise InvalidFhirContent("not UTF-8 text") from error
    if not isinstance(decoded, dict):
        raise InvalidFhirContent(f"expected a JSON object, got a JSON {type(decoded).__name__}")
    return decoded


def _validation_reason(resource_type: str, error: pydantic.ValidationError) -> str:
    details = error.errors(include_input=False, include_url=False, include_context=False)
    first = details[0]
    where = ".".join(str(part) for part in first["loc"]) or "the resource"
    return (
        f"{resource_type} is not valid FHIR R4 ({len(details)} error(s); first at {where}: "
        f"{first['type']})"
    )


def _parse(content: FhirContent, model: type[_Model]) -> _Model:
    decoded = _decode(content)
    expected = model.get_resource_type()
    found = resource_type_of(decoded)
    if found != expected:
        raise InvalidFhirContent(f"expected resourceType {expected}, got {found}")
    try:
        return model.model_validate(decoded)
    except pydantic.ValidationError as error:
        raise InvalidFhirContent(_validation_reason(expected, error)) from error
    except KeyError as error:
        # fhir.resources raises KeyError for a contained resource of an unknown type.
        raise InvalidFhirContent(
            f"the {expected} contains a resource of an unknown type"
        ) from error


def parse_observation(content: FhirContent) -> Observation:
    """Validate one Observation.

    Args:
        content: the Observation as JSON text or a decoded mapping.

    Returns:
        The validated Observation.

    Raises:
        InvalidFhirContent: the content is not JSON, not an Observation, or not valid FHIR.
    """
    return _parse(content, Observation)


def parse_service_request(content: FhirContent) -> ServiceRequest:
    """Validate one ServiceRequest (a draft order of a CDS Hooks order hook).

    Raises:
        InvalidFhirContent: the content is not JSON, not a ServiceRequest, or not valid FHIR.
    """
    return _parse(content, ServiceRequest)


def parse_condition(content: FhirContent) -> Condition:
    """Validate one Condition (the reason an order refers to).

    Raises:
        InvalidFhirContent: the content is not JSON, not a Condition, or not valid FHIR.
    """
    return _parse(content, Condition)


def parse_patient(content: FhirContent) -> Patient:
    """Validate one Patient.

    Raises:
        InvalidFhirContent: the content is not JSON, not a Patient, or not valid FHIR.
    """
    return _parse(content, Patient)


def parse_imaging_study(content: FhirContent) -> ImagingStudy:
    """Validate one ImagingStudy.

    Raises:
        InvalidFhirContent: the content is not JSON, not an ImagingStudy, or not valid FHIR.
    """
    return _parse(content, ImagingStudy)


def parse_diagnostic_report(content: FhirContent) -> DiagnosticReport:
    """Validate one DiagnosticReport.

    Raises:
        InvalidFhirContent: the content is not JSON, not a DiagnosticReport, or not valid FHIR.
    """
    return _parse(content, DiagnosticReport)


def parse_bundle(content: FhirContent) -> Bundle:
    """Validate a Bundle and every resource in it.

    Args:
        content: the Bundle (a searchset, a transaction, ...) as JSON text or a decoded mapping.

    Returns:
        The validated Bundle.

    Raises:
        InvalidFhirContent: the content is not JSON, not a Bundle, or it or one of its resources
            is not valid FHIR.

    Examples:
        >>> bundle = parse_bundle('{"resourceType": "Bundle", "type": "searchset"}')
        >>> bundle_resources(bundle), next_link(bundle)
        ([], None)
    """
    return _parse(content, Bundle)


def bundle_resources(bundle: Bundle) -> list[Resource]:
    """The resources of a Bundle's entries, in order (entries without a resource are left out)."""
    return [entry.resource for entry in bundle.entry or () if entry.resource is not None]


def next_link(bundle: Bundle) -> str | None:
    """The URL of the Bundle's ``next`` link (the following page of a search), if any."""
    for link in bundle.link or ():
        if link.relation == "next" and link.url:
            return str(link.url)
    return None


def reports_error(resources: Iterable[Resource]) -> bool:
    """Whether an OperationOutcome among ``resources`` has an ``error`` or ``fatal`` issue (a
    search that partly failed says so in its Bundle; warnings and information do not count)."""
    return any(
        issue.severity in ("error", "fatal")
        for resource in resources
        if isinstance(resource, OperationOutcome)
        for issue in resource.issue or ()
    )
