import numpy as np
import pytest

from core.fusion import normalize
from core.labs import LAB_PANEL
from core.ports import DenseSparseTextEmbedder, Reranker, SparseTextEmbedder, TextEmbedder
from core.retrieval import (
    CaseSearchSettings,
    LegResult,
    LiteratureSearchSettings,
    fuse_passages,
    image_leg,
    lab_leg,
    literature_legs,
    literature_query,
    merge_legs,
    rerank_passages,
    search_literature,
)
from core.types import CaseHit, CaseRecord, IndexedCase, LabProfile, LegMatch, Passage
from tests.core.doubles import (
    DenseSparseDouble,
    MemoryCases,
    MemoryLiterature,
    SparseDouble,
    TableReranker,
    TextDouble,
    word_weights,
)

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


async def test_dense_only_search_scores_are_cosine_similarities():
    model, index = TextDouble(), MemoryLiterature()
    passages = [Passage("1:0", "1", "pleural effusion"), Passage("2:0", "2", "effusion")]
    vectors = model.vectors([p.text for p in passages])
    await index.upsert_passages(passages, vectors, word_weights([p.text for p in passages]))
    query = model.vectors(["pleural effusion drainage"])[0]
    found = await search_literature("pleural effusion drainage", embedder=model, index=index)
    # Sparse weights in the index are not used without a sparse model.
    assert [(h.passage, h.score) for h in found] == [
        (passages[0], pytest.approx(float(np.dot(query, vectors[0])))),
        (passages[1], pytest.approx(float(np.dot(query, vectors[1])))),
    ]


@pytest.mark.parametrize("field", ["k", "candidates", "rrf_k", "rerank_top_n"])
def test_literature_settings_reject_values_below_one(field):
    assert getattr(LiteratureSearchSettings(**{field: 1}), field) == 1
    with pytest.raises(ValueError, match=f"literature search {field} must be >= 1, got 0"):
        LiteratureSearchSettings(**{field: 0})


def test_literature_settings_defaults():
    s = LiteratureSearchSettings()
    assert (s.k, s.candidates, s.rrf_k, s.rerank_top_n) == (3, 30, 60, 20)


def article(pmid, section=0, text=None, **fields):
    return Passage(f"{pmid}:{section}", str(pmid), text or f"text {pmid} {section}", **fields)


def test_passage_found_by_both_legs_outranks_one_found_by_one_leg():
    a, b, c = article(1), article(2), article(3)
    # b is second in the dense leg and first in the sparse leg; a is first in the dense leg only.
    fused = fuse_passages([[(a, 0.9), (b, 0.8)], [(b, 12.0), (c, 3.0)]], rrf_k=60)
    assert [(p, score) for p, score in fused] == [
        (b, pytest.approx(1 / 62 + 1 / 61)),
        (a, pytest.approx(1 / 61)),
        (c, pytest.approx(1 / 62)),
    ]


def test_fusion_is_keyed_by_passage_id_not_by_article():
    same_article = [article(1, 0), article(1, 1)]
    fused = fuse_passages([[(same_article[0], 0.5)], [(same_article[1], 0.4)]], rrf_k=60)
    assert [p.passage_id for p, _ in fused] == ["1:0", "1:1"]
    with pytest.raises(ValueError, match="twice"):
        fuse_passages([[(same_article[0], 0.5), (same_article[0], 0.4)]], rrf_k=60)


QUERY = "pleural effusion"


async def hybrid_index(model):
    """Passages whose dense and sparse rankings for QUERY disagree: dense ranks a, b, c; sparse
    ranks b, c and cannot find a, which shares no token with the query."""
    q = model.vectors([QUERY])[0]
    other = np.zeros_like(q)
    other[int(np.flatnonzero(q == 0)[0])] = 1.0  # orthogonal to the query
    ids = list(word_weights([QUERY])[0])
    index = MemoryLiterature()
    passages = [
        article(1, text="a", doi="10.1/a", title="A"),
        article(2, text="b"),
        article(3, text="c"),
    ]
    vectors = np.stack([q, normalize(q + other), other])
    sparse = [{99_999: 5.0}, {ids[0]: 2.0}, {ids[0]: 0.5, ids[1]: 0.5}]
    await index.upsert_passages(passages, vectors, sparse)
    return index, passages


