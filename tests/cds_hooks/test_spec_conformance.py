"""CDS Hooks 2.0 requirements that no other test shows on its own (docs/conformance.md cites
these by requirement id): discovery of every service and its endpoint, JSON without null or
empty elements, "no guidance" as an empty card array, the prefetch token and query rules, the
access token on every FHIR request, and the required parts of every card object."""

import dataclasses
import json

import httpx
import pytest
from pydantic import ValidationError

from adapters.fhir.client import FhirClient
from cds_hooks.prefetch import PrefetchTemplate
from cds_hooks.requests import TOKEN_FIELDS
from cds_hooks.services import PATIENT_VIEW
from core.brief_cards import PUBMED, SmartApp, brief_cards
from core.cards import (
    Action,
    Card,
    CdsResponse,
    Coding,
    Link,
    OverrideReason,
    Source,
    Suggestion,
)
from tests.cds_hooks.keys import Signer
from tests.cds_hooks.test_app import BASE, LABS, SERVICE, auth, build, call, serve
from tests.core.test_cards import brief


@pytest.fixture(scope="module")
def signer():
    return Signer("ES384")


async def _no_guidance(advisor, context, records, *, deadline):
    return None


QUIET = dataclasses.replace(
    PATIENT_VIEW,
    id="medirag-quiet",
    title="A service with nothing to say",
    description="Answers every call with no card.",
    handler=_no_guidance,
)


def test_every_announced_service_is_described_and_callable_at_its_id(signer):
    """Requirements 4-13, 16, 29, 36: GET {base}/cds-services lists every service with its hook,
    title, description, id, prefetch templates by key and usage requirements, and each is
    called at {base}/cds-services/{id}."""
    app, _ = build(signer, services=(PATIENT_VIEW, QUIET))
    with serve(app) as client:
        response = client.get(BASE + "/cds-services", headers=auth(signer, "/cds-services"))
        assert response.status_code == 200
        services = response.json()["services"]
        assert isinstance(services, list)
        assert [s["id"] for s in services] == ["medirag-patient-view", "medirag-quiet"]
        for entry in services:
            for name in ("hook", "id", "title", "description", "usageRequirements"):
                assert isinstance(entry[name], str), (entry["id"], name)
                assert entry[name].strip(), (entry["id"], name)
            templates = entry["prefetch"]
            assert set(templates) == {"patient", "labs"}
            assert all(
                isinstance(t, str) and "{{context.patientId}}" in t for t in templates.values()
            )
            path = f"/cds-services/{entry['id']}"
            answer = client.post(
                BASE + path, json=call(hook=entry["hook"]), headers=auth(signer, path)
            )
            assert answer.status_code == 200, (path, answer.text)
            assert isinstance(answer.json()["cards"], list)
        unknown = "/cds-services/medirag-missing"
        assert client.post(unknown, json=call(), headers=auth(signer, unknown)).status_code == 404


def _empty_elements(value, path="$"):
    """The paths of null or empty values (``null``, ``""``, ``[]``, ``{}``) inside ``value``."""
    found = []
    if value is None or (isinstance(value, str | list | dict) and not value):
        found.append(path)
    if isinstance(value, dict):
        for key, item in value.items():
            found += _empty_elements(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _empty_elements(item, f"{path}[{i}]")
    return found


def test_answers_are_json_without_null_or_empty_elements(signer):
    """Requirements 1, 3, 74: discovery, cards (with links and an omissions card) and errors are
    JSON, and none holds a null or empty element."""
    app, _ = build(signer, app=SmartApp("https://app.test/launch"))
    with serve(app) as client:
        answers = [
            client.get("/cds-services", headers=auth(signer, "/cds-services")),
            client.post(SERVICE, json=call(), headers=auth(signer, SERVICE)),
            client.post(SERVICE, json=call(prefetch={"labs": None}), headers=auth(signer, SERVICE)),
            client.post(SERVICE, json=call(hookInstance="1"), headers=auth(signer, SERVICE)),
        ]
    assert [a.status_code for a in answers] == [200, 200, 200, 400]
    cards = answers[1].json()["cards"] + answers[2].json()["cards"]
    assert any("links" in c for c in cards)
    assert any("Partial result" in c["summary"] for c in cards)
    for answer in answers:
        media = answer.headers["content-type"].split(";")[0]
        assert media in ("application/json", "application/fhir+json")
        body = json.loads(answer.content)
        assert _empty_elements(body) == [], answer.text
    for issued in brief_cards(brief(), instance="i-1", app=SmartApp("https://app.test/launch")):
        assert _empty_elements(issued.card.to_json()) == []


def test_no_guidance_is_200_with_an_empty_cards_array(signer):
    """Requirements 74, 77: a service with nothing to say answers 200 ``{"cards": []}``."""
    app, _ = build(signer, services=(QUIET,))
    path = "/cds-services/medirag-quiet"
    with serve(app) as client:
        response = client.post(path, json=call(), headers=auth(signer, path))
    assert response.status_code == 200
    assert response.json() == {"cards": []}


def template(text):
    return PrefetchTemplate(text, TOKEN_FIELDS)


@pytest.mark.parametrize(
    "text",
    [
        "Patient/{{context.patientId}}",
        "Encounter/{{context.encounterId}}",
        "Observation?patient={{ context.patientId }}&code=4548-4&_count=1&_sort=-date",
        "Practitioner/{{userPractitionerId}}",
        "PractitionerRole/{{userPractitionerRoleId}}",
        "Patient/{{userPatientId}}",
        "RelatedPerson/{{userRelatedPersonId}}",
    ],
)
def test_valid_prefetch_tokens_are_accepted(text):
    """Requirements 35, 55, 56, 59: ``{{context.<field>}}`` and the four user identifiers."""
    assert template(text).template == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Patient/{context.patientId}", "unbalanced"),  # not delimited by {{ and }}
        ("Patient/{{context.patientId}", "unbalanced"),
        ("Patient/{{patientId}}", "not a prefetch token"),  # a context field without context.
        ("Patient/{{userId}}", "not a prefetch token"),
        ("Patient/{{user.id}}", "not a prefetch token"),
        ("Patient/{{context.patient.id}}", "root-level primitive"),  # not root-level
        ("Observation?patient={{context.draftOrders}}", "root-level primitive"),  # not primitive
        ("Observation?patient={{context.selections}}", "root-level primitive"),
        ("Observation?patient={{context.unknownField}}", "root-level primitive"),
    ],
)
def test_invalid_prefetch_tokens_are_refused(text, why):
    """Requirements 55, 56, 57, 59: anything else is refused when the service is defined."""
    with pytest.raises(ValueError, match=why):
        template(text)


