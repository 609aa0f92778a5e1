"""Reading HTTP ``Retry-After`` headers, for every adapter that talks to a busy server.

A FHIR server and a PACS both answer 429 (Too Many Requests) or 503 (Service Unavailable) with a
``Retry-After`` that says how long to wait; the adapters honour it only within their own time
budget (see :mod:`adapters.fhir.resilience` and :mod:`adapters.imaging.dicomweb`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = ["retry_after_seconds"]


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for, in seconds (RFC 9110, section 10.2.3).

    Args:
        value: the header: delay-seconds (``"120"``) or an HTTP-date.
        now: the current time, for an HTTP-date (the system clock, UTC, by default).

    Returns:
        The seconds to wait (0 for a date in the past), or ``None`` when the header is missing
        or unreadable.

    Examples:
        >>> retry_after_seconds("3")
        3.0
        >>> now = datetime(2015, 10, 21, 7, 28, tzinfo=UTC)
        >>> retry_after_seconds("Wed, 21 Oct 2015 07:28:30 GMT", now=now)
        30.0
        >>> retry_after_seconds("soon") is None
        True
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT; parsedate drops a "-0000" zone
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
