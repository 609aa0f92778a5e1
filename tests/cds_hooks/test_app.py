"""The HTTP layer: discovery, calls, prefetch resolution, deadlines, idempotency, limits, CORS,
every error as an OperationOutcome, bare 401s, no leaks.

The retrieval behind it runs on the in-memory doubles of tests/core; labs prefetch is parsed by
the real FHIR adapter. FHIR servers here are doubles that record what they are asked
(tests/cds_hooks/test_deadline.py uses a real hanging HTTP server); tests/e2e runs the whole
service on the real adapters.
"""

import asyncio
import dataclasses
import logging
import time
import uuid
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from adapters.fhir.prefetch import PrefetchRecords
from adapters.store.ledger import PgCardLedger
from cds_hooks.app import Runtime, create_app
from cds_hooks.auth import Authenticator, TrustedClient
from cds_hooks.calls import Caller, CallPolicy
from cds_hooks.idempotency import HookInstanceCache
from core.advisor import Advisor, AdvisorSettings
from core.brief_cards import SmartApp
from core.errors import SourceUnavailable
from core.labs import LAB_PANEL
from core.types import CaseRecord, ChestImage, IndexedCase, LabProfile
from tests.cds_hooks.keys import Signer
from tests.core.doubles import (
    FixedImaging,
    MeanImageModel,
    MemoryCases,
    MemoryLiterature,
    TextDouble,
)

BASE = "https://cds.test"
SERVICE = "/cds-services/medirag-patient-view"
PATIENT = "q-1"
SECRET = "fhir-access-token-that-must-not-leak"
LABS_QUERY = f"Observation?patient={PATIENT}&category=laboratory&_sort=-date&_count=200"


def lab(code, value, unit):
    return {
        "resource": {
            "resourceType": "Observation",
            "id": f"o-{code}",
            "status": "final",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                            "code": "laboratory",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": f"Patient/{PATIENT}"},
            "effectiveDateTime": "2020-01-01T00:00:00Z",
            "valueQuantity": {
                "value": value,
                "unit": unit,
                "system": "http://unitsofmeasure.org",
                "code": unit,
            },
        }
    }


LABS = {
    "resourceType": "Bundle",
    "type": "searchset",
    "entry": [
        lab("718-7", 9.0, "g/dL"),
        lab("6690-2", 7.0, "10*3/uL"),
        lab("777-3", 250, "10*3/uL"),
    ],
}
FAILED = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "exception"}],
}


class RecordingFhir:
    """A FHIR server double: records each fetcher made and each query, answers LABS."""

    def __init__(self, *, failure=None, hang=False):
        self.fetchers, self.queries = [], []
        self.failure, self.hang = failure, hang

    def fetcher(self, base_url, access_token):
        self.fetchers.append((base_url, access_token))
        return self

    async def fetch(self, query):
        self.queries.append(query)
        if self.hang:
            await asyncio.sleep(3600)
        if self.failure:
            raise SourceUnavailable("FHIR server", self.failure)
        return LABS


class CountingImaging(FixedImaging):
    calls = 0

    async def chest_images(self, patient_id, *, limit=4, study_uid=None):
        type(self).calls += 1
        return await super().chest_images(patient_id, limit=limit, study_uid=study_uid)


class Broken(FixedImaging):
    async def chest_images(self, patient_id, *, limit=4, study_uid=None):
        raise RuntimeError(f"bug while reading {patient_id}")


class Ledger:
    def __init__(self):
        self.recorded = []

    async def record_issued(self, *, service_id, hook_instance, client, cards):
        self.recorded.append((service_id, hook_instance, client, [c.kind for c in cards]))


