"""The index database's schema, its versioned migrations, and the models that built the index.

Vectors are only comparable with vectors from the same model, and a ``vector(D)`` column only
holds vectors of one dimension. So the schema is parameterised by the models' dimensions, and the
database records which models (ids and dimensions) filled it. Opening an index with other
models is refused with :class:`IndexModelMismatch` instead of returning meaningless neighbours;
the index must then be dropped (:func:`drop_index`) and ingested again.

Migrations are numbered and applied in order, each once, recorded in ``schema_migrations``.
:func:`migrate` applies the pending ones and checks the recorded models in a single transaction
under an advisory lock, so two processes opening the same database at once cannot both apply a
migration, and a failure leaves the database as it was. Every statement is idempotent
(``IF NOT EXISTS``) as well, so a database whose tables already exist is adopted unchanged.

The SQL is limited to what pgvector 0.6 supports (``vector`` and HNSW), so the same migrations
run on the embedded server (pgvector 0.6.2) and on a current one (0.8). That is why a passage's
learned sparse weights (BGE-M3's lexical weights: token id -> weight) are kept as postings, one
row per (term, passage) in ``passage_terms``, rather than in a ``sparsevec`` column, which
pgvector 0.6 lacks: the sparse search reads the postings of the query's few terms through the
primary key (term first) and sums the products per passage, an exact inner product.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection, sql

from core.labs import LAB_PANEL, LabTest

__all__ = [
    "MAX_DIM",
    "MAX_HNSW_DIM",
    "MIGRATIONS",
    "SPARSE_DIM",
    "HnswParams",
    "IndexModelMismatch",
    "IndexModels",
    "Migration",
    "SchemaVersionError",
    "drop_index",
    "lab_panel_id",
    "migrate",
]

logger = logging.getLogger(__name__)

MAX_HNSW_DIM = 2000
"""The most dimensions pgvector can index with HNSW for the ``vector`` type."""

MAX_DIM = 16000
"""The most dimensions a pgvector ``vector`` column can have."""

SPARSE_DIM = 2**31 - 1
"""Token ids of sparse weights are stored as PostgreSQL ``integer``: ``0 <= id < SPARSE_DIM``.

