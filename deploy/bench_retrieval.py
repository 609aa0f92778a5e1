"""``medirag bench retrieval``: HNSW against exact search, latency and recall, at growing sizes.

Why it exists: the service answers nearest-neighbour questions through pgvector's HNSW indexes,
which are approximate. This command measures what that buys and costs on a given PostgreSQL: for
each table size it loads synthetic vectors with binary ``COPY``, builds the HNSW index (cosine
distance, the service's operator class), and times top-10 queries both by an exact sequential
scan, which is also the ground truth, and through the index at several ``hnsw.ef_search``
values, with recall@10 against the exact answers.

The vectors. Uniform random vectors on a high-dimensional sphere are a poor stand-in for
embeddings: every pair is about equally far apart, so "nearest" means little, and HNSW looks far
worse than it does on real data. Real embeddings are clustered and have a low intrinsic dimension.
So the vectors here are a seeded Gaussian mixture: 256 clusters of unequal weight (Dirichlet) and
unequal spread in a 32-dimensional latent space, mapped into ``dim`` dimensions by a fixed random
linear map, plus a little isotropic noise and a direction shared by all (text embeddings are
anisotropic: unrelated texts still have a small positive cosine), then L2-normalised. Among
20,000 vectors of 384 dimensions a query's nearest neighbour has a cosine of about 0.82, and the
median pair 0.07, close to what sentence encoders show. Queries are held-out draws from
the same mixture. Vector ``i`` depends only on the seed, the dimension and ``i`` (it is drawn in
fixed chunks of :data:`CHUNK_ROWS`), so an interrupted load resumes where it stopped and the data
are never stored anywhere but the database.

How it measures:

* Each size gets its own table (``bench_gm1_d<dim>_n<size>_s<seed>``) in a scratch database: the
  embedded PostgreSQL in ``<MEDIRAG_DATA_DIR>/bench/pg`` by default, or the database ``--dsn``
  names. Only ``bench_*`` tables are created or dropped; the service's tables are never touched.
* A table that is already complete, with its index, is reused: its load and build times are
  reported as "reused" (``None``). A partly loaded table resumes from its last committed chunk.
* Load time is the time PostgreSQL takes to ``COPY`` the rows: the binary ``COPY`` payload is
  built by numpy outside the timed section, so Python's per-row encoding is not counted.
* The HNSW build runs with ``maintenance_work_mem`` large enough for the graph (an estimate per
  row, see :func:`maintenance_work_mem_mb`) and parallel workers; pgvector's notices (such as a
  graph that no longer fits in memory) are kept in the report.
* After the load, ``VACUUM (ANALYZE)`` sets hint bits and the visibility map, so the first
  sequential scans do not pay for writing them.
* Latency is client-side wall time per query (``SELECT id ... ORDER BY embedding <=> $1 LIMIT
  10``, bound in binary), after warm-up queries that are not timed (held-out queries of their
  own). Exact search disables index scans; HNSW search disables sequential scans (so a small
  table still goes through the index); both are checked once with ``EXPLAIN``, and a plan that
  does not do what the row says stops the run.

Exact search over a million vectors takes a while per query: ``--exact-queries`` runs it on the
first N queries only, and recall is then computed over those N (the report says so).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
import psycopg
import typer
from pgvector.psycopg import register_vector
from psycopg import sql
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from adapters.store.embedded import EmbeddedPostgres
from adapters.store.pgvector_store import MAX_EF_SEARCH
from adapters.store.schema import MAX_HNSW_DIM, HnswParams
from deploy.logs import configure_logging
from deploy.settings import Settings

__all__ = [
    "CHUNK_ROWS",
    "TOP_K",
    "WARMUP_QUERIES",
    "BenchError",
    "EfSearchResult",
    "RetrievalBench",
    "RetrievalBenchSettings",
    "SizeResult",
    "SyntheticVectors",
    "bench_retrieval_command",
    "check_plan",
    "copy_payload",
    "index_name",
    "maintenance_work_mem_mb",
    "mean_recall",
    "parse_int_list",
    "print_report",
    "run_retrieval_bench",
    "table_name",
    "to_json",
]

CHUNK_ROWS = 10_000
"""Rows drawn, copied and committed together; a resumed load restarts at a chunk boundary."""

TOP_K = 10
"""Neighbours asked for by every query, and the k of recall@k."""

WARMUP_QUERIES = 5
"""Untimed queries before each timed series (held-out vectors of their own)."""

_GENERATOR = "gm1"
"""Version of the vector generator, part of each table's name: a table filled by another
version of :class:`SyntheticVectors` is never mistaken for this one's."""

_CLUSTERS = 256
_LATENT_DIM = 32
_SPREAD = (0.5, 1.0)
# Relative to the mixture's part, whose norm is about sqrt(dim * (1 + spread^2)).
_ISOTROPIC = 0.2
_SHARED = 0.35

