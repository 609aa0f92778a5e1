"""FHIR Bulk Data export: a server's records as NDJSON files, and those files as a clinical record.

Ingesting a whole EHR one patient search at a time is slow; the FHIR Bulk Data Access
specification (v2.0, "Export") has the server write everything out instead. :class:`BulkExport`
follows its asynchronous request pattern: a kick-off (``GET [base]/Patient/$export`` with
``Prefer: respond-async``) answered 202 with a status URL in ``Content-Location``; polls of that
URL answered 202 (with ``Retry-After`` and ``X-Progress``) until a 200 carries the manifest; then
one GET per output file, each NDJSON (one resource per line).

Choices a reader should know:

* Polling waits what ``Retry-After`` says (else 1 s), and gives up after ``poll_timeout`` seconds.
* The access token is sent only to URLs on the FHIR server's own origin; an output file
  elsewhere that the manifest says needs the token is refused rather than leaking it.
* Downloads are resumable: the manifest is saved in the folder first, each file is written
  aside and renamed when complete, and a later run with the same folder downloads only what is
  missing, without a new export.

:class:`NdjsonRecords` reads such a folder: laboratory results (it implements
:class:`core.ports.ClinicalRecords`, as :class:`~adapters.fhir.bundle_folder.BundleFolderRecords`
does) and the resources of any type (Patient, ImagingStudy, DiagnosticReport) as FHIR JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import httpx

from adapters.fhir.client import FHIR_JSON, TokenSource
from adapters.fhir.observations import is_laboratory, lab_results, refers_to_patient
from adapters.fhir.parse import InvalidFhirContent, parse_observation
from adapters.fhir.resilience import origin_of
from adapters.retry_after import retry_after_seconds
from core.errors import SourceUnavailable
from core.types import LabResult

__all__ = ["MANIFEST_FILE", "BulkExport", "ExportFile", "ExportManifest", "NdjsonRecords"]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
"""The export's manifest, saved in the download folder (it makes a download resumable)."""

_SOURCE = "FHIR bulk export"
_FOLDER_SOURCE = "NDJSON folder"


@dataclass(frozen=True, slots=True)
class ExportFile:
    """One output file of an export: its resource type, URL and line count (when given)."""

    resource_type: str
    url: str
    count: int | None = None


@dataclass(frozen=True, slots=True)
class ExportManifest:
    """A completed export.

    Args:
        transaction_time: the server's time the export reflects.
        requires_token: whether the output files need the access token.
        files: the output files.
    """

    transaction_time: str
    requires_token: bool
    files: tuple[ExportFile, ...]

    @classmethod
    def from_json(cls, content: Any) -> ExportManifest:
        """Read a manifest.

        Raises:
            SourceUnavailable: it is not a Bulk Data manifest.
        """
        try:
            files = tuple(
                ExportFile(str(item["type"]), str(item["url"]), item.get("count"))
                for item in content["output"]
            )
            return cls(str(content["transactionTime"]), bool(content["requiresAccessToken"]), files)
        except (KeyError, TypeError) as error:
            raise SourceUnavailable(_SOURCE, "sent a manifest that is not one") from error

    def to_json(self) -> dict[str, Any]:
        """The manifest as the server sent it (the fields this module reads)."""
        return {
            "transactionTime": self.transaction_time,
            "requiresAccessToken": self.requires_token,
            "output": [
                {"type": f.resource_type, "url": f.url, "count": f.count} for f in self.files
            ],
        }


