"""CDS Hooks cards: models that cannot express an invalid card, and the cards a brief becomes.

The models follow CDS Hooks 2.0 (https://cds-hooks.hl7.org/2.0/#card-attributes): ``summary``
shorter than 140 characters, ``indicator`` one of ``info``/``warning``/``critical``, a ``source``
with a ``label``, ``selectionBehavior`` whenever there are suggestions, a ``display`` on every
override reason, and ``appContext`` only on links of type ``smart``. The spec forbids ``null`` and
empty elements, so empty lists are dropped and serialisation leaves out unset fields.

Every statement on a card names its source: each similar case by case id and study UID with its
provenance, each passage by PMID with a link to PubMed. Every card carries the research-use note.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.types import Brief, CaseHit, PassageHit

__all__ = [
    "RESEARCH_USE_NOTE",
    "SUMMARY_MAX",
    "Action",
    "Card",
    "CdsResponse",
    "Coding",
    "Link",
    "OverrideReason",
    "Source",
    "Suggestion",
    "brief_cards",
]

SUMMARY_MAX = 139
"""The spec asks for a "<140-character" summary."""

RESEARCH_USE_NOTE = (
    "MediRAG CDS is research software, not a medical device: it is not intended for diagnosis "
    "or treatment, and its output must not replace clinical judgement."
)

PUBMED = "https://pubmed.ncbi.nlm.nih.gov/"
_CARD_NAMESPACE = uuid.UUID("0b6c2a3e-6f1d-4c55-9d7e-3c1f3b8a2d10")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    _keep_empty: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _drop_empty_lists(cls, data: Any) -> Any:
        # The spec: "JSON elements SHALL NOT be null or empty"; an empty list means "absent".
        if isinstance(data, dict):
            return {
                k: v
                for k, v in data.items()
                if k in cls._keep_empty or not (isinstance(v, list) and not v)
            }
        return data

    def to_json(self) -> dict[str, Any]:
        """The JSON object as the spec wants it: unset fields left out."""
        return self.model_dump(mode="json", exclude_none=True)


class Coding(_Model):
    """A FHIR-style coding."""

    code: str = Field(min_length=1)
    system: str | None = None
    display: str | None = None


class OverrideReason(Coding):
    """A reason a clinician may give for overriding a card; ``display`` is required."""

    display: str = Field(min_length=1)


class Source(_Model):
    """Where a card's guidance comes from; ``label`` is required."""

    label: str = Field(min_length=1)
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None


class Link(_Model):
    """A link on a card; ``appContext`` only on ``smart`` links."""

    label: str = Field(min_length=1)
    url: str = Field(min_length=1)
    type: Literal["absolute", "smart"]
    appContext: str | None = None
    autolaunchable: bool | None = None

    @model_validator(mode="after")
    def _app_context_only_on_smart(self) -> Link:
        if self.appContext is not None and self.type != "smart":
            raise ValueError("appContext is only valid on links of type 'smart'")
        return self


class Action(_Model):
    """A suggested change to the record."""

    type: Literal["create", "update", "delete"]
    description: str = Field(min_length=1)
    resource: dict[str, Any] | None = None
    resourceId: str | None = None


class Suggestion(_Model):
    """A set of actions the clinician may accept together."""

    label: str = Field(min_length=1)
    uuid: str | None = None
    isRecommended: bool | None = None
    actions: list[Action] | None = None


class Card(_Model):
    """One CDS Hooks card."""

    uuid: str | None = None
    summary: str = Field(min_length=1, max_length=SUMMARY_MAX)
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    suggestions: list[Suggestion] | None = None
    selectionBehavior: Literal["at-most-one", "any"] | None = None
    overrideReasons: list[OverrideReason] | None = None
    links: list[Link] | None = None

    @field_validator("summary")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if "\n" in value:
            raise ValueError("summary must be one line")
        return value

    @model_validator(mode="after")
    def _selection_behavior_with_suggestions(self) -> Card:
        if self.suggestions and self.selectionBehavior is None:
            raise ValueError("selectionBehavior is required when suggestions are present")
        return self


class CdsResponse(_Model):
    """The body of a CDS service's answer."""

    # The one list the spec requires even when empty: "no guidance" is ``{"cards": []}``.
    _keep_empty: ClassVar[frozenset[str]] = frozenset({"cards"})

    cards: list[Card]
    systemActions: list[Action] | None = None


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


def _card_uuid(instance: str, kind: str) -> str:
    # Derived, not random: a retried hook call returns the same card ids.
    return str(uuid.uuid5(_CARD_NAMESPACE, f"{instance}/{kind}"))


def _footer(brief: Brief) -> str:
    lines = []
    if brief.models:
        lines.append("Models:")
        lines.extend(f"- {_md(m.name)}: {_md(m.description)}" for m in brief.models)
        lines.append("")
    lines.append(f"_{RESEARCH_USE_NOTE}_")
    return "\n".join(lines)


