"""Errors the domain understands. Adapters translate library and protocol failures into these."""

from __future__ import annotations

__all__ = ["MedicalDataError", "SourceUnavailable"]


class MedicalDataError(Exception):
    """Base class for failures to obtain or interpret clinical data."""


class SourceUnavailable(MedicalDataError):
    """A data source could not answer (down, refused, timed out, or sent something unusable).

    Args:
        source: which source, in words safe to log and show (``"FHIR server"``, ``"imaging"``);
            never a token or a patient identifier.
        reason: why, in the same terms.

    Examples:
        >>> str(SourceUnavailable("FHIR server", "timed out after 4.0 s"))
        'FHIR server unavailable: timed out after 4.0 s'
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source} unavailable: {reason}")
        self.source = source
        self.reason = reason
