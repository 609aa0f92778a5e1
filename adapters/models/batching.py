"""Micro-batching: concurrent requests for one model share one inference run.

Why it exists: a CDS Hooks service embeds small things at once (one query text, the images of one
patient) for many clinicians in parallel. One graph run on a batch of 32 costs far less than 32
runs of one, most of all on a GPU, and running a model concurrently with itself only makes the
runs compete for the same cores. A :class:`MicroBatcher` gathers the items of concurrent callers
until ``max_batch`` items wait or ``max_wait_ms`` has passed since the first of them, runs the
model once on them in a worker thread (one batch at a time), and hands each caller exactly its own
results, in order. A failing batch fails only its own callers; a cancelled caller leaves the others
alone.

The batcher belongs to one event loop at a time; between uses, when nothing is waiting or running,
it follows the loop that uses it next (tests run one ``asyncio.run`` after another).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

__all__ = ["BatchSettings", "BatcherClosed", "MicroBatcher"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """The batcher was closed before this caller's items were run."""


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """How a model's concurrent requests are gathered into batches.

    Args:
        max_batch: the most items one run takes; larger submissions are split.
        max_wait_ms: how long the first waiting item waits for others before its batch runs;
            the latency a lone request pays for batching.

    Raises:
        ValueError: ``max_batch`` below 1 or ``max_wait_ms`` negative.

    Example:
        >>> BatchSettings(max_batch=16, max_wait_ms=5.0).max_batch
        16
    """

    max_batch: int = 32
    max_wait_ms: float = 2.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


class _Request(Generic[T, R]):
    """One caller's items, their results as they arrive, and the future the caller awaits."""

    __slots__ = ("future", "items", "remaining", "results")

    def __init__(self, items: list[T], future: asyncio.Future[list[R]]) -> None:
        self.items = items
        self.future = future
        self.results: list[R | None] = [None] * len(items)
        self.remaining = len(items)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(slots=True)
class _Slice(Generic[T, R]):
    """Items ``start:stop`` of a request, waiting or in one batch."""

    request: _Request[T, R]
    start: int
    stop: int
    enqueued: float


