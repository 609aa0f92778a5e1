"""A real PostgreSQL server for tests: Debian's PostgreSQL 15 with pgvector 0.8, a private cluster.

The embedded pgserver the demo uses ships pgvector 0.6.2; a production server runs a current
pgvector (0.8: iterative index scans, ``halfvec``, ``sparsevec``). The store tests run against
both, and this module provides the second: :func:`running_postgres` runs ``initdb`` from
``/usr/lib/postgresql/15/bin`` (Debian ``postgresql-15``; pgvector 0.8.0 is built into it by
``make peers``, see ``deploy/install_pgvector.sh``) in a fresh temporary folder, removed
afterwards, and starts ``postgres`` on that cluster. The server listens on a unix socket in that
folder only (no TCP), and ``pg_hba.conf`` trusts local socket connections and rejects any other.
Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``): a test cluster is
thrown away.

PostgreSQL refuses to run as root: when the tests run as root (containers, CI) the cluster is
made and run by the ``postgres`` user the Debian package creates, and owns its folder (made
directly under the system's temporary directory, since pytest's own folders are private to
root); otherwise by the current user. ``initdb`` and the start take about two seconds; the
context manager waits until the server accepts connections, and on exit stops the process it
started, by its PID: SIGINT (PostgreSQL's fast shutdown, which does not wait for clients to
disconnect), then SIGKILL after 5 s.

Examples:
    >>> # with running_postgres() as server:
    >>> #     store = await PgVectorStore.open(server.dsn, ...)
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psycopg
from psycopg.conninfo import make_conninfo

from tests.peers.process import STOP_GRACE_S

__all__ = [
    "PG_BIN",
    "PostgresFailed",
    "PostgresMissing",
    "PostgresServer",
    "ServerPostgres",
    "running_postgres",
]

PG_MAJOR = 15
PG_BIN = Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")
"""Debian's PostgreSQL 15 programs (``initdb``, ``postgres``)."""

_VECTOR_LIBRARY = Path(f"/usr/lib/postgresql/{PG_MAJOR}/lib/vector.so")
_VECTOR_CONTROL = Path(f"/usr/share/postgresql/{PG_MAJOR}/extension/vector.control")
_SUPERUSER = "postgres"
# The socket's name is .s.PGSQL.<port>; with no TCP listener the port only names the socket.
_PORT = 5432


class PostgresMissing(RuntimeError):
    """PostgreSQL 15 or its pgvector extension is not installed."""


class PostgresFailed(RuntimeError):
    """The server did not start; the message ends with the tail of its log."""


class PostgresServer(Protocol):
    """What the tests' database fixtures need of a server: :class:`ServerPostgres` or
    :class:`adapters.store.embedded.EmbeddedPostgres`."""

    @property
    def dsn(self) -> str:
        """A superuser's connection string for the ``postgres`` database."""
        ...

    def dsn_for(self, database: str) -> str:
        """The same for another database of the server."""
        ...


