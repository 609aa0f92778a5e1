"""The embedded PostgreSQL: start, restart on the same data, sharing, and stopping for real."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import psycopg
import pytest

from adapters.store.embedded import EmbeddedPostgres

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


def _running(pid: int) -> bool:
    """Whether the process exists and has not exited (a stopped server may linger as a zombie
    until it is reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _system_identifier(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    assert row is not None
    return int(row[0])


def test_restart_keeps_the_data_and_close_stops_the_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    with EmbeddedPostgres(data_dir) as pg:
        first_pid = pg.pid
        cluster = _system_identifier(pg.dsn)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (n integer)")
            conn.execute("INSERT INTO kept VALUES (41), (42)")
            conn.execute("CREATE EXTENSION vector")
    assert not _running(first_pid)

    with EmbeddedPostgres(data_dir) as pg:
        assert pg.data_dir == data_dir.resolve()
        assert _system_identifier(pg.dsn) == cluster  # the same cluster, not a new initdb
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT n FROM kept ORDER BY n").fetchall() == [(41,), (42,)]
            distance = conn.execute("SELECT '[1,0]'::vector <=> '[0,1]'::vector").fetchone()
        assert distance == (1.0,)
        second_pid = pg.pid
    assert not _running(second_pid)


def test_handles_in_one_process_share_the_server(tmp_path: Path) -> None:
    first = EmbeddedPostgres(tmp_path / "pgdata")
    second = EmbeddedPostgres(tmp_path / "pgdata")
    pid = first.pid
    try:
        assert second.pid == pid
        first.close()
        first.close()
        with psycopg.connect(second.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        second.close()
    assert not _running(pid)


def test_dsn_for_names_another_database(postgres: EmbeddedPostgres) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS other")
        conn.execute("CREATE DATABASE other")
    with psycopg.connect(postgres.dsn_for("other")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("other",)


_CHILD = textwrap.dedent(
    """
    import sys
    from adapters.store.embedded import EmbeddedPostgres

    pg = EmbeddedPostgres(sys.argv[1])
    print(pg.pid, flush=True)
    sys.stdin.readline()
    pg.close()
    """
)


def test_the_server_runs_while_any_process_holds_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    first = EmbeddedPostgres(data_dir)
    pid = first.pid
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(data_dir)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == str(pid)  # the child joined this server

        first.close()  # the child still holds it
        assert _running(pid)
        again = EmbeddedPostgres(data_dir)  # this process holds it again

        _, errors = child.communicate("done\n", timeout=30)
        assert child.returncode == 0, errors
        assert _running(pid)  # the child let go, but this process holds it
        with psycopg.connect(again.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        again.close()
        assert not _running(pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
