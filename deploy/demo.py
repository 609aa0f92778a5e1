"""``medirag demo``: the whole path, end to end, on the embedded defaults.

It builds (once) the default models and the synthetic fixture cases, indexes the cases and the
PubMedQA literature in the embedded PostgreSQL, starts the real service on loopback, and then,
playing the EHR, sends one signed ``patient-view`` call and prints the answer. Everything it
builds is kept in the data directory, so a second run only starts and asks.

Progress goes to stderr; with ``--json`` stdout holds nothing but the CDS Hooks response.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from rich.console import Console
from rich.markdown import Markdown
from rich.panel import Panel
from rich.progress import Progress

from adapters.corpora.pubmedqa import read_pubmedqa
from adapters.fhir.bundle_folder import BundleFolderRecords
from adapters.fhir.prefetch import prefetch_content
from cds_hooks.app import Runtime
from cds_hooks.services import PATIENT_VIEW
from core.ingestion import IngestReport, ingest_cases, ingest_passages
from core.labs import lab_profile
from deploy.default_models import ensure_default_models
from deploy.ehr_simulator import DemoEhr, patient_view_call
from deploy.server import server_config
from deploy.settings import Settings
from deploy.wiring import Components, app_for, build_runtime, open_components, trusted_clients
from fixtures.synthetic_cases import SyntheticCase, synthetic_cases

__all__ = ["DemoResult", "missing_shared_data", "print_result", "run_demo", "serving"]

SHARED_NEEDS = {
    "synthea": "Synthea FHIR bundles",
    "cxr/nih1000/labels.csv": "NIH ChestX-ray14 labels (and the PNGs beside it)",
    "literature/pubmedqa/test_set.json": "PubMedQA abstracts",
}


def missing_shared_data(shared: Path) -> list[str]:
    """The shared datasets the demo needs that are not under ``shared``, described."""
    return [
        f"{shared / path} ({what})"
        for path, what in SHARED_NEEDS.items()
        if not (shared / path).exists()
    ]


@dataclass(frozen=True, slots=True)
class DemoResult:
    """What the demo's call returned, and how long things took.

    Args:
        patient_id: the fixture patient whose chart was "opened".
        status: the HTTP status of the call.
        response: the response body.
        request_s: seconds from sending the call to having the answer.
        first_card_s: seconds from the demo's start to having the answer.
    """

    patient_id: str
    status: int
    response: dict[str, Any]
    request_s: float
    first_card_s: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _choose_patient(
    cases: Sequence[SyntheticCase], bundles: BundleFolderRecords, min_labs: int
) -> str:
    """The first fixture patient with enough labs for the lab search and at least one abnormal
    result, so that both legs and the literature have something to work with."""
    enough = []
    for case in cases:
        profile = lab_profile(await bundles.laboratory_results(case.source.patient_id))
        if profile.measured_count >= min_labs:
            if profile.abnormal:
                return case.source.patient_id
            enough.append(case.source.patient_id)
    return enough[0] if enough else cases[0].source.patient_id


async def _ingest(
    components: Components, cases: Sequence[SyntheticCase], pubmedqa: Path, console: Console
) -> tuple[IngestReport, IngestReport]:
    assert components.bundles is not None
    passages = read_pubmedqa(pubmedqa)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("indexing cases", total=len(cases))
        case_report = await ingest_cases(
            [case.source for case in cases],
            records=components.bundles,
            imaging=components.imaging,
            image_model=components.image_model,
            index=components.store,
            weights=components.fusion,
            on_progress=lambda n: progress.advance(task, n),
        )
        task = progress.add_task("indexing literature", total=len(passages))
        passage_report = await ingest_passages(
            passages,
            text_model=components.text_model,
            index=components.store,
            on_progress=lambda n: progress.advance(task, n),
        )
    return case_report, passage_report


@asynccontextmanager
async def serving(runtime: Runtime, settings: Settings, port: int) -> AsyncIterator[None]:
    """The real service, on loopback, around the already-open runtime."""
    server = uvicorn.Server(
        server_config(app_for(runtime, settings), settings, host="127.0.0.1", port=port)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the service stopped during start-up")
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        await task


async def run_demo(
    settings: Settings,
    *,
    patient: str | None = None,
    console: Console,
    started: float | None = None,
) -> DemoResult:
    """Build what is missing, index, serve, and send one signed ``patient-view`` call.

    Args:
        settings: the deployment's settings; the demo adds its own EHR as the trusted client,
            a free loopback port, and the Synthea folder as the FHIR bundle folder.
        patient: the fixture patient to ask about (a Synthea Patient.id); by default the first
            with enough labs to compare and an abnormal result.
        console: where progress goes (stderr).
        started: ``time.perf_counter()`` at the command's start, for the time to first card.

    Returns:
        The call's result and timings.
    """
    started = time.perf_counter() if started is None else started
    shared = settings.shared_data

    def say(line: str) -> None:
        console.print(f"[dim]{line}[/dim]")

    ensure_default_models(
        settings.models_path,
        image_model=settings.image_model,
        text_model=settings.text_model,
        say=say,
    )
    say("preparing the synthetic fixture cases")
    cases = synthetic_cases(
        shared / "synthea", shared / "cxr" / "nih1000", settings.data_dir / "fixtures"
    )
    ehr = DemoEhr.load_or_create(settings.data_dir / "demo-ehr")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    settings = settings.model_copy(
        update={
            "clients": ehr.clients_file,
            "public_base_url": base,
            "port": port,
            "fhir_bundles": shared / "synthea",
            "dicom_dir": settings.data_dir / "fixtures" / "dicom",
            # The demo's EHR calls over loopback http; a configured certificate is not for it.
            "tls_cert_file": None,
            "tls_key_file": None,
        }
    )
    async with open_components(settings) as components:
        assert components.bundles is not None
        case_report, passage_report = await _ingest(
            components, cases, shared / "literature" / "pubmedqa" / "test_set.json", console
        )
        say(
            f"index: {case_report.indexed} cases added, {case_report.already_indexed} already "
            f"there; {passage_report.indexed} passages added, {passage_report.already_indexed} "
            "already there"
        )
        for case_id, reason in case_report.skipped:
            say(f"case {case_id} skipped: {reason}")
        patient_id = patient or await _choose_patient(cases, components.bundles, settings.min_labs)
        runtime = build_runtime(components, settings, trusted_clients(settings))
        async with serving(runtime, settings, port):
            url = f"{base}/cds-services/{PATIENT_VIEW.id}"
            body = patient_view_call(
                patient_id, prefetch=prefetch_content(components.bundles, patient_id)
            )
            say(f"calling {url} for patient {patient_id} (signed ES384 JWT, labs as prefetch)")
            sent = time.perf_counter()
            async with httpx.AsyncClient(timeout=30) as http:
                reply = await http.post(
                    url, json=body, headers={"Authorization": f"Bearer {ehr.sign(url)}"}
                )
            done = time.perf_counter()
    return DemoResult(
        patient_id=patient_id,
        status=reply.status_code,
        response=reply.json() if reply.content else {},
        request_s=done - sent,
        first_card_s=done - started,
    )


def print_result(result: DemoResult, *, as_json: bool, out: Console) -> None:
    """Print the response JSON, and unless ``as_json`` a readable summary of the cards."""
    if as_json:
        out.out(json.dumps(result.response, indent=2), highlight=False)
        return
    out.rule("CDS Hooks response")
    out.print_json(json.dumps(result.response))
    out.rule(f"Summary: patient-view for Patient/{result.patient_id} (HTTP {result.status})")
    for card in result.response.get("cards", []):
        out.print(
            Panel(
                Markdown(card.get("detail", "")),
                title=f"[bold]{card['summary']}[/bold]",
                subtitle=f"{card['indicator']} · source: {card['source']['label']}",
            )
        )
    out.print(
        f"first card {result.first_card_s:.1f} s after start; the call itself took "
        f"{result.request_s * 1000:.0f} ms"
    )
