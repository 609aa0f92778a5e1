"""The JWT replay memory in PostgreSQL, shared like the service processes behind a load balancer
share it: each guard here has its own connection pool, as each process would.

Against the real embedded PostgreSQL, with real keys and JWTs for the authenticator tests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import AsyncConnection, sql

from adapters.store.embedded import EmbeddedPostgres
from adapters.store.replay_guard import PostgresReplayGuard
from adapters.store.schema import IndexModels, migrate
from cds_hooks.auth import AuthenticationError, Authenticator, TrustedClient
from cds_hooks.replay import ReplayGuardUnavailable
from tests.cds_hooks.keys import Signer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MODELS = IndexModels(image_model="image-a", image_dim=8, text_model="text-a", text_dim=16)
AUD = "https://cds.test/cds-services/svc"


@pytest.fixture
async def dsn(database: str) -> str:
    """The module's database, migrated, with no JWT id remembered."""
    async with await AsyncConnection.connect(database) as conn:
        await migrate(conn, MODELS)
        await conn.execute("DELETE FROM seen_jwt_ids")
        await conn.commit()
    return database


@pytest.fixture
async def guards(dsn: str) -> AsyncIterator[tuple[PostgresReplayGuard, PostgresReplayGuard]]:
    """Two guards on the one database, as two service processes would have."""
    async with (
        await PostgresReplayGuard.open(dsn) as first,
        await PostgresReplayGuard.open(dsn) as second,
    ):
        yield first, second


async def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    async with await AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(query)
        return await cursor.fetchall()


def _later(seconds: float = 300) -> float:
    return time.time() + seconds


async def test_second_use_is_refused_by_any_guard(guards: tuple[PostgresReplayGuard, ...]) -> None:
    first, second = guards
    assert await first.first_use("iss", "j1", _later())
    assert not await first.first_use("iss", "j1", _later())
    assert not await second.first_use("iss", "j1", _later())
    assert await second.first_use("other-iss", "j1", _later())


async def test_concurrent_uses_across_guards_let_exactly_one_through(
    guards: tuple[PostgresReplayGuard, ...],
) -> None:
    first, second = guards
    uses = [guard.first_use("iss", "contended", _later()) for guard in (first, second) * 4]
    assert sorted(await asyncio.gather(*uses)) == [False] * 7 + [True]


async def test_expired_rows_are_reused_only_past_the_clock_margin(dsn: str) -> None:
    async with await PostgresReplayGuard.open(dsn, clock_margin_s=60) as guard:
        assert await guard.first_use("iss", "recent", _later(-30))
        assert await guard.first_use("iss", "old", _later(-90))
        # Expired 30 s ago: within the margin, a host whose clock lags may still accept it.
        assert not await guard.first_use("iss", "recent", _later())
        assert await guard.first_use("iss", "old", _later())  # the issuer reused a dead jti
        assert not await guard.first_use("iss", "old", _later())


async def test_expired_rows_are_purged_once_per_interval(dsn: str) -> None:
    async with await PostgresReplayGuard.open(dsn) as opened:
        pool = opened._pool  # the guard under test gets a clock of its own
        now = [0.0]
        guard = PostgresReplayGuard(
            pool, clock_margin_s=0, purge_interval_s=60, clock=lambda: now[0]
        )
        for i in range(3):
            assert await guard.first_use("iss", f"dead-{i}", _later(-1))
        assert await guard.first_use("iss", "alive", _later())
        assert len(await _rows(dsn, "SELECT jti FROM seen_jwt_ids")) == 4
        now[0] = 59.0
        assert await guard.first_use("iss", "alive-2", _later())
        assert len(await _rows(dsn, "SELECT jti FROM seen_jwt_ids")) == 5
        now[0] = 60.0
        assert await guard.first_use("iss", "alive-3", _later())
        remaining = await _rows(dsn, "SELECT jti FROM seen_jwt_ids ORDER BY jti")
        assert remaining == [("alive",), ("alive-2",), ("alive-3",)]


async def test_replay_across_two_authenticators_sharing_the_database(
    guards: tuple[PostgresReplayGuard, ...],
) -> None:
    signer = Signer("ES384")
    client = {signer.iss: TrustedClient(iss=signer.iss, jwks=signer.jwks)}
    token = f"Bearer {signer.token(AUD)}"
    async with httpx.AsyncClient() as http:
        one, two = (Authenticator(client, http=http, replay_guard=g) for g in guards)
        await one.authenticate(token, AUD)
        with pytest.raises(AuthenticationError, match="replayed jti"):
            await two.authenticate(token, AUD)
        racing = f"Bearer {signer.token(AUD)}"
        results = await asyncio.gather(
            one.authenticate(racing, AUD), two.authenticate(racing, AUD), return_exceptions=True
        )
    assert sorted(type(r).__name__ for r in results) == ["AuthenticationError", "VerifiedClient"]


async def test_forged_token_does_not_burn_the_jti_in_the_database(
    guards: tuple[PostgresReplayGuard, ...], dsn: str
) -> None:
    signer = Signer("ES384")
    forger = Signer("ES384", kid=signer.kid, iss=signer.iss)
    client = {signer.iss: TrustedClient(iss=signer.iss, jwks=signer.jwks)}
    jti = str(uuid.uuid4())
    async with httpx.AsyncClient() as http:
        one, two = (Authenticator(client, http=http, replay_guard=g) for g in guards)
        with pytest.raises(AuthenticationError, match="Signature verification failed"):
            await one.authenticate(f"Bearer {forger.token(AUD, jti=jti)}", AUD)
        assert await _rows(dsn, "SELECT jti FROM seen_jwt_ids") == []
        await two.authenticate(f"Bearer {signer.token(AUD, jti=jti)}", AUD)
    expiry = await _rows(dsn, "SELECT issuer, jti, expires_at FROM seen_jwt_ids")
    assert [(issuer, j) for issuer, j, _ in expiry] == [(signer.iss, jti)]
    # Remembered until exp plus the leeway (60 s by default), exp being iat + 300 s.
    assert abs(expiry[0][2].timestamp() - (time.time() + 360)) < 10


async def test_a_database_without_the_table_or_unreachable_is_refused(
    postgres: EmbeddedPostgres,
) -> None:
    name = f"bare_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with pytest.raises(ReplayGuardUnavailable, match="no seen_jwt_ids table"):
            await PostgresReplayGuard.open(postgres.dsn_for(name))
    finally:
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    with pytest.raises(ReplayGuardUnavailable, match="replay guard database"):
        await PostgresReplayGuard.open(postgres.dsn_for(name), connect_timeout=1)


async def test_a_lost_database_refuses_the_token(postgres: EmbeddedPostgres) -> None:
    name = f"doomed_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    async with await AsyncConnection.connect(postgres.dsn_for(name)) as conn:
        await migrate(conn, MODELS)
    signer = Signer("ES384")
    client = {signer.iss: TrustedClient(iss=signer.iss, jwks=signer.jwks)}
    async with (
        await PostgresReplayGuard.open(postgres.dsn_for(name), connect_timeout=1) as guard,
        httpx.AsyncClient() as http,
    ):
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        auth = Authenticator(client, http=http, replay_guard=guard)
        with pytest.raises(AuthenticationError, match="replay check unavailable"):
            await auth.authenticate(f"Bearer {signer.token(AUD)}", AUD)
