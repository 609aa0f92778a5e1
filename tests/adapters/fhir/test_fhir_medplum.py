"""The FHIR adapters against a real FHIR search engine: Medplum's, loaded with the 40 Synthea
bundles and the fixture cases' imaging bundle (tests/peers/medplum.py starts it).

What is compared is what the folder reader (``BundleFolderRecords``, tested on its own against
the raw JSON) reads from the same bundles: the server is an independent way to the same records.
"""

from __future__ import annotations

import math

import httpx
import pytest

from adapters.fhir.bundle_folder import BundleFolderRecords
from adapters.fhir.cases import (
    CaseDiscovery,
    cases_from_bundle_folder,
    cases_from_server,
)
from adapters.fhir.client import FhirClient
from fixtures.cxr_dicom import fixture_accession
from tests.adapters.fhir.conftest import FixtureImaging
from tests.peers.medplum import Medplum

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def _counting() -> tuple[httpx.AsyncClient, list[str]]:
    urls: list[str] = []

    async def record(request: httpx.Request) -> None:
        urls.append(str(request.url))

    return httpx.AsyncClient(event_hooks={"request": [record]}), urls


async def test_labs_equal_the_folder_for_every_patient(
    medplum: Medplum, synthea_records: BundleFolderRecords
) -> None:
    http, urls = _counting()
    async with http:
        client = FhirClient(medplum.base_url, http=http, page_size=40)
        for patient_id in synthea_records.patient_ids():
            got = await client.laboratory_results(patient_id)
            expected = await synthea_records.laboratory_results(patient_id)
            assert sorted(got, key=repr) == sorted(expected, key=repr), patient_id
    paged = sum("_offset=" in url for url in urls)
    assert len(synthea_records.patient_ids()) == 40
    assert paged > 0, "some patient has more than one page of labs at _count=40"


async def test_small_pages_are_all_followed_newest_first(
    medplum: Medplum, synthea_records: BundleFolderRecords
) -> None:
    patient_id = synthea_records.patient_ids()[0]
    expected = await synthea_records.laboratory_results(patient_id)
    http, urls = _counting()
    async with http:
        got = await FhirClient(medplum.base_url, http=http, page_size=7).laboratory_results(
            patient_id
        )
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    raw = len(synthea_records.laboratory_observations(patient_id))
    assert len(urls) == math.ceil(raw / 7) > 1
    assert all(url.startswith(medplum.base_url) for url in urls)
    dates = [r.effective for r in got if r.effective is not None]
    assert dates == sorted(dates, reverse=True)


async def test_a_patient_is_read_and_an_unknown_one_is_none(
    medplum: Medplum, synthea_records: BundleFolderRecords
) -> None:
    patient_id = synthea_records.patient_ids()[3]
    client = FhirClient(medplum.base_url)
    patient = await client.patient(patient_id)
    assert patient is not None
    assert patient.id == patient_id
    expected = synthea_records.patient(patient_id)
    assert expected is not None
    assert patient.birthDate.isoformat() == expected["birthDate"]
    assert await client.patient("no-such-patient") is None


async def test_imaging_studies_and_radiology_reports_of_a_case(
    medplum: Medplum, imaging: FixtureImaging
) -> None:
    case = imaging.cases[2]
    record = case.source.record
    client = FhirClient(medplum.base_url, page_size=5)
    patient_id = record.patient_ref.removeprefix("Patient/")

    studies = [s for s in await client.imaging_studies(patient_id) if s.study_uid]
    (study,) = [s for s in studies if s.study_uid == record.study_uid]
    assert study.modalities == ("DX",)
    assert study.accession == fixture_accession(record.study_uid)
    assert study.patient_ref == record.patient_ref
    assert study.started is not None

    (report,) = await client.radiology_reports(patient_id)
    assert report.conclusion == case.source.findings_text
    assert report.conclusion_codes == record.findings
    assert report.imaging_study_ids == (study.resource_id,)
    assert report.status == "final"


def _compare(found: CaseDiscovery, imaging: FixtureImaging, source: str) -> None:
    expected = {c.source.record.case_id: c.source for c in imaging.cases}
    got = {c.record.case_id: c for c in found.cases}
    assert set(got) == set(expected)
    for case_id, want in expected.items():
        case = got[case_id]
        assert case.findings_text == want.findings_text
        assert (case.record.patient_ref, case.record.study_uid, case.record.findings) == (
            want.record.patient_ref,
            want.record.study_uid,
            want.record.findings,
        )
        # The synthetic pairing is still disclosed, and the source named.
        assert want.record.provenance in case.record.provenance
        assert f"{source}: DiagnosticReport/" in case.record.provenance
    assert found.skipped == ()


async def test_case_discovery_on_the_server_finds_exactly_the_forty_fixture_cases(
    medplum: Medplum, imaging: FixtureImaging
) -> None:
    found = await cases_from_server(FhirClient(medplum.base_url, page_size=50))
    assert len(found.cases) == 40
    _compare(found, imaging, "FHIR server")


def test_case_discovery_in_a_bundle_folder_finds_the_same_cases(imaging: FixtureImaging) -> None:
    found = cases_from_bundle_folder(imaging.bundle.parent)
    _compare(found, imaging, "bundle folder")