It is what ``index_models`` records as the sparse model's dimension: the postings do not
depend on the vocabulary's size, so the model id alone decides whether weights are comparable.
"""

# An arbitrary constant that identifies this schema's advisory lock ("medi" in ASCII).
_LOCK_KEY = 0x6D656469


def lab_panel_id(panel: Sequence[LabTest] = LAB_PANEL) -> str:
    """An identifier of a lab panel that changes whenever its lab vectors would change meaning.

    The lab profile vector depends on the panel's tests, their order, units and reference
    ranges; a stored profile is only comparable with a query built from the same panel.

    Args:
        panel: the tests that make up the lab vector.

    Returns:
        ``"lab-panel-"`` followed by 12 hex digits of a digest of the panel.

    Example:
        >>> lab_panel_id() == lab_panel_id(LAB_PANEL)
        True
    """
    spec = ";".join(f"{t.loinc}|{t.unit}|{t.low!r}|{t.high!r}" for t in panel)
    return f"lab-panel-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def _check_dim(name: str, dim: int, limit: int) -> None:
    if not 1 <= dim <= limit:
        raise ValueError(f"{name} must be between 1 and {limit}, got {dim}")


@dataclass(frozen=True, slots=True)
class IndexModels:
    """Which models fill the index, and their vectors' dimensions.

    Args:
        image_model: id of the image/text model behind the cases' image, findings and fused
            vectors.
        image_dim: its embedding dimension (at most 2000: the fused vectors are HNSW-indexed).
        text_model: id of the text model behind the passages' dense vectors.
        text_dim: its embedding dimension (at most 2000).
        lab_panel: id of the lab panel behind the lab profiles (:func:`lab_panel_id`).
        lab_dim: the lab profile's length.
        sparse_model: id of the model behind the passages' sparse weights, or ``None`` for a
            service that searches the literature by dense vectors only. An index whose
            passages have sparse weights can be opened without one (its postings are then
            neither read nor written), but never with another.

    Raises:
        ValueError: for an empty id or a dimension out of range.

    Example:
        >>> models = IndexModels("biomedclip", 512, "bge-m3", 1024, sparse_model="bge-m3")
        >>> sorted(models.by_role())
        ['image', 'labs', 'sparse', 'text']
    """

    image_model: str
    image_dim: int
    text_model: str
    text_dim: int
    lab_panel: str = field(default_factory=lab_panel_id)
    lab_dim: int = len(LAB_PANEL)
    sparse_model: str | None = None

    def __post_init__(self) -> None:
        for name in ("image_model", "text_model", "lab_panel"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        if self.sparse_model is not None and not self.sparse_model.strip():
            raise ValueError("sparse_model must not be empty (None for no sparse model)")
        _check_dim("image_dim", self.image_dim, MAX_HNSW_DIM)
        _check_dim("text_dim", self.text_dim, MAX_HNSW_DIM)
        _check_dim("lab_dim", self.lab_dim, MAX_DIM)

    def by_role(self) -> dict[str, tuple[str, int]]:
        """``{role: (model id, dimension)}`` as recorded in ``index_models``; the ``"sparse"``
        role (with :data:`SPARSE_DIM`) only when there is a sparse model."""
        roles = {
            "image": (self.image_model, self.image_dim),
            "text": (self.text_model, self.text_dim),
            "labs": (self.lab_panel, self.lab_dim),
        }
        if self.sparse_model is not None:
            roles["sparse"] = (self.sparse_model, SPARSE_DIM)
        return roles


@dataclass(frozen=True, slots=True)
class HnswParams:
    """Build parameters of the HNSW indexes; the defaults are pgvector's.

    They apply when an index is created; changing them later leaves existing indexes as built.

    Args:
        m: the most connections per node per layer (2-100): more gives better recall at the
            cost of a larger index and slower inserts.
        ef_construction: the candidate list size while building (4-1000, at least ``2 * m``):
            more gives a better graph at the cost of slower inserts.

    Raises:
        ValueError: for a value out of range.

    Example:
        >>> HnswParams(m=32, ef_construction=128)
        HnswParams(m=32, ef_construction=128)
    """

    m: int = 16
    ef_construction: int = 64

    def __post_init__(self) -> None:
        if not 2 <= self.m <= 100:
            raise ValueError(f"HNSW m must be between 2 and 100, got {self.m}")
        if not max(4, 2 * self.m) <= self.ef_construction <= 1000:
            raise ValueError(
                f"HNSW ef_construction must be between max(4, 2 * m) and 1000, "
                f"got {self.ef_construction} with m = {self.m}"
            )


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema.

    Args:
        version: its position in the order; versions are unique and increasing.
        description: what it does, in words (recorded with the version).
        statements: the idempotent statements for given models and HNSW parameters.
        tables: the index tables it creates, which :func:`drop_index` drops; tables outside the
            index (the card ledger), which a rebuild keeps, are not listed.
    """

    version: int
    description: str
    statements: Callable[[IndexModels, HnswParams], tuple[sql.SQL | sql.Composed, ...]]
    tables: tuple[str, ...]


