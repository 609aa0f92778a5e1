"""Synthea data shared by the FHIR adapter tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.fhir.bundle_folder import BundleFolderRecords


@pytest.fixture(scope="session")
def synthea_dir(shared_data: Path) -> Path:
    """The folder of 40 Synthea transaction bundles."""
    return shared_data / "synthea"


@pytest.fixture(scope="session")
def synthea_records(synthea_dir: Path) -> BundleFolderRecords:
    """One folder reader for the session (its caches are part of what is tested)."""
    return BundleFolderRecords(synthea_dir)


@pytest.fixture(scope="session")
def raw_bundles(synthea_dir: Path) -> dict[str, dict[str, Any]]:
    """Each bundle as plain JSON, by the id of its Patient: the tests' independent reading."""
    bundles: dict[str, dict[str, Any]] = {}
    for path in sorted(synthea_dir.glob("*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"))
        (patient,) = [
            e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
        ]
        bundles[patient["id"]] = bundle
    return bundles


@pytest.fixture(scope="session")
def raw_laboratory(raw_bundles: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each patient's Observations with a ``laboratory`` category code, as stored."""
    return {
        patient_id: [
            e["resource"]
            for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Observation"
            and any(
                coding["code"] == "laboratory"
                for category in e["resource"].get("category", [])
                for coding in category["coding"]
            )
        ]
        for patient_id, bundle in raw_bundles.items()
    }
