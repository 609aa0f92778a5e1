"""FhirClient against a real HTTP server on the loopback interface.

The server is a stand-in for a FHIR server that misbehaves on cue (the real engine, Medplum, is
in test_fhir_medplum.py and cannot be made to misbehave): a stdlib ``http.server`` in a thread
that answers the laboratory search with the searchset Bundles ``laboratory_bundle`` builds from
the Synthea folder, split over two pages joined by a ``next`` link, and that misbehaves on
purpose under other base paths (401, 403, 404, 500, a body that is not JSON, the wrong resource
type, an invalid resource, an error OperationOutcome in the Bundle, a dropped connection, a
response that never comes, an endless chain of pages, a ``next`` link to another server).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from adapters.fhir.bundle_folder import BundleFolderRecords
from adapters.fhir.client import FhirClient
from adapters.fhir.prefetch import laboratory_bundle
from core.errors import SourceUnavailable
from core.ports import ClinicalRecords

pytestmark = pytest.mark.anyio

TOKEN = "s3cr3t-token-value"


class StandIn(ThreadingHTTPServer):
    """The loopback server: what it serves, what it was asked, and a latch for hung requests."""

    daemon_threads = True

    def __init__(self, records: BundleFolderRecords) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.records = records
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()
        self.redirect_to = ""

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test output is for the tests."""

    def _send(self, status: int, body: bytes | dict[str, Any]) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _page(self, base: str, query: dict[str, list[str]]) -> dict[str, Any]:
        patient_id = query["patient"][0]
        bundle = laboratory_bundle(self.server.records, patient_id, base_url=base)
        half = len(bundle["entry"]) // 2
        if query.get("page") == ["2"]:
            bundle["entry"] = bundle["entry"][half:]
            return bundle
        bundle["entry"] = bundle["entry"][:half]
        following = urlencode({"patient": patient_id, "category": "laboratory", "page": "2"})
        bundle["link"].append({"relation": "next", "url": f"{base}/Observation?{following}"})
        return bundle

    def do_GET(self) -> None:
        self.server.requests.append((self.path, dict(self.headers)))
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        mode = url.path.split("/")[1]
        base = f"{self.server.origin}/{mode}/fhir"
        if mode == "ok":
            self._send(200, self._page(base, query))
        elif mode in ("unauthorized", "forbidden", "missing", "error"):
            status = {"unauthorized": 401, "forbidden": 403, "missing": 404, "error": 500}[mode]
            outcome = {"resourceType": "OperationOutcome",
                       "issue": [{"severity": "error", "code": "security"}]}  # fmt: skip
            self._send(status, outcome)
        elif mode == "garbage":
            self._send(200, b"<html>maintenance</html>")
        elif mode == "patient":
            self._send(200, {"resourceType": "Patient", "id": query["patient"][0]})
        elif mode == "invalid":
            bad = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "valueQuantity": {"value": query["patient"][0]}}  # fmt: skip
            self._send(200, {"resourceType": "Bundle", "type": "searchset",
                             "entry": [{"resource": bad}]})  # fmt: skip
        elif mode == "outcome":
            page = self._page(base, query)
            issue = {"severity": "fatal", "code": "exception"}
            outcome = {"resourceType": "OperationOutcome", "issue": [issue]}
            page["entry"].append({"resource": outcome, "search": {"mode": "outcome"}})
            self._send(200, page)
        elif mode == "drop":
            self.close_connection = True
        elif mode == "hang":
            self.server.release.wait(10)
        elif mode == "loop":
            page = self._page(base, query)
            page["link"].append({"relation": "next", "url": f"{base}/Observation?{url.query}"})
            page["link"] = [page["link"][0], page["link"][-1]]
            self._send(200, page)
        elif mode == "foreign":
            page = self._page(base, query)
            page["link"][-1]["url"] = f"{self.server.redirect_to}/ok/fhir/Observation?x=1"
            self._send(200, page)


def _start(records: BundleFolderRecords) -> StandIn:
    server = StandIn(records)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def _stop(server: StandIn) -> None:
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def servers(synthea_records: BundleFolderRecords) -> Iterator[tuple[StandIn, StandIn]]:
    """The stand-in and a second server on another port (a foreign origin)."""
    first, second = _start(synthea_records), _start(synthea_records)
    first.redirect_to = second.origin
    yield first, second
    _stop(first)
    _stop(second)


@pytest.fixture
def server(servers: tuple[StandIn, StandIn]) -> StandIn:
    servers[0].requests.clear()
    servers[1].requests.clear()
    return servers[0]


@pytest.fixture(scope="module")
def patient_id(synthea_records: BundleFolderRecords) -> str:
    return synthea_records.patient_ids()[9]


async def test_it_is_a_clinical_record() -> None:
    assert isinstance(FhirClient("http://x/fhir"), ClinicalRecords)


