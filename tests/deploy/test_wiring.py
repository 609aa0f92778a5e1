"""Configuration that cannot give a safe, working service is refused with a message that says
what to change, before anything is served."""

from __future__ import annotations

import json

import httpx
import pytest

from cds_hooks.auth import Authenticator
from deploy.ehr_simulator import DemoEhr
from deploy.settings import Settings
from deploy.wiring import Components, ConfigurationError, build_runtime, open_components

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


async def test_serving_needs_trusted_clients(components):
    settings, opened = components
    with pytest.raises(ConfigurationError, match="MEDIRAG_CLIENTS is not set"):
        build_runtime(opened, settings)
    bad = settings.data_dir / "clients.json"
    bad.write_text(json.dumps([{"iss": "x", "jwks_url": "https://x", "algorithms": ["HS256"]}]))
    with pytest.raises(ConfigurationError, match="not allowed"):
        build_runtime(opened, settings.model_copy(update={"clients": bad}))


async def test_development_settings_are_refused_in_production(components):
    settings, opened = components
    production = settings.model_copy(update={"env": "production"})
    with pytest.raises(ConfigurationError, match="refused when MEDIRAG_ENV=production"):
        build_runtime(opened, production, insecure_dev=True)
    ehr = DemoEhr.load_or_create(settings.data_dir / "ehr")
    loopback = production.model_copy(
        update={"allow_loopback_http": True, "clients": ehr.clients_file}
    )
    with pytest.raises(ConfigurationError, match="MEDIRAG_ALLOW_LOOPBACK_HTTP"):
        build_runtime(opened, loopback)


async def test_insecure_development_mode_has_no_authenticator(components):
    settings, opened = components
    assert build_runtime(opened, settings, insecure_dev=True).authenticator is None


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
