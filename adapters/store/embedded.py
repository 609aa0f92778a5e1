"""An embedded PostgreSQL with pgvector, so the demo and the tests need no database server.

`pgserver <https://github.com/orm011/pgserver>`_ ships PostgreSQL 16 with pgvector as a wheel
and runs it on a unix socket in a local data directory. :class:`EmbeddedPostgres` starts that
server (or joins one already running for the directory), gives its DSN, and stops it when the
last handle closes. The store itself only ever sees the DSN, so the same code runs against a
regular PostgreSQL server.

How the server is shared:

* Within one process, every :class:`EmbeddedPostgres` for the same directory shares one server
  handle; the server is released when the last of them closes.
* Across processes, pgserver records the id of each process that holds the directory in
  ``<data_dir>/.handle_pids.json``. A process that starts on a directory whose server is already
  running joins it; when a process releases its handle, the server is stopped only if no other
  process still holds it. A process that exits without closing is released at interpreter exit
  (``atexit``); one killed outright (``SIGKILL``) stays on the list, and the server then
  outlives the last live process until it is stopped by hand
  (``pg_ctl -D <data_dir> stop``).

When run as root, pgserver runs PostgreSQL as a system user named ``pgserver`` (created if
missing), makes the data directory theirs, and adds read and traverse permission for others on
every parent of the data directory, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from psycopg.conninfo import make_conninfo

with warnings.catch_warnings():
    # pgserver asks platformdirs for a runtime directory at import; without XDG_RUNTIME_DIR
    # (containers, CI) platformdirs warns and falls back to /tmp/runtime-<uid>, which is fine
    # for what pgserver keeps there (a lock file and, for long paths, the socket).
    warnings.simplefilter("ignore", UserWarning)
    from pgserver.postgres_server import PostgresServer

__all__ = ["EmbeddedPostgres"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Shared:
    server: PostgresServer
    handles: int


# One pgserver handle per data directory per process: pgserver tracks holders by process id,
# so two independent handles in one process would stop the server under each other.
_servers: dict[Path, _Shared] = {}
_servers_lock = threading.Lock()


def _acquire(data_dir: Path) -> PostgresServer:
    with _servers_lock:
        shared = _servers.get(data_dir)
        if shared is None:
            started = time.perf_counter()
            # The constructor rather than pgserver.get_server(): get_server returns a cached
            # handle even after this process released it, without registering the process as
            # a holder again, so another process could then stop the server under it.
            server = PostgresServer(data_dir, cleanup_mode="stop")
            logger.info(
                "embedded PostgreSQL ready in %.2f s (pid %s)",
                time.perf_counter() - started,
                server.get_pid(),
            )
            shared = _servers[data_dir] = _Shared(server=server, handles=0)
        shared.handles += 1
        return shared.server


def _release(data_dir: Path) -> None:
    with _servers_lock:
        shared = _servers[data_dir]
        shared.handles -= 1
        if shared.handles == 0:
            del _servers[data_dir]
            shared.server.cleanup()


class EmbeddedPostgres:
    """A PostgreSQL server with pgvector running from a local data directory.

    The server starts when the object is created: the first start on a new directory runs
    ``initdb`` (about a second); a later start on the same directory keeps its data and takes a
    fraction of that, and joining a server that is already running is immediate. Connections go
    through a unix socket; nothing listens on TCP.

    Args:
        data_dir: the PostgreSQL data directory; created (with its parents) if missing.

    Raises:
        subprocess.CalledProcessError: when PostgreSQL fails to start (its log is
            ``<data_dir>/log``).

    Example:
        >>> with EmbeddedPostgres("/tmp/medirag-pgdata") as pg:  # doctest: +SKIP
        ...     print(pg.dsn)
        postgresql://postgres:@/postgres?host=/tmp/medirag-pgdata
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        path = Path(data_dir).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        self._data_dir = path
        self._server = _acquire(path)
        self._closed = False

    @property
    def data_dir(self) -> Path:
        """The absolute path of the data directory."""
        return self._data_dir

    @property
    def dsn(self) -> str:
        """A libpq connection URI for the ``postgres`` database as the ``postgres`` superuser."""
        return self._server.get_uri()

    @property
    def pid(self) -> int:
        """The process id of the PostgreSQL server (its postmaster)."""
        pid = self._server.get_pid()
        if pid is None:
            raise RuntimeError("the embedded PostgreSQL server is not running")
        return pid

    def dsn_for(self, database: str) -> str:
        """A connection string for another database of this server.

        Args:
            database: the database name; it must exist (``CREATE DATABASE``).

        Returns:
            The DSN of :attr:`dsn` with the database replaced, as ``key=value`` pairs.
        """
        return make_conninfo(self.dsn, dbname=database)

    def close(self) -> None:
        """Release this handle; the server stops when no handle in any process holds it.

        Closing twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        _release(self._data_dir)

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
