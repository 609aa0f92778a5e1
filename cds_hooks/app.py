"""The CDS Hooks HTTP service (FastAPI).

Routes:

* ``GET /cds-services``: discovery.
* ``POST /cds-services/{id}``: a service call; answers cards.

Every route requires a verified JWT (:mod:`cds_hooks.auth`) unless the deployment runs in
insecure development mode, which logs a warning on every request. Errors are FHIR
OperationOutcomes with a status the EHR can act on: 400 for a malformed call, 401 (bare) for a
bad token, 404 for an unknown service, 412 when the patient's record cannot be obtained. A bug
answers 500 with a request reference, never a stack trace.

The app is built by :func:`create_app` around a :class:`Runtime`, which the deployment
(``deploy/``) assembles from adapters; tests assemble their own.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from cds_hooks.auth import AuthenticationError, Authenticator, VerifiedClient
from cds_hooks.outcomes import operation_outcome
from cds_hooks.requests import HookRequest, PatientViewContext, fhir_server_allowed
from cds_hooks.services import LABS_PREFETCH_KEY, PATIENT_VIEW, ServiceDefinition
from core.advisor import Advisor
from core.cards import CdsResponse, brief_cards
from core.errors import SourceUnavailable
from core.ports import ClinicalRecords

__all__ = ["RecordsFactory", "Runtime", "create_app"]

log = logging.getLogger(__name__)


class RecordsFactory(Protocol):
    """Gives the clinical record for one call: its prefetch, else the EHR's FHIR server.

    ``prefetch`` is the call's prefetch object (``None`` when absent), ``fhir_server`` and
    ``access_token`` come from the call. The record is used inside the context and released after.
    """

    def __call__(
        self,
        *,
        prefetch: Mapping[str, Any] | None,
        labs_key: str,
        fhir_server: str | None,
        access_token: str | None,
    ) -> AbstractAsyncContextManager[ClinicalRecords]: ...


@dataclass(frozen=True, slots=True)
class Runtime:
    """What the HTTP layer needs, assembled by the deployment.

    Args:
        advisor: builds briefs.
        records: gives each call its clinical record.
        authenticator: verifies JWTs; ``None`` only in insecure development mode.
        public_base_url: the base URL EHRs call (``https://cds.example.org``); JWT audiences are
            this plus the endpoint path.
        services: the services offered.
        allow_loopback_http: accept ``http://`` FHIR servers on loopback (development only).
    """

    advisor: Advisor
    records: RecordsFactory
    authenticator: Authenticator | None
    public_base_url: str
    services: tuple[ServiceDefinition, ...] = (PATIENT_VIEW,)
    allow_loopback_http: bool = False


class _Unauthorized(Exception):
    pass


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


async def _authenticate(request: Request, runtime: Runtime, path: str) -> VerifiedClient | None:
    if runtime.authenticator is None:
        log.warning("insecure development mode: request not authenticated", extra={"path": path})
        return None
    audience = runtime.public_base_url.rstrip("/") + path
    try:
        return await runtime.authenticator.authenticate(
            request.headers.get("authorization"), audience
        )
    except AuthenticationError as error:
        log.warning("authentication failed", extra={"path": path, "reason": error.reason})
        raise _Unauthorized from error


def _where(error: BaseException) -> str:
    """Exception type and innermost frame: enough to find a bug, no message that may hold data."""
    frames = traceback.extract_tb(error.__traceback__)
    place = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{place}"


def _validation_message(error: ValidationError) -> str:
    # Only locations and rule messages: pydantic's "input" would echo request data.
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
    )


def create_app(
    runtime: Callable[[], AbstractAsyncContextManager[Runtime]],
) -> FastAPI:
    """Build the FastAPI app.

    Args:
        runtime: opens the runtime at start-up and closes it at shutdown.

    Examples:
        >>> # app = create_app(lambda: open_runtime(settings))
        >>> # uvicorn.run(app)
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with runtime() as opened:
            app.state.runtime = opened
            yield

    app = FastAPI(
        title="MediRAG CDS",
        description="CDS Hooks service. Research software, not a medical device.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )

    @app.middleware("http")
    async def contain_errors(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as error:  # noqa: BLE001 - the last line of defence: no trace to EHRs
            reference = str(uuid.uuid4())
            log.error("unhandled error", extra={"reference": reference, "error": _where(error)})
            return operation_outcome(
                500, "exception", f"internal error; reference {reference} in the service log"
            )
        log.info(
            "request",
            extra={
                "method": request.method,
                "path": request.url.path,
                "status": response.status_code,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return response

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, error: _Unauthorized) -> Response:
        return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.get("/cds-services")
    async def discovery(request: Request, runtime: RuntimeDep) -> JSONResponse:
        await _authenticate(request, runtime, "/cds-services")
        return JSONResponse({"services": [s.discovery_entry() for s in runtime.services]})

    @app.post("/cds-services/{service_id}")
    async def call_service(service_id: str, request: Request, runtime: RuntimeDep) -> Response:
        service = next((s for s in runtime.services if s.id == service_id), None)
        await _authenticate(request, runtime, f"/cds-services/{service_id}")
        if service is None:
            return operation_outcome(404, "not-found", f"no CDS service {service_id!r}")
        try:
            call = HookRequest.model_validate(json.loads(await request.body()))
        except json.JSONDecodeError as error:
            return operation_outcome(400, "invalid", f"body is not JSON: {error.msg}")
        except ValidationError as error:
            return operation_outcome(400, "invalid", _validation_message(error))
        if call.hook != service.hook:
            return operation_outcome(
                400, "invalid", f"service {service.id} answers {service.hook!r}, not {call.hook!r}"
            )
        try:
            context = PatientViewContext.model_validate(call.context)
        except ValidationError as error:
            return operation_outcome(400, "invalid", "context." + _validation_message(error))
        if call.fhirServer and not fhir_server_allowed(
            call.fhirServer, allow_loopback_http=runtime.allow_loopback_http
        ):
            return operation_outcome(400, "invalid", "fhirServer must be an https URL")

        token = (
            call.fhirAuthorization.access_token.get_secret_value()
            if call.fhirAuthorization
            else None
        )
        try:
            async with runtime.records(
                prefetch=call.prefetch,
                labs_key=LABS_PREFETCH_KEY,
                fhir_server=call.fhirServer,
                access_token=token,
            ) as records:
                brief = await runtime.advisor.brief(context.patientId, records)
        except SourceUnavailable as error:
            log.warning("precondition failed", extra={"service": service.id, "reason": str(error)})
            return operation_outcome(412, "processing", str(error))
        answer = CdsResponse(cards=brief_cards(brief, instance=str(call.hookInstance)))
        log.info(
            "hook answered",
            extra={
                "service": service.id,
                "hook_instance": str(call.hookInstance),
                "cards": len(answer.cards),
                "omissions": len(brief.omissions),
            },
        )
        return JSONResponse(answer.to_json())

    return app