# A binary COPY stream: signature, flags, header extension length ... rows ... trailer (-1).
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)

Vectors = npt.NDArray[np.float32]


class BenchError(RuntimeError):
    """The benchmark could not measure what it reports: a search's query plan is not the
    intended one."""


class SyntheticVectors:
    """A seeded Gaussian mixture of L2-normalised vectors, drawn in chunks (see the module
    docstring for the why).

    Args:
        dim: the vectors' dimension (1 to :data:`~adapters.store.schema.MAX_HNSW_DIM`).
        seed: fixes the mixture and every draw.

    Raises:
        ValueError: for a dimension out of range or a negative seed.

    Example:
        >>> source = SyntheticVectors(16, seed=1)
        >>> block = next(source.blocks(3))[1]
        >>> block.shape, block.dtype.name
        ((3, 16), 'float32')
        >>> bool(np.allclose(np.linalg.norm(block, axis=1), 1.0, atol=1e-6))
        True
    """

    def __init__(self, dim: int, *, seed: int = 0) -> None:
        if not 1 <= dim <= MAX_HNSW_DIM:
            raise ValueError(f"dim must be between 1 and {MAX_HNSW_DIM}, got {dim}")
        if seed < 0:
            raise ValueError(f"seed must not be negative, got {seed}")
        self.dim = dim
        self.seed = seed
        rng = np.random.default_rng([seed, 0])
        latent = min(dim, _LATENT_DIM)
        self._latent = latent
        self._map = (rng.standard_normal((latent, dim)) / math.sqrt(latent)).astype(np.float32)
        self._centers = rng.standard_normal((_CLUSTERS, latent)).astype(np.float32)
        self._spread = rng.uniform(*_SPREAD, _CLUSTERS).astype(np.float32)
        self._weights = rng.dirichlet(np.ones(_CLUSTERS))
        shared = rng.standard_normal(dim)
        self._shared = (_SHARED * math.sqrt(dim) * shared / np.linalg.norm(shared)).astype(
            np.float32
        )

    def _draw(self, rng: np.random.Generator, rows: int) -> Vectors:
        labels = rng.choice(_CLUSTERS, size=rows, p=self._weights)
        noise = rng.standard_normal((rows, self._latent), dtype=np.float32)
        latent = self._centers[labels] + noise * self._spread[labels, None]
        isotropic = rng.standard_normal((rows, self.dim), dtype=np.float32)
        vectors = latent @ self._map + isotropic * _ISOTROPIC + self._shared
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors.astype(np.float32, copy=False)

    def blocks(self, rows: int, *, start: int = 0) -> Iterator[tuple[int, Vectors]]:
        """Vectors ``start`` to ``rows - 1`` of the data set, chunk by chunk.

        Args:
            rows: the data set's size.
            start: the first vector wanted; a multiple of :data:`CHUNK_ROWS`.

        Returns:
            An iterator of ``(id of the block's first vector, block)``; blocks hold
            :data:`CHUNK_ROWS` vectors, the last one fewer.

        Raises:
            ValueError: when ``start`` is not a chunk boundary.
        """
        if start % CHUNK_ROWS:
            raise ValueError(f"start must be a multiple of {CHUNK_ROWS}, got {start}")
        for first in range(start, rows, CHUNK_ROWS):
            block = self._draw(
                np.random.default_rng([self.seed, 1, first // CHUNK_ROWS]), CHUNK_ROWS
            )
            yield first, block[: rows - first]

    def queries(self, count: int) -> Vectors:
        """``count`` held-out vectors from the same mixture (never in the data set).

        Example:
            >>> SyntheticVectors(8).queries(4).shape
            (4, 8)
        """
        return self._draw(np.random.default_rng([self.seed, 2]), count)


def copy_payload(first_id: int, block: Vectors) -> bytes:
    """A complete binary ``COPY`` stream of rows ``(id integer, embedding vector(dim))``.

    Built with numpy in one go rather than row by row, so that a timed load measures PostgreSQL
    rather than Python. The layout is PostgreSQL's binary copy format, with pgvector's binary
    representation of a vector (dimension and a reserved word as int16, then float4 values, all
    big-endian).

    Args:
        first_id: the id of the first row; the others follow.
        block: the vectors, one row each.

    Returns:
        The bytes to send to ``COPY ... FROM STDIN (FORMAT BINARY)``.

    Example:
        >>> payload = copy_payload(7, np.ones((2, 3), dtype=np.float32))
        >>> len(payload) == 19 + 2 * (2 + 4 + 4 + 4 + 4 + 3 * 4) + 2
        True
    """
    rows, dim = block.shape
    layout = np.dtype(
        [
            ("fields", ">i2"),
            ("id_length", ">i4"),
            ("id", ">i4"),
            ("vector_length", ">i4"),
            ("dim", ">u2"),
            ("reserved", ">u2"),
            ("values", ">f4", (dim,)),
        ]
    )
    out = np.empty(rows, dtype=layout)
    out["fields"] = 2
    out["id_length"] = 4
    out["id"] = np.arange(first_id, first_id + rows)
    out["vector_length"] = 4 + 4 * dim
    out["dim"] = dim
    out["reserved"] = 0
    out["values"] = block
    return _COPY_HEADER + out.tobytes() + _COPY_TRAILER


def table_name(size: int, dim: int, seed: int) -> str:
    """The table holding ``size`` vectors of ``dim`` dimensions drawn with ``seed``.

    Example:
        >>> table_name(100_000, 384, 0)
        'bench_gm1_d384_n100000_s0'
    """
    return f"bench_{_GENERATOR}_d{dim}_n{size}_s{seed}"


def index_name(table: str, hnsw: HnswParams) -> str:
    """The HNSW index of ``table`` built with ``hnsw``.

    Example:
        >>> index_name("bench_gm1_d384_n100000_s0", HnswParams())
        'bench_gm1_d384_n100000_s0_hnsw_m16_efc64'
    """
    return f"{table}_hnsw_m{hnsw.m}_efc{hnsw.ef_construction}"


def maintenance_work_mem_mb(rows: int, dim: int, m: int) -> int:
    """Enough ``maintenance_work_mem`` for pgvector to build the HNSW graph of ``rows`` vectors
    in memory (a build that runs out of it goes on much more slowly on disk).

    Per element pgvector keeps the vector (4 bytes a dimension), about ``2 * m`` neighbours on
    the bottom layer and ``m`` per upper layer at 16 bytes each, and some bookkeeping; the
    estimate takes 40 bytes per unit of ``m`` plus 256 bytes, and adds a quarter.

    Example:
        >>> maintenance_work_mem_mb(1_000_000, 384, 16)
        2900
        >>> maintenance_work_mem_mb(2_000, 64, 16)
        64
    """
    per_row = 4 * dim + 40 * m + 256
    return max(64, math.ceil(rows * per_row * 1.25 / 2**20))


def mean_recall(found: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]) -> float:
    """Mean over queries of the share of each query's true neighbours that were found.

    Args:
        found: per query, the ids returned.
        truth: per query, the exact nearest ids (as many as were asked for).

    Returns:
        Recall in [0, 1].

    Raises:
        ValueError: when there are no queries or the two lists differ in length.

    Example:
        >>> mean_recall([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [4, 5, 6]])
        0.8333333333333333
    """
    if not truth or len(found) != len(truth):
        raise ValueError(f"need as many results as truths, got {len(found)} and {len(truth)}")
    return sum(len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)) / len(
        truth
    )


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """Comma-separated positive integers, with ``k`` and ``M`` accepted for thousands and
    millions.

    Args:
        text: e.g. ``"10k,100k,1M"``.
        what: the option's name, for the error message.

    Raises:
        ValueError: naming ``what`` and the item that is not a positive integer.

    Example:
        >>> parse_int_list("10k, 100000,1M", "sizes")
        (10000, 100000, 1000000)
    """
    values = []
    for item in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"(\d+)([kKM]?)", item)
        value = (
            int(match[1]) * {"": 1, "k": 1000, "K": 1000, "M": 1_000_000}[match[2]] if match else 0
        )
        if value < 1:
            raise ValueError(f"{what}: {item!r} is not a positive integer (in {text!r})")
        values.append(value)
    return tuple(values)


