"""``medirag bench retrieval`` measures what it says, on both PostgreSQL deployments: the exact
search is the true nearest neighbours of the vectors generated (numpy brute force agrees), it
scans the table and the HNSW search scans the index, recall is computed against it, a re-run
reuses what is loaded and built, and an interrupted load resumes.

No latency is asserted: the figures live in docs/benchmarks.md with the command that made them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
import typer
from pgvector.psycopg import register_vector
from psycopg import sql
from rich.console import Console
from typer.testing import CliRunner

from deploy.bench_retrieval import (
    CHUNK_ROWS,
    TOP_K,
    WARMUP_QUERIES,
    BenchError,
    RetrievalBench,
    RetrievalBenchSettings,
    SyntheticVectors,
    bench_retrieval_command,
    check_plan,
    copy_payload,
    index_name,
    print_report,
    run_retrieval_bench,
    table_name,
    to_json,
)

pytestmark = pytest.mark.slow

# --quick's data, with an ef_search of 1000: on 2,000 vectors that beam covers half the graph.
QUICK = RetrievalBenchSettings(sizes=(2000,), dim=64, queries=20, ef_searches=(40, 1000))


@pytest.fixture(scope="module", params=["embedded", "server"])
def deployment(request: pytest.FixtureRequest) -> str:
    """Every test that uses ``database`` runs on pgserver (pgvector 0.6) and on PostgreSQL 15
    with pgvector 0.8."""
    return str(request.param)


@pytest.fixture(scope="module")
def first_run(database: str) -> RetrievalBench:
    return run_retrieval_bench(database, QUICK)


@pytest.fixture
def conn(database: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(database, autocommit=True) as connection:
        register_vector(connection)
        yield connection


def brute_force(settings: RetrievalBenchSettings, size: int) -> list[list[int]]:
    """The true top-k ids of the timed queries, by numpy."""
    source = SyntheticVectors(settings.dim, seed=settings.seed)
    data = np.concatenate([block for _, block in source.blocks(size)])
    queries = source.queries(WARMUP_QUERIES + settings.queries)[WARMUP_QUERIES:]
    similarities = queries @ data.T
    return [list(row) for row in np.argsort(-similarities, axis=1, kind="stable")[:, :TOP_K]]


def test_first_run_loads_builds_and_measures(first_run: RetrievalBench, deployment: str) -> None:
    (size,) = first_run.sizes
    expected_pgvector = "0.6" if deployment == "embedded" else "0.8"
    assert first_run.environment["pgvector"].startswith(expected_pgvector)
    assert size.size == 2000
    assert size.loaded_rows == 2000
    assert size.load_s is not None
    assert size.load_s > 0
    assert size.build_s is not None
    assert size.build_s > 0
    assert size.maintenance_work_mem_mb == 64
    assert size.table_bytes > 2000 * 64 * 4
    assert size.index_bytes > 0
    assert 0 < size.exact_p50_ms <= size.exact_p99_ms
    assert [result.ef_search for result in size.hnsw] == [40, 1000]
    for result in size.hnsw:
        assert 0 < result.p50_ms <= result.p99_ms
        assert 0.0 <= result.recall_at_10 <= 1.0
    # The whole graph within reach finds every true neighbour.
    assert size.hnsw[-1].recall_at_10 == 1.0


def test_exact_search_returns_the_true_neighbours(first_run: RetrievalBench) -> None:
    # Also checks the binary COPY payload: a wrong byte order or offset would change every row.
    (size,) = first_run.sizes
    assert [list(ids) for ids in size.exact_ids] == brute_force(QUICK, 2000)


def test_the_plans_are_checked(first_run: RetrievalBench) -> None:
    (size,) = first_run.sizes
    index = index_name(size.table, QUICK.hnsw)
    assert "Seq Scan" in size.exact_plan
    assert "Index" not in size.exact_plan
    assert f"Index Scan ({index})" in size.hnsw_plan


def test_a_plan_that_is_not_the_intended_one_stops_the_run(
    first_run: RetrievalBench, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    (size,) = first_run.sizes
    index = index_name(size.table, QUICK.hnsw)
    search = sql.SQL("SELECT id FROM {} ORDER BY embedding <=> %s LIMIT 10").format(
        sql.Identifier(size.table)
    )
    query = SyntheticVectors(QUICK.dim).queries(1)[0]
    conn.execute("SET enable_seqscan = off")
    with pytest.raises(BenchError, match="the exact search would use an index"):
        check_plan(conn, search, query, index=index, mode="exact")
    assert index in check_plan(conn, search, query, index=index, mode="hnsw")
    conn.execute("RESET enable_seqscan")
    conn.execute("SET enable_indexscan = off")
    with pytest.raises(BenchError, match=f"would not scan {index}"):
        check_plan(conn, search, query, index=index, mode="hnsw")
    assert "Seq Scan" in check_plan(conn, search, query, index=index, mode="exact")


def test_a_rerun_reuses_the_table_and_index(first_run: RetrievalBench, database: str) -> None:
    settings = RetrievalBenchSettings(
        sizes=(2000,), dim=64, queries=20, exact_queries=8, ef_searches=(40,)
    )
    again = run_retrieval_bench(database, settings)
    (size,) = again.sizes
    assert (size.load_s, size.loaded_rows, size.build_s) == (None, 0, None)
    assert size.exact_ids == first_run.sizes[0].exact_ids[:8]
    out = Console(width=200, record=True)
    print_report(again, out=out)
    text = out.export_text()
    assert "exact search ran on 8 of the 20 queries" in text
    assert "reused" in text


def test_an_interrupted_load_resumes_at_its_last_chunk(database: str) -> None:
    settings = RetrievalBenchSettings(
        sizes=(CHUNK_ROWS + 500,), dim=16, queries=5, ef_searches=(40,)
    )
    table = table_name(CHUNK_ROWS + 500, settings.dim, settings.seed)
    first, block = next(SyntheticVectors(settings.dim).blocks(CHUNK_ROWS + 500))
    with psycopg.connect(database, autocommit=True) as conn:
        # What a run stopped after its first chunk leaves behind.
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id integer PRIMARY KEY, embedding vector(16) NOT NULL)"
            ).format(sql.Identifier(table))
        )
        copy_sql = sql.SQL("COPY {} (id, embedding) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(table)
        )
        with conn.cursor() as cursor, cursor.copy(copy_sql) as copy:
            copy.write(copy_payload(first, block))
    (size,) = run_retrieval_bench(database, settings).sizes
    assert size.loaded_rows == 500
    assert size.build_s is not None
    assert [list(ids) for ids in size.exact_ids] == brute_force(settings, CHUNK_ROWS + 500)


def test_the_json_report_has_the_measurements_without_the_ground_truth(
    first_run: RetrievalBench,
) -> None:
    report = json.loads(json.dumps(to_json(first_run)))
    assert report["settings"]["exact_queries"] == 20
    assert report["environment"]["cpu_count"] >= 1
    (size,) = report["sizes"]
    assert "exact_ids" not in size
    assert size["hnsw"][-1] == {
        "ef_search": 1000,
        "p50_ms": first_run.sizes[0].hnsw[-1].p50_ms,
        "p99_ms": first_run.sizes[0].hnsw[-1].p99_ms,
        "recall_at_10": 1.0,
    }


def test_the_vectors_are_clustered_reproducible_and_resumable() -> None:
    source = SyntheticVectors(384, seed=3)
    blocks = list(source.blocks(CHUNK_ROWS + 10))
    assert [(first, len(block)) for first, block in blocks] == [(0, CHUNK_ROWS), (CHUNK_ROWS, 10)]
    ((_, resumed),) = SyntheticVectors(384, seed=3).blocks(CHUNK_ROWS + 10, start=CHUNK_ROWS)
    np.testing.assert_array_equal(resumed, blocks[1][1])
    data = blocks[0][1][:5000]
    np.testing.assert_allclose(np.linalg.norm(data, axis=1), 1.0, atol=1e-5)
    queries = source.queries(50)
    similarities = queries @ data.T
    # Uniform random 384-d vectors: nearest neighbour among 5,000 at a cosine of about 0.2.
    assert similarities.max(axis=1).mean() > 0.6
    assert abs(float(np.median(similarities))) < 0.2
    assert similarities.max() < 0.9999  # the queries are not data points
    assert not np.array_equal(SyntheticVectors(384, seed=4).queries(50), queries)
    with pytest.raises(ValueError, match="multiple of"):
        next(source.blocks(100, start=5))


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    bench = typer.Typer()
    app.add_typer(bench, name="bench")
    bench.command("retrieval")(bench_retrieval_command)
    return app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "10k,abc"], "sizes: 'abc' is not a positive integer"),
        (["--dim", "4000"], "dim must be between 1 and 2000, got 4000"),
        (["--ef-search", "40,2000"], "ef_search values must be between 1 and 1000"),
        (["--quick", "--exact-queries", "50"], "exact queries must be between 1 and queries (20)"),
        (["--m", "1"], "HNSW m must be between 2 and 100, got 1"),
        (["--dsn", "host=/nonexistent dbname=none"], "the benchmark database failed:"),
    ],
)
def test_bad_input_gets_a_clear_error(cli: typer.Typer, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["bench", "retrieval", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_quick_runs_on_the_embedded_server_in_the_data_dir(
    cli: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDIRAG_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, ["bench", "retrieval", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["environment"]["deployment"] == "embedded"
    assert (tmp_path / "bench" / "pg").is_dir()
    assert report["settings"]["dim"] == 64
    assert report["settings"]["queries"] == 20
    assert [size["size"] for size in report["sizes"]] == [2000]
    assert [ef["ef_search"] for ef in report["sizes"][0]["hnsw"]] == [40, 100, 200]
