"""The CDS services this deployment offers, as announced by discovery, and how each answers.

A service is a hook, an id, words for the EHR's administrators, prefetch templates (checked
against the spec when the service is defined, see :mod:`cds_hooks.prefetch`), and the handler
that turns a validated call into a brief. The templates use only the spec's recommended query
subset, so that any conformant EHR can fill them.

The order services (``order-select``, ``order-sign``) answer only for draft chest X-ray and chest
CT orders, and with no card for anything else. Reading the draft orders is FHIR work, so it is
the deployment that hands them the reader (:class:`ImagingOrderReader`, implemented in
``adapters/fhir/orders.py``): this package stays free of adapters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cds_hooks.prefetch import PrefetchTemplate
from cds_hooks.requests import (
    TOKEN_FIELDS,
    OrderSelectContext,
    OrderSignContext,
    PatientViewContext,
)
from core.advisor import Advisor
from core.ports import ClinicalRecords
from core.types import Brief, ImagingOrders

__all__ = [
    "LABS_PREFETCH_KEY",
    "PATIENT_VIEW",
    "HookHandler",
    "ImagingOrderReader",
    "ServiceDefinition",
    "order_select_service",
    "order_sign_service",
    "prefetch_templates",
]

LABS_PREFETCH_KEY = "labs"
"""The prefetch key whose content is the patient's laboratory results, in every service."""


class HookHandler(Protocol):
    """Answers one validated call: a brief, or ``None`` when the service has nothing to say
    (the call gets an empty list of cards)."""

    async def __call__(
        self, advisor: Advisor, context: Any, records: ClinicalRecords, *, deadline: float
    ) -> Brief | None: ...


def prefetch_templates(
    templates: Mapping[str, tuple[str, bool]],
) -> dict[str, tuple[PrefetchTemplate, bool]]:
    """Check and compile ``key -> (template, required)``; raises ``ValueError`` on a bad one."""
    return {
        key: (PrefetchTemplate(template, TOKEN_FIELDS), required)
        for key, (template, required) in templates.items()
    }


@dataclass(frozen=True, slots=True)
class ServiceDefinition:
    """One CDS service.

    Args:
        id: the path segment after ``/cds-services/``.
        hook: the hook it answers.
        title: a short name.
        description: what it does, for the EHR's administrators.
        handler: turns a validated call into a brief.
        prefetch: ``key -> (template, required)``; a required key that cannot be obtained
            fails the call with 412.
        usage_requirements: what the EHR must arrange before using it.
    """

    id: str
    hook: str
    title: str
    description: str
    handler: HookHandler
    prefetch: Mapping[str, tuple[PrefetchTemplate, bool]] = field(default_factory=dict)
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
            entry["prefetch"] = {key: t.template for key, (t, _) in self.prefetch.items()}
        if self.usage_requirements:
            entry["usageRequirements"] = self.usage_requirements
        return entry


PATIENT_PREFETCH = {
    "patient": ("Patient/{{context.patientId}}", False),
    LABS_PREFETCH_KEY: (
        "Observation?patient={{context.patientId}}&category=laboratory&_sort=-date&_count=200",
        True,
    ),
}
"""The Patient read and the laboratory search every service asks for."""

_USAGE = (
    "Send a JWT signed by a client registered with the service (ES384 or RS384). Prefetch the "
    "keys announced here, or send fhirServer and fhirAuthorization with read access to "
    "Observation. Chest X-ray studies are read from the PACS configured for the deployment."
)


async def _patient_view(
    advisor: Advisor, context: PatientViewContext, records: ClinicalRecords, *, deadline: float
) -> Brief:
    return await advisor.brief(context.patientId, records, deadline=deadline)


PATIENT_VIEW = ServiceDefinition(
    id="medirag-patient-view",
    hook="patient-view",
    title="MediRAG similar cases and literature",
    description=(
        "Past cases similar to the patient by chest X-ray and laboratory profile, and literature "
        "passages on their findings, each attributed to its source. Research software, not a "
        "medical device."
    ),
    handler=_patient_view,
    prefetch=prefetch_templates(PATIENT_PREFETCH),
    usage_requirements=_USAGE,
)


class ImagingOrderReader(Protocol):
    """Reads the draft chest imaging orders of an order hook's ``draftOrders``.

    Implementations skip what they cannot read and say why in ``ImagingOrders.skipped``; the
    call's context has already been checked to hold a Bundle of JSON objects.
    """

    def __call__(
        self,
        draft_orders: Mapping[str, Any],
        *,
        patient_id: str,
        selections: Sequence[str] | None = None,
    ) -> ImagingOrders: ...


def _order_handler(read_orders: ImagingOrderReader) -> HookHandler:
    """The handler of both order hooks: a brief for the call's chest imaging orders, or no card.

    ``order-select`` considers only the selected orders, ``order-sign`` all of them. Several
    chest imaging orders make one brief, searched with all their reasons
    (:meth:`core.advisor.Advisor.brief_for_orders`). Draft orders that could not be read are
    listed among the brief's omissions. Without a chest imaging order the patient's record is
    not even fetched.
    """

    async def handle(
        advisor: Advisor,
        context: OrderSignContext,
        records: ClinicalRecords,
        *,
        deadline: float,
    ) -> Brief | None:
        found = read_orders(
            context.draftOrders.model_dump(),
            patient_id=context.patientId,
            selections=context.selections if isinstance(context, OrderSelectContext) else None,
        )
        if not found.orders:
            return None
        brief = await advisor.brief_for_orders(
            context.patientId, records, found.orders, deadline=deadline
        )
        if found.skipped:
            brief = dataclasses.replace(brief, omissions=(*brief.omissions, *found.skipped))
        return brief

    return handle


_ORDER_DESCRIPTION = (
    "For a draft chest X-ray or chest CT order {when}: past cases similar to the patient by chest "
    "X-ray, laboratory profile and the order's reason, and literature passages on the reason, "
    "each attributed to its source. No card for other orders. Research software, not a medical "
    "device."
)


def order_select_service(read_orders: ImagingOrderReader) -> ServiceDefinition:
    """The ``order-select`` service (``medirag-order-select``): the selected orders only.

    Args:
        read_orders: reads the chest imaging orders of a call's ``draftOrders``.
    """
    return ServiceDefinition(
        id="medirag-order-select",
        hook="order-select",
        title="MediRAG similar cases and literature for a selected chest imaging order",
        description=_ORDER_DESCRIPTION.format(when="as it is selected"),
        handler=_order_handler(read_orders),
        prefetch=prefetch_templates(PATIENT_PREFETCH),
        usage_requirements=_USAGE,
    )


def order_sign_service(read_orders: ImagingOrderReader) -> ServiceDefinition:
    """The ``order-sign`` service (``medirag-order-sign``): every draft order of the call.

    Args:
        read_orders: reads the chest imaging orders of a call's ``draftOrders``.
    """
    return ServiceDefinition(
        id="medirag-order-sign",
        hook="order-sign",
        title="MediRAG similar cases and literature for chest imaging orders being signed",
        description=_ORDER_DESCRIPTION.format(when="about to be signed"),
        handler=_order_handler(read_orders),
        prefetch=prefetch_templates(PATIENT_PREFETCH),
        usage_requirements=_USAGE,
    )