def _case_row(i: int, hit: CaseHit) -> str:
    image = (
        f"{hit.image_rank} (cos {hit.image_similarity:.2f})"
        if hit.image_rank is not None and hit.image_similarity is not None
        else "-"
    )
    labs = (
        f"{hit.lab_rank} (dist {hit.lab_distance:.2f})"
        if hit.lab_rank is not None and hit.lab_distance is not None
        else "-"
    )
    findings = ", ".join(_finding(f) for f in hit.case.findings) or "none recorded"
    return (
        f"| {i} | {_md(hit.case.case_id)} | {_md(hit.case.study_uid)} | {_md(findings)} "
        f"| {image} | {labs} |"
    )


def _cases_card(brief: Brief, instance: str) -> Card:
    counts = Counter(_finding(f) for hit in brief.cases for f in hit.case.findings)
    tally = ", ".join(f"{name} {n}" for name, n in counts.most_common())
    legs = [
        name
        for name, used in (
            ("image", any(h.image_rank for h in brief.cases)),
            ("labs", any(h.lab_rank for h in brief.cases)),
        )
        if used
    ]
    summary = f"{len(brief.cases)} similar past cases by {' + '.join(legs)}: {tally}"
    provenance = sorted({hit.case.provenance for hit in brief.cases})
    detail = "\n".join(
        [
            "Past cases most similar to this patient, found by independent image and lab "
            "searches merged by rank (reciprocal rank fusion). The patient's own record is "
            "never among them. Findings are each case's own recorded findings.",
            "",
            "| # | Case | Study UID | Recorded findings | Image rank | Lab rank |",
            "|---|---|---|---|---|---|",
            *(_case_row(i, hit) for i, hit in enumerate(brief.cases, start=1)),
            "",
            "Case sources: " + "; ".join(_md(p) for p in provenance),
            "",
            _footer(brief),
        ]
    )
    return Card(
        uuid=_card_uuid(instance, "cases"),
        summary=_fit(summary),
        detail=detail,
        indicator="info",
        source=Source(label="MediRAG CDS similar-case index"),
    )


def _excerpt(text: str, limit: int = 400) -> str:
    return _fit(text, limit)


def _passage_item(i: int, hit: PassageHit) -> str:
    p = hit.passage
    where = ", ".join(x for x in (p.year, p.section) if x)
    head = f"{i}. PMID [{p.pmid}]({PUBMED}{p.pmid}/)" + (f" ({_md(where)})" if where else "")
    if p.title:
        head += f": {_md(p.title)}"
    return f"{head}\n\n   > {_md(_excerpt(p.text))}"


def _literature_card(brief: Brief, instance: str) -> Card:
    query = brief.literature_query or ""
    detail = "\n".join(
        [
            f"Searched for: {_md(query)}. The search text is built from the findings recorded "
            "in the similar cases and from this patient's abnormal laboratory results.",
            "",
            *(_passage_item(i, hit) for i, hit in enumerate(brief.passages, start=1)),
            "",
            _footer(brief),
        ]
    )
    pmids = list(dict.fromkeys(hit.passage.pmid for hit in brief.passages))
    return Card(
        uuid=_card_uuid(instance, "literature"),
        summary=_fit(f"{len(brief.passages)} PubMed passages on {query}"),
        detail=detail,
        indicator="info",
        source=Source(label="PubMed abstracts", url=PUBMED),
        links=[
            Link(label=f"PubMed {pmid}", url=f"{PUBMED}{pmid}/", type="absolute") for pmid in pmids
        ],
    )


def _omissions_card(brief: Brief, instance: str) -> Card:
    detail = "\n".join(
        [
            "Parts of this result could not be computed:",
            "",
            *(f"- {_md(o)}" for o in brief.omissions),
            "",
            _footer(brief),
        ]
    )
    return Card(
        uuid=_card_uuid(instance, "omissions"),
        summary=_fit(f"Partial result: {'; '.join(brief.omissions)}"),
        detail=detail,
        indicator="info",
        source=Source(label="MediRAG CDS"),
    )


def brief_cards(brief: Brief, *, instance: str) -> list[Card]:
    """Turn a brief into cards: similar cases, literature, and what was left out.

    Args:
        brief: what was retrieved.
        instance: the hook instance; card uuids are derived from it, so a retried call gets
            the same uuids.

    Returns:
        Zero to three cards; no card for a part that found nothing and left nothing out.
    """
    cards: list[Card] = []
    if brief.cases:
        cards.append(_cases_card(brief, instance))
    if brief.passages:
        cards.append(_literature_card(brief, instance))
    if brief.omissions:
        cards.append(_omissions_card(brief, instance))
    return cards
