"""Schema migrations and the record of index models, against a real PostgreSQL with pgvector."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from psycopg import AsyncConnection

from adapters.store.pgvector_store import PgVectorStore
from adapters.store.schema import (
    MIGRATIONS,
    SPARSE_DIM,
    HnswParams,
    IndexModelMismatch,
    IndexModels,
    SchemaVersionError,
    drop_index,
    lab_panel_id,
    migrate,
)
from core.labs import LAB_PANEL, LabTest
from core.types import Passage

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MODELS = IndexModels(image_model="image-a", image_dim=8, text_model="text-a", text_dim=16)
OPEN_ARGS: dict[str, Any] = {
    "image_model": MODELS.image_model,
    "image_dim": MODELS.image_dim,
    "text_model": MODELS.text_model,
    "text_dim": MODELS.text_dim,
}


@pytest.fixture
async def dsn(database: str) -> str:
    """The module's database with no index in it."""
    await PgVectorStore.drop(database)
    return database


async def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    async with await AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(query)
        return await cursor.fetchall()


async def test_migrate_applies_each_migration_once(dsn: str) -> None:
    async with await AsyncConnection.connect(dsn) as conn:
        first = await migrate(conn, MODELS)
        second = await migrate(conn, MODELS)
    assert first == tuple(m.version for m in MIGRATIONS)
    assert second == ()
    versions = await _rows(dsn, "SELECT version FROM schema_migrations ORDER BY version")
    assert [v for (v,) in versions] == [m.version for m in MIGRATIONS]


async def test_opening_twice_keeps_schema_and_records_models(dsn: str) -> None:
    async with await PgVectorStore.open(dsn, **OPEN_ARGS):
        pass
    async with await PgVectorStore.open(dsn, **OPEN_ARGS) as store:
        assert store.models == MODELS
    recorded = await _rows(dsn, "SELECT role, model, dim FROM index_models")
    assert {role: (model, dim) for role, model, dim in recorded} == MODELS.by_role()
    assert len(await _rows(dsn, "SELECT version FROM schema_migrations")) == len(MIGRATIONS)


async def test_concurrent_migrations_serialise(dsn: str) -> None:
    async def one() -> tuple[int, ...]:
        async with await AsyncConnection.connect(dsn) as conn:
            return await migrate(conn, MODELS)

    results = await asyncio.gather(one(), one(), one())
    assert sorted(results) == [(), (), tuple(m.version for m in MIGRATIONS)]


@pytest.mark.parametrize(
    "change",
    [
        {"image_model": "image-b"},
        {"image_dim": 12},
        {"text_model": "text-b"},
        {"text_dim": 32},
        {"lab_panel": lab_panel_id(LAB_PANEL[:-1]), "lab_dim": len(LAB_PANEL) - 1},
    ],
)
async def test_other_models_are_refused_and_nothing_changes(
    dsn: str, change: dict[str, Any]
) -> None:
    async with await PgVectorStore.open(dsn, **OPEN_ARGS):
        pass
    with pytest.raises(IndexModelMismatch, match="rebuild") as raised:
        await PgVectorStore.open(dsn, **(OPEN_ARGS | change))
    assert raised.value.recorded == MODELS.by_role()
    assert raised.value.requested != MODELS.by_role()
    recorded = await _rows(dsn, "SELECT role, model, dim FROM index_models")
    assert {role: (model, dim) for role, model, dim in recorded} == MODELS.by_role()


async def test_drop_allows_a_rebuild_with_other_models(dsn: str) -> None:
    async with await PgVectorStore.open(dsn, **OPEN_ARGS):
        pass
    await PgVectorStore.drop(dsn)
    other = OPEN_ARGS | {"image_model": "image-b", "image_dim": 12}
    async with await PgVectorStore.open(dsn, **other) as store:
        assert store.models.image_dim == 12
    column = await _rows(
        dsn,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = 'cases'::regclass AND attname = 'fused'",
    )
    assert column == [("vector(12)",)]


async def test_schema_from_a_newer_release_is_refused(dsn: str) -> None:
    async with await AsyncConnection.connect(dsn) as conn:
        await migrate(conn, MODELS)
        await conn.execute(
            "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
            (MIGRATIONS[-1].version + 1, "from the future"),
        )
        await conn.commit()
        with pytest.raises(SchemaVersionError):
            await migrate(conn, MODELS)


