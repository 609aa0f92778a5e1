"""Fault injection: servers that hang never turn into a timeout at the EHR.

The FHIR server and the PACS here are real loopback HTTP servers that accept the connection,
read the request and never answer. The service reaches them through its real adapters
(``FhirClient`` over httpx, ``DicomArchive`` over dicomweb-client's ``DICOMwebClient``), and
must answer within its deadline: 412 when the required labs cannot be had in time, cards with a
note when only the images are late.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from dicomweb_client import DICOMwebClient
from fastapi.testclient import TestClient

from adapters.fhir.client import HttpFhirAccess
from adapters.fhir.prefetch import PrefetchRecords
from adapters.imaging.archive import DicomArchive
from cds_hooks.app import Runtime, create_app
from cds_hooks.auth import Authenticator, TrustedClient
from cds_hooks.calls import Caller, CallPolicy
from cds_hooks.idempotency import HookInstanceCache
from core.advisor import Advisor, AdvisorSettings
from core.labs import LAB_PANEL
from core.types import CaseRecord, IndexedCase, LabProfile
from tests.cds_hooks.keys import Signer
from tests.cds_hooks.test_app import LABS, PATIENT
from tests.core.doubles import MeanImageModel, MemoryCases, MemoryLiterature, TextDouble

BASE = "https://cds.test"
SERVICE = "/cds-services/medirag-patient-view"
DEADLINE_S = 1.5


class HangingServer:
    """Accepts connections, reads what is sent, answers nothing until closed."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            self.requests += 1
            self.held.append(conn)

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture
def hanging():
    server = HangingServer()
    yield server
    server.close()


def build(signer, *, imaging, fhir_timeout=30.0):
    cases = MemoryCases()
    v = np.eye(8, dtype=np.float32)[0]
    panel = len(LAB_PANEL)
    labs = LabProfile(np.zeros(panel, np.float32), (True,) * 3 + (False,) * (panel - 3))
    cases.cases["c1"] = IndexedCase(
        CaseRecord("c1", "Patient/other", "1.2.3", ("Effusion",), "test"), "t", v, v, v, labs
    )

    @asynccontextmanager
    async def runtime():
        async with httpx.AsyncClient() as http:
            advisor = Advisor(
                imaging=imaging,
                image_model=MeanImageModel(),
                text_model=TextDouble(),
                cases=cases,
                literature=MemoryLiterature(),
                settings=AdvisorSettings(compute_reserve_s=0.4),
            )
            caller = Caller(
                advisor=advisor,
                fhir=HttpFhirAccess(http, timeout=fhir_timeout),
                parse_labs=lambda value: PrefetchRecords({"labs": value}),
                default_fhir=None,
                policy=CallPolicy(deadline_s=DEADLINE_S, allow_loopback_http=True),
                cache=HookInstanceCache(),
            )
            trusted = {signer.iss: TrustedClient(iss=signer.iss, jwks=signer.jwks)}
            yield Runtime(
                caller=caller,
                authenticator=Authenticator(trusted, http=http),
                public_base_url=BASE,
            )

    return create_app(runtime)


def call(**extra):
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": PATIENT},
    }
    body.update(extra)
    return body


def timed_post(app, signer, body):
    with TestClient(app, base_url=BASE) as client:
        started = time.perf_counter()
        response = client.post(
            SERVICE, json=body, headers={"Authorization": f"Bearer {signer.token(BASE + SERVICE)}"}
        )
        return response, time.perf_counter() - started


@pytest.fixture(scope="module")
def signer():
    return Signer("ES384")


@pytest.fixture
def empty_pacs(tmp_path):
    archive = DicomArchive.from_folder(tmp_path, index_dir=tmp_path / ".index")
    yield archive
    archive.close()


def test_a_hanging_fhir_server_gets_a_412_within_the_deadline(signer, hanging, empty_pacs):
    app = build(signer, imaging=empty_pacs)
    grant = {
        "access_token": "hanging-server-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "user/Observation.read",
        "subject": "medirag",
    }
    body = call(fhirServer=f"{hanging.url}/fhir", fhirAuthorization=grant)
    response, elapsed = timed_post(app, signer, body)
    assert hanging.requests == 1  # the service did ask, and got no answer
    assert response.status_code == 412
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "time budget" in outcome["issue"][0]["diagnostics"]
    assert elapsed < DEADLINE_S


def test_a_hanging_pacs_leaves_images_out_within_the_deadline(signer, hanging):
    def web_client():
        client = DICOMwebClient(hanging.url)
        client.set_http_retry_params(retry=False)
        return client

    pacs = DicomArchive.connect(web_client)
    try:
        app = build(signer, imaging=pacs)
        response, elapsed = timed_post(app, signer, call(prefetch={"labs": LABS}))
    finally:
        pacs.close()
    assert hanging.requests >= 1
    assert response.status_code == 200
    cards = response.json()["cards"]
    assert "(dist " in cards[0]["detail"]  # cases by labs, without the image
    assert any(
        "imaging unavailable (no answer within the call's time budget)" in card["summary"]
        for card in cards
    )
    assert elapsed < DEADLINE_S