@dataclass(frozen=True, slots=True)
class RetrievalBenchSettings:
    """What to measure.

    Args:
        sizes: table sizes, in vectors.
        dim: the vectors' dimension (at most 2000, pgvector's HNSW limit).
        queries: timed queries per series.
        exact_queries: how many of them also run as exact searches (ground truth); all when
            ``None``.
        ef_searches: the ``hnsw.ef_search`` values to time (1 to 1000).
        hnsw: the index's build parameters.
        build_workers: ``max_parallel_maintenance_workers`` for the build; one less than the
            CPU count (at most 7) when ``None``.
        maintenance_work_mem_mb: for the build; :func:`maintenance_work_mem_mb` of each size
            when ``None``.
        seed: fixes the vectors and the queries.

    Raises:
        ValueError: naming the setting that is out of range.
    """

    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    dim: int = 384
    queries: int = 200
    exact_queries: int | None = None
    ef_searches: tuple[int, ...] = (40, 100, 200)
    hnsw: HnswParams = field(default_factory=HnswParams)
    build_workers: int | None = None
    maintenance_work_mem_mb: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < TOP_K or max(self.sizes) >= 2**31:
            raise ValueError(
                f"sizes must be between {TOP_K} and 2^31 - 1 vectors, got {self.sizes}"
            )
        if not 1 <= self.dim <= MAX_HNSW_DIM:
            raise ValueError(f"dim must be between 1 and {MAX_HNSW_DIM}, got {self.dim}")
        if self.queries < 1:
            raise ValueError(f"queries must be at least 1, got {self.queries}")
        if self.exact_queries is not None and not 1 <= self.exact_queries <= self.queries:
            raise ValueError(
                f"exact queries must be between 1 and queries ({self.queries}), "
                f"got {self.exact_queries}"
            )
        if not self.ef_searches or not all(1 <= ef <= MAX_EF_SEARCH for ef in self.ef_searches):
            raise ValueError(
                f"ef_search values must be between 1 and {MAX_EF_SEARCH}, got {self.ef_searches}"
            )
        if self.build_workers is not None and not 0 <= self.build_workers <= 64:
            raise ValueError(f"build workers must be between 0 and 64, got {self.build_workers}")
        if self.maintenance_work_mem_mb is not None and self.maintenance_work_mem_mb < 64:
            raise ValueError(
                f"maintenance_work_mem must be at least 64 MB, got {self.maintenance_work_mem_mb}"
            )
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be between 0 and 2^31 - 1, got {self.seed}")

    @property
    def exact_count(self) -> int:
        """How many queries run as exact searches."""
        return self.queries if self.exact_queries is None else self.exact_queries

    @property
    def workers(self) -> int:
        """``max_parallel_maintenance_workers`` for the builds."""
        if self.build_workers is not None:
            return self.build_workers
        return max(0, min((os.cpu_count() or 1) - 1, 7))


