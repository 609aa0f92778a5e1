import pytest
from pydantic import ValidationError

from core.cards import (
    RESEARCH_USE_NOTE,
    SUMMARY_MAX,
    Card,
    CdsResponse,
    Link,
    OverrideReason,
    Source,
    Suggestion,
    brief_cards,
)
from core.types import Brief, CaseHit, CaseRecord, ModelCard, Passage, PassageHit

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
        OverrideReason(code="c")  # display is required on override reasons
    with pytest.raises(ValidationError, match="one line"):
        Card(summary="two\nlines", indicator="info", source=SOURCE)
    with pytest.raises(ValidationError):
        Card(summary="ok", indicator="info", source=SOURCE, colour="red")


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
    base = dict(
        patient_ref="Patient/q",
        cases=(
            CaseHit(record, 0.03, image_rank=1, image_similarity=0.9, lab_rank=2, lab_distance=1.5),
        ),
        passages=(
            PassageHit(Passage("123:0", "123", "Text *with* <script>", "RESULTS", "2001"), 0.7),
        ),
        literature_query="chest radiograph findings: effusion",
        models=(ModelCard("tiny", "tiny random placeholder"),),
    )
    base.update(kw)
    return Brief(**base)


def test_brief_cards_attribute_every_case_and_passage():
    cards = brief_cards(brief(), instance="i-1")
    assert [c.source.label for c in cards] == ["MediRAG CDS similar-case index", "PubMed abstracts"]
    cases, literature = cards
    assert "case\\|1" in cases.detail
    assert "1.2.3" in cases.detail
    assert "Pleural Thickening" in cases.detail
    assert "prov \\<b\\>" in cases.detail  # source text is escaped, not rendered
    assert "1 (cos 0.90)" in cases.detail
    assert "2 (dist 1.50)" in cases.detail
    assert "PMID [123](https://pubmed.ncbi.nlm.nih.gov/123/)" in literature.detail
    assert "<script>" not in literature.detail
    assert literature.links[0].url == "https://pubmed.ncbi.nlm.nih.gov/123/"
    for card in cards:
        assert RESEARCH_USE_NOTE in card.detail
        assert "tiny random placeholder" in card.detail
        assert len(card.summary) <= SUMMARY_MAX


def test_card_uuids_are_stable_per_instance():
    first = [c.uuid for c in brief_cards(brief(), instance="i-1")]
    again = [c.uuid for c in brief_cards(brief(), instance="i-1")]
    other = [c.uuid for c in brief_cards(brief(), instance="i-2")]
    assert first == again
    assert not set(first) & set(other)
    assert len(set(first)) == len(first)


def test_long_summaries_are_cut_at_a_word():
    query = " ".join(["pneumothorax"] * 30)
    literature = brief_cards(brief(literature_query=query), instance="i")[1]
    assert len(literature.summary) <= SUMMARY_MAX
    assert literature.summary.endswith("…")
    assert "pneumothor…" not in literature.summary


def test_omissions_card_and_empty_brief():
    cards = brief_cards(
        brief(cases=(), passages=(), omissions=("imaging unavailable (timed out)",)), instance="i"
    )
    assert len(cards) == 1
    assert cards[0].summary == "Partial result: imaging unavailable (timed out)"
    assert brief_cards(brief(cases=(), passages=()), instance="i") == []
