"""Synthea data, and the real FHIR engine loaded with it, shared by the FHIR adapter tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from adapters.fhir.bundle_folder import BundleFolderRecords
from fixtures.imaging_records import write_imaging_bundle
from fixtures.synthetic_cases import SyntheticCase, synthetic_cases
from tests.peers.medplum import Medplum, MedplumMissing, running_medplum


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


# ---- The real FHIR engine (Medplum) and what it is loaded with -----------------------------


@dataclass(frozen=True, slots=True)
class FixtureImaging:
    """The fixture cases (:mod:`fixtures.synthetic_cases`) and their FHIR imaging bundle."""

    cases: tuple[SyntheticCase, ...]
    bundle: Path


@pytest.fixture(scope="session")
def fixture_imaging(
    shared_data: Path, synthea_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> FixtureImaging | None:
    """The fixture cases built from ``cxr/nih1000`` (a few seconds), or ``None`` without it."""
    nih = shared_data / "cxr" / "nih1000"
    if not (nih / "labels.csv").is_file():
        return None
    out = tmp_path_factory.mktemp("fixture-cases")
    cases = synthetic_cases(synthea_dir, nih, out)
    return FixtureImaging(cases, write_imaging_bundle(cases, out))


@pytest.fixture
def imaging(fixture_imaging: FixtureImaging | None) -> FixtureImaging:
    """The fixture cases; the test is skipped without ``cxr/nih1000``."""
    if fixture_imaging is None:
        pytest.skip("cxr/nih1000 is not in the shared data: the fixture cases cannot be built")
    return fixture_imaging


@dataclass(frozen=True, slots=True)
class SmartClient:
    """A registered SMART Backend Services client: its id, key id, algorithm and private key."""

    client_id: str
    key_id: str
    algorithm: Literal["RS384", "ES384"]
    private_key: Any


@pytest.fixture(scope="session")
def smart_clients(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, SmartClient], Path]:
    """An RS384 and an ES384 client with keys generated here, and the server's clients file."""
    clients = {
        "RS384": SmartClient("medirag-rs", "rs-1", "RS384", rsa.generate_private_key(65537, 2048)),
        "ES384": SmartClient(
            "medirag-es", "es-1", "ES384", ec.generate_private_key(ec.SECP384R1())
        ),
    }
    registered = []
    for client in clients.values():
        algorithm = RSAAlgorithm if client.algorithm == "RS384" else ECAlgorithm
        jwk = json.loads(algorithm.to_jwk(client.private_key.public_key()))
        registered.append(
            {"client_id": client.client_id, "jwks": {"keys": [{**jwk, "kid": client.key_id}]}}
        )
    path = tmp_path_factory.mktemp("smart") / "clients.json"
    path.write_text(json.dumps({"clients": registered}), encoding="utf-8")
    return clients, path


@pytest.fixture(scope="session")
def medplum(
    synthea_dir: Path,
    fixture_imaging: FixtureImaging | None,
    smart_clients: tuple[dict[str, SmartClient], Path],
) -> Iterator[Medplum]:
    """The Medplum engine loaded with the Synthea bundles and the fixture imaging bundle (when
    the fixture cases can be built), one for the session, stopped by its PID at the end."""
    try:
        with running_medplum(
            synthea_dir,
            bundles=[fixture_imaging.bundle] if fixture_imaging else [],
            clients_file=smart_clients[1],
            export_polls=1,
            export_retry_after=1,
        ) as server:
            yield server
    except MedplumMissing as missing:
        pytest.skip(str(missing))
