"""The CDS services this deployment offers, as announced by discovery.

A service is a hook, an id, words for the EHR's administrators, and prefetch templates. The
templates use only the spec's recommended query subset (instance reads, type searches on the
patient, token equality, ``_count``, ``_sort``) so that any conformant EHR can fill them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LABS_PREFETCH_KEY", "PATIENT_VIEW", "ServiceDefinition"]

LABS_PREFETCH_KEY = "labs"


@dataclass(frozen=True, slots=True)
class ServiceDefinition:
    """One CDS service.

    Args:
        id: the path segment after ``/cds-services/``.
        hook: the hook it answers.
        title: a short name.
        description: what it does, for the EHR's administrators.
        prefetch: prefetch templates by key.
        usage_requirements: what the EHR must arrange before using it.
    """

    id: str
    hook: str
    title: str
    description: str
    prefetch: dict[str, str] = field(default_factory=dict)
    usage_requirements: str | None = None

    def discovery_entry(self) -> dict[str, Any]:
        """The service's entry in the discovery response."""
        entry: dict[str, Any] = {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
        }
        if self.prefetch:
            entry["prefetch"] = dict(self.prefetch)
        if self.usage_requirements:
            entry["usageRequirements"] = self.usage_requirements
        return entry


PATIENT_VIEW = ServiceDefinition(
    id="medirag-patient-view",
    hook="patient-view",
    title="MediRAG similar cases and literature",
    description=(
        "Past cases similar to the patient by chest X-ray and laboratory profile, and literature "
        "passages on their findings, each attributed to its source. Research software, not a "
        "medical device."
    ),
    prefetch={
        "patient": "Patient/{{context.patientId}}",
        LABS_PREFETCH_KEY: (
            "Observation?patient={{context.patientId}}&category=laboratory&_sort=-date&_count=200"
        ),
    },
    usage_requirements=(
        "Send a signed JWT from a client registered with the service. Chest X-ray studies are read "
        "from the PACS configured for the deployment."
    ),
)