def _write_whole(path: Path, content: bytes) -> None:
    """Write aside and rename, so that a file that exists is complete."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(content)
    os.replace(partial, path)


class BulkExport:
    """A Bulk Data export client for one FHIR server.

    Args:
        base_url: the FHIR server's base URL.
        bearer_token: a fixed access token, if any.
        token_source: where to get the token instead (SMART Backend Services).
        http: a shared HTTP client (left open); ``None`` opens one per call.
        timeout: seconds allowed for each HTTP request.
        poll_timeout: seconds the export may take before the client gives up.
        sleep: how to wait between polls (tests may pass their own).

    Examples:
        >>> BulkExport("https://ehr.example/fhir")
        BulkExport('https://ehr.example/fhir')
        >>> # manifest = await BulkExport(base, token_source=auth).export_to(Path("export"))
    """

    def __init__(
        self,
        base_url: str,
        *,
        bearer_token: str | None = None,
        token_source: TokenSource | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = 30.0,
        poll_timeout: float = 600.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._token = bearer_token
        self._token_source = token_source
        self._http = http
        self._timeout = timeout
        self._poll_timeout = poll_timeout
        self._sleep = sleep
        self._origin = origin_of(self._base_url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._base_url!r})"

    async def _headers(self, url: str, accept: str, *, token: bool = True) -> dict[str, str]:
        headers = {"Accept": accept}
        if token and origin_of(url) == self._origin:
            bearer = await self._token_source.access_token() if self._token_source else self._token
            if bearer:
                headers["Authorization"] = f"Bearer {bearer}"
        return headers

    async def _get(
        self, http: httpx.AsyncClient, url: str, headers: dict[str, str]
    ) -> httpx.Response:
        try:
            return await http.get(url, headers=headers, timeout=self._timeout)
        except httpx.TimeoutException as error:
            raise SourceUnavailable(_SOURCE, f"timed out after {self._timeout:g} s") from error
        except httpx.HTTPError as error:
            raise SourceUnavailable(_SOURCE, f"request failed ({type(error).__name__})") from error

    async def _run(self, work: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
        if self._http is not None:
            return await work(self._http)
        async with httpx.AsyncClient() as http:
            return await work(http)

    async def kick_off(
        self, *, level: Literal["patient", "system"] = "patient", types: Sequence[str] = ()
    ) -> str:
        """Start an export.

        Args:
            level: ``patient`` (``Patient/$export``: the Patient compartment) or ``system``.
            types: the resource types wanted (``_type``); all when empty.

        Returns:
            The status URL to poll.

        Raises:
            SourceUnavailable: the server did not accept the export.
        """
        path = "Patient/$export" if level == "patient" else "$export"
        query = f"?{urlencode({'_type': ','.join(types)})}" if types else ""
        url = f"{self._base_url}/{path}{query}"

        async def work(http: httpx.AsyncClient) -> str:
            headers = await self._headers(url, FHIR_JSON)
            response = await self._get(http, url, {**headers, "Prefer": "respond-async"})
            status_url = response.headers.get("Content-Location")
            if response.status_code != 202 or not status_url:
                raise SourceUnavailable(
                    _SOURCE, f"kick-off answered HTTP {response.status_code}, not 202"
                )
            return str(status_url)

        status_url: str = await self._run(work)
        return status_url

    async def wait(self, status_url: str) -> ExportManifest:
        """Poll the status URL until the export is complete.

        Raises:
            SourceUnavailable: the export failed, or was not complete within ``poll_timeout``.
        """

        async def work(http: httpx.AsyncClient) -> ExportManifest:
            deadline = time.monotonic() + self._poll_timeout
            while True:
                headers = await self._headers(status_url, "application/json")
                response = await self._get(http, status_url, headers)
                if response.status_code == 200:
                    try:
                        return ExportManifest.from_json(response.json())
                    except ValueError as error:
                        raise SourceUnavailable(
                            _SOURCE, "sent a manifest that is not JSON"
                        ) from error
                if response.status_code not in (202, 429):
                    raise SourceUnavailable(_SOURCE, f"status answered HTTP {response.status_code}")
                delay = retry_after_seconds(response.headers.get("Retry-After"))
                delay = 1.0 if delay is None else delay
                if time.monotonic() + delay > deadline:
                    raise SourceUnavailable(
                        _SOURCE, f"export not complete within {self._poll_timeout:g} s"
                    )
                logger.info("export in progress (%s)", response.headers.get("X-Progress", "?"))
                await self._sleep(delay)

        manifest: ExportManifest = await self._run(work)
        return manifest

    async def download(self, manifest: ExportManifest, folder: Path) -> tuple[Path, ...]:
        """Download the output files into ``folder``, skipping those already complete.

        Returns:
            The files, ``<n>-<type>.ndjson`` in manifest order.

        Raises:
            SourceUnavailable: a download failed, or a file on another server needs the token.
        """
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)

        async def work(http: httpx.AsyncClient) -> tuple[Path, ...]:
            paths = []
            for number, output in enumerate(manifest.files):
                path = folder / f"{number:03d}-{output.resource_type}.ndjson"
                paths.append(path)
                if await asyncio.to_thread(path.is_file):
                    continue
                if manifest.requires_token and origin_of(output.url) != self._origin:
                    raise SourceUnavailable(
                        _SOURCE, "an output file on another server requires the access token"
                    )
                accept = "application/fhir+ndjson"
                headers = await self._headers(output.url, accept, token=manifest.requires_token)
                response = await self._get(http, output.url, headers)
                if response.status_code != 200:
                    raise SourceUnavailable(
                        _SOURCE, f"an output file answered HTTP {response.status_code}"
                    )
                await asyncio.to_thread(_write_whole, path, response.content)
            return tuple(paths)

        paths: tuple[Path, ...] = await self._run(work)
        return paths

    async def export_to(
        self,
        folder: str | os.PathLike[str],
        *,
        level: Literal["patient", "system"] = "patient",
        types: Sequence[str] = (),
    ) -> ExportManifest:
        """Export into ``folder``, or finish an earlier export's download there.

        Returns:
            The manifest (also saved as ``MANIFEST_FILE`` in the folder).

        Raises:
            SourceUnavailable: as :meth:`kick_off`, :meth:`wait` and :meth:`download`.
        """
        out = Path(folder)
        saved = out / MANIFEST_FILE
        if await asyncio.to_thread(saved.is_file):
            content = await asyncio.to_thread(saved.read_bytes)
            manifest = ExportManifest.from_json(json.loads(content))
        else:
            manifest = await self.wait(await self.kick_off(level=level, types=types))
            await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
            text = json.dumps(manifest.to_json(), indent=1).encode()
            await asyncio.to_thread(_write_whole, saved, text)
        await self.download(manifest, out)
        return manifest


class NdjsonRecords:
    """Clinical records read from a folder of NDJSON files (a Bulk Data export).

    Implements :class:`core.ports.ClinicalRecords`. Lines that are not a JSON resource are
    counted in a warning and left out.

    Args:
        folder: the folder (``*.ndjson``, any names; each line says its resource type).

    Raises:
        NotADirectoryError: ``folder`` is not a directory.

    Examples:
        >>> # records = NdjsonRecords("export")
        >>> # await records.laboratory_results(pid) -> (LabResult(...), ...)
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self._folder = Path(folder)
        if not self._folder.is_dir():
            raise NotADirectoryError(f"not a folder of NDJSON files: {self._folder}")
        self._lock = threading.Lock()
        self._by_type: dict[str, list[dict[str, Any]]] | None = None

    def _index(self) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            if self._by_type is None:
                by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
                bad = 0
                for path in sorted(self._folder.glob("*.ndjson")):
                    for line in path.read_text(encoding="utf-8").splitlines():
                        if not line.strip():
                            continue
                        try:
                            resource = json.loads(line)
                        except ValueError:
                            bad += 1
                            continue
                        if isinstance(resource, dict) and isinstance(
                            resource.get("resourceType"), str
                        ):
                            by_type[resource["resourceType"]].append(resource)
                        else:
                            bad += 1
                if bad:
                    logger.warning("left out %d NDJSON line(s) that are not a resource", bad)
                self._by_type = dict(by_type)
            return self._by_type

    def resources(self, resource_type: str) -> tuple[dict[str, Any], ...]:
        """The resources of one type, as FHIR JSON, in file order."""
        return tuple(self._index().get(resource_type, ()))

    def patient_ids(self) -> tuple[str, ...]:
        """The ids of the Patients in the folder, sorted."""
        return tuple(sorted(str(p["id"]) for p in self.resources("Patient") if p.get("id")))

    def patient(self, patient_id: str) -> dict[str, Any] | None:
        """The Patient, or ``None`` when the folder does not hold it."""
        return next((p for p in self.resources("Patient") if p.get("id") == patient_id), None)

    def _read_labs(self, patient_id: str) -> tuple[LabResult, ...]:
        mine = [
            o
            for o in self.resources("Observation")
            if refers_to_patient((o.get("subject") or {}).get("reference"), patient_id)
        ]
        try:
            observations = [parse_observation(o) for o in mine]
        except InvalidFhirContent as error:
            raise SourceUnavailable(_FOLDER_SOURCE, error.reason) from error
        laboratory = [o for o in observations if is_laboratory(o)]
        return tuple(lab_results(laboratory, patient_id=patient_id))

    async def laboratory_results(self, patient_id: str) -> tuple[LabResult, ...]:
        """The patient's numeric laboratory results (empty for an unknown patient).

        Raises:
            SourceUnavailable: a laboratory Observation is not valid FHIR.
        """
        return await asyncio.to_thread(self._read_labs, patient_id)
