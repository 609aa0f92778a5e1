"""What every PostgreSQL-backed adapter shares: it owns a connection pool and closes it."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

from psycopg_pool import AsyncConnectionPool

__all__ = ["Pooled"]


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
