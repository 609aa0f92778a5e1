"""The body of a CDS Hooks service call, validated.

Validation is strict where the spec is: ``hook`` and ``hookInstance`` (a UUID) are required,
``fhirServer`` is required when ``fhirAuthorization`` is given and must be https unless the
deployment allows plain http on loopback for development, ``context`` must hold what the hook
defines (:data:`HOOK_CONTEXTS`), and ``extension`` must be a JSON object. The access token is
kept as a secret so that it can never reach a log by accident. Bodies nested deeper than a limit
are refused before validation (:func:`parse_json`).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, model_validator

__all__ = [
    "HOOK_CONTEXTS",
    "TOKEN_FIELDS",
    "FhirAuthorization",
    "HookRequest",
    "OrderSelectContext",
    "OrderSignContext",
    "PatientViewContext",
    "fhir_server_allowed",
    "parse_json",
]

_FHIR_ID = r"[A-Za-z0-9\-.]{1,64}"
_USER = rf"^(Practitioner|PractitionerRole|Patient|RelatedPerson)/{_FHIR_ID}$"
_REFERENCE = rf"^[A-Z][A-Za-z]+/{_FHIR_ID}$"


class FhirAuthorization(BaseModel):
    """The OAuth 2.0 bearer token the EHR lends the service for its FHIR server."""

    model_config = ConfigDict(extra="allow", frozen=True)

    access_token: SecretStr
    token_type: Literal["Bearer"]
    expires_in: int = Field(ge=0)
    scope: str
    subject: str
    patient: str | None = None


class _Context(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    userId: str = Field(pattern=_USER)
    patientId: str = Field(pattern=rf"^{_FHIR_ID}$")
    encounterId: str | None = Field(default=None, pattern=rf"^{_FHIR_ID}$")


class PatientViewContext(_Context):
    """``patient-view``: the user, the patient whose chart is open, the encounter."""


class _DraftOrders(BaseModel):
    """Enough of a FHIR Bundle to know it is one; its entries are parsed by the FHIR adapter."""

    model_config = ConfigDict(extra="allow", frozen=True)

    resourceType: Literal["Bundle"]
    entry: list[dict[str, Any]] = Field(default_factory=list)


class OrderSignContext(_Context):
    """``order-sign``: the draft orders about to be signed."""

    draftOrders: _DraftOrders


class OrderSelectContext(OrderSignContext):
    """``order-select``: the draft orders, and which of them the user just selected."""

    selections: list[Annotated[str, StringConstraints(pattern=_REFERENCE)]] = Field(min_length=1)


HOOK_CONTEXTS: dict[str, type[_Context]] = {
    "patient-view": PatientViewContext,
    "order-select": OrderSelectContext,
    "order-sign": OrderSignContext,
}
"""The context model of each hook the service answers."""

TOKEN_FIELDS = frozenset({"userId", "patientId", "encounterId"})
"""The root-level primitive context fields of these hooks, usable as prefetch tokens."""


class HookRequest(BaseModel):
    """A CDS service call."""

    model_config = ConfigDict(extra="allow", frozen=True)

    hook: str = Field(min_length=1)
    hookInstance: UUID
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None
    extension: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _server_with_authorization(self) -> HookRequest:
        if self.fhirAuthorization is not None and not self.fhirServer:
            raise ValueError("fhirServer is required when fhirAuthorization is given")
        return self


def _depth(value: Any, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def parse_json(body: bytes, *, max_depth: int) -> Any:
    """Parse a request body, refusing nesting deeper than ``max_depth``.

    Raises:
        ValueError: not JSON, or nested too deep (the message says which, without the body).

    Examples:
        >>> parse_json(b'{"a": [1]}', max_depth=2)
        {'a': [1]}
    """
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        raise ValueError(f"body is not JSON: {error.msg} at position {error.pos}") from None
    except RecursionError:
        raise ValueError(f"body nests deeper than {max_depth} levels") from None
    if not _depth(value, max_depth):
        raise ValueError(f"body nests deeper than {max_depth} levels")
    return value


def fhir_server_allowed(url: str, *, allow_loopback_http: bool) -> bool:
    """Whether the service may call ``url``: https, or http on loopback when allowed.

    Examples:
        >>> fhir_server_allowed("https://ehr.example.org/fhir", allow_loopback_http=False)
        True
        >>> fhir_server_allowed("http://127.0.0.1:8080/fhir", allow_loopback_http=False)
        False
    """
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme != "http" or not allow_loopback_http:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False