def test_user_tokens_are_filled_from_the_calls_user():
    """Requirement 56: a user token takes the id of ``context.userId`` of its resource type."""
    practitioner = template("Practitioner/{{userPractitionerId}}")
    assert practitioner.render({"patientId": "p"}, user_id="Practitioner/9") == "Practitioner/9"
    assert practitioner.render({"patientId": "p"}, user_id="PractitionerRole/9") is None
    patient = template("Observation?patient={{context.patientId}}")
    assert patient.render({"patientId": "a&b"}, user_id="Patient/1") == "Observation?patient=a%26b"


@pytest.mark.parametrize(
    "text",
    [
        "Observation?patient={{context.patientId}}&code=4548-4",
        "Observation?patient={{context.patientId}}&code:in=http://example.org/vs",
        "Observation?patient={{context.patientId}}&date=ge2020-01-01&date=lt2021-01-01",
        "Observation?patient={{context.patientId}}&_count=5&_sort=-date",
        *(f"Observation?date={p}2020-01-01" for p in ("eq", "lt", "gt", "ge", "le")),
    ],
)
def test_recommended_prefetch_queries_are_accepted(text):
    """Requirement 58: reads and searches by reference, token (``:in``), date, _count, _sort."""
    template(text)


@pytest.mark.parametrize(
    "text",
    [
        "Observation?patient={{context.patientId}}&_include=Observation:subject",
        "Patient?_revinclude=Observation:subject",
        "Patient?_has:Observation:patient:code=1",
        "Observation?_elements=id",
        "Observation?code:text=anemia",
        "Observation?code:not=4548-4",
        "Observation?date=ne2020-01-01",
        "Observation?date=sa2020-01-01",
        "Observation?date=ap2020-01-01",
        "Observation?subject.name=x",
        "Observation?_count=all",
        "Patient/1/_history/2",
        "Observation",
    ],
)
def test_prefetch_queries_outside_the_recommended_subset_are_refused(text):
    """Requirement 58: chained, included, other modifiers and prefixes, history are refused."""
    with pytest.raises(ValueError, match=r"recommended subset|must be a number|neither a read"):
        template(text)


def _observation(i):
    resource = LABS["entry"][i % len(LABS["entry"])]["resource"]
    return {"resource": {**resource, "id": f"o-{i}"}}


@pytest.mark.anyio
async def test_the_access_token_goes_with_every_fhir_request():
    """Requirement 61: the call's access token is presented on every request, every page."""
    seen = []

    def answer(request):
        seen.append((request.url.path, request.url.params.get("page"), request.headers))
        if request.url.path.startswith("/fhir/Patient/"):
            return httpx.Response(200, json={"resourceType": "Patient", "id": "q-1"})
        page = request.url.params.get("page")
        bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [_observation(0)]}
        if page is None:
            nxt = "https://ehr.test/fhir/Observation?patient=q-1&page=2"
            bundle["link"] = [{"relation": "next", "url": nxt}]
        elif page == "2":
            bundle["link"] = [{"relation": "next", "url": "Observation?patient=q-1&page=3"}]
            bundle["entry"] = [_observation(1)]
        else:
            bundle["entry"] = [_observation(2)]
        return httpx.Response(200, json=bundle)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        client = FhirClient("https://ehr.test/fhir", bearer_token="call-token", http=http)
        found = await client.fetch("Observation?patient=q-1")
        assert await client.fetch("Patient/q-1")  # a read, too
    assert len(found["entry"]) == 3
    assert [(path, page) for path, page, _ in seen] == [
        ("/fhir/Observation", None),
        ("/fhir/Observation", "2"),
        ("/fhir/Observation", "3"),
        ("/fhir/Patient/q-1", None),
    ]
    assert all(headers["authorization"] == "Bearer call-token" for _, _, headers in seen)


