"""'Sign in with <provider>': the authorization code flow with PKCE against the test identity provider
(real TLS on 127.0.0.1), the whole site (``create_site``) under uvicorn over real TLS, and once a
running ``safepacs serve``; a browser played by hand (redirects followed and cookies kept by the
test itself)."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from safepacs.app import Archive, open_archive
from safepacs.audit.events import AuditEvent, EventID, Outcome
from safepacs.auth.login import LoginService
from safepacs.auth.oidc_login import OidcSignIn
from safepacs.config import load_settings
from safepacs.errors import ConfigError
from safepacs.protocols.webui.oidc import OIDC_COOKIE
from safepacs.protocols.webui.site import create_site
from safepacs.storage.crypto import EnvelopeCipher, FileKeyProvider
from safepacs.types import Scope
from tests.support import oidc
from tests.support.audit_capture import AuditCapture
from tests.support.corpus import make_ct
from tests.support.oidc import CLIENT_ID, IdentityProvider
from tests.support.server import start_server
from tests.support.ui import form_token
from tests.support.webapp import add_user, served, store

idp = oidc.idp

SESSION = "__Host-safepacs_session"


class Browser:
    """Two origins (the site and the provider), redirects followed by the test, the site's cookies
    kept as a browser keeps them (``Max-Age=0`` removes one); each Set-Cookie header is kept whole."""

    def __init__(self, base: str, site_ca: Path, idp_ca: Path) -> None:
        self.base = base
        self.cookies: dict[str, str] = {}
        self.set_cookie: dict[str, str] = {}
        self._site = httpx.Client(verify=ssl.create_default_context(cafile=str(site_ca)), timeout=30)
        self._idp = httpx.Client(verify=ssl.create_default_context(cafile=str(idp_ca)), timeout=30)

    def close(self) -> None:
        self._site.close()
        self._idp.close()

    def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, data: dict[str, str] | None = None
    ) -> httpx.Response:
        url = self.base + url if url.startswith("/") else url
        if not url.startswith(self.base + "/"):
            return self._idp.request(method, url, headers=headers)
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        r = self._site.request(method, url, headers=sent, data=data)
        self._site.cookies.clear()  # only what the test keeps is sent
        for header in r.headers.get_list("set-cookie"):
            name, _, rest = header.partition("=")
            self.set_cookie[name] = header
            if "Max-Age=0" in rest:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = rest.split(";")[0]
        return r

    def get(self, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.request("GET", url, headers)


@dataclass
class Site:
    archive: Archive
    base: str
    browser: Browser
    idp: IdentityProvider
    trail: AuditCapture

    def start(self, position: int = 0, next_path: str | None = "/studies") -> tuple[str, str]:
        """Begin a sign-in and let the provider approve it: (authorization URL, callback URL)."""
        query = "" if next_path is None else "?" + httpx.QueryParams({"next": next_path}).__str__()
        begun = self.browser.get(f"/login/oidc/{position}{query}")
        assert begun.status_code == 303, begun.text
        approved = self.browser.get(begun.headers["location"])
        assert approved.status_code == 302, approved.text
        return begun.headers["location"], approved.headers["location"]

    def sign_in(self, next_path: str | None = "/studies") -> httpx.Response:
        _, callback = self.start(next_path=next_path)
        return self.browser.get(callback)

    def logins(self) -> list[AuditEvent]:
        return self.trail.events(EventID.USER_AUTHENTICATION)


def _env(monkeypatch: pytest.MonkeyPatch, *issuers: dict[str, Any]) -> None:
    monkeypatch.setenv("SAFEPACS_AUTH__OIDC", json.dumps(list(issuers)))


def _site(data_dir: Path, idp: IdentityProvider, sign_in: OidcSignIn | None = None) -> Iterator[Site]:
    archive = open_archive(load_settings(data_dir))
    archive.oidc_sign_in = sign_in or archive.oidc_sign_in
    try:
        with served(create_site(archive), data_dir / "keys") as base:
            browser = Browser(base, data_dir / "keys" / "ca.pem", idp.ca_file)
            try:
                yield Site(archive, base, browser, idp, AuditCapture(archive.audit_log))
            finally:
                browser.close()
    finally:
        archive.close()


@pytest.fixture
def site(data_dir: Path, idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """Issuer 0 offers sign-in (a public client); issuer 1 (same keys) only accepts bearer tokens."""
    _env(monkeypatch, idp.settings(client_id=CLIENT_ID), idp.settings(issuer=idp.issuer + "-bearer-only"))
    yield from _site(data_dir, idp)


def _attributes(header: str) -> set[str]:
    return {part.strip() for part in header.split(";")[1:]}


def _refused(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("text/html"), r.headers
    assert words in r.text, r.text
    assert SESSION not in r.headers.get("set-cookie", "")
    assert f"{OIDC_COOKIE}=;" in r.headers["set-cookie"]  # the sign-in is over either way


# The whole flow ---------------------------------------------------------------------------------------------
def test_sign_in_opens_a_session_like_a_password_login(site: Site) -> None:
    study = make_ct(patient_id="OIDCWEB1")
    store(site.archive, study)
    authorize, callback = site.start(next_path="/studies?page=2")
    request = {k: v[0] for k, v in parse_qs(urlsplit(authorize).query).items()}
    assert authorize.startswith(site.idp.issuer.rsplit("/realms/", 1)[0] + "/authorize?")
    assert request["response_type"] == "code" and request["client_id"] == CLIENT_ID
    assert request["redirect_uri"] == f"{site.base}/login/oidc/callback"
    assert request["scope"] == "openid profile email"
    assert request["code_challenge_method"] == "S256" and len(request["code_challenge"]) == 43
    assert len(request["state"]) >= 22 and len(request["nonce"]) >= 22  # 128 bits and more
    sign_in_cookie = site.browser.set_cookie[OIDC_COOKIE]
    assert _attributes(sign_in_cookie) == {"Path=/", "Secure", "HttpOnly", "SameSite=Lax", "Max-Age=600"}
    assert request["state"] not in sign_in_cookie and "code_verifier" not in sign_in_cookie  # sealed

    r = site.browser.get(callback)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/studies?page=2"
    assert _attributes(site.browser.set_cookie[SESSION]) == {
        "Path=/",
        "Secure",
        "HttpOnly",
        "SameSite=Strict",
    }
    assert OIDC_COOKIE not in site.browser.cookies

    who = site.browser.get("/api/session")
    assert who.status_code == 200, who.text
    assert who.json()["user"] == "u-1234" and who.json()["roles"] == ["radiologist"]
    found = site.browser.get("/dicomweb/studies")
    assert found.status_code == 200, found.text
    assert [s["0020000D"]["Value"][0] for s in found.json()] == [study.StudyInstanceUID]
    # The pages take the session as a password sign-in's: the studies page, and signing out with
    # its form token (refused without), after which the session is over on the server.
    studies = site.browser.get("/studies")
    assert studies.status_code == 200 and "u-1234" in studies.text, studies.text
    origin = {"Origin": site.base}
    assert site.browser.request("POST", "/logout", origin, {"form_token": "0" * 64}).status_code == 403
    out = site.browser.request("POST", "/logout", origin, {"form_token": form_token(studies.text)})
    assert out.status_code == 303, out.text
    assert site.browser.get("/api/session").status_code == 401

    login, logout = site.logins()[:2]
    assert login.outcome is Outcome.SUCCESS and login.type_code is not None and login.type_code[0] == "110122"
    assert login.participants[0].user_id == "u-1234"
    assert login.participants[0].address == "127.0.0.1"
    assert login.participants[0].user_agent is not None and "python-httpx" in login.participants[0].user_agent
    assert logout.type_code is not None and logout.type_code[0] == "110123"


def test_the_session_acts_as_the_bearer_path_would(site: Site) -> None:
    """Roles from the ID token, a local account of the same name lends none, and is read afresh on
    each request: disabling it ends what the session may do."""
    store(site.archive, make_ct(patient_id="OIDCWEB2"))  # a CT study
    add_user(site.archive, "u-1234", "admin")  # the local account's roles are not lent
    assert site.sign_in().status_code == 303
    who = site.browser.get("/api/session").json()
    bearer = site.browser.get("/api/session", {"Authorization": f"Bearer {site.idp.token()}"}).json()
    assert who == bearer and who["roles"] == ["radiologist"]
    assert len(site.browser.get("/dicomweb/studies").json()) == 1
    site.archive.directory.set_user_scope("u-1234", Scope(modalities=frozenset({"MR"})))
    assert site.browser.get("/dicomweb/studies").json() == []  # the local scope narrows
    site.archive.directory.update_user("u-1234", disabled=True)
    assert site.browser.get("/api/session").status_code == 401


def test_a_session_keeps_only_what_the_settings_still_give(site: Site, data_dir: Path) -> None:
    assert site.sign_in().status_code == 303
    cookie = site.browser.cookies[SESSION]
    auth = load_settings(data_dir).auth
    cipher = EnvelopeCipher(FileKeyProvider(load_settings(data_dir).keys_dir))

    def roles(**changes: Any) -> frozenset[str] | None:
        issuer = auth.oidc[0].model_copy(update=changes)
        found = LoginService(site.archive.directory, cipher, auth.model_copy(update={"oidc": (issuer,)}))
        session = found.session(cookie)
        return None if session is None else session[1].roles

    assert roles() == {"radiologist"}
    assert roles(role_map={"pacs-rad": "technologist"}) is None  # the mapping was taken back
    assert roles(role_map={**oidc.ROLE_MAP, "x": "auditor"}) == {"radiologist"}  # nothing is added
    assert roles(client_id=None) is None  # the issuer no longer offers sign-in


# Refusals ---------------------------------------------------------------------------------------------------
def test_a_wrong_state_is_refused_and_recorded(site: Site) -> None:
    _, callback = site.start()
    forged = callback.replace("state=", "state=x")
    _refused(site.browser.get(forged), 400, "state")
    refused = site.logins()[-1]
    assert refused.outcome is not Outcome.SUCCESS and "state" in (refused.outcome_description or "")
    assert refused.participants[0].address == "127.0.0.1"
    assert site.browser.get("/api/session").status_code == 401


def test_a_replayed_code_is_refused(site: Site) -> None:
    _, callback = site.start()
    sealed = site.browser.cookies[OIDC_COOKIE]
    assert site.browser.get(callback).status_code == 303
    site.browser.cookies = {OIDC_COOKIE: sealed}  # someone who kept the cookie and the answer
    _refused(site.browser.get(callback), 400, "refused the sign-in code")
    assert site.idp.token_errors == ["invalid_grant"]


def test_a_missing_tampered_or_expired_cookie_is_refused(
    data_dir: Path, site: Site, idp: IdentityProvider
) -> None:
    _, callback = site.start()
    sealed = site.browser.cookies.pop(OIDC_COOKIE)
    _refused(site.browser.get(callback), 400, "cookie")
    flipped = sealed[:40] + ("A" if sealed[40] != "A" else "B") + sealed[41:]
    site.browser.cookies[OIDC_COOKIE] = flipped
    _refused(site.browser.get(callback), 400, "cookie")
    assert site.idp.token_errors == []  # no code was ever sent
    # A sign-in of another site key is no sign-in here either; then one that takes too long.
    settings = load_settings(data_dir)
    quick = OidcSignIn(
        settings.auth.oidc, site.archive.oidc, EnvelopeCipher(FileKeyProvider(settings.keys_dir)), lifetime=1
    )
    for slow in _site(data_dir, idp, quick):
        _, callback = slow.start()
        time.sleep(1.2)
        _refused(slow.browser.get(callback), 400, "took too long")


def test_pkce_binds_the_code_to_the_browser_that_asked_for_it(site: Site) -> None:
    # Someone who intercepts the code cannot redeem it at the provider without the verifier...
    _, callback = site.start()
    code = parse_qs(urlsplit(callback).query)["code"][0]
    stolen = httpx.post(
        f"{site.idp.issuer.rsplit('/realms/', 1)[0]}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": CLIENT_ID,
            "redirect_uri": f"{site.base}/login/oidc/callback",
        },
        verify=ssl.create_default_context(cafile=str(site.idp.ca_file)),
    )
    assert stolen.status_code == 400 and stolen.json() == {"error": "invalid_grant"}
    # ... nor through SafePACS with their own sign-in cookie: that cookie's verifier is not the one.
    _, victims = site.start()
    mine = site.browser.cookies[OIDC_COOKIE]
    _, attackers = site.start()
    site.browser.cookies[OIDC_COOKIE] = mine
    state = parse_qs(urlsplit(victims).query)["state"][0]
    code = parse_qs(urlsplit(attackers).query)["code"][0]
    _refused(site.browser.get(f"{site.base}/login/oidc/callback?code={code}&state={state}"), 400, "code")
    assert site.idp.token_errors == ["invalid_grant", "invalid_grant"]


def test_a_disabled_local_account_or_no_role_is_refused(site: Site) -> None:
    add_user(site.archive, "u-1234", "radiologist")
    site.archive.directory.update_user("u-1234", disabled=True)
    _refused(site.sign_in(), 403, "disabled")
    refused = site.logins()[-1]
    assert refused.participants[0].user_id == "u-1234" and refused.outcome is not Outcome.SUCCESS
    site.idp.person = {"sub": "u-5678", "realm_access": {"roles": ["offline_access"]}}
    _refused(site.sign_in(), 403, "no SafePACS role")


def test_an_id_token_for_another_client_or_sign_in_is_refused(site: Site) -> None:
    site.idp.person = {"sub": "u-1234", "realm_access": {"roles": ["pacs-rad"]}, "nonce": "another"}
    _refused(site.sign_in(), 400, "nonce")
    site.idp.person = {"sub": "u-1234", "realm_access": {"roles": ["pacs-rad"]}, "aud": "another-client"}
    _refused(site.sign_in(), 400, "wrong audience")


def test_the_provider_refusing_is_a_page_and_a_record(site: Site) -> None:
    site.idp.authorize_error = "access_denied"
    _refused(site.sign_in(), 403, "refused the sign-in (access_denied)")
    assert "access_denied" in (site.logins()[-1].outcome_description or "")


def test_a_foreign_next_is_ignored(site: Site) -> None:
    """Whatever is not a local path becomes the start page, on the way out and on the way back."""
    for next_path in (
        "https://evil.example/",
        "//evil.example/x",
        "/\\evil.example",
        "studies",
        "/\u00e9",
        None,
    ):
        r = site.sign_in(next_path=next_path)
        assert r.status_code == 303 and r.headers["location"] == "/", next_path


def test_unknown_issuers_answer_not_found(site: Site) -> None:
    for position in ("1", "2", "x", "99999"):  # 1: no client_id, bearer tokens only
        r = site.browser.get(f"/login/oidc/{position}")
        assert r.status_code == 404 and r.json()["detail"] == "no such resource", r.text
    assert OIDC_COOKIE not in site.browser.cookies
    assert [c.position for c in site.archive.oidc_sign_in.clients()] == [0]
    assert site.archive.oidc_sign_in.clients()[0].display_name == "127.0.0.1"


# The provider's configuration ------------------------------------------------------------------------------
def test_the_discovery_document_is_cached(site: Site) -> None:
    for _ in range(3):
        site.start()
    assert site.idp.discoveries == 1


@pytest.mark.parametrize(
    "change",
    [
        {"issuer": "https://login.example.org/realms/test"},  # Discovery 4.3: must be the issuer itself
        {"token_endpoint": "http://127.0.0.1:1/token"},
        {"authorization_endpoint": None},
        {"code_challenge_methods_supported": ["plain"]},
    ],
)
def test_an_unusable_discovery_document_stops_the_sign_in(site: Site, change: dict[str, Any]) -> None:
    site.idp.discovery_changes = change
    r = site.browser.get("/login/oidc/0")
    assert r.status_code == 503 and "not usable" in r.json()["detail"], r.text
    assert OIDC_COOKIE not in site.browser.cookies


def test_an_unreachable_provider_answers_503(
    data_dir: Path, idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(monkeypatch, idp.settings(issuer="https://127.0.0.1:1/realms/gone", client_id=CLIENT_ID))
    for site in _site(data_dir, idp):
        r = site.browser.get("/login/oidc/0")
        assert r.status_code == 503 and r.headers["retry-after"] == "30", r.text
        assert "cannot be reached" in r.json()["detail"]


# A running server -------------------------------------------------------------------------------------------
def test_sign_in_against_a_running_server(data_dir: Path, idp: IdentityProvider) -> None:
    issuers = [idp.settings(client_id=CLIENT_ID, display_name="Test IdP")]
    env = {"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_AUTH__OIDC": json.dumps(issuers)}
    srv = start_server(data_dir, env=env)
    browser = Browser(srv.base_url, srv.ca_file, idp.ca_file)
    try:
        signin_page = browser.get("/login?next=/studies")
        assert 'href="/login/oidc/0?next=/studies"' in signin_page.text and "Test IdP" in signin_page.text
        begun = browser.get("/login/oidc/0?next=/studies")
        assert begun.status_code == 303, begun.text
        back = browser.get(browser.get(begun.headers["location"]).headers["location"])
        assert back.status_code == 303 and back.headers["location"] == "/studies", back.text
        assert browser.get("/api/session").json()["user"] == "u-1234"
        assert browser.get("/studies").status_code == 200
    finally:
        browser.close()
        srv.stop()


# A confidential client --------------------------------------------------------------------------------------
def test_a_confidential_client_authenticates_at_the_token_endpoint(
    data_dir: Path, idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret:with/odd+chars\n")
    idp.client_secret = "s3cret:with/odd+chars"
    _env(
        monkeypatch,
        idp.settings(client_id=CLIENT_ID, client_secret_file=str(secret), display_name="Hospital"),
    )
    for site in _site(data_dir, idp):
        assert site.archive.oidc_sign_in.clients()[0].display_name == "Hospital"
        assert site.sign_in().status_code == 303
        assert site.browser.get("/api/session").json()["user"] == "u-1234"
        idp.client_secret = "rotated"
        r = site.sign_in()
        assert r.status_code == 503 and "client credentials" in r.text, r.text
        assert idp.token_errors == ["invalid_client"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"client_id": CLIENT_ID, "scopes": ["profile"]}, "openid"),
        ({"client_secret_file": "/nonexistent"}, "client_secret_file needs client_id"),
        ({"client_id": CLIENT_ID, "client_secret_file": "/nonexistent/secret"}, "not readable"),
        ({"client_id": " "}, "printable"),
    ],
)
def test_bad_sign_in_settings_are_refused(
    data_dir: Path,
    idp: IdentityProvider,
    monkeypatch: pytest.MonkeyPatch,
    overrides: dict[str, Any],
    words: str,
) -> None:
    _env(monkeypatch, idp.settings(**overrides))
    with pytest.raises(ConfigError, match=words):
        open_archive(load_settings(data_dir))
