import asyncio
import dataclasses
import time
from datetime import UTC, datetime

import numpy as np
import pytest

from core.advisor import Advisor, AdvisorSettings
from core.errors import SourceUnavailable
from core.ingestion import CaseSource, FusionWeights, ingest_cases, ingest_passages
from core.labs import LAB_PANEL
from core.types import CaseRecord, ChestImage, ImagingOrder, LabResult, Passage
from tests.core.doubles import (
    DenseSparseDouble,
    FixedImaging,
    FixedRecords,
    MeanImageModel,
    MemoryCases,
    MemoryLiterature,
    TableReranker,
    TextDouble,
)

pytestmark = pytest.mark.anyio


def image(patient, seed):
    pixels = np.random.default_rng(seed).random((16, 16)).astype(np.float32)
    return ChestImage(f"study-{patient}", f"series-{patient}", f"sop-{patient}", pixels)


def cbc(patient, hb):
    when = datetime(2020, 1, 1, tzinfo=UTC)
    names = {t.loinc: t for t in LAB_PANEL}
    return [
        LabResult("718-7", "Hemoglobin", hb, "g/dL", when, f"Observation/{patient}-hb"),
        LabResult("6690-2", "WBC", 7.0, names["6690-2"].unit, when, f"Observation/{patient}-w"),
        LabResult("777-3", "Platelets", 250.0, "10*3/uL", when, f"Observation/{patient}-p"),
    ]


PATIENTS = {"p1": ("Effusion",), "p2": ("No Finding",), "p3": ("Cardiomegaly", "Effusion")}


@pytest.fixture
def world():
    imaging = FixedImaging({p: [image(p, i)] for i, p in enumerate([*PATIENTS, "query"])})
    records = FixedRecords({p: cbc(p, 9.0 + i) for i, p in enumerate([*PATIENTS, "query"])})
    return imaging, records, MeanImageModel(), TextDouble(), MemoryCases(), MemoryLiterature()


def sources():
    return [
        CaseSource(
            CaseRecord(f"case-{p}", f"Patient/{p}", f"study-{p}", f, "test fixture"),
            "Chest radiograph: " + ", ".join(f),
        )
        for p, f in PATIENTS.items()
    ]


async def test_ingestion_is_idempotent_and_reports_skips(world):
    imaging, records, image_model, _, cases, _ = world
    missing = CaseSource(CaseRecord("case-x", "Patient/x", "none", (), "test"), "text")
    report = await ingest_cases(
        [*sources(), missing],
        records=records,
        imaging=imaging,
        image_model=image_model,
        index=cases,
        weights=FusionWeights(0.5, 0.5),
        batch_size=2,
    )
    assert report.indexed == 3
    assert report.skipped == [("case-x", "study none: no chest image in the study")]
    stored = cases.cases["case-p3"]
    assert stored.labs is not None
    assert stored.labs.measured_count == 3
    np.testing.assert_allclose(np.linalg.norm(stored.fused), 1.0, rtol=1e-5)
    again = await ingest_cases(
        sources(), records=records, imaging=imaging, image_model=image_model, index=cases
    )
    assert (again.indexed, again.already_indexed) == (0, 3)


async def test_passage_ingestion_resumes(world):
    *_, text_model, _, literature = world
    passages = [Passage(f"{i}:0", str(i), f"text {i}") for i in range(5)]
    seen = []
    first = await ingest_passages(
        passages[:3], text_model=text_model, index=literature, on_progress=seen.append
    )
    second = await ingest_passages(passages, text_model=text_model, index=literature, batch_size=1)
    assert (first.indexed, second.indexed, second.already_indexed) == (3, 2, 3)
    assert sum(seen) == 3
    assert await literature.passage_ids() == {p.passage_id for p in passages}


class RecordingText(TextDouble):
    def __init__(self):
        super().__init__()
        self.batches = []

    async def embed_texts(self, texts):
        self.batches.append(list(texts))
        return await super().embed_texts(texts)


async def test_passages_are_embedded_shortest_first(world):
    model, literature = RecordingText(), world[5]
    passages = [Passage(f"{i}:0", str(i), "word " * n) for i, n in enumerate([9, 1, 5, 3, 7])]
    await ingest_passages(passages, text_model=model, index=literature, batch_size=2)
    lengths = [[len(t.split()) for t in batch] for batch in model.batches]
    assert lengths == [[1, 3], [5, 7], [9]]


