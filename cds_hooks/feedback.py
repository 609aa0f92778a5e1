"""The feedback endpoint: what the EHR's users did with the cards, validated and recorded.

``POST {baseUrl}/cds-services/{id}/feedback`` (https://cds-hooks.hl7.org/2.0/#feedback) takes
``{"feedback": [...]}``, one item per user interaction with a card. Validation is as strict as
the spec, and where the spec leaves room it chooses:

* ``card`` and ``outcome`` (``accepted`` or ``overridden``) and ``outcomeTimestamp`` are
  required. ``outcomeTimestamp`` must be an RFC 3339 (section 5.6) date-time with its offset;
  the spec asks for UTC, but any offset names one instant, so it is accepted and stored as that
  instant rather than losing the feedback over a formatting choice. A time without an offset is
  ambiguous and refused.
* ``accepted`` requires ``acceptedSuggestions`` (non-empty: the spec forbids empty arrays) and
  takes no ``overrideReason``; ``overridden`` takes no ``acceptedSuggestions``: "while one or
  more suggestions can be accepted, an entire card is either ignored or overridden", so an item
  that says both is contradictory and refused rather than guessed at.
* ``overrideReason`` holds a ``reason`` Coding (``system`` and ``code`` required, ``display``
  optional since an EHR may offer reasons of its own) and/or a ``userComment``; it cannot be
  empty.
* The spec forbids ``null`` and empty values and defines no other fields; custom data belongs
  in ``extension``, which it reserves on every object and which must be a non-empty JSON object.
  So ``extension`` is accepted (and not stored) on the request, each item, each accepted
  suggestion and the override reason, and any other unknown field is refused: a typo in a field
  name would otherwise silently drop what the EHR meant to report.

Feedback may only name cards that the service issued to the same client (the card ledger knows
them). A request naming any other card is refused whole with 422 and nothing is recorded: the
request is well-formed, so 400 would mislead, and 404 would read as "no feedback endpoint"; the
spec defines no per-item answer, so recording part of a request would leave the EHR unable to
tell what was kept. A request is recorded whole or not at all, and each item is appended even
when it repeats an earlier one, as the spec allows feedback on a card several times.

The answer is 200 with an empty JSON object. The spec defines no response body; HAPI FHIR's CDS
Hooks server answers 200 with a JSON body, so EHRs built against it parse one. Nothing of the
request is echoed: the user comment may hold patient data. Without a ledger the deployment does
not offer feedback and answers 404; when the ledger is down, 503 (retry later), with the
database's reason in the log only. The log names services, counts and card uuids, never the
comment or the user.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from cds_hooks.calls import Caller, CallRejected
from cds_hooks.idempotency import Answer
from cds_hooks.requests import parse_json
from core.errors import SourceUnavailable
from core.feedback import CardFeedback, UnknownCards

__all__ = [
    "AcceptedSuggestion",
    "Feedback",
    "FeedbackRequest",
    "OverrideReason",
    "ReasonCoding",
    "answer_feedback",
    "parse_rfc3339",
]

log = logging.getLogger(__name__)

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def parse_rfc3339(value: str) -> datetime:
    """Parse an RFC 3339 (section 5.6) ``date-time`` into an aware datetime in UTC.

    Fractions of a second beyond microseconds are cut; a leap second (``:60``) is refused.

    Raises:
        ValueError: not an RFC 3339 date-time with an offset, or not a real date and time
            (the message does not repeat the value).

    Examples:
        >>> parse_rfc3339("1985-04-12T23:20:50.52Z").isoformat()
        '1985-04-12T23:20:50.520000+00:00'
        >>> parse_rfc3339("2021-12-11T11:05:31+01:00").isoformat()
        '2021-12-11T10:05:31+00:00'
    """
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("must be an RFC 3339 date-time with an offset, like 2021-12-11T10:05:31Z")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        offset = (
            UTC
            if zulu
            else timezone(
                (1 if sign == "+" else -1) * timedelta(hours=int(off_h), minutes=int(off_m))
            )
        )
        moment = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=offset,
        )
    except ValueError:
        raise ValueError("is not a valid date and time") from None
    return moment.astimezone(UTC)


def _timestamp(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return parse_rfc3339(value)


_Text = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
_Timestamp = Annotated[datetime, BeforeValidator(_timestamp)]
_Extension = Annotated[dict[str, Any], Field(min_length=1)]


class _Element(BaseModel):
    """A spec object: no ``null`` values, no fields but its own and ``extension``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    extension: _Extension | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        # The spec: "JSON elements SHALL NOT be null"; an absent field is left out instead.
        if isinstance(data, dict):
            nulls = sorted(str(key) for key, value in data.items() if value is None)
            if nulls:
                raise ValueError(f"{', '.join(nulls)}: null is not allowed; leave the field out")
        return data


