"""Administrative changes: peers and their certificates, users, tokens, scopes, access groups, grants.

One method per change.  Each writes its audit record (110113 Security Alert, with 110129 Security
Configuration for peers, 110136 Security Roles Changed for a new user or a scope, 110137 User
Security Attributes Changed otherwise) **in the database transaction that makes the change**: when
the trail cannot be written the change is not made (:class:`~safepacs.errors.AuditError`), and no
change is ever kept without its record.  The record names who made the change (:class:`Change`: the
operating-system account that ran ``safepacs``), what it changed (an account, a peer, a study or a
token id) and how it was asked for (the command line, which never holds a secret: passwords and
tokens are generated and returned, never given).  Administrative changes are recorded even when
the access paths are not (``audit.record = false``).

The service also answers the reads the ``safepacs`` commands list (peers, users, tokens, groups,
grants, the trash), so that the command line never opens the database itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from safepacs.audit.events import Participant
from safepacs.auth.passwords import generate_password, hash_password
from safepacs.auth.tokens import IssuedToken, issue_token
from safepacs.auth.totp import Sealer, enrol
from safepacs.errors import InputError, NotFoundError
from safepacs.records import (
    CertificateRecord,
    GrantRecord,
    LoginState,
    PinnedCertificate,
    TokenRecord,
    TrashRecord,
    UserRecord,
)
from safepacs.services.audit import Auditor, Types
from safepacs.types import Peer, Scope

if TYPE_CHECKING:
    import sqlalchemy as sa

    from safepacs.db.ports import Directory, Instances

__all__ = ["AdminService", "Change", "IssuedCertificate"]


@dataclass(frozen=True)
class Change:
    """Who makes a change and how they asked for it: the operating-system account that runs a command
    (:func:`~safepacs.services.audit.operator`) and its command line (never a secret)."""

    who: Participant
    command: str


@dataclass(frozen=True)
class IssuedCertificate:
    """A client certificate issued to a peer and its new private key (PEM): the key is handed out
    once, never kept by SafePACS."""

    cert_pem: bytes
    key_pem: bytes
    sha256: str


def _server_names(peer: Peer) -> list[str] | None:
    """SAN entries for a peer that is also a C-MOVE destination (it then serves TLS to us)."""
    if peer.port is None:
        return None
    try:
        net = ipaddress.ip_network(peer.host, strict=False)
    except ValueError:
        return [peer.host]  # a host name
    return [str(net.network_address)] if net.num_addresses == 1 else None


_SECURITY, _ROLES, _ATTRIBUTES = (
    Types.SECURITY_CONFIGURATION,
    Types.ROLES_CHANGED,
    Types.USER_ATTRIBUTES_CHANGED,
)


class AdminService:
    """The administrative changes (see the module docstring).  ``auditor`` records whatever
    ``audit.record`` says (built enabled by the composition root); ``sealer`` makes the key that seals
    TOTP secrets, when one is enrolled."""

    def __init__(
        self, store: Directory, instances: Instances, auditor: Auditor, sealer: Callable[[], Sealer]
    ) -> None:
        self._store = store
        self._instances = instances  # the trash's listing
        self._audit = auditor
        self._sealer = sealer

    def _record(
        self, by: Change, type_code: tuple[str, str], target: str
    ) -> Callable[[sa.Connection], object] | None:
        event = self._audit.change(by.who, type_code, target[:256], by.command[:1000])
        return self._audit.writer(event)

    # Peers --------------------------------------------------------------------------------------------------
    def peer(self, ae_title: str) -> Peer | None:
        return self._store.get_peer(ae_title)

    def peers(self) -> list[Peer]:
        return self._store.list_peers()

    def add_peer(self, peer: Peer, by: Change, pin: PinnedCertificate | None = None) -> None:
        """Register ``peer`` (and the certificate pinned with ``--cert``); its user, if any, must exist."""
        if peer.user is not None and self._store.get_user(peer.user) is None:
            raise NotFoundError(f"no user named {peer.user!r}; add one with 'safepacs user add'")
        self._store.add_peer(peer, pin=pin, also=self._record(by, _SECURITY, peer.ae_title))

    def remove_peer(self, ae_title: str, by: Change) -> None:
        self._store.remove_peer(ae_title, also=self._record(by, _SECURITY, ae_title))

    def record_issued_certificate(
        self, ae_title: str, sha256: str, serial: str, not_after: datetime | None, by: Change
    ) -> None:
        """Remember a certificate issued to a peer from the SafePACS CA (so it can be revoked)."""
        self._store.record_certificate(
            sha256,
            ae_title,
            source="issued",
            serial=serial,
            not_after=not_after,
            also=self._record(by, _SECURITY, ae_title),
        )

    def issue_certificate(
        self, ae_title: str, days: int, ca: tuple[bytes, bytes], by: Change
    ) -> IssuedCertificate:
        """A client certificate for a registered peer from the SafePACS CA (``ca``: its certificate and
        key, PEM), valid ``days`` days (1-3650), with server names when the peer is also a C-MOVE
        destination.  It is recorded (so it can be revoked) before it is returned: never a certificate
        out of the record."""
        from safepacs.auth.pki import certificate_fingerprint, issue_certificate, load_certificate

        peer = self._store.get_peer(ae_title)
        if peer is None:
            raise NotFoundError(f"no peer with AE title {ae_title!r} is registered; add it first")
        if not 1 <= days <= 3650:
            raise InputError("a certificate's validity is 1 to 3650 days")
        cert, key = issue_certificate(*ca, ae_title, server_names=_server_names(peer), client=True, days=days)
        parsed = load_certificate(cert)
        digest = certificate_fingerprint(cert)
        self.record_issued_certificate(
            ae_title, digest, format(parsed.serial_number, "x"), parsed.not_valid_after_utc, by
        )
        return IssuedCertificate(cert, key, digest)

    def certificates(self, ae_title: str | None = None) -> list[CertificateRecord]:
        """The certificates issued to or pinned for peers (all peers, or one), revoked ones too."""
        return self._store.list_certificates(ae_title)

    def revoke_certificates(self, ae_title: str, by: Change, only: str | None = None) -> int:
        """Revoke the certificates of a peer (all, with the one it is pinned to, or ``only`` that one);
        how many were newly revoked.  Nothing is recorded when nothing was there to revoke, except
        when ``only`` named a certificate revoked already (the request itself is then recorded)."""
        peer = self._store.get_peer(ae_title)
        pinned = peer.cert_sha256 if only is None and peer is not None else None
        record = self._record(by, _SECURITY, ae_title)
        count = self._store.revoke_certificates(ae_title, only, pinned=pinned, also=record)
        if count == 0 and only is not None and record is not None:
            self._audit.record(self._audit.change(by.who, _SECURITY, ae_title[:256], by.command[:1000]))
        return count

    # Users --------------------------------------------------------------------------------------------------
    def user(self, name: str) -> UserRecord | None:
        return self._store.get_user(name)

    def users(self) -> list[UserRecord]:
        return self._store.list_users()

    def login_state(self, name: str) -> LoginState | None:
        """Whether a user is locked out and has a TOTP secret (never the secret itself to show)."""
        return self._store.get_login_state(name)

    def add_user(
        self, name: str, roles: frozenset[str], by: Change, password: str | None = None
    ) -> str | None:
        """Create a user with ``password``, or with a generated one-time password (returned: shown once,
        it must be changed at the first login)."""
        record = self._record(by, _ROLES, name)
        if password is not None:
            self._store.add_user(name, hash_password(password), roles, also=record)
            return None
        generated = generate_password()
        self._store.add_user(name, hash_password(generated), roles, must_change_password=True, also=record)
        return generated

    def set_disabled(self, name: str, disabled: bool, by: Change) -> None:
        """Disable a user (their sessions end, their tokens stop working) or enable them again."""
        self._store.update_user(
            name,
            disabled=disabled,
            end_sessions=datetime.now(UTC) if disabled else None,
            also=self._record(by, _ATTRIBUTES, name),
        )

    def reset_password(self, name: str, by: Change) -> str:
        """A new one-time password (returned: shown once); the user's sessions end."""
        password = generate_password()
        self._store.update_user(
            name,
            password_hash=hash_password(password),
            must_change_password=True,
            end_sessions=datetime.now(UTC),
            also=self._record(by, _ATTRIBUTES, name),
        )
        return password

    def enrol_totp(self, name: str, by: Change) -> str:
        """A new TOTP secret, sealed with the archive's key; its otpauth:// URI (shown once)."""
        if self._store.get_user(name) is None:
            raise NotFoundError(f"no user named {name!r}; add one with 'safepacs user add'")
        enrolment = enrol(name, self._sealer())
        self._store.set_totp_secret(name, enrolment.sealed, also=self._record(by, _ATTRIBUTES, name))
        return enrolment.uri

    def remove_totp(self, name: str, by: Change) -> None:
        self._store.set_totp_secret(name, None, also=self._record(by, _ATTRIBUTES, name))

    def unlock(self, name: str, by: Change) -> None:
        """Lift the lockout that failed logins put on a user."""
        self._store.unlock_user(name, also=self._record(by, _ATTRIBUTES, name))

    # Tokens -------------------------------------------------------------------------------------------------
    def issue_token(
        self, user_name: str, lifetime: timedelta, scopes: frozenset[str], by: Change
    ) -> IssuedToken:
        """A personal access token of ``user_name`` (the token itself is returned once, never stored)."""
        user = self._store.get_user(user_name)
        if user is None:
            raise NotFoundError(f"no user named {user_name!r}; add one with 'safepacs user add'")
        issued = issue_token(user.name, lifetime, scopes)
        self._store.add_token(issued.record, also=self._record(by, _ATTRIBUTES, user_name))
        return issued

    def tokens(self, user_name: str | None = None) -> list[TokenRecord]:
        return self._store.list_tokens(user_name)

    def revoke_token(self, token_id: str, by: Change) -> None:
        self._store.revoke_token(token_id, also=self._record(by, _ATTRIBUTES, token_id))

    # Access -------------------------------------------------------------------------------------------------
    def set_scope(self, name: str, scope: Scope | None, by: Change) -> None:
        """Restrict what a user sees (None: lift the restriction)."""
        self._store.set_user_scope(name, scope, also=self._record(by, _ROLES, name))

    def add_study_group(self, study_uid: str, group: str, by: Change) -> bool:
        """Put a study in an access group; False when it was in it already."""
        return self._store.add_study_group(study_uid, group, also=self._record(by, _ATTRIBUTES, study_uid))

    def remove_study_group(self, study_uid: str, group: str, by: Change) -> None:
        self._store.remove_study_group(study_uid, group, also=self._record(by, _ATTRIBUTES, study_uid))

    def study_groups(self, study_uid: str | None = None) -> list[tuple[str, str]]:
        return self._store.list_study_groups(study_uid)

    def grant_study(self, study_uid: str, user_name: str, expires_at: datetime | None, by: Change) -> None:
        """Let one user see one study (until ``expires_at``)."""
        self._store.grant_study(
            study_uid, user_name, expires_at, also=self._record(by, _ATTRIBUTES, user_name)
        )

    def revoke_grant(self, study_uid: str, user_name: str, by: Change) -> None:
        self._store.revoke_grant(study_uid, user_name, also=self._record(by, _ATTRIBUTES, user_name))

    def grants(self, user_name: str | None = None) -> list[GrantRecord]:
        return self._store.list_grants(user_name)

    def trash(self) -> list[TrashRecord]:
        """Deleted instances whose bytes are still kept."""
        return self._instances.list_trash()
