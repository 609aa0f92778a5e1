"""Configuration that cannot give a safe, working service is refused with a message that says
what to change, before anything is served."""

from __future__ import annotations

import json

import httpx
import pytest

from cds_hooks.auth import AuthenticationError, Authenticator
from deploy.ehr_simulator import DemoEhr
from deploy.settings import Settings
from deploy.wiring import (
    Components,
    ConfigurationError,
    build_runtime,
    open_components,
    trusted_clients,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def components(tmp_path, models_dir, minilm_dir, tiny_dir, shared_data):
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    settings = Settings(
        data_dir=tmp_path,
        models_dir=models_dir,
        dicom_dir=dicom,
        fhir_bundles=shared_data / "synthea",
    )
    async with open_components(settings) as opened:
        yield settings, opened


async def test_open_components_uses_the_configured_models(components):
    _, opened = components
    assert isinstance(opened, Components)
    assert opened.image_model.card.name == "tiny-biomedclip"
    assert opened.text_model.card.name == "all-MiniLM-L6-v2"
    assert opened.store.models.image_model == opened.image_model.model_id
    assert opened.bundles is not None


def test_serving_needs_trusted_clients(tmp_path):
    with pytest.raises(ConfigurationError, match="MEDIRAG_CLIENTS is not set"):
        trusted_clients(Settings())
    bad = tmp_path / "clients.json"
    bad.write_text(json.dumps([{"iss": "x", "jwks_url": "https://x", "algorithms": ["HS256"]}]))
    with pytest.raises(ConfigurationError, match="not allowed"):
        trusted_clients(Settings(clients=bad))
    ehr = DemoEhr.load_or_create(tmp_path / "ehr")
    assert set(trusted_clients(Settings(clients=ehr.clients_file))) == {ehr.issuer}


def test_development_settings_are_refused_in_production(tmp_path):
    ehr = DemoEhr.load_or_create(tmp_path / "ehr")
    production = Settings(
        env="production", clients=ehr.clients_file, public_base_url="https://cds.example.org"
    )
    assert trusted_clients(production)
    plain = production.model_copy(update={"public_base_url": "http://cds.example.org"})
    with pytest.raises(ConfigurationError, match="must be https"):
        trusted_clients(plain)
    with pytest.raises(ConfigurationError, match="refused when MEDIRAG_ENV=production"):
        trusted_clients(production, insecure_dev=True)
    loopback = production.model_copy(update={"allow_loopback_http": True})
    with pytest.raises(ConfigurationError, match="MEDIRAG_ALLOW_LOOPBACK_HTTP"):
        trusted_clients(loopback)


async def test_runtime_authenticates_unless_insecure(components, tmp_path):
    settings, opened = components
    assert trusted_clients(settings, insecure_dev=True) is None
    assert build_runtime(opened, settings, None).authenticator is None
    ehr = DemoEhr.load_or_create(tmp_path / "ehr")
    clients = trusted_clients(settings.model_copy(update={"clients": ehr.clients_file}))
    runtime = build_runtime(opened, settings, clients)
    assert isinstance(runtime.authenticator, Authenticator)
    assert runtime.public_base_url == settings.public_base_url
    assert [s.id for s in runtime.services] == [
        "medirag-patient-view",
        "medirag-order-select",
        "medirag-order-sign",
    ]
    assert runtime.caller.ledger is opened.ledger


async def test_a_token_used_once_is_refused_by_a_second_runtime(components, tmp_path):
    # Two runtimes over one database stand for two service processes behind a load balancer.
    settings, opened = components
    ehr = DemoEhr.load_or_create(tmp_path / "ehr")
    clients = trusted_clients(settings.model_copy(update={"clients": ehr.clients_file}))
    first = build_runtime(opened, settings, clients).authenticator
    second = build_runtime(opened, settings, clients).authenticator
    audience = settings.public_base_url + "/cds-services"
    header = f"Bearer {ehr.sign(audience)}"
    await first.authenticate(header, audience)
    with pytest.raises(AuthenticationError, match="replayed jti"):
        await second.authenticate(header, audience)
    strict = settings.model_copy(update={"jwt_max_lifetime_s": 60.0})
    with pytest.raises(AuthenticationError, match="lifetime"):
        await build_runtime(opened, strict, clients).authenticator.authenticate(
            f"Bearer {ehr.sign(audience, lifetime_s=120)}", audience
        )


async def test_missing_models_say_how_to_get_them(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="medirag demo` builds the default models"):
        async with open_components(settings):
            pass


async def test_the_demo_ehr_signs_what_the_service_accepts(tmp_path):
    ehr = DemoEhr.load_or_create(tmp_path)
    again = DemoEhr.load_or_create(tmp_path)
    assert again.kid == ehr.kid  # the key is reused, not replaced
    from cds_hooks.auth import load_trusted_clients

    audience = "http://127.0.0.1:1/cds-services/medirag-patient-view"
    async with httpx.AsyncClient() as http:
        auth = Authenticator(load_trusted_clients(ehr.clients_file), http=http)
        verified = await auth.authenticate(f"Bearer {ehr.sign(audience)}", audience)
    assert verified.iss == ehr.issuer
    assert (tmp_path / "demo-ehr-key.pem").stat().st_mode & 0o077 == 0


async def test_dicomweb_credentials_come_in_pairs(tmp_path, models_dir, minilm_dir, tiny_dir):
    settings = Settings(
        data_dir=tmp_path,
        models_dir=models_dir,
        dicomweb_url="http://127.0.0.1:9/dicom-web",
        dicomweb_username="medirag",
    )
    with pytest.raises(ConfigurationError, match="MEDIRAG_DICOMWEB_PASSWORD"):
        async with open_components(settings):
            pass