def build(
    signer,
    *,
    imaging=None,
    fhir=None,
    default_fhir=None,
    insecure=False,
    policy=None,
    app=None,
    ledger=None,
    ledger_dsn=None,
    others=(),
    services=None,
    cors=(),
):
    CountingImaging.calls = 0
    pixels = np.ones((8, 8), np.float32)
    imaging = imaging or CountingImaging({PATIENT: [ChestImage("s", "se", "so", pixels)]})
    cases = MemoryCases()
    v = np.eye(8, dtype=np.float32)[0]
    panel = len(LAB_PANEL)
    labs = LabProfile(np.zeros(panel, np.float32), (True,) * 3 + (False,) * (panel - 3))
    cases.cases["c1"] = IndexedCase(
        CaseRecord("c1", "Patient/other", "1.2.3", ("Effusion",), "test"), "t", v, v, v, labs
    )
    advisor = Advisor(
        imaging=imaging,
        image_model=MeanImageModel(),
        text_model=TextDouble(),
        cases=cases,
        literature=MemoryLiterature(),
        settings=AdvisorSettings(compute_reserve_s=0.3),
    )
    caller = Caller(
        advisor=advisor,
        fhir=fhir or RecordingFhir(),
        parse_labs=lambda value: PrefetchRecords({"labs": value}),
        default_fhir=default_fhir,
        policy=policy or CallPolicy(deadline_s=2.0),
        cache=HookInstanceCache(),
        smart_app=app,
        ledger=ledger,
    )

    @asynccontextmanager
    async def runtime():
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(httpx.AsyncClient())
            trusted = {s.iss: TrustedClient(iss=s.iss, jwks=s.jwks) for s in (signer, *others)}
            serving = caller
            if ledger_dsn is not None:  # opened on the app's event loop, as the service does
                opened = await stack.enter_async_context(await PgCardLedger.open(ledger_dsn))
                serving = dataclasses.replace(caller, ledger=opened)
            yield Runtime(
                caller=serving,
                authenticator=None if insecure else Authenticator(trusted, http=http),
                public_base_url=BASE,
                **({} if services is None else {"services": services}),
            )

    return create_app(runtime, cors_origins=cors), caller


@pytest.fixture(scope="module")
def signer():
    return Signer("ES384")


def serve(app):
    return TestClient(app, base_url=BASE, raise_server_exceptions=False)


@pytest.fixture
def client(signer):
    app, caller = build(signer)
    with serve(app) as c:
        c.caller = caller
        yield c


def auth(signer, path):
    return {"Authorization": f"Bearer {signer.token(BASE + path)}"}


def call(**overrides):
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": PATIENT},
        "prefetch": {"labs": LABS},
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


AUTHORIZATION = {
    "access_token": SECRET,
    "token_type": "Bearer",
    "expires_in": 300,
    "scope": "user/Observation.read",
    "subject": "medirag",
}


def test_discovery_with_cache_headers(client, signer):
    response = client.get("/cds-services", headers=auth(signer, "/cds-services"))
    assert response.status_code == 200
    (service,) = response.json()["services"]
    assert service["id"] == "medirag-patient-view"
    assert service["hook"] == "patient-view"
    assert service["prefetch"]["labs"].startswith("Observation?patient={{context.patientId}}")
    assert set(service) == {"hook", "id", "title", "description", "prefetch", "usageRequirements"}
    assert response.headers["cache-control"] == "private, max-age=300"
    etag = response.headers["etag"]
    again = client.get(
        "/cds-services", headers={**auth(signer, "/cds-services"), "If-None-Match": etag}
    )
    assert again.status_code == 304
    assert again.content == b""


@pytest.mark.parametrize("path", ["/cds-services", SERVICE, "/cds-services/nope"])
def test_missing_or_wrong_token_is_a_bare_401(client, signer, path):
    send = client.get if path == "/cds-services" else client.post
    kwargs = {} if path == "/cds-services" else {"json": call()}
    for headers in ({}, auth(signer, "/cds-services/other")):
        response = send(path, headers=headers, **kwargs)
        assert response.status_code == 401
        assert response.content == b""
        assert response.headers["www-authenticate"] == "Bearer"


def test_call_with_prefetch_answers_cards_without_fetching(client, signer):
    response = client.post(SERVICE, json=call(), headers=auth(signer, SERVICE))
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert cards[0]["source"]["label"] == "MediRAG CDS similar-case index"
    assert "1.2.3" in cards[0]["detail"]
    assert "(dist " in cards[0]["detail"]  # the prefetched labs were used
    assert all(len(c["summary"]) < 140 for c in cards)
    assert client.caller.fhir.queries == []


