import json

import pytest
from pydantic import ValidationError

from core.brief_cards import RESEARCH_USE_NOTE, SmartApp, brief_cards
from core.cards import (
    SUMMARY_MAX,
    Action,
    Card,
    CdsResponse,
    Coding,
    Link,
    OverrideReason,
    Source,
    Suggestion,
)
from core.types import Brief, CaseHit, CaseRecord, LegMatch, ModelCard, Passage, PassageHit

SOURCE = Source(label="test")


def test_card_rejects_invalid_shapes():
    with pytest.raises(ValidationError):
        Card(summary="x" * (SUMMARY_MAX + 1), indicator="info", source=SOURCE)
    with pytest.raises(ValidationError):
        Card(summary="ok", indicator="urgent", source=SOURCE)
    with pytest.raises(ValidationError):
        Card(summary="ok", indicator="info", source=Source(label=""))
    with pytest.raises(ValidationError, match="selectionBehavior"):
        Card(summary="ok", indicator="info", source=SOURCE, suggestions=[Suggestion(label="s")])
    with pytest.raises(ValidationError, match="appContext"):
        Link(label="l", url="https://x", type="absolute", appContext="{}")
    with pytest.raises(ValidationError):
        OverrideReason(code="c", system="https://s")  # display is required on override reasons
    with pytest.raises(ValidationError):
        Coding(code="c")  # system is required on every coding
    with pytest.raises(ValidationError, match="one line"):
        Card(summary="two\nlines", indicator="info", source=SOURCE)
    with pytest.raises(ValidationError):
        Card(summary="ok", indicator="info", source=SOURCE, colour="red")
    for empty in ({"uuid": ""}, {"detail": ""}):  # the spec forbids empty values
        with pytest.raises(ValidationError):
            Card(summary="ok", indicator="info", source=SOURCE, **empty)
    with pytest.raises(ValidationError):
        Coding(code="c", system="https://s", display="")
    with pytest.raises(ValidationError):
        Suggestion(label="s", uuid="")
    with pytest.raises(ValidationError):
        Link(label="l", url="https://x", type="smart", appContext="")


@pytest.mark.parametrize("url", ["/relative", "pubmed.ncbi.nlm.nih.gov", "javascript:alert(1)", ""])
def test_urls_must_be_absolute(url):
    with pytest.raises(ValidationError, match="absolute"):
        Source(label="s", url=url)
    with pytest.raises(ValidationError, match="absolute"):
        Source(label="s", icon=url)
    with pytest.raises(ValidationError, match="absolute"):
        Link(label="l", url=url, type="absolute")


def test_serialisation_has_no_null_or_empty_elements():
    card = Card(summary="ok", indicator="info", source=SOURCE, links=[])
    assert card.to_json() == {"summary": "ok", "indicator": "info", "source": {"label": "test"}}
    assert CdsResponse(cards=[]).to_json() == {"cards": []}
    smart = Link(label="app", url="https://app", type="smart", appContext='{"c":1}')
    assert smart.to_json()["appContext"] == '{"c":1}'


def brief(**kw):
    record = CaseRecord(
        "case|1", "Patient/a", "1.2.3", ("Pleural_Thickening", "Effusion"), "prov <b>"
    )
    legs = (LegMatch("image", 1, 0.9, "cos"), LegMatch("labs", 2, 1.5, "dist"))
    base = dict(
        patient_ref="Patient/q",
        cases=(CaseHit(record, 0.03, legs),),
        passages=(
            PassageHit(Passage("123:0", "123", "Text *with* <script>", "RESULTS", "2001"), 0.7),
        ),
        literature_query="chest radiograph findings: effusion",
        literature_basis="the similar cases' findings",
        models=(ModelCard("tiny", "tiny random placeholder"),),
    )
    base.update(kw)
    return Brief(**base)


def test_brief_cards_attribute_every_case_and_passage():
    issued = brief_cards(brief(), instance="i-1")
    assert [i.kind for i in issued] == ["cases", "literature"]
    cases, literature = (i.card for i in issued)
    assert cases.source.label == "MediRAG CDS similar-case index"
    assert literature.source.label == "PubMed abstracts"
    assert "case\\|1" in cases.detail
    assert "1.2.3" in cases.detail
    assert "Pleural Thickening" in cases.detail
    assert "prov \\<b\\>" in cases.detail  # source text is escaped, not rendered
    assert "| Image rank | Lab rank |" in cases.detail
    assert "1 (cos 0.90)" in cases.detail
    assert "2 (dist 1.50)" in cases.detail
    assert "PMID [123](https://pubmed.ncbi.nlm.nih.gov/123/)" in literature.detail
    assert "built from the similar cases' findings" in literature.detail
    assert "<script>" not in literature.detail
    assert literature.links[0].url == "https://pubmed.ncbi.nlm.nih.gov/123/"
    assert issued[0].sources == ("case:case|1", "study:1.2.3")
    assert issued[1].sources == ("pmid:123",)
    for card in (cases, literature):
        assert RESEARCH_USE_NOTE in card.detail
        assert "tiny random placeholder" in card.detail
        assert len(card.summary) <= SUMMARY_MAX


