"""PgVectorStore against a real PostgreSQL with pgvector: upserts, searches, indexes, failures."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, sql

from adapters.store.pgvector_store import PgVectorStore
from adapters.store.schema import HnswParams
from core.errors import SourceUnavailable
from core.labs import LAB_PANEL
from core.ports import CaseIndex, LiteratureIndex
from core.types import CaseRecord, IndexedCase, LabProfile, Passage, SparseWeights, Vector
from tests.peers.postgres import PostgresServer, ServerPostgres

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
# A sparser graph than pgvector's default, faster to build.
SMALL_GRAPH = HnswParams(m=8, ef_construction=32)


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


async def test_hnsw_indexes_serve_the_searches(database: str) -> None:
    await PgVectorStore.drop(database)
    # pgvector 0.8 estimates an HNSW scan's cost closer than 0.6 does and prefers a sequential
    # scan of a table this small with m = 16; with a sparser graph the index scan is cheaper.
    store = await PgVectorStore.open(database, **OPEN_ARGS, hnsw=SMALL_GRAPH)
    async with store:
        await _check_hnsw_indexes_serve_the_searches(store, database)


async def _check_hnsw_indexes_serve_the_searches(store: PgVectorStore, database: str) -> None:
    rng = np.random.default_rng(7)
    n = 2000
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


async def test_an_unreachable_database_is_reported_unavailable(
    database_server: PostgresServer,
) -> None:
    postgres = database_server
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


SPARSE_ARGS: dict[str, Any] = OPEN_ARGS | {"sparse_model": "test-sparse"}


@pytest.fixture
async def hybrid(database: str) -> AsyncIterator[PgVectorStore]:
    """A store with a sparse model on an empty index."""
    await PgVectorStore.drop(database)
    async with await PgVectorStore.open(database, **SPARSE_ARGS) as opened:
        yield opened


def _sparse_weights(rng: np.random.Generator, vocab: int, terms: int) -> SparseWeights:
    ids = rng.choice(vocab, size=terms, replace=False)
    return {int(i): float(w) for i, w in zip(ids, rng.uniform(0.01, 0.5, size=terms), strict=True)}


def _inner(query: SparseWeights, weights: SparseWeights) -> float:
    # The store keeps weights as real (float32) and sums in double precision.
    return sum(float(np.float32(weights[t])) * w for t, w in query.items() if t in weights)


async def test_sparse_search_ranks_by_the_exact_inner_product(hybrid: PgVectorStore) -> None:
    rng = np.random.default_rng(20)
    n, vocab = 80, 300
    passages = [
        Passage(f"{i}:0", str(i), f"passage {i}", doi=f"10.1000/{i}" if i % 2 else None)
        for i in range(n)
    ]
    sparse = [_sparse_weights(rng, vocab, int(rng.integers(5, 30))) for _ in range(n)]
    await hybrid.upsert_passages(
        passages, np.stack([_unit(rng, TEXT_DIM) for _ in passages]), sparse
    )

    for _ in range(5):
        query = _sparse_weights(rng, vocab, 8)
        scores = [_inner(query, weights) for weights in sparse]
        sharing = [i for i in range(n) if query.keys() & sparse[i].keys()]
        expected = sorted(sharing, key=lambda i: (-scores[i], passages[i].passage_id))
        hits = await hybrid.nearest_passages_sparse(query, k=1000)
        assert [p for p, _ in hits] == [passages[i] for i in expected]
        assert [s for _, s in hits] == pytest.approx([scores[i] for i in expected], rel=1e-9)
        top = await hybrid.nearest_passages_sparse(query, k=3)
        assert top == hits[:3]

    assert await hybrid.nearest_passages_sparse({}, k=5) == []
    assert await hybrid.nearest_passages_sparse({vocab + 7: 1.0}, k=5) == []


async def test_sparse_upserts_replace_postings_and_are_idempotent(
    hybrid: PgVectorStore, database: str
) -> None:
    rng = np.random.default_rng(21)
    passages = [Passage(f"{i}:0", str(i), f"passage {i}") for i in range(4)]
    dense = np.stack([_unit(rng, TEXT_DIM) for _ in passages])
    first = [{1: 0.5, 2: 0.25}, {2: 0.75, 3: 0.125}, {}, {9: 1.0}]
    postings = "SELECT passage_id, term, weight FROM passage_terms ORDER BY passage_id, term"

    await hybrid.upsert_passages(passages, dense, first)
    written = await _rows(database, postings)
    await hybrid.upsert_passages(passages, dense, first)
    assert await _rows(database, postings) == written
    assert written == [
        ("0:0", 1, 0.5),
        ("0:0", 2, 0.25),
        ("1:0", 2, 0.75),
        ("1:0", 3, 0.125),
        ("3:0", 9, 1.0),
    ]

    # New weights for two passages replace theirs and leave the others' alone; an empty dict
    # leaves a passage with no postings.
    await hybrid.upsert_passages(passages[:2], dense[:2], [{4: 2.0}, {}])
    assert await _rows(database, postings) == [("0:0", 4, 2.0), ("3:0", 9, 1.0)]
    assert await hybrid.nearest_passages_sparse({2: 1.0, 3: 1.0}, k=5) == []
    hits = await hybrid.nearest_passages_sparse({4: 0.5, 9: 0.25}, k=5)
    assert hits == [(passages[0], 1.0), (passages[3], 0.25)]
    assert await _rows(database, "SELECT count(*) FROM passages") == [(4,)]


async def test_a_passage_without_sparse_terms_is_found_by_dense_search_only(
    hybrid: PgVectorStore,
) -> None:
    rng = np.random.default_rng(22)
    passage = Passage("1:0", "1", "no terms", "RESULTS", "2020", "Title", "10.1000/xyz")
    vector = _unit(rng, TEXT_DIM)
    await hybrid.upsert_passages([passage], vector[None, :], [{}])
    assert await hybrid.passage_ids() == {"1:0"}
    hits = await hybrid.nearest_passages(vector, k=1)
    assert hits[0][0] == passage
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert await hybrid.nearest_passages_sparse({0: 1.0, 1: 1.0}, k=1) == []


async def test_sparse_weights_are_checked_before_anything_is_written(
    hybrid: PgVectorStore, store_without_sparse: PgVectorStore
) -> None:
    rng = np.random.default_rng(23)
    passages = [Passage("1:0", "1", "text"), Passage("1:1", "1", "more")]
    dense = np.stack([_unit(rng, TEXT_DIM) for _ in passages])
    with pytest.raises(ValueError, match="each of the 2 passages"):
        await hybrid.upsert_passages(passages, dense, [{1: 0.5}])
    with pytest.raises(ValueError, match=r"passage 1:1: sparse weights has non-finite"):
        await hybrid.upsert_passages(passages, dense, [{1: 0.5}, {2: float("nan")}])
    with pytest.raises(ValueError, match="token ids must be between"):
        await hybrid.upsert_passages(passages, dense, [{-1: 0.5}, {}])
    with pytest.raises(ValueError, match="token ids must be between"):
        await hybrid.upsert_passages(passages, dense, [{2**31: 0.5}, {}])
    with pytest.raises(ValueError, match="give them"):
        await hybrid.upsert_passages(passages, dense)
    assert await hybrid.passage_ids() == frozenset()

    with pytest.raises(ValueError, match="non-finite"):
        await hybrid.nearest_passages_sparse({1: float("inf")}, k=1)
    with pytest.raises(ValueError, match="k must"):
        await hybrid.nearest_passages_sparse({1: 1.0}, k=0)
    with pytest.raises(ValueError, match="opened without a sparse model"):
        await store_without_sparse.upsert_passages(passages, dense, [{}, {}])
    with pytest.raises(ValueError, match="opened without a sparse model"):
        await store_without_sparse.nearest_passages_sparse({1: 1.0}, k=1)


@pytest.fixture
async def store_without_sparse(
    hybrid: PgVectorStore, database: str
) -> AsyncIterator[PgVectorStore]:
    """A dense-only store on the index ``hybrid`` made."""
    async with await PgVectorStore.open(database, **OPEN_ARGS) as opened:
        yield opened


async def test_a_dense_only_store_reads_a_hybrid_index_but_adds_no_passages(
    hybrid: PgVectorStore, database: str
) -> None:
    rng = np.random.default_rng(24)
    passage = Passage("1:0", "1", "text")
    vector = _unit(rng, TEXT_DIM)
    await hybrid.upsert_passages([passage], vector[None, :], [{5: 0.5}])
    async with await PgVectorStore.open(database, **OPEN_ARGS) as dense_only:
        assert (await dense_only.nearest_passages(vector, k=1))[0][0] == passage
        with pytest.raises(ValueError, match="open it with that sparse model"):
            await dense_only.upsert_passages([passage], vector[None, :])
    assert await _rows(database, "SELECT count(*) FROM passage_terms") == [(1,)]


async def test_binary_copy_writes_many_cases_exactly(database: str) -> None:
    await PgVectorStore.drop(database)
    async with await PgVectorStore.open(database, **OPEN_ARGS, hnsw=SMALL_GRAPH) as store:
        await _check_binary_copy_writes_many_cases_exactly(store, database)


async def _check_binary_copy_writes_many_cases_exactly(store: PgVectorStore, database: str) -> None:
    rng = np.random.default_rng(25)
    cases = [
        _case(
            f"c{i:04d}",
            f"Patient/p{i % 97}",
            _unit(rng, IMAGE_DIM),
            _labs(rng, 1 + i % LAB_DIM) if i % 3 else None,
            findings=tuple(f"finding {j}, with 'quotes' and ünïcode" for j in range(i % 4)),
        )
        for i in range(2000)
    ]
    await store.upsert_cases(cases)
    await store.upsert_cases(cases[::2])

    async with await AsyncConnection.connect(database) as conn:
        await register_vector_async(conn)
        cursor = await conn.execute(
            "SELECT case_id, patient_ref, study_uid, findings, findings_text, provenance,"
            " image, findings_embedding, fused, labs, labs_measured FROM cases ORDER BY case_id"
        )
        rows = await cursor.fetchall()
    assert len(rows) == len(cases)
    for case, row in zip(cases, rows, strict=True):
        record = case.record
        assert row[:6] == (
            record.case_id,
            record.patient_ref,
            record.study_uid,
            list(record.findings),
            case.findings_text,
            record.provenance,
        )
        for stored, written in zip(row[6:9], (case.image, case.findings, case.fused), strict=True):
            np.testing.assert_array_equal(stored.to_numpy(), written)
        if case.labs is None:
            assert row[9:] == (None, 0)
        else:
            np.testing.assert_array_equal(row[9].to_numpy(), case.labs.vector)
            assert row[10] == case.labs.measured_count


async def test_passages_keep_their_doi(store: PgVectorStore, database: str) -> None:
    rng = np.random.default_rng(26)
    passages = [Passage("1:0", "1", "a", doi="10.1056/NEJMoa2034577"), Passage("2:0", "2", "b")]
    await store.upsert_passages(passages, np.stack([_unit(rng, TEXT_DIM) for _ in passages]))
    assert await _rows(database, "SELECT passage_id, doi FROM passages ORDER BY 1") == [
        ("1:0", "10.1056/NEJMoa2034577"),
        ("2:0", None),
    ]


async def test_the_vector_extension_version_is_detected(
    store: PgVectorStore, database: str, deployment: str
) -> None:
    [(installed,)] = await _rows(
        database, "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
    )
    assert store.vector_version == tuple(int(part) for part in installed.split("."))
    # The embedded pgserver ships pgvector 0.6.2, the Debian server 0.8.0.
    assert store.vector_version[:2] == ((0, 8) if deployment == "server" else (0, 6))
    assert store.iterative_scan is (deployment == "server")


@contextmanager
def _index_scans_only(server: PostgresServer) -> Iterator[str]:
    """A fresh database whose planner avoids sequential scans, dropped afterwards.

    On a table of a few thousand rows the planner may sort the rows that pass a filter exactly
    rather than scan the HNSW index (pgvector 0.8 counts ``ef_search`` in the index scan's
    cost); a test of the index scan itself must not let it.
    """
    name = f"index_scans_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET enable_seqscan = off").format(sql.Identifier(name))
        )
    try:
        yield server.dsn_for(name)
    finally:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def index_database(database_server: PostgresServer) -> Iterator[str]:
    """:func:`_index_scans_only` on the module's deployment."""
    with _index_scans_only(database_server) as dsn:
        yield dsn


