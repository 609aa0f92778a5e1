import base64
import hashlib
import hmac
import json

import httpx
import pytest

from cds_hooks.auth import AuthenticationError, Authenticator, TrustedClient, load_trusted_clients
from tests.cds_hooks.keys import JwksServer, Signer

pytestmark = pytest.mark.anyio
AUD = "https://cds.test/cds-services/svc"


@pytest.fixture
async def http():
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture(scope="module")
def es():
    return Signer("ES384")


def authenticator(http, *clients, **kw):
    return Authenticator({c.iss: c for c in clients}, http=http, **kw)


async def test_valid_es384_inline_jwks(http, es):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks))
    verified = await auth.authenticate(f"Bearer {es.token(AUD, tenant='t1')}", AUD)
    assert verified.iss == es.iss
    assert verified.tenant == "t1"
    assert verified.jti


async def test_aud_as_list_containing_the_endpoint(http, es):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks))
    await auth.authenticate(f"Bearer {es.token([AUD, 'https://other'])}", AUD)


async def test_rs384_by_jwks_url_is_fetched_once_and_cached(http):
    rs = Signer("RS384", iss="https://ehr2.test")
    server = JwksServer(rs.jwks)
    try:
        auth = authenticator(http, TrustedClient(iss=rs.iss, jwks_url=server.url))
        for _ in range(3):
            await auth.authenticate(f"Bearer {rs.token(AUD)}", AUD)
        assert server.hits == 1
    finally:
        server.close()


async def test_unknown_kid_refetches_at_most_once_per_interval(http):
    old, new = Signer("ES384", kid="old"), Signer("ES384", kid="new")
    server = JwksServer(old.jwks)
    clock = [1000.0]
    try:
        auth = authenticator(
            http,
            TrustedClient(iss=old.iss, jwks_url=server.url),
            refetch_interval_s=30,
            clock=lambda: clock[0],
        )
        await auth.authenticate(f"Bearer {old.token(AUD)}", AUD)
        server.jwks = {"keys": [old.public_jwk, new.public_jwk]}  # the EHR rotates its keys
        with pytest.raises(AuthenticationError, match="no key 'new'"):
            await auth.authenticate(f"Bearer {new.token(AUD)}", AUD)  # too soon to refetch
        assert server.hits == 1
        clock[0] += 31
        await auth.authenticate(f"Bearer {new.token(AUD)}", AUD)
        assert server.hits == 2
        for _ in range(3):  # a flood of made-up kids costs one fetch per interval at most
            with pytest.raises(AuthenticationError):
                await auth.authenticate(f"Bearer {new.token(AUD, headers={'kid': 'bogus'})}", AUD)
        assert server.hits == 2
    finally:
        server.close()


def b64(data):
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def unsigned(es):
    return f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': es.kid})}.{b64(es.claims(AUD))}."


ATTACKS = {
    "no header": lambda es: None,
    "basic scheme": lambda es: "Basic dXNlcjpwYXNz",
    "empty bearer": lambda es: "Bearer ",
    "garbage": lambda es: "Bearer not.a.jwt",
    "alg none": lambda es: f"Bearer {unsigned(es)}",
    "expired": lambda es: f"Bearer {es.token(AUD, exp=1_000_000, iat=999_000)}",
    "iat in the future": lambda es: f"Bearer {es.token(AUD, iat=4_000_000_000, exp=4_000_000_300)}",
    "not yet valid": lambda es: f"Bearer {es.token(AUD, nbf=4_000_000_000)}",
    "wrong audience": lambda es: f"Bearer {es.token('https://cds.test/cds-services/other')}",
    "audience is the base URL": lambda es: f"Bearer {es.token('https://cds.test')}",
    "untrusted issuer": lambda es: f"Bearer {es.token(AUD, iss='https://evil.test')}",
    "no jti": lambda es: f"Bearer {es.token(AUD, jti=None)}",
    "no exp": lambda es: f"Bearer {es.token(AUD, exp=None)}",
    "no iat": lambda es: f"Bearer {es.token(AUD, iat=None)}",
    "no kid": lambda es: f"Bearer {es.token(AUD, headers={'kid': None})}",
    "unknown kid": lambda es: f"Bearer {es.token(AUD, headers={'kid': 'other'})}",
    "typ not JWT": lambda es: f"Bearer {es.token(AUD, headers={'typ': 'at+jwt'})}",
    "signed by another key": lambda es: f"Bearer {Signer('ES384', kid=es.kid).token(AUD)}",
    "ES256 not allowed for client": lambda es: f"Bearer {Signer('ES256', kid=es.kid).token(AUD)}",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attacks_are_refused(http, es, attack):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks))
    with pytest.raises(AuthenticationError):
        await auth.authenticate(ATTACKS[attack](es), AUD)


async def test_hmac_with_public_key_as_secret_is_refused(http):
    rs = Signer("RS384")
    auth = authenticator(http, TrustedClient(iss=rs.iss, jwks=rs.jwks))
    # The classic algorithm-confusion attack: HS256 keyed with the published public key. PyJWT
    # itself refuses to sign that, so the token is assembled by hand.
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': rs.kid})}.{b64(rs.claims(AUD))}"
    secret = json.dumps(rs.public_jwk).encode()
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    with pytest.raises(AuthenticationError, match="algorithm 'HS256' refused"):
        await auth.authenticate(f"Bearer {forged}", AUD)


async def test_unreachable_jwks_url_is_an_authentication_failure(http, es):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks_url="http://127.0.0.1:9/jwks"))
    with pytest.raises(AuthenticationError, match=r"JWKS of https://ehr\.test unavailable"):
        await auth.authenticate(f"Bearer {es.token(AUD)}", AUD)


def test_trusted_client_validation():
    es = Signer("ES384")
    with pytest.raises(ValueError, match="exactly one"):
        TrustedClient(iss="a", jwks=es.jwks, jwks_url="https://x")
    with pytest.raises(ValueError, match="exactly one"):
        TrustedClient(iss="a")
    with pytest.raises(ValueError, match="not allowed"):
        TrustedClient(iss="a", jwks=es.jwks, algorithms=("HS256",))
    with pytest.raises(ValueError, match="not allowed"):
        TrustedClient(iss="a", jwks=es.jwks, algorithms=("none",))
    with pytest.raises(ValueError, match="JWK"):
        TrustedClient(iss="a", jwks={"keys": [{"kty": "nonsense"}]})


def test_load_trusted_clients(tmp_path):
    es = Signer("ES384")
    good = tmp_path / "clients.json"
    good.write_text(
        json.dumps([{"iss": "a", "jwks": es.jwks}, {"iss": "b", "jwks_url": "https://b/j"}])
    )
    assert set(load_trusted_clients(good)) == {"a", "b"}
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"iss": "a", "jwks": es.jwks}] * 2))
    with pytest.raises(ValueError, match="twice"):
        load_trusted_clients(dup)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read trusted clients"):
        load_trusted_clients(bad)
    with pytest.raises(ValueError, match="cannot read trusted clients"):
        load_trusted_clients(tmp_path / "missing.json")
