"""The service on real peers, the Medplum FHIR engine and an Orthanc PACS, via the live adapters.

Ingestion discovers the 40 fixture cases from FHIR (ImagingStudy + radiology DiagnosticReport),
reads their labs from the FHIR server and their images from Orthanc over DICOMweb with basic
auth, and must index exactly what ingestion through the embedded defaults (the folder of Synthea
bundles and the folder of DICOM files) indexes. Then the service, wired to the PACS by its
settings, answers a signed ``patient-view`` call whose labs it fetches from the FHIR server with
the access token the EHR hands it (SMART Backend Services, from the FHIR server's own token
endpoint), and still answers, saying what it left out, when the PACS is down.
"""

from __future__ import annotations

import json
import socket
import uuid

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from adapters.fhir.smart_backend import SmartBackendAuth
from core.ingestion import ingest_cases
from core.types import IndexedCase
from deploy.demo import serving
from deploy.ehr_simulator import DemoEhr
from deploy.settings import Settings
from deploy.wiring import build_runtime, open_components, trusted_clients
from tests.peers.live_ingest import (
    LiveIngest,
    Peers,
    fixture_cases,
    ingest_live,
    live_settings,
    running_peers,
)
from tests.peers.medplum import MedplumMissing
from tests.peers.orthanc import OrthancMissing

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SERVICE = "/cds-services/medirag-patient-view"
EHR_CLIENT = "ehr-cds-broker"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def ehr_key(tmp_path_factory):
    """The EHR's SMART Backend Services key (ES384) and the FHIR server's clients file."""
    key = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    path = tmp_path_factory.mktemp("smart") / "clients.json"
    path.write_text(
        json.dumps(
            {"clients": [{"client_id": EHR_CLIENT, "jwks": {"keys": [{**jwk, "kid": "e1"}]}}]}
        )
    )
    return key, path


@pytest.fixture(scope="module")
def fixtures(shared_data, tmp_path_factory):
    if not (shared_data / "cxr" / "nih1000" / "labels.csv").is_file():
        pytest.skip("cxr/nih1000 is not in the shared data: the fixture cases cannot be built")
    out = tmp_path_factory.mktemp("fixture-cases")
    cases, bundle = fixture_cases(shared_data, out)
    return out, cases, bundle


@pytest.fixture(scope="module")
def peers(shared_data, fixtures, ehr_key):
    _, _, bundle = fixtures
    try:
        with running_peers(shared_data, bundle, {}, smart_clients=ehr_key[1]) as running:
            yield running
    except (MedplumMissing, OrthancMissing) as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
async def live(peers: Peers, fixtures, tmp_path_factory, models_dir, minilm_dir, tiny_dir):
    out, cases, _ = fixtures
    data_dir = tmp_path_factory.mktemp("live-data")
    written: list[IndexedCase] = []
    first = await ingest_live(
        peers, out=out, cases=cases, data_dir=data_dir, models_dir=models_dir, seconds={},
        record=written,
    )  # fmt: skip
    again = await ingest_live(
        peers, out=out, cases=cases, data_dir=data_dir, models_dir=models_dir, seconds={}
    )
    return data_dir, first, again, written


@pytest.fixture(scope="module")
async def embedded(fixtures, shared_data, tmp_path_factory, models_dir, minilm_dir, tiny_dir):
    """The same cases ingested through the embedded defaults (bundle folder, DICOM folder)."""
    out, cases, _ = fixtures
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("embedded-data"),
        models_dir=models_dir,
        dicom_dir=out / "dicom",
        fhir_bundles=shared_data / "synthea",
    )
    written: list[IndexedCase] = []

    class Recording:
        def __init__(self, store):
            self.store = store

        async def upsert_cases(self, batch):
            written.extend(batch)
            await self.store.upsert_cases(batch)

        async def case_ids(self):
            return await self.store.case_ids()

    async with open_components(settings) as components:
        report = await ingest_cases(
            [case.source for case in cases],
            records=components.bundles,
            imaging=components.imaging,
            image_model=components.image_model,
            index=Recording(components.store),
            weights=components.fusion,
        )
    assert report.indexed == len(cases)
    assert not report.skipped
    return {case.record.case_id: case for case in written}


async def test_all_fixture_cases_are_discovered_and_indexed_once(live, fixtures):
    _, first, again, _ = live
    _, cases, _ = fixtures
    assert isinstance(first, LiveIngest)
    assert first.stored == first.discovered == first.report.indexed == len(cases) == 40
    assert first.report.skipped == []
    assert (again.report.indexed, again.report.already_indexed) == (0, 40)