@pytest.fixture
def server_index_database(server_postgres: ServerPostgres) -> Iterator[str]:
    """:func:`_index_scans_only` on the PostgreSQL server (pgvector 0.8)."""
    with _index_scans_only(server_postgres) as dsn:
        yield dsn


async def _crowded_index(
    store: PgVectorStore, database: str, rng: np.random.Generator, *, own: int, others: int
) -> tuple[Vector, list[IndexedCase]]:
    """``own`` cases of Patient/q round a query, nearer it than almost all of ``others``
    cases of other patients; the query, and the others. Fails unless the filtered search
    scans the HNSW index."""
    query = _unit(rng, IMAGE_DIM)
    crowd = [
        _case(
            f"own{i}",
            "Patient/q",
            query + rng.normal(scale=0.05, size=IMAGE_DIM).astype(np.float32),
        )
        for i in range(own)
    ]
    rest = [_case(f"o{i}", f"Patient/o{i % 7}", _unit(rng, IMAGE_DIM)) for i in range(others)]
    await store.upsert_cases(crowd + rest)
    await store.analyze()
    async with await AsyncConnection.connect(database) as conn:
        await register_vector_async(conn)
        cursor = await conn.execute(
            "EXPLAIN SELECT case_id FROM cases WHERE patient_ref <> %s"
            " ORDER BY fused <=> %s LIMIT %s",
            ("Patient/q", query, 10),
        )
        plan = "\n".join(line for (line,) in await cursor.fetchall())
    assert "Index Scan using cases_fused_hnsw_idx" in plan
    return query, rest


