"""The cards a brief becomes: similar cases, literature, and what was left out.

Every statement on a card names its source: each similar case by case id and study UID with its
provenance and its rank in each search leg, each passage by PMID with a link to PubMed. Every
card carries the research-use note and names the models behind it. Text from data sources is
escaped, so it renders literally in the EHR's Markdown.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from urllib.parse import quote

from core.cards import SUMMARY_MAX, Card, IssuedCard, Link, Source
from core.types import Brief, CaseHit, PassageHit

__all__ = ["PUBMED", "RESEARCH_USE_NOTE", "SmartApp", "brief_cards"]

RESEARCH_USE_NOTE = (
    "MediRAG CDS is research software, not a medical device: it is not intended for diagnosis "
    "or treatment, and its output must not replace clinical judgement."
)

PUBMED = "https://pubmed.ncbi.nlm.nih.gov/"
_CARD_NAMESPACE = uuid.UUID("0b6c2a3e-6f1d-4c55-9d7e-3c1f3b8a2d10")
_LEG_TITLES = {"image": "Image rank", "labs": "Lab rank", "reason": "Reason rank"}


@dataclass(frozen=True, slots=True)
class SmartApp:
    """The SMART on FHIR app that shows the full brief.

    Args:
        launch_url: its launch URL (absolute); the EHR adds the SMART launch parameters.
        label: the link's text.
    """

    launch_url: str
    label: str = "Open the full brief (MediRAG app)"


def _fit(text: str, limit: int = SUMMARY_MAX) -> str:
    """Shorten ``text`` to ``limit`` characters at a word boundary, marking the cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + "…"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _md(text: str) -> str:
    """Escape text from data sources so it renders literally in GitHub-flavoured Markdown."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _finding(name: str) -> str:
    return name.replace("_", " ")


def _card_uuid(seed: str, kind: str) -> str:
    # Derived, not random: a retried hook call returns the same card ids.
    return str(uuid.uuid5(_CARD_NAMESPACE, f"{seed}/{kind}"))


def _footer(brief: Brief) -> str:
    lines = []
    if brief.models:
        lines.append("Models:")
        lines.extend(f"- {_md(m.name)}: {_md(m.description)}" for m in brief.models)
        lines.append("")
    lines.append(f"_{RESEARCH_USE_NOTE}_")
    return "\n".join(lines)


def _legs_used(brief: Brief) -> list[str]:
    """The legs that returned any of the cases, in the order they were run."""
    return list(dict.fromkeys(m.leg for hit in brief.cases for m in hit.legs))


def _case_row(i: int, hit: CaseHit, legs: list[str]) -> str:
    cells = []
    for leg in legs:
        match = hit.leg(leg)
        cells.append("-" if match is None else f"{match.rank} ({match.metric} {match.score:.2f})")
    findings = ", ".join(_finding(f) for f in hit.case.findings) or "none recorded"
    return (
        "| "
        + " | ".join(
            [str(i), _md(hit.case.case_id), _md(hit.case.study_uid), _md(findings), *cells]
        )
        + " |"
    )


def _app_link(app: SmartApp, brief: Brief, instance: str) -> Link:
    context = {
        "hookInstance": instance,
        "cases": [hit.case.case_id for hit in brief.cases],
        "studies": [hit.case.study_uid for hit in brief.cases],
        "pmids": [hit.passage.pmid for hit in brief.passages],
    }
    return Link(
        label=app.label,
        url=app.launch_url,
        type="smart",
        appContext=json.dumps(context, separators=(",", ":")),
    )


def _cases_card(brief: Brief, instance: str, seed: str, app: SmartApp | None) -> IssuedCard:
    counts = Counter(_finding(f) for hit in brief.cases for f in hit.case.findings)
    tally = ", ".join(f"{name} {n}" for name, n in counts.most_common())
    legs = _legs_used(brief)
    summary = f"{len(brief.cases)} similar past cases by {' + '.join(legs)}: {tally}"
    provenance = sorted({hit.case.provenance for hit in brief.cases})
    titles = [_LEG_TITLES.get(leg, f"{leg.capitalize()} rank") for leg in legs]
    detail = "\n".join(
        [
            f"Past cases most similar to this patient, found by independent searches "
            f"({', '.join(legs)}) merged by rank (reciprocal rank fusion). The patient's own "
            "record is never among them. Findings are each case's own recorded findings.",
            "",
            "| " + " | ".join(["#", "Case", "Study UID", "Recorded findings", *titles]) + " |",
            "|" + "---|" * (4 + len(legs)),
            *(_case_row(i, hit, legs) for i, hit in enumerate(brief.cases, start=1)),
            "",
            "Case sources: " + "; ".join(_md(p) for p in provenance),
            "",
            _footer(brief),
        ]
    )
    card = Card(
        uuid=_card_uuid(seed, "cases"),
        summary=_fit(summary),
        detail=detail,
        indicator="info",
        source=Source(label="MediRAG CDS similar-case index"),
        links=[_app_link(app, brief, instance)] if app else None,
    )
    sources = tuple(
        source
        for hit in brief.cases
        for source in (f"case:{hit.case.case_id}", f"study:{hit.case.study_uid}")
    )
    return IssuedCard(card=card, kind="cases", sources=sources)


def _passage_item(i: int, hit: PassageHit) -> str:
    p = hit.passage
    where = ", ".join(x for x in (p.year, p.section) if x)
    head = f"{i}. PMID [{p.pmid}]({PUBMED}{p.pmid}/)" + (f" ({_md(where)})" if where else "")
    if p.title:
        head += f": {_md(p.title)}"
    if p.doi:
        head += f" doi:[{_md(p.doi)}](https://doi.org/{quote(p.doi, safe='/')})"
    return f"{head}\n\n   > {_md(_fit(p.text, 400))}" + _passage_legs(hit)


def _passage_legs(hit: PassageHit) -> str:
    """How the hybrid search ranked the passage; nothing for a dense search alone, whose order
    is the card's."""
    if all(match.leg == "dense" for match in hit.legs):
        return ""
    ranks = ", ".join(f"{match.leg} #{match.rank}" for match in hit.legs)
    return f"\n\n   Ranked: {ranks}."