@dataclass(frozen=True, slots=True)
class EfSearchResult:
    """HNSW search at one ``ef_search``.

    Args:
        ef_search: the candidate list size.
        p50_ms: median latency of a query.
        p99_ms: 99th percentile latency.
        recall_at_10: mean recall@10 against exact search, over the queries that have it.
    """

    ef_search: int
    p50_ms: float
    p99_ms: float
    recall_at_10: float


@dataclass(frozen=True, slots=True)
class SizeResult:
    """Everything measured at one table size.

    Args:
        size: vectors in the table.
        table: the table's name.
        load_s: seconds PostgreSQL spent on ``COPY``; ``None`` when the table was already
            loaded by an earlier run.
        loaded_rows: rows loaded by this run (fewer than ``size`` when a load resumed).
        build_s: seconds the HNSW build took; ``None`` when the index already existed.
        maintenance_work_mem_mb: what the build was given (``None`` when not built now).
        build_notices: PostgreSQL's notices during the build.
        table_bytes: ``pg_relation_size`` of the table (its vectors fit in the main fork).
        index_bytes: ``pg_relation_size`` of the HNSW index.
        exact_p50_ms: median latency of exact search.
        exact_p99_ms: 99th percentile latency of exact search.
        exact_plan: the exact query's plan, node by node.
        hnsw_plan: the HNSW query's plan, node by node.
        hnsw: one result per ``ef_search``.
        exact_ids: per exact query, the ids of its true nearest neighbours, nearest first (not
            part of the JSON report).
    """

    size: int
    table: str
    load_s: float | None
    loaded_rows: int
    build_s: float | None
    maintenance_work_mem_mb: int | None
    build_notices: tuple[str, ...]
    table_bytes: int
    index_bytes: int
    exact_p50_ms: float
    exact_p99_ms: float
    exact_plan: str
    hnsw_plan: str
    hnsw: tuple[EfSearchResult, ...]
    exact_ids: tuple[tuple[int, ...], ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class RetrievalBench:
    """One run of the benchmark.

    Args:
        settings: what was asked for.
        environment: the database server (PostgreSQL and pgvector versions, relevant settings)
            and the machine.
        sizes: the results, one per size.
    """

    settings: RetrievalBenchSettings
    environment: dict[str, Any]
    sizes: tuple[SizeResult, ...]


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _plan_nodes(child)


def check_plan(
    conn: psycopg.Connection[Any],
    query_sql: sql.Composed,
    query: Vectors,
    *,
    index: str,
    mode: Literal["exact", "hnsw"],
) -> str:
    """``EXPLAIN`` a search, and check that it scans what ``mode`` says, under the current
    session settings.

    Args:
        conn: a connection with pgvector's types registered.
        query_sql: the search, with one parameter (the query vector).
        query: a query vector.
        index: the HNSW index's name.
        mode: ``"exact"``: no index may be used; ``"hnsw"``: ``index`` must be scanned.

    Returns:
        The plan's nodes, outermost first, e.g. ``"Limit > Index Scan (bench_..._hnsw_m16_efc64)"``.

    Raises:
        BenchError: when the plan does not do what ``mode`` says.
    """
    row = conn.execute(
        sql.SQL("EXPLAIN (FORMAT JSON) {}").format(query_sql), (query,), binary=True
    ).fetchone()
    if row is None:
        raise BenchError("EXPLAIN returned no plan")
    nodes = list(_plan_nodes(row[0][0]["Plan"]))
    summary = " > ".join(
        ("Parallel " if node.get("Parallel Aware") else "")
        + node["Node Type"]
        + (f" ({node['Index Name']})" if "Index Name" in node else "")
        for node in nodes
    )
    indexes = {node["Index Name"] for node in nodes if "Index Name" in node}
    if mode == "exact" and indexes:
        raise BenchError(f"the exact search would use an index: {summary}")
    if mode == "hnsw" and index not in indexes:
        raise BenchError(f"the HNSW search would not scan {index}: {summary}")
    return summary


def _connect(dsn: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
        # Plan each execution with its own settings: psycopg prepares a query run several
        # times, and a prepared statement's cached plan would outlive a change of enable_*.
        conn.execute("SET plan_cache_mode = force_custom_plan")
    except BaseException:
        conn.close()
        raise
    return conn


def _scalar(conn: psycopg.Connection[Any], query: sql.Composed | str, *params: Any) -> Any:
    row = conn.execute(query, params or None).fetchone()
    return None if row is None else row[0]


def _environment(conn: psycopg.Connection[Any], deployment: str) -> dict[str, Any]:
    settings = {
        name: _scalar(conn, f"SHOW {name}")
        for name in ("shared_buffers", "max_parallel_workers_per_gather", "max_worker_processes")
    }
    return {
        "deployment": deployment,
        "postgresql": _scalar(conn, "SHOW server_version"),
        "pgvector": _scalar(conn, "SELECT extversion FROM pg_extension WHERE extname = 'vector'"),
        **settings,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def _load(
    conn: psycopg.Connection[Any],
    table: str,
    source: SyntheticVectors,
    size: int,
    progress: Progress,
) -> tuple[float | None, int]:
    """Fill ``table`` with the first ``size`` vectors; (seconds of COPY, rows loaded now)."""
    ident = sql.Identifier(table)
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id integer PRIMARY KEY, embedding vector({}) NOT NULL)"
        ).format(ident, sql.Literal(source.dim))
    )
    row = conn.execute(sql.SQL("SELECT count(*), coalesce(max(id) + 1, 0) FROM {}").format(ident))
    count, next_id = row.fetchone() or (0, 0)
    if count == size == next_id:
        return None, 0
    if count != next_id or count % CHUNK_ROWS or count > size:
        # Chunks commit whole, in order: anything else was not written by this command.
        conn.execute(sql.SQL("TRUNCATE {}").format(ident))
        count = 0
    task = progress.add_task(f"load {size:,}", total=size, completed=count)
    copy_sql = sql.SQL("COPY {} (id, embedding) FROM STDIN (FORMAT BINARY)").format(ident)
    seconds = 0.0
    for first, block in source.blocks(size, start=count):
        payload = copy_payload(first, block)
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cursor, cursor.copy(copy_sql) as copy:
            copy.write(payload)
        seconds += time.perf_counter() - started
        progress.advance(task, len(block))
    conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(ident))
    return seconds, size - count


