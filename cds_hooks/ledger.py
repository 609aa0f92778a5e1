"""The card ledger: which cards the service issued, so that feedback on them can be evaluated.

Each answered call records its cards (uuid, service, kind, and the sources each card attributes)
without any patient identifier; feedback posted later names a card by its uuid. The deployment
keeps the ledger in the index database; the HTTP layer only sees this Protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from core.cards import IssuedCard

__all__ = ["CardLedger"]


class CardLedger(Protocol):
    """Where issued cards are recorded."""

    async def record_issued(
        self, *, service_id: str, hook_instance: str, client: str, cards: Sequence[IssuedCard]
    ) -> None:
        """Record the cards of one answered call (running it twice changes nothing)."""
        ...
