"""The in-process replay memory: one use per (issuer, jti) until expiry, bounded, purged."""

import pytest

from cds_hooks.replay import MemoryReplayGuard, ReplayGuardUnavailable

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


async def test_second_use_before_expiry_is_refused():
    guard = MemoryReplayGuard(clock=Clock())
    assert await guard.first_use("iss", "j1", 1100.0)
    assert not await guard.first_use("iss", "j1", 1100.0)
    assert not await guard.first_use("iss", "j1", 5000.0)  # a later expiry does not reopen it


async def test_pairs_are_per_issuer():
    guard = MemoryReplayGuard(clock=Clock())
    assert await guard.first_use("iss-a", "j", 1100.0)
    assert await guard.first_use("iss-b", "j", 1100.0)
    assert not await guard.first_use("iss-b", "j", 1100.0)


async def test_expired_pairs_are_forgotten_and_purged():
    clock = Clock()
    guard = MemoryReplayGuard(clock=clock)
    for i in range(5):
        assert await guard.first_use("iss", f"j{i}", 1010.0 + i)
    clock.now = 1012.0  # j0, j1, j2 have expired (an expiry equal to now is past)
    assert await guard.first_use("iss", "j1", 1100.0)
    assert len(guard) == 3  # j3, j4 and the new j1
    assert not await guard.first_use("iss", "j3", 1100.0)


async def test_a_full_guard_refuses_rather_than_forgets():
    clock = Clock()
    guard = MemoryReplayGuard(max_entries=2, clock=clock)
    assert await guard.first_use("iss", "a", 1010.0)
    assert await guard.first_use("iss", "b", 1020.0)
    with pytest.raises(ReplayGuardUnavailable, match="full"):
        await guard.first_use("iss", "c", 1030.0)
    assert not await guard.first_use("iss", "a", 1010.0)  # still remembered
    clock.now = 1010.0
    assert await guard.first_use("iss", "c", 1030.0)  # room again once "a" expired


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="max_entries"):
        MemoryReplayGuard(max_entries=0)
