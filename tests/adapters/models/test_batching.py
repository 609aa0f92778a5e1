"""The micro-batcher gathers concurrent submissions into batches, runs one batch at a time, and
gives every caller exactly its own results, or its own batch's error.

No test measures time: batches are made full by counting items (with a wait far longer than any
test) or are released by events the batch function waits on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pytest

from adapters.models.batching import BatcherClosed, BatchSettings, MicroBatcher

T = TypeVar("T")

NEVER_MS = 600_000.0
"""A wait no test reaches: batches in these tests run because they are full."""


class Recorder:
    """A batch function that records its batches and can hold a batch until released."""

    def __init__(self, *, hold_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()
        if not hold_first:
            self.release.set()

    def __call__(self, items: list[int]) -> list[int]:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.batches.append(list(items))
        self.entered.set()
        try:
            if not self.release.wait(timeout=30):
                raise RuntimeError("the test never released the batch")
            return [item * 10 for item in items]
        finally:
            with self._lock:
                self.active -= 1

    async def wait_entered(self) -> None:
        """Wait until a batch is inside the function (it is then held)."""
        await asyncio.to_thread(self.entered.wait, 30)


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        # A guard against a hanging batcher, not an assertion about speed.
        return await asyncio.wait_for(main(), timeout=60)

    return asyncio.run(bounded())


async def started(coroutines: Sequence[Awaitable[T]]) -> list[asyncio.Task[T]]:
    """Tasks for the coroutines, each run up to its first wait (its items are submitted)."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    await asyncio.sleep(0)
    return tasks


def test_concurrent_submits_are_gathered_into_full_batches() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch=4, max_wait_ms=NEVER_MS)

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(batcher.submit([n]) for n in range(8)))

    results = run(main)
    assert results == [[n * 10] for n in range(8)]
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_lone_item_runs_after_the_wait() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch=100, max_wait_ms=1.0)
    assert run(lambda: batcher.submit([1, 2, 3])) == [10, 20, 30]
    assert recorder.batches == [[1, 2, 3]]


def test_a_large_submit_is_split_and_its_results_stay_in_order() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch=4, max_wait_ms=0.0)
    items = list(range(10))
    assert run(lambda: batcher.submit(items)) == [n * 10 for n in items]
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert run(lambda: batcher.submit([])) == []


def test_items_waiting_behind_a_running_batch_share_the_next_one() -> None:
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder, max_batch=8, max_wait_ms=0.0)

    async def main() -> list[list[int]]:
        first = asyncio.ensure_future(batcher.submit([1]))
        await recorder.wait_entered()
        later = await started([batcher.submit([2]), batcher.submit([3, 4]), batcher.submit([5])])
        recorder.release.set()
        return [await first, *[await task for task in later]]

    assert run(main) == [[10], [20], [30, 40], [50]]
    assert recorder.batches == [[1], [2, 3, 4, 5]]
    assert recorder.most_active == 1


def test_the_function_never_runs_concurrently_with_itself() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch=2, max_wait_ms=0.0)

    async def main() -> None:
        await asyncio.gather(*(batcher.submit([n, n + 1, n + 2]) for n in range(0, 60, 3)))

    run(main)
    assert sum(len(batch) for batch in recorder.batches) == 60
    assert recorder.most_active == 1


def test_an_error_fails_only_the_callers_of_its_batch() -> None:
    error = ValueError("graph failed")

    def fails_on_seven(items: list[int]) -> list[int]:
        if 7 in items:
            raise error
        return [item * 10 for item in items]

    batcher = MicroBatcher(fails_on_seven, max_batch=2, max_wait_ms=NEVER_MS)

    async def main() -> tuple[list[int] | BaseException, ...]:
        return await asyncio.gather(
            batcher.submit([1]),
            batcher.submit([7]),
            batcher.submit([2]),
            batcher.submit([3]),
            return_exceptions=True,
        )

    first, poisoned, third, fourth = run(main)
    assert first is error
    assert poisoned is error
    assert (third, fourth) == ([20], [30])


