"""An OpenID Connect identity provider for the tests, over real TLS on 127.0.0.1 (the ``idp``
fixture): a JWKS, the keys it lists and bearer JWTs signed with them; and for "Sign in with" a
discovery document, ``/authorize`` (approves ``IdentityProvider.person`` at once: redirects to the
redirect URI with a code and the state, keeping the nonce and the PKCE challenge) and ``/token``
(checks the code, its single use, the redirect URI, the code verifier against the S256 challenge and
the client's authentication; answers an ID token signed with ``rsa1``, with the nonce)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from safepacs.auth.pki import create_ca, issue_certificate

AUDIENCE = "safepacs"
CLIENT_ID = "safepacs-web"
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
    # Sign-in: the person /authorize approves (claims of the ID token), the client's secret (None: a
    # public client), the codes handed out (code -> what /authorize was asked) and the /token errors.
    person: dict[str, Any] = field(
        default_factory=lambda: {"sub": "u-1234", "realm_access": {"roles": ["pacs-rad"]}}
    )
    client_secret: str | None = None
    authorize_error: str | None = None  # /authorize answers this error instead of a code
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    discovery_changes: dict[str, Any] = field(default_factory=dict)  # over the discovery document
    discoveries: int = 0  # discovery documents served
    token_errors: list[str] = field(default_factory=list)

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

    # Sign-in ------------------------------------------------------------------------------------------
    def discovery(self) -> dict[str, Any]:
        base = self.issuer.rsplit("/realms/", 1)[0]
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            **self.discovery_changes,
        }

    def authorize(self, query: dict[str, str]) -> str:
        """Where /authorize sends the browser: back to the redirect URI with a code and the state."""
        redirect_uri = query["redirect_uri"]
        if self.authorize_error is not None:
            return f"{redirect_uri}?{urlencode({'error': self.authorize_error, 'state': query['state']})}"
        assert query["response_type"] == "code" and query["client_id"] == CLIENT_ID, query
        assert query["code_challenge_method"] == "S256" and "openid" in query["scope"].split(), query
        code = secrets.token_urlsafe(16)
        self.codes[code] = {**query, "used": ""}
        return f"{redirect_uri}?{urlencode({'code': code, 'state': query['state']})}"

    def exchange(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        """The token endpoint: (status, JSON body)."""

        def error(kind: str) -> tuple[int, dict[str, Any]]:
            self.token_errors.append(kind)
            return (401 if kind == "invalid_client" else 400), {"error": kind}

        if self.client_secret is not None:  # RFC 6749 2.3.1: Basic of the form-urlencoded id and secret
            scheme, _, encoded = authorization.partition(" ")
            try:
                pair = base64.b64decode(encoded, validate=True).decode()
            except ValueError:
                pair = ""
            client, _, secret = pair.partition(":")
            if (
                scheme != "Basic"
                or unquote_plus(client) != CLIENT_ID
                or unquote_plus(secret) != self.client_secret
            ):
                return error("invalid_client")
        elif form.get("client_id") != CLIENT_ID:
            return error("invalid_client")
        asked = self.codes.get(form.get("code", ""))
        if form.get("grant_type") != "authorization_code" or asked is None or asked["used"]:
            return error("invalid_grant")
        asked["used"] = "yes"
        if form.get("redirect_uri") != asked["redirect_uri"]:
            return error("invalid_grant")
        verifier = form.get("code_verifier", "")
        digest = hashlib.sha256(verifier.encode()).digest()
        challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if not verifier or not hmac.compare_digest(challenge, asked["code_challenge"]):
            return error("invalid_grant")  # RFC 7636 4.6
        claims = {"aud": CLIENT_ID, "nonce": asked["nonce"], "preferred_username": None, **self.person}
        id_token = self.token(**claims)  # the person's claims may override aud and nonce
        return 200, {"access_token": "opaque", "token_type": "Bearer", "id_token": id_token}


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
        def answer(self, status: int, document: dict[str, Any]) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/jwks":
                provider.fetches += 1
                self.answer(200, provider.jwks())
            elif url.path == "/realms/test/.well-known/openid-configuration":
                provider.discoveries += 1
                self.answer(200, provider.discovery())
            elif url.path == "/authorize":
                self.send_response(302)
                self.send_header("Location", provider.authorize(dict(parse_qsl(url.query))))
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(404)

        def do_POST(self) -> None:
            if self.path != "/token":
                self.send_error(404)
                return
            length = int(self.headers.get("Content-Length", "0"))
            form = dict(parse_qsl(self.rfile.read(length).decode()))
            self.answer(*provider.exchange(form, self.headers.get("Authorization", "")))

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
