"""Ingest the fixture cases through the live adapters, against the real peers, and time each step.

The path is the one a hospital deployment takes, on the real test peers: the Medplum FHIR engine
is loaded with the 40 Synthea bundles and the fixture cases' ImagingStudy and radiology
DiagnosticReport resources (:mod:`fixtures.imaging_records`); Orthanc receives the fixture DICOM
studies over STOW-RS; then the cases are discovered from FHIR (:func:`adapters.fhir.cases.
cases_from_server`), and :func:`core.ingestion.ingest_cases` reads each case's labs through
:class:`adapters.fhir.client.FhirClient` and its image through the DICOMweb archive the service
itself opens (``MEDIRAG_DICOMWEB_URL`` with basic auth), into a fresh embedded PostgreSQL.

Run it for the benchmark (``docs/benchmarks.md``), from the repository root after ``make peers``::

    .venv/bin/python -m tests.peers.live_ingest [--json]

The integration test ``tests/e2e/test_live_peers.py`` runs the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pydicom
from dicomweb_client import DICOMwebClient
from pydantic import SecretStr

from adapters.fhir.cases import cases_from_server
from adapters.fhir.client import FhirClient
from adapters.imaging.stow import StoreReport, store_datasets
from core.ingestion import IngestReport, ingest_cases
from core.ports import CaseIndex
from core.types import IndexedCase
from deploy.settings import Settings
from deploy.wiring import open_components
from fixtures.imaging_records import write_imaging_bundle
from fixtures.synthetic_cases import SyntheticCase, synthetic_cases
from tests.peers.medplum import Medplum, running_medplum
from tests.peers.orthanc import Orthanc, running_orthanc

__all__ = ["LiveIngest", "Peers", "fixture_cases", "ingest_live", "running_peers", "stow_fixtures"]

Say = Callable[[str], None]


@dataclass(slots=True)
class LiveIngest:
    """What one run did and how long each step took, in seconds."""

    seconds: dict[str, float] = field(default_factory=dict)
    stored: int = 0
    discovered: int = 0
    report: IngestReport = field(default_factory=IngestReport)

    def to_json(self) -> dict[str, object]:
        """The figures as JSON."""
        return {
            "seconds": {step: round(s, 2) for step, s in self.seconds.items()},
            "stored_instances": self.stored,
            "discovered_cases": self.discovered,
            "indexed": self.report.indexed,
            "already_indexed": self.report.already_indexed,
            "skipped": [list(item) for item in self.report.skipped],
        }


@dataclass(frozen=True, slots=True)
class Peers:
    """The two running peers."""

    fhir: Medplum
    pacs: Orthanc


@contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[step] = time.perf_counter() - start


def fixture_cases(shared: Path, out: Path) -> tuple[tuple[SyntheticCase, ...], Path]:
    """The fixture cases (built into ``out`` unless up to date there) and their FHIR imaging
    bundle."""
    cases = synthetic_cases(shared / "synthea", shared / "cxr" / "nih1000", out)
    return cases, write_imaging_bundle(cases, out)


@contextmanager
def running_peers(
    shared: Path,
    imaging_bundle: Path,
    seconds: dict[str, float],
    *,
    smart_clients: Path | None = None,
) -> Iterator[Peers]:
    """Medplum loaded with the Synthea bundles and the imaging bundle (and the registered SMART
    clients, if any), and an empty Orthanc."""
    with ExitStack() as stack:
        with _timed(seconds, "start FHIR server and load 40 bundles"):
            fhir = stack.enter_context(
                running_medplum(
                    shared / "synthea", bundles=[imaging_bundle], clients_file=smart_clients
                )
            )
        with _timed(seconds, "start Orthanc"):
            pacs = stack.enter_context(running_orthanc())
        yield Peers(fhir, pacs)


def stow_fixtures(pacs: Orthanc, out: Path, cases: Sequence[SyntheticCase]) -> StoreReport:
    """Store the cases' DICOM files in the PACS with STOW-RS."""
    datasets = [pydicom.dcmread(out / case.dicom_file) for case in cases]
    client = DICOMwebClient(pacs.dicomweb_url, session=pacs.session())
    return store_datasets(client, datasets)


class _Recording:
    """The part of a case index ingestion writes to, keeping what was written (for parity
    checks) before passing it on."""

    def __init__(self, index: CaseIndex, record: list[IndexedCase]) -> None:
        self._index = index
        self._record = record

    async def upsert_cases(self, cases: Sequence[IndexedCase]) -> None:
        self._record.extend(cases)
        await self._index.upsert_cases(cases)

    async def case_ids(self) -> frozenset[str]:
        return await self._index.case_ids()


