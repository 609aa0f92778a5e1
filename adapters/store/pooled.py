"""What every PostgreSQL-backed adapter shares: it owns a connection pool and closes it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

__all__ = ["Pooled", "new_pool"]

Pool = AsyncConnectionPool[AsyncConnection[Any]]


def new_pool(
    dsn: str,
    *,
    name: str,
    max_connections: int,
    connect_timeout: float,
    configure: Callable[[AsyncConnection[Any]], Awaitable[None]] | None = None,
) -> Pool:
    """A pool of at least one connection, checked before each use, not yet open.

    Args:
        dsn: the database.
        name: the pool's name in logs (``medirag-index``).
        max_connections: the most connections it holds.
        connect_timeout: seconds to wait for a connection.
        configure: run on each new connection (``register_vector_async``).
    """
    return AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=max_connections,
        open=False,
        configure=configure,
        check=AsyncConnectionPool.check_connection,
        timeout=connect_timeout,
        name=name,
    )


class Pooled:
    """Owns an async connection pool, closed by :meth:`close` or on leaving ``async with``.

    Args:
        pool: the open pool; this object closes it.
    """

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    async def close(self) -> None:
        """Close the connection pool; the object cannot be used afterwards."""
        await self._pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
