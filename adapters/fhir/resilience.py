"""Retries with backoff, and a circuit breaker per server, for the FHIR client.

Two different failures call for two different answers:

* A server that says "not now" (HTTP 429 Too Many Requests, 503 Service Unavailable) is asked
  again, a bounded number of times, after the delay its ``Retry-After`` header gives or else an
  exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter",
  2015). All the attempts and waits of one request share a time budget: a ``Retry-After`` longer
  than what is left fails at once, saying so, instead of sleeping past the caller's deadline.
  Only idempotent reads are retried.
* A server that keeps failing (no connection, timeouts, 5xx, 429 after the retries) is not asked
  for a while: after ``failure_threshold`` consecutive failures its breaker opens and every request
  fails fast; after ``cool_down`` seconds one probe request is let through (half-open), and its
  outcome closes the breaker or opens it again (Nygard, "Release It!", 2nd ed., ch. 5). Answers
  that show a healthy server refusing a request (401, 403, 404) count as successes.

One :class:`BreakerRegistry` holds one breaker per origin (scheme, host, port), shared by every
client made from it, so that all hook calls to a failing EHR learn from each other.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from core.errors import SourceUnavailable

__all__ = [
    "BreakerRegistry",
    "CircuitBreaker",
    "Clock",
    "RetryPolicy",
    "origin_of",
]

Clock = Callable[[], float]
"""Seconds on a monotonic clock (``time.monotonic``); tests pass their own."""

BreakerState = Literal["closed", "open", "half-open"]


def origin_of(url: str) -> str:
    """The origin of a URL, lower-cased: the unit a breaker guards.

    Examples:
        >>> origin_of("HTTPS://EHR.example:8443/fhir/Patient/1")
        'https://ehr.example:8443'
    """
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a read answered 429 or 503 is tried again.

    Args:
        max_attempts: attempts in all, the first included (1 disables retries).
        base_delay: the backoff's first ceiling, in seconds, doubled at each retry.
        max_delay: the most a backoff (not a ``Retry-After``) waits.
        budget: seconds all attempts and waits of one request may take together; ``None`` uses
            the client's per-request timeout.

    Examples:
        >>> policy = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=4.0)
        >>> 0.0 <= policy.backoff(3, random.Random(1)) <= 2.0
        True
    """

    max_attempts: int = 3
    base_delay: float = 0.25
    max_delay: float = 4.0
    budget: float | None = None

    def backoff(self, retry: int, rng: random.Random) -> float:
        """A full-jitter delay before retry number ``retry`` (1 for the first retry)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (retry - 1))
        return rng.uniform(0.0, ceiling)


class CircuitBreaker:
    """Consecutive-failure circuit breaker for one server.

    Args:
        name: what it guards, in words safe to log (the origin).
        failure_threshold: consecutive failures that open it.
        cool_down: seconds it stays open before letting one probe through.
        clock: the monotonic clock.

    Examples:
        >>> now = [0.0]
        >>> breaker = CircuitBreaker("ehr", failure_threshold=2, cool_down=10, clock=lambda: now[0])
        >>> breaker.record_failure(); breaker.record_failure(); breaker.state
        'open'
        >>> now[0] = 10.0
        >>> breaker.before_request(); breaker.state
        'half-open'
        >>> breaker.record_success(); breaker.state
        'closed'
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        cool_down: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self._threshold = failure_threshold
        self._cool_down = cool_down
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """``closed`` (requests flow), ``open`` (they fail fast) or ``half-open`` (one probe)."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half-open" if self._probing else "open"

    def before_request(self) -> None:
        """Let a request through, or refuse it while the breaker is open.

        Raises:
            SourceUnavailable: the breaker is open and cooling down, or half-open with its probe
                still out.
        """
        with self._lock:
            if self._opened_at is None:
                return
            if self._probing:
                raise SourceUnavailable(
                    "FHIR server", "circuit half-open; a probe request is in flight"
                )
            left = self._opened_at + self._cool_down - self._clock()
            if left > 0:
                raise SourceUnavailable(
                    "FHIR server",
                    f"circuit open after {self._failures} consecutive failures; "
                    f"retrying in {left:.0f} s",
                )
            self._probing = True

    def record_success(self) -> None:
        """The server answered (even with a refusal): close the breaker."""
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False

    def release(self) -> None:
        """The request ended without saying anything about the server (it was cancelled, or
        had no token): a half-open breaker lets the next request probe instead."""
        with self._lock:
            self._probing = False

    def record_failure(self) -> None:
        """The server failed: count it, and open (or re-open after a failed probe)."""
        with self._lock:
            self._failures += 1
            if self._probing or self._failures >= self._threshold:
                self._opened_at = self._clock()
            self._probing = False


class BreakerRegistry:
    """One :class:`CircuitBreaker` per origin, made on first use and then shared.

    Args:
        failure_threshold: consecutive failures that open a breaker.
        cool_down: seconds a breaker stays open before a probe.
        clock: the monotonic clock of every breaker.

    Examples:
        >>> registry = BreakerRegistry()
        >>> registry.for_url("https://a.example/fhir") is registry.for_url("https://a.example/x")
        True
    """

    def __init__(
        self, *, failure_threshold: int = 5, cool_down: float = 30.0, clock: Clock = time.monotonic
    ) -> None:
        self._threshold = failure_threshold
        self._cool_down = cool_down
        self._clock = clock
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}

    def for_url(self, url: str) -> CircuitBreaker:
        """The breaker of ``url``'s origin."""
        origin = origin_of(url)
        with self._lock:
            breaker = self._breakers.get(origin)
            if breaker is None:
                breaker = CircuitBreaker(
                    origin,
                    failure_threshold=self._threshold,
                    cool_down=self._cool_down,
                    clock=self._clock,
                )
                self._breakers[origin] = breaker
            return breaker
