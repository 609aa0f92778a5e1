"""Past cases and literature passages in PostgreSQL with pgvector, behind the index ports.

One database holds both indexes: :class:`PgVectorStore` implements
:class:`core.ports.CaseIndex` and :class:`core.ports.LiteratureIndex`. It only needs a DSN, so it
runs the same against the embedded server (:mod:`adapters.store.embedded`) and a regular one.

Searches by the fused image vector and by passage vector use HNSW indexes (cosine distance) and
are approximate; the searches by recorded findings (cosine distance) and by lab profile
(Euclidean distance) are exact scans of the rows that pass their filters. The filters of a search
(the query's own patient excluded, a minimum number of measured tests) are exact ``WHERE``
clauses: an excluded patient is never returned.

With pgvector 0.6 an HNSW scan yields at most ``hnsw.ef_search`` candidates, and ``WHERE``
clauses filter them afterwards (iterative index scans only came with pgvector 0.8). So each
search sets ``ef_search`` for its own transaction to at least ``k`` plus, for the image search,
the number of cases of the excluded patient: however many of those are among the candidates,
``k`` others remain. That holds up to pgvector's limit of 1000 for ``ef_search``.

Connection failures on every data method are raised as
:class:`core.errors.SourceUnavailable` (``"case index"`` or ``"literature index"``), so a caller
can report the index as unavailable instead of failing the request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from adapters.store.pooled import Pooled, new_pool
from adapters.store.schema import HnswParams, IndexModels, drop_index, lab_panel_id, migrate
from core.errors import SourceUnavailable
from core.labs import LAB_PANEL
from core.types import CaseRecord, IndexedCase, LabProfile, Passage, Vector

__all__ = ["MAX_EF_SEARCH", "PgVectorStore"]

logger = logging.getLogger(__name__)

MAX_EF_SEARCH = 1000
"""The largest ``hnsw.ef_search`` pgvector accepts; no query returns more rows than this."""

_CASES = "case index"
_LITERATURE = "literature index"
_DATABASE = "index database"

_UPSERT_CASE = """
    INSERT INTO cases (
        case_id, patient_ref, study_uid, findings, findings_text, provenance,
        image, findings_embedding, fused, labs, labs_measured, updated_at
    )
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
    ON CONFLICT (case_id) DO UPDATE SET
        patient_ref = EXCLUDED.patient_ref,
        study_uid = EXCLUDED.study_uid,
        findings = EXCLUDED.findings,
        findings_text = EXCLUDED.findings_text,
        provenance = EXCLUDED.provenance,
        image = EXCLUDED.image,
        findings_embedding = EXCLUDED.findings_embedding,
        fused = EXCLUDED.fused,
        labs = EXCLUDED.labs,
        labs_measured = EXCLUDED.labs_measured,
        updated_at = EXCLUDED.updated_at
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

_UPSERT_PASSAGE = """
    INSERT INTO passages (passage_id, pmid, section, year, title, text, dense)
    VALUES (%s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (passage_id) DO UPDATE SET
        pmid = EXCLUDED.pmid,
        section = EXCLUDED.section,
        year = EXCLUDED.year,
        title = EXCLUDED.title,
        text = EXCLUDED.text,
        dense = EXCLUDED.dense
"""

