"""A real embedded PostgreSQL with pgvector for the store tests, one database per test module."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from adapters.store.embedded import EmbeddedPostgres


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """One embedded server for the session, stopped at its end."""
    with EmbeddedPostgres(tmp_path_factory.mktemp("pgdata")) as server:
        yield server


@pytest.fixture(scope="module")
def database(postgres: EmbeddedPostgres, request: pytest.FixtureRequest) -> Iterator[str]:
    """The DSN of a fresh database for one test module, dropped after it."""
    module = re.sub(r"\W", "_", request.module.__name__.rsplit(".", 1)[-1])
    name = f"{module}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield postgres.dsn_for(name)
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
