"""The authenticator against real keys, real JWTs and JWK Sets served over loopback HTTP.

One test per attack, each expecting a refusal; the attacks on the hardening of the spec's
SHOULDs (jku allowlist, tenant, replay, bounded lifetime) follow the classic ones. The replay
memory shared by several processes (PostgreSQL) is tested in
tests/adapters/store/test_replay_guard.py, the bare 401 over HTTP in test_auth_http.py.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid

import httpx
import pytest

from cds_hooks.auth import AuthenticationError, Authenticator, TrustedClient, load_trusted_clients
from cds_hooks.replay import MemoryReplayGuard
from tests.cds_hooks.keys import JwksServer, Signer

pytestmark = pytest.mark.anyio
AUD = "https://cds.test/cds-services/svc"
OTHER_AUD = "https://cds.test/cds-services/other"


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
    "exp as a string": lambda es: f"Bearer {es.token(AUD, exp=str(int(time.time()) + 300))}",
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


def bearer(token):
    return f"Bearer {token}"


@pytest.fixture
def serve_jwks():
    """Starts loopback JWKS servers (each counts its requests) and stops them after the test."""
    servers = []

    def start(jwks):
        servers.append(JwksServer(jwks))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# jku: honoured only when on the issuing client's allowlist.


async def test_jku_on_the_allowlist_is_fetched_once_and_cached(http, serve_jwks):
    signer = Signer("ES384", kid="via-jku", iss="https://ehr-jku.test")
    server = serve_jwks(signer.jwks)
    auth = authenticator(http, TrustedClient(iss=signer.iss, jku_allowlist=(server.url,)))
    for _ in range(3):
        token = signer.token(AUD, headers={"jku": server.url})
        assert (await auth.authenticate(bearer(token), AUD)).iss == signer.iss
    assert server.hits == 1


async def test_allowed_jku_takes_its_keys_from_that_url(http, es, serve_jwks):
    rotated = Signer("ES384", kid="rotated", iss=es.iss)
    server = serve_jwks(rotated.jwks)
    client = TrustedClient(iss=es.iss, jwks=es.jwks, jku_allowlist=(server.url,))
    auth = authenticator(http, client)
    await auth.authenticate(bearer(rotated.token(AUD, headers={"jku": server.url})), AUD)
    await auth.authenticate(bearer(es.token(AUD)), AUD)  # no jku: the configured JWK Set
    with pytest.raises(AuthenticationError, match="no key 'rotated'"):
        await auth.authenticate(bearer(rotated.token(AUD)), AUD)
    assert server.hits == 1


async def test_attack_jku_not_on_the_allowlist_is_refused_and_never_fetched(http, es, serve_jwks):
    attacker = Signer("ES384", kid=es.kid, iss=es.iss)
    evil, allowed = serve_jwks(attacker.jwks), serve_jwks(attacker.jwks)
    client = TrustedClient(iss=es.iss, jwks=es.jwks, jku_allowlist=(allowed.url,))
    auth = authenticator(http, client)
    # Only the exact URL is allowed: not another path, query or fragment on the same server.
    for jku in (evil.url, allowed.url + "?x", allowed.url + "#x", allowed.url + "/", [allowed.url]):
        token = attacker.token(AUD, headers={"jku": jku})
        with pytest.raises(
            AuthenticationError, match=r"jku not on the allowlist of https://ehr\.test"
        ):
            await auth.authenticate(bearer(token), AUD)
    assert (evil.hits, allowed.hits) == (0, 0)


async def test_attack_jku_on_the_allowlist_of_another_client_is_refused(http, es, serve_jwks):
    attacker = Signer("ES384", kid=es.kid, iss=es.iss)
    # The attacker controls a JWK Set that another trusted client's allowlist names.
    server = serve_jwks(attacker.jwks)
    other = TrustedClient(iss="https://other-ehr.test", jku_allowlist=(server.url,))
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks), other)
    token = attacker.token(AUD, headers={"jku": server.url})
    with pytest.raises(AuthenticationError, match=r"jku not on the allowlist of https://ehr\.test"):
        await auth.authenticate(bearer(token), AUD)
    assert server.hits == 0


async def test_attack_no_jku_for_a_client_with_keys_only_by_jku_is_refused(http, serve_jwks):
    signer = Signer("ES384", iss="https://ehr-jku.test")
    server = serve_jwks(signer.jwks)
    auth = authenticator(http, TrustedClient(iss=signer.iss, jku_allowlist=(server.url,)))
    with pytest.raises(AuthenticationError, match=r"no jku, and https://ehr-jku\.test has no"):
        await auth.authenticate(bearer(signer.token(AUD)), AUD)
    assert server.hits == 0


async def test_attack_made_up_kids_via_jku_cost_one_fetch_per_interval(http, serve_jwks):
    signer = Signer("ES384", kid="real", iss="https://ehr-jku.test")
    server = serve_jwks(signer.jwks)
    clock = [1000.0]
    client = TrustedClient(iss=signer.iss, jku_allowlist=(server.url,))
    auth = authenticator(http, client, refetch_interval_s=30, clock=lambda: clock[0])
    await auth.authenticate(bearer(signer.token(AUD, headers={"jku": server.url})), AUD)
    for _ in range(5):
        token = signer.token(AUD, headers={"jku": server.url, "kid": f"bogus-{uuid.uuid4()}"})
        with pytest.raises(AuthenticationError, match="no key 'bogus-"):
            await auth.authenticate(bearer(token), AUD)
    assert server.hits == 1
    clock[0] += 31
    token = signer.token(AUD, headers={"jku": server.url, "kid": "bogus"})
    with pytest.raises(AuthenticationError, match="no key 'bogus'"):
        await auth.authenticate(bearer(token), AUD)
    assert server.hits == 2


async def test_concurrent_calls_share_one_jwks_fetch(http, serve_jwks):
    signer = Signer("ES384", iss="https://ehr2.test")
    server = serve_jwks(signer.jwks)
    auth = authenticator(http, TrustedClient(iss=signer.iss, jwks_url=server.url))
    tokens = [bearer(signer.token(AUD)) for _ in range(10)]
    verified = await asyncio.gather(*(auth.authenticate(token, AUD) for token in tokens))
    assert len({v.jti for v in verified}) == 10
    assert server.hits == 1


async def test_a_broken_jwks_url_is_retried_at_most_once_per_interval(http, serve_jwks):
    signer = Signer("ES384", iss="https://ehr2.test")
    server = serve_jwks(["not", "a", "JWK Set"])
    clock = [1000.0]
    client = TrustedClient(iss=signer.iss, jwks_url=server.url)
    auth = authenticator(http, client, refetch_interval_s=30, clock=lambda: clock[0])
    with pytest.raises(AuthenticationError, match="not a JSON object"):
        await auth.authenticate(bearer(signer.token(AUD)), AUD)
    with pytest.raises(AuthenticationError, match=r"unavailable from .* \(fetch failed\)"):
        await auth.authenticate(bearer(signer.token(AUD)), AUD)
    assert server.hits == 1
    server.jwks = signer.jwks  # repaired
    clock[0] += 31
    await auth.authenticate(bearer(signer.token(AUD)), AUD)
    assert server.hits == 2


# tenant: checked when the client has tenants configured.


@pytest.mark.parametrize(
    "tenant", [None, "t2", ["t1"], ""], ids=["missing", "not allowed", "list", "empty"]
)
async def test_attack_tenant_missing_or_not_allowed_is_refused(http, es, tenant):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks, tenants=("t1", "t3")))
    with pytest.raises(AuthenticationError, match="tenant missing or not allowed"):
        await auth.authenticate(bearer(es.token(AUD, tenant=tenant)), AUD)


async def test_an_allowed_tenant_is_accepted_and_reported(http, es):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks, tenants=("t1", "t3")))
    assert (await auth.authenticate(bearer(es.token(AUD, tenant="t3")), AUD)).tenant == "t3"


# jti: each (iss, jti) is accepted once within its lifetime.


async def test_attack_replayed_token_is_refused(http, es):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks))
    token = bearer(es.token(AUD))
    await auth.authenticate(token, AUD)
    with pytest.raises(AuthenticationError, match=r"replayed jti of https://ehr\.test"):
        await auth.authenticate(token, AUD)


async def test_attack_replay_at_another_audience_of_the_token_is_refused(http, es):
    # A JWT is single-use: its aud may list several endpoints, yet it authenticates one call.
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks))
    token = bearer(es.token([AUD, OTHER_AUD]))
    await auth.authenticate(token, AUD)
    with pytest.raises(AuthenticationError, match="replayed jti"):
        await auth.authenticate(token, OTHER_AUD)


async def test_attack_new_token_reusing_a_used_jti_is_refused(http, es):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks))
    jti = str(uuid.uuid4())
    await auth.authenticate(bearer(es.token(AUD, jti=jti)), AUD)
    with pytest.raises(AuthenticationError, match="replayed jti"):
        await auth.authenticate(bearer(es.token(AUD, jti=jti, iat=int(time.time()) + 1)), AUD)


async def test_attack_concurrent_replays_let_exactly_one_through(http, es):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks))
    token = bearer(es.token(AUD))
    results = await asyncio.gather(
        *(auth.authenticate(token, AUD) for _ in range(8)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, AuthenticationError) for r in results if isinstance(r, BaseException))


async def test_the_same_jti_from_two_issuers_are_two_tokens(http, es):
    other = Signer("ES384", iss="https://other-ehr.test")
    auth = authenticator(
        http, TrustedClient(iss=es.iss, jwks=es.jwks), TrustedClient(iss=other.iss, jwks=other.jwks)
    )
    await auth.authenticate(bearer(es.token(AUD, jti="shared")), AUD)
    await auth.authenticate(bearer(other.token(AUD, jti="shared")), AUD)


REFUSED_WITH_A_LEGITIMATE_JTI = {
    "forged signature": lambda es, jti: Signer("ES384", kid=es.kid).token(AUD, jti=jti),
    "another audience": lambda es, jti: es.token(OTHER_AUD, jti=jti),
    "tenant not allowed": lambda es, jti: es.token(AUD, jti=jti, tenant="t2"),
    "lifetime too long": lambda es, jti: es.token(AUD, jti=jti, exp=int(time.time()) + 3600),
    "expired": lambda es, jti: es.token(AUD, jti=jti, iat=999_000, exp=1_000_000),
}


@pytest.mark.parametrize("refused", list(REFUSED_WITH_A_LEGITIMATE_JTI))
async def test_attack_refused_token_does_not_burn_a_legitimate_jti(http, es, refused):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks, tenants=("t1",)))
    jti = str(uuid.uuid4())
    with pytest.raises(AuthenticationError):
        await auth.authenticate(bearer(REFUSED_WITH_A_LEGITIMATE_JTI[refused](es, jti)), AUD)
    legitimate = bearer(es.token(AUD, jti=jti, tenant="t1"))
    assert (await auth.authenticate(legitimate, AUD)).jti == jti
    with pytest.raises(AuthenticationError, match="replayed jti"):  # the guard was on
        await auth.authenticate(legitimate, AUD)


async def test_a_jti_is_remembered_until_exp_plus_leeway(http, es):
    now = [time.time()]
    guard = MemoryReplayGuard(clock=lambda: now[0])
    auth = authenticator(
        http, TrustedClient(iss=es.iss, jwks=es.jwks), leeway_s=45, replay_guard=guard
    )
    exp = int(time.time()) + 300
    await auth.authenticate(bearer(es.token(AUD, jti="j", exp=exp)), AUD)
    now[0] = exp + 44
    assert not await guard.first_use(es.iss, "j", exp + 45)
    now[0] = exp + 45
    assert await guard.first_use(es.iss, "j", exp + 100)  # forgotten once the token is dead


async def test_attack_full_replay_memory_refuses_instead_of_forgetting(http, es):
    guard = MemoryReplayGuard(max_entries=1)
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks), replay_guard=guard)
    await auth.authenticate(bearer(es.token(AUD)), AUD)
    with pytest.raises(AuthenticationError, match=r"replay check unavailable: .*guard full"):
        await auth.authenticate(bearer(es.token(AUD)), AUD)


# Bounded lifetime and bounded skew.


@pytest.mark.parametrize(
    ("lifetime", "max_lifetime", "accepted"),
    [(300, 300, True), (301, 300, False), (600, 600, True), (0, 300, False), (-10, 300, False)],
)
async def test_attack_lifetime_beyond_the_maximum_is_refused(
    http, es, lifetime, max_lifetime, accepted
):
    auth = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks), max_lifetime_s=max_lifetime)
    now = int(time.time())
    token = bearer(es.token(AUD, iat=now, exp=now + lifetime))
    if accepted:
        await auth.authenticate(token, AUD)
    else:
        with pytest.raises(AuthenticationError, match=r"lifetime exp - iat = -?\d+ s"):
            await auth.authenticate(token, AUD)


async def test_the_leeway_bounds_the_accepted_skew(http, es):
    now = int(time.time())
    expired_30s_ago = {"iat": now - 200, "exp": now - 30}
    lax = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks), leeway_s=60)
    await lax.authenticate(bearer(es.token(AUD, **expired_30s_ago)), AUD)
    strict = authenticator(http, TrustedClient(iss=es.iss, jwks=es.jwks), leeway_s=10)
    with pytest.raises(AuthenticationError, match="Signature has expired"):
        await strict.authenticate(bearer(es.token(AUD, **expired_30s_ago)), AUD)
    with pytest.raises(AuthenticationError, match="not yet valid"):
        await strict.authenticate(bearer(es.token(AUD, iat=now + 30, exp=now + 300)), AUD)


async def test_authenticator_settings_are_validated(http, es):
    client = {es.iss: TrustedClient(iss=es.iss, jwks=es.jwks)}
    with pytest.raises(ValueError, match="leeway_s"):
        Authenticator(client, http=http, leeway_s=-1)
    with pytest.raises(ValueError, match="max_lifetime_s"):
        Authenticator(client, http=http, max_lifetime_s=0)


def test_trusted_client_key_sources_and_tenants_are_validated():
    es = Signer("ES384")
    assert TrustedClient(iss="a", jku_allowlist=("https://a/jwks",)).jwks is None
    assert TrustedClient(iss="a", jku_allowlist=("http://127.0.0.1:8/j", "http://[::1]/j"))
    with pytest.raises(ValueError, match="or a jku_allowlist"):
        TrustedClient(iss="a", jku_allowlist=())
    for url in ("http://ehr.test/jwks", "http://localhost/jwks", "ftp://a/j", "https:///j", "j"):
        with pytest.raises(ValueError, match="must be https"):
            TrustedClient(iss="a", jwks=es.jwks, jku_allowlist=(url,))
        with pytest.raises(ValueError, match="must be https"):
            TrustedClient(iss="a", jwks_url=url)
    with pytest.raises(ValueError, match="tenants is empty"):
        TrustedClient(iss="a", jwks=es.jwks, tenants=())


def test_load_trusted_clients_with_jku_allowlist_and_tenants(tmp_path):
    path = tmp_path / "clients.json"
    path.write_text(
        json.dumps([{"iss": "a", "jku_allowlist": ["https://a/jwks"], "tenants": ["t1"]}])
    )
    (client,) = load_trusted_clients(path).values()
    assert client.jku_allowlist == ("https://a/jwks",)
    assert client.tenants == ("t1",)