@dataclass(frozen=True, slots=True)
class ServerPostgres:
    """A running PostgreSQL server.

    Attributes:
        dsn: a libpq connection string for the ``postgres`` database as the ``postgres``
            superuser, through the unix socket.
        pgvector_version: the version of the ``vector`` extension the server offers
            (``pg_available_extensions.default_version``, ``"0.8.0"``).
        process: the postmaster.
        folder: its data directory (``data``), socket and log (``postgres.log``).
    """

    dsn: str
    pgvector_version: str
    process: subprocess.Popen[bytes]
    folder: Path

    def dsn_for(self, database: str) -> str:
        """A connection string for another database of this server (which must exist)."""
        return make_conninfo(self.dsn, dbname=database)

    def stop(self) -> None:
        """Stop the postmaster by its PID (fast shutdown, then SIGKILL); twice is harmless."""
        _stop(self.process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    # Not tests.peers.process.stop_process: SIGTERM is PostgreSQL's smart shutdown, which waits
    # for every client to disconnect.
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _run_as() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as when the tests run as root; ``None`` otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresMissing(
            "running as root, and there is no `postgres` user to run PostgreSQL as: "
            "run `make peers` (Debian package postgresql-15 creates it)"
        ) from None


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _check_installed() -> None:
    missing = [
        str(path)
        for path in (PG_BIN / "initdb", PG_BIN / "postgres", _VECTOR_LIBRARY, _VECTOR_CONTROL)
        if not path.is_file()
    ]
    if missing:
        raise PostgresMissing(
            f"PostgreSQL {PG_MAJOR} with pgvector is not installed ({', '.join(missing)} "
            "missing): run `make peers` (deploy/install_pgvector.sh)"
        )


@contextmanager
def running_postgres(*, start_timeout_s: float = 30.0) -> Iterator[ServerPostgres]:
    """Make a cluster in a new temporary folder and start it; stop it and remove the folder on
    exit.

    Args:
        start_timeout_s: how long to wait for the server to accept connections.

    Yields:
        The running server.

    Raises:
        PostgresMissing: PostgreSQL 15 or pgvector is not installed (run `make peers`).
        PostgresFailed: ``initdb`` failed, or the server exited or did not accept connections
            in time; the message holds the tail of its output.
    """
    _check_installed()
    account = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="medirag-postgres-"))
    try:
        if account is not None:
            os.chown(folder, account.pw_uid, account.pw_gid)
        _initdb(folder, account)
        with _started(folder, account, start_timeout_s) as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _as_account(account: pwd.struct_passwd | None) -> dict[str, object]:
    """``subprocess`` arguments that run a program as ``account`` (as is when ``None``)."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _initdb(folder: Path, account: pwd.struct_passwd | None) -> None:
    result = subprocess.run(
        [
            str(PG_BIN / "initdb"),
            "--pgdata",
            str(folder / "data"),
            "--username",
            _SUPERUSER,
            "--auth-local=trust",
            "--auth-host=reject",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        cwd=folder,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        **_as_account(account),  # type: ignore[call-overload]
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace").splitlines()
        raise PostgresFailed(
            f"initdb exited with status {result.returncode}; its output ends:\n"
            + "\n".join(output[-20:])
        )


@contextmanager
def _started(
    folder: Path, account: pwd.struct_passwd | None, start_timeout_s: float
) -> Iterator[ServerPostgres]:
    """The postmaster on ``folder/data``, accepting connections; stopped on exit."""
    log = folder / "postgres.log"
    settings = {
        "listen_addresses": "",
        "unix_socket_directories": str(folder),
        "port": str(_PORT),
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(folder / "data"), *options],
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            **_as_account(account),  # type: ignore[call-overload]
        )
    dsn = make_conninfo(host=str(folder), port=_PORT, user=_SUPERUSER, dbname="postgres")
    try:
        version = _wait_until_up(process, dsn, start_timeout_s=start_timeout_s, log=log)
        yield ServerPostgres(dsn=dsn, pgvector_version=version, process=process, folder=folder)
    finally:
        _stop(process)


def _wait_until_up(
    process: subprocess.Popen[bytes], dsn: str, *, start_timeout_s: float, log: Path
) -> str:
    """Wait for the server to accept a connection; the vector extension's available version."""
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PostgresFailed(
                f"PostgreSQL exited with status {process.returncode}; its log ends:\n"
                + _log_tail(log)
            )
        try:
            with psycopg.connect(dsn, connect_timeout=1) as conn:
                row = conn.execute(
                    "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
                ).fetchone()
        except psycopg.OperationalError:
            time.sleep(0.05)
            continue
        if row is None:
            raise PostgresMissing(
                "the PostgreSQL server does not offer the vector extension: run `make peers`"
            )
        return str(row[0])
    raise PostgresFailed(
        f"PostgreSQL did not accept connections within {start_timeout_s} s; its log ends:\n"
        + _log_tail(log)
    )