def _index_exists(conn: psycopg.Connection[Any], index: str) -> bool:
    valid = _scalar(
        conn,
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = %s",
        index,
    )
    return bool(valid)


def _build(
    conn: psycopg.Connection[Any],
    dsn: str,
    table: str,
    index: str,
    settings: RetrievalBenchSettings,
    size: int,
    progress: Progress,
) -> tuple[float | None, int | None, tuple[str, ...]]:
    """Build the HNSW index unless it exists; (seconds, maintenance_work_mem, notices)."""
    if _index_exists(conn, index):
        return None, None, ()
    # Another run's index with other parameters would compete for the planner's choice.
    stale = conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = %s::regclass AND c.relname <> %s AND c.relname LIKE %s",
        (table, index, f"{table}_hnsw_%"),
    ).fetchall()
    for (name,) in stale:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    memory = settings.maintenance_work_mem_mb or maintenance_work_mem_mb(
        size, settings.dim, settings.hnsw.m
    )
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{memory}MB")))
    conn.execute(
        sql.SQL("SET max_parallel_maintenance_workers = {}").format(sql.Literal(settings.workers))
    )
    notices: list[str] = []

    def keep(diagnostic: psycopg.errors.Diagnostic) -> None:
        notices.append(diagnostic.message_primary or "")

    conn.add_notice_handler(keep)
    task = progress.add_task(f"build HNSW {size:,}", total=size)
    done = threading.Event()
    watcher = threading.Thread(
        target=_watch_build, args=(dsn, table, progress, task, done), daemon=True
    )
    watcher.start()
    started = time.perf_counter()
    try:
        conn.execute(
            sql.SQL(
                "CREATE INDEX {} ON {} USING hnsw (embedding vector_cosine_ops)"
                " WITH (m = {}, ef_construction = {})"
            ).format(
                sql.Identifier(index),
                sql.Identifier(table),
                sql.Literal(settings.hnsw.m),
                sql.Literal(settings.hnsw.ef_construction),
            )
        )
        seconds = time.perf_counter() - started
    finally:
        done.set()
        watcher.join()
        conn.remove_notice_handler(keep)
        conn.execute("RESET maintenance_work_mem")
        conn.execute("RESET max_parallel_maintenance_workers")
    progress.update(task, completed=size)
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    return seconds, memory, tuple(notices)


