"""Authentication of CDS clients by signed JWT (CDS Hooks 2.0, "Trusting CDS Clients").

Every call (discovery, service, feedback) carries ``Authorization: Bearer <JWT>`` signed by the
EHR with an asymmetric key. The service trusts only the issuers configured in
``MEDIRAG_CLIENTS`` and treats the spec's SHOULDs as MUSTs. It checks:

* ``alg`` is asymmetric and allowed for that client (``none`` and HMAC are never accepted);
* ``typ`` is ``JWT`` and ``kid`` names a key of the client's JWK Set;
* the key comes from the client's configured JWK Set (inline or by URL), or from the URL in
  the ``jku`` header only when that exact URL is on the client's ``jku_allowlist``: any other
  ``jku`` is refused without being fetched, so a token cannot point the service at keys of the
  attacker's choosing nor make it call arbitrary URLs;
* the signature, ``iss`` (trusted), ``aud`` (exactly the endpoint URL called), ``exp``, ``iat``
  and ``nbf`` within the allowed clock skew, and ``exp - iat`` at most the maximum lifetime;
* ``tenant`` is one of the client's tenants, when tenants are configured for it;
* ``jti`` is present and its ``(iss, jti)`` pair was not used before (:mod:`cds_hooks.replay`).
  A JWT is single-use: a second use is refused even at another endpoint its ``aud`` lists.
  The replay memory is consulted last, so a forged or otherwise refused token cannot burn a
  legitimate ``jti``; the bounded lifetime bounds that memory.

A failure raises :class:`AuthenticationError` whose reason is for the log only (it may name the
issuer and ``kid``, never the token): the HTTP answer is a bare 401.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cds_hooks.replay import MemoryReplayGuard, ReplayGuard, ReplayGuardUnavailable

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


def _check_key_url(iss: str, url: str) -> None:
    """Refuse a JWK Set URL that is not https, or plain http to a loopback address.

    Keys fetched over plain http could be swapped by anyone on the path; loopback http is for
    development and tests. Hosts are compared as IP literals, since a name could resolve
    anywhere.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback:
        raise ValueError(
            f"client {iss!r}: JWK Set URL {url!r} must be https (or http to a loopback IP "
            "address such as 127.0.0.1)"
        )


