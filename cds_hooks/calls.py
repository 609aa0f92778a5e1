"""A service call, from body to cards, inside its deadline.

The steps: parse the body (size and depth limited by the middleware and :func:`parse_json`),
validate it for the service's hook, find or compute the answer for its ``hookInstance``, and to
compute it: resolve the prefetch keys the service needs (fetching missing ones from the call's
FHIR server), run the service's handler with the call's deadline, render the cards, record them
in the ledger. Every failure has its status: 400 malformed, 409 a reused ``hookInstance``, 412
required data unobtainable, 503 when the deadline is passed anyway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from cds_hooks.idempotency import Answer, HookInstanceCache, HookInstanceConflict, call_digest
from cds_hooks.ledger import CardLedger
from cds_hooks.outcomes import IssueCode
from cds_hooks.prefetch import FhirAccess, FhirFetcher, PrefetchResolver
from cds_hooks.requests import HOOK_CONTEXTS, HookRequest, fhir_server_allowed, parse_json
from cds_hooks.services import LABS_PREFETCH_KEY, ServiceDefinition
from core.advisor import Advisor
from core.brief_cards import SmartApp, brief_cards
from core.cards import CdsResponse
from core.errors import SourceUnavailable
from core.ports import ClinicalRecords
from core.types import LabResult

__all__ = ["CallPolicy", "CallRejected", "Caller", "answer_call"]

log = logging.getLogger(__name__)

# Time kept after the handler's deadline to render and send the answer.
_GRACE_S = 0.25


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """Limits on service calls.

    Args:
        deadline_s: the time a call may take, end to end; work that would pass it is cut.
        max_body_bytes: the largest request body accepted (413 beyond).
        max_json_depth: the deepest nesting of JSON accepted (400 beyond).
        allow_loopback_http: accept ``http://`` FHIR servers on loopback (development only).
    """

    deadline_s: float = 4.0
    max_body_bytes: int = 4 * 1024 * 1024
    max_json_depth: int = 64
    allow_loopback_http: bool = False


class CallRejected(Exception):
    """The call cannot be answered; ``status`` and ``diagnostics`` make the OperationOutcome."""

    def __init__(self, status: int, code: IssueCode, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics


@dataclass(frozen=True, slots=True)
class Caller:
    """What answering a call needs from the deployment.

    Args:
        advisor: builds briefs.
        fhir: makes fetchers for the FHIR servers calls name.
        parse_labs: turns a resolved labs prefetch value into the patient's record.
        default_fhir: the deployment's own FHIR source for calls that name no server.
        policy: limits on calls.
        cache: answers by hook instance.
        smart_app: the SMART app the cards link to, if any.
        ledger: where issued cards are recorded, if anywhere.
    """

    advisor: Advisor
    fhir: FhirAccess
    parse_labs: Callable[[Mapping[str, Any] | None], ClinicalRecords]
    default_fhir: FhirFetcher | None
    policy: CallPolicy
    cache: HookInstanceCache
    smart_app: SmartApp | None = None
    ledger: CardLedger | None = None


def _validation_message(error: ValidationError, prefix: str = "") -> str:
    # Only locations and rule messages: pydantic's "input" would echo request data.
    return "; ".join(
        f"{prefix}{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
        for e in error.errors()
    )


class _ResolvedLabs:
    """The patient's record for one call: its labs prefetch key, resolved when first needed."""

    def __init__(self, resolver: PrefetchResolver, parse: Callable[[Any], ClinicalRecords]):
        self._resolver = resolver
        self._parse = parse

    async def laboratory_results(self, patient_id: str) -> tuple[LabResult, ...]:
        value = await self._resolver.value(LABS_PREFETCH_KEY)
        return tuple(await self._parse(value).laboratory_results(patient_id))


