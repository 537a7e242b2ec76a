"""Login sessions in the directory: a local user's in ``sessions``, an OpenID Connect person's in
``oidc_sessions`` (no local account needed), both found, touched and ended by the same methods.

On SQLite and (with SAFEPACS_TEST_POSTGRES) PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from safepacs.app import Repositories
from safepacs.records import SessionRecord
from tests.support import index as ti

db_url, repos = ti.db_url, ti.repos

ISSUER = "https://login.example.org/realms/hospital"


def _session(
    key: str, name: str, issuer: str | None = None, roles: frozenset[str] = frozenset()
) -> SessionRecord:
    now = datetime.now(UTC).replace(microsecond=0)
    return SessionRecord(key * 64, name, "c" * 64, now, now, now + timedelta(hours=1), None, issuer, roles)


def test_a_person_without_a_local_account_has_a_session_with_issuer_and_roles(repos: Repositories) -> None:
    d = repos.directory
    external = _session("a", "u-1234", ISSUER, frozenset({"radiologist", "auditor"}))
    d.add_session(external)
    assert d.get_user("u-1234") is None
    assert d.get_session("a" * 64) == external
    later = external.created_at + timedelta(minutes=5)
    d.touch_session("a" * 64, later)
    found = d.get_session("a" * 64)
    assert found is not None and found.last_seen_at == later
    assert d.revoke_session("a" * 64, later) and not d.revoke_session("a" * 64, later)


def test_ending_a_users_sessions_ends_those_of_the_same_name_signed_in_elsewhere(repos: Repositories) -> None:
    d = repos.directory
    d.add_user("jane", "x", frozenset({"radiologist"}))
    local, external = _session("b", "jane"), _session("e", "jane", ISSUER, frozenset({"radiologist"}))
    d.add_session(local)
    d.add_session(external)
    assert [(s.issuer, s.roles) for s in d.list_sessions("jane")] in (
        [(None, frozenset()), (ISSUER, frozenset({"radiologist"}))],
        [(ISSUER, frozenset({"radiologist"})), (None, frozenset())],
    )
    d.update_user("jane", disabled=True, end_sessions=datetime.now(UTC))  # as 'safepacs user disable'
    assert all(s.revoked_at is not None for s in d.list_sessions("jane"))
    assert d.revoke_user_sessions("jane", datetime.now(UTC)) == 0
