"""The feedback endpoint: strict validation, authentication, feedback only on the caller's own
cards, stored whole or not at all, and queryable.

The end-to-end tests store into the real card ledger in the embedded PostgreSQL; the validation
tests use a ledger double that records what reaches it, to show that nothing does.
"""

import asyncio
import logging
import uuid

import pytest

from adapters.store.ledger import PgCardLedger
from adapters.store.pgvector_store import PgVectorStore
from cds_hooks.feedback import parse_rfc3339
from core.errors import SourceUnavailable
from core.feedback import UnknownCards
from tests.cds_hooks.keys import Signer
from tests.cds_hooks.test_app import SERVICE, auth, build, call, serve

FEEDBACK = SERVICE + "/feedback"
WHEN = "2026-11-23T10:05:31Z"
EARLIER = "2026-11-23T10:05:31+02:00"  # two hours before WHEN
REASON = {"code": "not-relevant", "system": "http://example.org/override", "display": "N/A"}
COMMENT = "pt John Doe declined, see note"


class Ledger:
    """Accepts every card as issued; records the feedback that reaches it."""

    def __init__(self, failure=None):
        self.issued, self.feedback, self.failure = [], [], failure

    async def record_issued(self, *, service_id, hook_instance, client, cards):
        self.issued.append(cards)

    async def record_feedback(self, *, service_id, client, feedback):
        if self.failure:
            raise self.failure
        self.feedback.append((service_id, client, list(feedback)))


def overridden(card, **extra):
    item = {"card": card, "outcome": "overridden", "outcomeTimestamp": WHEN}
    item["overrideReason"] = {"reason": REASON, "userComment": COMMENT}
    item.update(extra)
    return {k: v for k, v in item.items() if v is not ...}


def accepted(card):
    return {
        "card": card,
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": "s-1"}],
        "outcomeTimestamp": WHEN,
    }


@pytest.fixture(scope="module")
def signer():
    return Signer("ES384")


def test_rfc3339_timestamps():
    assert parse_rfc3339("2021-12-11T11:05:31+01:00").isoformat() == "2021-12-11T10:05:31+00:00"
    assert parse_rfc3339("2021-12-11t10:05:31.123456789z").microsecond == 123456
    for bad in ["2021-12-11T10:05:31", "2021-12-11 10:05:31Z"]:
        with pytest.raises(ValueError, match="RFC 3339"):
            parse_rfc3339(bad)
    for impossible in ["2021-02-30T10:05:31Z", "2016-12-31T23:59:60Z"]:  # leap second
        with pytest.raises(ValueError, match="not a valid date"):
            parse_rfc3339(impossible)


@pytest.mark.slow
def test_feedback_is_stored_and_reported(signer, database):
    # The service's own migrations create the ledger tables, as `medirag serve` does.
    async def migrate():
        store = await PgVectorStore.open(
            database, image_model="i", image_dim=8, text_model="t", text_dim=8
        )
        await store.close()

    asyncio.run(migrate())
    app, _ = build(signer, ledger_dsn=database)
    with serve(app) as client:
        answer = client.post(SERVICE, json=call(), headers=auth(signer, SERVICE))
        (card,) = [c["uuid"] for c in answer.json()["cards"] if "case" in c["summary"].lower()]
        response = client.post(
            FEEDBACK,
            json={"feedback": [accepted(card), overridden(card, outcomeTimestamp=EARLIER)]},
            headers=auth(signer, FEEDBACK),
        )
    assert (response.status_code, response.json()) == (200, {})

    async def report():
        async with await PgCardLedger.open(database) as ledger:
            return await ledger.report()

    (kind,) = [k for k in asyncio.run(report()).kinds if k.kind == "cases"]
    # The override happened earlier, so the card's outcome is the accept.
    assert (kind.issued, kind.feedback, kind.accepted, kind.overridden) == (1, 2, 1, 0)


def issue_card(client, signer):
    answer = client.post(SERVICE, json=call(), headers=auth(signer, SERVICE))
    assert answer.status_code == 200
    return answer.json()["cards"][0]["uuid"]


@pytest.mark.slow
def test_feedback_on_cards_of_another_client_is_422_and_stores_nothing(signer, database):
    other = Signer("ES384", iss="https://other-ehr.test")
    app, _ = build(signer, ledger_dsn=database, others=(other,))
    with serve(app) as client:
        mine = issue_card(client, signer)
        theirs = issue_card(client, other)
        response = client.post(
            FEEDBACK,
            json={"feedback": [accepted(mine), accepted(theirs), accepted(str(uuid.uuid4()))]},
            headers=auth(signer, FEEDBACK),
        )
        retry = client.post(
            FEEDBACK, json={"feedback": [accepted(mine)]}, headers=auth(signer, FEEDBACK)
        )
    assert response.status_code == 422
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "feedback[1], feedback[2]" in outcome["issue"][0]["diagnostics"]
    assert theirs not in response.text
    assert retry.status_code == 200  # the refused request recorded nothing, the retry did


