"""The chest imaging orders among the draft orders of ``order-select`` and ``order-sign`` calls.

``context.draftOrders`` is a FHIR Bundle of whatever the clinician is ordering: medications,
nutrition, lab tests, imaging. The service has something to say only about chest radiographs
and chest CTs, so :func:`chest_imaging_orders` picks those out and reads the reason each gives.

Which orders count:

* a ``ServiceRequest`` whose ``status`` is ``draft`` (anything else is not being ordered now),
  that is not ``doNotPerform``, and whose ``subject`` is the patient in context (an order for
  someone else must not shape this patient's advice);
* for ``order-select``, only the orders named in ``selections``, by ``ServiceRequest/<id>``;
  a selection that names nothing in the Bundle selects nothing;
* coded as a chest X-ray or chest CT in LOINC, SNOMED CT or CPT (the tables below), or, as a last
  resort when no coding is recognised, named so in ``code.text`` or a coding's ``display``
  ("chest" or "thorax" together with "X-ray", "radiograph", "XR" or "CT"; "CXR" alone).

The reason is the order's ``reasonCode`` (each concept's text, else its codings' displays) and
its ``reasonReference``: a Condition contained in the order (``#id``) or an entry of the Bundle
(by ``fullUrl`` or ``Condition/<id>``) gives its ``code`` text or displays; any other target, or
one not found, gives the reference's ``display`` if it has one.

Malformed content never fails the call here. The Bundle's shape (a Bundle whose entries are
objects) is checked when the call is validated, and a call that fails it is answered 400
(:mod:`cds_hooks.requests`). Within it, only draft ServiceRequests are validated as FHIR R4, with
:mod:`adapters.fhir.parse`; one that is not valid is skipped and the reason recorded in
:attr:`core.types.ImagingOrders.skipped` (entry position and element path, never values), so a
malformed medication order the service does not read cannot stop advice on a chest X-ray.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.servicerequest import ServiceRequest

from adapters.fhir.observations import LOINC, refers_to_patient
from adapters.fhir.parse import (
    InvalidFhirContent,
    parse_condition,
    parse_service_request,
    resource_type_of,
)
from core.types import ImagingOrder, ImagingOrders, OrderModality

__all__ = ["CHEST_IMAGING_CODES", "CPT", "SNOMED", "chest_imaging_orders", "chest_modality"]

logger = logging.getLogger(__name__)

SNOMED = "http://snomed.info/sct"
CPT = "http://www.ama-assn.org/go/cpt"

# LOINC names as LOINC gives them, checked against the LOINC radiology list in Microsoft's Azure
# AI Health Insights documentation (Radiology Insights, procedure inference, appendix A); 36643-5
# and 36554-4 also appear in IHE's Imaging Diagnostic Report guide, 24627-2 in the FHIR R4
# ServiceRequest example "di".
_LOINC: dict[str, OrderModality] = {
    "36643-5": "XR",  # XR Chest 2 Views
    "36554-4": "XR",  # XR Chest Single view
    "36572-6": "XR",  # XR Chest AP
    "36687-2": "XR",  # XR Chest AP and Lateral
    "30745-4": "XR",  # XR Chest Views
    "30746-2": "XR",  # Portable XR Chest Views
    "24648-8": "XR",  # XR Chest PA upright
    "24647-0": "XR",  # XR Chest PA and Lateral upright
    "24642-1": "XR",  # XR Chest AP and PA upright
    "24632-2": "XR",  # Portable XR Chest Views AP
    "24627-2": "CT",  # CT Chest
    "24628-0": "CT",  # CT Chest W contrast IV
    "29252-4": "CT",  # CT Chest WO contrast
    "30598-7": "CT",  # CT Chest WO and W contrast IV
}
# SNOMED CT procedures: 169069000 is the FHIR R4 example Condition f002's "CT of thorax".
_SNOMED: dict[str, OrderModality] = {
    "399208008": "XR",  # Plain X-ray of chest
    "168731009": "XR",  # Standard chest X-ray
    "169069000": "CT",  # Computed tomography of chest
}
# CPT (AMA): radiologic examination of the chest by number of views (71045-71048, since 2018),
# CT of the thorax without, with, and without then with contrast.
_CPT: dict[str, OrderModality] = {
    "71045": "XR",
    "71046": "XR",
    "71047": "XR",
    "71048": "XR",
    "71250": "CT",
    "71260": "CT",
    "71270": "CT",
}
CHEST_IMAGING_CODES: Mapping[tuple[str, str], OrderModality] = {
    (system, code): modality
    for system, table in ((LOINC, _LOINC), (SNOMED, _SNOMED), (CPT, _CPT))
    for code, modality in table.items()
}
"""``(system, code) -> modality`` of the codes read as a chest X-ray or chest CT order."""

_CHEST = re.compile(r"\b(chest|thorax)\b", re.IGNORECASE)
_CT = re.compile(r"\b(ct|computed tomography|cat scan)\b", re.IGNORECASE)
_XR = re.compile(r"\b(x-?ray|x ray|xr|radiograph|radiography)\b", re.IGNORECASE)
_CXR = re.compile(r"\bcxr\b", re.IGNORECASE)


def _text_modality(texts: Iterable[str]) -> OrderModality | None:
    for text in texts:
        if _CXR.search(text):
            return "XR"
        if not _CHEST.search(text):
            continue
        # CT before X-ray: "X-ray computed tomography of chest" is a CT.
        if _CT.search(text):
            return "CT"
        if _XR.search(text):
            return "XR"
    return None


def chest_modality(code: CodeableConcept | None) -> OrderModality | None:
    """Whether an order's code is a chest X-ray (``"XR"``) or chest CT (``"CT"``), else ``None``.

    A recognised coding decides; only when none is recognised are ``code.text`` and the
    codings' displays read.

    Examples:
        >>> chest_modality(CodeableConcept(coding=[{"system": CPT, "code": "71046"}]))
        'XR'
        >>> chest_modality(CodeableConcept(text="CT thorax with contrast"))
        'CT'
        >>> chest_modality(CodeableConcept(text="XR Knee 2 views")) is None
        True
    """
    if code is None:
        return None
    codings = code.coding or ()
    for coding in codings:
        modality = CHEST_IMAGING_CODES.get((str(coding.system), str(coding.code)))
        if modality is not None:
            return modality
    texts = [code.text, *(coding.display for coding in codings)]
    return _text_modality(str(text) for text in texts if text)


def _concept_text(concept: CodeableConcept | None) -> str | None:
    if concept is None:
        return None
    if concept.text and concept.text.strip():
        return str(concept.text).strip()
    displays = dict.fromkeys(str(c.display).strip() for c in concept.coding or () if c.display)
    return ", ".join(d for d in displays if d) or None


def _points_to(reference: str, resource: Mapping[str, Any], full_url: str | None) -> bool:
    """Whether ``reference`` (relative, absolute, versioned or a ``urn:``) names ``resource``."""
    if full_url is not None and reference == full_url:
        return True
    kind, rid = resource.get("resourceType"), resource.get("id")
    if not isinstance(kind, str) or not isinstance(rid, str):
        return False
    path = reference.split("/_history/", 1)[0]
    return path == f"{kind}/{rid}" or path.endswith(f"/{kind}/{rid}")


class _Bundle:
    """The draft orders' entries, and the Conditions orders refer to, read when needed."""

    def __init__(self, entries: Sequence[Mapping[str, Any]]) -> None:
        self._entries = [
            (entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None, resource)
            for entry in entries
            if isinstance(resource := entry.get("resource"), Mapping)
        ]

    def condition(self, reference: str) -> Condition | None:
        for full_url, resource in self._entries:
            if resource.get("resourceType") == "Condition" and _points_to(
                reference, resource, full_url
            ):
                try:
                    return parse_condition(resource)
                except InvalidFhirContent:
                    return None
        return None


