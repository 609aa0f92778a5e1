"""The HTTP server around the app: uvicorn, with TLS when a certificate is configured.

CDS Hooks requires HTTPS. A deployment either terminates TLS here (``MEDIRAG_TLS_CERT_FILE`` and
``MEDIRAG_TLS_KEY_FILE``) or behind a reverse proxy; ``MEDIRAG_PUBLIC_BASE_URL`` is the https URL
EHRs call either way, and production refuses any other.
"""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from deploy.settings import Settings

__all__ = ["server_config"]


def server_config(
    app: FastAPI, settings: Settings, *, host: str | None = None, port: int | None = None
) -> uvicorn.Config:
    """The uvicorn configuration for ``app``.

    Args:
        app: the app to serve.
        settings: the deployment's settings (address, TLS files).
        host: overrides ``settings.host``.
        port: overrides ``settings.port``.

    Raises:
        ValueError: only one of the TLS certificate and key is configured.
    """
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if (cert is None) != (key is None):
        raise ValueError("set both MEDIRAG_TLS_CERT_FILE and MEDIRAG_TLS_KEY_FILE, or neither")
    return uvicorn.Config(
        app,
        host=host or settings.host,
        port=settings.port if port is None else port,
        log_config=None,
        ssl_certfile=str(cert) if cert else None,
        ssl_keyfile=str(key) if key else None,
    )
