"""Simultaneous hook calls share model runs: 32 calls at once cost about one batch of the image
tower and one of the text model, not 32 runs of each, and each card says what it says alone.

The models are the real exported ones (the tiny image/text model and MiniLM) on onnxruntime,
behind the embedders' micro-batchers; the index, the literature and the FHIR server are the
in-memory doubles of tests/core, because what is measured here is model runs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from adapters.fhir.prefetch import PrefetchRecords
from adapters.models.batching import BatchSettings
from adapters.models.clip import OnnxClipEmbedder
from adapters.models.session import SessionSettings
from adapters.models.text import OnnxTextEmbedder
from cds_hooks.app import Runtime, create_app
from cds_hooks.calls import Caller, CallPolicy
from cds_hooks.idempotency import HookInstanceCache
from core.advisor import Advisor, AdvisorSettings
from core.labs import LAB_PANEL
from core.types import CaseRecord, ChestImage, IndexedCase, LabProfile, Passage
from tests.core.doubles import FixedImaging, MemoryCases, MemoryLiterature

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BASE = "https://cds.test"
SERVICE = "/cds-services/medirag-patient-view"
CALLS = 32


class NoFhir:
    """Every call brings its labs as prefetch; a FHIR fetch would be a bug in the test."""

    def fetcher(self, base_url: str, access_token: str) -> Any:
        raise AssertionError("no FHIR server in this test")


def labs_bundle(patient: str, hemoglobin: float) -> dict[str, Any]:
    def observation(code: str, value: float, unit: str) -> dict[str, Any]:
        return {
            "resource": {
                "resourceType": "Observation",
                "id": f"{patient}-{code}",
                "status": "final",
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": "laboratory",
                            }
                        ]
                    }
                ],
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": f"Patient/{patient}"},
                "effectiveDateTime": "2020-01-01T00:00:00Z",
                "valueQuantity": {
                    "value": value,
                    "unit": unit,
                    "system": "http://unitsofmeasure.org",
                    "code": unit,
                },
            }
        }

    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            observation("718-7", hemoglobin, "g/dL"),
            observation("6690-2", 7.0, "10*3/uL"),
            observation("777-3", 250, "10*3/uL"),
        ],
    }


@pytest.fixture(scope="module")
def models(tiny_dir: Path, minilm_dir: Path) -> tuple[OnnxClipEmbedder, OnnxTextEmbedder]:
    session = SessionSettings(providers="cpu")
    # The service's defaults (BatchSettings()) with a longer wait, so that a slow machine that
    # needs more than 2 ms to bring 32 calls to the model still gathers them.
    batching = BatchSettings(max_batch=CALLS, max_wait_ms=500)
    return (
        OnnxClipEmbedder(tiny_dir, session=session, batching=batching),
        OnnxTextEmbedder(minilm_dir, session=session, batching=batching),
    )


@pytest.fixture(scope="module")
def patients() -> list[str]:
    return [f"q-{i}" for i in range(CALLS)]


async def index(
    image_model: OnnxClipEmbedder, text_model: OnnxTextEmbedder
) -> tuple[MemoryCases, MemoryLiterature]:
    rng = np.random.default_rng(7)
    cases = MemoryCases()
    findings = ["Effusion", "Cardiomegaly", "Pneumothorax", "No finding", "Atelectasis"]
    images = await image_model.embed_images(
        [rng.random((64, 64), dtype=np.float32) for _ in findings]
    )
    texts = await image_model.embed_findings(findings)
    panel = len(LAB_PANEL)
    for i, (finding, image, text) in enumerate(zip(findings, images, texts, strict=True)):
        fused = (image + text) / np.linalg.norm(image + text)
        labs = LabProfile(
            rng.standard_normal(panel).astype(np.float32), (True,) * 3 + (False,) * (panel - 3)
        )
        record = CaseRecord(f"c{i}", f"Patient/indexed-{i}", f"1.2.{i}", (finding,), "test")
        cases.cases[record.case_id] = IndexedCase(record, finding, image, text, fused, labs)
    literature = MemoryLiterature()
    passages = [
        Passage(f"{i}:0", str(i), text, "RESULTS", str(2020 + i), "Title")
        for i, text in enumerate(
            [
                "Anaemia in hospitalised patients is associated with longer stays.",
                "Pleural effusion management in heart failure.",
                "Platelet counts and outcomes after surgery.",
            ]
        )
    ]
    await literature.upsert_passages(
        passages, await text_model.embed_texts([p.text for p in passages])
    )
    return cases, literature


def build_app(
    image_model: OnnxClipEmbedder,
    text_model: OnnxTextEmbedder,
    cases: MemoryCases,
    literature: MemoryLiterature,
    patients: list[str],
) -> Any:
    rng = np.random.default_rng(11)
    imaging = FixedImaging(
        {
            patient: [
                ChestImage(f"study-{patient}", "se", "so", rng.random((80, 72), dtype=np.float32))
            ]
            for patient in patients
        }
    )
    advisor = Advisor(
        imaging=imaging,
        image_model=image_model,
        text_model=text_model,
        cases=cases,
        literature=literature,
        settings=AdvisorSettings(),
    )
    caller = Caller(
        advisor=advisor,
        fhir=NoFhir(),
        parse_labs=lambda value: PrefetchRecords({"labs": value}),
        default_fhir=None,
        policy=CallPolicy(deadline_s=30.0),
        cache=HookInstanceCache(),
        smart_app=None,
        ledger=None,
    )

    @asynccontextmanager
    async def runtime() -> AsyncIterator[Runtime]:
        yield Runtime(caller=caller, authenticator=None, public_base_url=BASE)

    return create_app(runtime)


def body(patient: str, index_: int) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": patient},
        "prefetch": {"labs": labs_bundle(patient, 8.0 + index_ / 4)},
    }


def statements(response: httpx.Response) -> list[tuple[str, str]]:
    return [(card["summary"], card["detail"]) for card in response.json()["cards"]]


async def test_32_simultaneous_hooks_cost_about_one_batch_each_model(
    models: tuple[OnnxClipEmbedder, OnnxTextEmbedder], patients: list[str]
) -> None:
    image_model, text_model = models
    cases, literature = await index(image_model, text_model)
    app = build_app(image_model, text_model, cases, literature, patients)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url=BASE) as client,
    ):
        alone = [await client.post(SERVICE, json=body(p, i)) for i, p in enumerate(patients[:3])]
        image_runs, text_runs = image_model.image_session.runs, text_model.model_session.runs

        together = await asyncio.gather(
            *(client.post(SERVICE, json=body(p, i)) for i, p in enumerate(patients))
        )

    assert [response.status_code for response in together] == [200] * CALLS
    assert all(len(response.json()["cards"]) >= 2 for response in together)
    # One call alone runs each model once; 32 together ran each about once, not 32 times.
    assert image_model.image_session.runs - image_runs <= 2
    assert text_model.model_session.runs - text_runs <= 2
    # Batched with 31 others, a call's cards say what they say when it is alone.
    for single, batched in zip(alone, together[:3], strict=True):
        assert statements(single) == statements(batched)
