import numpy as np
import pytest

from core.fusion import normalize
from core.labs import LAB_PANEL
from core.retrieval import (
    CaseSearchSettings,
    LegResult,
    LiteratureSearchSettings,
    image_leg,
    lab_leg,
    literature_query,
    merge_legs,
    search_literature,
)
from core.types import CaseHit, CaseRecord, IndexedCase, LabProfile, LegMatch, Passage
from tests.core.doubles import MemoryCases, MemoryLiterature, TextDouble

pytestmark = pytest.mark.anyio
L = len(LAB_PANEL)


def unit(*xs):
    v = np.zeros(4, dtype=np.float32)
    v[: len(xs)] = xs
    return normalize(v)


def labs(*values, measured=None):
    v = np.zeros(L, dtype=np.float32)
    v[: len(values)] = values
    m = measured if measured is not None else len(values)
    return LabProfile(v, tuple(i < m for i in range(L)))


def case(cid, patient, fused, lab=None, findings=("Effusion",)):
    record = CaseRecord(cid, f"Patient/{patient}", f"1.2.{cid}", findings, "test")
    return IndexedCase(record, "text", fused, fused, fused, lab)


async def index_of(*cases):
    index = MemoryCases()
    await index.upsert_cases(cases)
    return index


async def legs_for(index, *, patient="Patient/q", images=None, lab=None, settings=None):
    settings = settings or CaseSearchSettings()
    legs = []
    if images is not None:
        legs.append(await image_leg(images, patient_ref=patient, index=index, k=settings.leg_k))
    labs = await lab_leg(lab, patient_ref=patient, index=index, settings=settings)
    notes = [labs] if isinstance(labs, str) else []
    legs += [] if isinstance(labs, str) else [labs]
    hits = merge_legs(legs, patient_ref=patient, k=settings.k, rrf_k=settings.rrf_k)
    return hits, notes


async def test_image_leg_ranks_by_similarity_and_excludes_own_patient():
    index = await index_of(
        case("own", "q", unit(1, 0)),  # identical image, same patient: must never come back
        case("near", "a", unit(1, 0.1)),
        case("far", "b", unit(0, 1)),
    )
    hits, notes = await legs_for(index, images=np.stack([unit(1, 0)]))
    assert [h.case.case_id for h in hits] == ["near", "far"]
    assert hits[0].leg("image").rank == 1
    assert hits[0].leg("labs") is None
    assert hits[0].leg("image").score == pytest.approx(float(np.dot(unit(1, 0), unit(1, 0.1))))
    assert hits[0].leg("image").metric == "cos"
    assert any("lab comparison skipped" in n for n in notes)


async def test_own_patient_dropped_even_if_index_returns_it():
    index = await index_of(case("own", "q", unit(1, 0), labs(1, 1, 1)), case("x", "a", unit(0, 1)))
    index.leak_patient = True
    hits, _ = await legs_for(index, images=np.stack([unit(1, 0)]), lab=labs(1, 1, 1))
    assert [h.case.case_id for h in hits] == ["x"]
    assert hits[0].leg("image").rank == 1  # ranks are counted after the own patient is dropped


async def test_legs_merge_by_rank_so_neither_drowns_the_other():
    index = await index_of(
        case("img_best", "a", unit(1, 0), labs(5, 5, 5)),
        case("lab_best", "b", unit(0, 1), labs(1, 1, 1)),
        case("both_second", "c", unit(1, 1), labs(2, 2, 2)),
    )
    hits, notes = await legs_for(
        index,
        images=np.stack([unit(1, 0)]),
        lab=labs(1, 1, 1),
        settings=CaseSearchSettings(k=3, min_labs=3),
    )
    # Image ranks img_best 1, both 2, lab_best 3; lab ranks lab_best 1, both 2, img_best 3.
    # RRF: 1/61 + 1/63 (the two leg winners, tied) > 2/62 (second in both legs).
    assert [h.case.case_id for h in hits] == ["img_best", "lab_best", "both_second"]
    scores = {h.case.case_id: h.score for h in hits}
    assert scores["img_best"] == pytest.approx(scores["lab_best"])
    assert notes == []
    by_id = {h.case.case_id: h for h in hits}
    assert by_id["lab_best"].leg("labs").rank == 1
    assert by_id["lab_best"].leg("labs").score == pytest.approx(0)
    assert by_id["lab_best"].leg("labs").metric == "dist"


async def test_lab_leg_needs_enough_measured_tests():
    index = await index_of(case("a", "a", unit(1, 0), labs(1, 1, 1)))
    hits, notes = await legs_for(index, lab=labs(1, 1))
    assert hits == ()
    assert notes == ["lab comparison skipped: 2 of the panel's tests measured, 3 needed"]


async def test_multiple_query_images_take_best_similarity():
    index = await index_of(case("a", "a", unit(1, 0)), case("b", "b", unit(0, 1)))
    hits, _ = await legs_for(index, images=np.stack([unit(1, 0), unit(0, 1)]))
    assert [h.leg("image").score for h in hits] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_merge_legs_with_any_leg_names():
    a, b = (CaseRecord(i, f"Patient/{i}", "1", (), "t") for i in "ab")
    reason = LegResult("reason", "cos", ((b, 0.9), (a, 0.2)))
    hits = merge_legs([reason], patient_ref="Patient/q", k=5, rrf_k=60)
    assert [h.case.case_id for h in hits] == ["b", "a"]
    assert hits[1].legs == (LegMatch("reason", 2, 0.2, "cos"),)


def hit(*findings):
    return CaseHit(CaseRecord("c", "Patient/p", "1", findings, "t"), 0.1)


def test_literature_query_from_case_findings_and_abnormal_labs():
    profile = LabProfile(np.zeros(L, np.float32), (True,) * L, (("Hemoglobin", "low"),))
    query = literature_query(
        [hit("Effusion", "Pleural_Thickening"), hit("Effusion"), hit("No Finding")], profile
    )
    assert query == (
        "chest radiograph findings: effusion, pleural thickening; "
        "laboratory results: low hemoglobin"
    )
    assert literature_query([hit("No Finding")], None) is None


async def test_search_literature_returns_attributed_passages():
    model, index = TextDouble(), MemoryLiterature()
    passages = [
        Passage("1:0", "1", "pleural effusion drainage outcomes"),
        Passage("2:0", "2", "wrist fracture casting"),
    ]
    await index.upsert_passages(passages, model.vectors([p.text for p in passages]))
    found = await search_literature("pleural effusion", embedder=model, index=index)
    assert found[0].passage.pmid == "1"
    assert found[0].score > found[1].score


async def test_one_passage_per_article():
    model, index = TextDouble(), MemoryLiterature()
    passages = [
        Passage("1:0", "1", "pleural effusion drainage"),
        Passage("1:1", "1", "pleural effusion drainage outcomes"),
        Passage("2:0", "2", "pleural effusion in heart failure"),
        Passage("3:0", "3", "wrist fracture"),
    ]
    await index.upsert_passages(passages, model.vectors([p.text for p in passages]))
    found = await search_literature(
        "pleural effusion drainage",
        embedder=model,
        index=index,
        settings=LiteratureSearchSettings(k=2),
    )
    assert [h.passage.passage_id for h in found] == ["1:0", "2:0"]