async def test_reads_both_pages_with_the_right_request(
    server: StandIn, synthea_records: BundleFolderRecords, patient_id: str
) -> None:
    client = FhirClient(f"{server.origin}/ok/fhir/", bearer_token=TOKEN)
    results = await client.laboratory_results(patient_id)
    expected = await synthea_records.laboratory_results(patient_id)
    assert len(results) == len(expected) > 1
    assert set(results) == set(expected)

    assert len(server.requests) == 2
    (first, headers), (second, _) = server.requests
    assert urlsplit(first).path == "/ok/fhir/Observation"
    assert parse_qs(urlsplit(first).query) == {
        "patient": [patient_id],
        "category": ["laboratory"],
        "_sort": ["-date"],
        "_count": ["200"],
    }
    assert parse_qs(urlsplit(second).query)["page"] == ["2"]
    assert headers["Accept"] == "application/fhir+json"
    assert headers["Authorization"] == f"Bearer {TOKEN}"


async def test_no_token_no_authorization_header(server: StandIn, patient_id: str) -> None:
    await FhirClient(f"{server.origin}/ok/fhir").laboratory_results(patient_id)
    assert all("Authorization" not in headers for _, headers in server.requests)


async def test_a_shared_http_client_is_used_and_left_open(server: StandIn, patient_id: str) -> None:
    async with httpx.AsyncClient() as http:
        client = FhirClient(f"{server.origin}/ok/fhir", http=http, page_size=50)
        assert await client.laboratory_results(patient_id)
        assert not http.is_closed
    assert parse_qs(urlsplit(server.requests[0][0]).query)["_count"] == ["50"]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("unauthorized", "refused the credentials (HTTP 401)"),
        ("forbidden", "denied access (HTTP 403)"),
        ("missing", "answered not found (HTTP 404)"),
        ("error", "answered HTTP 500"),
        ("garbage", "sent invalid FHIR: not valid JSON (line 1, column 1)"),
        ("patient", "sent invalid FHIR: expected resourceType Bundle, got Patient"),
        ("outcome", "reported an error in its search result"),
        ("drop", "request failed (RemoteProtocolError)"),
    ],
)
async def test_faults_are_unavailable_without_token_or_patient(
    server: StandIn, patient_id: str, mode: str, reason: str
) -> None:
    client = FhirClient(f"{server.origin}/{mode}/fhir", bearer_token=TOKEN)
    with pytest.raises(SourceUnavailable) as raised:
        await client.laboratory_results(patient_id)
    assert raised.value.source == "FHIR server"
    assert raised.value.reason == reason
    assert TOKEN not in str(raised.value)
    assert patient_id not in str(raised.value)


async def test_an_invalid_resource_does_not_echo_its_values(
    server: StandIn, patient_id: str
) -> None:
    with pytest.raises(SourceUnavailable) as raised:
        await FhirClient(f"{server.origin}/invalid/fhir").laboratory_results(patient_id)
    assert raised.value.reason.startswith("sent invalid FHIR: Bundle is not valid FHIR R4")
    assert patient_id not in str(raised.value)


async def test_a_hanging_server_times_out(server: StandIn, patient_id: str) -> None:
    client = FhirClient(f"{server.origin}/hang/fhir", timeout=0.3)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable) as raised:
        await client.laboratory_results(patient_id)
    assert raised.value.reason == "timed out after 0.3 s"
    assert time.monotonic() - started < 3


async def test_nobody_listening_is_could_not_connect(patient_id: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(SourceUnavailable) as raised:
        await FhirClient(f"http://127.0.0.1:{port}/fhir").laboratory_results(patient_id)
    assert raised.value.reason == "could not connect"


async def test_an_endless_chain_of_pages_stops_at_max_pages(
    server: StandIn, patient_id: str
) -> None:
    client = FhirClient(f"{server.origin}/loop/fhir", max_pages=3)
    with pytest.raises(SourceUnavailable) as raised:
        await client.laboratory_results(patient_id)
    assert raised.value.reason == "more than 3 pages of results"
    assert len(server.requests) == 3


async def test_a_next_link_to_another_origin_is_not_followed(
    servers: tuple[StandIn, StandIn], server: StandIn, patient_id: str
) -> None:
    client = FhirClient(f"{server.origin}/foreign/fhir", bearer_token=TOKEN)
    with pytest.raises(SourceUnavailable) as raised:
        await client.laboratory_results(patient_id)
    assert raised.value.reason == "sent a next link to another server"
    assert servers[1].requests == []


def test_the_token_stays_out_of_the_repr() -> None:
    client = FhirClient("https://ehr.example/fhir", bearer_token=TOKEN)
    assert TOKEN not in repr(client)
    assert client.base_url == "https://ehr.example/fhir"