def _literature_card(brief: Brief, seed: str) -> IssuedCard:
    query = brief.literature_query or ""
    basis = (
        f" The search text is built from {_md(brief.literature_basis)}."
        if brief.literature_basis
        else ""
    )
    detail = "\n".join(
        [
            f"Searched for: {_md(query)}.{basis}",
            "",
            *(_passage_item(i, hit) for i, hit in enumerate(brief.passages, start=1)),
            "",
            _footer(brief),
        ]
    )
    pmids = list(dict.fromkeys(hit.passage.pmid for hit in brief.passages))
    card = Card(
        uuid=_card_uuid(seed, "literature"),
        summary=_fit(f"{len(brief.passages)} PubMed passages on {query}"),
        detail=detail,
        indicator="info",
        source=Source(label="PubMed abstracts", url=PUBMED),
        links=[
            Link(label=f"PubMed {pmid}", url=f"{PUBMED}{pmid}/", type="absolute") for pmid in pmids
        ],
    )
    return IssuedCard(card=card, kind="literature", sources=tuple(f"pmid:{p}" for p in pmids))


def _omissions_card(brief: Brief, seed: str) -> IssuedCard:
    detail = "\n".join(
        [
            "Parts of this result could not be computed:",
            "",
            *(f"- {_md(o)}" for o in brief.omissions),
            "",
            _footer(brief),
        ]
    )
    card = Card(
        uuid=_card_uuid(seed, "omissions"),
        summary=_fit(f"Partial result: {'; '.join(brief.omissions)}"),
        detail=detail,
        indicator="info",
        source=Source(label="MediRAG CDS"),
    )
    return IssuedCard(card=card, kind="omissions")


def brief_cards(
    brief: Brief, *, instance: str, app: SmartApp | None = None, scope: str = ""
) -> list[IssuedCard]:
    """Turn a brief into cards: similar cases, literature, and what was left out.

    Args:
        brief: what was retrieved.
        instance: the hook instance; card uuids are derived from it, so a retried call gets
            the same uuids.
        app: the SMART app showing the full brief; when given, the cases card links to it with
            an ``appContext`` naming the retrieved cases and passages.
        scope: what else tells calls apart (the service and the client), mixed into the card
            uuids so that two services or two clients that use one ``hookInstance`` still get
            distinct cards.

    Returns:
        Zero to three cards; no card for a part that found nothing and left nothing out.
    """
    seed = f"{scope}|{instance}" if scope else instance
    cards: list[IssuedCard] = []
    if brief.cases:
        cards.append(_cases_card(brief, instance, seed, app))
    if brief.passages:
        cards.append(_literature_card(brief, seed))
    if brief.omissions:
        cards.append(_omissions_card(brief, seed))
    return cards
