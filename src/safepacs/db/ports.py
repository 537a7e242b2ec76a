"""What the services, auth and the protocol adapters need of the database: :class:`typing.Protocol` s.

They are typed against these, never against the repositories that implement them
(:class:`~safepacs.db.instances.SqlInstances`, :class:`~safepacs.db.directory.SqlDirectory`,
:class:`~safepacs.db.auditlog.SqlAuditLog`), which only the composition root (``app.py``), the command
line and tests construct.  A smaller protocol lists what one consumer calls (:class:`Peers`,
:class:`Accounts`, :class:`Logins` ...); the three large ones are the unions a whole repository
offers.  ``tests/unit/db/test_ports.py`` checks that each repository satisfies its protocols.

A method taking ``also`` runs it inside its own write transaction, with the :data:`Transaction`
(the audit record of what the method changes: both commit or neither).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeAlias, runtime_checkable

import sqlalchemy as sa
from pydicom.dataset import Dataset

from safepacs.audit.chain import Checkpoint, Signer, StoredRecord
from safepacs.audit.events import AuditEvent, AuditFilter
from safepacs.db.auditlog import AuditSnapshot
from safepacs.db.database import HeadListener
from safepacs.db.write import InstanceRows
from safepacs.records import (
    CertificateRecord,
    GrantRecord,
    LoginState,
    PinnedCertificate,
    SessionRecord,
    TokenRecord,
    TrashRecord,
    UserRecord,
)
from safepacs.types import InstanceRef, Peer, QueryLevel, QueryModel, Scope, StoredBlob

__all__ = [
    "AccessRules",
    "Accounts",
    "AuditCursors",
    "AuditLog",
    "AuditRecords",
    "AuditSearch",
    "Certificates",
    "Directory",
    "Identities",
    "Instances",
    "Logins",
    "Peers",
    "TokenHolders",
    "Transaction",
]

#: The open write transaction an ``also`` callback runs in (it writes audit records with it).
Transaction: TypeAlias = sa.Connection


# Instances ------------------------------------------------------------------------------------------------
@runtime_checkable
class Instances(Protocol):
    """Instance rows, the queries on them, and the trash (:class:`~safepacs.db.instances.SqlInstances`)."""

    def get_instance(self, sop_instance_uid: str) -> InstanceRef | None: ...

    def add_instance(
        self,
        header: Dataset | InstanceRows,
        blob: StoredBlob,
        transfer_syntax_uid: str,
        *,
        replace: bool = False,
        also: Callable[[Transaction], object] | None = None,
    ) -> StoredBlob | None: ...

    def study_patients(self, study_uids: Iterable[str]) -> dict[str, tuple[str, str]]: ...

    def delete_instance(self, sop_instance_uid: str) -> StoredBlob | None: ...

    def find(
        self,
        model: QueryModel,
        level: QueryLevel,
        identifier: Dataset,
        limit: int | None,
        scope: Scope | None = None,
        *,
        scoped_limit: int | None = None,
    ) -> list[Dataset]: ...

    def find_encoded(
        self,
        model: QueryModel,
        level: QueryLevel,
        identifier: Dataset,
        limit: int | None,
        scope: Scope | None = None,
        *,
        implicit_vr: bool,
        fill: Mapping[int, str] | None = None,
        scoped_limit: int | None = None,
    ) -> list[bytes | None]: ...

    def search(
        self,
        level: QueryLevel,
        identifier: Dataset,
        limit: int,
        offset: int = 0,
        scope: Scope | None = None,
        *,
        as_json: bool = False,
        scoped_limit: int | None = None,
    ) -> tuple[list[Any], bool]: ...

    def instances_for(
        self, model: QueryModel, level: QueryLevel, identifier: Dataset, scope: Scope | None = None
    ) -> list[InstanceRef]: ...

    def count_instances(self) -> int: ...

    def trash_instances(
        self,
        sop_instance_uids: Iterable[str],
        deleted_by: str,
        purge_after: datetime,
        *,
        also: Callable[[Transaction], object] | None = None,
    ) -> int: ...

    def list_trash(self, *, due_before: datetime | None = None) -> list[TrashRecord]: ...

    def restore_from_trash(self, pk: int, header: Dataset) -> bool: ...

    def blob_in_use(self, blob_id: str) -> bool: ...

    def forget_trash(self, pk: int) -> None: ...


# Directory --------------------------------------------------------------------------------------------------
@runtime_checkable
class Peers(Protocol):
    """The registered DICOM peers."""

    def add_peer(
        self,
        peer: Peer,
        *,
        pin: PinnedCertificate | None = None,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None: ...

    def remove_peer(
        self, ae_title: str, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None: ...

    def get_peer(self, ae_title: str) -> Peer | None: ...

    def list_peers(self) -> list[Peer]: ...


@runtime_checkable
class TokenHolders(Protocol):
    """What authenticating a bearer token (an API token or an OIDC JWT) reads."""

    def get_token_holder(self, token_id: str) -> tuple[TokenRecord, UserRecord | None] | None: ...

    def get_user(self, name: str) -> UserRecord | None: ...


@runtime_checkable
class Identities(TokenHolders, Protocol):
    """Who is asking, as the gate reads it for the adapters: a peer by AE title, a user, a token's
    holder, the certificates pinned for peers and whether one was revoked."""

    def get_peer(self, ae_title: str) -> Peer | None: ...

    def pinned_certificates(self) -> list[bytes]: ...

    def certificate_revoked(self, sha256: str) -> bool: ...


@runtime_checkable
class Accounts(TokenHolders, Protocol):
    """Users and their API tokens."""

    def add_user(
        self,
        name: str,
        password_hash: str,
        roles: frozenset[str],
        *,
        must_change_password: bool = False,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None: ...

    def list_users(self) -> list[UserRecord]: ...

    def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        roles: frozenset[str] | None = None,
        disabled: bool | None = None,
        must_change_password: bool | None = None,
        end_sessions: datetime | None = None,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None: ...

    def add_token(
        self, record: TokenRecord, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None: ...

    def get_token(self, token_id: str) -> TokenRecord | None: ...

    def list_tokens(self, user_name: str | None = None) -> list[TokenRecord]: ...

    def revoke_token(
        self, token_id: str, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None: ...


@runtime_checkable
class Logins(Protocol):
    """What local login (passwords, lockouts, TOTP, browser sessions) reads and writes."""

    def get_user(self, name: str) -> UserRecord | None: ...

    def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        roles: frozenset[str] | None = None,
        disabled: bool | None = None,
        must_change_password: bool | None = None,
        end_sessions: datetime | None = None,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None: ...

    def get_login_state(self, name: str) -> LoginState | None: ...

    def record_failed_login(self, name: str, *, limit: int, lock_for: timedelta, now: datetime) -> bool: ...

    def record_login(self, name: str) -> None: ...

    def set_totp_secret(
        self, name: str, sealed: str | None, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None: ...

    def claim_totp_step(self, name: str, step: int) -> bool: ...

    def add_session(self, record: SessionRecord) -> None: ...

    def get_session(self, id_sha256: str) -> SessionRecord | None: ...

    def touch_session(self, id_sha256: str, now: datetime) -> None: ...

    def revoke_session(self, id_sha256: str, now: datetime) -> bool: ...

    def revoke_user_sessions(self, user_name: str, now: datetime) -> int: ...


@runtime_checkable
class Certificates(Protocol):
    """Issued, pinned and revoked peer certificates."""

    def record_certificate(
        self,
        sha256: str,
        ae_title: str,
        *,
        source: str,
        serial: str = "",
        not_after: datetime | None = None,
        pem: bytes | None = None,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None: ...

    def revoke_certificates(
        self,
        ae_title: str,
        sha256: str | None = None,
        *,
        pinned: str | None = None,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> int: ...

    def certificate_revoked(self, sha256: str) -> bool: ...

    def pinned_certificates(self) -> list[bytes]: ...

    def list_certificates(self, ae_title: str | None = None) -> list[CertificateRecord]: ...


@runtime_checkable
class AccessRules(Protocol):
    """User scopes, study access groups and grants."""

    def set_user_scope(
        self, name: str, scope: Scope | None, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None: ...

    def add_study_group(
        self, study_uid: str, group: str, *, also: Callable[[sa.Connection], object] | None = None
    ) -> bool: ...

    def remove_study_group(
        self, study_uid: str, group: str, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None: ...

    def list_study_groups(self, study_uid: str | None = None) -> list[tuple[str, str]]: ...

    def grant_study(
        self,
        study_uid: str,
        user_name: str,
        expires_at: datetime | None,
        *,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None: ...

    def revoke_grant(
        self, study_uid: str, user_name: str, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None: ...

    def list_grants(self, user_name: str | None = None) -> list[GrantRecord]: ...


@runtime_checkable
class Directory(Identities, Peers, Accounts, Logins, Certificates, AccessRules, Protocol):
    """Everything the directory repository offers (:class:`~safepacs.db.directory.SqlDirectory`)."""

    def unlock_user(self, name: str, *, also: Callable[[sa.Connection], object] | None = None) -> None: ...

    def list_sessions(self, user_name: str) -> list[SessionRecord]: ...


# Audit log --------------------------------------------------------------------------------------------------
@runtime_checkable
class AuditRecords(Protocol):
    """Reading the trail in order (what a capture or a collector reads)."""

    def audit_records(self, after_seq: int = 0, limit: int = 1000) -> list[StoredRecord]: ...


@runtime_checkable
class AuditCursors(AuditRecords, Protocol):
    """A collector's place in the trail (the syslog forwarders)."""

    def get_audit_cursor(self, collector: str) -> int: ...

    def set_audit_cursor(self, collector: str, seq: int) -> None: ...


@runtime_checkable
class AuditSearch(Protocol):
    """Searching the trail by patient, study, user and time."""

    def search_audit(
        self,
        where: AuditFilter,
        limit: int | None = None,
        *,
        before: int | None = None,
        newest_first: bool = False,
    ) -> list[StoredRecord]: ...


@runtime_checkable
class AuditLog(AuditCursors, AuditSearch, Protocol):
    """Everything the audit log repository offers (:class:`~safepacs.db.auditlog.SqlAuditLog`)."""

    def set_audit_listener(self, listener: HeadListener | None) -> None: ...

    def sync_audit(self) -> None: ...

    def append_audit(
        self, events: Sequence[AuditEvent], signer: Signer, *, checkpoint: bool = False, durable: bool = True
    ) -> int: ...

    def audit_snapshot(self) -> AbstractContextManager[AuditSnapshot]: ...

    def audit_head(self) -> tuple[int, str] | None: ...

    def audit_anchor(self) -> int | None: ...

    def set_audit_anchor(self, seq: int) -> None: ...

    def audit_checkpoints(self) -> list[Checkpoint]: ...
