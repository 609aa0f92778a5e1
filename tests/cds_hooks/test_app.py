"""The HTTP layer: discovery, calls, every error as an OperationOutcome, bare 401s, no leaks.

The domain behind it is the in-memory test doubles; tests/e2e runs the same app on the real
adapters.
"""

import logging
import uuid
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from cds_hooks.app import Runtime, create_app
from cds_hooks.auth import Authenticator, TrustedClient
from core.advisor import Advisor
from core.types import CaseRecord, ChestImage, IndexedCase
from tests.cds_hooks.keys import Signer
from tests.core.doubles import (
    FixedImaging,
    FixedRecords,
    MeanImageModel,
    MemoryCases,
    MemoryLiterature,
    TextDouble,
)

BASE = "https://cds.test"
SERVICE = "/cds-services/medirag-patient-view"
PATIENT = "q-1"
SECRET = "fhir-access-token-that-must-not-leak"


class Broken(FixedImaging):
    async def chest_images(self, patient_id, *, limit=4, study_uid=None):
        raise RuntimeError(f"bug while reading {patient_id}")


def build(signer, *, imaging=None, records=None, insecure=False):
    pixels = np.ones((8, 8), np.float32)
    imaging = imaging or FixedImaging({PATIENT: [ChestImage("s", "se", "so", pixels)]})
    cases = MemoryCases()
    v = np.eye(8, dtype=np.float32)[0]
    cases.cases["c1"] = IndexedCase(
        CaseRecord("c1", "Patient/other", "1.2.3", ("Effusion",), "test"), "t", v, v, v, None
    )
    advisor = Advisor(
        imaging=imaging,
        image_model=MeanImageModel(),
        text_model=TextDouble(),
        cases=cases,
        literature=MemoryLiterature(),
    )
    seen = {}

    @asynccontextmanager
    async def records_factory(*, prefetch, labs_key, fhir_server, access_token):
        seen.update(prefetch=prefetch, fhir_server=fhir_server, token=access_token)
        yield records or FixedRecords()

    @asynccontextmanager
    async def runtime():
        async with httpx.AsyncClient() as http:
            auth = Authenticator(
                {signer.iss: TrustedClient(iss=signer.iss, jwks=signer.jwks)}, http=http
            )
            yield Runtime(
                advisor=advisor,
                records=records_factory,
                authenticator=None if insecure else auth,
                public_base_url=BASE,
            )

    return create_app(runtime), seen


@pytest.fixture(scope="module")
def signer():
    return Signer("ES384")


@pytest.fixture
def client(signer):
    app, seen = build(signer)
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        c.seen = seen
        yield c


def auth(signer, path):
    return {"Authorization": f"Bearer {signer.token(BASE + path)}"}


def call(**overrides):
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": PATIENT},
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def test_discovery(client, signer):
    response = client.get("/cds-services", headers=auth(signer, "/cds-services"))
    assert response.status_code == 200
    (service,) = response.json()["services"]
    assert service["id"] == "medirag-patient-view"
    assert service["hook"] == "patient-view"
    assert service["prefetch"]["labs"].startswith("Observation?patient={{context.patientId}}")
    assert set(service) >= {"hook", "id", "title", "description", "prefetch"}


@pytest.mark.parametrize("path", ["/cds-services", SERVICE, "/cds-services/nope"])
def test_missing_or_wrong_token_is_a_bare_401(client, signer, path):
    send = client.get if path == "/cds-services" else client.post
    kwargs = {} if path == "/cds-services" else {"json": call()}
    for headers in ({}, auth(signer, "/cds-services/other")):
        response = send(path, headers=headers, **kwargs)
        assert response.status_code == 401
        assert response.content == b""
        assert response.headers["www-authenticate"] == "Bearer"


def test_call_answers_cards(client, signer):
    response = client.post(SERVICE, json=call(), headers=auth(signer, SERVICE))
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert cards[0]["source"]["label"] == "MediRAG CDS similar-case index"
    assert "1.2.3" in cards[0]["detail"]
    assert all(len(c["summary"]) < 140 for c in cards)


