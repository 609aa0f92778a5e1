"""Retries, Retry-After, the time budget and the circuit breaker, against a real loopback server.

The real engine (Medplum) cannot be made to answer 429 or 503 on cue, so a stdlib
``http.server`` stands in for it here: a scripted server that answers each request with the
next scripted response (status, headers, body) and, when the script is empty, with an empty
searchset Bundle. It records when each request arrived, so that waits are measured, not assumed.
The breaker's clock is injected; the retry waits are real.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from adapters.fhir.client import FhirClient, FhirHttpError, HttpFhirAccess
from adapters.fhir.resilience import BreakerRegistry, CircuitBreaker, RetryPolicy
from core.errors import SourceUnavailable

pytestmark = pytest.mark.anyio

EMPTY = {"resourceType": "Bundle", "type": "searchset", "total": 0}
PATIENT = "patient-7f3a"
Reply = tuple[int, dict[str, str], Any]


class Scripted(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list[Reply] = []
        self.arrivals: list[float] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"


class Handler(BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test output is for the tests."""

    def do_GET(self) -> None:
        self.server.arrivals.append(time.monotonic())
        status, headers, body = (
            self.server.script.pop(0) if self.server.script else (200, {}, EMPTY)
        )
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[Scripted]:
    server = Scripted()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(scripted_server: Scripted) -> Scripted:
    scripted_server.script.clear()
    scripted_server.arrivals.clear()
    return scripted_server


def _outcome(status: int) -> Reply:
    issue = {"severity": "error", "code": "transient"}
    return status, {}, {"resourceType": "OperationOutcome", "issue": [issue]}


async def test_429_waits_what_retry_after_says_then_succeeds(server: Scripted) -> None:
    server.script = [(429, {"Retry-After": "1"}, b"")]
    client = FhirClient(server.base, retry=RetryPolicy(max_attempts=3, budget=5.0))
    assert await client.laboratory_results(PATIENT) == ()
    first, second = server.arrivals
    assert 0.95 <= second - first < 1.6


async def test_an_http_date_retry_after_is_honoured(server: Scripted) -> None:
    # HTTP-dates have whole seconds: two seconds ahead is a wait of one to two seconds.
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    server.script = [(503, {"Retry-After": when}, b"")]
    client = FhirClient(server.base, retry=RetryPolicy(budget=5.0))
    assert await client.laboratory_results(PATIENT) == ()
    first, second = server.arrivals
    assert 0.9 <= second - first < 2.6


async def test_503_without_retry_after_backs_off_and_succeeds(server: Scripted) -> None:
    server.script = [_outcome(503), _outcome(503)]
    policy = RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.1, budget=5.0)
    assert await FhirClient(server.base, retry=policy).laboratory_results(PATIENT) == ()
    assert len(server.arrivals) == 3
    assert server.arrivals[-1] - server.arrivals[0] < 0.5


async def test_retries_stop_at_max_attempts(server: Scripted) -> None:
    server.script = [(429, {"Retry-After": "0"}, b"")] * 3
    client = FhirClient(server.base, retry=RetryPolicy(max_attempts=3, budget=5.0))
    with pytest.raises(SourceUnavailable) as raised:
        await client.laboratory_results(PATIENT)
    assert raised.value.reason == "answered HTTP 429 3 time(s)"
    assert len(server.arrivals) == 3


async def test_a_retry_after_beyond_the_budget_fails_at_once(server: Scripted) -> None:
    server.script = [(503, {"Retry-After": "30"}, b"")]
    client = FhirClient(server.base, retry=RetryPolicy(budget=2.0))
    started = time.monotonic()
    with pytest.raises(SourceUnavailable) as raised:
        await client.laboratory_results(PATIENT)
    assert time.monotonic() - started < 0.5
    assert raised.value.reason.startswith("answered HTTP 503 and asked to retry in 30 s, beyond")
    assert raised.value.reason.endswith("of its 2 s budget")
    assert len(server.arrivals) == 1


async def test_other_errors_are_not_retried(server: Scripted) -> None:
    for status in (400, 401, 403, 404, 500):
        server.arrivals.clear()
        server.script = [_outcome(status)]
        with pytest.raises(FhirHttpError if status < 500 else SourceUnavailable):
            await FhirClient(server.base).laboratory_results(PATIENT)
        assert len(server.arrivals) == 1, status


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_breaker_opens_fails_fast_and_closes_after_a_good_probe(server: Scripted) -> None:
    clock = Clock()
    breaker = CircuitBreaker(server.base, failure_threshold=2, cool_down=30.0, clock=clock)
    client = FhirClient(server.base, breaker=breaker)
    server.script = [_outcome(500), _outcome(500)]
    for _ in range(2):
        with pytest.raises(SourceUnavailable):
            await client.laboratory_results(PATIENT)
    assert breaker.state == "open"

    clock.now += 12
    with pytest.raises(SourceUnavailable) as raised:
        await client.laboratory_results(PATIENT)
    assert raised.value.reason == "circuit open after 2 consecutive failures; retrying in 18 s"
    assert len(server.arrivals) == 2  # failed fast: the server was not asked

    clock.now += 18
    assert await client.laboratory_results(PATIENT) == ()  # the half-open probe succeeds
    assert breaker.state == "closed"
    assert len(server.arrivals) == 3