def _watch_build(
    dsn: str, table: str, progress: Progress, task: Any, done: threading.Event
) -> None:
    """Show the build's progress from ``pg_stat_progress_create_index`` until ``done``."""
    try:
        with psycopg.connect(dsn, autocommit=True) as watch:
            while not done.wait(0.5):
                row = watch.execute(
                    "SELECT tuples_done FROM pg_stat_progress_create_index"
                    " WHERE relid = %s::regclass",
                    (table,),
                ).fetchone()
                if row is not None and row[0]:
                    progress.update(task, completed=row[0])
    except psycopg.Error:
        # Progress is a courtesy: the build itself reports its own errors.
        return


def _series(
    conn: psycopg.Connection[Any],
    query_sql: sql.Composed,
    warmup: Vectors,
    queries: Vectors,
    progress: Progress,
    label: str,
) -> tuple[npt.NDArray[np.float64], list[tuple[int, ...]]]:
    """Run the warm-up queries, then time each query; (latencies in ms, ids per query)."""
    task = progress.add_task(label, total=len(warmup) + len(queries))
    for query in warmup:
        conn.execute(query_sql, (query,), binary=True).fetchall()
        progress.advance(task)
    latencies = np.empty(len(queries))
    found = []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        rows = conn.execute(query_sql, (query,), binary=True).fetchall()
        latencies[i] = (time.perf_counter() - started) * 1000
        found.append(tuple(row[0] for row in rows))
        progress.advance(task)
    return latencies, found


def _say(progress: Progress, line: str) -> None:
    """A line that stays above the bars; a console that is not a terminal (a log file) shows
    no bars until the end, so these lines are what such a log shows while the run goes on."""
    if not progress.disable:
        progress.console.print(line)


def _search_sql(table: str, mode: str) -> sql.Composed:
    # The comment gives each mode its own statement text, hence its own prepared statement.
    return sql.SQL("SELECT id FROM {} ORDER BY embedding <=> %s LIMIT {} /* {} */").format(
        sql.Identifier(table), sql.Literal(TOP_K), sql.SQL(mode)
    )


def _measure_size(
    conn: psycopg.Connection[Any],
    dsn: str,
    source: SyntheticVectors,
    size: int,
    settings: RetrievalBenchSettings,
    progress: Progress,
) -> SizeResult:
    table = table_name(size, settings.dim, settings.seed)
    index = index_name(table, settings.hnsw)
    load_s, loaded = _load(conn, table, source, size, progress)
    _say(
        progress,
        f"{size:,}: "
        + ("already loaded" if load_s is None else f"{loaded:,} rows loaded in {load_s:.1f} s"),
    )
    build_s, memory, notices = _build(conn, dsn, table, index, settings, size, progress)
    _say(
        progress,
        f"{size:,}: " + ("index exists" if build_s is None else f"HNSW built in {build_s:.1f} s"),
    )
    if build_s is None:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    all_queries = source.queries(WARMUP_QUERIES + settings.queries)
    warmup, queries = all_queries[:WARMUP_QUERIES], all_queries[WARMUP_QUERIES:]

    exact_sql = _search_sql(table, "exact")
    conn.execute("SET enable_indexscan = off")
    try:
        exact_plan = check_plan(conn, exact_sql, queries[0], index=index, mode="exact")
        exact_ms, truth = _series(
            conn,
            exact_sql,
            warmup,
            queries[: settings.exact_count],
            progress,
            f"exact {size:,}",
        )
    finally:
        conn.execute("RESET enable_indexscan")
    _say(progress, f"{size:,}: exact p50 {np.percentile(exact_ms, 50):.2f} ms ({exact_plan})")

    hnsw_sql = _search_sql(table, "hnsw")
    results = []
    conn.execute("SET enable_seqscan = off")
    try:
        hnsw_plan = check_plan(conn, hnsw_sql, queries[0], index=index, mode="hnsw")
        for ef in settings.ef_searches:
            conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(ef)))
            ms, found = _series(
                conn, hnsw_sql, warmup, queries, progress, f"HNSW {size:,} ef_search {ef}"
            )
            results.append(
                EfSearchResult(
                    ef_search=ef,
                    p50_ms=float(np.percentile(ms, 50)),
                    p99_ms=float(np.percentile(ms, 99)),
                    recall_at_10=mean_recall(found[: len(truth)], truth),
                )
            )
            _say(
                progress,
                f"{size:,}: ef_search {ef}: p50 {results[-1].p50_ms:.2f} ms, "
                f"recall@{TOP_K} {results[-1].recall_at_10:.3f}",
            )
    finally:
        conn.execute("RESET enable_seqscan")
        conn.execute("RESET hnsw.ef_search")

    return SizeResult(
        size=size,
        table=table,
        load_s=load_s,
        loaded_rows=loaded,
        build_s=build_s,
        maintenance_work_mem_mb=memory,
        build_notices=notices,
        table_bytes=_scalar(conn, "SELECT pg_relation_size(%s::regclass)", table),
        index_bytes=_scalar(conn, "SELECT pg_relation_size(%s::regclass)", index),
        exact_p50_ms=float(np.percentile(exact_ms, 50)),
        exact_p99_ms=float(np.percentile(exact_ms, 99)),
        exact_plan=exact_plan,
        hnsw_plan=hnsw_plan,
        hnsw=tuple(results),
        exact_ids=tuple(truth),
    )