class MicroBatcher(Generic[T, R]):
    """Gathers concurrent submissions into batches for a synchronous batch function.

    Args:
        fn: computes one result per item for a list of at most ``max_batch`` items, in order;
            runs in a worker thread, never concurrently with itself.
        max_batch: the most items per call of ``fn``.
        max_wait_ms: how long the first waiting item waits for more before its batch runs.
        name: names the batcher in logs (a graph file name; never data).

    Raises:
        ValueError: ``max_batch`` below 1 or ``max_wait_ms`` negative.

    Example:
        >>> batcher = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=32, max_wait_ms=2)
        >>> asyncio.run(batcher.submit([1, 2, 3]))
        [2, 4, 6]
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        name: str = "batcher",
    ) -> None:
        settings = BatchSettings(max_batch=max_batch, max_wait_ms=max_wait_ms)
        self._fn = fn
        self._max_batch = settings.max_batch
        self._max_wait = settings.max_wait_ms / 1000.0
        self._name = name
        # Held while fn runs: one batch at a time even if a worker outlives a cancelled loop.
        self._fn_lock = threading.Lock()
        self._pending: deque[_Slice[T, R]] = deque()
        self._waiting = 0
        self._running: list[_Slice[T, R]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._full: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_settings(
        cls, fn: Callable[[list[T]], Sequence[R]], settings: BatchSettings, *, name: str = "batcher"
    ) -> MicroBatcher[T, R]:
        """A batcher with the limits of ``settings``."""
        return cls(fn, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms, name=name)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def submit(self, items: Sequence[T]) -> list[R]:
        """The results of ``items``, computed in batches with other callers' items.

        Args:
            items: this caller's items; more than ``max_batch`` are split over several batches.

        Returns:
            One result per item, in order.

        Raises:
            BatcherClosed: the batcher was closed before the items were run.
            RuntimeError: another event loop is using the batcher right now.
            Exception: whatever ``fn`` raised for a batch holding some of these items (the
                same exception object), or :class:`ValueError` when it returned the wrong number
                of results.
        """
        if self._closed:
            raise BatcherClosed(f"{self._name} is closed")
        if not items:
            return []
        loop = asyncio.get_running_loop()
        self._bind(loop)
        request: _Request[T, R] = _Request(list(items), loop.create_future())
        now = loop.time()
        for start in range(0, len(request.items), self._max_batch):
            stop = min(start + self._max_batch, len(request.items))
            self._pending.append(_Slice(request, start, stop, now))
        self._waiting += len(request.items)
        if self._waiting >= self._max_batch:
            self._wake()
        if self._worker is None:
            self._worker = loop.create_task(self._work(), name=f"micro-batcher {self._name}")
        # A cancelled caller cancels its future; the worker then skips its waiting items.
        return await request.future

    def close(self) -> None:
        """Refuse new submissions and fail every caller still waiting with
        :class:`BatcherClosed`; a batch already running completes for its callers.

        Call it from the event loop that uses the batcher.
        """
        if self._closed:
            return
        self._closed = True
        error = BatcherClosed(f"{self._name} was closed before these items were run")
        while self._pending:
            self._pending.popleft().request.fail(error)
        self._waiting = 0
        self._wake()

    async def aclose(self) -> None:
        """:meth:`close`, then wait for the running batch to finish, so that the model is not
        torn down under it."""
        self.close()
        worker = self._worker
        if worker is not None and worker.get_loop() is asyncio.get_running_loop():
            await asyncio.gather(worker, return_exceptions=True)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        if self._worker is not None and not self._loop_closed():
            raise RuntimeError(f"{self._name} is in use by another event loop")
        # Idle, or its previous loop is gone: follow the new loop with fresh loop-bound state.
        self._loop, self._full, self._worker = loop, asyncio.Event(), None
        self._pending.clear()
        self._waiting = 0

    def _loop_closed(self) -> bool:
        return self._loop is None or self._loop.is_closed()

    def _wake(self) -> None:
        if self._full is not None:
            self._full.set()

    async def _work(self) -> None:
        """Run batches while items wait; the task ends when none are left."""
        loop = asyncio.get_running_loop()
        full = self._full
        assert full is not None  # set by _bind before the worker starts
        try:
            while True:
                self._drop_abandoned()
                if not self._pending:
                    return
                deadline = self._pending[0].enqueued + self._max_wait
                if self._waiting < self._max_batch and not self._closed and deadline > loop.time():
                    # Clearing is safe here: the event is only set when a batch is full or the
                    # batcher closes, and neither holds right now.
                    full.clear()
                    try:
                        async with asyncio.timeout_at(deadline):
                            await full.wait()
                    except TimeoutError:
                        pass
                    # Look again: callers may have been cancelled while the batch filled.
                    continue
                await self._run(self._take())
        finally:
            # Reached on normal exit and when the loop cancels the worker at shutdown; callers
            # left behind must not wait forever.
            error = BatcherClosed(f"{self._name} stopped before these items were run")
            for part in (*self._running, *self._pending):
                part.request.fail(error)
            self._running = []
            self._pending.clear()
            self._waiting = 0
            self._worker = None

    def _drop_abandoned(self) -> None:
        """Forget the items of callers that were cancelled or already failed."""
        if any(part.request.future.done() for part in self._pending):
            kept = [part for part in self._pending if not part.request.future.done()]
            self._pending = deque(kept)
            self._waiting = sum(part.stop - part.start for part in kept)

    def _take(self) -> list[_Slice[T, R]]:
        """Up to ``max_batch`` waiting items, oldest first, splitting a slice if need be."""
        batch: list[_Slice[T, R]] = []
        room = self._max_batch
        while self._pending and room:
            part = self._pending[0]
            size = part.stop - part.start
            if size <= room:
                batch.append(self._pending.popleft())
                room -= size
            else:
                batch.append(_Slice(part.request, part.start, part.start + room, part.enqueued))
                part.start += room
                room = 0
        self._waiting -= self._max_batch - room
        return batch

    async def _run(self, batch: list[_Slice[T, R]]) -> None:
        items = [item for part in batch for item in part.request.items[part.start : part.stop]]
        # Kept while the batch runs, so that a worker cancelled at loop shutdown fails these
        # callers too (in _work's finally) instead of leaving them waiting.
        self._running = batch
        try:
            results = await asyncio.to_thread(self._call, items)
        except Exception as error:  # noqa: BLE001 - handed to the callers, who see the original
            self._running = []
            # Only this batch's callers fail; the worker goes on with the next batch.
            for part in batch:
                part.request.fail(error)
            logger.warning(
                "batch failed",
                extra={"batcher": self._name, "items": len(items), "error": type(error).__name__},
            )
            return
        self._running = []
        if len(results) != len(items):
            mismatch = ValueError(
                f"{self._name}: the batch function returned {len(results)} results "
                f"for {len(items)} items"
            )
            for part in batch:
                part.request.fail(mismatch)
            return
        offset = 0
        for part in batch:
            request, size = part.request, part.stop - part.start
            if not request.future.done():
                request.results[part.start : part.stop] = results[offset : offset + size]
                request.remaining -= size
                if request.remaining == 0:
                    request.future.set_result(cast("list[R]", request.results))
            offset += size

    def _call(self, items: list[T]) -> list[R]:
        with self._fn_lock:
            return list(self._fn(items))
