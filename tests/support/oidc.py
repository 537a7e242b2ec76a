"""An OpenID Connect identity provider for the tests: a JWKS served over real TLS on 127.0.0.1 (the
``idp`` fixture), the keys it lists, and bearer JWTs signed with them."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from safepacs.auth.pki import create_ca, issue_certificate

AUDIENCE = "safepacs"
ROLE_MAP = {"pacs-rad": "radiologist", "pacs-tech": "technologist", "pacs-admin": "admin"}


@dataclass
class IdentityProvider:
    """A JWKS endpoint over TLS (certificate from a CA of its own) and the keys it lists."""

    issuer: str
    jwks_uri: str
    ca_file: Path
    keys: dict[str, Any] = field(default_factory=dict)  # kid -> private key
    listed: set[str] = field(default_factory=set)  # the kids the JWKS shows
    fetches: int = 0

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid in sorted(self.listed):
            jwk = json.loads(
                jwt.algorithms.get_default_algorithms()[_alg_of(self.keys[kid])].to_jwk(
                    self.keys[kid].public_key()
                )
            )
            out.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": out}

    def add_key(self, kid: str, key: Any, *, listed: bool = True) -> None:
        self.keys[kid] = key
        if listed:
            self.listed.add(kid)

    def token(self, kid: str = "rsa1", alg: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "u-1234",
            "preferred_username": "jane",
            "iat": now,
            "exp": now + 300,
            "realm_access": {"roles": ["pacs-rad", "offline_access"]},
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        key = self.keys[kid]
        return jwt.encode(payload, key, algorithm=alg or _alg_of(key), headers={"kid": kid})

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "audience": AUDIENCE,
            "jwks_uri": self.jwks_uri,
            "ca_file": str(self.ca_file),
            "roles_claim": "realm_access.roles",
            "role_map": ROLE_MAP,
            "jwks_refresh_cooldown": 60,
            **overrides,
        }


def _alg_of(key: Any) -> str:
    return "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[IdentityProvider]:
    ca_cert, ca_key = create_ca("Test IdP CA")
    cert, key = issue_certificate(ca_cert, ca_key, "idp", server_names=["127.0.0.1"])
    (tmp_path / "idp-ca.pem").write_bytes(ca_cert)
    (tmp_path / "idp.pem").write_bytes(cert + key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "idp.pem")
    provider: IdentityProvider

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/jwks":
                self.send_error(404)
                return
            provider.fetches += 1
            body = json.dumps(provider.jwks()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    provider = IdentityProvider(
        f"https://127.0.0.1:{port}/realms/test", f"https://127.0.0.1:{port}/jwks", tmp_path / "idp-ca.pem"
    )
    provider.add_key("rsa1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    provider.add_key("ec1", ec.generate_private_key(ec.SECP256R1()))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
