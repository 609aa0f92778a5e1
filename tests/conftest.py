"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from adapters.store.embedded import EmbeddedPostgres
from tests.peers.postgres import PostgresServer, ServerPostgres, running_postgres

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    return Path(os.environ.get("MEDIRAG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$MEDIRAG_SHARED_DATA``); tests that need it skip without it."""
    path = _shared_data()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}: see README, 'Data'")
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the default models, laid out as the service expects them."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def minilm_dir(models_dir: Path) -> Path:
    """all-MiniLM-L6-v2 (real weights) exported to ONNX by the project's exporter."""
    from adapters.models.export.minilm import export_minilm

    return export_minilm(models_dir / "minilm")


@pytest.fixture(scope="session")
def tiny_dir(models_dir: Path) -> Path:
    """The tiny BiomedCLIP-architecture model, seed 0, exported to ONNX."""
    from adapters.models.export.tiny import build_tiny_biomedclip

    return build_tiny_biomedclip(models_dir / "tiny-biomedclip", seed=0)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (``@pytest.mark.anyio``) run on asyncio, as the service does."""
    return "asyncio"


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A real embedded PostgreSQL with pgvector, one for the session, stopped at its end."""
    with EmbeddedPostgres(tmp_path_factory.mktemp("pgdata")) as server:
        yield server


@pytest.fixture(scope="session")
def server_postgres() -> Iterator[ServerPostgres]:
    """A real PostgreSQL 15 server with pgvector 0.8, one for the session, stopped at its end.

    Fails (never skips) with :class:`tests.peers.postgres.PostgresMissing` when it is not
    installed: `make peers` installs it.
    """
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def deployment() -> str:
    """Which PostgreSQL :func:`database` runs on: ``"embedded"`` (pgserver, pgvector 0.6) or
    ``"server"`` (PostgreSQL 15, pgvector 0.8). The store tests override it to run on both."""
    return "embedded"


@pytest.fixture(scope="module")
def database_server(deployment: str, request: pytest.FixtureRequest) -> PostgresServer:
    """The server of :func:`database`, as :func:`deployment` chooses."""
    if deployment not in ("embedded", "server"):
        raise ValueError(f"unknown deployment {deployment!r}")
    server: PostgresServer = request.getfixturevalue(
        "postgres" if deployment == "embedded" else "server_postgres"
    )
    return server


@pytest.fixture(scope="module")
def database(database_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The DSN of a fresh database for one test module, dropped after it."""
    module = re.sub(r"\W", "_", request.module.__name__.rsplit(".", 1)[-1])
    name = f"{module}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield database_server.dsn_for(name)
    with psycopg.connect(database_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run in which nothing passed is a failure, even if everything was skipped: CI must not
    go green because its data or its servers were missing."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter is not None else 0
    if exitstatus == pytest.ExitCode.OK and passed == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
