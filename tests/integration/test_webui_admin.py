"""The administration pages, in-process on a real data directory: each change made through a form is
made (peers admitted and refused by a real server, certificates that verify, passwords and second
factors that sign in, tokens that open DICOMweb until revoked), recorded with the administrator's name,
address and browser, and refused to anyone but an administrator or to a forged post."""

from __future__ import annotations

import base64
import html
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from safepacs.app import Archive
from safepacs.audit.events import AuditEvent, EventID, Participant
from safepacs.auth.totp import code_at
from safepacs.protocols.webui.admin_users import qr_data_uri
from safepacs.services.admin import Change
from safepacs.services.audit import Types
from safepacs.types import Peer, Service, TlsMode
from tests.support.audit_capture import AuditCapture
from tests.support.dicom_client import echo
from tests.support.server import start_server
from tests.support.tls import bundle_context, tls
from tests.support.uibrowser import Browser, shown_once
from tests.support.webapp import AppClient, add_user, inprocess

AGENT = "AdminBrowser/7.1 (tests)"
SETUP = Change(Participant("test-setup", True), "test setup")

ADMIN_PAGES = ["/admin", "/admin/peers", "/admin/users", "/admin/tokens", "/admin/access"]
ADMIN_POSTS = [
    ("/admin/peers", {"ae_title": "SNEAKY", "host": "127.0.0.1", "allow_echo": "1", "tls": "off"}),
    ("/admin/peers/remove", {"ae_title": "KEPT"}),
    ("/admin/peers/certificate", {"ae_title": "KEPT", "days": "30"}),
    ("/admin/peers/revoke", {"ae_title": "KEPT"}),
    ("/admin/users", {"name": "mallory", "role_admin": "1"}),
    ("/admin/users/disable", {"name": "alice"}),
    ("/admin/users/enable", {"name": "alice"}),
    ("/admin/users/reset-password", {"name": "alice"}),
    ("/admin/users/totp", {"name": "alice"}),
    ("/admin/users/totp-remove", {"name": "alice"}),
    ("/admin/users/unlock", {"name": "alice"}),
    ("/admin/tokens", {"user": "alice", "expires": "30d"}),
    ("/admin/tokens/revoke", {"token_id": "x"}),
    ("/admin/access/scope", {"name": "alice", "clear": "1"}),
    ("/admin/access/groups", {"study_uid": "1.2.3", "group": "g"}),
    ("/admin/access/groups/remove", {"study_uid": "1.2.3", "group": "g"}),
    ("/admin/access/grants", {"study_uid": "1.2.3", "user": "alice"}),
    ("/admin/access/grants/revoke", {"study_uid": "1.2.3", "user": "alice"}),
]


def _secret(uri: str) -> bytes:
    encoded = urllib.parse.parse_qs(urllib.parse.urlparse(uri).query)["secret"][0]
    return base64.b32decode(encoded + "=" * (-len(encoded) % 8))


def _code(secret: bytes) -> str:
    return code_at(secret, time.time())


@pytest.fixture
def app(data_dir: Path) -> Iterator[tuple[AppClient, Archive]]:
    with inprocess(data_dir) as pair:
        yield pair


@pytest.fixture
def admin(app: tuple[AppClient, Archive]) -> Browser:
    """An administrator with a second factor, signed in."""
    client, archive = app
    add_user(archive, "boss", "admin")
    secret = _secret(archive.admin.enrol_totp("boss", SETUP))
    browser = Browser(client, user_agent=AGENT)
    assert browser.sign_in("boss", totp=_code(secret)).status_code == 303
    assert browser.get("/admin").status_code == 200
    return browser


CHANGES = {
    code[0] for code in (Types.SECURITY_CONFIGURATION, Types.ROLES_CHANGED, Types.USER_ATTRIBUTES_CHANGED)
}


def _changes(capture: AuditCapture) -> list[AuditEvent]:
    """The administrative changes recorded since ``capture`` (not a refused association's alert)."""
    return [
        e
        for e in capture.events(EventID.SECURITY_ALERT)
        if e.type_code is not None and e.type_code[0] in CHANGES and e.participants[0].user_id != "test-setup"
    ]


