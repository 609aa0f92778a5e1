"""Past cases and literature passages in PostgreSQL with pgvector, behind the index ports.

One database holds both indexes: :class:`PgVectorStore` implements
:class:`core.ports.CaseIndex` and :class:`core.ports.LiteratureIndex`. It only needs a DSN, so it
runs the same against the embedded server (:mod:`adapters.store.embedded`, pgvector 0.6.2) and a
regular one (pgvector 0.8); the schema is the same on both (:mod:`adapters.store.schema`).

Searches by the fused image vector and by passage vector use HNSW indexes (cosine distance) and
are approximate; the searches by recorded findings (cosine distance) and by lab profile
(Euclidean distance) are exact scans of the rows that pass their filters. The filters of a search
(the query's own patient excluded, a minimum number of measured tests) are exact ``WHERE``
clauses: an excluded patient is never returned. The sparse search (learned lexical weights) sums
``weight * query weight`` over the postings of the query's terms: an exact inner product, read
through the postings' primary key.

An HNSW scan yields at most ``hnsw.ef_search`` candidates, and ``WHERE`` clauses filter them
afterwards, so each search sets ``ef_search`` for its own transaction to at least ``k``. The image
search must also get past the excluded patient's cases, which may crowd the nearest neighbours,
so it widens ``ef_search`` by their number (a B-tree count): however many of those are among the
candidates, ``k`` others remain, up to pgvector's limit of 1000 for ``ef_search``. Past that
limit, it depends on the ``vector`` extension's version, which the store reads when it opens
(:attr:`PgVectorStore.vector_version`):

* pgvector 0.8 and later scan iteratively: with ``hnsw.iterative_scan = strict_order`` set for
  the transaction as well, the scan goes on past ``ef_search`` until ``k`` rows pass the filter
  (up to ``hnsw.max_scan_tuples``, 20,000 by default), in exact distance order. The widening
  stays, and not only for its guarantee: pgvector 0.8 counts ``ef_search`` in the scan's cost,
  so for a patient with many cases the planner weighs the wider scan against an exact one.
  Measured on 4,000 cases, half of them near-duplicates of the query from its own patient, the
  exact scan it then chose returned ``k`` cases where the HNSW scan, iterative or not, returned
  none (the near-duplicates' part of the graph had no edge to the rest).
* pgvector 0.6 (the embedded server) has no iterative scans: a patient with more than about
  1000 cases can crowd others out of the results.

Writes load rows with binary ``COPY`` into a temporary table and upsert them from there with
``INSERT ... ON CONFLICT DO UPDATE`` in the same transaction: a batch is written whole or not at
all, and writing it again changes nothing.

Connection failures on every data method are raised as
:class:`core.errors.SourceUnavailable` (``"case index"`` or ``"literature index"``), so a caller
can report the index as unavailable instead of failing the request.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from adapters.store.pooled import Pooled, new_pool
from adapters.store.schema import (
    SPARSE_DIM,
    HnswParams,
    IndexModels,
    drop_index,
    lab_panel_id,
    migrate,
)
from core.errors import SourceUnavailable
from core.labs import LAB_PANEL
from core.types import CaseRecord, IndexedCase, LabProfile, Passage, SparseWeights, Vector

__all__ = ["ITERATIVE_SCAN_VERSION", "MAX_EF_SEARCH", "PgVectorStore"]

logger = logging.getLogger(__name__)

MAX_EF_SEARCH = 1000
"""The largest ``hnsw.ef_search`` pgvector accepts; no query returns more rows than this."""

ITERATIVE_SCAN_VERSION = (0, 8, 0)
"""The first pgvector version with iterative index scans (``hnsw.iterative_scan``)."""

_CASES = "case index"
_LITERATURE = "literature index"
_DATABASE = "index database"

_T = TypeVar("_T")

_FLOAT32_MAX = float(np.finfo(np.float32).max)

# Columns loaded by COPY, with the types of their binary form, in order.
_CASE_COLUMNS = (
    ("case_id", "text"),
    ("patient_ref", "text"),
    ("study_uid", "text"),
    ("findings", "text[]"),
    ("findings_text", "text"),
    ("provenance", "text"),
    ("image", "vector"),
    ("findings_embedding", "vector"),
    ("fused", "vector"),
    ("labs", "vector"),
    ("labs_measured", "int4"),
)
_PASSAGE_COLUMNS = (
    ("passage_id", "text"),
    ("pmid", "text"),
    ("section", "text"),
    ("year", "text"),
    ("title", "text"),
    ("doi", "text"),
    ("text", "text"),
    ("dense", "vector"),
)
# A passage's postings travel with it as two arrays (one row per passage, not per term).
_POSTING_COLUMNS = (("terms", "int4[]"), ("weights", "float4[]"))


def _names(columns: Sequence[tuple[str, str]]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(name) for name, _ in columns)


def _updates(columns: Sequence[tuple[str, str]]) -> sql.Composed:
    return sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name)) for name, _ in columns
    )


# The load tables take their column types (vector dimensions included) from the index tables, so
# COPY checks every vector's dimension on the server too.
_CASE_LOAD = sql.SQL(
    "CREATE TEMP TABLE case_load ON COMMIT DROP AS SELECT {columns} FROM cases WITH NO DATA"
).format(columns=_names(_CASE_COLUMNS))
_CASE_COPY = sql.SQL("COPY case_load ({columns}) FROM STDIN (FORMAT BINARY)").format(
    columns=_names(_CASE_COLUMNS)
)
# Sorted, so that concurrent upserts take the rows' locks in one order and cannot deadlock.
_UPSERT_CASES = sql.SQL(
    """
    INSERT INTO cases ({columns}, updated_at)
    SELECT {columns}, now() FROM case_load ORDER BY case_id
    ON CONFLICT (case_id) DO UPDATE SET {updates}, updated_at = EXCLUDED.updated_at
    """
).format(columns=_names(_CASE_COLUMNS), updates=_updates(_CASE_COLUMNS[1:]))

_PASSAGE_LOAD = sql.SQL(
    "CREATE TEMP TABLE passage_load ON COMMIT DROP AS"
    " SELECT {columns}, NULL::integer[] AS terms, NULL::real[] AS weights"
    " FROM passages WITH NO DATA"
).format(columns=_names(_PASSAGE_COLUMNS))
_PASSAGE_COPY = sql.SQL("COPY passage_load ({columns}) FROM STDIN (FORMAT BINARY)").format(
    columns=_names(_PASSAGE_COLUMNS + _POSTING_COLUMNS)
)
_UPSERT_PASSAGES = sql.SQL(
    """
    INSERT INTO passages ({columns})
    SELECT {columns} FROM passage_load ORDER BY passage_id
    ON CONFLICT (passage_id) DO UPDATE SET {updates}
    """
).format(columns=_names(_PASSAGE_COLUMNS), updates=_updates(_PASSAGE_COLUMNS[1:]))
_DELETE_POSTINGS = """
    DELETE FROM passage_terms WHERE passage_id IN (SELECT passage_id FROM passage_load)
