"""FHIR JSON parsing and the Observation -> LabResult rules, with real fhir.resources models."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from adapters.fhir.observations import lab_result, lab_results, refers_to_patient
from adapters.fhir.parse import (
    InvalidFhirContent,
    bundle_resources,
    next_link,
    parse_bundle,
    parse_observation,
)
from core.errors import MedicalDataError

LAB = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                   "code": "laboratory"}]}  # fmt: skip


def observation(**overrides: Any) -> dict[str, Any]:
    """A complete laboratory Observation (haemoglobin) with the given elements replaced."""
    content: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "hb-1",
        "status": "final",
        "category": [LAB],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin"}],
            "text": "Hb",
        },
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2021-03-04T08:30:00+01:00",
        "valueQuantity": {"value": 9.4, "unit": "g/dL", "system": "http://unitsofmeasure.org",
                          "code": "g/dL"},
        "referenceRange": [{"low": {"value": 12.0, "unit": "g/dL"},
                            "high": {"value": 16.0, "unit": "g/dL"}}],
        "interpretation": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
            "code": "L"}]}],
    }  # fmt: skip
    content.update(overrides)
    return {k: v for k, v in content.items() if v is not None}


def test_a_complete_laboratory_observation_keeps_every_field() -> None:
    result = lab_result(parse_observation(observation()))
    assert result is not None
    assert (result.loinc, result.display, result.value, result.unit) == (
        "718-7",
        "Hemoglobin",
        9.4,
        "g/dL",
    )
    assert result.effective == datetime(2021, 3, 4, 7, 30, tzinfo=UTC)
    assert result.source == "Observation/hb-1"
    assert (result.reference_low, result.reference_high) == (12.0, 16.0)
    assert result.interpretation == "L"


def test_text_and_mapping_parse_alike() -> None:
    as_text = parse_observation(json.dumps(observation()))
    as_bytes = parse_observation(json.dumps(observation()).encode())
    assert (
        lab_result(as_text) == lab_result(as_bytes) == lab_result(parse_observation(observation()))
    )


@pytest.mark.parametrize(
    ("why", "overrides"),
    [
        ("vital sign", {"category": [{"coding": [{"code": "vital-signs"}]}]}),
        ("no category", {"category": None}),
        ("not LOINC", {"code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]}}),
        ("coded value", {"valueQuantity": None,
                         "valueCodeableConcept": {"text": "positive"}}),
        ("no value", {"valueQuantity": None}),
        ("a bound, not a value", {"valueQuantity": {"value": 0.01, "comparator": "<",
                                                    "code": "ng/mL"}}),
        ("withdrawn", {"status": "entered-in-error"}),
        ("cancelled", {"status": "cancelled"}),
        ("no id", {"id": None}),
    ],
)  # fmt: skip
def test_observations_that_are_not_usable_lab_results_are_skipped(
    why: str, overrides: dict[str, Any]
) -> None:
    assert lab_result(parse_observation(observation(**overrides))) is None, why


def test_amended_and_preliminary_results_are_kept() -> None:
    for status in ("amended", "corrected", "preliminary"):
        assert lab_result(parse_observation(observation(status=status))) is not None


def test_a_reference_bound_in_a_unit_that_does_not_convert_is_dropped() -> None:
    ranges = [{"low": {"value": 7.4, "unit": "mmol/mol"}, "high": {"value": 16.0}}]
    result = lab_result(parse_observation(observation(referenceRange=ranges)))
    assert result is not None
    assert (result.reference_low, result.reference_high) == (None, 16.0)


def test_a_reference_bound_in_another_convertible_unit_is_converted() -> None:
    ranges = [{"low": {"value": 120, "unit": "g/L"}, "high": {"value": 16.0}}]
    result = lab_result(parse_observation(observation(referenceRange=ranges)))
    assert result is not None
    assert (result.reference_low, result.reference_high) == (12.0, 16.0)


def test_unit_text_is_used_when_the_quantity_is_not_ucum() -> None:
    result = lab_result(parse_observation(observation(valueQuantity={"value": 5, "unit": "K/uL"})))
    assert result is not None
    assert result.unit == "K/uL"


@pytest.mark.parametrize(
    ("effective", "expected"),
    [
        ({"effectiveDateTime": "2019"}, datetime(2019, 1, 1)),
        ({"effectiveDateTime": "2019-07"}, datetime(2019, 7, 1)),
        ({"effectiveDateTime": "2019-07-15"}, datetime(2019, 7, 15)),
        ({"effectiveDateTime": None, "effectivePeriod": {"start": "2019-07-15T10:00:00Z"}},
         datetime(2019, 7, 15, 10, tzinfo=UTC)),
        ({"effectiveDateTime": None}, None),
    ],
)  # fmt: skip
def test_partial_and_period_effective_times(
    effective: dict[str, Any], expected: datetime | None
) -> None:
    result = lab_result(parse_observation(observation(**effective)))
    assert result is not None
    assert result.effective == expected


def test_results_about_another_patient_are_dropped() -> None:
    mine = parse_observation(observation(id="a"))
    absolute = parse_observation(
        observation(id="b", subject={"reference": "https://ehr.example/fhir/Patient/p1"})
    )
    theirs = parse_observation(observation(id="c", subject={"reference": "Patient/p2"}))
    nobody = parse_observation(observation(id="d", subject=None))
    results = lab_results([mine, absolute, theirs, nobody], patient_id="p1")
    assert [r.source for r in results] == ["Observation/a", "Observation/b"]


def test_patient_references() -> None:
    assert refers_to_patient("Patient/p1", "p1")
    assert refers_to_patient("http://x/fhir/Patient/p1/_history/3", "p1")
    assert not refers_to_patient("Patient/p10", "p1")
    assert not refers_to_patient("Group/p1", "p1")
    assert not refers_to_patient(None, "p1")


def test_a_searchset_bundle_gives_its_resources_and_next_link() -> None:
    bundle = parse_bundle(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [
                {"relation": "self", "url": "http://x/fhir/Observation?patient=p1"},
                {"relation": "next", "url": "http://x/fhir/Observation?page=2"},
            ],
            "entry": [
                {"resource": observation(id="a"), "search": {"mode": "match"}},
                {"resource": {"resourceType": "Patient", "id": "p1"},
                 "search": {"mode": "include"}},
                {"resource": {"resourceType": "OperationOutcome",
                              "issue": [{"severity": "warning", "code": "processing"}]},
                 "search": {"mode": "outcome"}},
            ],
        }
    )  # fmt: skip
    resources = bundle_resources(bundle)
    assert [r.get_resource_type() for r in resources] == [
        "Observation",
        "Patient",
        "OperationOutcome",
    ]
    assert next_link(bundle) == "http://x/fhir/Observation?page=2"
    assert [r.source for r in lab_results(resources, patient_id="p1")] == ["Observation/a"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"resourceType": "Bundle", ', "not valid JSON (line 1, column 28)"),
        (b"\xff\xfe\x00", "not UTF-8 text"),
        ("[1, 2]", "expected a JSON object, got a JSON list"),
        ({"resourceType": "Patient", "id": "x"}, "expected resourceType Bundle, got Patient"),
        ({"type": "searchset"}, "expected resourceType Bundle, got no resourceType"),
        (
            {"resourceType": "Bundle; DROP"},
            "expected resourceType Bundle, got an unknown resourceType",
        ),
    ],
)
def test_malformed_or_wrong_type_content_raises_the_typed_error(
    content: str | bytes | dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidFhirContent) as raised:
        parse_bundle(content)
    assert raised.value.reason == reason
    assert isinstance(raised.value, MedicalDataError)


def test_an_invalid_resource_inside_a_bundle_fails_the_bundle_without_echoing_values() -> None:
    bad = observation(valueQuantity={"value": "Jane Doe 1970-01-01"})
    content = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": bad}]}
    with pytest.raises(InvalidFhirContent) as raised:
        parse_bundle(content)
    reason = raised.value.reason
    assert reason.startswith("Bundle is not valid FHIR R4")
    assert "valueQuantity" in reason
    assert "Jane" not in str(raised.value)


def test_an_entry_of_an_unknown_resource_type_fails_the_bundle() -> None:
    content = {"resourceType": "Bundle", "type": "searchset",
               "entry": [{"resource": {"resourceType": "Nonsense", "id": "1"}}]}  # fmt: skip
    with pytest.raises(InvalidFhirContent, match="unknown type"):
        parse_bundle(content)


def test_an_observation_parser_refuses_another_resource() -> None:
    with pytest.raises(InvalidFhirContent, match="expected resourceType Observation, got Patient"):
        parse_observation({"resourceType": "Patient", "id": "p1"})