async def advisor_for(world):
    imaging, records, image_model, text_model, cases, literature = world
    await ingest_cases(
        sources(), records=records, imaging=imaging, image_model=image_model, index=cases
    )
    await literature.upsert_passages(
        [Passage("7:0", "7", "effusion management"), Passage("8:0", "8", "knee surgery")],
        text_model.vectors(["effusion management", "knee surgery"]),
    )
    return Advisor(
        imaging=imaging,
        image_model=image_model,
        text_model=text_model,
        cases=cases,
        literature=literature,
    )


async def test_brief_for_a_patient(world):
    advisor = await advisor_for(world)
    brief = await advisor.brief("query", world[1])
    assert brief.patient_ref == "Patient/query"
    assert {h.case.case_id for h in brief.cases} == {"case-p1", "case-p2", "case-p3"}
    assert all(h.leg("image") and h.leg("labs") for h in brief.cases)
    assert "effusion" in brief.literature_query
    assert brief.passages[0].passage.pmid == "7"
    assert brief.omissions == ()
    assert [m.name for m in brief.models] == ["test-image", "test-text"]


async def test_brief_with_hybrid_literature_search_and_a_reranker(world):
    imaging, records, image_model, _, cases, literature = world
    model = DenseSparseDouble()
    await ingest_cases(
        sources(), records=records, imaging=imaging, image_model=image_model, index=cases
    )
    passages = [
        Passage("7:0", "7", "effusion management"),
        Passage("8:0", "8", "effusion after knee surgery"),
    ]
    await ingest_passages(passages, text_model=model, index=literature, sparse_model=model)
    model.runs.clear()
    reranker = TableReranker({"effusion after knee surgery": 0.9, "effusion management": 0.1})
    advisor = Advisor(
        imaging=imaging,
        image_model=image_model,
        text_model=model,
        cases=cases,
        literature=literature,
        sparse_model=model,
        reranker=reranker,
    )
    brief = await advisor.brief("query", records)
    assert model.runs == ["encode"]
    assert len(reranker.calls) == 1
    assert [(h.passage.pmid, h.score) for h in brief.passages] == [
        ("8", pytest.approx(0.9)),
        ("7", pytest.approx(0.1)),
    ]
    # BGE-M3 is one model for both legs: its card is listed once.
    assert [m.name for m in brief.models] == ["test-image", "test-dense-sparse", "test-reranker"]


async def test_own_patient_is_never_its_own_neighbour(world):
    advisor = await advisor_for(world)
    brief = await advisor.brief("p1", world[1])
    assert "Patient/p1" not in {h.case.patient_ref for h in brief.cases}


async def test_imaging_failure_degrades_to_labs_with_a_note(world):
    advisor = await advisor_for(world)
    world[0].failure = "timed out"
    brief = await advisor.brief("query", world[1])
    assert brief.cases
    assert all(h.leg("image") is None and h.leg("labs") for h in brief.cases)
    assert brief.omissions[0] == "imaging unavailable (timed out); cases matched without it"


async def test_record_failure_propagates(world):
    advisor = await advisor_for(world)
    with pytest.raises(SourceUnavailable, match="FHIR server unavailable: down"):
        await advisor.brief("query", FixedRecords(failure="down"))


async def test_patient_without_images_or_labs(world):
    advisor = await advisor_for(world)
    brief = await advisor.brief("nobody", FixedRecords())
    assert brief.cases == ()
    assert brief.passages == ()
    assert brief.omissions == (
        "no chest radiograph on file; cases matched without an image",
        "lab comparison skipped: 0 of the panel's tests measured, 3 needed",
        "literature not searched: no findings in similar cases and no abnormal labs",
    )


class Hanging(FixedImaging):
    async def chest_images(self, patient_id, *, limit=4, study_uid=None):
        await asyncio.sleep(3600)


class HangingRecords(FixedRecords):
    async def laboratory_results(self, patient_id):
        await asyncio.sleep(3600)


class SlowText(TextDouble):
    async def embed_texts(self, texts):
        await asyncio.sleep(3600)


def deadline_in(seconds):
    return asyncio.get_running_loop().time() + seconds


