"""End to end, through the real command and real HTTP: nothing here is a test double.

``medirag demo --json`` runs cold (fixtures and index built from nothing, models from the session's
export) and then warm; ``medirag serve`` then serves the index the demo built, as a separate
process, and is called with JWTs signed by keys the test generates: real PostgreSQL + pgvector
(embedded), real ONNX Runtime sessions, real DICOM files read through dicomweb-client, real
Synthea bundles.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.cds_hooks.keys import Signer

MEDIRAG = str(Path(sys.executable).parent / "medirag")
SERVICE = "/cds-services/medirag-patient-view"
NOTE = "research software, not a medical device"


def run(args, env, timeout=600):
    return subprocess.run(
        [MEDIRAG, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data, models_dir, minilm_dir, tiny_dir):
    data = tmp_path_factory.mktemp("medirag-data")
    return {
        **os.environ,
        "COLUMNS": "250",  # keep rich from wrapping the progress lines the tests read
        "MEDIRAG_DATA_DIR": str(data),
        "MEDIRAG_MODELS_DIR": str(models_dir),
        "MEDIRAG_SHARED_DATA": str(shared_data),
    }


@pytest.fixture(scope="module")
def patient(shared_data):
    """The first Synthea patient (by id) with a full blood count."""
    for bundle in sorted((shared_data / "synthea").glob("*.json")):
        entries = json.loads(bundle.read_text())["entry"]
        codes = {
            c["code"]
            for e in entries
            if e["resource"]["resourceType"] == "Observation"
            for c in e["resource"]["code"]["coding"]
        }
        if {"718-7", "6690-2", "777-3"} <= codes:
            return next(
                e["resource"]["id"] for e in entries if e["resource"]["resourceType"] == "Patient"
            )
    raise AssertionError("no Synthea patient with a blood count")


@pytest.fixture(scope="module")
def cold(env, patient):
    return run(["demo", "--json", "--patient", patient], env)


def own_case_id(env, patient):
    cases = json.loads((Path(env["MEDIRAG_DATA_DIR"]) / "fixtures" / "cases.json").read_text())
    (own,) = [c for c in cases["cases"] if c["patient_ref"] == f"Patient/{patient}"]
    return own["case_id"]


def check_cards(cards, *, excluded_case):
    by_source = {c["source"]["label"]: c for c in cards}
    cases = by_source["MediRAG CDS similar-case index"]
    literature = by_source["PubMed abstracts"]
    assert "| 1 | nih-" in cases["detail"]
    assert "| 2.25." in cases["detail"]  # study UIDs
    assert excluded_case.replace("_", "\\_") not in cases["detail"]
    assert "PMID [" in literature["detail"]
    assert all(
        link["url"].startswith("https://pubmed.ncbi.nlm.nih.gov/") for link in literature["links"]
    )
    for card in cards:
        assert len(card["summary"]) < 140
        assert card["indicator"] in {"info", "warning", "critical"}
        assert NOTE in card["detail"]
    assert "tiny" in cases["detail"].lower()
    assert "random" in cases["detail"].lower()


def test_cold_demo_prints_attributed_cards_as_json(cold, env, patient):
    assert cold.returncode == 0, cold.stderr
    response = json.loads(cold.stdout)  # --json: nothing but the response on stdout
    check_cards(response["cards"], excluded_case=own_case_id(env, patient))
    assert "40 cases added" in cold.stderr
    assert "1689 passages added" in cold.stderr


def test_warm_demo_reuses_what_the_first_built(cold, env):
    warm = run(["demo"], env)
    assert warm.returncode == 0, warm.stderr
    assert "0 cases added, 40 already there; 0 passages added, 1689 already there" in warm.stderr
    assert "building model" not in warm.stderr
    assert "CDS Hooks response" in warm.stdout
    assert "Summary: patient-view for Patient/" in warm.stdout


def test_demo_without_shared_data_says_what_is_missing(env, tmp_path):
    result = run(["demo"], {**env, "MEDIRAG_SHARED_DATA": str(tmp_path / "nowhere")})
    assert result.returncode == 2
    assert result.stdout == ""
    assert "synthea" in result.stderr
    assert "pubmedqa" in result.stderr
    assert "MEDIRAG_SHARED_DATA" in result.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def signer():
    return Signer("ES384", iss="https://ehr.e2e.test")


@pytest.fixture(scope="module")
def server(cold, env, shared_data, signer, tmp_path_factory):
    assert cold.returncode == 0, cold.stderr
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    clients = tmp_path_factory.mktemp("clients") / "clients.json"
    clients.write_text(json.dumps([{"iss": signer.iss, "jwks": signer.jwks}]))
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    serve_env = {
        **env,
        "MEDIRAG_PORT": str(port),
        "MEDIRAG_PUBLIC_BASE_URL": base,
        "MEDIRAG_CLIENTS": str(clients),
        "MEDIRAG_FHIR_BUNDLES": str(shared_data / "synthea"),
        "MEDIRAG_DICOM_DIR": str(Path(env["MEDIRAG_DATA_DIR"]) / "fixtures" / "dicom"),
        "MEDIRAG_ALLOW_LOOPBACK_HTTP": "true",
    }
    with log.open("w") as sink:
        process = subprocess.Popen([MEDIRAG, "serve"], env=serve_env, stderr=sink, stdout=sink)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/cds-services", timeout=1).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield base, log
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    # A clean stop closes the components: the embedded PostgreSQL no longer counts the service
    # among its holders (uvicorn re-raises SIGTERM after its shutdown, which used to kill the
    # process first and leave the database server running).
    holders = Path(env["MEDIRAG_DATA_DIR"]) / "postgres" / ".handle_pids.json"
    assert process.returncode == 0, log.read_text()[-2000:]
    assert process.pid not in json.loads(holders.read_text()), holders.read_text()


def post(server, signer, body, token=None, path=SERVICE):
    base, _ = server
    token = token or signer.token(base + path)
    return httpx.post(
        base + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def call(patient, **extra):
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/e2e", "patientId": patient},
    }
    body.update(extra)
    return body


def prefetch(shared_data, patient):
    from adapters.fhir.bundle_folder import BundleFolderRecords
    from adapters.fhir.prefetch import prefetch_content

    return prefetch_content(BundleFolderRecords(shared_data / "synthea"), patient)


def test_discovery_needs_and_accepts_a_signed_jwt(server, signer):
    base, _ = server
    token = signer.token(base + "/cds-services")
    response = httpx.get(f"{base}/cds-services", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.json()["services"][0]["id"] == "medirag-patient-view"


def test_patient_view_with_prefetch(server, signer, env, shared_data, patient):
    response = post(server, signer, call(patient, prefetch=prefetch(shared_data, patient)))
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    check_cards(cards, excluded_case=own_case_id(env, patient))
    assert "(dist " in cards[0]["detail"]  # the lab leg ran on the prefetched labs


def test_patient_view_without_prefetch_reads_the_bundle_folder(server, signer, env, patient):
    response = post(server, signer, call(patient))
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    check_cards(cards, excluded_case=own_case_id(env, patient))
    assert "(dist " in cards[0]["detail"]


def test_null_labs_prefetch_skips_the_lab_leg_and_says_so(server, signer, patient):
    response = post(server, signer, call(patient, prefetch={"patient": None, "labs": None}))
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert "(dist " not in cards[0]["detail"]
    assert any("lab comparison skipped" in c["summary"] for c in cards)


def test_dead_fhir_server_is_412(server, signer, patient):
    body = call(
        patient,
        fhirServer="http://127.0.0.1:9/fhir",
        fhirAuthorization={
            "access_token": "e2e-secret-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Observation.read",
            "subject": "medirag",
        },
    )
    response = post(server, signer, body)
    assert response.status_code == 412
    assert response.json()["resourceType"] == "OperationOutcome"


def test_bad_token_is_401(server, signer, patient):
    forged = Signer("ES384", iss=signer.iss).token(server[0] + SERVICE)
    response = post(server, signer, call(patient), token=forged)
    assert response.status_code == 401
    assert response.content == b""


def test_service_log_is_json_without_patient_ids_or_tokens(server, signer, patient):
    post(server, signer, call(patient))
    _, log = server
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any(r["msg"] == "hook answered" for r in records)
    text = log.read_text()
    assert patient not in text
    assert "e2e-secret-token" not in text


def test_order_sign_for_a_chest_xray_then_feedback_on_its_card(server, signer, env, patient):
    order = {
        "resourceType": "ServiceRequest",
        "id": "draft-cxr",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "36643-5"}]},
        "reasonCode": [{"text": "Shortness of breath, suspected pleural effusion"}],
    }
    context = {
        "userId": "Practitioner/e2e",
        "patientId": patient,
        "draftOrders": {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": order}],
        },
    }
    body = {"hook": "order-sign", "hookInstance": str(uuid.uuid4()), "context": context}
    sign = "/cds-services/medirag-order-sign"
    response = post(server, signer, body, path=sign)
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    check_cards(cards, excluded_case=own_case_id(env, patient))
    by_source = {c["source"]["label"]: c for c in cards}
    cases = by_source["MediRAG CDS similar-case index"]
    assert "Reason rank" in cases["detail"]
    assert "the reason given for the chest X-ray order" in by_source["PubMed abstracts"]["detail"]

    feedback = {
        "feedback": [
            {
                "card": cases["uuid"],
                "outcome": "overridden",
                "overrideReason": {"userComment": "not helpful here"},
                "outcomeTimestamp": "2026-11-23T10:00:00Z",
            }
        ]
    }
    recorded = post(server, signer, feedback, path=sign + "/feedback")
    assert (recorded.status_code, recorded.json()) == (200, {})
    report = subprocess.run(
        [MEDIRAG, "feedback", "report", "--json"], env=env, capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    kinds = {(k["service_id"], k["kind"]): k for k in json.loads(report.stdout)["kinds"]}
    assert kinds[("medirag-order-sign", "cases")]["overridden"] >= 1


def test_a_replayed_token_is_401_across_the_service(server, signer, patient):
    token = signer.token(server[0] + SERVICE)
    assert post(server, signer, call(patient), token=token).status_code == 200
    replayed = post(server, signer, call(patient), token=token)
    assert (replayed.status_code, replayed.content) == (401, b"")
