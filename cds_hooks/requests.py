"""The body of a CDS Hooks service call, validated.

Validation is strict where the spec is: ``hook`` and ``hookInstance`` (a UUID) are required,
``fhirServer`` is required when ``fhirAuthorization`` is given and must be https unless the
deployment allows plain http on loopback for development, and ``context`` must hold what the hook
defines. The access token is kept as a secret so that it can never reach a log by accident.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = ["FhirAuthorization", "HookRequest", "PatientViewContext", "fhir_server_allowed"]


class FhirAuthorization(BaseModel):
    """The OAuth 2.0 bearer token the EHR lends the service for its FHIR server."""

    model_config = ConfigDict(extra="allow", frozen=True)

    access_token: SecretStr
    token_type: Literal["Bearer"]
    expires_in: int = Field(ge=0)
    scope: str
    subject: str
    patient: str | None = None


class PatientViewContext(BaseModel):
    """``patient-view`` context: the user, the patient whose chart is open, the encounter."""

    model_config = ConfigDict(extra="allow", frozen=True)

    userId: str = Field(min_length=1)
    patientId: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9\-.]+$")
    encounterId: str | None = None


class HookRequest(BaseModel):
    """A CDS service call."""

    model_config = ConfigDict(extra="allow", frozen=True)

    hook: str = Field(min_length=1)
    hookInstance: UUID
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _server_with_authorization(self) -> HookRequest:
        if self.fhirAuthorization is not None and not self.fhirServer:
            raise ValueError("fhirServer is required when fhirAuthorization is given")
        return self


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
