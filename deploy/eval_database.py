"""The evaluations' scratch databases: never the service's index.

Both evaluations index their data once in a database of their own, and later runs with the same
data and models reuse it. With ``MEDIRAG_DSN`` the database is created on that server; without
it, in an embedded PostgreSQL under ``<data_dir>/eval/pg``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from adapters.store.embedded import EmbeddedPostgres
from core.errors import SourceUnavailable
from deploy.settings import Settings

__all__ = ["scratch_database"]


@asynccontextmanager
async def scratch_database(settings: Settings, name: str) -> AsyncIterator[str]:
    """The DSN of database ``name``, created if missing, on the evaluation's server.

    A ``MEDIRAG_DSN`` that already names ``name`` is used as it is.

    Args:
        settings: where the server is (``dsn``, else an embedded one in ``data_dir``).
        name: the scratch database.

    Raises:
        SourceUnavailable: ``"evaluation database"`` when the server cannot be reached or the
            database cannot be created.

    Example:
        >>> async with scratch_database(Settings(), "medirag_eval") as dsn:  # doctest: +SKIP
        ...     store = await PgVectorStore.open(dsn, ...)
    """
    async with AsyncExitStack() as stack:
        server = settings.dsn
        if not server:
            server = stack.enter_context(EmbeddedPostgres(settings.data_dir / "eval" / "pg")).dsn
        if conninfo_to_dict(server).get("dbname") == name:
            yield server
            return
        try:
            async with await AsyncConnection.connect(server, autocommit=True) as conn:
                cursor = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if await cursor.fetchone() is None:
                    await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            pass  # another run created it between the check and the CREATE
        except psycopg.Error as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise SourceUnavailable(
                "evaluation database", f"{name} on the server: {reason}"
            ) from error
        yield make_conninfo(server, dbname=name)