def _by_the_admin(event: AuditEvent, command: str) -> None:
    who = event.participants[0]
    assert (who.user_id, who.requestor, who.address, who.user_agent) == ("boss", True, "127.0.0.1", AGENT)
    assert event.outcome_description == f"web UI: {command}"


def test_an_admin_adds_a_peer_issues_its_certificate_and_a_real_server_admits_it_until_revoked(
    app: tuple[AppClient, Archive], admin: Browser, data_dir: Path
) -> None:
    _, archive = app
    capture = AuditCapture(archive.audit_log)
    form = {
        "ae_title": "WEBPEER",
        "host": "127.0.0.1",
        "allow_echo": "1",
        "allow_find": "1",
        "tls": "required",
    }
    r = admin.post("/admin/peers", form)
    assert r.status_code == 303 and r.headers["location"] == "/admin/peers?done=peer-added"
    page = admin.get(r.headers["location"]).text
    assert "The peer was registered." in page and "WEBPEER" in page
    peer = archive.admin.peer("WEBPEER")
    assert (
        peer is not None
        and {s.value for s in peer.allow} == {"echo", "find"}
        and peer.tls.value == "required"
    )

    r = admin.post("/admin/peers/certificate", {"ae_title": "WEBPEER", "days": "30"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert (
        r.headers["cache-control"] == "no-store"
        and "WEBPEER-certificate.zip" in r.headers["content-disposition"]
    )
    ctx = bundle_context(r.content, data_dir / "keys" / "ca.pem", "WEBPEER", data_dir.parent / "bundle")
    assert b"PRIVATE KEY" not in admin.get("/admin/peers").content  # the key left only in the download
    issued = archive.directory.list_certificates("WEBPEER")
    assert [c.source for c in issued] == ["issued"] and issued[0].revoked_at is None

    # A real server admits the peer over DICOM TLS with the downloaded bundle.
    srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        status = echo(srv.tls_port, calling="WEBPEER", tls_args=tls(ctx))
        assert status is not None and getattr(status, "Status", None) == 0x0000

        r = admin.post("/admin/peers/revoke", {"ae_title": "WEBPEER"})
        assert r.headers["location"] == "/admin/peers?done=certs-revoked"
        refused = echo(srv.tls_port, calling="WEBPEER", tls_args=tls(ctx))
        assert not hasattr(refused, "Status")  # the association was refused: no C-ECHO status

        r = admin.post("/admin/peers/remove", {"ae_title": "WEBPEER"})
        assert r.headers["location"] == "/admin/peers?done=peer-removed"
        assert archive.admin.peer("WEBPEER") is None
    finally:
        srv.stop()

    events = _changes(capture)
    assert len(events) == 4
    for event, command in zip(
        events,
        [
            "added peer WEBPEER",
            "issued a client certificate for peer WEBPEER",
            "revoked the certificates of peer WEBPEER",
            "removed peer WEBPEER",
        ],
        strict=True,
    ):
        _by_the_admin(event, command)
        assert event.objects[0].id == "WEBPEER"


def test_a_peer_form_with_bad_values_is_shown_again_with_the_cli_s_message(
    app: tuple[AppClient, Archive], admin: Browser
) -> None:
    _, archive = app
    capture = AuditCapture(archive.audit_log)
    cases = [
        ({"ae_title": "CT", "host": "not a host!", "allow_echo": "1"}, "neither an IP address"),
        ({"ae_title": "CT", "host": "127.0.0.1"}, "Allowed services needs at least one of"),
        ({"ae_title": "CT", "host": "127.0.0.1", "allow_echo": "1", "port": "70000"}, "Port must be"),
        ({"ae_title": "A" * 17, "host": "127.0.0.1", "allow_echo": "1"}, "is not a valid AE title"),
        (
            {
                "ae_title": "CT",
                "host": "127.0.0.1",
                "allow_echo": "1",
                "tls": "off",
                "cert_fingerprint": "ab" * 32,
            },
            "a pinned certificate needs DICOM TLS",
        ),
        ({"ae_title": "CT", "host": "127.0.0.1", "allow_echo": "1", "user": "nobody"}, "no user named"),
        (
            {"ae_title": "CT", "host": "127.0.0.1", "allow_echo": "1", "cert_pem": "junk"},
            "not a PEM certificate",
        ),
    ]
    for form, message in cases:
        r = admin.post("/admin/peers", {"tls": "required", **form})
        assert r.status_code == 400, form
        assert message in r.text and "Traceback" not in r.text
        assert f'value="{form["host"]}"' in r.text  # what was typed is kept
    assert archive.admin.peers() == [] and _changes(capture) == []
    r = admin.post(
        "/admin/peers", {"ae_title": "CT", "host": "10.0.0.0/24", "allow_store": "1", "tls": "off"}
    )
    assert r.status_code == 303
    r = admin.post("/admin/peers", {"ae_title": "CT", "host": "10.0.0.9", "allow_store": "1", "tls": "off"})
    assert r.status_code == 400 and "registered already" in r.text


def test_an_admin_adds_a_user_whose_one_time_password_is_shown_once_and_must_be_changed(
    app: tuple[AppClient, Archive], admin: Browser
) -> None:
    client, archive = app
    capture = AuditCapture(archive.audit_log)
    r = admin.post("/admin/users", {"name": "carol", "role_radiologist": "1", "role_auditor": "1"})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    password = shown_once(r.text)
    assert len(password) >= 12 and "carol" in r.text
    user = archive.admin.user("carol")
    assert user is not None and user.roles == {"radiologist", "auditor"} and user.must_change_password
    listing = admin.get("/admin/users").text
    assert password not in listing and "carol" in listing
    assert all(password not in str(e) for e in capture.events())

    carol = Browser(client)
    r = carol.sign_in("carol", password)
    assert r.status_code == 200 and "Choose a new password" in r.text and not carol.cookie

    r = admin.post("/admin/users", {"name": "carol", "role_radiologist": "1"})
    assert r.status_code == 400 and "exists already" in r.text
    r = admin.post("/admin/users", {"name": "dave"})
    assert r.status_code == 400 and "Roles needs a role" in r.text
    r = admin.post("/admin/users", {"name": "bad name!", "role_admin": "1"})
    assert r.status_code == 400 and "a user name is 1-64" in r.text

    r = admin.post("/admin/users/reset-password", {"name": "carol"})
    second = shown_once(r.text)
    assert second != password and r.headers["cache-control"] == "no-store"
    assert carol.sign_in("carol", password).status_code == 401
    r = admin.post("/admin/users/disable", {"name": "carol"})
    assert r.headers["location"] == "/admin/users?done=user-disabled"
    assert "The user was disabled" in admin.get(r.headers["location"]).text
    disabled = archive.admin.user("carol")
    assert disabled is not None and disabled.disabled
    admin.post("/admin/users/enable", {"name": "carol"})
    enabled = archive.admin.user("carol")
    assert enabled is not None and not enabled.disabled

    commands = [
        "added user carol",
        "reset the password of user carol",
        "disabled user carol",
        "enabled user carol",
    ]
    events = _changes(capture)
    assert len(events) == len(commands)
    for event, command in zip(events, commands, strict=True):
        _by_the_admin(event, command)
        assert event.objects[0].id == "carol"


def test_a_totp_enrolment_s_qr_code_and_secret_give_codes_that_sign_in(
    app: tuple[AppClient, Archive], admin: Browser
) -> None:
    client, archive = app
    add_user(archive, "erin", "admin")
    erin = Browser(client)
    assert erin.sign_in("erin").status_code == 403  # an administrator without a second factor
    capture = AuditCapture(archive.audit_log)
    r = admin.post("/admin/users/totp", {"name": "erin"})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert re.search(r'<img class="qr" src="data:image/svg\+xml[^"]+" alt="[^"]+"', r.text)
    typed = shown_once(r.text).replace(" ", "")
    secret = base64.b32decode(typed + "=" * (-len(typed) % 8))
    # The QR code carries the otpauth:// URI of that same secret (what an authenticator app scans).
    uri = TOTP(secret, 6, SHA1(), 30).get_provisioning_uri("erin", "SafePACS")  # noqa: S303
    assert f'src="{html.escape(qr_data_uri(uri))}"' in r.text
    assert "TOTP enrolled" in admin.get("/admin/users").text
    assert erin.sign_in("erin", totp=_code(secret)).status_code == 303 and erin.cookie
    assert erin.get("/admin").status_code == 200

    r = admin.post("/admin/users/totp-remove", {"name": "erin"})
    assert r.headers["location"] == "/admin/users?done=totp-removed"
    state = archive.admin.login_state("erin")
    assert state is not None and state.totp_secret is None
    assert typed not in str(capture.events())
    commands = ["enrolled a TOTP secret for user erin", "removed the TOTP secret of user erin"]
    for event, command in zip(_changes(capture), commands, strict=True):
        _by_the_admin(event, command)


def test_a_token_issued_on_the_page_opens_dicomweb_until_it_is_revoked(
    app: tuple[AppClient, Archive], admin: Browser
) -> None:
    client, archive = app
    add_user(archive, "alice", "radiologist")
    capture = AuditCapture(archive.audit_log)
    r = admin.post("/admin/tokens", {"user": "alice", "expires": "2d", "scope_find": "1"})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    token = shown_once(r.text)
    bearer = {"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"}
    assert client.get("/dicomweb/studies", headers=bearer).status_code in (200, 204)
    (record,) = archive.admin.tokens("alice")
    assert record.scopes == {"find"}
    listing = admin.get("/admin/tokens").text
    assert record.token_id in listing and token not in listing

    r = admin.post("/admin/tokens", {"user": "alice", "expires": "forever"})
    assert r.status_code == 400 and "Expires after" in r.text
    r = admin.post("/admin/tokens/revoke", {"token_id": record.token_id})
    assert r.headers["location"] == "/admin/tokens?done=token-revoked"
    assert client.get("/dicomweb/studies", headers=bearer).status_code == 401

    events = _changes(capture)
    assert [e.objects[0].id for e in events] == ["alice", record.token_id]
    _by_the_admin(events[0], "issued a token for user alice")
    _by_the_admin(events[1], f"revoked token {record.token_id}")
    assert token not in str(capture.events())


def test_access_rules_are_set_and_lifted_on_the_access_page(
    app: tuple[AppClient, Archive], admin: Browser
) -> None:
    _, archive = app
    add_user(archive, "rita", "referrer")
    capture = AuditCapture(archive.audit_log)
    study = "1.2.840.99.1"
    r = admin.post("/admin/access/scope", {"name": "rita", "modalities": "ct, mr", "groups": "trial"})
    assert r.headers["location"] == "/admin/access?done=scope-set"
    user = archive.admin.user("rita")
    assert user is not None and user.scope is not None and user.scope.modalities == {"CT", "MR"}
    assert "modalities CT,MR; groups trial" in admin.get("/admin/access").text
    assert admin.post("/admin/access/scope", {"name": "rita"}).status_code == 400
    assert admin.post("/admin/access/groups", {"study_uid": study, "group": "trial"}).status_code == 303
    assert admin.post("/admin/access/groups", {"study_uid": "1.2.x", "group": "trial"}).status_code == 400
    r = admin.post("/admin/access/grants", {"study_uid": study, "user": "rita", "expires": "12h"})
    assert r.headers["location"] == "/admin/access?done=grant-added"
    (grant,) = archive.admin.grants("rita")
    assert grant.study_instance_uid == study and grant.expires_at is not None
    assert archive.admin.study_groups(study) == [(study, "trial")]
    admin.post("/admin/access/grants/revoke", {"study_uid": study, "user": "rita"})
    admin.post("/admin/access/groups/remove", {"study_uid": study, "group": "trial"})
    admin.post("/admin/access/scope", {"name": "rita", "clear": "1"})
    cleared = archive.admin.user("rita")
    assert archive.admin.grants("rita") == [] and archive.admin.study_groups() == []
    assert cleared is not None and cleared.scope is None
    assert len(_changes(capture)) == 6
    for event in _changes(capture):
        assert event.participants[0].user_id == "boss" and event.participants[0].user_agent == AGENT


def test_a_radiologist_gets_403_on_every_administration_page_and_post(
    app: tuple[AppClient, Archive], data_dir: Path
) -> None:
    client, archive = app
    add_user(archive, "alice", "radiologist")
    archive.admin.add_peer(Peer("KEPT", "127.0.0.1", None, frozenset({Service.ECHO}), tls=TlsMode.OFF), SETUP)
    capture = AuditCapture(archive.audit_log)
    alice = Browser(client)
    assert alice.sign_in("alice").status_code == 303
    for path in ADMIN_PAGES:
        r = alice.get(path)
        assert r.status_code == 403 and "needs the admin role" in r.text, path
    assert 'href="/admin"' not in alice.get("/studies").text
    for path, form in ADMIN_POSTS:
        r = alice.post(path, form)
        assert r.status_code == 403 and "needs the admin role" in r.text, path
    assert _changes(capture) == []
    assert {p.ae_title for p in archive.admin.peers()} == {"KEPT"}
    assert archive.admin.user("mallory") is None and archive.admin.tokens() == []
    assert archive.directory.list_certificates("KEPT") == []
    # Not signed in: sent to the sign-in page, nothing changed.
    r = client.get("/admin/users")
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=/admin/users")


def test_a_post_without_the_form_token_or_from_another_origin_changes_nothing(
    app: tuple[AppClient, Archive], admin: Browser
) -> None:
    _, archive = app
    capture = AuditCapture(archive.audit_log)
    form = {"ae_title": "FORGED", "host": "127.0.0.1", "allow_echo": "1", "tls": "off"}
    assert admin.post("/admin/peers", form, with_token=False).status_code == 403
    assert (
        admin.post("/admin/peers", {**form, "form_token": "not-the-token"}, with_token=False).status_code
        == 403
    )
    assert admin.post("/admin/peers", form, origin="https://evil.example").status_code == 403
    assert admin.post("/admin/peers", form, origin=None).status_code == 403
    assert (
        admin.post("/admin/users", {"name": "forged", "role_admin": "1"}, with_token=False).status_code == 403
    )
    assert admin.post("/admin/tokens", {"user": "boss"}, origin="https://evil.example").status_code == 403
    assert archive.admin.peers() == [] and archive.admin.user("forged") is None
    assert archive.admin.tokens() == [] and _changes(capture) == []
    assert admin.post("/admin/peers", form).status_code == 303  # the same post, from the page, is made


def test_a_locked_out_user_is_shown_locked_and_unlocked_on_the_users_page(
    app: tuple[AppClient, Archive], admin: Browser
) -> None:
    client, archive = app
    add_user(archive, "alice", "radiologist")
    alice = Browser(client)
    for _ in range(archive.settings.auth.max_failed_logins):
        assert alice.sign_in("alice", "wrong password!").status_code == 401
    assert alice.sign_in("alice").status_code == 401  # locked: the right password is refused too
    row = re.search(r"<th scope=\"row\">alice</th>.*?</tr>", admin.get("/admin/users").text, re.S)
    assert row is not None and "until " in row.group(0) and "/admin/users/unlock" in row.group(0)
    r = admin.post("/admin/users/unlock", {"name": "alice"})
    assert r.headers["location"] == "/admin/users?done=user-unlocked"
    assert alice.sign_in("alice").status_code == 303


def test_a_confirmation_is_only_one_of_the_fixed_messages(admin: Browser) -> None:
    page = admin.get("/admin/tokens?done=%3Cb%3EYou+were+hacked%3C/b%3E").text
    assert "hacked" not in page and 'class="notice done"' not in page
    assert "The token was revoked." in admin.get("/admin/tokens?done=token-revoked").text


def test_changes_on_the_pages_are_recorded_even_when_accesses_are_not(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAFEPACS_AUDIT__RECORD", "false")
    with inprocess(data_dir) as (client, archive):
        assert not archive.settings.audit.record
        add_user(archive, "boss", "admin")
        secret = _secret(archive.admin.enrol_totp("boss", SETUP))
        browser = Browser(client, user_agent=AGENT)
        assert browser.sign_in("boss", totp=_code(secret)).status_code == 303
        capture = AuditCapture(archive.audit_log)
        assert browser.post("/admin/users", {"name": "zoe", "role_technologist": "1"}).status_code == 200
        (event,) = _changes(capture)
        _by_the_admin(event, "added user zoe")