_NEAREST_PASSAGES = """
    SELECT passage_id, pmid, text, section, year, title,
           1 - (dense <=> %(query)s) AS similarity
    FROM passages
    ORDER BY dense <=> %(query)s
    LIMIT %(k)s
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


async def _connect(dsn: str, connect_timeout: float) -> AsyncConnection[Any]:
    """A plain connection (no pgvector types), for migrations and dropping the index."""
    try:
        return await AsyncConnection.connect(dsn, connect_timeout=max(1, round(connect_timeout)))
    except psycopg.OperationalError as error:
        raise SourceUnavailable(_DATABASE, _reason(error)) from error


def _check_settings(ef_search: int, analyze_every: int) -> None:
    if not 1 <= ef_search <= MAX_EF_SEARCH:
        raise ValueError(f"ef_search must be between 1 and {MAX_EF_SEARCH}, got {ef_search}")
    if analyze_every < 1:
        raise ValueError(f"analyze_every must be at least 1, got {analyze_every}")


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_EF_SEARCH:
        raise ValueError(f"k must be between 1 and {MAX_EF_SEARCH}, got {k}")


class PgVectorStore(Pooled):
    """The case and literature indexes in one PostgreSQL database with pgvector.

    Create it with :meth:`open`, which brings the schema up to date and checks that the index
    was built with the given models; close it with :meth:`close` or ``async with``.

    Args:
        pool: an open connection pool whose connections have pgvector's types registered.
        models: the models the index was opened with.
        ef_search: the HNSW candidate list size for searches; each search raises it to what its
            ``k`` (and, for the image search, the excluded patient's cases) needs.
        analyze_every: run ``ANALYZE`` on a table once this many rows were upserted into it
            since the last ``ANALYZE``, so the planner sees the table's real size.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        models: IndexModels,
        *,
        ef_search: int = 40,
        analyze_every: int = 1000,
    ) -> None:
        _check_settings(ef_search, analyze_every)
        super().__init__(pool)
        self._models = models
        self._ef_search = ef_search
        self._analyze_every = analyze_every
        self._unanalyzed = {"cases": 0, "passages": 0}

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        image_model: str,
        image_dim: int,
        text_model: str,
        text_dim: int,
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
            lab_panel: id of the lab panel behind the lab profiles; the current
                :data:`core.labs.LAB_PANEL` (:func:`adapters.store.schema.lab_panel_id`) when
                ``None``.
            lab_dim: the lab profile's length.
            hnsw: HNSW build parameters for indexes created now; pgvector's defaults
                (``m=16, ef_construction=64``) when ``None``.
            ef_search: the HNSW candidate list size for searches (1-1000; raised per query to
                what its ``k`` needs).
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
            ...     text_model="all-MiniLM-L6-v2", text_dim=384,
            ... )
        """
        _check_settings(ef_search, analyze_every)
        models = IndexModels(
            image_model=image_model,
            image_dim=image_dim,
            text_model=text_model,
            text_dim=text_dim,
            lab_panel=lab_panel if lab_panel is not None else lab_panel_id(),
            lab_dim=lab_dim,
        )
        # The vector type must exist before pooled connections can register it, so the schema
        # is migrated on a connection of its own first.
        async with await _connect(dsn, connect_timeout) as conn:
            await migrate(conn, models, hnsw)
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
        return cls(pool, models, ef_search=ef_search, analyze_every=analyze_every)

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
        """The models and dimensions this index was built with."""
        return self._models

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
        """Update the planner's statistics of both tables now (after loading many rows).

        Raises:
            SourceUnavailable: ``"index database"`` when the database cannot be reached.
        """
        async with self._transaction(_DATABASE) as conn:
            await conn.execute("ANALYZE cases")
            await conn.execute("ANALYZE passages")
        self._unanalyzed = {"cases": 0, "passages": 0}

    async def upsert_cases(self, cases: Sequence[IndexedCase]) -> None:
        """Insert or replace cases by ``case_id``, all of them in one transaction.

        A case without labs is stored with no lab vector and 0 measured tests, so the lab
        search never returns it.

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
                None
                if case.labs is None
                else _vector(case.labs.vector, lab_dim, f"case {i}: labs"),
                0 if case.labs is None else case.labs.measured_count,
            )
            for i, case in enumerate(cases)
        ]
        async with self._transaction(_CASES) as conn, conn.cursor() as cursor:
            await cursor.executemany(_UPSERT_CASE, rows)
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
                returned.

        Returns:
            ``(case, cosine similarity)`` pairs, most similar first.

        Raises:
            ValueError: for a query of the wrong shape, non-finite or all zeros, or a bad ``k``.
            SourceUnavailable: ``"case index"`` when the database cannot be reached.
        """
        _check_k(k)
        vector = _vector(query, self._models.image_dim, "image query", directional=True)
        async with self._transaction(_CASES) as conn:
            # The excluded patient's cases may all be among the HNSW candidates and are
            # filtered out after the scan: widen the scan by their number (a B-tree count).
            await conn.execute(
                _EF_SEARCH_EXCLUDING,
                {
                    "max_ef_search": MAX_EF_SEARCH,
                    "ef_search": self._ef_search,
                    "k": k,
                    "patient": exclude_patient,
                },
            )
            cursor = await conn.execute(
                _NEAREST_BY_IMAGE, {"query": vector, "patient": exclude_patient, "k": k}
            )
            rows = await cursor.fetchall()
        return [(CaseRecord(c, p, s, tuple(f), v), float(score)) for c, p, s, f, v, score in rows]

    async def nearest_by_findings(
        self, query: Vector, *, k: int, exclude_patient: str
    ) -> list[tuple[CaseRecord, float]]:
        """Cases whose recorded findings' embedding is closest to a text embedding by cosine
        distance (an order's reason, embedded by the image model's text tower).

        No index covers ``findings_embedding``, so the search is an exact scan of the cases;
        it widens ``ef_search`` like :meth:`nearest_by_image` all the same, so that it stays
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
        _check_k(k)
        vector = _vector(query, self._models.image_dim, "findings query", directional=True)
        async with self._transaction(_CASES) as conn:
            await conn.execute(
                _EF_SEARCH_EXCLUDING,
                {
                    "max_ef_search": MAX_EF_SEARCH,
                    "ef_search": self._ef_search,
                    "k": k,
                    "patient": exclude_patient,
                },
            )
            cursor = await conn.execute(
                _NEAREST_BY_FINDINGS, {"query": vector, "patient": exclude_patient, "k": k}
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

    async def upsert_passages(self, passages: Sequence[Passage], vectors: Vector) -> None:
        """Insert or replace passages by ``passage_id`` with their dense vectors, in one
        transaction.

        Args:
            passages: the passages; a ``passage_id`` given twice keeps the later one.
            vectors: their embeddings, shape ``(len(passages), text_dim)``, row ``i`` for
                passage ``i``.

        Raises:
            ValueError: when the vectors do not match the passages or the text model's
                dimension, or are non-finite or all zeros (nothing is written).
            SourceUnavailable: ``"literature index"`` when the database cannot be reached.
        """
        matrix = np.asarray(vectors, dtype=np.float32)
        text_dim = self._models.text_dim
        if matrix.shape != (len(passages), text_dim):
            raise ValueError(
                f"vectors must have shape ({len(passages)}, {text_dim}) for "
                f"{len(passages)} passages, got {matrix.shape}"
            )
        if not passages:
            return
        rows = [
            (
                p.passage_id,
                p.pmid,
                p.section,
                p.year,
                p.title,
                p.text,
                _vector(matrix[i], text_dim, f"passage {p.passage_id}", directional=True),
            )
            for i, p in enumerate(passages)
        ]
        async with self._transaction(_LITERATURE) as conn, conn.cursor() as cursor:
            await cursor.executemany(_UPSERT_PASSAGE, rows)
        await self._note_upserted("passages", len(rows), _LITERATURE)

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
        return [
            (Passage(passage_id=i, pmid=p, text=t, section=s, year=y, title=ti), float(score))
            for i, p, t, s, y, ti, score in rows
        ]