@pytest.mark.parametrize(
    "prefetch", [None, {"labs": FAILED}, {"patient": None}, {"labs": {"resourceType": "Bundle"}}]
)
def test_missing_or_failed_labs_are_fetched_with_the_calls_token(client, signer, prefetch):
    body = call(
        prefetch=prefetch, fhirServer="https://ehr.test/fhir", fhirAuthorization=AUTHORIZATION
    )
    if prefetch is None:
        body.pop("prefetch", None)
    if prefetch == {"labs": {"resourceType": "Bundle"}}:
        body["prefetch"]["labs"]["entry"] = [{"resource": FAILED}]  # a search that failed inside
    response = client.post(SERVICE, json=body, headers=auth(signer, SERVICE))
    assert response.status_code == 200, response.text
    assert client.caller.fhir.fetchers == [("https://ehr.test/fhir", SECRET)]
    assert client.caller.fhir.queries == [LABS_QUERY]
    assert "(dist " in response.json()["cards"][0]["detail"]


def test_null_labs_mean_no_data_and_are_not_fetched(client, signer):
    body = call(prefetch={"labs": None}, fhirServer="https://ehr.test/fhir")
    response = client.post(SERVICE, json=body, headers=auth(signer, SERVICE))
    assert response.status_code == 200
    assert client.caller.fhir.queries == []
    cards = response.json()["cards"]
    assert any("lab comparison skipped" in c["summary"] for c in cards)


def test_the_default_fhir_source_answers_calls_without_a_server(signer):
    default = RecordingFhir()
    app, _ = build(signer, default_fhir=default)
    with serve(app) as c:
        response = c.post(SERVICE, json=call(prefetch=None), headers=auth(signer, SERVICE))
    assert response.status_code == 200
    assert default.queries == [LABS_QUERY]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (call(prefetch=None), "no FHIR server to ask"),
        (call(prefetch={"labs": FAILED}), "no FHIR server to ask"),
        (
            call(
                prefetch=None, fhirServer="https://ehr.test/fhir", fhirAuthorization=AUTHORIZATION
            ),
            "FHIR server unavailable: connection refused",
        ),
        (
            call(prefetch=None, fhirServer="https://ehr.test/fhir"),
            "no fhirAuthorization to ask fhirServer with",
        ),
    ],
    ids=["no-server", "failed-no-server", "server-down", "server-without-token"],
)
def test_unobtainable_labs_are_412(signer, body, reason):
    fhir = RecordingFhir(failure="connection refused")
    app, _ = build(signer, fhir=fhir, default_fhir=None)
    with serve(app) as c:
        response = c.post(SERVICE, json=body, headers=auth(signer, SERVICE))
    # The call's server is asked only with the call's token, and never without one.
    tokens = [token for _, token in fhir.fetchers]
    assert tokens == ([SECRET] if "fhirAuthorization" in body else [])
    assert response.status_code == 412
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"].startswith("prefetch 'labs' unavailable")
    assert reason in outcome["issue"][0]["diagnostics"]


def test_a_hanging_fhir_server_is_cut_at_the_deadline(signer):
    app, _ = build(signer, fhir=RecordingFhir(hang=True), policy=CallPolicy(deadline_s=1.0))
    with serve(app) as c:
        started = time.perf_counter()
        response = c.post(
            SERVICE,
            json=call(
                prefetch=None, fhirServer="https://ehr.test/fhir", fhirAuthorization=AUTHORIZATION
            ),
            headers=auth(signer, SERVICE),
        )
        elapsed = time.perf_counter() - started
    assert response.status_code == 412
    assert "time budget" in response.json()["issue"][0]["diagnostics"]
    assert elapsed < 1.0


def test_same_hook_instance_is_answered_once(client, signer):
    body = call(fhirServer="https://ehr.test/fhir", fhirAuthorization=AUTHORIZATION)
    first = client.post(SERVICE, json=body, headers=auth(signer, SERVICE))
    renewed = {**AUTHORIZATION, "access_token": "a-renewed-token"}  # a retry may renew it
    retry = client.post(
        SERVICE, json={**body, "fhirAuthorization": renewed}, headers=auth(signer, SERVICE)
    )
    assert first.status_code == retry.status_code == 200
    assert retry.json() == first.json()
    assert CountingImaging.calls == 1
    changed = {**body, "context": {**body["context"], "encounterId": "e-2"}}
    conflict = client.post(SERVICE, json=changed, headers=auth(signer, SERVICE))
    assert conflict.status_code == 409
    assert conflict.json()["issue"][0]["code"] == "conflict"


@pytest.mark.anyio
async def test_concurrent_retries_share_one_computation(signer):
    app, _ = build(signer)
    body = call()
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url=BASE) as http,
    ):
        answers = await asyncio.gather(
            *(http.post(SERVICE, json=body, headers=auth(signer, SERVICE)) for _ in range(5))
        )
    assert {a.status_code for a in answers} == {200}
    assert len({a.text for a in answers}) == 1
    assert CountingImaging.calls == 1