def run_retrieval_bench(
    dsn: str,
    settings: RetrievalBenchSettings,
    *,
    deployment: str = "server",
    console: Console | None = None,
) -> RetrievalBench:
    """Load, index and search each size in turn, in the database ``dsn`` names.

    Args:
        dsn: a scratch database; its role must be able to create tables (and the ``vector``
            extension unless it is installed). Only ``bench_*`` tables are created.
        settings: what to measure.
        deployment: a label for the report (``"embedded"`` or ``"server"``).
        console: where progress is shown; none when ``None``.

    Returns:
        The results.

    Raises:
        psycopg.Error: when the database cannot be reached or refuses a statement.
        BenchError: when a search's plan is not the intended one.

    Example:
        >>> bench = run_retrieval_bench(dsn, RetrievalBenchSettings(sizes=(2000,), dim=64,
        ...     queries=20))  # doctest: +SKIP
        >>> bench.sizes[0].hnsw[0].recall_at_10  # doctest: +SKIP
        0.995
    """
    source = SyntheticVectors(settings.dim, seed=settings.seed)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
    )
    with _connect(dsn) as conn, progress:
        environment = _environment(conn, deployment)
        results = tuple(
            _measure_size(conn, dsn, source, size, settings, progress) for size in settings.sizes
        )
    return RetrievalBench(settings=settings, environment=environment, sizes=results)


def to_json(bench: RetrievalBench) -> dict[str, Any]:
    """The report as JSON-ready data (without the per-query ground truth).

    Example:
        >>> bench = RetrievalBench(RetrievalBenchSettings(sizes=(10,)), {"cpu_count": 2}, ())
        >>> to_json(bench)["settings"]["hnsw"]
        {'m': 16, 'ef_construction': 64}
    """
    settings = asdict(bench.settings)
    settings["exact_queries"] = bench.settings.exact_count
    settings["build_workers"] = bench.settings.workers
    return {
        "settings": settings,
        "environment": bench.environment,
        "sizes": [
            {name: value for name, value in asdict(size).items() if name != "exact_ids"}
            for size in bench.sizes
        ],
    }


def _seconds(value: float | None) -> str:
    return "reused" if value is None else f"{value:,.1f}"


