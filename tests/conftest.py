"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    return Path(os.environ.get("MEDIRAG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$MEDIRAG_SHARED_DATA``); tests that need it skip without it."""
    path = _shared_data()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}: see README, 'Data'")
    return path


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (``@pytest.mark.anyio``) run on asyncio, as the service does."""
    return "asyncio"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run in which nothing passed is a failure, even if everything was skipped: CI must not
    go green because its data or its servers were missing."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter is not None else 0
    if exitstatus == pytest.ExitCode.OK and passed == 0:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