INVALID = {
    "no-card": {"feedback": [{"outcome": "overridden", "outcomeTimestamp": WHEN}]},
    "unknown-outcome": {"feedback": [overridden("c", outcome="ignored")]},
    "accepted-without-suggestions": {
        "feedback": [{"card": "c", "outcome": "accepted", "outcomeTimestamp": WHEN}]
    },
    "accepted-with-override-reason": {
        "feedback": [{**accepted("c"), "overrideReason": {"userComment": "x"}}]
    },
    "overridden-with-suggestions": {
        "feedback": [overridden("c", acceptedSuggestions=[{"id": "s-1"}])]
    },
    "empty-suggestions": {"feedback": [{**accepted("c"), "acceptedSuggestions": []}]},
    "null-value": {"feedback": [overridden("c", overrideReason=None)]},
    "unknown-field": {"feedback": [overridden("c", outcomeTimeStamp=WHEN)]},
    "no-items": {"feedback": []},
    "no-offset": {"feedback": [overridden("c", outcomeTimestamp="2026-11-23T10:05:31")]},
    "timestamp-not-a-string": {"feedback": [overridden("c", outcomeTimestamp=1700000000)]},
    "reason-without-system": {
        "feedback": [overridden("c", overrideReason={"reason": {"code": "x"}})]
    },
    "empty-override-reason": {"feedback": [overridden("c", overrideReason={})]},
    "empty-extension": {"feedback": [overridden("c", extension={})]},
    "not-an-object": [accepted("c")],
}


@pytest.mark.parametrize("body", INVALID.values(), ids=INVALID.keys())
def test_malformed_feedback_is_400_and_records_nothing(signer, body, caplog):
    ledger = Ledger()
    app, _ = build(signer, ledger=ledger)
    with caplog.at_level(logging.DEBUG), serve(app) as client:
        response = client.post(FEEDBACK, json=body, headers=auth(signer, FEEDBACK))
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
    assert ledger.feedback == []
    assert COMMENT not in response.text
    assert all(COMMENT not in str(vars(r)) for r in caplog.records)


def test_extensions_are_accepted(signer):
    ledger = Ledger()
    app, _ = build(signer, ledger=ledger)
    extension = {"example.org/ehr-context": {"unit": "ICU"}}
    body = {"feedback": [overridden("c", extension=extension)], "extension": extension}
    with serve(app) as client:
        response = client.post(FEEDBACK, json=body, headers=auth(signer, FEEDBACK))
    assert response.status_code == 200
    ((service, client_iss, (item,)),) = ledger.feedback
    assert (service, client_iss) == ("medirag-patient-view", signer.iss)
    assert (item.card_uuid, item.outcome, item.reason_code) == ("c", "overridden", "not-relevant")
    assert item.user_comment == COMMENT


def test_invalid_json_is_400(signer):
    app, _ = build(signer, ledger=Ledger())
    with serve(app) as client:
        response = client.post(FEEDBACK, content=b"{not json", headers=auth(signer, FEEDBACK))
    assert response.status_code == 400


@pytest.mark.parametrize("audience", [None, SERVICE, "/cds-services"], ids=["none", "call", "disc"])
def test_feedback_needs_a_token_for_the_feedback_url(signer, audience):
    ledger = Ledger()
    app, _ = build(signer, ledger=ledger)
    headers = {} if audience is None else auth(signer, audience)
    with serve(app) as client:
        response = client.post(FEEDBACK, json={"feedback": [accepted("c")]}, headers=headers)
    assert (response.status_code, response.content) == (401, b"")
    assert ledger.feedback == []


def test_unknown_service_or_no_ledger_is_404(signer):
    path = "/cds-services/nope/feedback"
    app, _ = build(signer, ledger=Ledger())
    without, _ = build(signer)
    body = {"feedback": [accepted("c")]}
    with serve(app) as client:
        assert client.post(path, json=body, headers=auth(signer, path)).status_code == 404
    with serve(without) as client:
        assert client.post(FEEDBACK, json=body, headers=auth(signer, FEEDBACK)).status_code == 404


def test_unknown_cards_from_the_ledger_are_422(signer):
    app, _ = build(signer, ledger=Ledger(failure=UnknownCards((0,))))
    with serve(app) as client:
        response = client.post(
            FEEDBACK, json={"feedback": [accepted("c")]}, headers=auth(signer, FEEDBACK)
        )
    assert response.status_code == 422
    assert "feedback[0]" in response.json()["issue"][0]["diagnostics"]


def test_a_ledger_down_is_503_without_its_reason(signer, caplog):
    reason = "connection to 10.0.0.7 refused"
    app, _ = build(signer, ledger=Ledger(failure=SourceUnavailable("card ledger", reason)))
    with caplog.at_level(logging.INFO), serve(app) as client:
        response = client.post(
            FEEDBACK, json={"feedback": [overridden("c")]}, headers=auth(signer, FEEDBACK)
        )
    assert response.status_code == 503
    assert reason not in response.text
    (warning,) = [r for r in caplog.records if r.getMessage() == "feedback not recorded"]
    assert reason in warning.reason  # for the operator
    assert all(COMMENT not in str(vars(r)) for r in caplog.records)
