"""The card ledger in the real embedded PostgreSQL: issued cards, feedback stored whole or not at
all and only for the client's own cards, and the evaluation report."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import AsyncConnection, sql

from adapters.store.embedded import EmbeddedPostgres
from adapters.store.ledger import PgCardLedger
from adapters.store.schema import IndexModels, migrate
from core.cards import Card, IssuedCard, Source
from core.errors import SourceUnavailable
from core.feedback import CardFeedback, UnknownCards

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MODELS = IndexModels(image_model="image-a", image_dim=8, text_model="text-a", text_dim=16)
EHR, OTHER_EHR = "https://ehr.test", "https://other-ehr.test"
SERVICE = "medirag-patient-view"
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
REASON = ("http://example.org/override", "not-relevant", "Not relevant")


@pytest.fixture
async def ledger(database: str) -> AsyncIterator[PgCardLedger]:
    """A ledger on the module's database, migrated and empty."""
    async with await AsyncConnection.connect(database) as conn:
        await migrate(conn, MODELS)
        await conn.execute("TRUNCATE feedback, issued_cards")
        await conn.commit()
    async with await PgCardLedger.open(database) as opened:
        yield opened


def issued(kind: str, *sources: str, card_uuid: str | None = None) -> IssuedCard:
    card = Card(
        uuid=card_uuid or str(uuid.uuid4()),
        summary=f"{kind} card",
        indicator="info",
        source=Source(label="MediRAG"),
    )
    return IssuedCard(card=card, kind=kind, sources=sources)


def accepted(card: IssuedCard, at: datetime = T0) -> CardFeedback:
    assert card.card.uuid is not None
    return CardFeedback(card.card.uuid, "accepted", at, accepted_suggestions=("s-1",))


def overridden(card: IssuedCard, at: datetime = T0, *, coded: bool = True) -> CardFeedback:
    assert card.card.uuid is not None
    system, code, display = REASON if coded else (None, None, None)
    return CardFeedback(
        card.card.uuid,
        "overridden",
        at,
        reason_system=system,
        reason_code=code,
        reason_display=display,
        user_comment="patient declined",
    )


async def issue(ledger: PgCardLedger, *cards: IssuedCard, client: str = EHR) -> str:
    instance = str(uuid.uuid4())
    await ledger.record_issued(
        service_id=SERVICE, hook_instance=instance, client=client, cards=cards
    )
    return instance


async def rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    async with await AsyncConnection.connect(dsn) as conn:
        return await (await conn.execute(query)).fetchall()


async def test_issued_cards_are_recorded_once(ledger: PgCardLedger, database: str) -> None:
    cases = issued("cases", "case:c1", "study:1.2.3")
    literature = issued("literature", "pmid:123")
    instance = await issue(ledger, cases, literature)
    await ledger.record_issued(  # a retried call records nothing twice
        service_id=SERVICE, hook_instance=instance, client=EHR, cards=[cases, literature]
    )
    stored = await rows(
        database,
        "SELECT card_uuid, service_id, hook_instance, client, kind, sources "
        "FROM issued_cards ORDER BY kind",
    )
    assert stored == [
        (cases.card.uuid, SERVICE, instance, EHR, "cases", ["case:c1", "study:1.2.3"]),
        (literature.card.uuid, SERVICE, instance, EHR, "literature", ["pmid:123"]),
    ]


async def test_a_card_without_uuid_is_not_recorded(ledger: PgCardLedger, database: str) -> None:
    card = issued("omissions")
    await issue(ledger, IssuedCard(card=card.card.model_copy(update={"uuid": None}), kind="x"))
    assert await rows(database, "SELECT * FROM issued_cards") == []


async def test_feedback_is_stored_with_every_field(ledger: PgCardLedger, database: str) -> None:
    card = issued("cases", "case:c1")
    await issue(ledger, card)
    await ledger.record_feedback(service_id=SERVICE, client=EHR, feedback=[overridden(card)])
    stored = await rows(
        database,
        "SELECT card_uuid, service_id, client, outcome, accepted_suggestions, override_system, "
        "override_code, override_display, user_comment, outcome_timestamp FROM feedback",
    )
    assert stored == [
        (card.card.uuid, SERVICE, EHR, "overridden", [], *REASON, "patient declined", T0)
    ]


