"""Refusing a replayed JWT: each ``(iss, jti)`` pair is accepted once within its lifetime.

CDS Hooks gives every authentication JWT a ``jti``, "a nonce ... used to protect against replay
attacks". A captured token would otherwise be accepted again until it expires. The
:class:`cds_hooks.auth.Authenticator` therefore asks a :class:`ReplayGuard`, once a token is
fully verified, whether its pair was seen before; the guard remembers each pair until the time
after which the token would be refused as expired anyway, so its memory is bounded by the
longest token lifetime the service accepts.

:class:`MemoryReplayGuard` remembers in the process: enough for one process and for tests.
Several processes behind a load balancer must share one memory, or a token refused by one
would be accepted by the next; the deployment uses the PostgreSQL guard
(:mod:`adapters.store.replay_guard`) for that.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["MemoryReplayGuard", "ReplayGuard", "ReplayGuardUnavailable"]


class ReplayGuardUnavailable(Exception):
    """The guard cannot tell whether a pair is new; the token must then be refused."""


class ReplayGuard(Protocol):
    """Remembers which ``(issuer, jti)`` pairs were used, each until its expiry."""

    async def first_use(self, issuer: str, jti: str, expires_at: float) -> bool:
        """Record a use of ``(issuer, jti)``.

        Args:
            issuer: the verified ``iss`` of the token.
            jti: its ``jti``.
            expires_at: seconds since the epoch after which the token is refused as expired;
                the pair is remembered at least until then.

        Returns:
            ``True`` the first time the pair is seen before its expiry, ``False`` on every
            later use (a replay).

        Raises:
            ReplayGuardUnavailable: the guard cannot record the use.
        """
        ...


class MemoryReplayGuard:
    """A :class:`ReplayGuard` in this process's memory.

    Args:
        max_entries: the most pairs remembered at once. When that many unexpired pairs are held,
            a new one is refused (:class:`ReplayGuardUnavailable`) rather than an old one
            forgotten, which would let its token be replayed.
        clock: seconds since the epoch.

    Examples:
        >>> import asyncio
        >>> guard = MemoryReplayGuard()
        >>> later = time.time() + 60
        >>> asyncio.run(guard.first_use("https://ehr.example", "n-1", later))
        True
    """

    def __init__(self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.time):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._max_entries = max_entries
        self._clock = clock
        self._expiry: dict[tuple[str, str], float] = {}
        # Ordered by expiry, so that purging touches only the expired pairs.
        self._by_expiry: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        while self._by_expiry and self._by_expiry[0][0] <= now:
            _, issuer, jti = heapq.heappop(self._by_expiry)
            del self._expiry[(issuer, jti)]

    async def first_use(self, issuer: str, jti: str, expires_at: float) -> bool:
        """See :meth:`ReplayGuard.first_use`; the pair is remembered until ``expires_at``."""
        # No await in here: on one event loop, check and record cannot interleave.
        self._purge(self._clock())
        if (issuer, jti) in self._expiry:
            return False
        if len(self._expiry) >= self._max_entries:
            raise ReplayGuardUnavailable(
                f"in-memory replay guard full ({self._max_entries} unexpired JWT ids)"
            )
        self._expiry[(issuer, jti)] = expires_at
        heapq.heappush(self._by_expiry, (expires_at, issuer, jti))
        return True