def print_report(bench: RetrievalBench, *, out: Console) -> None:
    """The report as a table, one row per size, with the settings and the server above it."""
    env, settings = bench.environment, bench.settings
    out.print(
        f"{env['deployment']} PostgreSQL {env['postgresql']}, pgvector {env['pgvector']}; "
        f"{env['cpu_count']} CPU cores; shared_buffers {env['shared_buffers']}, "
        f"max_parallel_workers_per_gather {env['max_parallel_workers_per_gather']}"
    )
    out.print(
        f"{settings.dim}-d vectors (seeded Gaussian mixture, seed {settings.seed}), top-{TOP_K}, "
        f"cosine; HNSW m={settings.hnsw.m}, ef_construction={settings.hnsw.ef_construction}, "
        f"{settings.workers} parallel build workers; {settings.queries} timed queries per row "
        f"after {WARMUP_QUERIES} warm-up queries"
    )
    if settings.exact_count < settings.queries:
        out.print(
            f"[yellow]exact search ran on {settings.exact_count} of the {settings.queries} "
            f"queries: its latencies and every recall are over those {settings.exact_count}"
            "[/yellow]"
        )
    table = Table(title="HNSW against exact search (latency per query, client side)")
    for column in ("vectors", "load s", "build s", "table / index MB", "search"):
        table.add_column(column, justify="right")
    for column in ("p50 ms", "p99 ms", f"recall@{TOP_K}"):
        table.add_column(column, justify="right")
    for size in bench.sizes:
        table.add_section()
        first = (
            f"{size.size:,}",
            _seconds(size.load_s),
            _seconds(size.build_s),
            f"{size.table_bytes / 2**20:,.0f} / {size.index_bytes / 2**20:,.0f}",
        )
        table.add_row(
            *first, "exact", f"{size.exact_p50_ms:.2f}", f"{size.exact_p99_ms:.2f}", "(truth)"
        )
        for result in size.hnsw:
            table.add_row(
                "",
                "",
                "",
                "",
                f"ef {result.ef_search}",
                f"{result.p50_ms:.2f}",
                f"{result.p99_ms:.2f}",
                f"{result.recall_at_10:.3f}",
            )
    out.print(table)
    for size in bench.sizes:
        if size.loaded_rows and size.loaded_rows < size.size:
            out.print(f"{size.size:,}: the load resumed; {size.loaded_rows:,} rows loaded now")
        for notice in size.build_notices:
            out.print(f"{size.size:,}: build notice: {notice}")


def bench_retrieval_command(
    sizes: Annotated[
        str | None,
        typer.Option(help="Table sizes, comma-separated, k and M allowed (default: 10k,100k,1M)."),
    ] = None,
    dim: Annotated[
        int | None, typer.Option(help="Vector dimension, at most 2000 (default: 384).")
    ] = None,
    queries: Annotated[
        int | None, typer.Option(help="Timed queries per series (default: 200).")
    ] = None,
    exact_queries: Annotated[
        int | None,
        typer.Option(help="Run exact search (the ground truth) on only the first N queries."),
    ] = None,
    ef_search: Annotated[
        str, typer.Option("--ef-search", help="hnsw.ef_search values, comma-separated.")
    ] = "40,100,200",
    m: Annotated[int, typer.Option(help="HNSW m.")] = 16,
    ef_construction: Annotated[int, typer.Option(help="HNSW ef_construction.")] = 64,
    build_workers: Annotated[
        int | None,
        typer.Option(help="Parallel workers for the build (default: CPU cores - 1, at most 7)."),
    ] = None,
    maintenance_work_mem: Annotated[
        int | None,
        typer.Option(help="maintenance_work_mem for the build, in MB (default: estimated)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the vectors and queries.")] = 0,
    dsn: Annotated[
        str | None,
        typer.Option(
            help="A scratch database on a PostgreSQL server with pgvector (default: an embedded "
            "server in MEDIRAG_DATA_DIR/bench/pg). Only bench_* tables are created."
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="2,000 vectors of 64 dimensions, 20 queries (for tests)."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """HNSW against exact search: load, build, latency (p50/p99) and recall@10 at each size,
    on synthetic clustered vectors. Re-running reuses complete tables and indexes, so a long run
    can be interrupted and resumed."""
    configure_logging("text", level=logging.WARNING)
    err = Console(stderr=True)
    try:
        if sizes is not None:
            size_list = parse_int_list(sizes, "sizes")
        else:
            size_list = (2000,) if quick else (10_000, 100_000, 1_000_000)
        settings = RetrievalBenchSettings(
            sizes=size_list,
            dim=dim if dim is not None else (64 if quick else 384),
            queries=queries if queries is not None else (20 if quick else 200),
            exact_queries=exact_queries,
            ef_searches=parse_int_list(ef_search, "ef-search"),
            hnsw=HnswParams(m=m, ef_construction=ef_construction),
            build_workers=build_workers,
            maintenance_work_mem_mb=maintenance_work_mem,
            seed=seed,
        )
    except ValueError as error:
        err.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    try:
        if dsn is not None:
            bench = run_retrieval_bench(dsn, settings, deployment="server", console=err)
        else:
            data_dir = Settings().data_dir / "bench" / "pg"
            with EmbeddedPostgres(data_dir) as server:
                bench = run_retrieval_bench(
                    server.dsn, settings, deployment="embedded", console=err
                )
    except psycopg.Error as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        err.print(f"[red]error:[/red] the benchmark database failed: {first_line}")
        raise typer.Exit(2) from None
    except BenchError as error:
        err.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    if as_json:
        Console(soft_wrap=True).print_json(json.dumps(to_json(bench)))
    else:
        print_report(bench, out=Console())