async def test_tables_columns_and_indexes(dsn: str) -> None:
    async with await AsyncConnection.connect(dsn) as conn:
        await migrate(conn, MODELS, HnswParams(m=8, ef_construction=32))
    columns = await _rows(
        dsn,
        "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " WHERE c.relname IN ('cases', 'passages', 'passage_terms')"
        " AND a.attnum > 0 AND NOT a.attisdropped",
    )
    types = {(table, name): (kind, not_null) for table, name, kind, not_null in columns}
    assert types[("cases", "fused")] == ("vector(8)", True)
    assert types[("cases", "image")] == ("vector(8)", True)
    assert types[("cases", "findings_embedding")] == ("vector(8)", True)
    assert types[("cases", "labs")] == (f"vector({len(LAB_PANEL)})", False)
    assert types[("cases", "patient_ref")] == ("text", True)
    assert types[("cases", "findings")] == ("text[]", True)
    assert types[("cases", "labs_measured")] == ("integer", True)
    assert types[("passages", "dense")] == ("vector(16)", True)
    assert types[("passages", "pmid")] == ("text", True)
    assert types[("passages", "title")] == ("text", False)
    assert types[("passages", "doi")] == ("text", False)

    indexes = await _rows(
        dsn,
        "SELECT i.relname, am.amname, i.reloptions, pg_get_indexdef(i.oid)"
        " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " JOIN pg_class t ON t.oid = x.indrelid JOIN pg_am am ON am.oid = i.relam"
        " WHERE t.relname IN ('cases', 'passages')",
    )
    by_name = {name: (method, options, ddl) for name, method, options, ddl in indexes}
    for name, column in [("cases_fused_hnsw_idx", "fused"), ("passages_dense_hnsw_idx", "dense")]:
        method, options, ddl = by_name[name]
        assert method == "hnsw"
        assert sorted(options) == ["ef_construction=32", "m=8"]
        assert f"({column} vector_cosine_ops)" in ddl
    assert by_name["cases_patient_ref_idx"][0] == "btree"

    postings = await _rows(
        dsn,
        "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x"
        " JOIN pg_class i ON i.oid = x.indexrelid"
        " WHERE x.indrelid = 'passage_terms'::regclass ORDER BY 1",
    )
    assert [name for name, _ in postings] == ["passage_terms_passage_idx", "passage_terms_pkey"]
    assert dict(postings)["passage_terms_pkey"].endswith(
        "USING btree (term, passage_id) INCLUDE (weight)"
    )
    assert types[("passage_terms", "term")] == ("integer", True)
    assert types[("passage_terms", "weight")] == ("real", True)


async def test_the_sparse_search_reads_the_postings_by_term(dsn: str) -> None:
    # A sparse HNSW graph: the dense vectors are not what is tested, and it builds faster.
    hnsw = HnswParams(m=4, ef_construction=8)
    async with await PgVectorStore.open(
        dsn, **OPEN_ARGS, sparse_model="sparse-a", hnsw=hnsw
    ) as store:
        rng = np.random.default_rng(0)
        n = 2000
        passages = [Passage(f"{i}:0", str(i), "text") for i in range(n)]
        dense = rng.normal(size=(n, MODELS.text_dim)).astype(np.float32)
        sparse = [{int(t): 0.5 for t in rng.choice(5000, size=20, replace=False)} for _ in range(n)]
        await store.upsert_passages(passages, dense, sparse)
        await store.analyze()
    async with await AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(
            "EXPLAIN SELECT passage_id, sum(weight) FROM passage_terms"
            " WHERE term = ANY('{1, 2, 3}'::integer[]) GROUP BY passage_id"
        )
        plan = "\n".join(line for (line,) in await cursor.fetchall())
    assert "passage_terms_pkey" in plan


async def test_default_hnsw_parameters_are_pgvectors(dsn: str) -> None:
    async with await AsyncConnection.connect(dsn) as conn:
        await migrate(conn, MODELS)
    options = await _rows(
        dsn, "SELECT reloptions FROM pg_class WHERE relname = 'passages_dense_hnsw_idx'"
    )
    assert sorted(options[0][0]) == ["ef_construction=64", "m=16"]


async def test_a_database_of_versions_1_and_2_is_adopted_with_its_data(dsn: str) -> None:
    async with await AsyncConnection.connect(dsn) as conn:
        # The database as the release before migration 3 left it.
        async with conn.transaction():
            await conn.execute(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                " description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration in MIGRATIONS[:2]:
                for statement in migration.statements(MODELS, HnswParams()):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                    (migration.version, migration.description),
                )
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO index_models (role, model, dim) VALUES (%s, %s, %s)",
                    [(role, model, dim) for role, (model, dim) in MODELS.by_role().items()],
                )
            vector = "[" + ",".join(["0.25"] * MODELS.text_dim) + "]"
            await conn.execute(
                "INSERT INTO passages (passage_id, pmid, section, year, title, text, dense)"
                " VALUES ('7:0', '7', 'RESULTS', '1999', 'Old', 'kept', %s)",
                (vector,),
            )
        assert await migrate(conn, MODELS) == (3,)
    async with await PgVectorStore.open(dsn, **OPEN_ARGS) as store:
        hits = await store.nearest_passages(np.ones(MODELS.text_dim, np.float32), k=1)
    assert hits[0][0] == Passage("7:0", "7", "kept", "RESULTS", "1999", "Old", None)
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert await _rows(dsn, "SELECT version FROM schema_migrations ORDER BY 1") == [
        (1,),
        (2,),
        (3,),
    ]