async def test_literature_legs_rank_by_dense_and_by_sparse():
    model, sparse_model = TextDouble(), SparseDouble()
    index, (a, b, c) = await hybrid_index(model)
    legs = await literature_legs(
        QUERY, embedder=model, index=index, k=10, sparse_embedder=sparse_model
    )
    assert [p for p, _ in legs["dense"]] == [a, b, c]
    assert legs["sparse"] == [(b, 2.0), (c, 1.0)]
    assert sparse_model.calls == [[QUERY]]
    dense_only = await literature_legs(QUERY, embedder=model, index=index, k=2)
    assert list(dense_only) == ["dense"]
    assert [p for p, _ in dense_only["dense"]] == [a, b]


async def test_hybrid_search_fuses_the_legs():
    model = TextDouble()
    index, (a, b, c) = await hybrid_index(model)
    dense = await search_literature(QUERY, embedder=model, index=index)
    assert [h.passage for h in dense] == [a, b, c]
    hybrid = await search_literature(
        QUERY, embedder=model, index=index, sparse_embedder=SparseDouble()
    )
    # b: 1/62 (dense) + 1/61 (sparse); c: 1/63 + 1/62; a: 1/61 (dense only).
    assert [(h.passage, h.score) for h in hybrid] == [
        (b, pytest.approx(1 / 62 + 1 / 61)),
        (c, pytest.approx(1 / 63 + 1 / 62)),
        (a, pytest.approx(1 / 61)),
    ]
    assert hybrid[2].passage.doi == "10.1/a"  # the citation survives fusion whole
    assert hybrid[2].passage.title == "A"
    # Each hit says how each leg ranked it, in that leg's own measure.
    assert [h.legs for h in hybrid] == [
        (LegMatch("dense", 2, pytest.approx(2**-0.5), "cos"), LegMatch("sparse", 1, 2.0, "ip")),
        (LegMatch("dense", 3, pytest.approx(0.0), "cos"), LegMatch("sparse", 2, 1.0, "ip")),
        (LegMatch("dense", 1, pytest.approx(1.0), "cos"),),
    ]
    assert [h.legs for h in dense] == [
        (LegMatch("dense", i, h.score, "cos"),) for i, h in enumerate(dense, 1)
    ]


async def test_one_model_for_both_legs_runs_once_per_query():
    model = DenseSparseDouble()
    index, (a, b, c) = await hybrid_index(model)
    found = await search_literature(QUERY, embedder=model, index=index, sparse_embedder=model)
    assert model.runs == ["encode"]
    assert [h.passage for h in found] == [b, c, a]


async def test_query_without_sparse_terms_leaves_the_sparse_leg_empty():
    model = TextDouble()
    index, _ = await hybrid_index(model)
    legs = await literature_legs(
        "1 2 3", embedder=model, index=index, k=10, sparse_embedder=SparseDouble()
    )
    assert legs["sparse"] == []
    assert len(legs["dense"]) == 3


async def test_reranker_reorders_only_the_top_n():
    ranked = [(article(i), 1.0 - i / 10) for i in range(1, 5)]
    reranker = TableReranker({"text 2 0": 0.9, "text 1 0": 0.2, "text 4 0": 1.0})
    reranked = await rerank_passages("q", ranked, reranker=reranker, top_n=2)
    assert reranker.calls == [["text 1 0", "text 2 0"]]
    # 4 would win a full rerank, but it is beyond the top 2: it keeps its place and its score.
    assert [(p.pmid, score) for p, score in reranked] == [
        ("2", pytest.approx(0.9)),
        ("1", pytest.approx(0.2)),
        ("3", pytest.approx(0.7)),
        ("4", pytest.approx(0.6)),
    ]


