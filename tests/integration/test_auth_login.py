"""Local password login, lockout, TOTP, browser sessions and CSRF: in-process and over real TLS."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from safepacs.app import Archive
from safepacs.auth.totp import code_at
from safepacs.db.schema import sessions, users
from tests.support.corpus import make_ct
from tests.support.server import run_cli, start_server
from tests.support.webapp import PASSWORD, AppClient, add_user, execute, inprocess, multipart, part10

COOKIE = "__Host-safepacs_session"


@pytest.fixture
def app(data_dir: Path) -> Iterator[tuple[AppClient, Archive]]:
    with inprocess(data_dir) as pair:
        yield pair


def _login(client: Any, user: str, password: str = PASSWORD, **extra: Any) -> httpx.Response:
    return client.post("/api/session", json={"username": user, "password": password, **extra})


def _cookie(response: httpx.Response) -> str:
    header = response.headers["set-cookie"]
    name, _, rest = header.partition("=")
    assert name == COOKIE
    return rest.split(";")[0]


def _session_headers(response: httpx.Response, *, csrf: bool = True) -> dict[str, str]:
    headers = {"Cookie": f"{COOKIE}={_cookie(response)}"}
    if csrf:
        headers["X-CSRF-Token"] = response.json()["csrf_token"]
    return headers


def _secret(uri: str) -> bytes:
    query = urllib.parse.parse_qs(urllib.parse.urlparse(uri).query)
    encoded = query["secret"][0]
    return base64.b32decode(encoded + "=" * (-len(encoded) % 8))


def test_login_opens_a_session_with_a_strict_host_cookie(app: tuple[AppClient, Archive]) -> None:
    client, archive = app
    add_user(archive, "alice", "radiologist")
    r = _login(client, "alice")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user"] == "alice" and body["roles"] == ["radiologist"]
    assert len(body["csrf_token"]) == 43 and body["idle_timeout_seconds"] == 30 * 60
    # Exactly the attributes required of a __Host- cookie: Secure, Path=/, no Domain; and HttpOnly,
    # SameSite=Strict; no Max-Age/Expires (it ends with the browser; the server ends it earlier).
    cookies = r.headers.get_list("set-cookie")
    assert len(cookies) == 1
    value, *attributes = [part.strip() for part in cookies[0].split(";")]
    assert value.startswith(f"{COOKIE}=") and len(value) == len(COOKIE) + 1 + 43
    assert sorted(attributes) == ["HttpOnly", "Path=/", "SameSite=Strict", "Secure"]
    # The server keeps only hashes of the cookie and of the CSRF token.
    stored = archive.directory.list_sessions("alice")
    assert len(stored) == 1
    cookie = _cookie(r)
    assert stored[0].id_sha256 == hashlib.sha256(cookie.encode()).hexdigest()
    assert stored[0].csrf_sha256 == hashlib.sha256(body["csrf_token"].encode()).hexdigest()
    # The cookie authenticates the session API and DICOMweb alike (reads need no CSRF token).
    headers = _session_headers(r, csrf=False)
    who = client.get("/api/session", headers=headers)
    assert who.status_code == 200
    assert who.json() == {
        "user": "alice",
        "roles": ["radiologist"],
        "allow": ["echo", "find", "get", "move", "store"],
    }
    assert client.get("/dicomweb/studies", headers=headers).status_code == 200
    assert client.get("/api/session").status_code == 401  # no cookie, no token
    forged = {"Cookie": f"{COOKIE}={'A' * 43}"}
    assert client.get("/dicomweb/studies", headers=forged).status_code == 401


def test_unknown_user_wrong_password_disabled_user_answer_alike(app: tuple[AppClient, Archive]) -> None:
    client, archive = app
    add_user(archive, "alice", "radiologist")
    add_user(archive, "bob", "radiologist")
    archive.directory.update_user("bob", disabled=True)
    answers = [
        _login(client, "alice", "wrong password!"),
        _login(client, "nobody"),
        _login(client, "bob"),  # right password, disabled account
    ]
    assert {r.status_code for r in answers} == {401}
    assert len({r.text for r in answers}) == 1
    assert len({r.headers["www-authenticate"] for r in answers}) == 1
    assert "set-cookie" not in answers[0].headers
    # Login takes JSON only: a cross-site HTML form cannot log a browser in.
    form = client.post("/api/session", data={"username": "alice", "password": PASSWORD})
    assert form.status_code == 415
    assert client.post("/api/session", json={"username": "alice"}).status_code == 400


def test_lockout_after_consecutive_failures(app: tuple[AppClient, Archive], data_dir: Path) -> None:
    client, archive = app
    add_user(archive, "alice", "radiologist")
    add_user(archive, "carol", "radiologist")
    # Four failures, then a success: the count starts again.
    for _ in range(4):
        assert _login(client, "alice", "wrong password!").status_code == 401
    assert _login(client, "alice").status_code == 200
    state = archive.directory.get_login_state("alice")
    assert state is not None and state.failed_logins == 0
    # Five consecutive failures (auth.max_failed_logins) lock the account...
    wrong = [_login(client, "alice", "wrong password!") for _ in range(5)]
    state = archive.directory.get_login_state("alice")
    assert state is not None and state.locked_until is not None
    assert state.locked_until - dt.datetime.now(dt.UTC) > dt.timedelta(minutes=14)
    # ...and the right password is refused with the very same answer while it lasts.
    locked = _login(client, "alice")
    assert locked.status_code == 401 and locked.text == wrong[0].text
    assert archive.directory.get_login_state("alice").locked_until == state.locked_until  # type: ignore[union-attr]
    assert _login(client, "carol").status_code == 200  # other accounts are not affected
    # When the lock has run out, the right password works and clears it.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    execute(data_dir, sa.update(users).where(users.c.name == "alice").values(locked_until=past))
    assert _login(client, "alice").status_code == 200
    assert run_cli("user", "unlock", "alice", "--data", str(data_dir)) == 0


def test_totp_is_required_for_admins_and_codes_are_not_replayable(
    app: tuple[AppClient, Archive], data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, archive = app
    password = (data_dir / "admin-password.txt").read_text().strip()
    # The admin account (auth.totp_required_roles) cannot log in before enrolling a second factor,
    # and is told so only once the password was right.
    r = _login(client, "admin", password)
    assert r.status_code == 403
    assert "safepacs user totp-enroll admin" in r.json()["detail"]
    assert _login(client, "admin", "wrong password!").status_code == 401

    assert run_cli("user", "totp-enroll", "admin", "--data", str(data_dir)) == 0
    out = capsys.readouterr()
    uri = out.out.strip()
    assert uri.startswith("otpauth://totp/SafePACS:admin?") and "\n" not in uri
    assert "secret=" not in out.err
    secret = _secret(uri)
    encoded = base64.b32encode(secret).decode().rstrip("=")
    stored = archive.directory.get_login_state("admin")
    assert stored is not None and stored.totp_secret is not None
    assert encoded not in stored.totp_secret and secret not in base64.b64decode(stored.totp_secret)

    t0 = time.time()
    now_code, next_code = code_at(secret, t0), code_at(secret, t0 + 30)
    wrong_code = f"{(int(now_code) + 1) % 1_000_000:06d}"
    failed = _login(client, "admin", password)  # no code
    assert failed.status_code == 401
    assert _login(client, "admin", password, totp=wrong_code).text == failed.text
    # The right code: the admin must still change the one-time password of `init`.
    r = _login(client, "admin", password, totp=now_code)
    assert r.status_code == 403 and "/api/session/password" in r.json()["detail"]
    change = {"username": "admin", "password": password, "new_password": "a brand new passphrase"}
    # The code just used is refused a second time (RFC 6238 5.2), a fresh one works.
    replayed = client.post("/api/session/password", json={**change, "totp": now_code})
    assert replayed.status_code == 401 and replayed.text == failed.text
    r = client.post("/api/session/password", json={**change, "totp": next_code})
    assert r.status_code == 200, r.text
    assert r.json()["roles"] == ["admin"] and COOKIE in r.headers["set-cookie"]
    assert _login(client, "admin", "a brand new passphrase", totp=next_code).status_code == 401  # replay
    assert _login(client, "admin", password, totp=code_at(secret, t0 + 60)).status_code == 401  # old pw

    # totp-remove: the admin cannot log in until enrolled again.
    assert run_cli("user", "totp-remove", "admin", "--data", str(data_dir)) == 0
    assert _login(client, "admin", "a brand new passphrase").status_code == 403


def test_totp_cli_refuses_unknown_users(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("user", "totp-enroll", "nobody", "--data", str(data_dir)) == 2
    out = capsys.readouterr()
    assert out.out == "" and "no user named 'nobody'" in out.err
    assert run_cli("user", "totp-remove", "nobody", "--data", str(data_dir)) == 2
    assert run_cli("user", "unlock", "nobody", "--data", str(data_dir)) == 2


def test_a_new_user_must_change_the_one_time_password(
    app: tuple[AppClient, Archive], data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, _ = app
    assert run_cli("user", "add", "dave", "--role", "radiologist", "--data", str(data_dir)) == 0
    one_time = capsys.readouterr().out.strip()
    r = _login(client, "dave", one_time)
    assert r.status_code == 403 and "set-cookie" not in r.headers
    change = {"username": "dave", "password": one_time}
    short = client.post("/api/session/password", json={**change, "new_password": "short"})
    assert short.status_code == 400
    same = client.post("/api/session/password", json={**change, "new_password": one_time})
    assert same.status_code == 400
    r = client.post("/api/session/password", json={**change, "new_password": "dave's own passphrase"})
    assert r.status_code == 200
    assert _login(client, "dave", "dave's own passphrase").status_code == 200
    # reset-password ends every session of the user at once.
    headers = _session_headers(r, csrf=False)
    assert client.get("/api/session", headers=headers).status_code == 200
    assert run_cli("user", "reset-password", "dave", "--data", str(data_dir)) == 0
    assert client.get("/api/session", headers=headers).status_code == 401


def test_state_changing_requests_by_cookie_need_the_csrf_token(
    app: tuple[AppClient, Archive], data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, archive = app
    add_user(archive, "alice", "radiologist")
    login = _login(client, "alice")
    cookie_only = _session_headers(login, csrf=False)
    body, ctype = multipart([part10(make_ct(patient_id="CSRF1"))])
    for headers in (
        cookie_only,
        {**cookie_only, "X-CSRF-Token": "B" * 43},
        {**cookie_only, "X-CSRF-Token": ""},
    ):
        r = client.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})
        assert r.status_code == 403, r.text
        assert "X-CSRF-Token" in r.json()["detail"]
        assert client.delete("/api/session", headers=headers).status_code == 403
    assert archive.instances.count_instances() == 0
    # Another session's CSRF token does not fit this one.
    other = _login(client, "alice")
    crossed = {**cookie_only, "X-CSRF-Token": other.json()["csrf_token"]}
    assert (
        client.post("/dicomweb/studies", content=body, headers={**crossed, "Content-Type": ctype}).status_code
        == 403
    )
    # With its token, the cookie stores.
    r = client.post(
        "/dicomweb/studies", content=body, headers={**_session_headers(login), "Content-Type": ctype}
    )
    assert r.status_code == 200, r.text
    assert archive.instances.count_instances() == 1
    # A bearer token needs no CSRF token (a browser never sends one by itself).
    assert run_cli("token", "create", "--user", "alice", "--data", str(data_dir)) == 0
    token = capsys.readouterr().out.strip()
    body2, ctype2 = multipart([part10(make_ct(patient_id="CSRF2"))])
    r = client.post(
        "/dicomweb/studies",
        content=body2,
        headers={"Authorization": f"Bearer {token}", "Content-Type": ctype2},
    )
    assert r.status_code == 200, r.text


def test_logout_revokes_the_session_on_the_server(app: tuple[AppClient, Archive]) -> None:
    client, archive = app
    add_user(archive, "alice", "radiologist")
    login = _login(client, "alice")
    headers = _session_headers(login)
    r = client.delete("/api/session", headers=headers)
    assert r.status_code == 204
    assert "Max-Age=0" in r.headers["set-cookie"] and r.headers["set-cookie"].startswith(f"{COOKIE}=;")
    assert archive.directory.list_sessions("alice")[0].revoked_at is not None
    # The old cookie (say, kept by an attacker) is worthless now.
    assert client.get("/api/session", headers=headers).status_code == 401
    assert client.get("/dicomweb/studies", headers=headers).status_code == 401
    assert client.delete("/api/session", headers=headers).status_code == 401


def test_idle_and_old_sessions_end(app: tuple[AppClient, Archive], data_dir: Path) -> None:
    client, archive = app
    add_user(archive, "alice", "radiologist")
    idle, old, fresh = (_login(client, "alice") for _ in range(3))
    now = dt.datetime.now(dt.UTC)

    def where(response: httpx.Response) -> Any:
        return sessions.c.id_sha256 == hashlib.sha256(_cookie(response).encode()).hexdigest()

    execute(
        data_dir, sa.update(sessions).where(where(idle)).values(last_seen_at=now - dt.timedelta(minutes=31))
    )
    execute(data_dir, sa.update(sessions).where(where(old)).values(expires_at=now - dt.timedelta(seconds=1)))
    for response in (idle, old):
        r = client.get("/dicomweb/studies", headers=_session_headers(response, csrf=False))
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert client.get("/api/session", headers=_session_headers(fresh, csrf=False)).status_code == 200
    # Disabling a user ends their sessions.
    assert archive.directory.update_user("alice", disabled=True) is None
    assert client.get("/api/session", headers=_session_headers(fresh, csrf=False)).status_code == 401


def test_a_session_over_real_tls(data_dir: Path) -> None:
    from safepacs.app import open_repositories
    from safepacs.auth.passwords import hash_password

    repos = open_repositories(f"sqlite:///{data_dir / 'index.sqlite3'}")
    try:
        repos.directory.add_user("erin", hash_password(PASSWORD), frozenset({"radiologist"}))
    finally:
        repos.close()
    srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        verify = ssl.create_default_context(cafile=str(srv.ca_file))
        with httpx.Client(base_url=srv.base_url, verify=verify, timeout=20) as client:
            assert _login(client, "erin", "wrong password!").status_code == 401
            r = _login(client, "erin")
            assert r.status_code == 200, r.text
            value, *attributes = [part.strip() for part in r.headers["set-cookie"].split(";")]
            assert sorted(attributes) == ["HttpOnly", "Path=/", "SameSite=Strict", "Secure"]
            client.cookies.clear()  # only the headers below carry the session
            headers = _session_headers(r)
            assert client.get("/dicomweb/studies", headers={"Cookie": value}).status_code == 200
            assert client.delete("/api/session", headers={"Cookie": value}).status_code == 403
            assert client.delete("/api/session", headers=headers).status_code == 204
            assert client.get("/dicomweb/studies", headers={"Cookie": value}).status_code == 401
    finally:
        srv.stop()


# The index side, on SQLite and PostgreSQL -------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def login_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    from safepacs.app import open_repositories
    from safepacs.db.database import migrate

    url = (
        f"sqlite:///{tmp_path / 'index.sqlite3'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("postgres_url"))
    )
    migrate(url)
    repos = open_repositories(url)
    try:
        yield repos
    finally:
        repos.close()


def test_login_counters_totp_steps_and_sessions_in_the_index(login_index: Any) -> None:
    from safepacs.errors import NotFoundError
    from safepacs.records import SessionRecord

    repos = login_index
    repos.directory.add_user("alice", "h", frozenset({"radiologist"}))
    now = dt.datetime.now(dt.UTC)
    lock = dt.timedelta(minutes=15)
    assert repos.directory.get_login_state("nobody") is None
    assert repos.directory.record_failed_login("nobody", limit=2, lock_for=lock, now=now) is False
    assert repos.directory.record_failed_login("alice", limit=2, lock_for=lock, now=now) is False
    assert repos.directory.record_failed_login("alice", limit=2, lock_for=lock, now=now) is True
    state = repos.directory.get_login_state("alice")
    assert state.failed_logins == 0 and state.locked_until == now + lock
    # Failures while locked are not counted and do not move the lock.
    assert (
        repos.directory.record_failed_login(
            "alice", limit=2, lock_for=lock, now=now + dt.timedelta(minutes=1)
        )
        is True
    )
    assert repos.directory.get_login_state("alice") == state
    # After the lock, counting starts again; a success clears everything.
    later = now + lock + dt.timedelta(seconds=1)
    assert repos.directory.record_failed_login("alice", limit=2, lock_for=lock, now=later) is False
    assert repos.directory.get_login_state("alice").failed_logins == 1
    repos.directory.record_login("alice")
    assert (
        repos.directory.get_login_state("alice").failed_logins == 0
        and repos.directory.get_login_state("alice").locked_until is None
    )

    # TOTP: a step is accepted once, and never one older than the last accepted.
    with pytest.raises(NotFoundError):
        repos.directory.set_totp_secret("nobody", "sealed")
    repos.directory.set_totp_secret("alice", "sealed")
    assert repos.directory.get_login_state("alice").totp_secret == "sealed"
    assert repos.directory.claim_totp_step("alice", 100) is True
    assert repos.directory.claim_totp_step("alice", 100) is False
    assert repos.directory.claim_totp_step("alice", 99) is False
    assert repos.directory.claim_totp_step("alice", 101) is True
    repos.directory.set_totp_secret("alice", None)  # re-enrolment starts a new history
    assert repos.directory.get_login_state("alice").totp_secret is None
    assert repos.directory.claim_totp_step("alice", 50) is True

    # Sessions.
    record = SessionRecord("a" * 64, "alice", "c" * 64, now, now, now + dt.timedelta(hours=12), None)
    repos.directory.add_session(record)
    assert repos.directory.get_session("a" * 64) == record
    repos.directory.touch_session("a" * 64, now + dt.timedelta(minutes=5))
    assert repos.directory.get_session("a" * 64).last_seen_at == now + dt.timedelta(minutes=5)
    assert repos.directory.revoke_session("a" * 64, now) is True
    assert repos.directory.revoke_session("a" * 64, now) is False
    repos.directory.add_session(
        SessionRecord("b" * 64, "alice", "c" * 64, now, now, now + dt.timedelta(hours=1), None)
    )
    assert repos.directory.revoke_user_sessions("alice", now) == 1
    # Sessions that ended over a day ago are forgotten at the user's next login.
    next_week = now + dt.timedelta(days=7)
    repos.directory.add_session(
        SessionRecord("d" * 64, "alice", "c" * 64, next_week, next_week, next_week, None)
    )
    assert [s.id_sha256 for s in repos.directory.list_sessions("alice")] == ["d" * 64]