async def test_the_sparse_model_is_recorded_and_another_refused(dsn: str) -> None:
    sparse = OPEN_ARGS | {"sparse_model": "sparse-a"}
    async with await PgVectorStore.open(dsn, **sparse) as store:
        assert store.models.sparse_model == "sparse-a"
        rng = np.random.default_rng(1)
        await store.upsert_passages(
            [Passage("1:0", "1", "text")],
            rng.normal(size=(1, MODELS.text_dim)).astype(np.float32),
            [{3: 0.5}],
        )
    recorded = await _rows(dsn, "SELECT model, dim FROM index_models WHERE role = 'sparse'")
    assert recorded == [("sparse-a", SPARSE_DIM)]

    with pytest.raises(IndexModelMismatch, match="sparse: index has sparse-a, requested sparse-b"):
        await PgVectorStore.open(dsn, **(OPEN_ARGS | {"sparse_model": "sparse-b"}))
    # A dense-only service may search the same index.
    async with await PgVectorStore.open(dsn, **OPEN_ARGS) as dense_only:
        assert dense_only.models.sparse_model is None
    assert await _rows(dsn, "SELECT model FROM index_models WHERE role = 'sparse'") == [
        ("sparse-a",)
    ]


async def test_a_sparse_model_is_refused_for_passages_indexed_without_one(dsn: str) -> None:
    async with await PgVectorStore.open(dsn, **OPEN_ARGS) as store:
        rng = np.random.default_rng(2)
        await store.upsert_passages(
            [Passage("1:0", "1", "text")],
            rng.normal(size=(1, MODELS.text_dim)).astype(np.float32),
        )
    with pytest.raises(IndexModelMismatch, match="sparse: index has nothing, requested sparse-a"):
        await PgVectorStore.open(dsn, **(OPEN_ARGS | {"sparse_model": "sparse-a"}))
    assert await _rows(dsn, "SELECT role FROM index_models WHERE role = 'sparse'") == []


async def test_drop_index_removes_the_index_and_keeps_the_ledger(dsn: str) -> None:
    query = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
    ledger = [("feedback",), ("issued_cards",), ("seen_jwt_ids",)]
    async with await AsyncConnection.connect(dsn) as conn:
        await migrate(conn, MODELS)
        await conn.execute(
            "INSERT INTO seen_jwt_ids VALUES ('iss', 'jti', now() + interval '1 minute')"
        )
        await conn.commit()
        await drop_index(conn)
    assert await _rows(dsn, query) == ledger
    async with await AsyncConnection.connect(dsn) as conn:
        assert await migrate(conn, MODELS) == (1, 2, 3)  # a rebuild adopts the kept tables
    assert await _rows(dsn, "SELECT issuer, jti FROM seen_jwt_ids") == [("iss", "jti")]


def test_models_and_hnsw_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="image_dim"):
        IndexModels(image_model="a", image_dim=2001, text_model="b", text_dim=8)
    with pytest.raises(ValueError, match="text_dim"):
        IndexModels(image_model="a", image_dim=8, text_model="b", text_dim=0)
    with pytest.raises(ValueError, match="text_model"):
        IndexModels(image_model="a", image_dim=8, text_model=" ", text_dim=8)
    with pytest.raises(ValueError, match="ef_construction"):
        HnswParams(m=16, ef_construction=20)
    with pytest.raises(ValueError, match="m must"):
        HnswParams(m=1)
    with pytest.raises(ValueError, match="sparse_model"):
        IndexModels(image_model="a", image_dim=8, text_model="b", text_dim=8, sparse_model="")


def test_lab_panel_id_follows_the_panel() -> None:
    wider = LabTest("718-7", "Hemoglobin", "g/dL", 11.0, 17.5)
    changed = tuple(wider if t.loinc == wider.loinc else t for t in LAB_PANEL)
    assert lab_panel_id(LAB_PANEL) == lab_panel_id(tuple(LAB_PANEL))
    assert lab_panel_id(changed) != lab_panel_id(LAB_PANEL)
    assert lab_panel_id(LAB_PANEL[::-1]) != lab_panel_id(LAB_PANEL)