def _parse_call(
    service: ServiceDefinition, body: bytes, policy: CallPolicy
) -> tuple[HookRequest, Any, dict[str, Any]]:
    try:
        raw = parse_json(body, max_depth=policy.max_json_depth)
        call = HookRequest.model_validate(raw)
    except ValueError as error:
        message = _validation_message(error) if isinstance(error, ValidationError) else str(error)
        raise CallRejected(400, "invalid", message) from None
    if call.hook != service.hook:
        raise CallRejected(
            400, "invalid", f"service {service.id} answers {service.hook!r}, not {call.hook!r}"
        )
    try:
        context = HOOK_CONTEXTS[service.hook].model_validate(call.context)
    except ValidationError as error:
        raise CallRejected(400, "invalid", _validation_message(error, "context.")) from None
    if call.fhirServer and not fhir_server_allowed(
        call.fhirServer, allow_loopback_http=policy.allow_loopback_http
    ):
        raise CallRejected(400, "invalid", "fhirServer must be an https URL")
    return call, context, raw


async def _compute(
    service: ServiceDefinition, call: HookRequest, context: Any, caller: Caller, client: str
) -> Answer:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + caller.policy.deadline_s - _GRACE_S
    token = (
        call.fhirAuthorization.access_token.get_secret_value()
        if call.fhirAuthorization is not None
        else None
    )
    # The spec lets a service use the client's FHIR server only with the access token the
    # client grants; a call naming a server without one gets nothing fetched from it (and not
    # the deployment's own source either: the call said where its data lives).
    fetcher: FhirFetcher | None = caller.default_fhir
    no_fetcher = "no FHIR server to ask"
    if call.fhirServer and token is not None:
        fetcher = caller.fhir.fetcher(call.fhirServer, token)
    elif call.fhirServer:
        fetcher, no_fetcher = None, "no fhirAuthorization to ask fhirServer with"
    resolver = PrefetchResolver(
        service.prefetch,
        call.prefetch,
        context=call.context,
        user_id=context.userId,
        fetcher=fetcher,
        no_fetcher=no_fetcher,
    )
    try:
        async with asyncio.timeout_at(deadline + _GRACE_S / 2):
            brief = await service.handler(
                caller.advisor,
                context,
                _ResolvedLabs(resolver, caller.parse_labs),
                deadline=deadline,
            )
    except SourceUnavailable as error:
        log.warning("precondition failed", extra={"service": service.id, "reason": str(error)})
        raise CallRejected(412, "processing", str(error)) from None
    except TimeoutError:
        log.error("call overran its deadline", extra={"service": service.id})
        raise CallRejected(
            503, "timeout", f"no answer within the call's {caller.policy.deadline_s:.1f} s"
        ) from None
    finally:
        resolver.close()
    if brief is None:
        return Answer(200, CdsResponse(cards=[]).to_json())
    omitted = tuple(f"prefetch '{key}' left out: {why}" for key, why in resolver.omitted)
    if omitted:
        brief = dataclasses.replace(brief, omissions=(*brief.omissions, *omitted))
    issued = brief_cards(
        brief,
        instance=str(call.hookInstance),
        app=caller.smart_app,
        scope=f"{service.id}|{client}",
    )
    if caller.ledger is not None:
        try:
            await caller.ledger.record_issued(
                service_id=service.id,
                hook_instance=str(call.hookInstance),
                client=client,
                cards=issued,
            )
        except SourceUnavailable as error:
            # The clinician still gets the cards; only the feedback evaluation loses them.
            log.warning("cards not recorded in the ledger", extra={"reason": str(error)})
    log.info(
        "hook answered",
        extra={
            "service": service.id,
            "hook_instance": str(call.hookInstance),
            "cards": len(issued),
            "omissions": len(brief.omissions),
            "fetched": list(resolver.fetched),
        },
    )
    return Answer(200, CdsResponse(cards=[i.card for i in issued]).to_json())


async def answer_call(
    service: ServiceDefinition, body: bytes, caller: Caller, *, client: str
) -> Answer:
    """Answer one call to ``service``.

    Args:
        service: the service called.
        body: the raw request body.
        caller: what the deployment provides.
        client: the authenticated caller's issuer (``"insecure-dev"`` without authentication);
            hook instances are scoped to it.

    Raises:
        CallRejected: with the status and diagnostics of the OperationOutcome to send.
    """
    call, context, raw = _parse_call(service, body, caller.policy)
    key = (client, service.id, str(call.hookInstance))
    try:
        return await caller.cache.answer(
            key, call_digest(raw), lambda: _compute(service, call, context, caller, client)
        )
    except HookInstanceConflict:
        raise CallRejected(
            409, "conflict", "hookInstance was already used for a different call"
        ) from None
