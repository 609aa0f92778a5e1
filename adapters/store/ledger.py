"""The card ledger in PostgreSQL: issued cards, the feedback on them, and its evaluation.

:class:`PgCardLedger` implements the HTTP layer's ``CardLedger`` over the ``issued_cards`` and
``feedback`` tables that migration 2 creates in the index database (the index's
:meth:`~adapters.store.pgvector_store.PgVectorStore.open` applies it; the ledger only checks
that the tables are there). The tables hold card uuids, service ids, client issuers, card kinds,
summaries and the sources the cards showed, and no patient identifier, so the evaluation can be
queried freely. Feedback holds the user's free-text comment, which may name a patient: it is
stored for reading by the researchers who own the database and appears in no report.

Writes happen inside a hook call or a feedback request, so each is bounded in time, and every
database failure (down, timed out, refused) is raised as :class:`core.errors.SourceUnavailable`
(``"card ledger"``): a call still answers its cards when the ledger cannot record them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from adapters.store.pooled import Pooled, new_pool
from core.cards import IssuedCard
from core.errors import SourceUnavailable
from core.feedback import (
    CardFeedback,
    FeedbackReport,
    KindSummary,
    ReasonCount,
    SourceSummary,
    UnknownCards,
)

__all__ = ["PgCardLedger"]

logger = logging.getLogger(__name__)

_LEDGER = "card ledger"

_INSERT_CARD = """
    INSERT INTO issued_cards (card_uuid, service_id, hook_instance, client, kind, summary, sources)
    VALUES (%s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (card_uuid) DO NOTHING
"""

# Cards of this call whose uuid was first recorded for another call: their feedback will be
# attributed to that call's service and client.
_COLLISIONS = """
    SELECT count(*) FROM issued_cards
    WHERE card_uuid = ANY(%(uuids)s)
      AND (service_id <> %(service)s OR client <> %(client)s OR hook_instance <> %(instance)s)
"""

_KNOWN_CARDS = """
    SELECT card_uuid FROM issued_cards
    WHERE card_uuid = ANY(%s) AND service_id = %s AND client = %s
"""

_INSERT_FEEDBACK = """
    INSERT INTO feedback (
        card_uuid, service_id, client, outcome, accepted_suggestions,
        override_system, override_code, override_display, user_comment, outcome_timestamp
    )
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""

# Each card's latest feedback, by when the user acted, then by arrival.
_LATEST = sql.SQL(
    """
    latest AS (
        SELECT DISTINCT ON (card_uuid) card_uuid, outcome, override_system, override_code,
               override_display
        FROM feedback
        ORDER BY card_uuid, outcome_timestamp DESC, id DESC
    )
    """
)

_BY_KIND = sql.SQL(
    """
    WITH {latest},
    reports AS (SELECT card_uuid, count(*) AS n FROM feedback GROUP BY card_uuid)
    SELECT c.service_id, c.kind,
           count(*) AS issued,
           count(l.card_uuid) AS with_feedback,
           coalesce(sum(r.n), 0)::bigint AS feedback,
           count(*) FILTER (WHERE l.outcome = 'accepted') AS accepted,
           count(*) FILTER (WHERE l.outcome = 'overridden') AS overridden
    FROM issued_cards c
    LEFT JOIN latest l USING (card_uuid)
    LEFT JOIN reports r USING (card_uuid)
    GROUP BY c.service_id, c.kind
    ORDER BY c.service_id, c.kind
    """
).format(latest=_LATEST)

_REASONS = sql.SQL(
    """
    WITH {latest}
    SELECT c.service_id, c.kind, l.override_system, l.override_code,
           max(l.override_display) AS display, count(*) AS cards
    FROM issued_cards c JOIN latest l USING (card_uuid)
    WHERE l.outcome = 'overridden'
    GROUP BY c.service_id, c.kind, l.override_system, l.override_code
    ORDER BY c.service_id, c.kind, cards DESC, l.override_system NULLS LAST,
             l.override_code NULLS LAST
    """
).format(latest=_LATEST)

_BY_SOURCE = sql.SQL(
    """
    WITH {latest},
    shown AS (
        SELECT DISTINCT card_uuid, service_id, unnest(sources) AS source FROM issued_cards
    )
    SELECT s.service_id, s.source,
           count(*) AS issued,
           count(*) FILTER (WHERE l.outcome = 'accepted') AS accepted,
           count(*) FILTER (WHERE l.outcome = 'overridden') AS overridden
    FROM shown s LEFT JOIN latest l USING (card_uuid)
    GROUP BY s.service_id, s.source
    ORDER BY s.service_id, issued DESC, s.source
    """
).format(latest=_LATEST)

_TABLES = """
    SELECT to_regclass('issued_cards') IS NOT NULL AND to_regclass('feedback') IS NOT NULL
"""


def _reason(error: BaseException) -> str:
    """The first line of a driver error: what failed, without the query or its parameters."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class PgCardLedger(Pooled):
    """Issued cards and the feedback on them, in the index database.

    Create it with :meth:`open`; close it with :meth:`close` or ``async with``.

    Args:
        pool: an open connection pool on a database whose schema has the ledger tables.
        write_timeout_s: the longest a write may take before it is given up as unavailable.
    """

    def __init__(
        self, pool: AsyncConnectionPool[AsyncConnection[Any]], *, write_timeout_s: float = 1.0
    ) -> None:
        if write_timeout_s <= 0:
            raise ValueError(f"write_timeout_s must be positive, got {write_timeout_s}")
        super().__init__(pool)
        self._write_timeout_s = write_timeout_s

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        max_connections: int = 2,
        connect_timeout: float = 10.0,
        write_timeout_s: float = 1.0,
    ) -> PgCardLedger:
        """Connect to the index database and check that it holds the ledger tables.

        Args:
            dsn: a libpq connection string or URI.
            max_connections: the pool's largest size.
            connect_timeout: seconds to wait for a connection.
            write_timeout_s: the longest a write (inside a hook call or a feedback request)
                may take.

        Returns:
            The open ledger.

        Raises:
            SourceUnavailable: ``"card ledger"`` when the database cannot be reached or has no
                ledger tables (the service creates them when it first opens the index).
            ValueError: for a non-positive ``write_timeout_s``.
        """
        pool = new_pool(
            dsn,
            name="medirag-ledger",
            max_connections=max_connections,
            connect_timeout=connect_timeout,
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
            async with pool.connection() as conn:
                cursor = await conn.execute(_TABLES)
                row = await cursor.fetchone()
        except psycopg.Error as error:
            await pool.close()
            raise SourceUnavailable(_LEDGER, _reason(error)) from error
        if row is None or not row[0]:
            await pool.close()
            raise SourceUnavailable(
                _LEDGER,
                "the database has no card ledger tables; the service creates them when it "
                "first opens the index (`medirag serve` or `medirag demo`)",
            )
        return cls(pool, write_timeout_s=write_timeout_s)

    @asynccontextmanager
    async def _transaction(self, timeout_s: float | None) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection in a transaction; database failures become SourceUnavailable."""
        try:
            async with (
                asyncio.timeout(timeout_s),
                self._pool.connection() as conn,
                conn.transaction(),
            ):
                yield conn
        except TimeoutError as error:
            raise SourceUnavailable(_LEDGER, f"no answer within {timeout_s} s") from error
        except psycopg.Error as error:
            raise SourceUnavailable(_LEDGER, _reason(error)) from error

    async def record_issued(
        self, *, service_id: str, hook_instance: str, client: str, cards: Sequence[IssuedCard]
    ) -> None:
        """Record the cards of one answered call; a card already recorded is left as it is.

        Args:
            service_id: the service called.
            hook_instance: the call's ``hookInstance``.
            client: the authenticated client (the JWT issuer).
            cards: the cards answered; a card without a uuid cannot receive feedback and is
                not recorded.

        Raises:
            SourceUnavailable: ``"card ledger"`` when the database fails or is too slow.
        """
        rows = [
            (
                issued.card.uuid,
                service_id,
                hook_instance,
                client,
                issued.kind,
                issued.card.summary,
                list(issued.sources),
            )
            for issued in cards
            if issued.card.uuid is not None
        ]
        if not rows:
            return
        async with self._transaction(self._write_timeout_s) as conn:
            async with conn.cursor() as cursor:
                await cursor.executemany(_INSERT_CARD, rows)
            cursor = await conn.execute(
                _COLLISIONS,
                {
                    "uuids": [row[0] for row in rows],
                    "service": service_id,
                    "client": client,
                    "instance": hook_instance,
                },
            )
            collided = await cursor.fetchone()
        if collided is not None and collided[0]:
            logger.warning(
                "card uuids already issued for another call; feedback on them goes to it",
                extra={"service": service_id, "cards": collided[0]},
            )

    async def record_feedback(
        self, *, service_id: str, client: str, feedback: Sequence[CardFeedback]
    ) -> None:
        """Record feedback on cards ``service_id`` issued to ``client``, all of it or none.

        Every item is appended, repeats included (the spec lets an EHR report a card more
        than once); the report counts each card once, by its latest feedback.

        Args:
            service_id: the service whose feedback endpoint was called.
            client: the authenticated client (the JWT issuer).
            feedback: the items, in the order the request gave them.

        Raises:
            UnknownCards: some items name cards that ``service_id`` did not issue to ``client``
                (their positions are given); nothing was recorded.
            SourceUnavailable: ``"card ledger"`` when the database fails or is too slow;
                nothing was recorded.
        """
        if not feedback:
            return
        uuids = sorted({item.card_uuid for item in feedback})
        rows = [
            (
                item.card_uuid,
                service_id,
                client,
                item.outcome,
                list(item.accepted_suggestions),
                item.reason_system,
                item.reason_code,
                item.reason_display,
                item.user_comment,
                item.outcome_timestamp,
            )
            for item in feedback
        ]
        async with self._transaction(self._write_timeout_s) as conn:
            cursor = await conn.execute(_KNOWN_CARDS, (uuids, service_id, client))
            known = {card for (card,) in await cursor.fetchall()}
            unknown = tuple(i for i, item in enumerate(feedback) if item.card_uuid not in known)
            if unknown:
                raise UnknownCards(unknown)
            async with conn.cursor() as insert:
                await insert.executemany(_INSERT_FEEDBACK, rows)

    async def report(self) -> FeedbackReport:
        """The evaluation summary: by service and card kind, and by source shown.

        Each card counts once, by its latest feedback (the time the user acted, then arrival);
        the number of feedback reports, repeats included, is given beside it.

        Returns:
            The summary; empty when no card was issued.

        Raises:
            SourceUnavailable: ``"card ledger"`` when the database cannot be reached.
        """
        async with self._transaction(None) as conn:
            kinds = await (await conn.execute(_BY_KIND)).fetchall()
            reasons = await (await conn.execute(_REASONS)).fetchall()
            sources = await (await conn.execute(_BY_SOURCE)).fetchall()
        by_kind: dict[tuple[str, str], list[ReasonCount]] = {}
        for service_id, kind, system, code, display, cards in reasons:
            by_kind.setdefault((service_id, kind), []).append(
                ReasonCount(system=system, code=code, display=display, cards=cards)
            )
        return FeedbackReport(
            kinds=tuple(
                KindSummary(
                    service_id=service_id,
                    kind=kind,
                    issued=issued,
                    with_feedback=with_feedback,
                    feedback=received,
                    accepted=accepted,
                    overridden=overridden,
                    reasons=tuple(by_kind.get((service_id, kind), ())),
                )
                for service_id, kind, issued, with_feedback, received, accepted, overridden in kinds
            ),
            sources=tuple(
                SourceSummary(
                    service_id=service_id,
                    source=source,
                    issued=issued,
                    accepted=accepted,
                    overridden=overridden,
                )
                for service_id, source, issued, accepted, overridden in sources
            ),
        )