async def test_a_hanging_pacs_is_cut_at_the_deadline(world):
    advisor = await advisor_for(world)
    advisor = dataclasses.replace(
        advisor, imaging=Hanging(), settings=AdvisorSettings(compute_reserve_s=0.2)
    )
    started = time.perf_counter()
    brief = await advisor.brief("query", world[1], deadline=deadline_in(0.5))
    assert time.perf_counter() - started < 0.5
    assert brief.cases  # by labs
    assert brief.omissions[0] == (
        "imaging unavailable (no answer within the call's time budget); cases matched without it"
    )


async def test_hanging_labs_raise_before_the_deadline(world):
    advisor = await advisor_for(world)
    advisor = dataclasses.replace(advisor, settings=AdvisorSettings(compute_reserve_s=0.2))
    started = time.perf_counter()
    with pytest.raises(SourceUnavailable, match="clinical record unavailable: no answer"):
        await advisor.brief("query", HangingRecords(), deadline=deadline_in(0.5))
    assert time.perf_counter() - started < 0.5


async def test_literature_is_left_out_when_time_runs_out(world):
    advisor = await advisor_for(world)
    advisor = dataclasses.replace(advisor, text_model=SlowText())
    brief = await advisor.brief("query", world[1], deadline=deadline_in(1.5))
    assert brief.cases
    assert brief.passages == ()
    assert "literature not searched: the call's time budget ran out" in brief.omissions


XR_FOR_CARDIOMEGALY = ImagingOrder("ServiceRequest/1", "XR", "Cardiomegaly")


async def test_an_orders_reason_is_a_case_leg_and_the_literature_query(world):
    advisor = await advisor_for(world)
    brief = await advisor.brief_for_orders("query", world[1], [XR_FOR_CARDIOMEGALY])
    by_case = {h.case.case_id: h for h in brief.cases}
    assert set(by_case) == {"case-p1", "case-p2", "case-p3"}
    assert all(h.leg("image") and h.leg("labs") and h.leg("reason") for h in brief.cases)
    assert by_case["case-p3"].leg("reason").rank == 1  # the one case recorded with cardiomegaly
    assert brief.literature_query.startswith("reason for chest imaging: Cardiomegaly")
    assert brief.literature_basis == "the reason given for the chest X-ray order"
    assert brief.omissions == ()


async def test_the_reason_leg_excludes_the_patient_too(world):
    advisor = await advisor_for(world)
    brief = await advisor.brief_for_orders("p3", world[1], [XR_FOR_CARDIOMEGALY])
    assert "Patient/p3" not in {h.case.patient_ref for h in brief.cases}


async def test_several_orders_search_each_distinct_reason(world):
    advisor = await advisor_for(world)
    orders = [
        XR_FOR_CARDIOMEGALY,
        ImagingOrder("ServiceRequest/2", "CT", "effusion"),
        ImagingOrder("ServiceRequest/3", "CT", "  cardiomegaly "),
    ]
    brief = await advisor.brief_for_orders("query", world[1], orders)
    assert brief.literature_query.startswith("reason for chest imaging: Cardiomegaly, effusion")
    assert brief.literature_basis == "the reason given for the chest X-ray and chest CT orders"


async def test_orders_without_a_reason_get_the_patient_search_and_say_so(world):
    advisor = await advisor_for(world)
    brief = await advisor.brief_for_orders("query", world[1], [ImagingOrder(None, "CT")])
    assert all(h.leg("reason") is None for h in brief.cases)
    assert "effusion" in brief.literature_query  # from the similar cases' findings
    assert brief.omissions == (
        "no reason given for the chest CT order: cases and literature found without one",
    )


class SlowFindings(MeanImageModel):
    async def embed_findings(self, texts):
        await asyncio.sleep(3600)


async def test_a_reason_search_past_the_deadline_is_left_out(world):
    advisor = await advisor_for(world)
    advisor = dataclasses.replace(advisor, image_model=SlowFindings())
    started = time.perf_counter()
    brief = await advisor.brief_for_orders(
        "query", world[1], [XR_FOR_CARDIOMEGALY], deadline=deadline_in(0.5)
    )
    assert time.perf_counter() - started < 0.6
    assert brief.cases  # by image and labs
    assert all(h.leg("reason") is None for h in brief.cases)
    assert "reason search not run: the call's time budget ran out" in brief.omissions
