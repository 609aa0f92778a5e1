"""The server speaks TLS when given a certificate (CDS Hooks requires HTTPS)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI

from deploy.server import server_config
from deploy.settings import Settings

pytestmark = pytest.mark.anyio


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_tls_is_served_when_configured(tmp_path):
    cert, key = self_signed(tmp_path)
    app = FastAPI()

    @app.get("/ping")
    async def ping():
        return {"ok": True}

    port = free_port()
    settings = Settings(tls_cert_file=cert, tls_key_file=key)
    server = uvicorn.Server(server_config(app, settings, host="127.0.0.1", port=port))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done()
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert)) as https:
            response = await https.get(f"https://127.0.0.1:{port}/ping")
        assert response.json() == {"ok": True}
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{port}/ping")
    finally:
        server.should_exit = True
        await task


def test_half_a_tls_configuration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="both"):
        server_config(FastAPI(), Settings(tls_cert_file=tmp_path / "cert.pem"))
