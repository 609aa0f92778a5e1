"""The JWT replay memory in PostgreSQL, shared by every service process of a deployment.

Behind a load balancer, a replayed token may reach another process than the first use did; a
memory per process would accept it there. :class:`PostgresReplayGuard` implements
:class:`cds_hooks.replay.ReplayGuard` over the ``seen_jwt_ids`` table of the index database
(created by migration 2 of :mod:`adapters.store.schema`, kept across index rebuilds): the
primary key ``(issuer, jti)`` makes the first insert win and every later one conflict, which
PostgreSQL decides atomically whichever process asks.

Rows are purged once expired, now and then, by whichever process comes by; a row that has
expired but is not yet purged is replaced by a new use of its pair, as the memory guard does.
Expiry is judged by the database's clock less a margin, so that service hosts whose clocks run
a little behind the database's never accept a token whose row another process already purged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from adapters.store.pooled import Pooled, new_pool
from cds_hooks.replay import ReplayGuardUnavailable

__all__ = ["PostgresReplayGuard"]

logger = logging.getLogger(__name__)

# The update only fires on a conflict with an expired row, so the row count is 1 exactly when
# the pair is new (or its earlier use has expired) and 0 on a replay.
_FIRST_USE = """
    INSERT INTO seen_jwt_ids (issuer, jti, expires_at)
    VALUES (%(issuer)s, %(jti)s, to_timestamp(%(expires_at)s))
    ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = EXCLUDED.expires_at
    WHERE seen_jwt_ids.expires_at < now() - make_interval(secs => %(margin)s)
"""

_PURGE = "DELETE FROM seen_jwt_ids WHERE expires_at < now() - make_interval(secs => %(margin)s)"


def _reason(error: psycopg.Error) -> str:
    """The first line of a driver error, without the query or its parameters."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class PostgresReplayGuard(Pooled):
    """A :class:`cds_hooks.replay.ReplayGuard` over ``seen_jwt_ids`` in PostgreSQL.

    Create it with :meth:`open`; close it with :meth:`close` or ``async with``.

    Args:
        pool: an open connection pool on a database that has ``seen_jwt_ids``.
        clock_margin_s: how long past its expiry a row is kept: the largest difference
            tolerated between the clocks of the service hosts and of the database.
        purge_interval_s: the shortest time between two purges by this process.
        clock: seconds since the epoch, for the purge schedule only.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        *,
        clock_margin_s: float = 60.0,
        purge_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(pool)
        self._margin = clock_margin_s
        self._purge_interval = purge_interval_s
        self._clock = clock
        self._purged_at = clock()

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        max_connections: int = 4,
        connect_timeout: float = 10.0,
        clock_margin_s: float = 60.0,
        purge_interval_s: float = 60.0,
    ) -> PostgresReplayGuard:
        """Connect to the database and check that it has the ``seen_jwt_ids`` table.

        Args:
            dsn: a libpq connection string or URI of the index database, already migrated
                (:meth:`adapters.store.pgvector_store.PgVectorStore.open` migrates it).
            max_connections: the pool's largest size.
            connect_timeout: seconds to wait for a connection, here and on every later call.
            clock_margin_s: see the class.
            purge_interval_s: see the class.

        Returns:
            The open guard.

        Raises:
            ReplayGuardUnavailable: the database cannot be reached or has no ``seen_jwt_ids``
                (its schema was not migrated).
        """
        pool = new_pool(
            dsn,
            name="medirag-replay-guard",
            max_connections=max_connections,
            connect_timeout=connect_timeout,
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
            async with pool.connection() as conn:
                cursor = await conn.execute("SELECT to_regclass('seen_jwt_ids') IS NOT NULL")
                row = await cursor.fetchone()
        except psycopg.Error as error:
            await pool.close()
            raise ReplayGuardUnavailable(f"replay guard database: {_reason(error)}") from error
        if row is None or not row[0]:
            await pool.close()
            raise ReplayGuardUnavailable(
                "the database has no seen_jwt_ids table: open the index store first, which "
                "migrates the schema"
            )
        return cls(pool, clock_margin_s=clock_margin_s, purge_interval_s=purge_interval_s)

    async def first_use(self, issuer: str, jti: str, expires_at: float) -> bool:
        """See :meth:`cds_hooks.replay.ReplayGuard.first_use`.

        Raises:
            ReplayGuardUnavailable: the database could not be reached or refused the insert.
        """
        purge = self._clock() - self._purged_at >= self._purge_interval
        try:
            async with self._pool.connection() as conn:
                if purge:
                    self._purged_at = self._clock()
                    purged = await conn.execute(_PURGE, {"margin": self._margin})
                    logger.debug("expired JWT ids purged", extra={"rows": purged.rowcount})
                cursor = await conn.execute(
                    _FIRST_USE,
                    {
                        "issuer": issuer,
                        "jti": jti,
                        "expires_at": expires_at,
                        "margin": self._margin,
                    },
                )
                return cursor.rowcount == 1
        except psycopg.Error as error:
            raise ReplayGuardUnavailable(f"replay guard database: {_reason(error)}") from error