class AcceptedSuggestion(_Element):
    """A suggestion the user accepted, by the ``uuid`` the card gave it."""

    id: _Text


class ReasonCoding(_Element):
    """The override reason the user chose: a CDS Hooks Coding (``system`` and ``code``)."""

    code: _Text
    system: _Text
    display: _Text | None = None


class OverrideReason(_Element):
    """Why the user overrode a card: a coded reason, a comment, or both."""

    reason: ReasonCoding | None = None
    userComment: Annotated[str, StringConstraints(min_length=1)] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> OverrideReason:
        if self.reason is None and self.userComment is None:
            raise ValueError("overrideReason needs a reason, a userComment, or both")
        return self


class Feedback(_Element):
    """One user interaction with one card."""

    card: _Text
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: Annotated[list[AcceptedSuggestion], Field(min_length=1)] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: _Timestamp

    @model_validator(mode="after")
    def _fields_match_outcome(self) -> Feedback:
        if self.outcome == "accepted":
            if self.acceptedSuggestions is None:
                raise ValueError("acceptedSuggestions is required when the outcome is accepted")
            if self.overrideReason is not None:
                raise ValueError("overrideReason is only allowed when the outcome is overridden")
        elif self.acceptedSuggestions is not None:
            raise ValueError("acceptedSuggestions is only allowed when the outcome is accepted")
        return self

    def to_card_feedback(self) -> CardFeedback:
        """The interaction as the ledger records it."""
        reason = self.overrideReason.reason if self.overrideReason else None
        return CardFeedback(
            card_uuid=self.card,
            outcome=self.outcome,
            outcome_timestamp=self.outcomeTimestamp,
            accepted_suggestions=tuple(s.id for s in self.acceptedSuggestions or ()),
            reason_system=reason.system if reason else None,
            reason_code=reason.code if reason else None,
            reason_display=reason.display if reason else None,
            user_comment=self.overrideReason.userComment if self.overrideReason else None,
        )


class FeedbackRequest(_Element):
    """The body of a feedback request: one or more interactions."""

    feedback: Annotated[list[Feedback], Field(min_length=1)]


def _problems(error: ValidationError) -> str:
    # Locations and rule messages only: pydantic's "input" would echo request data.
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
    )


def _positions(positions: Sequence[int]) -> str:
    shown = ", ".join(f"feedback[{i}]" for i in positions[:10])
    return shown + (f" and {len(positions) - 10} more" if len(positions) > 10 else "")


async def answer_feedback(service_id: str, body: bytes, caller: Caller, *, client: str) -> Answer:
    """Validate and record one feedback request to ``service_id``.

    Args:
        service_id: the service whose feedback endpoint was called (it exists).
        body: the raw request body (its size already limited).
        caller: the deployment's limits and ledger.
        client: the authenticated caller's issuer; it may only give feedback on its own cards.

    Returns:
        200 with an empty JSON object once every item is recorded.

    Raises:
        CallRejected: 404 when the deployment keeps no ledger, 400 for a malformed request,
            422 when an item names a card the service did not issue to ``client``, 503 when the
            ledger is unavailable; nothing is recorded in each case.
    """
    if caller.ledger is None:
        raise CallRejected(404, "not-found", "this deployment does not take feedback")
    try:
        request = FeedbackRequest.model_validate(
            parse_json(body, max_depth=caller.policy.max_json_depth)
        )
    except ValidationError as error:
        raise CallRejected(400, "invalid", _problems(error)) from None
    except ValueError as error:
        raise CallRejected(400, "invalid", str(error)) from None
    items = [item.to_card_feedback() for item in request.feedback]
    try:
        await caller.ledger.record_feedback(service_id=service_id, client=client, feedback=items)
    except UnknownCards as unknown:
        raise CallRejected(
            422,
            "not-found",
            f"{_positions(unknown.positions)}: no card with this uuid was issued by this service "
            "to this client; nothing was recorded",
        ) from None
    except SourceUnavailable as error:
        log.warning("feedback not recorded", extra={"service": service_id, "reason": str(error)})
        raise CallRejected(
            503, "exception", "the card ledger is unavailable; nothing was recorded, retry later"
        ) from None
    log.info(
        "feedback recorded",
        extra={
            "service": service_id,
            "items": len(items),
            "accepted": sum(item.outcome == "accepted" for item in items),
            "overridden": sum(item.outcome == "overridden" for item in items),
            "cards": sorted({item.card_uuid for item in items}),
        },
    )
    return Answer(200, {})
