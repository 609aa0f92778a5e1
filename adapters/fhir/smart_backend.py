"""SMART Backend Services: access tokens for ingesting from an EHR without a user.

Offline ingestion reads the EHR's FHIR server as a registered client, not on behalf of a hook
call. The SMART App Launch specification's Backend Services profile (v2.2, "Backend
Services") says how: the client discovers the token endpoint in
``<fhir base>/.well-known/smart-configuration``, signs a short-lived JWT (the client assertion:
``iss`` = ``sub`` = its client id, ``aud`` = the token endpoint, ``exp`` at most five minutes
ahead, a fresh ``jti``) with its private key (RS384 or ES384, the key's ``kid`` in the header),
and exchanges it in a ``client_credentials`` grant (RFC 6749 section 4.4, RFC 7523) for an
access token.

:class:`SmartBackendAuth` is a :class:`adapters.fhir.client.TokenSource`: it caches the token
until shortly before it expires and obtains a new one when asked to forget it (the FHIR server
answered 401). Neither tokens nor assertions are logged or put in an error reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import httpx
import jwt

from core.errors import SourceUnavailable

__all__ = ["ASSERTION_TYPE", "SmartAuthError", "SmartBackendAuth", "load_private_key"]

logger = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

_SOURCE = "SMART authorization server"

Algorithm = Literal["RS384", "ES384"]


class SmartAuthError(SourceUnavailable):
    """No access token could be obtained (discovery failed, or the assertion was refused).

    Examples:
        >>> str(SmartAuthError("refused the client (HTTP 401, invalid_client)"))
        'SMART authorization server unavailable: refused the client (HTTP 401, invalid_client)'
    """

    def __init__(self, reason: str) -> None:
        super().__init__(_SOURCE, reason)


def load_private_key(path: str | os.PathLike[str]) -> tuple[Any, str | None]:
    """A private key from a PEM file or a JWK (JSON) file.

    Returns:
        The key as PyJWT signs with it, and the JWK's ``kid`` (``None`` for PEM).

    Raises:
        ValueError: the file is neither a PEM private key nor a private JWK.
    """
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        jwk = json.loads(text)
        return jwt.PyJWK(jwk).key, jwk.get("kid")
    if "PRIVATE KEY" not in text:
        raise ValueError(f"{path} is neither a PEM private key nor a JWK")
    return text, None


class SmartBackendAuth:
    """Access tokens from a SMART Backend Services authorization server.

    Args:
        fhir_base_url: the FHIR server's base URL; the token endpoint is discovered under it.
        client_id: the client's registered id.
        private_key: the signing key (a PEM string, or a key object PyJWT accepts).
        key_id: the ``kid`` of the key's public JWK, as registered.
        algorithm: ``RS384`` or ``ES384``.
        scope: the scopes asked for.
        http: a shared HTTP client (left open); ``None`` opens one per request.
        timeout: seconds allowed for each request.
        refresh_margin: a token is renewed this many seconds before it expires.
        clock: wall-clock seconds (``time.time``) for the token cache; tests pass their own.
            The assertion is always dated by the real clock: the server checks it.
        token_endpoint: the endpoint, when it is known and need not be discovered.

    Examples:
        >>> auth = SmartBackendAuth("https://ehr.example/fhir", client_id="medirag",
        ...                         private_key="<PEM>", key_id="k1")
        >>> auth
        SmartBackendAuth('https://ehr.example/fhir', client_id='medirag')
        >>> # FhirClient("https://ehr.example/fhir", token_source=auth)
    """

    def __init__(
        self,
        fhir_base_url: str,
        *,
        client_id: str,
        private_key: Any,
        key_id: str,
        algorithm: Algorithm = "RS384",
        scope: str = "system/*.read",
        http: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        refresh_margin: float = 30.0,
        clock: Callable[[], float] = time.time,
        token_endpoint: str | None = None,
    ) -> None:
        self._base_url = fhir_base_url.rstrip("/")
        self._client_id = client_id
        self._key = private_key
        self._kid = key_id
        self._algorithm = algorithm
        self._scope = scope
        self._http = http
        self._timeout = timeout
        self._margin = refresh_margin
        self._clock = clock
        self._endpoint = token_endpoint
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.token_requests = 0
        """How many tokens were asked for (the cache's effect, for logs and tests)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._base_url!r}, client_id={self._client_id!r})"

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            if self._http is not None:
                return await self._http.request(method, url, timeout=self._timeout, **kwargs)
            async with httpx.AsyncClient() as http:
                return await http.request(method, url, timeout=self._timeout, **kwargs)
        except httpx.TimeoutException as error:
            raise SmartAuthError(f"timed out after {self._timeout:g} s") from error
        except httpx.HTTPError as error:
            raise SmartAuthError(f"request failed ({type(error).__name__})") from error

    async def token_endpoint(self) -> str:
        """The token endpoint, from the SMART configuration (read once).

        Raises:
            SmartAuthError: the configuration could not be read or names no token endpoint.
        """
        if self._endpoint is None:
            url = f"{self._base_url}/.well-known/smart-configuration"
            response = await self._request("GET", url, headers={"Accept": "application/json"})
            if response.status_code != 200:
                raise SmartAuthError(f"SMART configuration answered HTTP {response.status_code}")
            try:
                endpoint = response.json().get("token_endpoint")
            except (ValueError, AttributeError):
                endpoint = None
            if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
                raise SmartAuthError("SMART configuration has no token_endpoint")
            self._endpoint = endpoint
        return self._endpoint

    def client_assertion(self, token_endpoint: str) -> str:
        """A signed client assertion for ``token_endpoint``, valid for five minutes.

        Examples:
            >>> from cryptography.hazmat.primitives.asymmetric import ec
            >>> key = ec.generate_private_key(ec.SECP384R1())
            >>> auth = SmartBackendAuth("https://ehr.example/fhir", client_id="c",
            ...                         private_key=key, key_id="k1", algorithm="ES384")
            >>> assertion = auth.client_assertion("https://ehr.example/token")
            >>> jwt.get_unverified_header(assertion)["kid"]
            'k1'
            >>> claims = jwt.decode(assertion, key.public_key(), algorithms=["ES384"],
            ...                     audience="https://ehr.example/token")
            >>> claims["iss"] == claims["sub"] == "c", claims["exp"] - claims["iat"]
            (True, 300)
        """
        now = int(time.time())
        claims = {
            "iss": self._client_id,
            "sub": self._client_id,
            "aud": token_endpoint,
            "iat": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            claims, self._key, algorithm=self._algorithm, headers={"kid": self._kid, "typ": "JWT"}
        )

    async def _obtain(self) -> None:
        endpoint = await self.token_endpoint()
        form = {
            "grant_type": "client_credentials",
            "scope": self._scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.client_assertion(endpoint),
        }
        self.token_requests += 1
        response = await self._request(
            "POST", endpoint, data=form, headers={"Accept": "application/json"}
        )
        try:
            body: Mapping[str, Any] = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200:
            # RFC 6749 error codes are a fixed vocabulary, safe to log; descriptions are not.
            code = body.get("error") if isinstance(body, Mapping) else None
            known = code if isinstance(code, str) and code.isidentifier() else "no error code"
            raise SmartAuthError(f"refused the client (HTTP {response.status_code}, {known})")
        token = body.get("access_token") if isinstance(body, Mapping) else None
        if not isinstance(token, str) or not token:
            raise SmartAuthError("token response has no access_token")
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 300.0
        self._token = token
        self._expires_at = self._clock() + lifetime
        logger.info("obtained an access token valid for %.0f s", lifetime)

    async def access_token(self) -> str:
        """The cached token, or a new one when there is none or it is about to expire.

        Raises:
            SmartAuthError: discovery failed or the authorization server refused the client.
        """
        async with self._lock:
            if self._token is None or self._clock() >= self._expires_at - self._margin:
                await self._obtain()
            assert self._token is not None
            return self._token

    def invalidate(self, token: str) -> None:
        """Forget ``token`` if it is the cached one (a server refused it)."""
        if token == self._token:
            self._token = None