def live_settings(peers: Peers, data_dir: Path, models_dir: Path) -> Settings:
    """Settings of a deployment on the peers: the PACS by DICOMweb with basic auth."""
    return Settings(
        data_dir=data_dir,
        models_dir=models_dir,
        dicomweb_url=peers.pacs.dicomweb_url,
        dicomweb_username=peers.pacs.username,
        dicomweb_password=SecretStr(peers.pacs.password),
        # Ingestion is offline work: a slow answer is waited for, not cut as in a hook call.
        dicomweb_timeout_s=30.0,
    )


async def ingest_live(
    peers: Peers,
    *,
    out: Path,
    cases: Sequence[SyntheticCase],
    data_dir: Path,
    models_dir: Path,
    seconds: dict[str, float],
    record: list[IndexedCase] | None = None,
) -> LiveIngest:
    """STOW the fixture studies, discover the cases from FHIR, and ingest them.

    Args:
        peers: the running peers (:func:`running_peers`).
        out: the fixture folder the cases were built in.
        cases: the fixture cases to store in the PACS.
        data_dir: the deployment's data directory (its embedded PostgreSQL is made there).
        models_dir: the exported default models.
        seconds: the step timings, added to.
        record: when given, receives every indexed case as it is written.
    """
    result = LiveIngest(seconds=seconds)
    with _timed(seconds, f"STOW-RS {len(cases)} studies"):
        stored = stow_fixtures(peers.pacs, out, cases)
    if stored.failed:
        raise RuntimeError(f"the PACS refused fixture objects: {stored.failed}")
    result.stored = len(stored.stored)
    settings = live_settings(peers, data_dir, models_dir)
    async with AsyncExitStack() as stack:
        with _timed(seconds, "open the service's components (models, PostgreSQL, PACS)"):
            components = await stack.enter_async_context(open_components(settings))
        http = await stack.enter_async_context(httpx.AsyncClient())
        fhir = FhirClient(peers.fhir.base_url, http=http, timeout=30.0)
        with _timed(seconds, "discover cases from FHIR"):
            discovery = await cases_from_server(fhir)
        result.discovered = len(discovery.cases)
        index = components.store if record is None else _Recording(components.store, record)
        with _timed(seconds, f"ingest {result.discovered} cases (FHIR labs + DICOMweb images)"):
            result.report = await ingest_cases(
                discovery.cases,
                records=fhir,
                imaging=components.imaging,
                image_model=components.image_model,
                index=index,  # type: ignore[arg-type]  # only the writing half is used
                weights=components.fusion,
            )
    return result


async def _main(as_json: bool) -> int:
    from deploy.default_models import ensure_default_models

    settings = Settings()
    shared = settings.shared_data
    say: Say = (lambda line: print(line, file=sys.stderr)) if not as_json else (lambda _: None)
    ensure_default_models(
        settings.models_path,
        image_model=settings.image_model,
        text_model=settings.text_model,
        say=say,
    )
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="medirag-live-ingest-") as work:
        out = Path(work) / "fixtures"
        with _timed(seconds, "build fixture cases and imaging bundle"):
            cases, bundle = fixture_cases(shared, out)
        with running_peers(shared, bundle, seconds) as peers:
            result = await ingest_live(
                peers,
                out=out,
                cases=cases,
                data_dir=Path(work) / "data",
                models_dir=settings.models_path,
                seconds=seconds,
            )
            again_seconds: dict[str, float] = {}
            again = await ingest_live(
                peers,
                out=out,
                cases=cases,
                data_dir=Path(work) / "data",
                models_dir=settings.models_path,
                seconds=again_seconds,
            )
    figures = result.to_json()
    figures["second_run"] = again.to_json()
    if as_json:
        print(json.dumps(figures, indent=1))
    else:
        for step, spent in seconds.items():
            print(f"{spent:8.2f} s  {step}")
        print(
            f"stored {result.stored} instances; discovered {result.discovered} cases; indexed "
            f"{result.report.indexed}, skipped {len(result.report.skipped)}"
        )
        for step, spent in again_seconds.items():
            print(f"{spent:8.2f} s  second run: {step}")
        print(f"second run: {again.report.already_indexed} already indexed")
    return 0 if result.report.indexed == result.discovered and not result.report.skipped else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.peers.live_ingest [--json]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only the figures as JSON")
    return asyncio.run(_main(parser.parse_args(argv).json))


if __name__ == "__main__":
    raise SystemExit(main())
