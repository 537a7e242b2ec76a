"""The records the database keeps about people, tokens, sessions, certificates, grants and the trash:
plain values, read by the services and adapters without importing the database layer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from safepacs.types import Scope, StoredBlob

__all__ = [
    "CertificateRecord",
    "GrantRecord",
    "LoginState",
    "PinnedCertificate",
    "SessionRecord",
    "TokenRecord",
    "TrashRecord",
    "UserRecord",
]


@dataclass(frozen=True)
class UserRecord:
    """A user account of the web UI / DICOMweb (the password hash is opaque to the index)."""

    name: str
    password_hash: str
    roles: frozenset[str]
    disabled: bool
    must_change_password: bool
    scope: Scope | None = None  # what an administrator restricted the user to (``safepacs user scope``)


@dataclass(frozen=True)
class TokenRecord:
    """A personal access token as stored: never the token itself, only the SHA-256 of its secret."""

    token_id: str
    user_name: str
    secret_sha256: str
    scopes: frozenset[str]
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class LoginState:
    """What a password login needs besides the user record."""

    failed_logins: int
    locked_until: datetime | None
    totp_secret: str | None  # sealed (see safepacs.auth.totp); None: not enrolled


@dataclass(frozen=True)
class SessionRecord:
    """A browser session as stored: the SHA-256 of its cookie and of its CSRF token, never either.

    ``issuer`` is None for a local user's session (``user_name`` names their account).  A session
    opened by an OpenID Connect sign-in names the issuer, and ``user_name`` is the person as that
    issuer names them (there may be no local account of that name); ``roles`` are the SafePACS roles
    its ID token mapped to at sign-in.
    """

    id_sha256: str
    user_name: str
    csrf_sha256: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    issuer: str | None = None
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CertificateRecord:
    sha256: str
    ae_title: str
    source: str  # "issued" or "pinned"
    serial: str
    not_after: datetime | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class GrantRecord:
    study_instance_uid: str
    user_name: str
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True)
class TrashRecord:
    """A deleted instance whose bytes are kept until ``purge_after``."""

    pk: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    blob: StoredBlob
    deleted_by: str
    deleted_at: datetime
    purge_after: datetime


@dataclass(frozen=True)
class PinnedCertificate:
    """A certificate a device brings, pinned for one peer (``peer add --cert``): its PEM (the first
    certificate only), serial number (hex) and expiry."""

    pem: bytes
    serial: str
    not_after: datetime | None
