"""Local password login, TOTP, lockout, and the browser sessions a login opens.

Login (``POST /api/session``) checks, in this order and answering every failure alike:

1. the password, with one Argon2id verification whether or not the user exists (an unknown name
   is verified against a dummy hash, :func:`safepacs.auth.passwords.verify_password`), so neither
   the answer nor its timing tells which names exist;
2. the account: enabled, and not locked - ``auth.max_failed_logins`` consecutive failures lock it
   for ``auth.lockout_minutes``; while locked even the right password is refused (and attempts
   are not counted, so they neither extend nor end the lock); a success resets the count;
3. the TOTP code (RFC 6238, :mod:`safepacs.auth.totp`) when the user has enrolled one; a wrong
   or replayed code counts as a failed login.  A user holding a role of
   ``auth.totp_required_roles`` without an enrolled secret is refused with a message saying so
   (only once the password was right, so it reveals nothing to a guesser).
4. ``must_change_password``: refused with a message pointing to ``POST /api/session/password``,
   which takes the same credentials plus the new password, and then opens the session.

A session is a random 256-bit id (the cookie) and a random 256-bit CSRF token, both stored as
SHA-256 only; it ends after ``auth.session_idle_minutes`` without a request, after
``auth.session_max_hours`` in any case, on logout, on a new password, or when the user is disabled.

A person who signed in through OpenID Connect (:mod:`safepacs.auth.oidc_login`) gets the same kind
of session (:meth:`LoginService.open_external`), which records the issuer and the roles their ID
token mapped to.  On each request it acts as :func:`safepacs.auth.oidc.oidc_user` makes them, as a
bearer token's person would be: a local account of the same name, read afresh, can refuse them
(disabled) or narrow them (its scope) but lends no role; the issuer must still offer sign-in, and
only roles its ``role_map`` still gives are kept.  Such a session needs no SafePACS TOTP (the
provider authenticated the person: multi-factor is its policy, like for its bearer tokens).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from safepacs.auth.oidc import ExternalUser, oidc_user
from safepacs.auth.passwords import hash_password, needs_rehash, verify_password
from safepacs.auth.policy import ROLES
from safepacs.auth.totp import Sealer, matching_step, open_secret
from safepacs.db.ports import Logins
from safepacs.errors import AccessDenied, AuthenticationError, ConfigError, IntegrityError
from safepacs.records import SessionRecord, UserRecord

if TYPE_CHECKING:
    from safepacs.config import AuthSettings

__all__ = [
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "LoginService",
    "NewSession",
]

log = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
_TOUCH_EVERY = timedelta(seconds=30)  # last_seen_at is written at most this often per session
_VERIFY_SLOTS = 4  # concurrent Argon2id verifications (64 MiB each): a login flood cannot exhaust memory
_VERIFY_WAIT = 10.0  # seconds a login waits for a slot before it is answered "busy"
_FAILED = "the user name, password or one-time code is wrong, or the account is locked or disabled"


@dataclass(frozen=True)
class NewSession:
    """A session just opened: the cookie value and CSRF token are shown once, never stored."""

    cookie: str
    csrf_token: str
    record: SessionRecord
    user: UserRecord


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


class LoginService:
    """Logins, password changes and sessions over the directory (see the module docstring); TOTP secrets
    are enrolled by :meth:`safepacs.services.admin.AdminService.enrol_totp`."""

    def __init__(self, directory: Logins, sealer: Sealer, settings: AuthSettings) -> None:
        unknown = sorted(set(settings.totp_required_roles) - set(ROLES))
        if unknown:
            known = ", ".join(ROLES)
            raise ConfigError(
                f"setting 'auth.totp_required_roles' names unknown role {unknown[0]!r}; use {known}"
            )
        self._directory = directory
        self._sealer = sealer
        self._settings = settings
        self._totp_roles = frozenset(settings.totp_required_roles)
        self._lock_for = timedelta(minutes=settings.lockout_minutes)
        self._idle = timedelta(minutes=settings.session_idle_minutes)
        self._lifetime = timedelta(hours=settings.session_max_hours)
        self._slots = threading.BoundedSemaphore(_VERIFY_SLOTS)
        # issuer -> the roles its role_map gives, for the issuers that offer sign-in
        self._sign_in_roles = {
            o.issuer: frozenset(o.role_map.values()) for o in settings.oidc if o.client_id is not None
        }

    # Login ------------------------------------------------------------------------------------------------
    def _failed(self, name: str, now: datetime) -> AuthenticationError:
        locked = self._directory.record_failed_login(
            name, limit=self._settings.max_failed_logins, lock_for=self._lock_for, now=now
        )
        if locked:
            log.warning("an account was locked after repeated failed logins", extra={"user": name})
        return AuthenticationError(_FAILED)

    def _check(self, name: str, password: str, code: str | None, now: datetime) -> UserRecord:
        """The user whose credentials these are (every factor checked), or :class:`AuthenticationError`."""
        if not self._slots.acquire(timeout=_VERIFY_WAIT):
            raise AuthenticationError("too many logins at once; try again in a moment", code="busy")
        try:
            return self._check_factors(name, password, code, now)
        finally:
            self._slots.release()

    def _check_factors(self, name: str, password: str, code: str | None, now: datetime) -> UserRecord:
        user = self._directory.get_user(name) if 0 < len(name) <= 256 else None
        state = self._directory.get_login_state(name) if user is not None else None
        right = verify_password(user.password_hash if user is not None else None, password)
        if user is None or state is None or user.disabled:
            raise AuthenticationError(_FAILED)
        if state.locked_until is not None and state.locked_until > now:
            raise AuthenticationError(_FAILED)
        if not right:
            raise self._failed(name, now)
        if state.totp_secret is None:
            if user.roles & self._totp_roles:
                raise AuthenticationError(
                    "this account must log in with a one-time code but has none enrolled; ask an "
                    f"administrator to run 'safepacs user totp-enroll {name}'",
                    code="totp_enrolment_required",
                )
        else:
            try:
                secret = open_secret(name, state.totp_secret, self._sealer)
            except IntegrityError:
                log.error("a stored TOTP secret could not be opened", extra={"user": name})
                raise AuthenticationError(_FAILED) from None
            step = matching_step(secret, code or "", now=now.timestamp())
            if step is None or not self._directory.claim_totp_step(name, step):
                raise self._failed(name, now)
        self._directory.record_login(name)
        if needs_rehash(user.password_hash):
            self._directory.update_user(name, password_hash=hash_password(password))
        return user

    def login(self, name: str, password: str, code: str | None = None) -> NewSession:
        """Open a session for ``name``; :class:`AuthenticationError` (see the module docstring)."""
        now = _now()
        user = self._check(name, password, code, now)
        if user.must_change_password:
            raise AuthenticationError(
                "the password must be changed before the first login: POST /api/session/password with "
                "username, password, new_password (and totp)",
                code="password_change_required",
            )
        return self._open(user, now)

    def authenticate(self, name: str, password: str, code: str | None = None) -> UserRecord:
        """The user these credentials prove, checked exactly as a login is (constant cost, lockout,
        TOTP, every failure answered alike) but opening no session: DIMSE User Identity Negotiation
        (PS3.7 D.3.3.7, type 2).  :class:`AuthenticationError` otherwise."""
        user = self._check(name, password, code, _now())
        if user.must_change_password:
            raise AuthenticationError(
                "the password must be changed before the first login (POST /api/session/password)",
                code="password_change_required",
            )
        log.info("a user authenticated", extra={"user": user.name})
        return user

    def change_password(
        self,
        name: str,
        password: str,
        code: str | None,
        new_password: str,
        before_change: Callable[[], None] | None = None,
    ) -> NewSession:
        """Set a new password (every factor checked as for a login), end the user's other sessions
        and open a new one.  ``before_change`` runs once every check has passed and before anything
        changes (the audit record: when it raises, nothing is changed)."""
        if not MIN_PASSWORD_LENGTH <= len(new_password) <= MAX_PASSWORD_LENGTH:
            raise AuthenticationError(
                f"the new password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters",
                code="weak_password",
            )
        now = _now()
        user = self._check(name, password, code, now)
        if hmac.compare_digest(new_password.encode(), password.encode()):
            raise AuthenticationError("the new password must differ from the old one", code="weak_password")
        if before_change is not None:
            before_change()
        self._directory.update_user(
            name, password_hash=hash_password(new_password), must_change_password=False
        )
        self._directory.revoke_user_sessions(name, now)
        log.info("a user changed their password", extra={"user": name})
        return self._open(user, now)

    # Sessions ---------------------------------------------------------------------------------------------
    def _open(self, user: UserRecord, now: datetime, issuer: str | None = None) -> NewSession:
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        record = SessionRecord(
            _digest(cookie),
            user.name,
            _digest(csrf),
            now,
            now,
            now + self._lifetime,
            None,
            issuer,
            user.roles if issuer is not None else frozenset(),
        )
        self._directory.add_session(record)
        log.info("a user logged in", extra={"user": user.name, "issuer": issuer})
        return NewSession(cookie, csrf, record, user)

    def open_external(self, person: ExternalUser) -> NewSession:
        """Open a session for a person an OpenID Connect provider just vouched for (an ID token
        verified by :mod:`safepacs.auth.oidc_login`).  :class:`AuthenticationError` when a local
        account of the same name is disabled, :class:`AccessDenied` when they have no SafePACS role."""
        user = oidc_user(person, self._directory.get_user(person.name))
        return self._open(user, _now(), person.issuer)

    def _external(self, record: SessionRecord, local: UserRecord | None) -> UserRecord | None:
        """The account an OpenID Connect session acts as now, or None when it may no longer."""
        mapped = self._sign_in_roles.get(record.issuer or "")
        if mapped is None:  # the issuer no longer offers sign-in
            return None
        try:
            return oidc_user(
                ExternalUser(record.user_name, record.roles & mapped, record.issuer or ""), local
            )
        except (AuthenticationError, AccessDenied):
            return None

    def session(self, cookie: str) -> tuple[SessionRecord, UserRecord] | None:
        """The live session of a cookie and the (enabled) account it acts as, or None; notes the
        activity.  For an OpenID Connect session the account is :func:`safepacs.auth.oidc.oidc_user`'s."""
        if not _SECRET_RE.match(cookie):
            return None
        now = _now()
        record = self._directory.get_session(_digest(cookie))
        if record is None or record.revoked_at is not None:
            return None
        if now >= record.expires_at or now - record.last_seen_at >= self._idle:
            return None
        user = self._directory.get_user(record.user_name)
        if record.issuer is not None:
            user = self._external(record, user)
            if user is None:
                return None
        else:
            if user is None or user.disabled or user.must_change_password:
                return None
            if user.roles & self._totp_roles:  # a role that needs TOTP may have been granted since the login
                state = self._directory.get_login_state(user.name)
                if state is None or state.totp_secret is None:
                    return None
        if now - record.last_seen_at >= _TOUCH_EVERY:
            self._directory.touch_session(record.id_sha256, now)
        return record, user

    @staticmethod
    def csrf_ok(record: SessionRecord, presented: str | None) -> bool:
        """Whether ``presented`` is the CSRF token of ``record`` (constant-time)."""
        return hmac.compare_digest(_digest(presented or ""), record.csrf_sha256)

    @staticmethod
    def form_token(record: SessionRecord) -> str:
        """The token the web UI's forms carry for ``record`` (a synchronizer token, OWASP CSRF cheat
        sheet): an HMAC keyed with the session's stored CSRF digest, so it is derived on every page
        without storing the token itself, and is unknown to anyone who cannot read the session."""
        key = bytes.fromhex(record.csrf_sha256)
        return hmac.new(key, b"safepacs-ui-form", hashlib.sha256).hexdigest()

    @classmethod
    def form_token_ok(cls, record: SessionRecord, presented: str | None) -> bool:
        """Whether ``presented`` is :meth:`form_token` of ``record`` (constant-time)."""
        return hmac.compare_digest(cls.form_token(record), presented or "")

    def logout(self, record: SessionRecord) -> None:
        self._directory.revoke_session(record.id_sha256, _now())
        log.info("a user logged out", extra={"user": record.user_name})