def test_a_hybrid_passage_shows_its_doi_and_how_each_leg_ranked_it():
    passage = Passage("9:1", "9", "Drainage text", "RESULTS", "2020", doi="10.1000/x_1")
    legs = (
        LegMatch("dense", 3, 0.61, "cos"),
        LegMatch("sparse", 1, 0.35, "ip"),
        LegMatch("rerank", 1, 0.9, "relevance"),
    )
    hybrid = brief(passages=(PassageHit(passage, 0.9, legs),))
    literature = brief_cards(hybrid, instance="i")[1].card
    assert "doi:[10.1000/x\\_1](https://doi.org/10.1000/x_1)" in literature.detail
    assert "Ranked: dense #3, sparse #1, rerank #1." in literature.detail
    dense_only = brief(passages=(PassageHit(passage, 0.6, legs[:1]),))
    assert "Ranked:" not in brief_cards(dense_only, instance="i")[1].card.detail


def test_table_has_a_column_per_leg_used():
    record = CaseRecord("c", "Patient/a", "1.2", ("Effusion",), "p")
    only_reason = (CaseHit(record, 0.1, (LegMatch("reason", 1, 0.8, "cos"),)),)
    card = brief_cards(brief(cases=only_reason), instance="i")[0].card
    assert "| # | Case | Study UID | Recorded findings | Reason rank |" in card.detail
    assert card.summary.startswith("1 similar past cases by reason:")


def test_smart_link_names_the_retrieved_cases():
    app = SmartApp("https://app.example.org/launch")
    card = brief_cards(brief(), instance="i-1", app=app)[0].card
    (link,) = card.links
    assert (link.type, link.url) == ("smart", "https://app.example.org/launch")
    assert json.loads(link.appContext) == {
        "hookInstance": "i-1",
        "cases": ["case|1"],
        "studies": ["1.2.3"],
        "pmids": ["123"],
    }
    assert brief_cards(brief(), instance="i-1")[0].card.links is None


def test_card_uuids_are_stable_per_instance():
    first = [i.card.uuid for i in brief_cards(brief(), instance="i-1")]
    again = [i.card.uuid for i in brief_cards(brief(), instance="i-1")]
    other = [i.card.uuid for i in brief_cards(brief(), instance="i-2")]
    assert first == again
    assert not set(first) & set(other)
    assert len(set(first)) == len(first)
    # Two services or two clients reusing one hookInstance still get distinct cards.
    scoped = [i.card.uuid for i in brief_cards(brief(), instance="i-1", scope="svc|ehr-a")]
    elsewhere = [i.card.uuid for i in brief_cards(brief(), instance="i-1", scope="svc|ehr-b")]
    assert not set(scoped) & set(first)
    assert not set(scoped) & set(elsewhere)


def test_long_summaries_are_cut_at_a_word():
    query = " ".join(["pneumothorax"] * 30)
    literature = brief_cards(brief(literature_query=query), instance="i")[1].card
    assert len(literature.summary) <= SUMMARY_MAX
    assert literature.summary.endswith("…")
    assert "pneumothor…" not in literature.summary


def test_omissions_card_and_empty_brief():
    issued = brief_cards(
        brief(cases=(), passages=(), omissions=("imaging unavailable (timed out)",)), instance="i"
    )
    assert [i.kind for i in issued] == ["omissions"]
    assert issued[0].card.summary == "Partial result: imaging unavailable (timed out)"
    assert brief_cards(brief(cases=(), passages=()), instance="i") == []


def test_actions_and_suggestions_follow_the_spec():
    patient = {"resourceType": "ServiceRequest", "id": "1"}
    assert (
        Action(type="create", description="order", resource=patient).to_json()["type"] == "create"
    )
    Action(type="update", description="update", resource=patient)
    Action(type="delete", description="remove", resourceId="ServiceRequest/1")
    with pytest.raises(ValidationError, match="whole FHIR resource"):
        Action(type="create", description="order")
    with pytest.raises(ValidationError, match="whole FHIR resource"):
        Action(type="update", description="update", resource={"id": "1"})
    with pytest.raises(ValidationError, match="resourceId only"):
        Action(type="delete", description="remove", resource={"resourceType": "X"})
    with pytest.raises(ValidationError, match="resourceId only"):
        Action(type="delete", description="remove")
    with pytest.raises(ValidationError):
        Action(type="patch", description="x", resource=patient)
    with pytest.raises(ValidationError):
        Action(type="create", description="", resource=patient)
    with pytest.raises(ValidationError):
        Suggestion(label="")
    with pytest.raises(ValidationError):
        Suggestion(label="s", isRecommended="maybe")
    card = Card(
        summary="ok",
        indicator="warning",
        source=SOURCE,
        suggestions=[Suggestion(label="s", uuid="u1", isRecommended=True, actions=[])],
        selectionBehavior="any",
        overrideReasons=[OverrideReason(code="c", system="https://s", display="Not relevant")],
    )
    assert card.to_json()["suggestions"] == [{"label": "s", "uuid": "u1", "isRecommended": True}]
    with pytest.raises(ValidationError):
        Card(summary="ok", indicator="info", source=SOURCE, selectionBehavior="all")
