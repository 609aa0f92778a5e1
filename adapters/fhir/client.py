"""A FHIR R4 REST server: prefetch queries run by the service, and a clinical record.

When a CDS Hooks request carries ``fhirServer`` and an access token but lacks a prefetch key,
the service runs the key's template query itself (:meth:`FhirClient.fetch`), page by page, so
that what it reads is what a prefetch would have held. :meth:`FhirClient.laboratory_results`
runs the labs template's query for ingestion from a live server.

Every failure (no connection, timeout, an HTTP error, a body that is not a FHIR Bundle) becomes
:class:`core.errors.SourceUnavailable` with source ``"FHIR server"`` and a reason that holds
neither the token nor the patient id, which travel in the URL and headers only. Retries and a
circuit breaker belong to a later layer; a ``next`` link that leaves the server's origin is
refused, because following it would hand the bearer token to another host.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from adapters.fhir.observations import lab_results
from adapters.fhir.parse import (
    InvalidFhirContent,
    bundle_resources,
    next_link,
    parse_bundle,
    reports_error,
    resource_type_of,
)
from core.errors import SourceUnavailable
from core.types import LabResult

__all__ = ["FHIR_JSON", "FhirClient", "HttpFhirAccess"]

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

_SOURCE = "FHIR server"


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _status_reason(status: int) -> str:
    if status == 401:
        return "refused the credentials (HTTP 401)"
    if status == 403:
        return "denied access (HTTP 403)"
    if status == 404:
        return "answered not found (HTTP 404)"
    return f"answered HTTP {status}"


class FhirClient:
    """Laboratory results from a FHIR R4 server's REST API.

    Implements :class:`core.ports.ClinicalRecords`.

    Args:
        base_url: the server's base URL (``https://ehr.example/fhir``), as CDS Hooks'
            ``fhirServer`` gives it.
        bearer_token: the access token to send as ``Authorization: Bearer``, if any.
        timeout: seconds allowed for each HTTP request (connect, read, write, pool).
        http: a shared client for connection pooling; it stays open when this object is done.
            When ``None``, each call opens and closes its own.
        page_size: the ``_count`` asked for per page.
        max_pages: the most pages read for one patient; a search with more fails rather than
            returning a silently truncated record.

    Examples:
        >>> client = FhirClient("https://ehr.example/fhir", bearer_token="secret")
        >>> client
        FhirClient('https://ehr.example/fhir')
        >>> # await client.laboratory_results("123") -> (LabResult(...), ...)
    """

    __slots__ = ("_base_url", "_http", "_max_pages", "_page_size", "_timeout", "_token")

    def __init__(
        self,
        base_url: str,
        *,
        bearer_token: str | None = None,
        timeout: float = 10.0,
        http: httpx.AsyncClient | None = None,
        page_size: int = 200,
        max_pages: int = 50,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._token = bearer_token
        self._timeout = timeout
        self._http = http
        self._page_size = page_size
        self._max_pages = max_pages

    def __repr__(self) -> str:
        # The token stays out of reprs, tracebacks and logs.
        return f"{type(self).__name__}({self._base_url!r})"

    @property
    def base_url(self) -> str:
        """The server's base URL, without a trailing slash."""
        return self._base_url

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": FHIR_JSON}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    async def _get_json(
        self, http: httpx.AsyncClient, url: str, params: dict[str, str] | None
    ) -> bytes:
        try:
            response = await http.get(
                url, params=params, headers=self._headers(), timeout=self._timeout
            )
        except httpx.TimeoutException as error:
            raise SourceUnavailable(_SOURCE, f"timed out after {self._timeout:g} s") from error
        except httpx.ConnectError as error:
            raise SourceUnavailable(_SOURCE, "could not connect") from error
        except httpx.HTTPError as error:
            raise SourceUnavailable(_SOURCE, f"request failed ({type(error).__name__})") from error
        if response.status_code != 200:
            raise SourceUnavailable(_SOURCE, _status_reason(response.status_code))
        return response.content

    async def _fetch(self, http: httpx.AsyncClient, query: str) -> dict[str, Any]:
        origin = _origin(self._base_url)
        url: str | None = f"{self._base_url}/{query.lstrip('/')}"
        first: dict[str, Any] | None = None
        entries: list[Any] = []
        pages = 0
        while url is not None:
            if pages == self._max_pages:
                raise SourceUnavailable(_SOURCE, f"more than {self._max_pages} pages of results")
            body = await self._get_json(http, url, None)
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
            if url is not None and _origin(url) != origin:
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
            SourceUnavailable: the server could not be reached, timed out, answered with an HTTP
                error or an OperationOutcome, sent something that is not valid FHIR or a Bundle
                reporting an error, sent a ``next`` link to another origin, or had more than
                ``max_pages`` pages.
        """
        if self._http is not None:
            return await self._fetch(self._http, query)
        async with httpx.AsyncClient() as http:
            return await self._fetch(http, query)

    async def laboratory_results(self, patient_id: str) -> tuple[LabResult, ...]:
        """The patient's numeric laboratory results, following ``next`` links.

        Args:
            patient_id: the FHIR id of the patient.

        Returns:
            The results of all pages, in the server's order.

        Raises:
            SourceUnavailable: the server could not be reached, timed out, answered with an HTTP
                error, sent something that is not a valid FHIR Bundle or a Bundle reporting an
                error (an OperationOutcome with an error issue), sent a ``next`` link to another
                origin, or had more than ``max_pages`` pages.
        """
        query = urlencode(
            {
                "patient": patient_id,
                "category": "laboratory",
                "_sort": "-date",
                "_count": str(self._page_size),
            }
        )
        try:
            bundle = parse_bundle(await self.fetch(f"Observation?{query}"))
        except InvalidFhirContent as error:
            raise SourceUnavailable(_SOURCE, f"sent invalid FHIR: {error.reason}") from error
        return tuple(lab_results(bundle_resources(bundle), patient_id=patient_id))


class HttpFhirAccess:
    """Makes :class:`FhirClient` fetchers for the FHIR servers that hook calls name.

    Args:
        http: the shared HTTP client (connection pooling); it is not closed here.
        timeout: seconds allowed for each HTTP request.
    """

    def __init__(self, http: httpx.AsyncClient, *, timeout: float) -> None:
        self._http = http
        self._timeout = timeout

    def fetcher(self, base_url: str, access_token: str | None) -> FhirClient:
        """A client of ``base_url`` presenting ``access_token`` (kept for this call only)."""
        return FhirClient(
            base_url, bearer_token=access_token, timeout=self._timeout, http=self._http
        )