def _initial(models: IndexModels, hnsw: HnswParams) -> tuple[sql.SQL | sql.Composed, ...]:
    # DDL cannot take bind parameters; these values are validated integers, composed as literals.
    values = {
        "image_dim": sql.Literal(models.image_dim),
        "text_dim": sql.Literal(models.text_dim),
        "lab_dim": sql.Literal(models.lab_dim),
        "m": sql.Literal(hnsw.m),
        "ef_construction": sql.Literal(hnsw.ef_construction),
    }
    return (
        sql.SQL("CREATE EXTENSION IF NOT EXISTS vector"),
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS index_models (
                role text PRIMARY KEY,
                model text NOT NULL,
                dim integer NOT NULL CHECK (dim > 0),
                recorded_at timestamptz NOT NULL DEFAULT now()
            )
            """
        ),
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS cases (
                case_id text PRIMARY KEY,
                patient_ref text NOT NULL,
                study_uid text NOT NULL,
                findings text[] NOT NULL,
                findings_text text NOT NULL,
                provenance text NOT NULL,
                image vector({image_dim}) NOT NULL,
                findings_embedding vector({image_dim}) NOT NULL,
                fused vector({image_dim}) NOT NULL,
                labs vector({lab_dim}),
                labs_measured integer NOT NULL CHECK (labs_measured >= 0),
                updated_at timestamptz NOT NULL DEFAULT now()
            )
            """
        ).format(**values),
        sql.SQL("CREATE INDEX IF NOT EXISTS cases_patient_ref_idx ON cases (patient_ref)"),
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS cases_fused_hnsw_idx ON cases"
            " USING hnsw (fused vector_cosine_ops)"
            " WITH (m = {m}, ef_construction = {ef_construction})"
        ).format(**values),
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS passages (
                passage_id text PRIMARY KEY,
                pmid text NOT NULL,
                section text,
                year text,
                title text,
                text text NOT NULL,
                dense vector({text_dim}) NOT NULL
            )
            """
        ).format(**values),
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS passages_dense_hnsw_idx ON passages"
            " USING hnsw (dense vector_cosine_ops)"
            " WITH (m = {m}, ef_construction = {ef_construction})"
        ).format(**values),
    )


def _ledger(models: IndexModels, hnsw: HnswParams) -> tuple[sql.SQL | sql.Composed, ...]:
    return (
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS issued_cards (
                card_uuid text PRIMARY KEY,
                service_id text NOT NULL,
                hook_instance text NOT NULL,
                client text NOT NULL,
                kind text NOT NULL,
                summary text NOT NULL,
                sources text[] NOT NULL,
                issued_at timestamptz NOT NULL DEFAULT now()
            )
            """
        ),
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS feedback (
                id bigserial PRIMARY KEY,
                card_uuid text NOT NULL,
                service_id text NOT NULL,
                client text NOT NULL,
                outcome text NOT NULL CHECK (outcome IN ('accepted', 'overridden')),
                accepted_suggestions text[] NOT NULL DEFAULT '{}',
                override_system text,
                override_code text,
                override_display text,
                user_comment text,
                outcome_timestamp timestamptz NOT NULL,
                received_at timestamptz NOT NULL DEFAULT now()
            )
            """
        ),
        sql.SQL("CREATE INDEX IF NOT EXISTS feedback_card_idx ON feedback (card_uuid)"),
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS seen_jwt_ids (
                issuer text NOT NULL,
                jti text NOT NULL,
                expires_at timestamptz NOT NULL,
                PRIMARY KEY (issuer, jti)
            )
            """
        ),
        sql.SQL("CREATE INDEX IF NOT EXISTS seen_jwt_ids_expiry_idx ON seen_jwt_ids (expires_at)"),
    )