def test_a_split_submit_fails_when_one_of_its_batches_fails() -> None:
    def fails_on_seven(items: list[int]) -> list[int]:
        if 7 in items:
            raise KeyError(7)
        return items

    batcher = MicroBatcher(fails_on_seven, max_batch=2, max_wait_ms=0.0)
    with pytest.raises(KeyError):
        run(lambda: batcher.submit([1, 2, 7, 8, 9]))
    assert run(lambda: batcher.submit([1, 2, 3])) == [1, 2, 3]


def test_a_wrong_number_of_results_is_an_error_for_the_batch() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda items: items[:-1], max_batch=4, max_wait_ms=0.0, name="short"
    )
    with pytest.raises(ValueError, match="short: the batch function returned 1 results for 2"):
        run(lambda: batcher.submit([1, 2]))


def test_a_cancelled_caller_leaves_the_others_alone() -> None:
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder, max_batch=8, max_wait_ms=0.0)

    async def main() -> tuple[list[int], list[int], bool, bool]:
        running = asyncio.ensure_future(batcher.submit([1, 2]))
        await recorder.wait_entered()
        waiting, abandoned, kept = await started(
            [batcher.submit([3]), batcher.submit([4]), batcher.submit([5])]
        )
        abandoned.cancel()
        # Cancelled while its batch runs: the batch goes on for the others.
        running_alone = asyncio.ensure_future(batcher.submit([6]))
        await asyncio.sleep(0)
        running.cancel()
        recorder.release.set()
        results = (await waiting, await kept)
        await running_alone
        return (*results, abandoned.cancelled(), running.cancelled())

    waiting, kept, abandoned_cancelled, running_cancelled = run(main)
    assert (waiting, kept) == ([30], [50])
    assert abandoned_cancelled
    assert running_cancelled
    # The abandoned caller's item never reached the function.
    assert recorder.batches == [[1, 2], [3, 5, 6]]


def test_close_fails_waiting_callers_and_refuses_new_ones() -> None:
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder, max_batch=8, max_wait_ms=0.0, name="tower")

    async def main() -> tuple[list[int], BaseException | list[int]]:
        running = asyncio.ensure_future(batcher.submit([1]))
        await recorder.wait_entered()
        (waiting,) = await started([batcher.submit([2])])
        batcher.close()
        recorder.release.set()
        outcome = (await asyncio.gather(waiting, return_exceptions=True))[0]
        return await running, outcome

    done, refused = run(main)
    assert done == [10]
    assert isinstance(refused, BatcherClosed)
    assert "tower was closed" in str(refused)
    assert recorder.batches == [[1]]
    assert batcher.closed
    with pytest.raises(BatcherClosed):
        run(lambda: batcher.submit([3]))


def test_aclose_waits_for_the_running_batch() -> None:
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder, max_batch=8, max_wait_ms=0.0)

    async def main() -> tuple[bool, list[int]]:
        running = asyncio.ensure_future(batcher.submit([1]))
        await recorder.wait_entered()
        closing = asyncio.ensure_future(batcher.aclose())
        await asyncio.sleep(0)
        closed_before_release = closing.done()
        recorder.release.set()
        await closing
        return closed_before_release, await running

    closed_before_release, result = run(main)
    assert not closed_before_release
    assert result == [10]


def test_one_batcher_serves_one_event_loop_after_another() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch=4, max_wait_ms=0.0)
    assert run(lambda: batcher.submit([1])) == [10]
    assert run(lambda: batcher.submit([2])) == [20]


def test_settings_are_validated() -> None:
    assert BatchSettings() == BatchSettings(max_batch=32, max_wait_ms=2.0)
    with pytest.raises(ValueError, match="max_batch"):
        BatchSettings(max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        BatchSettings(max_wait_ms=-1.0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(lambda items: items, max_wait_ms=float("nan"))
    batcher: MicroBatcher[int, int] = MicroBatcher.from_settings(
        lambda items: items, BatchSettings(max_batch=3)
    )
    assert run(lambda: batcher.submit([1, 2, 3, 4])) == [1, 2, 3, 4]
