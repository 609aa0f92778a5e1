"""BundleFolderRecords over the real Synthea bundles in ../shared/data/synthea."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from adapters.fhir.bundle_folder import BundleFolderRecords
from core.errors import SourceUnavailable
from core.ports import ClinicalRecords

CBC = {"6690-2": "10*3/uL", "777-3": "10*3/uL", "718-7": "g/dL"}


def test_it_is_a_clinical_record(synthea_records: BundleFolderRecords) -> None:
    assert isinstance(synthea_records, ClinicalRecords)


def test_patient_ids_are_the_patient_resources_ids_not_the_file_names(
    synthea_records: BundleFolderRecords, raw_bundles: dict[str, Any], synthea_dir: Path
) -> None:
    ids = synthea_records.patient_ids()
    assert ids == tuple(sorted(raw_bundles))
    assert len(ids) == 40
    file_uuids = {path.stem.rsplit("_", 1)[-1] for path in synthea_dir.glob("*.json")}
    assert not file_uuids & set(ids)


@pytest.mark.anyio
async def test_cbc_of_a_real_patient(
    synthea_records: BundleFolderRecords, raw_laboratory: dict[str, list[dict[str, Any]]]
) -> None:
    patient_id = synthea_records.patient_ids()[0]
    results = await synthea_records.laboratory_results(patient_id)
    by_source = {r.source: r for r in results}
    stored = {f"Observation/{o['id']}": o for o in raw_laboratory[patient_id]}
    numeric = {s for s, o in stored.items() if "valueQuantity" in o}
    assert set(by_source) == numeric
    for source, result in by_source.items():
        raw = stored[source]
        assert result.loinc == raw["code"]["coding"][0]["code"]
        assert result.value == raw["valueQuantity"]["value"]
        assert result.unit == raw["valueQuantity"]["code"]
        assert result.effective is not None
        assert result.effective.isoformat() == raw["effectiveDateTime"]
    for loinc, unit in CBC.items():
        assert {r.unit for r in results if r.loinc == loinc} == {unit}


@pytest.mark.anyio
async def test_every_patient_has_labs_and_no_vital_signs(
    synthea_records: BundleFolderRecords, raw_bundles: dict[str, Any]
) -> None:
    for patient_id, bundle in raw_bundles.items():
        vitals = {
            f"Observation/{e['resource']['id']}"
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Observation"
            and any(
                c["code"] == "vital-signs"
                for cat in e["resource"].get("category", [])
                for c in cat["coding"]
            )
        }
        results = await synthea_records.laboratory_results(patient_id)
        assert results
        assert not vitals & {r.source for r in results}


@pytest.mark.anyio
async def test_results_are_cached_per_patient(synthea_records: BundleFolderRecords) -> None:
    patient_id = synthea_records.patient_ids()[1]
    first = await synthea_records.laboratory_results(patient_id)
    assert await synthea_records.laboratory_results(patient_id) is first


@pytest.mark.anyio
async def test_an_unknown_patient_has_no_results(synthea_records: BundleFolderRecords) -> None:
    assert await synthea_records.laboratory_results("no-such-patient") == ()
    assert synthea_records.patient("no-such-patient") is None
    assert synthea_records.laboratory_observations("no-such-patient") == ()


def test_references_are_rewritten_as_a_server_stores_them(
    synthea_records: BundleFolderRecords, raw_bundles: dict[str, Any]
) -> None:
    patient_id = synthea_records.patient_ids()[2]
    types = {
        e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in raw_bundles[patient_id]["entry"]
    }
    observations = synthea_records.laboratory_observations(patient_id)
    assert observations
    for observation in observations:
        assert observation["subject"] == {"reference": f"Patient/{patient_id}"}
        assert observation["encounter"]["reference"].startswith("Encounter/")
        assert observation["encounter"]["reference"] in types.values()
    assert synthea_records.patient(patient_id)["id"] == patient_id


def test_returned_resources_are_copies(synthea_records: BundleFolderRecords) -> None:
    patient_id = synthea_records.patient_ids()[3]
    synthea_records.laboratory_observations(patient_id)[0]["id"] = "changed"
    assert synthea_records.laboratory_observations(patient_id)[0]["id"] != "changed"


def _copy_bundles(synthea_dir: Path, target: Path, count: int) -> list[Path]:
    target.mkdir()
    copies = []
    for path in sorted(synthea_dir.glob("*.json"))[:count]:
        copies.append(Path(shutil.copy(path, target / path.name)))
    return copies


def test_files_that_are_not_patient_bundles_are_ignored(synthea_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bundles"
    _copy_bundles(synthea_dir, folder, 2)
    (folder / "notes.json").write_text('{"resourceType": "Patient", "id": "loose"}')
    (folder / "broken.json").write_text("{not json")
    (folder / "README.txt").write_text("not a bundle")
    assert len(BundleFolderRecords(folder).patient_ids()) == 2


def test_two_bundles_of_one_patient_make_the_folder_unavailable(
    synthea_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "bundles"
    (first,) = _copy_bundles(synthea_dir, folder, 1)
    shutil.copy(first, folder / "duplicate.json")
    with pytest.raises(SourceUnavailable) as raised:
        BundleFolderRecords(folder).patient_ids()
    assert raised.value.source == "bundle folder"


@pytest.mark.anyio
async def test_an_invalid_observation_makes_the_patient_unavailable_without_naming_them(
    synthea_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "bundles"
    (path,) = _copy_bundles(synthea_dir, folder, 1)
    bundle = json.loads(path.read_text())
    lab = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["category"][0]["coding"][0]["code"] == "laboratory"
    )
    lab["valueQuantity"]["value"] = "twelve"
    path.write_text(json.dumps(bundle))
    records = BundleFolderRecords(folder)
    (patient_id,) = records.patient_ids()
    with pytest.raises(SourceUnavailable) as raised:
        await records.laboratory_results(patient_id)
    assert raised.value.source == "bundle folder"
    assert "valueQuantity" in raised.value.reason
    assert patient_id not in str(raised.value)
    assert "twelve" not in str(raised.value)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        BundleFolderRecords(tmp_path / "absent")