async def test_a_failed_probe_opens_the_breaker_again(server: Scripted) -> None:
    clock = Clock()
    breaker = CircuitBreaker(server.base, failure_threshold=1, cool_down=10.0, clock=clock)
    client = FhirClient(server.base, breaker=breaker)
    server.script = [_outcome(500), _outcome(503)]
    with pytest.raises(SourceUnavailable):
        await client.laboratory_results(PATIENT)
    clock.now += 10
    with pytest.raises(SourceUnavailable):
        # The probe: its 503 is not retried past the budget, and it re-opens the breaker.
        await FhirClient(
            server.base, breaker=breaker, retry=RetryPolicy(max_attempts=1)
        ).laboratory_results(PATIENT)
    assert breaker.state == "open"
    with pytest.raises(SourceUnavailable) as raised:
        await client.laboratory_results(PATIENT)
    assert raised.value.reason.startswith("circuit open after 2 consecutive failures")


async def test_only_a_single_probe_goes_out_while_half_open() -> None:
    clock = Clock()
    breaker = CircuitBreaker("x", failure_threshold=1, cool_down=5.0, clock=clock)
    breaker.record_failure()
    clock.now += 5
    breaker.before_request()
    assert breaker.state == "half-open"
    with pytest.raises(SourceUnavailable) as raised:
        breaker.before_request()
    assert raised.value.reason == "circuit half-open; a probe request is in flight"
    breaker.release()  # the probe was cancelled: the next request probes instead
    breaker.before_request()
    assert breaker.state == "half-open"


async def test_refusals_do_not_count_against_the_server(server: Scripted) -> None:
    breaker = CircuitBreaker(server.base, failure_threshold=2, clock=Clock())
    client = FhirClient(server.base, breaker=breaker)
    server.script = [_outcome(401), _outcome(403), _outcome(404), _outcome(404)]
    for _ in range(4):
        with pytest.raises(FhirHttpError):
            await client.laboratory_results(PATIENT)
    assert breaker.state == "closed"


async def test_connect_errors_and_timeouts_count(server: Scripted) -> None:
    breaker = CircuitBreaker("dead", failure_threshold=2, clock=Clock())
    nobody = FhirClient("http://127.0.0.1:9/fhir", breaker=breaker)
    with pytest.raises(SourceUnavailable):
        await nobody.laboratory_results(PATIENT)
    assert breaker.state == "closed"
    with pytest.raises(SourceUnavailable):
        await nobody.laboratory_results(PATIENT)
    assert breaker.state == "open"


async def test_clients_of_one_access_share_the_breaker_of_their_origin(server: Scripted) -> None:
    clock = Clock()
    async with httpx.AsyncClient() as http:
        access = HttpFhirAccess(
            http, timeout=2.0, breakers=BreakerRegistry(failure_threshold=2, clock=clock)
        )
        server.script = [_outcome(500), _outcome(500)]
        for token in ("token-a", "token-b"):
            with pytest.raises(SourceUnavailable):
                await access.fetcher(server.base, token).fetch("Observation?patient=x")
        with pytest.raises(SourceUnavailable) as raised:
            await access.fetcher(f"{server.base}/other", "token-c").fetch("Patient/x")
        assert raised.value.reason.startswith("circuit open after 2 consecutive failures")
        assert access.breakers.for_url(server.base).state == "open"
        assert len(server.arrivals) == 2


def _observation(oid: str, **value: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "category": [{"coding": [{"code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
        "subject": {"reference": f"Patient/{PATIENT}"},
        **value,
    }


async def test_observations_without_value_or_unit_are_skipped_and_counted(
    server: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"resource": _observation("o1", valueQuantity={"value": 5.5, "unit": "mmol/L"})},
            {"resource": _observation("o2")},
            {"resource": _observation("o3", valueQuantity={"value": 99})},
            {"resource": {"resourceType": "Patient", "id": "wrong-type"}},
        ],
    }
    server.script = [(200, {}, bundle)]
    with caplog.at_level(logging.INFO, logger="adapters.fhir.observations"):
        (glucose,) = await FhirClient(server.base).laboratory_results(PATIENT)
    assert (glucose.value, glucose.unit, glucose.source) == (99.088, "mg/dL", "Observation/o1")
    assert "skipped 2 Observation(s): no numeric value 1, no unit 1" in caplog.text
    assert PATIENT not in caplog.text