class TrustedClient(BaseModel):
    """A CDS client (EHR) the service accepts calls from.

    Args:
        iss: the issuer its JWTs carry.
        jwks: its JSON Web Key Set, inline.
        jwks_url: where to fetch its JSON Web Key Set (at most one of ``jwks``/``jwks_url``).
        jku_allowlist: the JWK Set URLs its tokens may name in their ``jku`` header, matched
            exactly; a token naming any other URL is refused. A client with neither ``jwks``
            nor ``jwks_url`` must have one, and its tokens must then carry ``jku``.
        algorithms: the signing algorithms accepted from it (default ES384 and RS384, the
            spec's recommendation).
        tenants: when given, its tokens must carry a ``tenant`` claim among these.

    Raises:
        ValueError: (as pydantic's ``ValidationError``) no key source, both ``jwks`` and
            ``jwks_url``, a key URL neither https nor loopback http, a symmetric or unknown
            algorithm, an unusable inline JWK Set, or an empty ``tenants``.

    Examples:
        >>> TrustedClient(iss="https://ehr.example.org", jwks_url="https://ehr.example.org/jwks")
        ... # doctest: +ELLIPSIS
        TrustedClient(iss='https://ehr.example.org', jwks=None, ...)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    iss: str = Field(min_length=1)
    jwks: dict[str, Any] | None = None
    jwks_url: str | None = None
    jku_allowlist: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = _DEFAULT_ALGORITHMS
    tenants: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> TrustedClient:
        if self.jwks is not None and self.jwks_url is not None:
            raise ValueError(f"client {self.iss!r}: give exactly one of jwks and jwks_url")
        if self.jwks is None and self.jwks_url is None and not self.jku_allowlist:
            raise ValueError(
                f"client {self.iss!r}: give exactly one of jwks and jwks_url, or a jku_allowlist"
            )
        for url in (self.jwks_url, *self.jku_allowlist):
            if url is not None:
                _check_key_url(self.iss, url)
        refused = set(self.algorithms) - ASYMMETRIC_ALGORITHMS
        if refused or not self.algorithms:
            raise ValueError(f"client {self.iss!r}: algorithms not allowed: {sorted(refused)}")
        if self.tenants is not None and not self.tenants:
            raise ValueError(f"client {self.iss!r}: tenants is empty (omit it to allow any)")
        if self.jwks is not None:
            try:  # fail at start-up, not at the first call
                jwt.PyJWKSet.from_dict(self.jwks)
            except jwt.PyJWTError as error:
                raise ValueError(f"client {self.iss!r}: unusable JWK Set: {error}") from error
        return self


def load_trusted_clients(path: Path) -> dict[str, TrustedClient]:
    """Read the trusted clients file: a JSON list of :class:`TrustedClient` objects.

    Args:
        path: the ``MEDIRAG_CLIENTS`` file.

    Returns:
        The clients by issuer.

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
class _RemoteKeys:
    """What is known of one JWK Set URL; the lock lets one fetch at a time go out."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    keys: jwt.PyJWKSet | None = None
    fetched_at: float = -math.inf
    attempted_at: float = -math.inf


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthenticationError(f"{name} is not a number")
    return float(value)


def _find(keys: jwt.PyJWKSet, kid: str) -> jwt.PyJWK | None:
    return next((key for key in keys.keys if key.key_id == kid), None)


class Authenticator:
    """Verifies CDS Hooks bearer JWTs against the trusted clients.

    Args:
        clients: trusted clients by issuer.
        http: the HTTP client used to fetch JWK Sets by URL (redirects are never followed).
        leeway_s: allowed clock skew for ``exp``, ``iat`` and ``nbf``.
        max_lifetime_s: the longest ``exp - iat`` accepted; with the leeway it bounds how long
            a ``jti`` must be remembered.
        replay_guard: where used ``(iss, jti)`` pairs are remembered; shared by every process
            of a deployment. A :class:`cds_hooks.replay.MemoryReplayGuard` of its own when
            ``None``, so replay protection is never off.
        jwks_ttl_s: how long a fetched JWK Set is used before it is fetched again.
        refetch_interval_s: the shortest time between two fetches of one JWK Set URL (failed
            fetches included), so that tokens with made-up ``kid`` values cannot make the
            service hammer the EHR, nor wait on it while it is down.
        clock: seconds since the epoch, for the JWK Set cache (PyJWT reads the time itself).

    Raises:
        ValueError: a negative leeway or a lifetime that is not positive.
    """

    def __init__(
        self,
        clients: Mapping[str, TrustedClient],
        *,
        http: httpx.AsyncClient,
        leeway_s: float = 60.0,
        max_lifetime_s: float = 300.0,
        replay_guard: ReplayGuard | None = None,
        jwks_ttl_s: float = 3600.0,
        refetch_interval_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if leeway_s < 0 or max_lifetime_s <= 0:
            raise ValueError("leeway_s must be at least 0 and max_lifetime_s more than 0")
        self._clients = dict(clients)
        self._http = http
        self._leeway = leeway_s
        self._max_lifetime = max_lifetime_s
        self._replay = replay_guard if replay_guard is not None else MemoryReplayGuard()
        self._ttl = jwks_ttl_s
        self._refetch_interval = refetch_interval_s
        self._clock = clock
        # Keyed by URL; only configured URLs are ever fetched, so this stays small.
        self._remote: dict[str, _RemoteKeys] = {}

    async def _fetch(self, url: str, remote: _RemoteKeys, iss: str) -> jwt.PyJWKSet:
        remote.attempted_at = self._clock()
        try:
            response = await self._http.get(url, timeout=5.0, follow_redirects=False)
            response.raise_for_status()
            body = response.json()
            if not isinstance(body, dict):  # PyJWT would fail on it with an AttributeError
                raise ValueError("the answer is not a JSON object")
            keys = jwt.PyJWKSet.from_dict(body)
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as error:
            raise AuthenticationError(f"JWKS of {iss} unavailable from {url}: {error}") from error
        remote.keys, remote.fetched_at = keys, remote.attempted_at
        log.info("JWK Set fetched", extra={"issuer": iss, "url": url})
        return keys

    def _usable(self, remote: _RemoteKeys, kid: str) -> jwt.PyJWK | None:
        """The key, if the cache holds a fresh JWK Set that has it."""
        if remote.keys is None or self._clock() - remote.fetched_at > self._ttl:
            return None
        return _find(remote.keys, kid)

    async def _remote_key(self, url: str, kid: str, iss: str) -> jwt.PyJWK:
        remote = self._remote.setdefault(url, _RemoteKeys())
        key = self._usable(remote, kid)
        if key is not None:
            return key
        async with remote.lock:
            # Whoever held the lock may just have fetched what this call needs.
            key = self._usable(remote, kid)
            if key is not None:
                return key
            if self._clock() - remote.attempted_at >= self._refetch_interval:
                # Missing, stale, or without this kid (the client may have rotated its keys).
                key = _find(await self._fetch(url, remote, iss), kid)
            elif remote.keys is None or self._clock() - remote.fetched_at > self._ttl:
                raise AuthenticationError(f"JWKS of {iss} unavailable from {url} (fetch failed)")
        if key is None:
            raise AuthenticationError(f"no key {kid!r} in the JWKS of {iss}")
        return key

    async def _key(self, client: TrustedClient, header: Mapping[str, Any], kid: str) -> jwt.PyJWK:
        if "jku" in header:
            jku = header["jku"]
            if not isinstance(jku, str) or jku not in client.jku_allowlist:
                raise AuthenticationError(f"jku not on the allowlist of {client.iss} (kid {kid!r})")
            return await self._remote_key(jku, kid, client.iss)
        if client.jwks_url is not None:
            return await self._remote_key(client.jwks_url, kid, client.iss)
        if client.jwks is None:
            raise AuthenticationError(f"no jku, and {client.iss} has no configured JWK Set")
        key = _find(jwt.PyJWKSet.from_dict(client.jwks), kid)
        if key is None:
            raise AuthenticationError(f"no key {kid!r} in the JWKS of {client.iss}")
        return key

    async def authenticate(self, authorization: str | None, audience: str) -> VerifiedClient:
        """Verify the ``Authorization`` header of a call to ``audience``, and spend its ``jti``.

        Args:
            authorization: the raw header value (``"Bearer <JWT>"``), or ``None``.
            audience: the URL of the endpoint called; the JWT's ``aud`` must equal it.

        Returns:
            The verified issuer, ``jti`` and ``tenant``.

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
        key = await self._key(client, header, kid)
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
        exp, iat = _number(claims, "exp"), _number(claims, "iat")
        if not 0 < exp - iat <= self._max_lifetime:
            raise AuthenticationError(
                f"lifetime exp - iat = {exp - iat:.0f} s of {client.iss} (kid {kid!r}) is not "
                f"within (0, {self._max_lifetime:.0f}] s"
            )
        tenant = claims.get("tenant")
        if client.tenants is not None and tenant not in client.tenants:
            raise AuthenticationError(f"tenant missing or not allowed for {client.iss}")
        try:
            first = await self._replay.first_use(client.iss, jti, exp + self._leeway)
        except ReplayGuardUnavailable as error:
            raise AuthenticationError(f"replay check unavailable: {error}") from error
        if not first:
            raise AuthenticationError(f"replayed jti of {client.iss} (kid {kid!r})")
        return VerifiedClient(
            iss=client.iss, jti=jti, tenant=tenant if isinstance(tenant, str) else None
        )
