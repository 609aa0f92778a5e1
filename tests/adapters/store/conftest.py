"""The store runs on two deployments: every test here that uses a database runs on both."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", params=["embedded", "server"])
def deployment(request: pytest.FixtureRequest) -> str:
    """The embedded pgserver (PostgreSQL 16, pgvector 0.6.2) and a PostgreSQL 15 server with
    pgvector 0.8.0 (``tests/peers/postgres.py``)."""
    return str(request.param)