SOURCE = Source(label="s")
CARD = {"summary": "ok", "indicator": "info", "source": {"label": "s"}}


@pytest.mark.parametrize(
    ("model", "fields", "missing"),
    [
        (Card, CARD, "summary"),
        (Card, CARD, "indicator"),
        (Card, CARD, "source"),
        (Source, {"label": "s"}, "label"),
        (Suggestion, {"label": "s"}, "label"),
        (Action, {"type": "delete", "description": "d", "resourceId": "X/1"}, "type"),
        (Action, {"type": "delete", "description": "d", "resourceId": "X/1"}, "description"),
        (Link, {"label": "l", "url": "https://x.test", "type": "absolute"}, "label"),
        (Link, {"label": "l", "url": "https://x.test", "type": "absolute"}, "url"),
        (Link, {"label": "l", "url": "https://x.test", "type": "absolute"}, "type"),
        (Coding, {"code": "c", "system": "https://s.test"}, "code"),
        (Coding, {"code": "c", "system": "https://s.test"}, "system"),
        (OverrideReason, {"code": "c", "system": "https://s.test", "display": "d"}, "display"),
    ],
)
def test_required_fields_of_card_objects_are_required(model, fields, missing):
    """Requirements 87, 90, 105, 117, 127, 128, 138, 139, 141, 216-219: every REQUIRED field
    is required; with it the object is valid."""
    model.model_validate(fields)
    with pytest.raises(ValidationError, match=missing):
        model.model_validate({k: v for k, v in fields.items() if k != missing})


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (Card, {**CARD, "summary": 1}),
        (Card, {**CARD, "uuid": 1}),
        (Card, {**CARD, "detail": ["x"]}),
        (Card, {**CARD, "indicator": "hard-stop"}),
        (Suggestion, {"label": "s", "uuid": 7}),
        (Action, {"type": "delete", "description": "d", "resourceId": 1}),
        (Action, {"type": "create", "description": "d", "resource": "Patient/1"}),
        (Link, {"label": "l", "url": "https://x.test", "type": "relative"}),
        (Link, {"label": "l", "url": "https://x.test", "type": "smart", "appContext": {"a": 1}}),
        (Coding, {"code": 1, "system": "https://s.test"}),
        (Source, {"label": "s", "topic": "pneumonia"}),
        (Source, {"label": "s", "topic": {"code": "c"}}),
    ],
)
def test_fields_of_the_wrong_type_or_value_are_refused(model, fields):
    """Requirements 80, 83, 85, 88, 115, 119, 130, 135, 142, 144, 216-218: strings are strings,
    enumerations take only their values, a topic is a Coding, a resource is an object."""
    with pytest.raises(ValidationError):
        model.model_validate(fields)


def test_topic_coding_display_is_optional_override_reason_display_is_not():
    """Requirements 100, 115, 136, 219, 220."""
    topic = Coding(code="c", system="https://s.test")
    assert Source(label="s", topic=topic).to_json()["topic"] == {
        "code": "c",
        "system": "https://s.test",
    }
    with pytest.raises(ValidationError, match="display"):
        Card(**CARD, overrideReasons=[{"code": "c", "system": "https://s.test"}])
    reason = OverrideReason(code="c", system="https://s.test", display="Not relevant")
    card = Card(summary="ok", indicator="info", source=SOURCE, overrideReasons=[reason])
    assert card.to_json()["overrideReasons"][0]["display"] == "Not relevant"


def test_source_url_is_not_a_drill_down_links_are():
    """Requirements 107, 109, 110: a card's source URL is the data set's home, never the
    case- or passage-specific view; those are in the card's links."""
    for issued in brief_cards(brief(), instance="i-1"):
        card = issued.card
        links = {link.url for link in card.links or ()}
        assert card.source.url in (None, PUBMED)
        assert card.source.url not in links
    literature = brief_cards(brief(), instance="i-1")[1].card
    assert [link.url for link in literature.links] == [f"{PUBMED}123/"]


def test_system_actions_are_optional_and_are_actions():
    """Requirement 75: ``systemActions`` is optional (never sent) and, if present, Actions."""
    assert "systemActions" not in CdsResponse(cards=[]).to_json()
    delete = {"type": "delete", "description": "d", "resourceId": "ServiceRequest/1"}
    response = CdsResponse(cards=[], systemActions=[delete])
    assert response.to_json()["systemActions"] == [delete]
    with pytest.raises(ValidationError):
        CdsResponse(cards=[], systemActions=[{"type": "delete", "description": "d"}])
