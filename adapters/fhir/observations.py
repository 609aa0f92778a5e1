"""Laboratory Observations as :class:`core.types.LabResult`.

The domain compares patients by numeric laboratory values, so only Observations that can be
compared are kept: category ``laboratory``, coded in LOINC, with a numeric ``valueQuantity``,
attributable (they have an id) and not withdrawn. Everything else in a record (vital signs,
coded results, free text, components) is skipped rather than guessed at.

Choices a reader should know:

* Status: ``final``, ``amended``, ``corrected`` and ``preliminary`` results are kept;
  ``entered-in-error`` (withdrawn), ``cancelled``, ``registered`` and ``unknown`` are not.
* A value with a ``comparator`` (``<0.01``) is a bound, not a measurement: skipped.
* Unit: the UCUM ``code`` when the quantity says it is UCUM, otherwise its ``unit`` text; a
  value with neither is skipped (a number without a unit cannot be compared). Tests of the lab
  panel are then converted to the panel's unit (:mod:`adapters.fhir.units`).
* Reference range: the first range given; a bound in a unit that cannot be brought to the
  result's unit is dropped.
* Every skipped Observation is counted under its reason (:func:`read_lab_results`), and the
  counts are logged; reasons name no patient and no value.
* Only Observations whose ``subject`` is the patient asked about are returned: a search that
  ignored its ``patient`` parameter, or a prefetch with someone else's data, must not mix another
  patient's results into a recommendation.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.quantity import Quantity

from adapters.fhir.units import to_panel_unit
from core.types import LabResult

__all__ = [
    "LOINC",
    "OBSERVATION_CATEGORY",
    "UCUM",
    "LabReading",
    "is_laboratory",
    "lab_result",
    "lab_results",
    "read_lab_results",
    "refers_to_patient",
    "skip_reason",
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


def _bound_unit(bound: Quantity | None, unit: str) -> str:
    """The unit of a reference bound; one that names none is taken to share the value's."""
    if bound is None or not (bound.code or bound.unit):
        return unit
    return _unit(bound)


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


def skip_reason(observation: Observation) -> str | None:
    """Why the Observation is not a usable laboratory result, or ``None`` when it is one.

    Returns:
        ``"no id"``, ``"status <status>"``, ``"not laboratory"``, ``"no numeric value"``,
        ``"a bound, not a value"``, ``"no unit"`` or ``"not LOINC-coded"``: words that are safe
        to log (no identifiers, no values).
    """
    if observation.id is None:
        return "no id"
    if observation.status not in _USABLE_STATUS:
        return f"status {observation.status}"
    if not is_laboratory(observation):
        return "not laboratory"
    quantity = observation.valueQuantity
    if quantity is None or quantity.value is None:
        return "no numeric value"
    if quantity.comparator is not None:
        return "a bound, not a value"
    if not _unit(quantity):
        return "no unit"
    if not any(c.system == LOINC and c.code for c in observation.code.coding or ()):
        return "not LOINC-coded"
    return None


def lab_result(observation: Observation) -> LabResult | None:
    """The Observation as a laboratory result, or ``None`` when it is not a usable one.

    Args:
        observation: a validated Observation (see :func:`adapters.fhir.parse.parse_observation`).

    Returns:
        The result, with ``source`` ``Observation/<id>``, in the lab panel's unit when its test
        is in the panel and its unit converts; ``None`` for anything that is not a laboratory,
        LOINC-coded, numeric, current result with a unit and an id (:func:`skip_reason` says
        why).

    Examples:
        >>> from adapters.fhir.parse import parse_observation
        >>> hb = parse_observation({
        ...     "resourceType": "Observation", "id": "hb1", "status": "final",
        ...     "category": [{"coding": [{"code": "laboratory"}]}],
        ...     "code": {"coding": [{"system": "http://loinc.org", "code": "718-7",
        ...                          "display": "Hemoglobin"}]},
        ...     "valueQuantity": {"value": 132, "system": "http://unitsofmeasure.org",
        ...                       "code": "g/L"}})
        >>> r = lab_result(hb)
        >>> r.loinc, r.value, r.unit, r.source
        ('718-7', 13.2, 'g/dL', 'Observation/hb1')
    """
    if skip_reason(observation) is not None:
        return None
    quantity = observation.valueQuantity
    assert quantity is not None
    assert quantity.value is not None
    loinc = next(c for c in observation.code.coding or () if c.system == LOINC and c.code)
    unit = _unit(quantity)
    ranges = observation.referenceRange or ()
    low = ranges[0].low if ranges else None
    high = ranges[0].high if ranges else None
    recorded = LabResult(
        loinc=str(loinc.code),
        display=str(loinc.display or observation.code.text or loinc.code),
        value=float(quantity.value),
        unit=unit,
        effective=_effective(observation),
        source=f"Observation/{observation.id}",
        reference_low=_number(low.value) if low else None,
        reference_high=_number(high.value) if high else None,
        interpretation=_interpretation(observation),
    )
    return to_panel_unit(recorded, bound_units=(_bound_unit(low, unit), _bound_unit(high, unit)))


@dataclass(slots=True)
class LabReading:
    """The laboratory results read from some resources, and what was skipped.

    Args:
        results: the usable results, in the order given.
        skipped: how many Observations were skipped, by reason (see :func:`skip_reason`;
            ``"another patient"`` for those about someone else).
    """

    results: list[LabResult] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def read_lab_results(resources: Iterable[Any], *, patient_id: str) -> LabReading:
    """The laboratory results among ``resources`` that belong to ``patient_id``, with the
    reasons the other Observations were skipped.

    Args:
        resources: validated resources of any type (the entries of a search, a prefetch, ...);
            only Observations are considered.
        patient_id: the FHIR id of the patient the results must be about.

    Examples:
        >>> from adapters.fhir.parse import parse_observation
        >>> bare = parse_observation({"resourceType": "Observation", "id": "o1",
        ...     "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/p"},
        ...     "category": [{"coding": [{"code": "laboratory"}]}]})
        >>> read_lab_results([bare], patient_id="p").skipped
        Counter({'no numeric value': 1})
    """
    reading = LabReading()
    for resource in resources:
        if not isinstance(resource, Observation):
            continue
        subject = resource.subject.reference if resource.subject else None
        if not refers_to_patient(subject, patient_id):
            reading.skipped["another patient"] += 1
            continue
        reason = skip_reason(resource)
        if reason is not None:
            reading.skipped[reason] += 1
            continue
        result = lab_result(resource)
        assert result is not None
        reading.results.append(result)
    return reading


def lab_results(resources: Iterable[Any], *, patient_id: str) -> list[LabResult]:
    """The laboratory results among ``resources`` that belong to ``patient_id``.

    Skipped Observations are logged, counted by reason (``skipped 2 Observation(s): no unit 1,
    another patient 1``); see :func:`read_lab_results` for the counts themselves.

    Args:
        resources: validated resources of any type (the entries of a search, a prefetch, ...);
            only Observations are considered.
        patient_id: the FHIR id of the patient the results must be about.

    Returns:
        The usable results, in the order given.
    """
    reading = read_lab_results(resources, patient_id=patient_id)
    if reading.skipped["another patient"]:
        logger.warning(
            "dropped %d Observation(s) about another or no patient",
            reading.skipped["another patient"],
        )
    if reading.skipped:
        logger.info(
            "skipped %d Observation(s): %s",
            reading.skipped.total(),
            ", ".join(f"{reason} {count}" for reason, count in reading.skipped.most_common()),
        )
    return reading.results
