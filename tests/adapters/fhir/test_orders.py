"""Picking the draft chest X-ray and chest CT orders out of an order hook's ``draftOrders``."""

import logging

import pytest

from adapters.fhir.observations import LOINC
from adapters.fhir.orders import CPT, SNOMED, chest_imaging_orders
from adapters.fhir.parse import InvalidFhirContent
from core.types import ImagingOrder

PATIENT = "p-1"


def request(rid="sr-1", *, code=None, status="draft", patient=PATIENT, **extra):
    resource = {
        "resourceType": "ServiceRequest",
        "id": rid,
        "status": status,
        "intent": "order",
        "subject": {"reference": f"Patient/{patient}"},
        "code": code or {"coding": [{"system": LOINC, "code": "36643-5"}]},
    }
    resource.update(extra)
    return resource


def bundle(*resources, full_urls=()):
    entries = [{"resource": r} for r in resources]
    for entry, url in zip(entries, full_urls, strict=False):
        entry["fullUrl"] = url
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def read(*resources, selections=None, full_urls=()):
    return chest_imaging_orders(
        bundle(*resources, full_urls=full_urls), patient_id=PATIENT, selections=selections
    )


@pytest.mark.parametrize(
    ("code", "modality"),
    [
        ({"coding": [{"system": LOINC, "code": "36643-5"}]}, "XR"),
        ({"coding": [{"system": LOINC, "code": "24627-2"}]}, "CT"),
        ({"coding": [{"system": SNOMED, "code": "399208008"}]}, "XR"),
        ({"coding": [{"system": SNOMED, "code": "169069000"}]}, "CT"),
        ({"coding": [{"system": CPT, "code": "71046"}]}, "XR"),
        ({"coding": [{"system": CPT, "code": "71260"}]}, "CT"),
        ({"text": "Chest X-ray PA and lateral"}, "XR"),
        ({"text": "CXR portable"}, "XR"),
        ({"text": "CT thorax with contrast"}, "CT"),
        ({"text": "X-ray computed tomography of chest"}, "CT"),
        (
            {"coding": [{"system": "urn:local", "code": "R1", "display": "Radiograph of chest"}]},
            "XR",
        ),
    ],
)
def test_chest_imaging_codes_and_names(code, modality):
    (order,) = read(request(code=code)).orders
    assert order == ImagingOrder("ServiceRequest/sr-1", modality, None)


@pytest.mark.parametrize(
    "code",
    [
        {"coding": [{"system": LOINC, "code": "37637-6"}]},  # XR knee: a recognised code decides
        {"text": "XR Knee 2 views"},
        {"text": "CT head without contrast"},
        {"text": "Chest pain clinic referral"},  # chest, but no imaging
    ],
)
def test_other_orders_are_not_chest_imaging(code):
    assert read(request(code=code)).orders == ()


def test_a_recognised_code_wins_over_the_text():
    code = {"coding": [{"system": CPT, "code": "71250"}], "text": "chest x-ray"}
    assert read(request(code=code)).orders[0].modality == "CT"


def test_only_draft_orders_to_perform_count():
    found = read(
        request("a", status="active"),
        request("b", doNotPerform=True),
        request("c"),
        {"resourceType": "MedicationRequest", "id": "m", "status": "draft"},
    )
    assert [o.order_ref for o in found.orders] == ["ServiceRequest/c"]
    assert found.skipped == ()


def test_selections_choose_the_orders_read():
    found = read(request("a"), request("b"), selections=["ServiceRequest/b"])
    assert [o.order_ref for o in found.orders] == ["ServiceRequest/b"]
    assert read(request("a"), selections=["ServiceRequest/zz"]).orders == ()


def test_an_order_for_another_patient_is_skipped_and_said(caplog):
    with caplog.at_level(logging.WARNING):
        found = read(request("a", patient="someone-else"), request("b"))
    assert [o.order_ref for o in found.orders] == ["ServiceRequest/b"]
    assert found.skipped == ("draft order 1 not used: it is not for this patient",)
    assert "someone-else" not in caplog.text


def test_reason_codes_texts_then_displays():
    reasons = [
        {"text": "Cough and fever"},
        {"coding": [{"system": SNOMED, "code": "233604007", "display": "Pneumonia"}]},
        {"text": "cough and fever"},  # the same words again: kept once per order
        {"coding": [{"system": SNOMED, "code": "1"}]},  # nothing to say in words
    ]
    (order,) = read(request(reasonCode=reasons)).orders
    assert order.reason == "Cough and fever; Pneumonia; cough and fever"


def test_reason_references_to_conditions():
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": f"Patient/{PATIENT}"},
        "code": {"text": "Suspected pneumonia"},
    }
    contained = {**condition, "id": "inner", "code": {"text": "Haemoptysis"}}
    by_url = request("a", reasonReference=[{"reference": "urn:uuid:1234"}])
    by_id = request("b", reasonReference=[{"reference": "Condition/c1"}])
    by_contained = request("c", contained=[contained], reasonReference=[{"reference": "#inner"}])
    by_display = request("d", reasonReference=[{"reference": "Condition/x", "display": "Dyspnoea"}])
    found = read(
        by_url,
        by_id,
        by_contained,
        by_display,
        condition,
        full_urls=["", "", "", "", "urn:uuid:1234"],
    )
    assert [o.reason for o in found.orders] == [
        "Suspected pneumonia",
        "Suspected pneumonia",
        "Haemoptysis",
        "Dyspnoea",
    ]


def test_a_malformed_draft_order_is_skipped_without_its_values():
    bad = request("a", authoredOn="Jane Roe's birthday", code={"text": "CXR"})
    found = read(bad, request("b"))
    assert [o.order_ref for o in found.orders] == ["ServiceRequest/b"]
    (reason,) = found.skipped
    assert reason.startswith("draft order 1 not read:")
    assert "authoredOn" in reason
    assert "Jane Roe" not in reason


def test_not_a_bundle_is_invalid():
    with pytest.raises(InvalidFhirContent, match="Bundle"):
        chest_imaging_orders({"resourceType": "Patient"}, patient_id=PATIENT)
    with pytest.raises(InvalidFhirContent, match="entry"):
        chest_imaging_orders({"resourceType": "Bundle", "entry": {}}, patient_id=PATIENT)
