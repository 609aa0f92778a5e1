"""Feedback on issued cards: what clinicians did with them, and the evaluation it adds up to.

CDS Hooks lets the EHR tell a service, after the fact, that a user accepted a card's suggestions
or overrode the card (https://cds-hooks.hl7.org/2.0/#feedback). Recorded against the ledger of
issued cards, which knows each card's kind and the sources it showed, that feedback says which
parts of a brief clinicians act on and which sources they set aside. These types carry it
between the HTTP layer, which validates it, and the ledger, which stores and summarises it;
they hold no patient identifier.

A card's outcome in the summary is its latest feedback (by the time the user acted): a card once
ignored may be acted on later, and an EHR may report the same interaction more than once, so
counting reports would count some cards twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

__all__ = [
    "CardFeedback",
    "FeedbackReport",
    "KindSummary",
    "Outcome",
    "ReasonCount",
    "SourceSummary",
    "UnknownCards",
]

Outcome = Literal["accepted", "overridden"]
"""What the user did with a card (the spec's two outcomes; an ignored card sends nothing)."""


@dataclass(frozen=True, slots=True)
class CardFeedback:
    """One user interaction with one card, as the EHR reported it.

    Args:
        card_uuid: the ``uuid`` of the card.
        outcome: accepted (some of its suggestions) or overridden (the whole card).
        outcome_timestamp: when the user acted (timezone-aware).
        accepted_suggestions: the ``uuid`` of each suggestion accepted; empty when overridden.
        reason_system: the code system of the override reason the user chose, if any.
        reason_code: its code.
        reason_display: its display text, when the EHR sent one.
        user_comment: the user's free-text comment; it may hold patient data, so it is stored
            but never logged, reported or echoed.
    """

    card_uuid: str
    outcome: Outcome
    outcome_timestamp: datetime
    accepted_suggestions: tuple[str, ...] = ()
    reason_system: str | None = None
    reason_code: str | None = None
    reason_display: str | None = None
    user_comment: str | None = None


class UnknownCards(Exception):
    """Feedback names cards the service did not issue to that client; nothing was recorded.

    Args:
        positions: the positions, in the feedback given, of the items naming such cards.
    """

    def __init__(self, positions: tuple[int, ...]) -> None:
        super().__init__(f"{len(positions)} feedback item(s) name cards not issued")
        self.positions = positions


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass(frozen=True, slots=True)
class ReasonCount:
    """How many overridden cards had one override reason as their latest.

    Args:
        system: the reason's code system; ``None`` for overrides without a coded reason.
        code: the reason's code; ``None`` likewise.
        display: a display text the EHR sent with it, if any.
        cards: the number of cards.
    """

    system: str | None
    code: str | None
    display: str | None
    cards: int


@dataclass(frozen=True, slots=True)
class KindSummary:
    """The cards of one kind one service issued, and what became of them.

    ``accepted + overridden == with_feedback``: each card counts once, by its latest feedback.

    Args:
        service_id: the service.
        kind: the card kind (``"cases"``, ``"literature"``, ``"omissions"``).
        issued: cards issued.
        with_feedback: cards that received any feedback (the others were ignored, so far).
        feedback: feedback reports received on them, repeats included.
        accepted: cards whose latest feedback accepted suggestions.
        overridden: cards whose latest feedback overrode them.
        reasons: the override reasons of the overridden cards, most frequent first.
    """

    service_id: str
    kind: str
    issued: int
    with_feedback: int
    feedback: int
    accepted: int
    overridden: int
    reasons: tuple[ReasonCount, ...] = ()

    @property
    def feedback_rate(self) -> float | None:
        """The share of issued cards that received feedback; ``None`` when none were issued."""
        return _rate(self.with_feedback, self.issued)

    @property
    def accepted_rate(self) -> float | None:
        """The share of cards with feedback that were accepted; ``None`` without feedback."""
        return _rate(self.accepted, self.with_feedback)

    @property
    def overridden_rate(self) -> float | None:
        """The share of cards with feedback that were overridden; ``None`` without feedback."""
        return _rate(self.overridden, self.with_feedback)


@dataclass(frozen=True, slots=True)
class SourceSummary:
    """How the cards of one service that showed one source fared.

    Args:
        service_id: the service.
        source: the source as the card attributed it (``"case:<id>"``, ``"study:<uid>"``,
            ``"pmid:<id>"``).
        issued: cards that showed it.
        accepted: of those, cards whose latest feedback accepted them.
        overridden: of those, cards whose latest feedback overrode them.
    """

    service_id: str
    source: str
    issued: int
    accepted: int
    overridden: int

    @property
    def accepted_rate(self) -> float | None:
        """The share of its cards with feedback that were accepted; ``None`` without any."""
        return _rate(self.accepted, self.accepted + self.overridden)


@dataclass(frozen=True, slots=True)
class FeedbackReport:
    """The evaluation summary of the ledger.

    Args:
        kinds: by service and card kind, ordered by both.
        sources: by service and source, the most shown first.
    """

    kinds: tuple[KindSummary, ...]
    sources: tuple[SourceSummary, ...]

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data, rates included (``null`` where undefined).

        Examples:
            >>> FeedbackReport(kinds=(), sources=()).to_json()
            {'kinds': [], 'sources': []}
        """
        return {
            "kinds": [
                {
                    "service_id": k.service_id,
                    "kind": k.kind,
                    "issued": k.issued,
                    "with_feedback": k.with_feedback,
                    "feedback": k.feedback,
                    "accepted": k.accepted,
                    "overridden": k.overridden,
                    "feedback_rate": k.feedback_rate,
                    "accepted_rate": k.accepted_rate,
                    "overridden_rate": k.overridden_rate,
                    "override_reasons": [
                        {"system": r.system, "code": r.code, "display": r.display, "cards": r.cards}
                        for r in k.reasons
                    ],
                }
                for k in self.kinds
            ],
            "sources": [
                {
                    "service_id": s.service_id,
                    "source": s.source,
                    "issued": s.issued,
                    "accepted": s.accepted,
                    "overridden": s.overridden,
                    "accepted_rate": s.accepted_rate,
                }
                for s in self.sources
            ],
        }
