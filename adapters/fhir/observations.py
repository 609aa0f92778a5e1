"""Laboratory Observations as :class:`core.types.LabResult`.

The domain compares patients by numeric laboratory values, so only Observations that can be
compared are kept: category ``laboratory``, coded in LOINC, with a numeric ``valueQuantity``,
attributable (they have an id) and not withdrawn. Everything else in a record (vital signs,
coded results, free text, components) is skipped rather than guessed at.

Choices a reader should know:

* Status: ``final``, ``amended``, ``corrected`` and ``preliminary`` results are kept;
  ``entered-in-error`` (withdrawn), ``cancelled``, ``registered`` and ``unknown`` are not.
* A value with a ``comparator`` (``<0.01``) is a bound, not a measurement: skipped.
* Unit: the UCUM ``code`` when the quantity says it is UCUM, otherwise its ``unit`` text.
* Reference range: the first range given; a bound in a different unit from the value is dropped.
* Only Observations whose ``subject`` is the patient asked about are returned: a search that
  ignored its ``patient`` parameter, or a prefetch with someone else's data, must not mix another
  patient's results into a recommendation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.quantity import Quantity

from core.types import LabResult

__all__ = [
    "LOINC",
    "OBSERVATION_CATEGORY",
    "UCUM",
    "is_laboratory",
    "lab_result",
    "lab_results",
    "refers_to_patient",
]

logger = logging.getLogger(__name__)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

_USABLE_STATUS = frozenset({"final", "amended", "corrected", "preliminary"})


def refers_to_patient(reference: str | None, patient_id: str) -> bool:
    """Whether a reference (relative, absolute or versioned) points at ``Patient/<patient_id>``.

    Examples:
        >>> refers_to_patient("https://ehr.example/fhir/Patient/7/_history/2", "7")
        True
        >>> refers_to_patient("Patient/17", "7")
        False
    """
    if not reference:
        return False
    path = reference.split("/_history/", 1)[0]
    target = f"Patient/{patient_id}"
    return path == target or path.endswith(f"/{target}")


def is_laboratory(observation: Observation) -> bool:
    """Whether the Observation is in the ``laboratory`` category (HL7 observation-category)."""
    for category in observation.category or ():
        for coding in category.coding or ():
            if coding.code == "laboratory" and coding.system in (None, OBSERVATION_CATEGORY):
                return True
    return False


def _number(value: Decimal | float | None) -> float | None:
    return None if value is None else float(value)


def _unit(quantity: Quantity) -> str:
    if quantity.system == UCUM and quantity.code:
        return str(quantity.code)
    return str(quantity.unit or quantity.code or "")


def _bound(bound: Quantity | None, unit: str) -> float | None:
    if bound is None or bound.value is None:
        return None
    if (bound.code or bound.unit) and _unit(bound) != unit:
        return None
    return _number(bound.value)


def _effective(observation: Observation) -> datetime | None:
    when: Any = (
        observation.effectiveDateTime
        or observation.effectiveInstant
        or (observation.effectivePeriod.start if observation.effectivePeriod else None)
    )
    if isinstance(when, datetime):
        return when
    if isinstance(when, date):
        return datetime(when.year, when.month, when.day)
    if isinstance(when, str):
        # fhir.resources keeps partial dates ("2018", "2018-10") as text: take their first day.
        parts = [int(part) for part in when.split("-")[:2]]
        return datetime(parts[0], parts[1] if len(parts) > 1 else 1, 1)
    return None


def _interpretation(observation: Observation) -> str | None:
    for concept in observation.interpretation or ():
        for coding in concept.coding or ():
            if coding.code:
                return str(coding.code)
    return None


def lab_result(observation: Observation) -> LabResult | None:
    """The Observation as a laboratory result, or ``None`` when it is not a usable one.

    Args:
        observation: a validated Observation (see :func:`adapters.fhir.parse.parse_observation`).

    Returns:
        The result, with ``source`` ``Observation/<id>``; ``None`` for anything that is not a
        laboratory, LOINC-coded, numeric, current result with an id (see the module docstring).

    Examples:
        >>> from adapters.fhir.parse import parse_observation
        >>> hb = parse_observation({
        ...     "resourceType": "Observation", "id": "hb1", "status": "final",
        ...     "category": [{"coding": [{"code": "laboratory"}]}],
        ...     "code": {"coding": [{"system": "http://loinc.org", "code": "718-7",
        ...                          "display": "Hemoglobin"}]},
        ...     "valueQuantity": {"value": 13.2, "system": "http://unitsofmeasure.org",
        ...                       "code": "g/dL"}})
        >>> r = lab_result(hb)
        >>> r.loinc, r.value, r.unit, r.source
        ('718-7', 13.2, 'g/dL', 'Observation/hb1')
    """
    if observation.id is None or observation.status not in _USABLE_STATUS:
        return None
    if not is_laboratory(observation):
        return None
    quantity = observation.valueQuantity
    if quantity is None or quantity.value is None or quantity.comparator is not None:
        return None
    loinc = next((c for c in observation.code.coding or () if c.system == LOINC and c.code), None)
    if loinc is None:
        return None
    unit = _unit(quantity)
    ranges = observation.referenceRange or ()
    first_range = ranges[0] if ranges else None
    return LabResult(
        loinc=str(loinc.code),
        display=str(loinc.display or observation.code.text or loinc.code),
        value=float(quantity.value),
        unit=unit,
        effective=_effective(observation),
        source=f"Observation/{observation.id}",
        reference_low=_bound(first_range.low, unit) if first_range else None,
        reference_high=_bound(first_range.high, unit) if first_range else None,
        interpretation=_interpretation(observation),
    )


def lab_results(resources: Iterable[Any], *, patient_id: str) -> list[LabResult]:
    """The laboratory results among ``resources`` that belong to ``patient_id``.

    Args:
        resources: validated resources of any type (the entries of a search, a prefetch, ...);
            only Observations are considered.
        patient_id: the FHIR id of the patient the results must be about.

    Returns:
        The usable results, in the order given.
    """
    results: list[LabResult] = []
    foreign = 0
    for resource in resources:
        if not isinstance(resource, Observation):
            continue
        subject = resource.subject.reference if resource.subject else None
        if not refers_to_patient(subject, patient_id):
            foreign += 1
            continue
        result = lab_result(resource)
        if result is not None:
            results.append(result)
    if foreign:
        logger.warning("dropped %d Observation(s) about another or no patient", foreign)
    return results
