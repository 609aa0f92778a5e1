"""A stand-in EHR for the demo: a signing key, a trusted-clients file, signed hook calls.

The demo plays both sides of a CDS Hooks exchange on one machine. As the EHR it holds an ES384
key pair, registers the public half with the service through a ``MEDIRAG_CLIENTS`` file (inline
JWK Set), and signs each call with a JWT whose ``aud`` is the endpoint it calls, exactly as a
production EHR would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["DemoEhr", "patient_view_call"]

_ISSUER = "https://ehr.demo.medirag.invalid"


@dataclass(frozen=True, slots=True)
class DemoEhr:
    """The demo EHR's identity.

    Args:
        issuer: the ``iss`` of its JWTs.
        kid: its key id.
        private_key: its ES384 signing key.
        clients_file: the ``MEDIRAG_CLIENTS`` file that makes the service trust it.
    """

    issuer: str
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    clients_file: Path

    @classmethod
    def load_or_create(cls, directory: Path) -> DemoEhr:
        """Reuse the key in ``directory``, or create one, and (re)write the clients file."""
        directory.mkdir(parents=True, exist_ok=True)
        key_file = directory / "demo-ehr-key.pem"
        if key_file.exists():
            loaded = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_file} is not an EC private key")
            key = loaded
        else:
            key = ec.generate_private_key(ec.SECP384R1())
            key_file.touch(mode=0o600)
            key_file.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        kid = _thumbprint(public)
        public.update({"kid": kid, "use": "sig", "alg": "ES384"})
        clients_file = directory / "clients.json"
        clients_file.write_text(
            json.dumps([{"iss": _ISSUER, "jwks": {"keys": [public]}, "algorithms": ["ES384"]}])
        )
        return cls(issuer=_ISSUER, kid=kid, private_key=key, clients_file=clients_file)

    def sign(self, audience: str, *, lifetime_s: int = 300) -> str:
        """A fresh JWT for one call to ``audience`` (the endpoint URL)."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": audience,
            "iat": now,
            "exp": now + lifetime_s,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(
            claims, self.private_key, algorithm="ES384", headers={"kid": self.kid, "typ": "JWT"}
        )


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint of an EC public JWK, base64url without padding."""
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def patient_view_call(
    patient_id: str, *, prefetch: dict[str, Any] | None, user: str = "Practitioner/demo"
) -> dict[str, Any]:
    """The body of a ``patient-view`` call as an EHR sends it.

    Args:
        patient_id: the patient whose chart is opened.
        prefetch: the prefetched resources by key, or ``None`` to send none.
        user: the FHIR reference of the user.
    """
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": user, "patientId": patient_id},
    }
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body
