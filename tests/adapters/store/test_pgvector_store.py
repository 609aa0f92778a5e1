"""PgVectorStore against a real PostgreSQL with pgvector: upserts, searches, indexes, failures."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, sql

from adapters.store.embedded import EmbeddedPostgres
from adapters.store.pgvector_store import PgVectorStore
from core.errors import SourceUnavailable
from core.labs import LAB_PANEL
from core.ports import CaseIndex, LiteratureIndex
from core.types import CaseRecord, IndexedCase, LabProfile, Passage, Vector

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

IMAGE_DIM = 8
TEXT_DIM = 16
LAB_DIM = len(LAB_PANEL)
OPEN_ARGS: dict[str, Any] = {
    "image_model": "test-image",
    "image_dim": IMAGE_DIM,
    "text_model": "test-text",
    "text_dim": TEXT_DIM,
}


@pytest.fixture
async def store(database: str) -> AsyncIterator[PgVectorStore]:
    """A store on an empty index."""
    await PgVectorStore.drop(database)
    async with await PgVectorStore.open(database, **OPEN_ARGS) as opened:
        yield opened


def _unit(rng: np.random.Generator, dim: int) -> Vector:
    vector = rng.normal(size=dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _labs(rng: np.random.Generator, measured: int) -> LabProfile:
    mask = np.zeros(LAB_DIM, dtype=bool)
    mask[rng.choice(LAB_DIM, size=measured, replace=False)] = True
    vector = np.where(mask, rng.uniform(-3, 3, size=LAB_DIM), 0).astype(np.float32)
    return LabProfile(vector=vector, measured=tuple(bool(m) for m in mask))


def _case(
    case_id: str,
    patient: str,
    fused: Vector,
    labs: LabProfile | None = None,
    findings: tuple[str, ...] = ("Effusion",),
) -> IndexedCase:
    record = CaseRecord(
        case_id=case_id,
        patient_ref=patient,
        study_uid=f"1.2.826.0.1.{case_id}",
        findings=findings,
        provenance="test case",
    )
    return IndexedCase(
        record=record,
        findings_text=", ".join(findings),
        image=fused[::-1].copy(),
        findings=-fused,
        fused=fused,
        labs=labs,
    )


def _cosine(a: Vector, b: Vector) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def _rows(dsn: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    async with await AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchall()


async def test_store_implements_both_index_ports(store: PgVectorStore) -> None:
    assert isinstance(store, CaseIndex)
    assert isinstance(store, LiteratureIndex)


async def test_upsert_cases_is_idempotent_and_replaces_values(
    store: PgVectorStore, database: str
) -> None:
    rng = np.random.default_rng(1)
    cases = [
        _case(f"c{i}", f"Patient/p{i}", _unit(rng, IMAGE_DIM), _labs(rng, 5)) for i in range(5)
    ]
    await store.upsert_cases(cases)
    await store.upsert_cases(cases)
    assert await store.case_ids() == {c.record.case_id for c in cases}
    assert await _rows(database, "SELECT count(*) FROM cases") == [(5,)]
    measured = await _rows(database, "SELECT labs_measured FROM cases WHERE case_id = 'c1'")
    assert measured == [(cases[1].labs.measured_count if cases[1].labs else -1,)]

    new_fused = _unit(rng, IMAGE_DIM)
    replaced = _case("c0", "Patient/p0", new_fused, labs=None, findings=("Mass", "Nodule"))
    await store.upsert_cases([replaced])
    assert await _rows(database, "SELECT count(*) FROM cases") == [(5,)]
    row = await _rows(
        database,
        "SELECT findings, findings_text, labs IS NULL, labs_measured FROM cases"
        " WHERE case_id = 'c0'",
    )
    assert row == [(["Mass", "Nodule"], "Mass, Nodule", True, 0)]
    hits = await store.nearest_by_image(new_fused, k=1, exclude_patient="Patient/other")
    assert hits[0][0] == replaced.record
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)


async def test_a_case_id_repeated_in_one_call_keeps_the_later(
    store: PgVectorStore, database: str
) -> None:
    rng = np.random.default_rng(2)
    first = _case("c0", "Patient/p0", _unit(rng, IMAGE_DIM), findings=("Mass",))
    second = _case("c0", "Patient/p0", _unit(rng, IMAGE_DIM), findings=())
    await store.upsert_cases([first, second])
    assert await _rows(database, "SELECT findings FROM cases") == [([],)]


async def test_image_search_ranks_by_cosine_and_never_returns_the_excluded_patient(
    store: PgVectorStore,
) -> None:
    rng = np.random.default_rng(3)
    cases = [
        _case(f"{patient}-{i}", f"Patient/{patient}", _unit(rng, IMAGE_DIM))
        for patient in ("a", "b", "c")
        for i in range(6)
    ]
    await store.upsert_cases(cases)
    query = cases[2].fused  # a case of Patient/a: the nearest of all to itself

    unfiltered = await store.nearest_by_image(query, k=3, exclude_patient="Patient/z")
    assert unfiltered[0][0] == cases[2].record

    hits = await store.nearest_by_image(query, k=5, exclude_patient="Patient/a")
    others = [c for c in cases if c.record.patient_ref != "Patient/a"]
    expected = sorted(others, key=lambda c: -_cosine(query, c.fused))[:5]
    assert [case for case, _ in hits] == [c.record for c in expected]
    assert [s for _, s in hits] == pytest.approx(
        [_cosine(query, c.fused) for c in expected], abs=1e-5
    )

    everything = await store.nearest_by_image(query, k=len(cases), exclude_patient="Patient/a")
    assert len(everything) == len(others)
    assert all(case.patient_ref != "Patient/a" for case, _ in everything)


async def test_findings_search_ranks_by_cosine_of_the_findings_vectors_only(
    store: PgVectorStore,
) -> None:
    rng = np.random.default_rng(4)
    cases = [
        _case(f"{patient}-{i}", f"Patient/{patient}", _unit(rng, IMAGE_DIM))
        for patient in ("a", "b")
        for i in range(5)
    ]
    await store.upsert_cases(cases)
    query = cases[7].findings  # _case stores -fused as the findings vector

    hits = await store.nearest_by_findings(query, k=3, exclude_patient="Patient/a")
    others = [c for c in cases if c.record.patient_ref != "Patient/a"]
    expected = sorted(others, key=lambda c: -_cosine(query, c.findings))[:3]
    assert [case for case, _ in hits] == [c.record for c in expected]
    assert hits[0][0] == cases[7].record
    assert [s for _, s in hits] == pytest.approx(
        [_cosine(query, c.findings) for c in expected], abs=1e-5
    )
    everything = await store.nearest_by_findings(query, k=50, exclude_patient="Patient/b")
    assert {case.patient_ref for case, _ in everything} == {"Patient/a"}


async def test_lab_search_respects_min_measured_and_excludes_the_patient(
    store: PgVectorStore,
) -> None:
    rng = np.random.default_rng(4)
    query = _labs(rng, 8)
    # "few" has the query's own lab vector but only 2 measured tests: the filter, not the
    # distance, must keep it out; "own" is identical to the query but is the query's patient.
    few = LabProfile(query.vector, tuple(i < 2 for i in range(LAB_DIM)))
    cases = [
        _case("own", "Patient/q", _unit(rng, IMAGE_DIM), query),
        _case("few", "Patient/f", _unit(rng, IMAGE_DIM), few),
        _case("none", "Patient/n", _unit(rng, IMAGE_DIM), None),
    ]
    cases += [
        _case(f"m{i}", f"Patient/m{i % 4}", _unit(rng, IMAGE_DIM), _labs(rng, 1 + i % 9))
        for i in range(20)
    ]
    await store.upsert_cases(cases)
    profiles = {c.record.case_id: c.labs.vector for c in cases if c.labs is not None}

    def distance(case_id: str) -> float:
        return float(np.linalg.norm(profiles[case_id] - query.vector))

    hits = await store.nearest_by_labs(
        query.vector, k=8, exclude_patient="Patient/q", min_measured=3
    )
    eligible = [
        c.record
        for c in cases
        if c.labs is not None and c.labs.measured_count >= 3 and c.record.patient_ref != "Patient/q"
    ]
    expected = sorted(eligible, key=lambda record: distance(record.case_id))[:8]
    assert [case for case, _ in hits] == expected
    assert [d for _, d in hits] == pytest.approx(
        [distance(r.case_id) for r in expected], rel=1e-5, abs=1e-5
    )

    loose = await store.nearest_by_labs(
        query.vector, k=3, exclude_patient="Patient/x", min_measured=2
    )
    assert {case.case_id for case, _ in loose[:2]} == {"own", "few"}
    assert [d for _, d in loose[:2]] == pytest.approx([0.0, 0.0], abs=1e-6)


async def test_passages_round_trip_with_their_identifiers(store: PgVectorStore) -> None:
    rng = np.random.default_rng(5)
    passages = [
        Passage("100:0", "100", "Background text.", "BACKGROUND", "2001", None),
        Passage("100:2", "100", "Results text.", "RESULTS", "2001", None),
        Passage("200:0", "200", "No section.", None, None, "A title"),
    ]
    vectors = np.stack([_unit(rng, TEXT_DIM) for _ in passages])
    await store.upsert_passages(passages, vectors)
    await store.upsert_passages(passages, vectors)
    assert await store.passage_ids() == {p.passage_id for p in passages}

    for passage, vector in zip(passages, vectors, strict=True):
        hits = await store.nearest_passages(vector, k=3)
        assert hits[0][0] == passage
        expected = sorted(range(len(passages)), key=lambda j: -_cosine(vector, vectors[j]))
        assert [hit for hit, _ in hits] == [passages[j] for j in expected]
        assert [s for _, s in hits] == pytest.approx(
            [_cosine(vector, vectors[j]) for j in expected], abs=1e-5
        )


async def test_vectors_are_checked_before_anything_is_written(store: PgVectorStore) -> None:
    rng = np.random.default_rng(6)
    passages = [Passage("1:0", "1", "text"), Passage("1:1", "1", "more")]
    with pytest.raises(ValueError, match="shape"):
        await store.upsert_passages(passages, np.stack([_unit(rng, TEXT_DIM)]))
    with pytest.raises(ValueError, match="shape"):
        await store.upsert_passages(passages, np.zeros((2, TEXT_DIM + 1), np.float32))
    bad = np.stack([_unit(rng, TEXT_DIM), np.full(TEXT_DIM, np.nan, np.float32)])
    with pytest.raises(ValueError, match="non-finite"):
        await store.upsert_passages(passages, bad)
    assert await store.passage_ids() == frozenset()

    good = _case("ok", "Patient/1", _unit(rng, IMAGE_DIM))
    wrong = _case("wrong", "Patient/2", _unit(rng, IMAGE_DIM + 1))
    with pytest.raises(ValueError, match="case 1"):
        await store.upsert_cases([good, wrong])
    assert await store.case_ids() == frozenset()


async def test_settings_are_validated_before_connecting(database: str) -> None:
    with pytest.raises(ValueError, match="ef_search"):
        await PgVectorStore.open(database, **OPEN_ARGS, ef_search=0)
    with pytest.raises(ValueError, match="analyze_every"):
        await PgVectorStore.open(database, **OPEN_ARGS, analyze_every=0)
    with pytest.raises(ValueError, match="text_dim"):
        await PgVectorStore.open(database, **(OPEN_ARGS | {"text_dim": 4096}))


async def test_queries_are_validated(store: PgVectorStore) -> None:
    with pytest.raises(ValueError, match="shape"):
        await store.nearest_by_image(np.ones(IMAGE_DIM + 1, np.float32), k=1, exclude_patient="P")
    with pytest.raises(ValueError, match="zeros"):
        await store.nearest_passages(np.zeros(TEXT_DIM, np.float32), k=1)
    with pytest.raises(ValueError, match="k must"):
        await store.nearest_passages(np.ones(TEXT_DIM, np.float32), k=0)
    with pytest.raises(ValueError, match="shape"):
        await store.nearest_by_labs(
            np.ones(3, np.float32), k=1, exclude_patient="P", min_measured=1
        )


async def test_hnsw_indexes_serve_the_searches(store: PgVectorStore, database: str) -> None:
    rng = np.random.default_rng(7)
    n = 600
    passages = [Passage(f"{i}:0", str(i), f"passage {i}") for i in range(n)]
    dense = np.stack([_unit(rng, TEXT_DIM) for _ in range(n)])
    cases = [_case(f"c{i}", f"Patient/p{i % 50}", _unit(rng, IMAGE_DIM)) for i in range(n)]
    await store.upsert_passages(passages, dense)
    await store.upsert_cases(cases)
    await store.analyze()

    async with await AsyncConnection.connect(database) as conn:
        await register_vector_async(conn)
        cursor = await conn.execute(
            "EXPLAIN SELECT passage_id FROM passages ORDER BY dense <=> %s LIMIT %s",
            (dense[0], 10),
        )
        plan = "\n".join(line for (line,) in await cursor.fetchall())
        assert "Index Scan using passages_dense_hnsw_idx" in plan
        cursor = await conn.execute(
            "EXPLAIN SELECT case_id FROM cases WHERE patient_ref <> %s"
            " ORDER BY fused <=> %s LIMIT %s",
            ("Patient/p0", cases[0].fused, 10),
        )
        plan = "\n".join(line for (line,) in await cursor.fetchall())
        assert "Index Scan using cases_fused_hnsw_idx" in plan

    # An HNSW scan yields at most ef_search rows (40 by default): k above it needs the store
    # to raise ef_search for the query.
    hits = await store.nearest_passages(dense[3], k=100)
    assert len(hits) == 100
    assert hits[0][0] == passages[3]
    case_hits = await store.nearest_by_image(cases[3].fused, k=100, exclude_patient="Patient/p3")
    assert len(case_hits) == 100
    assert all(case.patient_ref != "Patient/p3" for case, _ in case_hits)


async def test_analyze_runs_after_enough_upserted_rows(database: str) -> None:
    await PgVectorStore.drop(database)
    rng = np.random.default_rng(8)
    query = "SELECT relname, last_analyze IS NOT NULL FROM pg_stat_user_tables"
    async with await PgVectorStore.open(database, **OPEN_ARGS, analyze_every=10) as store:
        for start in (0, 6):
            batch = [Passage(f"{i}:0", str(i), "text") for i in range(start, start + 6)]
            await store.upsert_passages(batch, np.stack([_unit(rng, TEXT_DIM) for _ in batch]))
            analyzed = dict(await _rows(database, query))
            assert analyzed["passages"] is (start == 6)
            assert analyzed["cases"] is False


async def test_an_unreachable_database_is_reported_unavailable(postgres: EmbeddedPostgres) -> None:
    missing = postgres.dsn_for(f"missing_{uuid.uuid4().hex[:8]}")
    with pytest.raises(SourceUnavailable) as raised:
        await PgVectorStore.open(missing, **OPEN_ARGS)
    assert raised.value.source == "index database"

    name = f"doomed_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    store = await PgVectorStore.open(postgres.dsn_for(name), **OPEN_ARGS, connect_timeout=1)
    try:
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        with pytest.raises(SourceUnavailable) as cases_down:
            await store.nearest_by_image(np.ones(IMAGE_DIM, np.float32), k=1, exclude_patient="P")
        assert cases_down.value.source == "case index"
        with pytest.raises(SourceUnavailable) as literature_down:
            await store.nearest_passages(np.ones(TEXT_DIM, np.float32), k=1)
        assert literature_down.value.source == "literature index"
    finally:
        await store.close()
