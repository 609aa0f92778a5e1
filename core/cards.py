"""CDS Hooks cards: models that cannot express an invalid card.

The models follow CDS Hooks 2.0 (https://cds-hooks.hl7.org/2.0/#card-attributes): ``summary``
shorter than 140 characters, ``indicator`` one of ``info``/``warning``/``critical``, a ``source``
with a ``label`` and absolute URLs, ``selectionBehavior`` whenever there are suggestions, a
``system`` on every coding and a ``display`` on every override reason, absolute link URLs, and
``appContext`` only on links of type ``smart``. The spec forbids ``null`` and empty elements, so
empty lists are dropped and serialisation leaves out unset fields.

:mod:`core.brief_cards` renders a brief with these models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "SUMMARY_MAX",
    "AbsoluteUrl",
    "Action",
    "Card",
    "CdsResponse",
    "Coding",
    "IssuedCard",
    "Link",
    "OverrideReason",
    "Source",
    "Suggestion",
]

SUMMARY_MAX = 139
"""The spec asks for a "<140-character" summary."""


def _absolute(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an absolute http(s) URL: {url!r}")
    return url


AbsoluteUrl = Annotated[str, AfterValidator(_absolute)]
"""A string that must be an absolute ``http``/``https`` URL (the spec's URL fields)."""


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
    """A coding: ``code`` and ``system`` are required by the spec, ``display`` is optional."""

    code: str = Field(min_length=1)
    system: str = Field(min_length=1)
    display: str | None = Field(default=None, min_length=1)


class OverrideReason(Coding):
    """A reason a clinician may give for overriding a card; ``display`` is required."""

    display: str = Field(min_length=1)


class Source(_Model):
    """Where a card's guidance comes from; ``label`` is required."""

    label: str = Field(min_length=1)
    url: AbsoluteUrl | None = None
    icon: AbsoluteUrl | None = None
    topic: Coding | None = None


class Link(_Model):
    """A link on a card; ``appContext`` only on ``smart`` links."""

    label: str = Field(min_length=1)
    url: AbsoluteUrl
    type: Literal["absolute", "smart"]
    appContext: str | None = Field(default=None, min_length=1)
    autolaunchable: bool | None = None

    @model_validator(mode="after")
    def _app_context_only_on_smart(self) -> Link:
        if self.appContext is not None and self.type != "smart":
            raise ValueError("appContext is only valid on links of type 'smart'")
        return self


class Action(_Model):
    """A suggested change to the record: ``create`` and ``update`` carry the whole resource,
    ``delete`` names it by ``resourceId`` (never by a string in ``resource``)."""

    type: Literal["create", "update", "delete"]
    description: str = Field(min_length=1)
    resource: dict[str, Any] | None = None
    resourceId: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _resource_for_type(self) -> Action:
        if self.type in ("create", "update"):
            if self.resource is None or not isinstance(self.resource.get("resourceType"), str):
                raise ValueError(f"a {self.type} action carries the whole FHIR resource")
        elif self.resource is not None or self.resourceId is None:
            raise ValueError("a delete action names its resource by resourceId only")
        return self


class Suggestion(_Model):
    """A set of actions the clinician may accept together."""

    label: str = Field(min_length=1)
    uuid: str | None = Field(default=None, min_length=1)
    isRecommended: bool | None = None
    actions: list[Action] | None = None


class Card(_Model):
    """One CDS Hooks card."""

    uuid: str | None = Field(default=None, min_length=1)
    summary: str = Field(min_length=1, max_length=SUMMARY_MAX)
    detail: str | None = Field(default=None, min_length=1)
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


@dataclass(frozen=True, slots=True)
class IssuedCard:
    """A card as issued, with what it is about, for the feedback ledger.

    Args:
        card: the card sent to the EHR.
        kind: which part of the brief it shows (``"cases"``, ``"literature"``, ``"omissions"``).
        sources: the identifiers it attributes (``"case:<id>"``, ``"study:<uid>"``,
            ``"pmid:<id>"``), so feedback can be traced to the sources shown.
    """

    card: Card
    kind: str
    sources: tuple[str, ...] = ()
