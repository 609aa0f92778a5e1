"""Authentication of CDS clients by signed JWT (CDS Hooks 2.0, "Trusting CDS Clients").

Every call (discovery, service, feedback) carries ``Authorization: Bearer <JWT>`` signed by the
EHR with an asymmetric key. The service trusts only the issuers configured in
``MEDIRAG_CLIENTS``, each with its JSON Web Key Set given inline or by URL, and checks:

* ``alg`` is asymmetric and allowed for that client (``none`` and HMAC are never accepted);
* ``typ`` is ``JWT`` and ``kid`` names a key of the client's JWK Set;
* the signature, ``iss`` (trusted), ``aud`` (exactly the endpoint URL called), ``exp``, ``iat``
  (not in the future beyond the allowed clock skew) and the presence of ``jti``.

A failure raises :class:`AuthenticationError` whose reason is for the log only: the HTTP answer
is a bare 401. The ``jku`` header is not followed: keys come only from the configured JWK Sets.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "AuthenticationError",
    "Authenticator",
    "TrustedClient",
    "VerifiedClient",
    "load_trusted_clients",
]

log = logging.getLogger(__name__)

ASYMMETRIC_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
"""Algorithms a client may be configured for; the spec forbids ``none`` and symmetric ones."""

_DEFAULT_ALGORITHMS = ("ES384", "RS384")


class AuthenticationError(Exception):
    """The request's JWT was missing or not acceptable; ``reason`` goes to the log only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TrustedClient(BaseModel):
    """A CDS client (EHR) the service accepts calls from.

    Args:
        iss: the issuer its JWTs carry.
        jwks: its JSON Web Key Set, inline.
        jwks_url: where to fetch its JSON Web Key Set (exactly one of ``jwks``/``jwks_url``).
        algorithms: the signing algorithms accepted from it (default ES384 and RS384, the
            spec's recommendation).

    Examples:
        >>> TrustedClient(iss="https://ehr.example.org", jwks_url="https://ehr.example.org/jwks")
        ... # doctest: +ELLIPSIS
        TrustedClient(iss='https://ehr.example.org', jwks=None, ...)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    iss: str = Field(min_length=1)
    jwks: dict[str, Any] | None = None
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = _DEFAULT_ALGORITHMS

    @model_validator(mode="after")
    def _check(self) -> TrustedClient:
        if (self.jwks is None) == (self.jwks_url is None):
            raise ValueError(f"client {self.iss!r}: give exactly one of jwks and jwks_url")
        refused = set(self.algorithms) - ASYMMETRIC_ALGORITHMS
        if refused or not self.algorithms:
            raise ValueError(f"client {self.iss!r}: algorithms not allowed: {sorted(refused)}")
        if self.jwks is not None:
            try:  # fail at start-up, not at the first call
                jwt.PyJWKSet.from_dict(self.jwks)
            except jwt.PyJWTError as error:
                raise ValueError(f"client {self.iss!r}: unusable JWK Set: {error}") from error
        return self


def load_trusted_clients(path: Path) -> dict[str, TrustedClient]:
    """Read the trusted clients file: a JSON list of :class:`TrustedClient` objects.

    Raises:
        ValueError: the file is not valid JSON, an entry is invalid, or an issuer repeats.
    """
    try:
        entries = json.loads(path.read_text())
        clients = [TrustedClient.model_validate(entry) for entry in entries]
    except (OSError, json.JSONDecodeError, TypeError, ValidationError, jwt.PyJWTError) as error:
        raise ValueError(f"cannot read trusted clients from {path}: {error}") from error
    by_iss = {client.iss: client for client in clients}
    if len(by_iss) != len(clients):
        raise ValueError(f"{path}: an issuer appears twice")
    return by_iss


@dataclass(frozen=True, slots=True)
class VerifiedClient:
    """Who called, as established by a verified JWT."""

    iss: str
    jti: str
    tenant: str | None = None


@dataclass(slots=True)
class _CachedKeys:
    keys: jwt.PyJWKSet
    fetched_at: float


class Authenticator:
    """Verifies CDS Hooks bearer JWTs against the trusted clients.

    Args:
        clients: trusted clients by issuer.
        http: the HTTP client used to fetch JWK Sets by URL.
        leeway_s: allowed clock skew for ``exp``, ``iat`` and ``nbf``.
        jwks_ttl_s: how long a fetched JWK Set is used before it is fetched again.
        refetch_interval_s: the shortest time between two fetches of one client's JWK Set,
            so that tokens with made-up ``kid`` values cannot make the service hammer the EHR.
        clock: seconds since the epoch, for the JWK Set cache (PyJWT reads the time itself).
    """

    def __init__(
        self,
        clients: Mapping[str, TrustedClient],
        *,
        http: httpx.AsyncClient,
        leeway_s: float = 60.0,
        jwks_ttl_s: float = 3600.0,
        refetch_interval_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clients = dict(clients)
        self._http = http
        self._leeway = leeway_s
        self._ttl = jwks_ttl_s
        self._refetch_interval = refetch_interval_s
        self._clock = clock
        self._cache: dict[str, _CachedKeys] = {}

    async def _fetch(self, client: TrustedClient) -> jwt.PyJWKSet:
        assert client.jwks_url is not None
        try:
            response = await self._http.get(client.jwks_url, timeout=5.0)
            response.raise_for_status()
            keys = jwt.PyJWKSet.from_dict(response.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as error:
            raise AuthenticationError(f"JWKS of {client.iss} unavailable: {error}") from error
        self._cache[client.iss] = _CachedKeys(keys, self._clock())
        return keys

    async def _key(self, client: TrustedClient, kid: str) -> jwt.PyJWK:
        if client.jwks is not None:
            keys = jwt.PyJWKSet.from_dict(client.jwks)
        else:
            cached = self._cache.get(client.iss)
            age = None if cached is None else self._clock() - cached.fetched_at
            if cached is None or age is None or age > self._ttl:
                keys = await self._fetch(client)
            else:
                keys = cached.keys
                if kid not in {k.key_id for k in keys.keys} and age >= self._refetch_interval:
                    keys = await self._fetch(client)  # the client may have rotated its keys
        for key in keys.keys:
            if key.key_id == kid:
                return key
        raise AuthenticationError(f"no key {kid!r} in the JWKS of {client.iss}")

    async def authenticate(self, authorization: str | None, audience: str) -> VerifiedClient:
        """Verify the ``Authorization`` header of a call to ``audience``.

        Args:
            authorization: the raw header value (``"Bearer <JWT>"``), or ``None``.
            audience: the URL of the endpoint called; the JWT's ``aud`` must equal it.

        Raises:
            AuthenticationError: with the reason, for the log.
        """
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("no bearer token")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as error:
            raise AuthenticationError(f"malformed JWT: {error}") from error
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise AuthenticationError(f"algorithm {alg!r} refused")
        if typ != "JWT":
            raise AuthenticationError(f"typ {typ!r} is not 'JWT'")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError("no kid in the JWT header")
        iss = unverified.get("iss")
        client = self._clients.get(iss) if isinstance(iss, str) else None
        if client is None:
            raise AuthenticationError(f"issuer {iss!r} is not trusted")
        if alg not in client.algorithms:
            raise AuthenticationError(f"algorithm {alg} not allowed for {client.iss}")
        key = await self._key(client, kid)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=audience,
                issuer=client.iss,
                leeway=self._leeway,
                options={"require": ["iss", "aud", "exp", "iat", "jti"], "strict_aud": False},
            )
        except jwt.PyJWTError as error:
            raise AuthenticationError(f"JWT rejected: {error}") from error
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise AuthenticationError("jti is not a non-empty string")
        tenant = claims.get("tenant")
        return VerifiedClient(
            iss=client.iss, jti=jti, tenant=tenant if isinstance(tenant, str) else None
        )