def test_prefetch_and_fhir_server_reach_the_records_factory(client, signer):
    body = call(
        prefetch={"labs": {"resourceType": "Bundle", "type": "searchset"}},
        fhirServer="https://ehr.test/fhir",
        fhirAuthorization={
            "access_token": SECRET,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Observation.read",
            "subject": "medirag",
        },
    )
    assert client.post(SERVICE, json=body, headers=auth(signer, SERVICE)).status_code == 200
    assert client.seen == {
        "prefetch": body["prefetch"],
        "fhir_server": "https://ehr.test/fhir",
        "token": SECRET,
    }


BAD_CALLS = {
    "no hookInstance": call(hookInstance=None),
    "hookInstance not a UUID": call(hookInstance="123"),
    "wrong hook": call(hook="order-sign"),
    "no context": call(context=None),
    "no patientId": call(context={"userId": "Practitioner/1"}),
    "patientId not a FHIR id": call(context={"userId": "P/1", "patientId": "a/../b"}),
    "authorization without server": call(
        fhirAuthorization={
            "access_token": SECRET,
            "token_type": "Bearer",
            "expires_in": 1,
            "scope": "s",
            "subject": "x",
        }
    ),
    "plain http FHIR server": call(fhirServer="http://ehr.test/fhir"),
    "http on loopback without the dev setting": call(fhirServer="http://127.0.0.1/fhir"),
    "body is a list": [],
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_malformed_calls_get_400_operation_outcome(client, signer, name):
    response = client.post(SERVICE, json=BAD_CALLS[name], headers=auth(signer, SERVICE))
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "error"
    assert SECRET not in response.text


def test_invalid_json_is_400(client, signer):
    response = client.post(
        SERVICE,
        content=b'{"hook": "patient-view",',
        headers={**auth(signer, SERVICE), "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert "not JSON" in response.json()["issue"][0]["diagnostics"]


def test_unknown_service_is_404(client, signer):
    path = "/cds-services/nope"
    response = client.post(path, json=call(), headers=auth(signer, path))
    assert response.status_code == 404
    assert response.json()["issue"][0]["code"] == "not-found"


def test_unobtainable_record_is_412(signer):
    app, _ = build(signer, records=FixedRecords(failure="connection refused"))
    with TestClient(app, base_url=BASE) as c:
        response = c.post(SERVICE, json=call(), headers=auth(signer, SERVICE))
    assert response.status_code == 412
    assert response.json()["issue"][0]["diagnostics"] == (
        "FHIR server unavailable: connection refused"
    )


def test_a_bug_is_a_500_without_trace_or_patient_data(signer, caplog):
    app, _ = build(signer, imaging=Broken())
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        response = c.post(SERVICE, json=call(), headers=auth(signer, SERVICE))
    assert response.status_code == 500
    text = response.text
    assert "Traceback" not in text
    assert PATIENT not in text
    assert "reference" in response.json()["issue"][0]["diagnostics"]
    logged = " ".join(str(vars(r)) for r in caplog.records)
    assert "RuntimeError" in logged
    assert PATIENT not in logged


def test_logs_hold_no_token_and_no_patient_id(client, signer, caplog):
    caplog.set_level(logging.DEBUG)
    body = call(
        fhirServer="https://ehr.test/fhir",
        fhirAuthorization={
            "access_token": SECRET,
            "token_type": "Bearer",
            "expires_in": 1,
            "scope": "s",
            "subject": "x",
        },
    )
    client.post(SERVICE, json=body, headers=auth(signer, SERVICE))
    client.post(SERVICE, json=body, headers={"Authorization": "Bearer forged.token.value"})
    logged = " ".join(str(vars(r)) for r in caplog.records)
    assert "authentication failed" in logged
    assert SECRET not in logged
    assert "forged.token.value" not in logged
    assert PATIENT not in logged


def test_insecure_mode_warns_on_every_request(signer, caplog):
    app, _ = build(signer, insecure=True)
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/cds-services").status_code == 200
        assert c.post(SERVICE, json=call()).status_code == 200
    warnings = [r for r in caplog.records if "insecure development mode" in r.getMessage()]
    assert len(warnings) == 2
