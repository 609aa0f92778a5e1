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
