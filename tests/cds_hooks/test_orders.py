"""The order hooks over HTTP: cards for draft chest X-ray and CT orders (searched by their reason),
no card (and no FHIR request) for anything else, strict contexts.

Retrieval runs on the in-memory doubles of tests/core (see tests/cds_hooks/test_app.py); the
draft orders are read by the real FHIR adapter. tests/e2e calls order-sign on the real stack.
"""

import uuid

import pytest

from adapters.fhir.orders import chest_imaging_orders
from cds_hooks.services import PATIENT_VIEW, order_select_service, order_sign_service
from tests.cds_hooks.keys import Signer
from tests.cds_hooks.test_app import LABS, PATIENT, RecordingFhir, auth, build, serve

SERVICES = (
    PATIENT_VIEW,
    order_select_service(chest_imaging_orders),
    order_sign_service(chest_imaging_orders),
)
SIGN = "/cds-services/medirag-order-sign"
SELECT = "/cds-services/medirag-order-select"
CHEST_XR = {"coding": [{"system": "http://loinc.org", "code": "36643-5"}]}
KNEE_XR = {"text": "XR Knee 2 views"}


def order(rid, code, reason=None):
    resource = {
        "resourceType": "ServiceRequest",
        "id": rid,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{PATIENT}"},
        "code": code,
    }
    if reason:
        resource["reasonCode"] = [{"text": reason}]
    return resource


def draft(*resources):
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in resources],
    }


def order_call(hook, orders, *, selections=None, prefetch=True):
    context = {"userId": "Practitioner/1", "patientId": PATIENT, "draftOrders": orders}
    if selections is not None:
        context["selections"] = selections
    body = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if prefetch:
        body["prefetch"] = {"labs": LABS}
    return body


@pytest.fixture(scope="module")
def signer():
    return Signer("ES384")


def post(signer, path, body, fhir=None):
    fhir = fhir or RecordingFhir()
    app, _ = build(signer, services=SERVICES, fhir=fhir, default_fhir=fhir)
    with serve(app) as client:
        return client.post(path, json=body, headers=auth(signer, path))


def test_discovery_lists_the_three_hooks(signer):
    app, _ = build(signer, services=SERVICES)
    with serve(app) as client:
        services = client.get("/cds-services", headers=auth(signer, "/cds-services")).json()
    hooks = {s["id"]: s["hook"] for s in services["services"]}
    assert hooks == {
        "medirag-patient-view": "patient-view",
        "medirag-order-select": "order-select",
        "medirag-order-sign": "order-sign",
    }
    for service in services["services"]:
        assert {"title", "description", "prefetch", "usageRequirements"} <= set(service)


def test_order_sign_for_a_chest_xray_answers_cards_searched_by_its_reason(signer):
    body = order_call("order-sign", draft(order("sr-1", CHEST_XR, "Pleural effusion")))
    response = post(signer, SIGN, body)
    assert response.status_code == 200
    cards = response.json()["cards"]
    cases = next(c for c in cards if "case" in c["summary"].lower())
    assert "Reason rank" in cases["detail"]
    assert cases["source"]["label"]
    assert all(len(c["summary"]) <= 140 for c in cards)


@pytest.mark.parametrize(
    "orders",
    [
        draft(order("sr-1", KNEE_XR, "Knee pain")),
        draft({"resourceType": "MedicationRequest", "id": "m", "status": "draft"}),
        draft(),
    ],
    ids=["knee-xray", "medication", "empty"],
)
def test_unrelated_orders_get_no_card_and_no_fhir_request(signer, orders):
    fhir = RecordingFhir()
    response = post(signer, SIGN, order_call("order-sign", orders, prefetch=False), fhir)
    assert (response.status_code, response.json()) == (200, {"cards": []})
    assert fhir.queries == []


def test_order_select_reads_only_the_selected_orders(signer):
    orders = draft(order("chest", CHEST_XR, "Cough"), order("knee", KNEE_XR))
    knee = post(
        signer, SELECT, order_call("order-select", orders, selections=["ServiceRequest/knee"])
    )
    chest = post(
        signer, SELECT, order_call("order-select", orders, selections=["ServiceRequest/chest"])
    )
    assert knee.json() == {"cards": []}
    assert chest.status_code == 200
    assert chest.json()["cards"]


def test_an_unreadable_draft_order_is_listed_among_what_was_left_out(signer):
    broken = {**order("bad", CHEST_XR), "authoredOn": "not a date"}
    body = order_call("order-sign", draft(broken, order("good", CHEST_XR, "Cough")))
    cards = post(signer, SIGN, body).json()["cards"]
    assert any("draft order 1 not read" in (c.get("detail") or "") for c in cards)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (SELECT, order_call("order-select", draft(order("a", CHEST_XR)))),  # no selections
        (SELECT, order_call("order-select", draft(), selections=[])),
        (SELECT, order_call("order-select", draft(), selections=["not a reference"])),
        (SIGN, order_call("order-sign", {"resourceType": "Patient", "id": "x"})),
        (SIGN, order_call("order-sign", {"resourceType": "Bundle", "entry": ["x"]})),
        (SIGN, {**order_call("order-sign", draft()), "hook": "patient-view"}),
        (SIGN, order_call("order-select", draft(), selections=["ServiceRequest/a"])),
    ],
    ids=[
        "no-selections",
        "empty-selections",
        "bad-selection",
        "not-a-bundle",
        "entry-not-objects",
        "patient-view-hook",
        "order-select-hook",
    ],
)
def test_malformed_order_contexts_are_400(signer, path, body):
    response = post(signer, path, body)
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
