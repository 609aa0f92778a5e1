"""One answer per hook call: a retried ``hookInstance`` is not computed twice.

EHRs retry calls that time out on their side. The answer to a call is keyed by the calling
client, the service and the ``hookInstance``; a retry that arrives while the first is still
running waits for it, and one that arrives later gets the stored answer. Only successful answers
are kept, so a retry after a 412 (the FHIR server was down) tries again. A retry whose body
differs (other than in its short-lived ``fhirAuthorization``) is not the same call: it is
refused with 409 rather than given another call's answer.

The cache lives in the process, like the service's other per-call state; entries expire after a
while and the oldest are dropped beyond a bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Answer", "HookInstanceCache", "HookInstanceConflict", "call_digest"]


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer to a call: status and JSON body."""

    status: int
    body: dict[str, Any]


class HookInstanceConflict(Exception):
    """The ``hookInstance`` was already used for a different call."""


def call_digest(body: Mapping[str, Any]) -> str:
    """A digest of a call that ignores ``fhirAuthorization``, which a retry may renew.

    Examples:
        >>> a = {"hook": "patient-view", "fhirAuthorization": {"access_token": "1"}}
        >>> b = {"hook": "patient-view", "fhirAuthorization": {"access_token": "2"}}
        >>> call_digest(a) == call_digest(b)
        True
    """
    stable = {k: v for k, v in body.items() if k != "fhirAuthorization"}
    canonical = json.dumps(stable, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class HookInstanceCache:
    """Answers by ``(client, service, hookInstance)``.

    Args:
        ttl_s: how long a successful answer is kept.
        max_entries: the most answers kept; the oldest go first.
        clock: monotonic seconds (for tests).
    """

    def __init__(
        self,
        *,
        ttl_s: float = 600.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._done: OrderedDict[tuple[str, ...], tuple[str, float, Answer]] = OrderedDict()
        self._running: dict[tuple[str, ...], tuple[str, asyncio.Future[Answer]]] = {}

    def _expire(self) -> None:
        now = self._clock()
        while self._done and (
            len(self._done) > self._max or next(iter(self._done.values()))[1] <= now
        ):
            self._done.popitem(last=False)

    async def answer(
        self, key: tuple[str, ...], digest: str, compute: Callable[[], Awaitable[Answer]]
    ) -> Answer:
        """The answer for ``key``: stored, awaited from a running twin, or computed now.

        Raises:
            HookInstanceConflict: ``key`` was used with another ``digest``.
        """
        self._expire()
        if key in self._done:
            stored_digest, _, stored = self._done[key]
            if stored_digest != digest:
                raise HookInstanceConflict
            return stored
        if key in self._running:
            running_digest, future = self._running[key]
            if running_digest != digest:
                raise HookInstanceConflict
            return await asyncio.shield(future)
        mine: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._running[key] = (digest, mine)
        try:
            answer = await compute()
        except asyncio.CancelledError:
            mine.cancel()
            raise
        except Exception as error:
            mine.set_exception(error)
            mine.exception()  # marked retrieved: a twin may not be waiting for it
            raise
        finally:
            del self._running[key]
        mine.set_result(answer)
        if answer.status == 200:
            self._done[key] = (digest, self._clock() + self._ttl, answer)
            self._expire()
        return answer