@pytest.mark.parametrize(
    ("service", "client", "known"),
    [
        (SERVICE, OTHER_EHR, True),  # another EHR cannot write (or probe) this one's evaluation
        ("medirag-order-sign", EHR, True),  # feedback goes to the service that issued the card
        (SERVICE, EHR, False),  # a uuid never issued
    ],
    ids=["other-client", "other-service", "never-issued"],
)
async def test_feedback_on_cards_not_issued_to_the_caller_records_nothing(
    ledger: PgCardLedger, database: str, service: str, client: str, known: bool
) -> None:
    mine = issued("cases")
    stranger = issued("literature")
    await issue(ledger, mine)
    if known:
        await issue(ledger, stranger)
    items = [accepted(mine), overridden(stranger), accepted(mine)]
    with pytest.raises(UnknownCards) as refused:
        await ledger.record_feedback(service_id=service, client=client, feedback=items)
    expected = (0, 1, 2) if (service, client) != (SERVICE, EHR) else (1,)
    assert refused.value.positions == expected
    assert await rows(database, "SELECT * FROM feedback") == []


async def test_report_counts_each_card_once_by_its_latest_feedback(
    ledger: PgCardLedger,
) -> None:
    first, second, ignored = (
        issued("cases", "case:c1"),
        issued("cases", "case:c1"),
        issued("cases", "case:c2"),
    )
    literature = issued("literature", "pmid:9")
    await issue(ledger, first, second, ignored, literature)
    await ledger.record_feedback(
        service_id=SERVICE,
        client=EHR,
        feedback=[
            # Reported out of order: the override came later, so it is the card's outcome.
            overridden(first, T0 + timedelta(minutes=5)),
            accepted(first, T0),
            accepted(second),
            accepted(second),  # the same interaction reported twice
            overridden(literature, coded=False),
        ],
    )
    report = await ledger.report()
    cases, lit = report.kinds
    assert (cases.service_id, cases.kind, cases.issued, cases.with_feedback) == (
        SERVICE,
        "cases",
        3,
        2,
    )
    assert (cases.feedback, cases.accepted, cases.overridden) == (4, 1, 1)
    assert (cases.feedback_rate, cases.accepted_rate) == (pytest.approx(2 / 3), 0.5)
    assert [(r.system, r.code, r.display, r.cards) for r in cases.reasons] == [(*REASON, 1)]
    assert (lit.kind, lit.issued, lit.overridden, lit.overridden_rate) == ("literature", 1, 1, 1.0)
    assert [(r.system, r.code, r.cards) for r in lit.reasons] == [(None, None, 1)]
    by_source = {s.source: (s.issued, s.accepted, s.overridden) for s in report.sources}
    assert by_source == {"case:c1": (2, 1, 1), "case:c2": (1, 0, 0), "pmid:9": (1, 0, 1)}
    assert report.sources[0].source == "case:c1"  # the most shown first
    assert "patient declined" not in str(report.to_json())


async def test_an_empty_ledger_reports_nothing(ledger: PgCardLedger) -> None:
    report = await ledger.report()
    assert report.to_json() == {"kinds": [], "sources": []}


async def test_a_database_without_ledger_tables_is_refused(postgres: EmbeddedPostgres) -> None:
    name = f"bare_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with pytest.raises(SourceUnavailable, match="no card ledger tables"):
            await PgCardLedger.open(postgres.dsn_for(name))
    finally:
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


async def test_an_unreachable_database_is_unavailable() -> None:
    with pytest.raises(SourceUnavailable, match="card ledger"):
        await PgCardLedger.open("postgresql://nobody@127.0.0.1:1/none", connect_timeout=2)


async def test_a_lost_database_is_unavailable_and_records_nothing(
    ledger: PgCardLedger, database: str
) -> None:
    card = issued("cases")
    await issue(ledger, card)
    await ledger.close()  # as if the database had gone: the pool is unusable
    with pytest.raises(SourceUnavailable, match="card ledger"):
        await ledger.record_feedback(service_id=SERVICE, client=EHR, feedback=[accepted(card)])
    assert await rows(database, "SELECT * FROM feedback") == []