"""
_INSERT_POSTINGS = """
    INSERT INTO passage_terms (term, passage_id, weight)
    SELECT t.term, l.passage_id, t.weight
    FROM passage_load l, unnest(l.terms, l.weights) AS t (term, weight)
    ORDER BY t.term, l.passage_id
"""

_EF_SEARCH_EXCLUDING = """
    SELECT set_config(
        'hnsw.ef_search',
        least(
            %(max_ef_search)s,
            greatest(
                %(ef_search)s,
                %(k)s + (SELECT count(*) FROM cases WHERE patient_ref = %(patient)s)
            )
        )::text,
        true
    )
"""

_NEAREST_BY_IMAGE = """
    SELECT case_id, patient_ref, study_uid, findings, provenance,
           1 - (fused <=> %(query)s) AS similarity
    FROM cases
    WHERE patient_ref <> %(patient)s
    ORDER BY fused <=> %(query)s
    LIMIT %(k)s
"""

_NEAREST_BY_FINDINGS = """
    SELECT case_id, patient_ref, study_uid, findings, provenance,
           1 - (findings_embedding <=> %(query)s) AS similarity
    FROM cases
    WHERE patient_ref <> %(patient)s
    ORDER BY findings_embedding <=> %(query)s
    LIMIT %(k)s
"""

_NEAREST_BY_LABS = """
    SELECT case_id, patient_ref, study_uid, findings, provenance,
           labs <-> %(query)s AS distance
    FROM cases
    WHERE labs IS NOT NULL AND labs_measured >= %(min_measured)s AND patient_ref <> %(patient)s
    ORDER BY labs <-> %(query)s
    LIMIT %(k)s