async def test_rerank_ties_keep_the_given_order_and_bad_arguments_are_refused():
    ranked = [(article(i), 0.0) for i in range(1, 4)]
    reranked = await rerank_passages("q", ranked, reranker=TableReranker({}), top_n=10)
    assert [p for p, _ in reranked] == [p for p, _ in ranked]
    assert await rerank_passages("q", [], reranker=TableReranker({}), top_n=5) == []
    with pytest.raises(ValueError, match="top_n must be >= 1, got 0"):
        await rerank_passages("q", ranked, reranker=TableReranker({}), top_n=0)

    class Short(TableReranker):
        async def score(self, query, passages):
            return (await super().score(query, passages))[:-1]

    with pytest.raises(ValueError, match="returned 2 scores for 3 passages"):
        await rerank_passages("q", ranked, reranker=Short({}), top_n=3)


async def test_reranked_search_keeps_one_passage_per_article():
    model, index = TextDouble(), MemoryLiterature()
    passages = [
        article(1, 0, "pleural effusion drainage"),
        article(1, 1, "pleural effusion drainage outcomes", doi="10.1/one"),
        article(2, 0, "pleural effusion in heart failure"),
        article(3, 0, "pleural effusion tuberculosis"),
    ]
    texts = [p.text for p in passages]
    await index.upsert_passages(passages, model.vectors(texts), word_weights(texts))
    reranker = TableReranker({texts[1]: 0.8, texts[3]: 0.7, texts[0]: 0.1, texts[2]: 0.05})
    found = await search_literature(
        "pleural effusion drainage",
        embedder=model,
        index=index,
        settings=LiteratureSearchSettings(k=2, rerank_top_n=4),
        sparse_embedder=SparseDouble(),
        reranker=reranker,
    )
    assert [(h.passage, h.score) for h in found] == [
        (passages[1], pytest.approx(0.8)),
        (passages[3], pytest.approx(0.7)),
    ]
    assert found[0].leg("rerank") == LegMatch("rerank", 1, pytest.approx(0.8), "relevance")
    assert found[1].leg("rerank") == LegMatch("rerank", 2, pytest.approx(0.7), "relevance")
    assert [m.leg for m in found[0].legs] == ["dense", "sparse", "rerank"]
    assert sorted(reranker.calls[0]) == sorted(texts)


async def test_search_depth_is_candidates_per_leg():
    model, index = TextDouble(), MemoryLiterature()
    passages = [article(i, text=f"effusion {'x' * i}") for i in range(1, 9)]
    texts = [p.text for p in passages]
    await index.upsert_passages(passages, model.vectors(texts), word_weights(texts))
    reranker = TableReranker({})
    found = await search_literature(
        "effusion",
        embedder=model,
        index=index,
        settings=LiteratureSearchSettings(k=8, candidates=3, rerank_top_n=20),
        sparse_embedder=SparseDouble(),
        reranker=reranker,
    )
    # Each leg fetched max(k, candidates) = 8; all 8 were reranked.
    assert len(found) == 8
    assert len(reranker.calls[0]) == 8
    found = await search_literature(
        "effusion",
        embedder=model,
        index=index,
        settings=LiteratureSearchSettings(k=1, candidates=3),
        sparse_embedder=SparseDouble(),
        reranker=reranker,
    )
    assert len(reranker.calls[1]) == 3


def test_the_doubles_satisfy_the_ports():
    assert isinstance(TextDouble(), TextEmbedder)
    assert isinstance(SparseDouble(), SparseTextEmbedder)
    assert not isinstance(SparseDouble(), DenseSparseTextEmbedder)
    assert isinstance(DenseSparseDouble(), DenseSparseTextEmbedder)
    assert isinstance(TableReranker({}), Reranker)
