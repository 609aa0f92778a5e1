"""A FHIR R4 REST server: prefetch queries run by the service, a clinical record, and imaging.

When a CDS Hooks request carries ``fhirServer`` and an access token but lacks a prefetch key,
the service runs the key's template query itself (:meth:`FhirClient.fetch`), page by page, so
that what it reads is what a prefetch would have held. :meth:`FhirClient.laboratory_results`,
:meth:`~FhirClient.patient`, :meth:`~FhirClient.imaging_studies` and
:meth:`~FhirClient.radiology_reports` read a live server for ingestion.

Every failure (no connection, timeout, an HTTP error, a body that is not a FHIR Bundle) becomes
:class:`core.errors.SourceUnavailable` with source ``"FHIR server"`` (an HTTP error status
becomes its subclass :class:`FhirHttpError`) and a reason that holds neither the token nor the
patient id, which travel in the URL and headers only. A ``next`` link that leaves the server's
origin is refused, because following it would hand the bearer token to another host.

Reads are retried on 429 and 503 within a time budget, and a circuit breaker per server stops
asking a failing one (:mod:`adapters.fhir.resilience`). The token is either fixed (the hook's
``fhirAuthorization``) or comes from a :class:`TokenSource` (SMART Backend Services for
ingestion, :mod:`adapters.fhir.smart_backend`); a 401 makes a token source issue a new token,
once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urljoin

import httpx
from fhir.resources.R4B.patient import Patient

from adapters.fhir.observations import lab_results
from adapters.fhir.parse import (
    InvalidFhirContent,
    bundle_resources,
    next_link,
    parse_bundle,
    parse_patient,
    reports_error,
    resource_type_of,
)
from adapters.fhir.radiology import (
    ImagingStudyRecord,
    RadiologyReport,
    imaging_study_record,
    radiology_report,
)
from adapters.fhir.resilience import BreakerRegistry, CircuitBreaker, RetryPolicy, origin_of
from adapters.retry_after import retry_after_seconds
from core.errors import SourceUnavailable
from core.types import LabResult

__all__ = ["FHIR_JSON", "FhirClient", "FhirHttpError", "HttpFhirAccess", "TokenSource"]

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

_SOURCE = "FHIR server"

_RETRIED = frozenset({429, 503})


def _status_reason(status: int) -> str:
    if status == 401:
        return "refused the credentials (HTTP 401)"
    if status == 403:
        return "denied access (HTTP 403)"
    if status == 404:
        return "answered not found (HTTP 404)"
    return f"answered HTTP {status}"


class FhirHttpError(SourceUnavailable):
    """The server answered with an HTTP error status.

    Args:
        status: the HTTP status code.
        reason: why, in words safe to log.

    Examples:
        >>> error = FhirHttpError(403, "denied access (HTTP 403)")
        >>> error.status, str(error)
        (403, 'FHIR server unavailable: denied access (HTTP 403)')
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(_SOURCE, reason)
        self.status = status


class _ServerFailure(Exception):
    """A failure that says the server is unhealthy: it counts against the circuit breaker."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class TokenSource(Protocol):
    """Where a client gets its bearer token when it is not a fixed one (SMART Backend Services).

    Implementations cache the token; :meth:`invalidate` makes the next :meth:`access_token`
    obtain a new one.
    """

    async def access_token(self) -> str:
        """A current access token.

        Raises:
            SourceUnavailable: no token could be obtained.
        """
        ...

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the server refused it)."""
        ...