"""

_NEAREST_PASSAGES = """
    SELECT passage_id, pmid, text, section, year, title, doi,
           1 - (dense <=> %(query)s) AS similarity
    FROM passages
    ORDER BY dense <=> %(query)s
    LIMIT %(k)s
"""

# Scores in double precision (the stored weights are real), ties broken by passage id so that
# equal scores come back in a stable order.
_NEAREST_PASSAGES_SPARSE = """
    WITH query (term, weight) AS (
        SELECT * FROM unnest(%(terms)s::integer[], %(weights)s::double precision[])
    ),
    scores AS (
        SELECT t.passage_id, sum(t.weight * q.weight) AS score
        FROM passage_terms t JOIN query q ON t.term = q.term
        GROUP BY t.passage_id
        ORDER BY score DESC, t.passage_id
        LIMIT %(k)s
    )
    SELECT p.passage_id, p.pmid, p.text, p.section, p.year, p.title, p.doi, s.score
    FROM scores s JOIN passages p USING (passage_id)
    ORDER BY s.score DESC, p.passage_id
"""


def _reason(error: psycopg.Error) -> str:
    """The first line of a driver error: what failed, without the query or its parameters."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _vector(value: Vector, dim: int, what: str, *, directional: bool = False) -> Vector:
    """``value`` as a finite float32 vector of ``dim`` values, or a ValueError naming ``what``.

    A ``directional`` vector is compared by cosine distance, which a zero vector does not have.
    """
    array = np.asarray(value, dtype=np.float32)
    if array.shape != (dim,):
        raise ValueError(f"{what} must have shape ({dim},), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} has non-finite values")
    if directional and not array.any():
        raise ValueError(f"{what} is all zeros: it has no direction to compare by cosine")
    return array


def _labs_vector(labs: LabProfile | None, dim: int, what: str) -> Vector | None:
    return None if labs is None else _vector(labs.vector, dim, what)