def _reference_text(reference: Reference, request: ServiceRequest, bundle: _Bundle) -> str | None:
    target = reference.reference
    condition: Condition | None = None
    if target and target.startswith("#"):
        condition = next(
            (c for c in request.contained or () if isinstance(c, Condition) and c.id == target[1:]),
            None,
        )
    elif target:
        condition = bundle.condition(target)
    text = _concept_text(condition.code) if condition is not None else None
    return text or (str(reference.display).strip() if reference.display else None)


def _reason(request: ServiceRequest, bundle: _Bundle) -> str | None:
    reasons = [_concept_text(concept) for concept in request.reasonCode or ()]
    reasons += [_reference_text(ref, request, bundle) for ref in request.reasonReference or ()]
    distinct = dict.fromkeys(r for r in reasons if r)
    return "; ".join(distinct) or None


def _selected(resource: Mapping[str, Any], selections: frozenset[str] | None) -> bool:
    if selections is None:
        return True
    rid = resource.get("id")
    return isinstance(rid, str) and f"ServiceRequest/{rid}" in selections


def chest_imaging_orders(
    draft_orders: Mapping[str, Any],
    *,
    patient_id: str,
    selections: Sequence[str] | None = None,
) -> ImagingOrders:
    """The draft chest X-ray and chest CT orders of a call, with their reasons.

    Args:
        draft_orders: ``context.draftOrders``, a FHIR Bundle as decoded JSON.
        patient_id: the FHIR id of the patient in context.
        selections: ``context.selections`` for ``order-select`` (only those orders are read);
            ``None`` for ``order-sign`` (all are).

    Returns:
        The chest imaging orders in Bundle order, and why any draft ServiceRequest was not read.

    Raises:
        InvalidFhirContent: ``draft_orders`` is not a Bundle or its ``entry`` is not a list (the
            CDS Hooks layer has answered such a call 400 before it gets here).

    Examples:
        >>> found = chest_imaging_orders({"resourceType": "Bundle", "entry": [{"resource": {
        ...     "resourceType": "ServiceRequest", "id": "1", "status": "draft",
        ...     "intent": "order", "subject": {"reference": "Patient/p"},
        ...     "code": {"text": "Chest X-ray PA and lateral"},
        ...     "reasonCode": [{"text": "Cough and fever"}]}}]}, patient_id="p")
        >>> found.orders
        (ImagingOrder(order_ref='ServiceRequest/1', modality='XR', reason='Cough and fever'),)
    """
    if draft_orders.get("resourceType") != "Bundle":
        raise InvalidFhirContent(
            f"expected resourceType Bundle, got {resource_type_of(draft_orders)}"
        )
    entries = draft_orders.get("entry", [])
    if not isinstance(entries, list):
        raise InvalidFhirContent("Bundle.entry is not a list")
    entries = [entry for entry in entries if isinstance(entry, Mapping)]
    bundle = _Bundle(entries)
    chosen = None if selections is None else frozenset(selections)
    orders: list[ImagingOrder] = []
    skipped: list[str] = []
    for position, entry in enumerate(entries, start=1):
        resource = entry.get("resource")
        if not isinstance(resource, Mapping) or resource.get("resourceType") != "ServiceRequest":
            continue
        if resource.get("status") != "draft" or not _selected(resource, chosen):
            continue
        try:
            request = parse_service_request(resource)
        except InvalidFhirContent as error:
            skipped.append(f"draft order {position} not read: {error.reason}")
            continue
        if request.doNotPerform:
            continue
        modality = chest_modality(request.code)
        if modality is None:
            continue
        if not refers_to_patient(request.subject.reference, patient_id):
            skipped.append(f"draft order {position} not used: it is not for this patient")
            continue
        orders.append(
            ImagingOrder(
                order_ref=f"ServiceRequest/{request.id}" if request.id else None,
                modality=modality,
                reason=_reason(request, bundle),
            )
        )
    if skipped:
        logger.warning("%d draft order(s) not used: %s", len(skipped), "; ".join(skipped))
    return ImagingOrders(orders=tuple(orders), skipped=tuple(skipped))
