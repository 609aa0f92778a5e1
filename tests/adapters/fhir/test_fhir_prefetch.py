"""PrefetchRecords and the prefetch builders, on real Synthea patients.

The fallback in these tests is a real clinical record: the bundle folder when it should answer,
or a FhirClient aimed at a closed loopback port when it must not be asked (asking it would fail
with "could not connect", which the assertions rule out).
"""

from __future__ import annotations

import copy
import logging
import socket
from typing import Any

import pytest

from adapters.fhir.bundle_folder import BundleFolderRecords
from adapters.fhir.client import FhirClient
from adapters.fhir.parse import bundle_resources, parse_bundle, parse_observation
from adapters.fhir.prefetch import (
    PrefetchRecords,
    laboratory_bundle,
    patient_resource,
    prefetch_content,
)
from core.errors import SourceUnavailable
from core.ports import ClinicalRecords

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def unreachable_server() -> FhirClient:
    """A FHIR client for a loopback port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return FhirClient(f"http://127.0.0.1:{port}/fhir", timeout=2.0)


@pytest.fixture(scope="module")
def patient_id(synthea_records: BundleFolderRecords) -> str:
    return synthea_records.patient_ids()[5]


async def test_it_is_a_clinical_record() -> None:
    assert isinstance(PrefetchRecords(None), ClinicalRecords)


async def test_prefetched_labs_are_what_the_folder_holds(
    synthea_records: BundleFolderRecords, patient_id: str, unreachable_server: FhirClient
) -> None:
    prefetch = {"labs": laboratory_bundle(synthea_records, patient_id)}
    results = await PrefetchRecords(prefetch, fallback=unreachable_server).laboratory_results(
        patient_id
    )
    expected = await synthea_records.laboratory_results(patient_id)
    assert results
    assert sorted(results, key=lambda r: r.source) == sorted(expected, key=lambda r: r.source)


async def test_a_custom_labs_key(synthea_records: BundleFolderRecords, patient_id: str) -> None:
    prefetch = {"recent-labs": laboratory_bundle(synthea_records, patient_id)}
    records = PrefetchRecords(prefetch, labs_key="recent-labs")
    assert len(await records.laboratory_results(patient_id)) == len(
        await synthea_records.laboratory_results(patient_id)
    )


@pytest.mark.parametrize("prefetch", [None, {}, {"patient": {"resourceType": "Patient"}}])
async def test_a_missing_key_asks_the_fallback(
    synthea_records: BundleFolderRecords, patient_id: str, prefetch: dict[str, Any] | None
) -> None:
    results = await PrefetchRecords(prefetch, fallback=synthea_records).laboratory_results(
        patient_id
    )
    assert results == await synthea_records.laboratory_results(patient_id)


@pytest.mark.parametrize("prefetch", [None, {}])
async def test_a_missing_key_without_fallback_is_unavailable(
    prefetch: dict[str, Any] | None, patient_id: str
) -> None:
    with pytest.raises(SourceUnavailable) as raised:
        await PrefetchRecords(prefetch).laboratory_results(patient_id)
    assert raised.value.source == "CDS Hooks prefetch"
    assert raised.value.reason == "no 'labs' prefetch and no FHIR server to ask"


async def test_null_means_no_data_and_the_server_is_not_asked(
    unreachable_server: FhirClient, patient_id: str
) -> None:
    records = PrefetchRecords({"labs": None}, fallback=unreachable_server)
    assert await records.laboratory_results(patient_id) == ()


async def test_an_operation_outcome_is_the_clients_error_and_the_server_is_not_asked(
    unreachable_server: FhirClient, patient_id: str
) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout", "diagnostics": f"Patient/{patient_id}"}],
    }
    records = PrefetchRecords({"labs": outcome}, fallback=unreachable_server)
    with pytest.raises(SourceUnavailable) as raised:
        await records.laboratory_results(patient_id)
    assert raised.value.source == "CDS Hooks prefetch"
    assert raised.value.reason == "the CDS client reported an error for 'labs'"
    assert patient_id not in str(raised.value)


@pytest.mark.parametrize(("severity", "fails"), [("error", True), ("warning", False)])
async def test_an_error_outcome_inside_the_bundle_is_the_clients_error(
    synthea_records: BundleFolderRecords,
    unreachable_server: FhirClient,
    patient_id: str,
    severity: str,
    fails: bool,
) -> None:
    bundle = laboratory_bundle(synthea_records, patient_id)
    outcome = {"resourceType": "OperationOutcome",
               "issue": [{"severity": severity, "code": "too-costly"}]}  # fmt: skip
    bundle["entry"].append({"resource": outcome, "search": {"mode": "outcome"}})
    records = PrefetchRecords({"labs": bundle}, fallback=unreachable_server)
    if fails:
        with pytest.raises(SourceUnavailable) as raised:
            await records.laboratory_results(patient_id)
        assert raised.value.reason == "the CDS client reported an error for 'labs'"
    else:
        assert len(await records.laboratory_results(patient_id)) == len(
            await synthea_records.laboratory_results(patient_id)
        )


@pytest.mark.parametrize(
    "value",
    [
        {"resourceType": "Patient", "id": "x"},
        "a string",
        {"resourceType": "Bundle", "type": "searchset",
         "entry": [{"resource": {"resourceType": "Observation", "status": 7}}]},
    ],
)  # fmt: skip
async def test_an_unusable_value_is_unavailable_without_fallback(
    value: Any, patient_id: str
) -> None:
    with pytest.raises(SourceUnavailable) as raised:
        await PrefetchRecords({"labs": value}).laboratory_results(patient_id)
    assert raised.value.source == "CDS Hooks prefetch"
    assert raised.value.reason.endswith("and no FHIR server to ask")


async def test_an_unusable_value_asks_the_fallback(
    synthea_records: BundleFolderRecords, patient_id: str
) -> None:
    records = PrefetchRecords({"labs": {"resourceType": "Patient"}}, fallback=synthea_records)
    assert await records.laboratory_results(patient_id) == await synthea_records.laboratory_results(
        patient_id
    )


async def test_another_patients_observations_in_the_prefetch_are_dropped(
    synthea_records: BundleFolderRecords,
) -> None:
    mine, other = synthea_records.patient_ids()[6:8]
    bundle = laboratory_bundle(synthea_records, mine)
    bundle["entry"] += laboratory_bundle(synthea_records, other)["entry"]
    results = await PrefetchRecords({"labs": bundle}).laboratory_results(mine)
    own = {r.source for r in await synthea_records.laboratory_results(mine)}
    assert own
    assert {r.source for r in results} == own
    assert len(results) == len(own)


async def test_a_paginated_prefetch_uses_its_first_page_and_warns(
    synthea_records: BundleFolderRecords, patient_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = laboratory_bundle(synthea_records, patient_id)
    half = len(bundle["entry"]) // 2
    page = copy.deepcopy(bundle)
    page["entry"] = page["entry"][:half]
    page["link"].append({"relation": "next", "url": "Observation?page=2"})
    with caplog.at_level(logging.WARNING, logger="adapters.fhir.prefetch"):
        results = await PrefetchRecords({"labs": page}).laboratory_results(patient_id)
    on_page = {
        f"Observation/{e['resource']['id']}"
        for e in page["entry"]
        if "valueQuantity" in e["resource"]
    }
    assert on_page
    assert {r.source for r in results} == on_page
    assert "paginated" in caplog.text
    assert patient_id not in caplog.text


def test_laboratory_bundle_is_a_valid_searchset_as_a_server_answers(
    synthea_records: BundleFolderRecords, patient_id: str
) -> None:
    base = "http://ehr.example/fhir"
    content = laboratory_bundle(synthea_records, patient_id, base_url=base + "/")
    bundle = parse_bundle(content)
    assert bundle.type == "searchset"
    resources = bundle_resources(bundle)
    assert (
        bundle.total == len(resources) == len(synthea_records.laboratory_observations(patient_id))
    )
    assert content["link"][0]["url"].startswith(f"{base}/Observation?patient={patient_id}")
    dates = []
    for entry, resource in zip(content["entry"], resources, strict=True):
        assert entry["fullUrl"] == f"{base}/Observation/{resource.id}"
        assert entry["search"] == {"mode": "match"}
        assert resource.subject.reference == f"Patient/{patient_id}"
        dates.append(parse_observation(entry["resource"]).effectiveDateTime)
    assert dates == sorted(dates, reverse=True)


def test_prefetch_content_for_a_known_and_an_unknown_patient(
    synthea_records: BundleFolderRecords, patient_id: str
) -> None:
    known = prefetch_content(synthea_records, patient_id)
    assert known["patient"] == patient_resource(synthea_records, patient_id)
    assert known["patient"]["id"] == patient_id
    assert known["labs"]["total"] > 0
    assert prefetch_content(synthea_records, "no-such-patient") == {"patient": None, "labs": None}
    renamed = prefetch_content(synthea_records, patient_id, patient_key="p", labs_key="l")
    assert set(renamed) == {"p", "l"}
