"""Real signing keys and JWTs for the auth tests, and a loopback JWKS server.

Independent of the service's own code (deploy/ehr_simulator.py) so that a bug there cannot hide
a bug in the verifier.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa


class Signer:
    def __init__(self, alg="ES384", kid="k1", iss="https://ehr.test"):
        self.alg, self.kid, self.iss = alg, kid, iss
        if alg.startswith("ES"):
            curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1()}[alg]
            self.key = ec.generate_private_key(curve)
            self.public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        else:
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.public_jwk.update({"kid": kid, "alg": alg, "use": "sig"})

    @property
    def jwks(self):
        return {"keys": [self.public_jwk]}

    def claims(self, aud, **overrides):
        now = int(time.time())
        claims = {
            "iss": self.iss,
            "aud": aud,
            "iat": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, aud, *, headers=None, key=None, alg=None, **overrides):
        head = {"kid": self.kid, "typ": "JWT"}
        head.update(headers or {})
        head = {k: v for k, v in head.items() if v is not None}
        return jwt.encode(
            self.claims(aud, **overrides), key or self.key, algorithm=alg or self.alg, headers=head
        )


class JwksServer:
    """Serves a JWK Set on loopback and counts the fetches."""

    def __init__(self, jwks):
        self.jwks, self.hits = jwks, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits += 1
                body = json.dumps(server.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
