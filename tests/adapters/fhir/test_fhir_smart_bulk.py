"""SMART Backend Services and Bulk Data export, end to end against the real engine's server.

The token endpoint and $export are the test server's own code (tests/peers/fhir_server/
server.mjs), not Medplum's: it checks the client assertion's signature with node's crypto
against the JWKS registered for the client, whose keys the session generated
(``smart_clients``). The resources exported are the Medplum repository's.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from adapters.fhir.bulk import MANIFEST_FILE, BulkExport, NdjsonRecords
from adapters.fhir.bundle_folder import BundleFolderRecords
from adapters.fhir.cases import cases_from_ndjson
from adapters.fhir.client import FhirClient, FhirHttpError
from adapters.fhir.smart_backend import SmartAuthError, SmartBackendAuth
from core.ports import ClinicalRecords
from tests.adapters.fhir.conftest import FixtureImaging, SmartClient
from tests.peers.medplum import Medplum

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def _auth(medplum: Medplum, client: SmartClient, **kwargs: object) -> SmartBackendAuth:
    return SmartBackendAuth(
        medplum.secure_base_url,
        client_id=client.client_id,
        private_key=client.private_key,
        key_id=client.key_id,
        algorithm=client.algorithm,
        **kwargs,  # type: ignore[arg-type]
    )


def _stats(medplum: Medplum) -> dict[str, int]:
    return dict(httpx.get(f"{medplum.origin}/admin/stats").json())


def _drop_second_file(folder: Path) -> tuple[Path, Path, int | None]:
    """The two downloaded files and the first's mtime, after deleting the second."""
    first, second = sorted(folder.glob("*.ndjson"))
    second.unlink()
    return first, second, _mtime(first)


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
async def test_a_token_is_obtained_once_and_reused(
    medplum: Medplum,
    smart_clients: tuple[dict[str, SmartClient], Path],
    synthea_records: BundleFolderRecords,
    algorithm: str,
) -> None:
    auth = _auth(medplum, smart_clients[0][algorithm])
    client = FhirClient(medplum.secure_base_url, token_source=auth, page_size=100)
    issued_before = _stats(medplum)["tokens_issued"]
    for patient_id in synthea_records.patient_ids()[:3]:
        got = await client.laboratory_results(patient_id)
        assert set(got) == set(await synthea_records.laboratory_results(patient_id))
    assert auth.token_requests == 1
    assert _stats(medplum)["tokens_issued"] == issued_before + 1


async def test_without_a_token_the_secure_base_refuses(
    medplum: Medplum, synthea_records: BundleFolderRecords
) -> None:
    with pytest.raises(FhirHttpError) as raised:
        await FhirClient(medplum.secure_base_url).laboratory_results(
            synthea_records.patient_ids()[0]
        )
    assert raised.value.status == 401
    assert raised.value.reason == "refused the credentials (HTTP 401)"


async def test_a_key_that_is_not_registered_is_refused(
    medplum: Medplum, smart_clients: tuple[dict[str, SmartClient], Path]
) -> None:
    registered = smart_clients[0]["RS384"]
    impostor = SmartClient(
        registered.client_id, registered.key_id, "RS384", rsa.generate_private_key(65537, 2048)
    )
    auth = _auth(medplum, impostor)
    with pytest.raises(SmartAuthError) as raised:
        await auth.access_token()
    assert raised.value.reason == "refused the client (HTTP 401, invalid_client)"
    # The reason says what happened, not what was sent.
    assert "eyJ" not in str(raised.value)


async def test_an_expiring_token_is_renewed_before_it_expires(
    medplum: Medplum, smart_clients: tuple[dict[str, SmartClient], Path]
) -> None:
    now = [1_000.0]
    auth = _auth(medplum, smart_clients[0]["ES384"], clock=lambda: now[0], refresh_margin=30.0)
    first = await auth.access_token()
    now[0] += 300 - 31  # the server's tokens last 300 s: still good
    assert await auth.access_token() == first
    now[0] += 2  # within the margin: renewed
    second = await auth.access_token()
    assert second != first
    assert auth.token_requests == 2


async def test_a_revoked_token_is_replaced_once_on_401(
    medplum: Medplum,
    smart_clients: tuple[dict[str, SmartClient], Path],
    synthea_records: BundleFolderRecords,
) -> None:
    auth = _auth(medplum, smart_clients[0]["RS384"])
    client = FhirClient(medplum.secure_base_url, token_source=auth)
    patient_id = synthea_records.patient_ids()[1]
    assert await client.patient(patient_id) is not None
    async with httpx.AsyncClient() as http:
        await http.post(f"{medplum.origin}/admin/revoke-tokens")
    assert await client.patient(patient_id) is not None
    assert auth.token_requests == 2


async def test_bulk_export_downloads_ndjson_equal_to_the_folder(
    medplum: Medplum,
    smart_clients: tuple[dict[str, SmartClient], Path],
    synthea_records: BundleFolderRecords,
    fixture_imaging: FixtureImaging | None,
    tmp_path: Path,
) -> None:
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    auth = _auth(medplum, smart_clients[0]["ES384"])
    export = BulkExport(medplum.secure_base_url, token_source=auth, sleep=no_wait)
    manifest = await export.export_to(tmp_path)

    assert waits == [1.0]  # the server's one 202 said Retry-After: 1
    assert manifest.requires_token
    types = {f.resource_type for f in manifest.files}
    assert {"Patient", "Observation"} <= types
    records = NdjsonRecords(tmp_path)
    assert isinstance(records, ClinicalRecords)
    assert records.patient_ids() == synthea_records.patient_ids()
    for patient_id in synthea_records.patient_ids():
        got = await records.laboratory_results(patient_id)
        assert set(got) == set(await synthea_records.laboratory_results(patient_id))
    exported, stored = records.patient(patient_id), synthea_records.patient(patient_id)
    assert exported is not None
    assert stored is not None
    # The server adds its version and time to meta, as servers do; the rest is as loaded.
    meta, stored_meta = exported.pop("meta"), stored.pop("meta")
    assert exported == stored
    assert meta["tag"] == stored_meta["tag"]
    assert {"versionId", "lastUpdated"} <= set(meta)

    if fixture_imaging is not None:
        found = cases_from_ndjson(records)
        assert {c.record.case_id for c in found.cases} == {
            c.source.record.case_id for c in fixture_imaging.cases
        }


async def test_bulk_export_resumes_a_download_without_a_new_export(
    medplum: Medplum, tmp_path: Path
) -> None:
    async def no_wait(seconds: float) -> None:
        """The polls' waits are measured in the test above."""

    await BulkExport(medplum.base_url, sleep=no_wait).export_to(
        tmp_path, types=["Patient", "ImagingStudy"]
    )
    first, second, kept = _drop_second_file(tmp_path)

    urls: list[str] = []

    async def record(request: httpx.Request) -> None:
        urls.append(str(request.url))

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as http:
        manifest = await BulkExport(medplum.base_url, http=http).export_to(tmp_path)
    saved = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert [f.url for f in manifest.files] == [o["url"] for o in saved["output"]]
    assert urls == [manifest.files[1].url]
    assert _mtime(second) is not None
    assert _mtime(first) == kept