async def test_live_adapters_index_what_the_embedded_defaults_index(live, embedded):
    _, _, _, written = live
    by_id = {case.record.case_id: case for case in written}
    assert by_id.keys() == embedded.keys()
    for case_id, live_case in by_id.items():
        local = embedded[case_id]
        assert live_case.record.patient_ref == local.record.patient_ref
        assert live_case.record.study_uid == local.record.study_uid
        assert set(live_case.record.findings) == set(local.record.findings)
        assert live_case.findings_text == local.findings_text
        # The same pixels through Orthanc as from the file, the same labs through FHIR paging
        # as from the bundle: the same vectors.
        np.testing.assert_allclose(live_case.image, local.image, atol=1e-6)
        np.testing.assert_allclose(live_case.fused, local.fused, atol=1e-6)
        assert (live_case.labs is None) == (local.labs is None)
        if live_case.labs is not None:
            np.testing.assert_allclose(live_case.labs.vector, local.labs.vector, atol=1e-9)
            assert live_case.labs.measured == local.labs.measured
            assert live_case.labs.abnormal == local.labs.abnormal
        assert "Synthea patient (synthetic)" in live_case.record.provenance


async def _call(peers: Peers, settings: Settings, ehr: DemoEhr, patient: str, token: str):
    port = _free_port()
    settings = settings.model_copy(
        update={
            "port": port,
            "public_base_url": f"http://127.0.0.1:{port}",
            "clients": ehr.clients_file,
            "allow_loopback_http": True,
        }
    )
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": patient},
        "fhirServer": peers.fhir.secure_base_url,
        "fhirAuthorization": {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "system/*.read",
            "subject": EHR_CLIENT,
        },
    }
    async with open_components(settings) as components:
        runtime = build_runtime(components, settings, trusted_clients(settings))
        async with serving(runtime, settings, port):
            url = f"{settings.public_base_url}{SERVICE}"
            async with httpx.AsyncClient(timeout=30) as http:
                return await http.post(
                    url, json=body, headers={"Authorization": f"Bearer {ehr.sign(url)}"}
                )


@pytest.fixture(scope="module")
async def ehr_token(peers, ehr_key):
    key, _ = ehr_key
    auth = SmartBackendAuth(
        peers.fhir.secure_base_url, client_id=EHR_CLIENT, private_key=key, key_id="e1",
        algorithm="ES384",
    )  # fmt: skip
    return await auth.access_token()


@pytest.fixture(scope="module")
def patient(fixtures, shared_data):
    """A fixture patient with a full blood count (so the lab leg has something to compare)."""
    _, cases, _ = fixtures
    with_counts = []
    for bundle in sorted((shared_data / "synthea").glob("*.json")):
        entries = json.loads(bundle.read_text())["entry"]
        codes = {
            c["code"]
            for e in entries
            if e["resource"]["resourceType"] == "Observation"
            for c in e["resource"]["code"]["coding"]
        }
        if {"718-7", "6690-2", "777-3"} <= codes:
            with_counts.append(
                next(
                    e["resource"]["id"]
                    for e in entries
                    if e["resource"]["resourceType"] == "Patient"
                )
            )
    ids = {case.source.patient_id for case in cases}
    return next(p for p in with_counts if p in ids)


def own_case(fixtures, patient):
    _, cases, _ = fixtures
    (own,) = [c.source.record.case_id for c in cases if c.source.patient_id == patient]
    return own


async def test_a_hook_call_reads_labs_from_fhir_and_images_from_the_pacs(
    live, peers, fixtures, models_dir, tmp_path, patient, ehr_token
):
    data_dir, _, _, _ = live
    ehr = DemoEhr.load_or_create(tmp_path / "ehr")
    settings = live_settings(peers, data_dir, models_dir)
    reply = await _call(peers, settings, ehr, patient, ehr_token)
    assert reply.status_code == 200, reply.text
    cards = {c["source"]["label"]: c for c in reply.json()["cards"]}
    assert not any(c["summary"].startswith("Partial result") for c in cards.values()), cards
    detail = cards["MediRAG CDS similar-case index"]["detail"]
    assert "| 2.25." in detail  # attributed by study UID
    assert own_case(fixtures, patient).replace("_", "\\_") not in detail  # never its own neighbour


async def test_with_the_pacs_down_the_hook_still_answers_and_says_so(
    live, peers, models_dir, tmp_path, patient, ehr_token
):
    data_dir, _, _, _ = live
    ehr = DemoEhr.load_or_create(tmp_path / "ehr")
    dead = f"http://127.0.0.1:{_free_port()}/dicom-web"
    settings = live_settings(peers, data_dir, models_dir).model_copy(update={"dicomweb_url": dead})
    reply = await _call(peers, settings, ehr, patient, ehr_token)
    assert reply.status_code == 200, reply.text
    cards = {c["source"]["label"]: c for c in reply.json()["cards"]}
    assert "MediRAG CDS similar-case index" in cards  # matched by labs and recorded findings
    partial = [c for c in cards.values() if c["summary"].startswith("Partial result")]
    assert len(partial) == 1, cards
    assert "imaging unavailable (could not connect)" in partial[0]["detail"]
