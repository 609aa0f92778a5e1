"""``medirag feedback report`` over a real ledger in the embedded PostgreSQL."""

import asyncio
import json
import uuid
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from adapters.store.ledger import PgCardLedger
from adapters.store.pgvector_store import PgVectorStore
from core.cards import Card, IssuedCard, Source
from core.feedback import CardFeedback
from deploy.cli import app

pytestmark = pytest.mark.slow

SERVICE = "medirag-order-sign"


def fill(dsn):
    """Migrate the database as the service does, issue two cards, override one of them."""

    async def run():
        store = await PgVectorStore.open(
            dsn, image_model="i", image_dim=8, text_model="t", text_dim=8
        )
        await store.close()
        cards = [
            IssuedCard(
                Card(uuid=str(uuid.uuid4()), summary=k, indicator="info", source=Source(label="M")),
                kind=k,
                sources=(f"pmid:{n}",),
            )
            for n, k in enumerate(["cases", "literature"])
        ]
        async with await PgCardLedger.open(dsn) as ledger:
            await ledger.record_issued(
                service_id=SERVICE, hook_instance="h", client="https://ehr.test", cards=cards
            )
            await ledger.record_feedback(
                service_id=SERVICE,
                client="https://ehr.test",
                feedback=[
                    CardFeedback(
                        cards[1].card.uuid,
                        "overridden",
                        datetime.now(UTC),
                        reason_system="http://example.org/r",
                        reason_code="irrelevant",
                        user_comment="private words",
                    )
                ],
            )

    asyncio.run(run())


def test_report_as_json_and_tables(database, tmp_path):
    fill(database)
    env = {"MEDIRAG_DSN": database, "MEDIRAG_DATA_DIR": str(tmp_path)}
    runner = CliRunner()
    result = runner.invoke(app, ["feedback", "report", "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    kinds = {k["kind"]: k for k in report["kinds"]}
    assert (kinds["cases"]["issued"], kinds["cases"]["feedback_rate"]) == (1, 0.0)
    assert kinds["literature"]["overridden_rate"] == 1.0
    assert kinds["literature"]["override_reasons"][0]["code"] == "irrelevant"
    tables = runner.invoke(app, ["feedback", "report"], env=env)
    assert tables.exit_code == 0, tables.output
    assert "irrelevant" in tables.stdout
    assert "pmid:1" in tables.stdout
    assert "private words" not in result.stdout + tables.stdout


def test_no_database_is_a_clear_error_not_a_new_one(tmp_path):
    result = CliRunner().invoke(
        app, ["feedback", "report"], env={"MEDIRAG_DSN": "", "MEDIRAG_DATA_DIR": str(tmp_path)}
    )
    assert result.exit_code == 2
    assert "no database at" in result.output
    assert not (tmp_path / "postgres").exists()
