"""The card ledger: which cards the service issued, so that feedback on them can be evaluated.

Each answered call records its cards (uuid, service, kind, and the sources each card attributes)
without any patient identifier; feedback posted later names a card by its uuid, and is recorded
only against a card that the same service issued to the same client, so that one EHR cannot
write (or probe) the evaluation of another's cards. The deployment keeps the ledger in the index
database; the HTTP layer only sees this Protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from core.cards import IssuedCard
from core.feedback import CardFeedback

__all__ = ["CardLedger"]


class CardLedger(Protocol):
    """Where issued cards and the feedback on them are recorded."""

    async def record_issued(
        self, *, service_id: str, hook_instance: str, client: str, cards: Sequence[IssuedCard]
    ) -> None:
        """Record the cards of one answered call (running it twice changes nothing)."""
        ...

    async def record_feedback(
        self, *, service_id: str, client: str, feedback: Sequence[CardFeedback]
    ) -> None:
        """Record feedback on cards, all of it or none.

        Every item is appended, repeats included: the spec lets an EHR report a card more than
        once.

        Args:
            service_id: the service whose feedback endpoint was called.
            client: the authenticated client (the JWT issuer).
            feedback: the items, in the order the request gave them.

        Raises:
            core.feedback.UnknownCards: some items name cards that ``service_id`` did not issue
                to ``client``; nothing was recorded.
            core.errors.SourceUnavailable: the ledger cannot be reached; nothing was recorded.
        """
        ...