class FhirClient:
    """Laboratory results, patients and imaging from a FHIR R4 server's REST API.

    Implements :class:`core.ports.ClinicalRecords`.

    Args:
        base_url: the server's base URL (``https://ehr.example/fhir``), as CDS Hooks'
            ``fhirServer`` gives it.
        bearer_token: a fixed access token to send as ``Authorization: Bearer``, if any.
        timeout: seconds allowed for each HTTP request (connect, read, write, pool).
        http: a shared client for connection pooling; it stays open when this object is done.
            When ``None``, each call opens and closes its own.
        page_size: the ``_count`` asked for per page.
        max_pages: the most pages read for one search; a search with more fails rather than
            returning a silently truncated record.
        token_source: where to get the token instead (exclusive with ``bearer_token``).
        retry: how reads answered 429 or 503 are retried; the default tries 3 times within a
            budget of ``timeout`` seconds.
        breaker: the circuit breaker of this server (normally from a
            :class:`~adapters.fhir.resilience.BreakerRegistry`); ``None`` for none.

    Raises:
        ValueError: both ``bearer_token`` and ``token_source`` are given.

    Examples:
        >>> client = FhirClient("https://ehr.example/fhir", bearer_token="secret")
        >>> client
        FhirClient('https://ehr.example/fhir')
        >>> # await client.laboratory_results("123") -> (LabResult(...), ...)
    """

    __slots__ = (
        "_base_url",
        "_breaker",
        "_http",
        "_max_pages",
        "_page_size",
        "_retry",
        "_rng",
        "_timeout",
        "_token",
        "_token_source",
    )

    def __init__(
        self,
        base_url: str,
        *,
        bearer_token: str | None = None,
        timeout: float = 10.0,
        http: httpx.AsyncClient | None = None,
        page_size: int = 200,
        max_pages: int = 50,
        token_source: TokenSource | None = None,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if bearer_token and token_source is not None:
            raise ValueError("give a bearer token or a token source, not both")
        self._base_url = base_url.rstrip("/")
        self._token = bearer_token
        self._token_source = token_source
        self._timeout = timeout
        self._http = http
        self._page_size = page_size
        self._max_pages = max_pages
        self._retry = retry or RetryPolicy()
        self._breaker = breaker
        # Jitter only spreads retries apart; it is not a secret.
        self._rng = random.Random()  # noqa: S311

    def __repr__(self) -> str:
        # The token stays out of reprs, tracebacks and logs.
        return f"{type(self).__name__}({self._base_url!r})"

    @property
    def base_url(self) -> str:
        """The server's base URL, without a trailing slash."""
        return self._base_url

    async def _bearer(self) -> str | None:
        if self._token_source is not None:
            return await self._token_source.access_token()
        return self._token

    async def _attempt(
        self, http: httpx.AsyncClient, url: str, token: str | None, seconds: float
    ) -> httpx.Response:
        headers = {"Accept": FHIR_JSON}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            return await http.get(url, headers=headers, timeout=seconds)
        except httpx.TimeoutException as error:
            raise _ServerFailure(f"timed out after {round(seconds, 2):g} s") from error
        except httpx.ConnectError as error:
            raise _ServerFailure("could not connect") from error
        except httpx.HTTPError as error:
            raise _ServerFailure(f"request failed ({type(error).__name__})") from error

    async def _with_retries(
        self, http: httpx.AsyncClient, url: str, token: str | None
    ) -> httpx.Response:
        """One read, retried on 429/503 as :attr:`_retry` allows; a 2xx-4xx answer is returned,
        anything that says the server is unhealthy raises :class:`_ServerFailure`."""
        policy = self._retry
        budget = policy.budget if policy.budget is not None else self._timeout
        deadline = time.monotonic() + budget
        timeout = self._timeout
        attempt = 1
        while True:
            response = await self._attempt(http, url, token, timeout)
            status = response.status_code
            if status not in _RETRIED:
                if status >= 500:
                    raise _ServerFailure(_status_reason(status), status)
                return response
            if attempt >= policy.max_attempts:
                raise _ServerFailure(f"answered HTTP {status} {attempt} time(s)", status)
            asked = retry_after_seconds(response.headers.get("Retry-After"))
            delay = asked if asked is not None else policy.backoff(attempt, self._rng)
            left = deadline - time.monotonic()
            if delay >= left:
                raise _ServerFailure(
                    f"answered HTTP {status} and asked to retry in {delay:.3g} s, beyond the "
                    f"{max(left, 0.0):.3g} s left of its {budget:g} s budget",
                    status,
                )
            logger.info("HTTP %d; retry %d in %.2f s", status, attempt, delay)
            await asyncio.sleep(delay)
            timeout = min(self._timeout, deadline - time.monotonic())
            attempt += 1

    async def _checked(self, http: httpx.AsyncClient, url: str) -> httpx.Response:
        """A read through the circuit breaker."""
        breaker = self._breaker
        if breaker is not None:
            breaker.before_request()
        try:
            response = await self._with_retries(http, url, await self._bearer())
            if response.status_code == 401 and self._token_source is not None:
                # An expired or revoked token: one more try with a fresh one.
                self._token_source.invalidate(response.request.headers["Authorization"][7:])
                response = await self._with_retries(http, url, await self._bearer())
        except _ServerFailure as failure:
            if breaker is not None:
                breaker.record_failure()
            raise SourceUnavailable(_SOURCE, failure.reason) from failure.__cause__
        except BaseException:
            # Neither the server's success nor its failure (no token, a cancelled call): a
            # probe must not leave the breaker half-open for ever.
            if breaker is not None:
                breaker.release()
            raise
        if breaker is not None:
            # Also a refusal (401, 403, 404): the server answered, so it is healthy.
            breaker.record_success()
        return response

    async def _get_json(self, http: httpx.AsyncClient, url: str) -> bytes:
        response = await self._checked(http, url)
        if response.status_code != 200:
            raise FhirHttpError(response.status_code, _status_reason(response.status_code))
        return response.content

    async def _fetch(self, http: httpx.AsyncClient, query: str) -> dict[str, Any]:
        origin = origin_of(self._base_url)
        url: str | None = f"{self._base_url}/{query.lstrip('/')}"
        first: dict[str, Any] | None = None
        entries: list[Any] = []
        pages = 0
        while url is not None:
            if pages == self._max_pages:
                raise SourceUnavailable(_SOURCE, f"more than {self._max_pages} pages of results")
            body = await self._get_json(http, url)
            pages += 1
            try:
                content = json.loads(body)
            except json.JSONDecodeError as error:
                raise SourceUnavailable(
                    _SOURCE,
                    f"sent invalid FHIR: not valid JSON (line {error.lineno}, "
                    f"column {error.colno})",
                ) from None
            except UnicodeDecodeError:
                raise SourceUnavailable(_SOURCE, "sent invalid FHIR: not UTF-8 text") from None
            kind = content.get("resourceType") if isinstance(content, dict) else None
            # resource_type_of answers in words unless the type is a well-formed FHIR type name.
            if not isinstance(content, dict) or resource_type_of(content) != kind:
                raise SourceUnavailable(_SOURCE, "sent something that is not a FHIR resource")
            if kind == "OperationOutcome":
                raise SourceUnavailable(_SOURCE, "answered with an OperationOutcome")
            if kind != "Bundle":
                return dict(content)
            try:
                bundle = parse_bundle(content)
            except InvalidFhirContent as error:
                raise SourceUnavailable(_SOURCE, f"sent invalid FHIR: {error.reason}") from error
            if reports_error(bundle_resources(bundle)):
                raise SourceUnavailable(_SOURCE, "reported an error in its search result")
            first = first or content
            entries.extend(content.get("entry") or ())
            following = next_link(bundle)
            url = urljoin(url, following) if following else None
            if url is not None and origin_of(url) != origin:
                raise SourceUnavailable(_SOURCE, "sent a next link to another server")
        assert first is not None
        merged = {**first, "entry": entries}
        links = [link for link in first.get("link") or () if link.get("relation") != "next"]
        merged.pop("link", None)
        if links:
            merged["link"] = links
        if not entries:
            merged.pop("entry")
        logger.debug("read %d entries in %d page(s)", len(entries), pages)
        return merged

    async def fetch(self, query: str) -> dict[str, Any]:
        """Run a FHIR read or search relative to the base URL, following ``next`` links.

        Args:
            query: ``Patient/123`` or ``Observation?patient=123&category=laboratory``, as a
                CDS Hooks prefetch template gives it once its tokens are filled in.

        Returns:
            The resource read, or the search's Bundle with the entries of all its pages (and
            no ``next`` link).

        Raises:
            FhirHttpError: the server answered with an HTTP error status (after the retries,
                for 429 and 503).
            SourceUnavailable: the server could not be reached or timed out, its circuit is
                open, it answered with an OperationOutcome, sent something that is not valid
                FHIR or a Bundle reporting an error, sent a ``next`` link to another origin, or
                had more than ``max_pages`` pages.
        """
        if self._http is not None:
            return await self._fetch(self._http, query)
        async with httpx.AsyncClient() as http:
            return await self._fetch(http, query)

    async def _search(self, resource_type: str, params: dict[str, str]) -> list[Any]:
        """The validated resources of a search, all pages."""
        query = urlencode({**params, "_count": str(self._page_size)})
        try:
            bundle = parse_bundle(await self.fetch(f"{resource_type}?{query}"))
        except InvalidFhirContent as error:
            raise SourceUnavailable(_SOURCE, f"sent invalid FHIR: {error.reason}") from error
        return bundle_resources(bundle)

    async def laboratory_results(self, patient_id: str) -> tuple[LabResult, ...]:
        """The patient's numeric laboratory results, following ``next`` links.

        Args:
            patient_id: the FHIR id of the patient.

        Returns:
            The results of all pages, in the server's order, in the lab panel's units
            (:mod:`adapters.fhir.units`); Observations without a value or a unit are skipped
            and counted in the log.

        Raises:
            SourceUnavailable: as :meth:`fetch`, or a resource is not valid FHIR.
        """
        params = {"patient": patient_id, "category": "laboratory", "_sort": "-date"}
        resources = await self._search("Observation", params)
        return tuple(lab_results(resources, patient_id=patient_id))

    async def patient(self, patient_id: str) -> Patient | None:
        """The Patient, or ``None`` when the server does not know it (HTTP 404).

        Raises:
            SourceUnavailable: as :meth:`fetch`, or the answer is not a valid Patient.
        """
        try:
            content = await self.fetch(f"Patient/{quote(patient_id, safe='')}")
        except FhirHttpError as error:
            if error.status in (404, 410):
                return None
            raise
        try:
            return parse_patient(content)
        except InvalidFhirContent as error:
            raise SourceUnavailable(_SOURCE, f"sent invalid FHIR: {error.reason}") from error

    async def imaging_studies(self, patient_id: str) -> tuple[ImagingStudyRecord, ...]:
        """The patient's ImagingStudy resources as records, in the server's order.

        Raises:
            SourceUnavailable: as :meth:`fetch`, or a resource is not valid FHIR.
        """
        found: list[ImagingStudyRecord] = []
        for resource in await self._search("ImagingStudy", {"patient": patient_id}):
            record = (
                imaging_study_record(resource)
                if resource.get_resource_type() == "ImagingStudy"
                else None
            )
            if record is not None:
                found.append(record)
        return tuple(found)

    async def radiology_reports(self, patient_id: str) -> tuple[RadiologyReport, ...]:
        """The patient's radiology DiagnosticReports as records, in the server's order.

        The search asks for category ``LP29684-5`` or ``RAD``; the answer is checked again, so
        a server that ignores the category still yields radiology reports only.

        Raises:
            SourceUnavailable: as :meth:`fetch`, or a resource is not valid FHIR.
        """
        params = {"patient": patient_id, "category": "LP29684-5,RAD"}
        found: list[RadiologyReport] = []
        for resource in await self._search("DiagnosticReport", params):
            record = (
                radiology_report(resource)
                if resource.get_resource_type() == "DiagnosticReport"
                else None
            )
            if record is not None:
                found.append(record)
        return tuple(found)

    async def search_resources(self, query: str) -> list[dict[str, Any]]:
        """The resources of any search, all pages, as FHIR JSON (for ingestion).

        Args:
            query: ``DiagnosticReport?category=RAD``; ``_count`` is added when missing.

        Raises:
            SourceUnavailable: as :meth:`fetch`; or the answer is not a Bundle.
        """
        if "_count=" not in query:
            query += f"{'&' if '?' in query else '?'}_count={self._page_size}"
        content = await self.fetch(query)
        if content.get("resourceType") != "Bundle":
            raise SourceUnavailable(_SOURCE, "answered a search with something not a Bundle")
        return [
            entry["resource"]
            for entry in content.get("entry") or ()
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict)
        ]


class HttpFhirAccess:
    """Makes :class:`FhirClient` fetchers for the FHIR servers that hook calls name.

    All the clients it makes share one circuit breaker per server origin.

    Args:
        http: the shared HTTP client (connection pooling); it is not closed here.
        timeout: seconds allowed for each HTTP request.
        retry: the clients' retry policy (default: :class:`RetryPolicy`).
        breakers: the breakers (default: a new :class:`BreakerRegistry`).
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        timeout: float,
        retry: RetryPolicy | None = None,
        breakers: BreakerRegistry | None = None,
    ) -> None:
        self._http = http
        self._timeout = timeout
        self._retry = retry
        self.breakers = breakers or BreakerRegistry()

    def fetcher(self, base_url: str, access_token: str | None) -> FhirClient:
        """A client of ``base_url`` presenting ``access_token`` (kept for this call only)."""
        return FhirClient(
            base_url,
            bearer_token=access_token,
            timeout=self._timeout,
            http=self._http,
            retry=self._retry,
            breaker=self.breakers.for_url(base_url),
        )