def _sparse(weights: Mapping[int, float], what: str) -> tuple[list[int], list[float]]:
    """``weights`` as (token ids, weights) lists, or a ValueError naming ``what``.

    Token ids must fit the postings' ``integer`` column and weights its ``real`` one.
    """
    if not weights:
        return [], []
    ids = np.asarray(list(weights))
    # Float, bool, string or out-of-int64 ids give an array of another kind ("f", "b", "U", "O").
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{what}: token ids must be integers")
    if ids.min() < 0 or ids.max() >= SPARSE_DIM:
        raise ValueError(f"{what}: token ids must be between 0 and {SPARSE_DIM - 1}")
    try:
        values = np.asarray(list(weights.values()), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: weights must be numbers") from None
    if not np.isfinite(values).all() or np.abs(values).max() > _FLOAT32_MAX:
        raise ValueError(f"{what} has non-finite weights, or weights beyond float32")
    return ids.tolist(), values.tolist()


def _parse_version(version: str) -> tuple[int, ...]:
    """``"0.8.0"`` as ``(0, 8, 0)``; suffixes after the numbers are ignored."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    if match is None:
        raise ValueError(f"cannot read the vector extension's version {version!r}")
    return tuple(int(part) for part in match.group().split("."))


def _passage(row: Sequence[Any]) -> tuple[Passage, float]:
    passage_id, pmid, text, section, year, title, doi, score = row
    passage = Passage(
        passage_id=passage_id,
        pmid=pmid,
        text=text,
        section=section,
        year=year,
        title=title,
        doi=doi,
    )
    return passage, float(score)


async def _connect(dsn: str, connect_timeout: float) -> AsyncConnection[Any]:
    """A plain connection (no pgvector types), for migrations and dropping the index."""
    try:
        return await AsyncConnection.connect(dsn, connect_timeout=max(1, round(connect_timeout)))
    except psycopg.OperationalError as error:
        raise SourceUnavailable(_DATABASE, _reason(error)) from error


async def _inspect(conn: AsyncConnection[Any]) -> tuple[tuple[int, ...], str | None]:
    """The installed vector extension's version and the sparse model the index records."""
    cursor = await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    row = await cursor.fetchone()
    if row is None:
        raise RuntimeError("the vector extension is not installed in the index database")
    cursor = await conn.execute("SELECT model FROM index_models WHERE role = 'sparse'")
    sparse = await cursor.fetchone()
    return _parse_version(str(row[0])), None if sparse is None else str(sparse[0])


def _check_settings(ef_search: int, analyze_every: int) -> None:
    if not 1 <= ef_search <= MAX_EF_SEARCH:
        raise ValueError(f"ef_search must be between 1 and {MAX_EF_SEARCH}, got {ef_search}")
    if analyze_every < 1:
        raise ValueError(f"analyze_every must be at least 1, got {analyze_every}")


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_EF_SEARCH:
        raise ValueError(f"k must be between 1 and {MAX_EF_SEARCH}, got {k}")


def _last_by_id(items: Sequence[_T], key: Callable[[_T], str]) -> dict[str, int]:
    """``{id: index of its last occurrence}``: a batch that gives an id twice keeps the later."""
    return {key(item): i for i, item in enumerate(items)}


class PgVectorStore(Pooled):
    """The case and literature indexes in one PostgreSQL database with pgvector.

    Create it with :meth:`open`, which brings the schema up to date, checks that the index was
    built with the given models and reads the ``vector`` extension's version; close it with
    :meth:`close` or ``async with``.

    Args:
        pool: an open connection pool whose connections have pgvector's types registered.
        models: the models the index was opened with.
        vector_version: the installed ``vector`` extension's version (``(0, 8, 0)``): from
            :data:`ITERATIVE_SCAN_VERSION` on, filtered HNSW searches scan iteratively.
        recorded_sparse_model: the sparse model the index records, if any; when it is not
            ``models.sparse_model`` (a dense-only service on a hybrid index), passages cannot
            be added, since they would lack the sparse weights the others have.
        ef_search: the HNSW candidate list size for searches; each search raises it to what its
            ``k`` (and, without iterative scans, the excluded patient's cases) needs.
        analyze_every: run ``ANALYZE`` on a table once this many rows were upserted into it
            since the last ``ANALYZE``, so the planner sees the table's real size.

    Raises:
        ValueError: for a setting out of range.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        models: IndexModels,
        *,
        vector_version: tuple[int, ...],
        recorded_sparse_model: str | None = None,
        ef_search: int = 40,
        analyze_every: int = 1000,
    ) -> None:
        _check_settings(ef_search, analyze_every)
        super().__init__(pool)
        self._models = models
        self._vector_version = vector_version
        self._recorded_sparse_model = recorded_sparse_model
        self._ef_search = ef_search
        self._analyze_every = analyze_every
        self._unanalyzed = {"cases": 0, "passages": 0, "passage_terms": 0}

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        image_model: str,
        image_dim: int,
        text_model: str,
        text_dim: int,
        sparse_model: str | None = None,
        lab_panel: str | None = None,
        lab_dim: int = len(LAB_PANEL),
        hnsw: HnswParams | None = None,
        ef_search: int = 40,
        analyze_every: int = 1000,
        max_connections: int = 4,
        connect_timeout: float = 10.0,
    ) -> PgVectorStore:
        """Connect to the index database, migrate its schema, and check its models.

        Args:
            dsn: a libpq connection string or URI.
            image_model: id of the image/text model behind the case vectors.
            image_dim: its embedding dimension.
            text_model: id of the text model behind the passage vectors.
            text_dim: its embedding dimension.
            sparse_model: id of the model behind the passages' sparse weights, or ``None`` to
                search the literature by dense vectors only (see
                :class:`adapters.store.schema.IndexModels`).
            lab_panel: id of the lab panel behind the lab profiles; the current
                :data:`core.labs.LAB_PANEL` (:func:`adapters.store.schema.lab_panel_id`) when
                ``None``.
            lab_dim: the lab profile's length.
            hnsw: HNSW build parameters (``m``, ``ef_construction``) for the indexes created
                now; pgvector's defaults (``m=16, ef_construction=64``) when ``None``. An
                existing index keeps the parameters it was built with.
            ef_search: the HNSW candidate list size for searches (1-1000; pgvector's default
                is 40): larger gives better recall and slower searches. Each search raises it
                to what its ``k`` needs.
            analyze_every: rows upserted into a table between automatic ``ANALYZE`` runs.
            max_connections: the pool's largest size.
            connect_timeout: seconds to wait for a connection, here and on every later call.

        Returns:
            The open store.

        Raises:
            SourceUnavailable: ``"index database"`` when the database cannot be reached.
            IndexModelMismatch: when the index was built with other models or dimensions;
                drop it with :meth:`drop` and ingest again.
            SchemaVersionError: when a newer release migrated the database.
            ValueError: for an invalid dimension or setting.

        Example:
            >>> store = await PgVectorStore.open(  # doctest: +SKIP
            ...     dsn, image_model="biomedclip", image_dim=512,
            ...     text_model="bge-m3", text_dim=1024, sparse_model="bge-m3",
            ...     hnsw=HnswParams(m=16, ef_construction=64), ef_search=100,
            ... )
            >>> store.vector_version  # doctest: +SKIP
            (0, 8, 0)
        """
        _check_settings(ef_search, analyze_every)
        models = IndexModels(
            image_model=image_model,
            image_dim=image_dim,
            text_model=text_model,
            text_dim=text_dim,
            lab_panel=lab_panel if lab_panel is not None else lab_panel_id(),
            lab_dim=lab_dim,
            sparse_model=sparse_model,
        )
        # The vector type must exist before pooled connections can register it, so the schema
        # is migrated on a connection of its own first.
        async with await _connect(dsn, connect_timeout) as conn:
            await migrate(conn, models, hnsw)
            vector_version, recorded_sparse_model = await _inspect(conn)
        pool = new_pool(
            dsn,
            name="medirag-index",
            max_connections=max_connections,
            connect_timeout=connect_timeout,
            configure=register_vector_async,
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
        except psycopg.OperationalError as error:
            await pool.close()
            raise SourceUnavailable(_DATABASE, _reason(error)) from error
        logger.info(
            "index opened: pgvector %s, iterative scans %s",
            ".".join(map(str, vector_version)),
            "on" if vector_version >= ITERATIVE_SCAN_VERSION else "off",
        )
        return cls(
            pool,
            models,
            vector_version=vector_version,
            recorded_sparse_model=recorded_sparse_model,
            ef_search=ef_search,
            analyze_every=analyze_every,
        )

    @staticmethod
    async def drop(dsn: str, *, connect_timeout: float = 10.0) -> None:
        """Delete the index (tables, data, recorded models) for a rebuild with other models.

        Args:
            dsn: the index database.
            connect_timeout: seconds to wait for the connection.

        Raises:
            SourceUnavailable: ``"index database"`` when the database cannot be reached.
        """
        async with await _connect(dsn, connect_timeout) as conn:
            await drop_index(conn)

    @property
    def models(self) -> IndexModels:
        """The models and dimensions this index was opened with."""
        return self._models

    @property
    def vector_version(self) -> tuple[int, ...]:
        """The installed ``vector`` extension's version, read when the store opened."""
        return self._vector_version

    @property
    def iterative_scan(self) -> bool:
        """Whether filtered HNSW searches scan iteratively (pgvector 0.8 and later)."""
        return self._vector_version >= ITERATIVE_SCAN_VERSION

    @asynccontextmanager
    async def _transaction(self, source: str) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection in a transaction; connection failures become SourceUnavailable."""
        try:
            async with self._pool.connection() as conn, conn.transaction():
                yield conn
        except psycopg.OperationalError as error:
            raise SourceUnavailable(source, _reason(error)) from error

    async def _set_ef_search(self, conn: AsyncConnection[Any], k: int) -> None:
        # set_config(..., true) lasts until the end of the transaction, like SET LOCAL, and
        # unlike SET it takes a bind parameter.
        ef_search = max(self._ef_search, k)
        await conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef_search),))

    async def _prepare_filtered_scan(
        self, conn: AsyncConnection[Any], k: int, exclude_patient: str
    ) -> None:
        """Make an HNSW scan filtered by patient return ``k`` rows if the index has them."""
        # The excluded patient's cases may all be among the HNSW candidates and are filtered
        # out after the scan: widen the scan by their number (a B-tree count).
        await conn.execute(
            _EF_SEARCH_EXCLUDING,
            {
                "max_ef_search": MAX_EF_SEARCH,
                "ef_search": self._ef_search,
                "k": k,
                "patient": exclude_patient,
            },
        )
        if self.iterative_scan:
            await conn.execute("SELECT set_config('hnsw.iterative_scan', 'strict_order', true)")

    async def _note_upserted(self, table: str, rows: int, source: str) -> None:
        """Count rows committed to ``table``; ``ANALYZE`` it once enough have accumulated."""
        self._unanalyzed[table] += rows
        if self._unanalyzed[table] < self._analyze_every:
            return
        async with self._transaction(source) as conn:
            await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
        self._unanalyzed[table] = 0
        logger.info("analyzed %s after bulk upserts", table)

    async def analyze(self) -> None:
        """Update the planner's statistics of the index tables now (after loading many rows).

        Raises:
            SourceUnavailable: ``"index database"`` when the database cannot be reached.
        """
        async with self._transaction(_DATABASE) as conn:
            for table in self._unanalyzed:
                await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
        self._unanalyzed = dict.fromkeys(self._unanalyzed, 0)

    async def upsert_cases(self, cases: Sequence[IndexedCase]) -> None:
        """Insert or replace cases by ``case_id``, all of them in one transaction.

        The rows are loaded by binary ``COPY`` and upserted from there. A case without labs is
        stored with no lab vector and 0 measured tests, so the lab search never returns it.

        Args:
            cases: the cases; a ``case_id`` given twice keeps the later one.

        Raises:
            ValueError: when a vector has the wrong shape or non-finite values (nothing is
                written).
            SourceUnavailable: ``"case index"`` when the database cannot be reached.
        """
        if not cases:
            return
        image_dim, lab_dim = self._models.image_dim, self._models.lab_dim
        rows = [
            (
                case.record.case_id,
                case.record.patient_ref,
                case.record.study_uid,
                list(case.record.findings),
                case.findings_text,
                case.record.provenance,
                _vector(case.image, image_dim, f"case {i}: image"),
                _vector(case.findings, image_dim, f"case {i}: findings vector"),
                _vector(case.fused, image_dim, f"case {i}: fused vector", directional=True),
                _labs_vector(case.labs, lab_dim, f"case {i}: labs"),
                0 if case.labs is None else case.labs.measured_count,
            )
            for i, case in enumerate(cases)
        ]
        last = _last_by_id(cases, lambda case: case.record.case_id)
        rows = [rows[i] for i in last.values()]
        async with self._transaction(_CASES) as conn, conn.cursor() as cursor:
            await cursor.execute(_CASE_LOAD)
            async with cursor.copy(_CASE_COPY) as copy:
                copy.set_types([kind for _, kind in _CASE_COLUMNS])
                for row in rows:
                    await copy.write_row(row)
            await cursor.execute(_UPSERT_CASES)
        await self._note_upserted("cases", len(rows), _CASES)

    async def case_ids(self) -> frozenset[str]:
        """The ids of all indexed cases.

        Raises:
            SourceUnavailable: ``"case index"`` when the database cannot be reached.
        """
        async with self._transaction(_CASES) as conn:
            cursor = await conn.execute("SELECT case_id FROM cases")
            return frozenset(case_id for (case_id,) in await cursor.fetchall())

    async def nearest_by_image(
        self, query: Vector, *, k: int, exclude_patient: str
    ) -> list[tuple[CaseRecord, float]]:
        """Cases whose fused vector is closest to an image embedding by cosine distance.

        Args:
            query: the query image's embedding, shape ``(image_dim,)``.
            k: how many cases at most (1-1000).
            exclude_patient: the query's patient (``Patient/<id>``); none of its cases is
                returned, and they do not take the place of others among the ``k``.

        Returns:
            ``(case, cosine similarity)`` pairs, most similar first.

        Raises:
            ValueError: for a query of the wrong shape, non-finite or all zeros, or a bad ``k``.
            SourceUnavailable: ``"case index"`` when the database cannot be reached.
        """
        return await self._nearest_by_cosine(
            _NEAREST_BY_IMAGE, query, "image query", k=k, exclude_patient=exclude_patient
        )

    async def nearest_by_findings(
        self, query: Vector, *, k: int, exclude_patient: str
    ) -> list[tuple[CaseRecord, float]]:
        """Cases whose recorded findings' embedding is closest to a text embedding by cosine
        distance (an order's reason, embedded by the image model's text tower).

        No index covers ``findings_embedding``, so the search is an exact scan of the cases;
        it prepares the scan like :meth:`nearest_by_image` all the same, so that it stays
        correct if an HNSW index on the column is ever added.

        Args:
            query: the text's embedding in the image model's space, shape ``(image_dim,)``.
            k: how many cases at most (1-1000).
            exclude_patient: the query's patient (``Patient/<id>``); none of its cases is
                returned.

        Returns:
            ``(case, cosine similarity)`` pairs, most similar first.

        Raises:
            ValueError: for a query of the wrong shape, non-finite or all zeros, or a bad ``k``.
            SourceUnavailable: ``"case index"`` when the database cannot be reached.
        """
        return await self._nearest_by_cosine(
            _NEAREST_BY_FINDINGS, query, "findings query", k=k, exclude_patient=exclude_patient
        )

    async def _nearest_by_cosine(
        self, statement: str, query: Vector, what: str, *, k: int, exclude_patient: str
    ) -> list[tuple[CaseRecord, float]]:
        """Run a cosine search of the cases in the image model's space, filtered by patient."""
        _check_k(k)
        vector = _vector(query, self._models.image_dim, what, directional=True)
        async with self._transaction(_CASES) as conn:
            await self._prepare_filtered_scan(conn, k, exclude_patient)
            cursor = await conn.execute(
                statement, {"query": vector, "patient": exclude_patient, "k": k}
            )
            rows = await cursor.fetchall()
        return [(CaseRecord(c, p, s, tuple(f), v), float(score)) for c, p, s, f, v, score in rows]

    async def nearest_by_labs(
        self, query: Vector, *, k: int, exclude_patient: str, min_measured: int
    ) -> list[tuple[CaseRecord, float]]:
        """Cases whose lab profile is closest to ``query`` by Euclidean distance.

        Only cases with a lab profile of at least ``min_measured`` measured tests are compared.

        Args:
            query: the query's lab profile vector, shape ``(lab_dim,)``.
            k: how many cases at most (1-1000).
            exclude_patient: the query's patient; none of its cases is returned.
            min_measured: the fewest measured tests a case needs.

        Returns:
            ``(case, distance)`` pairs, nearest first.

        Raises:
            ValueError: for a query of the wrong shape or non-finite, or a bad ``k``.
            SourceUnavailable: ``"case index"`` when the database cannot be reached.
        """
        _check_k(k)
        vector = _vector(query, self._models.lab_dim, "lab query")
        params = {
            "query": vector,
            "patient": exclude_patient,
            "min_measured": min_measured,
            "k": k,
        }
        async with self._transaction(_CASES) as conn:
            cursor = await conn.execute(_NEAREST_BY_LABS, params)
            rows = await cursor.fetchall()
        return [(CaseRecord(c, p, s, tuple(f), v), float(dist)) for c, p, s, f, v, dist in rows]

    async def upsert_passages(
        self,
        passages: Sequence[Passage],
        vectors: Vector,
        sparse: Sequence[SparseWeights] | None = None,
    ) -> None:
        """Insert or replace passages by ``passage_id`` with their dense vectors and, when
        given, their sparse weights, in one transaction.

        The rows are loaded by binary ``COPY`` and upserted from there. Given sparse weights
        replace the passage's postings (an empty dict leaves it with none); without them, the
        postings of passages already indexed are kept.

        Args:
            passages: the passages; a ``passage_id`` given twice keeps the later one.
            vectors: their embeddings, shape ``(len(passages), text_dim)``, row ``i`` for
                passage ``i``.
            sparse: their sparse weights (token id -> weight), one per passage, from the
                store's sparse model; required when the store has one, refused when it has
                none.

        Raises:
            ValueError: when the vectors or sparse weights do not match the passages, the text
                model's dimension or the store's sparse model, or have non-finite values, or a
                dense vector is all zeros (nothing is written).
            SourceUnavailable: ``"literature index"`` when the database cannot be reached.
        """
        matrix = np.asarray(vectors, dtype=np.float32)
        text_dim = self._models.text_dim
        if matrix.shape != (len(passages), text_dim):
            raise ValueError(
                f"vectors must have shape ({len(passages)}, {text_dim}) for "
                f"{len(passages)} passages, got {matrix.shape}"
            )
        self._check_sparse_given(sparse is not None)
        if sparse is not None and len(sparse) != len(passages):
            raise ValueError(
                f"sparse weights must be given for each of the {len(passages)} passages, "
                f"got {len(sparse)}"
            )
        if not passages:
            return
        rows = []
        for i, p in enumerate(passages):
            terms, weights = (
                _sparse(sparse[i], f"passage {p.passage_id}: sparse weights")
                if sparse is not None
                else (None, None)
            )
            dense = _vector(matrix[i], text_dim, f"passage {p.passage_id}", directional=True)
            fields = (p.passage_id, p.pmid, p.section, p.year, p.title, p.doi, p.text, dense)
            rows.append((*fields, terms, weights))
        last = _last_by_id(passages, lambda passage: passage.passage_id)
        rows = [rows[i] for i in last.values()]
        postings = sum(len(row[-1] or ()) for row in rows)
        async with self._transaction(_LITERATURE) as conn, conn.cursor() as cursor:
            await cursor.execute(_PASSAGE_LOAD)
            async with cursor.copy(_PASSAGE_COPY) as copy:
                copy.set_types([kind for _, kind in _PASSAGE_COLUMNS + _POSTING_COLUMNS])
                for row in rows:
                    await copy.write_row(row)
            await cursor.execute(_UPSERT_PASSAGES)
            if sparse is not None:
                await cursor.execute(_DELETE_POSTINGS)
                await cursor.execute(_INSERT_POSTINGS)
        await self._note_upserted("passages", len(rows), _LITERATURE)
        if postings:
            await self._note_upserted("passage_terms", postings, _LITERATURE)

    def _check_sparse_given(self, given: bool) -> None:
        """Every passage of an index with a sparse model has its weights, from that model."""
        wanted = self._models.sparse_model
        if given and wanted is None:
            raise ValueError(
                "sparse weights were given, but the store was opened without a sparse model "
                "(open it with sparse_model=<the model's id>)"
            )
        if not given and wanted is not None:
            raise ValueError(
                f"the index keeps sparse weights from {wanted} for every passage: give them "
                "(sparse=...) for these passages too"
            )
        if wanted is None and self._recorded_sparse_model is not None:
            raise ValueError(
                f"the index keeps sparse weights from {self._recorded_sparse_model} for every "
                "passage: open it with that sparse model to add passages"
            )

    async def passage_ids(self) -> frozenset[str]:
        """The ids of all indexed passages.

        Raises:
            SourceUnavailable: ``"literature index"`` when the database cannot be reached.
        """
        async with self._transaction(_LITERATURE) as conn:
            cursor = await conn.execute("SELECT passage_id FROM passages")
            return frozenset(passage_id for (passage_id,) in await cursor.fetchall())

    async def nearest_passages(self, query: Vector, *, k: int) -> list[tuple[Passage, float]]:
        """Passages closest to a dense query vector by cosine distance.

        Args:
            query: the query text's embedding, shape ``(text_dim,)``.
            k: how many passages at most (1-1000).

        Returns:
            ``(passage, cosine similarity)`` pairs, most similar first.

        Raises:
            ValueError: for a query of the wrong shape, non-finite or all zeros, or a bad ``k``.
            SourceUnavailable: ``"literature index"`` when the database cannot be reached.
        """
        _check_k(k)
        vector = _vector(query, self._models.text_dim, "text query", directional=True)
        async with self._transaction(_LITERATURE) as conn:
            await self._set_ef_search(conn, k)
            cursor = await conn.execute(_NEAREST_PASSAGES, {"query": vector, "k": k})
            rows = await cursor.fetchall()
        return [_passage(row) for row in rows]

    async def nearest_passages_sparse(
        self, query: SparseWeights, *, k: int
    ) -> list[tuple[Passage, float]]:
        """Passages with the highest inner product of sparse weights with the query's.

        The score is the sum of ``weight * query weight`` over the token ids the passage
        shares with the query, computed exactly from the postings; passages that share no
        token with the query are not returned.

        Args:
            query: the query text's sparse weights (token id -> weight), from the store's
                sparse model; an empty dict finds nothing.
            k: how many passages at most (1-1000).

        Returns:
            ``(passage, inner product)`` pairs, highest first (equal scores by passage id).

        Raises:
            ValueError: for a token id out of range or a non-finite weight, a bad ``k``, or a
                store opened without a sparse model.
            SourceUnavailable: ``"literature index"`` when the database cannot be reached.

        Example:
            >>> hits = await store.nearest_passages_sparse({2: 0.3, 17: 0.1}, k=5)  # doctest: +SKIP
        """
        _check_k(k)
        if self._models.sparse_model is None:
            raise ValueError(
                "the store was opened without a sparse model: its sparse weights cannot be "
                "compared with the query's (open it with sparse_model=<the model's id>)"
            )
        terms, weights = _sparse(query, "sparse query")
        if not terms:
            return []
        params = {"terms": terms, "weights": weights, "k": k}
        async with self._transaction(_LITERATURE) as conn:
            cursor = await conn.execute(_NEAREST_PASSAGES_SPARSE, params)
            rows = await cursor.fetchall()
        return [_passage(row) for row in rows]