def _check_filtered_hits(
    hits: Sequence[tuple[CaseRecord, float]], query: Vector, others: Sequence[IndexedCase], k: int
) -> None:
    """k hits, none of Patient/q, each with its exact cosine similarity, most similar first.

    Which k: HNSW is approximate, so the hits may differ from the exact k nearest; that they
    are k, and none of them the excluded patient's, is what the filtered scan must ensure.
    """
    fused = {c.record.case_id: c.fused for c in others}
    assert len(hits) == k
    assert all(case.patient_ref != "Patient/q" for case, _ in hits)
    assert [s for _, s in hits] == pytest.approx(
        [_cosine(query, fused[case.case_id]) for case, _ in hits], abs=1e-5
    )
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


async def test_crowding_cases_of_the_excluded_patient_never_take_the_places_of_others(
    index_database: str,
) -> None:
    rng = np.random.default_rng(27)
    async with await PgVectorStore.open(index_database, **OPEN_ARGS, hnsw=SMALL_GRAPH) as store:
        # 300 cases of the query's own patient round the query: a scan of ef_search (40)
        # candidates, filtered afterwards, would return none.
        query, others = await _crowded_index(store, index_database, rng, own=300, others=1500)
        hits = await store.nearest_by_image(query, k=10, exclude_patient="Patient/q")
    _check_filtered_hits(hits, query, others, 10)


async def test_iterative_scans_get_past_more_crowding_cases_than_ef_search_can_hold(
    server_index_database: str,
) -> None:
    # More of the patient's own cases than the largest ef_search (1000): widening ef_search,
    # all pgvector 0.6 can do, does not get past them (measured: no case comes back); an
    # iterative scan goes on until it has k.
    rng = np.random.default_rng(28)
    dsn = server_index_database
    async with await PgVectorStore.open(dsn, **OPEN_ARGS, hnsw=SMALL_GRAPH) as store:
        assert store.iterative_scan
        query, others = await _crowded_index(store, dsn, rng, own=2000, others=2000)
        hits = await store.nearest_by_image(query, k=5, exclude_patient="Patient/q")
    _check_filtered_hits(hits, query, others, 5)