BAD_CALLS = {
    "no hookInstance": call(hookInstance=None),
    "hookInstance not a UUID": call(hookInstance="123"),
    "wrong hook": call(hook="order-sign"),
    "no context": call(context=None),
    "no patientId": call(context={"userId": "Practitioner/1"}),
    "patientId not a FHIR id": call(context={"userId": "Practitioner/1", "patientId": "a/../b"}),
    "userId not a user reference": call(context={"userId": "Device/1", "patientId": PATIENT}),
    "authorization without server": call(fhirAuthorization=AUTHORIZATION),
    "plain http FHIR server": call(fhirServer="http://ehr.test/fhir"),
    "http on loopback without the dev setting": call(fhirServer="http://127.0.0.1/fhir"),
    "extension not an object": call(extension=["x"]),
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


def test_deep_json_is_400_and_huge_bodies_413(signer):
    app, _ = build(signer, policy=CallPolicy(max_body_bytes=100_000, max_json_depth=16))
    deep = b'{"hook": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with serve(app) as c:
        response = c.post(
            SERVICE,
            content=deep,
            headers={**auth(signer, SERVICE), "Content-Type": "application/json"},
        )
        assert response.status_code == 400
        assert "nests deeper than 16" in response.json()["issue"][0]["diagnostics"]
        big = call(extension={"x": "a" * 200_000})
        response = c.post(SERVICE, json=big, headers=auth(signer, SERVICE))
        assert response.status_code == 413
        assert response.json()["issue"][0]["code"] == "too-costly"


def test_unknown_service_is_404(client, signer):
    path = "/cds-services/nope"
    response = client.post(path, json=call(), headers=auth(signer, path))
    assert response.status_code == 404
    assert response.json()["issue"][0]["code"] == "not-found"


def test_unknown_paths_and_methods_are_operation_outcomes(client):
    missing = client.get("/no/such/path")
    wrong_method = client.put("/cds-services")
    assert missing.status_code == 404
    assert missing.json()["issue"][0]["code"] == "not-found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["issue"][0]["code"] == "not-supported"
    assert "GET" in wrong_method.headers["allow"]


def test_smart_link_and_ledger(signer):
    ledger = Ledger()
    app, _ = build(signer, app=SmartApp("https://app.test/launch"), ledger=ledger)
    body = call()
    with serve(app) as c:
        response = c.post(SERVICE, json=body, headers=auth(signer, SERVICE))
    (link,) = response.json()["cards"][0]["links"]
    assert link["type"] == "smart"
    assert '"cases":["c1"]' in link["appContext"]
    assert ledger.recorded == [
        ("medirag-patient-view", body["hookInstance"], signer.iss, ["cases"])
    ]


def test_cors_preflight_for_configured_origins_only(signer):
    app, _ = build(signer, cors=("https://ehr.example.org",))
    with serve(app) as c:
        preflight = {
            "Origin": "https://ehr.example.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        allowed = c.options(SERVICE, headers=preflight)
        refused = c.options(SERVICE, headers={**preflight, "Origin": "https://evil.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://ehr.example.org"
    assert "access-control-allow-origin" not in refused.headers


def test_a_bug_is_a_500_without_trace_or_patient_data(signer, caplog):
    app, _ = build(signer, imaging=Broken())
    with serve(app) as c:
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
    body = call(prefetch=None, fhirServer="https://ehr.test/fhir", fhirAuthorization=AUTHORIZATION)
    client.post(SERVICE, json=body, headers=auth(signer, SERVICE))
    client.post(SERVICE, json=body, headers={"Authorization": "Bearer forged.token.value"})
    logged = " ".join(str(vars(r)) for r in caplog.records)
    assert "authentication failed" in logged
    assert "hook answered" in logged
    assert SECRET not in logged
    assert "forged.token.value" not in logged
    assert PATIENT not in logged


def test_insecure_mode_warns_on_every_request(signer, caplog):
    app, _ = build(signer, insecure=True)
    with serve(app) as c:
        assert c.get("/cds-services").status_code == 200
        assert c.post(SERVICE, json=call()).status_code == 200
    warnings = [r for r in caplog.records if "insecure development mode" in r.getMessage()]
    assert len(warnings) == 2