def _sparse(models: IndexModels, hnsw: HnswParams) -> tuple[sql.SQL | sql.Composed, ...]:
    return (
        sql.SQL("ALTER TABLE passages ADD COLUMN IF NOT EXISTS doi text"),
        # The primary key, term first, serves the search (term = ANY(query terms)) and carries
        # the weight so that the search can read the postings from the index alone.
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS passage_terms (
                term integer NOT NULL CHECK (term >= 0),
                passage_id text NOT NULL REFERENCES passages (passage_id) ON DELETE CASCADE,
                weight real NOT NULL,
                PRIMARY KEY (term, passage_id) INCLUDE (weight)
            )
            """
        ),
        # Replacing a passage's postings, and the cascade from passages, find them by passage.
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS passage_terms_passage_idx ON passage_terms (passage_id)"
        ),
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="cases, passages, and the models that built them",
        statements=_initial,
        tables=("cases", "passages", "index_models"),
    ),
    Migration(
        version=2,
        description="card ledger (issued cards, feedback) and seen JWT ids",
        statements=_ledger,
        # Not part of the index: a rebuild with other models keeps the feedback, the record of
        # the cards it is about, and the JWT ids still inside their lifetime.
        tables=(),
    ),
    Migration(
        version=3,
        description="passages' DOI and sparse weights (postings per term)",
        statements=_sparse,
        tables=("passage_terms",),
    ),
)
"""Every migration, in the order they apply."""


class IndexModelMismatch(RuntimeError):
    """The index was built with other models or dimensions than those it is opened with.

    Its vectors cannot be compared with the new models' vectors: drop the index
    (:func:`drop_index`) and ingest again.

    Args:
        recorded: ``{role: (model id, dimension)}`` the index was built with.
        requested: the same for the models it is being opened with.
    """

    def __init__(
        self, recorded: Mapping[str, tuple[str, int]], requested: Mapping[str, tuple[str, int]]
    ) -> None:
        def describe(role: str, entry: tuple[str, int] | None) -> str:
            if entry is None:
                return "nothing"
            # Sparse weights have no dimension of their own (see SPARSE_DIM).
            return entry[0] if role == "sparse" else f"{entry[0]} ({entry[1]} dims)"

        differences = "; ".join(
            f"{role}: index has {describe(role, recorded.get(role))},"
            f" requested {describe(role, requested.get(role))}"
            for role in sorted(recorded.keys() | requested.keys())
            if recorded.get(role) != requested.get(role)
        )
        super().__init__(
            f"the index was built with other models ({differences}); "
            "rebuild it: drop the index and ingest again"
        )
        self.recorded = dict(recorded)
        self.requested = dict(requested)


class SchemaVersionError(RuntimeError):
    """The database has schema versions this code does not know (a newer release wrote it)."""


async def migrate(
    conn: AsyncConnection[Any], models: IndexModels, hnsw: HnswParams | None = None
) -> tuple[int, ...]:
    """Apply pending migrations and check the models the index was built with.

    Everything happens in one transaction under an advisory lock: on any error nothing changes.
    A new index records ``models``; an existing one must have been built with the same.

    Args:
        conn: a connection to the index database, not inside a transaction; the role needs
            ``CREATE`` on the database's schema, and the right to ``CREATE EXTENSION vector``
            unless the extension is already installed.
        models: the models the index is opened with.
        hnsw: HNSW build parameters for indexes created now (pgvector's defaults when ``None``).

    Returns:
        The versions applied by this call, in order (empty when the schema was up to date).

    Raises:
        IndexModelMismatch: when the index was built with other models or dimensions.
        SchemaVersionError: when the database was migrated by a newer release.
    """
    hnsw = hnsw or HnswParams()
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                description text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        applied = {version for (version,) in await cursor.fetchall()}
        unknown = applied - {m.version for m in MIGRATIONS}
        if unknown:
            raise SchemaVersionError(
                f"the index database has schema versions {sorted(unknown)} that this release "
                f"does not know (it knows up to {MIGRATIONS[-1].version}): use a newer release "
                "or rebuild the index"
            )
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            for statement in migration.statements(models, hnsw):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                (migration.version, migration.description),
            )
            applied_now.append(migration.version)
        await _check_models(conn, models)
    if applied_now:
        logger.info("index schema migrated: applied versions %s", applied_now)
    return tuple(applied_now)


async def _check_models(conn: AsyncConnection[Any], models: IndexModels) -> None:
    """Record ``models`` for the roles not yet recorded, then require the records to match.

    A sparse model recorded in the index but not requested is no mismatch (a dense-only
    service ignores the postings). A sparse model requested for an index that has passages
    but no sparse model is: those passages have no postings, and ingestion, which skips
    passages already indexed, would never add them.
    """
    requested = models.by_role()
    async with conn.cursor() as cursor:
        await cursor.execute("SELECT role, model, dim FROM index_models")
        before = {role: (model, dim) for role, model, dim in await cursor.fetchall()}
        if "sparse" in requested and "sparse" not in before:
            await cursor.execute("SELECT EXISTS (SELECT FROM passages)")
            row = await cursor.fetchone()
            if row is not None and row[0]:
                raise IndexModelMismatch(before, requested)
        await cursor.executemany(
            "INSERT INTO index_models (role, model, dim) VALUES (%s, %s, %s)"
            " ON CONFLICT (role) DO NOTHING",
            [(role, model, dim) for role, (model, dim) in requested.items()],
        )
        await cursor.execute("SELECT role, model, dim FROM index_models")
        recorded = {role: (model, dim) for role, model, dim in await cursor.fetchall()}
    if "sparse" not in requested:
        recorded.pop("sparse", None)
    if recorded != requested:
        raise IndexModelMismatch(recorded, requested)


async def drop_index(conn: AsyncConnection[Any]) -> None:
    """Drop every table of the index, its data and its record of models and migrations.

    For a rebuild with other models: the next :func:`migrate` creates the schema afresh. The
    card ledger (issued cards, feedback, seen JWT ids) is not the index and is kept. The
    ``vector`` extension is left installed (other databases' users may rely on it).

    Args:
        conn: a connection to the index database, not inside a transaction.
    """
    tables = [table for m in reversed(MIGRATIONS) for table in m.tables]
    tables.append("schema_migrations")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        await conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {}").format(
                sql.SQL(", ").join(sql.Identifier(table) for table in tables)
            )
        )
    logger.warning("index dropped: %s", ", ".join(tables))
