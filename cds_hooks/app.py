"""The CDS Hooks HTTP service (FastAPI).

Routes:

* ``GET /cds-services``: discovery, with an ``ETag`` and private caching.
* ``POST /cds-services/{id}``: a service call; answers cards (:mod:`cds_hooks.calls`).
* ``POST /cds-services/{id}/feedback``: what users did with the cards, recorded in the card
  ledger (:mod:`cds_hooks.feedback`); 422 for feedback on a card the service did not issue.

Every route requires a verified JWT (:mod:`cds_hooks.auth`) whose ``aud`` is the URL called,
unless the deployment runs in insecure development mode, which logs a warning on every request.
Errors are FHIR OperationOutcomes with a status the EHR can act on: 400 malformed, 401 (bare)
bad token, 404 unknown service, 409 reused hook instance, 412 required data unobtainable, 413
body too large, 503 deadline overrun. A bug answers 500 with a reference to the log line, never
a stack trace. CORS is off unless origins are configured, for browser-based EHRs.

The app is built by :func:`create_app` around a :class:`Runtime`, which the deployment
(``deploy/``) assembles from adapters; tests assemble their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cds_hooks.auth import AuthenticationError, Authenticator, VerifiedClient
from cds_hooks.calls import Caller, CallRejected, answer_call
from cds_hooks.feedback import answer_feedback
from cds_hooks.outcomes import operation_outcome
from cds_hooks.services import PATIENT_VIEW, ServiceDefinition

__all__ = ["Runtime", "create_app"]

log = logging.getLogger(__name__)

INSECURE_CLIENT = "insecure-dev"
"""The client name of calls in insecure development mode (hook instances are scoped by client)."""


@dataclass(frozen=True, slots=True)
class Runtime:
    """What the HTTP layer needs, assembled by the deployment.

    Args:
        caller: what answering a call needs (advisor, FHIR access, limits, cache, ledger).
        authenticator: verifies JWTs; ``None`` only in insecure development mode.
        public_base_url: the base URL EHRs call (``https://cds.example.org``); JWT audiences are
            this plus the endpoint path.
        services: the services offered.
    """

    caller: Caller
    authenticator: Authenticator | None
    public_base_url: str
    services: tuple[ServiceDefinition, ...] = (PATIENT_VIEW,)


class _Unauthorized(Exception):
    pass


class _TooLarge(Exception):
    pass


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


async def _authenticate(request: Request, runtime: Runtime, path: str) -> str:
    """The caller's issuer; raises :class:`_Unauthorized` (a bare 401) on any failure."""
    if runtime.authenticator is None:
        log.warning("insecure development mode: request not authenticated", extra={"path": path})
        return INSECURE_CLIENT
    audience = runtime.public_base_url.rstrip("/") + path
    try:
        verified: VerifiedClient = await runtime.authenticator.authenticate(
            request.headers.get("authorization"), audience
        )
    except AuthenticationError as error:
        log.warning("authentication failed", extra={"path": path, "reason": error.reason})
        raise _Unauthorized from error
    return verified.iss


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _where(error: BaseException) -> str:
    """Exception type and innermost frame: enough to find a bug, no message that may hold data."""
    frames = traceback.extract_tb(error.__traceback__)
    place = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{place}"


def create_app(
    runtime: Callable[[], AbstractAsyncContextManager[Runtime]],
    *,
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """Build the FastAPI app.

    Args:
        runtime: opens the runtime at start-up and closes it at shutdown.
        cors_origins: origins of browser-based EHRs allowed to call the service; none by default.

    Examples:
        >>> # app = create_app(lambda: open_runtime(settings), cors_origins=["https://ehr.example"])
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
        openapi_url=None,
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

    if cors_origins:
        # Outermost, so that preflight requests are answered before authentication.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, error: _Unauthorized) -> Response:
        return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(HTTPException)
    async def routing_error(request: Request, error: HTTPException) -> Response:
        # Paths and methods the service does not have: an OperationOutcome like every other
        # error, instead of the framework's own body.
        if error.status_code == 405:
            answer = operation_outcome(405, "not-supported", f"{request.method} not allowed here")
        elif error.status_code == 404:
            answer = operation_outcome(404, "not-found", "no such endpoint")
        else:
            answer = operation_outcome(error.status_code, "processing", "request refused")
        answer.headers.update(error.headers or {})
        return answer

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, error: _TooLarge) -> Response:
        return operation_outcome(413, "too-costly", "request body too large")

    @app.get("/cds-services")
    async def discovery(request: Request, runtime: RuntimeDep) -> Response:
        await _authenticate(request, runtime, "/cds-services")
        body = json.dumps({"services": [s.discovery_entry() for s in runtime.services]})
        etag = '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'
        # Behind authentication, so private; EHRs may reuse it briefly and revalidate by ETag.
        headers = {"ETag": etag, "Cache-Control": "private, max-age=300"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    @app.post("/cds-services/{service_id}")
    async def call_service(service_id: str, request: Request, runtime: RuntimeDep) -> Response:
        client = await _authenticate(request, runtime, f"/cds-services/{service_id}")
        service = next((s for s in runtime.services if s.id == service_id), None)
        if service is None:
            return operation_outcome(404, "not-found", f"no CDS service {service_id!r}")
        body = await _body(request, runtime.caller.policy.max_body_bytes)
        try:
            answer = await answer_call(service, body, runtime.caller, client=client)
        except CallRejected as rejected:
            return operation_outcome(rejected.status, rejected.code, rejected.diagnostics)
        return JSONResponse(answer.body, status_code=answer.status)

    @app.post("/cds-services/{service_id}/feedback")
    async def feedback(service_id: str, request: Request, runtime: RuntimeDep) -> Response:
        client = await _authenticate(request, runtime, f"/cds-services/{service_id}/feedback")
        if not any(s.id == service_id for s in runtime.services):
            return operation_outcome(404, "not-found", f"no CDS service {service_id!r}")
        body = await _body(request, runtime.caller.policy.max_body_bytes)
        try:
            answer = await answer_feedback(service_id, body, runtime.caller, client=client)
        except CallRejected as rejected:
            return operation_outcome(rejected.status, rejected.code, rejected.diagnostics)
        return JSONResponse(answer.body, status_code=answer.status)

    return app
