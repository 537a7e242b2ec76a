"""OpenID Connect bearer JWTs: a JWKS served over real TLS on 127.0.0.1, keys made here, and the
DICOMweb app in-process (plus one test against a running ``safepacs serve``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from safepacs.app import Archive, open_archive
from safepacs.config import load_settings
from safepacs.errors import ConfigError
from tests.support import oidc
from tests.support.corpus import make_ct
from tests.support.oidc import IdentityProvider
from tests.support.server import run_cli, start_server
from tests.support.webapp import AppClient, add_user, inprocess, store

idp = oidc.idp  # a JWKS endpoint over TLS on 127.0.0.1, with an RSA and an EC key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())


def _oidc_env(monkeypatch: pytest.MonkeyPatch, *issuers: dict[str, Any]) -> None:
    monkeypatch.setenv("SAFEPACS_AUTH__OIDC", json.dumps(list(issuers)))


@pytest.fixture
def app(
    data_dir: Path, idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[AppClient, Archive]]:
    _oidc_env(monkeypatch, idp.settings())
    with inprocess(data_dir) as pair:
        yield pair


def _get(client: AppClient, token: str, url: str = "/dicomweb/studies") -> httpx.Response:
    return client.get(url, headers={"Authorization": f"Bearer {token}"})


def _refused(r: httpx.Response, words: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith('Bearer realm="SafePACS", error="invalid_token"')
    assert words in r.json()["detail"], r.json()["detail"]


def test_a_valid_token_searches_with_the_mapped_roles(
    app: tuple[AppClient, Archive], idp: IdentityProvider
) -> None:
    client, archive = app
    study = make_ct(patient_id="OIDC1")
    store(archive, study)
    for kid in ("rsa1", "ec1"):
        r = _get(client, idp.token(kid))
        assert r.status_code == 200, r.text
        assert [item["0020000D"]["Value"][0] for item in r.json()] == [study.StudyInstanceUID]
    who = _get(client, idp.token(), "/api/session").json()
    assert who["user"] == "u-1234" and who["roles"] == ["radiologist"]  # username_claim defaults to sub
    assert idp.fetches == 1  # the JWKS is cached
    # A technologist may search but not retrieve: the retrieve answers 404, as for any denial.
    tech = idp.token(realm_access={"roles": ["pacs-tech"]})
    assert _get(client, tech).status_code == 200
    assert _get(client, tech, f"/dicomweb/studies/{study.StudyInstanceUID}").status_code == 404
    assert _get(client, idp.token(), f"/dicomweb/studies/{study.StudyInstanceUID}").status_code == 200
    # Claim values missing from role_map grant nothing: a token mapping to no role is refused.
    r = _get(client, idp.token(realm_access={"roles": ["offline_access", "radiologist"]}))
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    r = _get(client, idp.token(realm_access=None))
    assert r.status_code == 403


def test_bad_tokens_are_refused(app: tuple[AppClient, Archive], idp: IdentityProvider) -> None:
    client, _ = app
    now = int(time.time())
    _refused(_get(client, idp.token(exp=now - 120)), "expired")
    _refused(_get(client, idp.token(exp=None)), "lacks a required claim")
    _refused(_get(client, idp.token(nbf=now + 600)), "not valid yet")
    _refused(_get(client, idp.token(aud="another-app")), "wrong audience")
    _refused(_get(client, idp.token(aud=None)), "lacks a required claim")
    _refused(_get(client, idp.token(iss="https://evil.example/realms/test")), "issuer is not accepted")
    _refused(_get(client, idp.token(sub=None)), "no usable 'sub' claim")
    _refused(_get(client, "a.b.c"), "malformed")
    _refused(_get(client, "not-a-jwt"), "malformed")
    # Within the leeway (30 s) an expired token still passes: clocks differ a little.
    assert _get(client, idp.token(exp=now - 5)).status_code == 200

    good = idp.token()
    header_b64, payload_b64, signature = good.split(".")
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    # alg=none, with and without a signature part.
    for alg in ("none", "None", "NONE"):
        unsigned = _unsigned({"alg": alg, "typ": "JWT", "kid": "rsa1"}, payload)
        _refused(_get(client, unsigned + "."), "algorithm is not accepted")
        _refused(_get(client, unsigned + "." + signature), "algorithm is not accepted")
    # Key confusion: HS256 "signed" with the provider's public key (PEM and JWK forms).
    public_pem = (
        idp.keys["rsa1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for secret in (public_pem, public_pem.strip(), json.dumps(idp.jwks()["keys"][1]).encode()):
        signing_input = _unsigned({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}, payload)
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        _refused(_get(client, signing_input + "." + _b64(mac)), "algorithm is not accepted")
    # Tampered: more roles in the payload under the old signature; a flipped signature byte.
    raised = dict(payload, realm_access={"roles": ["pacs-admin"]})
    _refused(
        _get(client, header_b64 + "." + _b64(json.dumps(raised).encode()) + "." + signature), "signature"
    )
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[10] ^= 1
    _refused(_get(client, f"{header_b64}.{payload_b64}.{_b64(bytes(raw))}"), "signature")
    # The right alg name with a key of the wrong type (an RSA token naming the EC key's kid).
    rsa_signed = jwt.encode(payload, idp.keys["rsa1"], algorithm="RS256", headers={"kid": "ec1"})
    _refused(_get(client, rsa_signed), "does not fit its key")
    # A token naming no key, and one signed by a key of the attacker's with the provider's kid.
    _refused(_get(client, jwt.encode(payload, idp.keys["rsa1"], algorithm="RS256")), "names no signing key")
    forged = jwt.encode(
        payload,
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256",
        headers={"kid": "rsa1"},
    )
    _refused(_get(client, forged), "signature")


def test_an_unknown_kid_refetches_the_jwks_at_most_once_per_cooldown(
    app: tuple[AppClient, Archive], idp: IdentityProvider
) -> None:
    client, _ = app
    assert _get(client, idp.token()).status_code == 200
    assert idp.fetches == 1
    idp.add_key("rsa2", rsa.generate_private_key(public_exponent=65537, key_size=2048), listed=False)
    _refused(_get(client, idp.token("rsa2")), "key the identity provider does not list")
    assert idp.fetches == 2  # one re-fetch for the unknown kid...
    for _ in range(3):
        _refused(_get(client, idp.token("rsa2")), "key the identity provider does not list")
    assert idp.fetches == 2  # ...and no more within jwks_refresh_cooldown


def test_a_rotated_key_is_picked_up(
    data_dir: Path, idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    _oidc_env(monkeypatch, idp.settings(jwks_refresh_cooldown=0))
    with inprocess(data_dir) as (client, _):
        assert _get(client, idp.token()).status_code == 200
        idp.add_key("rsa2", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        assert _get(client, idp.token("rsa2")).status_code == 200
        assert idp.fetches == 2


def test_local_accounts_can_refuse_but_never_lend_roles(
    data_dir: Path, idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _oidc_env(monkeypatch, idp.settings(username_claim="preferred_username"))
    with inprocess(data_dir) as (client, archive):
        # "admin" at the provider is not SafePACS's admin: the token's roles count, not the account's.
        who = _get(client, idp.token(preferred_username="admin"), "/api/session").json()
        assert who == {
            "user": "admin",
            "roles": ["radiologist"],
            "allow": ["echo", "find", "get", "move", "store"],
        }
        # A disabled local account of the same name refuses the person.
        add_user(archive, "jane", "technologist")
        assert _get(client, idp.token()).status_code == 200
        assert run_cli("user", "disable", "jane", "--data", str(data_dir)) == 0
        _refused(_get(client, idp.token()), "disabled")
        # Personal access tokens keep working beside OIDC (told apart by their spat_ prefix); revoked: 401.
        add_user(archive, "pat-user", "radiologist")
        assert run_cli("token", "create", "--user", "pat-user", "--data", str(data_dir)) == 0
        pat = capsys.readouterr().out.strip()
        assert _get(client, pat).status_code == 200
        assert run_cli("token", "revoke", pat.split("_")[1], "--data", str(data_dir)) == 0
        _refused(_get(client, pat), "not valid")


def test_an_unreachable_jwks_answers_503_within_the_timeout(
    data_dir: Path, idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection, never answers the TLS handshake
    port = silent.getsockname()[1]
    try:
        dead = idp.settings(
            issuer="https://127.0.0.1/dead", jwks_uri=f"https://127.0.0.1:{port}/jwks", jwks_timeout=1
        )
        _oidc_env(monkeypatch, idp.settings(), dead)
        with inprocess(data_dir) as (client, _):
            started = time.monotonic()
            r = _get(client, idp.token(iss="https://127.0.0.1/dead"))
            assert r.status_code == 503 and "try again later" in r.json()["detail"]
            assert time.monotonic() - started < 5
            assert _get(client, idp.token()).status_code == 200  # the other issuer is not affected
    finally:
        silent.close()


def test_insecure_oidc_settings_are_refused(
    data_dir: Path, idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"algorithms": ["RS256", "HS256"]}, "'HS256' is not accepted"),
        ({"algorithms": ["none"]}, "'none' is not accepted"),
        ({"jwks_uri": "http://127.0.0.1/jwks"}, "https"),
        ({"issuer": "http://127.0.0.1/realms/test"}, "https"),
        ({"leeway_seconds": 300}, "leeway_seconds"),
    ]
    for overrides, words in bad:
        _oidc_env(monkeypatch, idp.settings(**overrides))
        with pytest.raises(ConfigError, match=words):
            load_settings(data_dir)
    for overrides, words in [
        ({"role_map": {"pacs-rad": "superuser"}}, "unknown role 'superuser'"),
        ({"ca_file": str(data_dir / "missing.pem")}, "ca_file"),
    ]:
        _oidc_env(monkeypatch, idp.settings(**overrides))
        with pytest.raises(ConfigError, match=words):
            open_archive(load_settings(data_dir))


def test_oidc_against_a_running_server(data_dir: Path, idp: IdentityProvider) -> None:
    env = {"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_AUTH__OIDC": json.dumps([idp.settings()])}
    srv = start_server(data_dir, env=env)
    try:
        verify = ssl.create_default_context(cafile=str(srv.ca_file))
        with httpx.Client(base_url=srv.base_url, verify=verify, timeout=20) as client:
            ok = client.get("/dicomweb/studies", headers={"Authorization": f"Bearer {idp.token()}"})
            assert ok.status_code == 200, ok.text
            expired = idp.token(exp=int(time.time()) - 120)
            r = client.get("/dicomweb/studies", headers={"Authorization": f"Bearer {expired}"})
            assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    finally:
        srv.stop()
