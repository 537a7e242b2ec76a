"""In-memory stand-ins for what the services call, for unit tests without a database.

The services take the instances repository (typed by :class:`safepacs.db.ports.Instances`), a blob
store, a cipher, an auditor and the gate.  Blob store, cipher and audit sink have in-memory
versions in ``src`` already (:class:`~safepacs.storage.MemoryBlobStore`,
:class:`~safepacs.storage.EnvelopeCipher` over :class:`~safepacs.storage.MemoryKeyProvider`,
:class:`~safepacs.services.audittrail.MemoryAuditSink`); the gate is the real one over
:class:`EmptyDirectory` (the policy decides from the principal alone); the instances repository is faked here.
:class:`FakeIndex` has exactly the methods the query, retrieve, delete and restore services call,
with the same signatures, and is typed structurally: it imports nothing of ``safepacs.db``.  It does
no matching: it answers what a test put in it, filters instances by the unique keys a retrieve names,
and records the arguments it was called with.

:func:`archive` builds the services' other collaborators, so that a test of a service is
``archive().index`` plus the service's constructor.

For the other services: :class:`FakeInstances` (what ingest calls: ``add_instance``,
``get_instance``), :class:`FakeDirectory` (what the gate reads and the admin service changes) and
:class:`FakeAuditLog` (what the audit trail and its search call).  Their writes run ``also`` with
:data:`CONNECTION` like a transaction: when it raises, nothing is kept.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from io import BytesIO
from typing import Any, Protocol

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from safepacs.audit import AuditEvent
from safepacs.audit.chain import StoredRecord
from safepacs.audit.events import AuditFilter
from safepacs.errors import ConflictError, NotFoundError, SafePacsError
from safepacs.records import PinnedCertificate, TokenRecord, TrashRecord, UserRecord
from safepacs.services.audit import Auditor
from safepacs.services.audittrail import MemoryAuditSink
from safepacs.services.gate import Gate
from safepacs.storage import EnvelopeCipher, MemoryBlobStore, MemoryKeyProvider
from safepacs.types import (
    InstanceRef,
    Peer,
    Principal,
    PrincipalKind,
    QueryLevel,
    QueryModel,
    Scope,
    Service,
    StoredBlob,
)

__all__ = [
    "ARCHIVE_AE",
    "CONNECTION",
    "CT_IMAGE",
    "Archive",
    "EmptyDirectory",
    "FakeAuditLog",
    "FakeDirectory",
    "FakeIndex",
    "FakeInstances",
    "archive",
    "part10",
    "peer",
    "user",
]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ARCHIVE_AE = "SAFEPACS"

_UNIQUE = {
    QueryLevel.PATIENT: "PatientID",
    QueryLevel.STUDY: "StudyInstanceUID",
    QueryLevel.SERIES: "SeriesInstanceUID",
    QueryLevel.IMAGE: "SOPInstanceUID",
}


def peer(*allow: Service, scope: Scope | None = None) -> Principal:
    """A DIMSE peer allowed ``allow``."""
    return Principal(
        PrincipalKind.PEER, "MODALITY1", allow=frozenset(allow), address="192.0.2.10", scope=scope
    )


def user(*allow: Service, scope: Scope | None = None) -> Principal:
    """A person (DICOMweb) allowed ``allow``."""
    return Principal(
        PrincipalKind.USER, "alice", allow=frozenset(allow), address="192.0.2.20", scope=scope, user="alice"
    )


def part10(
    study_uid: str,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    *,
    sop_class: str = CT_IMAGE,
    patient_id: str = "P1",
    patient_name: str = "Doe^Jane",
) -> bytes:
    """A small Part 10 file (no pixels) of one instance of ``study_uid``."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.Modality = "CT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass
class Stored:
    """One instance in the fake index: what retrieval needs, and what the audit record names."""

    ref: InstanceRef
    patient_id: str = "P1"
    patient_name: str = "Doe^Jane"


@dataclass
class FakeIndex:
    """The index as the query, retrieve, delete and restore services use it (see the module).

    ``answers``: what ``find``/``find_encoded``/``search`` return; ``error``: what they (and
    ``instances_for``) raise instead; ``visible``: with a scope, the studies the scope sees (None:
    a scope sees everything).  ``calls`` lists (method, arguments) in call order.
    """

    instances: list[Stored] = field(default_factory=list)
    trash: list[TrashRecord] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    more: bool = False
    error: SafePacsError | None = None
    visible: set[str] | None = None
    restorable: bool = True
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def _call(self, name: str, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))
        if self.error is not None and name in {"find", "find_encoded", "search", "instances_for"}:
            raise self.error

    def called(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for n, kwargs in self.calls if n == name]

    # Queries -----------------------------------------------------------------------------------------
    def find(
        self,
        model: QueryModel,
        level: QueryLevel,
        identifier: Dataset,
        limit: int | None,
        scope: Scope | None = None,
        *,
        scoped_limit: int | None = None,
    ) -> list[Dataset]:
        self._call("find", model=model, level=level, limit=limit, scope=scope, scoped_limit=scoped_limit)
        return list(self.answers)

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
    ) -> list[bytes | None]:
        self._call(
            "find_encoded",
            model=model,
            level=level,
            limit=limit,
            scope=scope,
            implicit_vr=implicit_vr,
            fill=dict(fill or {}),
            scoped_limit=scoped_limit,
        )
        return list(self.answers)

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
    ) -> tuple[list[Any], bool]:
        self._call(
            "search",
            level=level,
            limit=limit,
            offset=offset,
            scope=scope,
            as_json=as_json,
            scoped_limit=scoped_limit,
        )
        return list(self.answers[offset : offset + limit]), self.more

    # Retrieval ---------------------------------------------------------------------------------------
    def add(self, ref: InstanceRef, patient_id: str = "P1", patient_name: str = "Doe^Jane") -> InstanceRef:
        self.instances.append(Stored(ref, patient_id, patient_name))
        return ref

    def instances_for(
        self, model: QueryModel, level: QueryLevel, identifier: Dataset, scope: Scope | None = None
    ) -> list[InstanceRef]:
        """The instances whose unique keys equal those the identifier gives (no matching rules)."""
        self._call("instances_for", model=model, level=level, scope=scope)
        wanted = {
            "StudyInstanceUID": identifier.get("StudyInstanceUID"),
            "SeriesInstanceUID": identifier.get("SeriesInstanceUID"),
            "SOPInstanceUID": identifier.get("SOPInstanceUID"),
        }
        out = []
        for s in self.instances:
            have = {
                "StudyInstanceUID": s.ref.study_uid,
                "SeriesInstanceUID": s.ref.series_uid,
                "SOPInstanceUID": s.ref.sop_instance_uid,
            }
            if any(v and have[k] != v for k, v in wanted.items()):
                continue
            if scope is not None and self.visible is not None and s.ref.study_uid not in self.visible:
                continue
            out.append(s.ref)
        return out

    def study_patients(self, study_uids: Iterable[str]) -> dict[str, tuple[str, str]]:
        uids = set(study_uids)
        self.calls.append(("study_patients", {"study_uids": sorted(uids)}))
        return {
            s.ref.study_uid: (s.patient_id, s.patient_name) for s in self.instances if s.ref.study_uid in uids
        }

    # Deletion and the trash --------------------------------------------------------------------------
    def trash_instances(
        self,
        sop_instance_uids: Iterable[str],
        deleted_by: str,
        purge_after: datetime,
        *,
        also: Callable[[Any], object] | None = None,
    ) -> int:
        uids = set(sop_instance_uids)
        self.calls.append(
            ("trash_instances", {"uids": sorted(uids), "by": deleted_by, "purge_after": purge_after})
        )
        if also is not None:
            also(None)  # the audit record, "in the same transaction"
        moved = [s for s in self.instances if s.ref.sop_instance_uid in uids]
        self.instances = [s for s in self.instances if s.ref.sop_instance_uid not in uids]
        now = datetime.now(UTC)
        for s in moved:
            self.trash.append(
                TrashRecord(
                    len(self.trash) + 1,
                    s.ref.sop_instance_uid,
                    s.ref.series_uid,
                    s.ref.study_uid,
                    s.ref.blob,
                    deleted_by,
                    now,
                    purge_after,
                )
            )
        return len(moved)

    def list_trash(self, *, due_before: datetime | None = None) -> list[TrashRecord]:
        return [r for r in self.trash if due_before is None or r.purge_after <= due_before]

    def blob_in_use(self, blob_id: str) -> bool:
        return any(s.ref.blob.blob_id == blob_id for s in self.instances)

    def forget_trash(self, pk: int) -> None:
        self.calls.append(("forget_trash", {"pk": pk}))
        self.trash = [r for r in self.trash if r.pk != pk]

    def restore_from_trash(self, pk: int, header: Dataset) -> bool:
        self.calls.append(("restore_from_trash", {"pk": pk, "sop": str(header.SOPInstanceUID)}))
        record = next((r for r in self.trash if r.pk == pk), None)
        if record is None:
            raise NotFoundError("this instance is not in the trash (purged or restored already)")
        if not self.restorable:
            return False
        self.trash.remove(record)
        ref = InstanceRef(
            record.study_instance_uid,
            record.series_instance_uid,
            str(header.SOPClassUID),
            record.sop_instance_uid,
            ExplicitVRLittleEndian,
            record.blob,
        )
        self.instances.append(Stored(ref))
        return True


class EmptyDirectory:
    """The gate's directory with nobody registered: the services' tests hand the gate principals that
    are resolved already, and :meth:`~safepacs.services.gate.Gate.require` reads none of this."""

    def get_peer(self, ae_title: str) -> Peer | None:
        return None

    def get_user(self, name: str) -> UserRecord | None:
        return None

    def get_token_holder(self, token_id: str) -> tuple[TokenRecord, UserRecord | None] | None:
        return None

    def pinned_certificates(self) -> list[bytes]:
        return []

    def certificate_revoked(self, sha256: str) -> bool:
        return False


@dataclass
class Archive:
    """A service's collaborators, in memory."""

    index: FakeIndex
    blobs: MemoryBlobStore
    cipher: EnvelopeCipher
    sink: MemoryAuditSink
    audit: Auditor
    gate: Gate

    def store(self, data: bytes, *, tagged: bool = True) -> StoredBlob:
        """Seal and keep ``data`` as ingest does; the blob as the index records it."""
        sealed, key_id, tag = self.cipher.seal_noting(data)
        blob_id = self.blobs.put(sealed)
        return StoredBlob(
            blob_id, key_id, hashlib.sha256(data).hexdigest(), len(data), tag if tagged else None
        )

    def instance(
        self,
        study_uid: str,
        series_uid: str = "1.2.3.1",
        sop_uid: str | None = None,
        *,
        sop_class: str = CT_IMAGE,
        patient_id: str = "P1",
        patient_name: str = "Doe^Jane",
        tagged: bool = True,
    ) -> InstanceRef:
        """Store an instance and index it."""
        sop_uid = sop_uid or generate_uid()
        data = part10(
            study_uid,
            series_uid,
            sop_uid,
            sop_class=sop_class,
            patient_id=patient_id,
            patient_name=patient_name,
        )
        ref = InstanceRef(
            study_uid, series_uid, sop_class, sop_uid, ExplicitVRLittleEndian, self.store(data, tagged=tagged)
        )
        return self.index.add(ref, patient_id, patient_name)

    def overwrite(self, blob_id: str, sealed: bytes) -> None:
        """Put other bytes under ``blob_id``, as a disk fault or an attacker with file access would."""
        self.blobs._blobs[blob_id] = sealed  # the store itself never changes a blob in place

    @property
    def events(self) -> list[AuditEvent]:
        return self.sink.events


def archive(*, audit_enabled: bool = True) -> Archive:
    sink = MemoryAuditSink()
    audit = Auditor(sink, ARCHIVE_AE, enabled=audit_enabled)
    return Archive(
        FakeIndex(),
        MemoryBlobStore(),
        EnvelopeCipher(MemoryKeyProvider()),
        sink,
        audit,
        Gate(EmptyDirectory(), audit),
    )


# Ingest ---------------------------------------------------------------------------------------------------
#: What a fake repository hands an ``also`` callback in place of the open write transaction.
CONNECTION = object()


class _Level(Protocol):
    @property
    def columns(self) -> Mapping[str, object]: ...


class _Rows(Protocol):
    """What the fake reads of :class:`~safepacs.db.write.InstanceRows` (structurally: no db import)."""

    @property
    def levels(self) -> Mapping[QueryLevel, _Level]: ...

    @property
    def study_uid(self) -> str: ...

    @property
    def series_uid(self) -> str: ...

    @property
    def sop_uid(self) -> str: ...


@dataclass
class FakeInstances:
    """The instance rows as :class:`~safepacs.services.ingest.IngestService` uses them (``add_instance``,
    ``get_instance``), a transaction per write: ``also`` is called with :data:`CONNECTION` and, when
    it raises, the row is not kept.  An instance indexed already is a :class:`ConflictError` unless
    ``replace``.  ``calls`` lists (method, arguments) in call order."""

    rows: dict[str, InstanceRef] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def called(self, name: str) -> list[dict[str, object]]:
        return [kwargs for n, kwargs in self.calls if n == name]

    def get_instance(self, sop_instance_uid: str) -> InstanceRef | None:
        self.calls.append(("get_instance", {"sop_instance_uid": sop_instance_uid}))
        return self.rows.get(sop_instance_uid)

    def add_instance(
        self,
        header: Dataset | _Rows,
        blob: StoredBlob,
        transfer_syntax_uid: str,
        *,
        replace: bool = False,
        also: Callable[[Any], object] | None = None,
    ) -> StoredBlob | None:
        if isinstance(header, Dataset):
            study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
            sop, sop_class = str(header.SOPInstanceUID), str(header.SOPClassUID)
        else:
            study, series, sop = header.study_uid, header.series_uid, header.sop_uid
            sop_class = str(header.levels[QueryLevel.IMAGE].columns["sop_class_uid"])
        self.calls.append(
            ("add_instance", {"sop": sop, "blob": blob, "replace": replace, "also": also is not None})
        )
        old = self.rows.get(sop)
        if old is not None and not replace:
            raise ConflictError("this instance is indexed already")
        if also is not None:
            also(CONNECTION)  # raises: the transaction rolls back, nothing is kept
        self.rows[sop] = InstanceRef(study, series, sop_class, sop, transfer_syntax_uid, blob)
        return old.blob if old is not None else None

    def study_patients(self, study_uids: Iterable[str]) -> dict[str, tuple[str, str]]:
        return {}

    def delete_instance(self, sop_instance_uid: str) -> StoredBlob | None:
        old = self.rows.pop(sop_instance_uid, None)
        return old.blob if old is not None else None


# The directory --------------------------------------------------------------------------------------------
@dataclass
class FakeDirectory:
    """Peers, users, tokens and certificates in dictionaries: what the gate reads and the admin service
    changes.  Every write runs like a transaction: the change is made, ``also`` is called with
    :data:`CONNECTION`, and when it raises the change is undone.  ``reads`` counts the lookups."""

    peers: dict[str, Peer] = field(default_factory=dict)
    users: dict[str, UserRecord] = field(default_factory=dict)
    tokens: dict[str, TokenRecord] = field(default_factory=dict)
    totp: dict[str, str | None] = field(default_factory=dict)
    unlocked: list[str] = field(default_factory=list)
    certificates: dict[str, tuple[str, bytes | None]] = field(default_factory=dict)  # sha256: (ae, pem)
    revoked: set[str] = field(default_factory=set)
    scopes: dict[str, Scope | None] = field(default_factory=dict)
    groups: set[tuple[str, str]] = field(default_factory=set)
    grants: dict[tuple[str, str], datetime | None] = field(default_factory=dict)
    reads: int = 0

    def snapshot(self) -> tuple[object, ...]:
        """Everything the directory holds, to compare before and after a change."""
        return (
            dict(self.peers),
            dict(self.users),
            dict(self.tokens),
            dict(self.totp),
            list(self.unlocked),
            dict(self.certificates),
            set(self.revoked),
            dict(self.scopes),
            set(self.groups),
            dict(self.grants),
        )

    def _write(self, change: Callable[[], object], also: Callable[[Any], object] | None) -> None:
        before = copy.deepcopy(self.snapshot())
        change()
        if also is None:
            return
        try:
            also(CONNECTION)
        except BaseException:
            (
                self.peers,
                self.users,
                self.tokens,
                self.totp,
                self.unlocked,
                self.certificates,
                self.revoked,
                self.scopes,
                self.groups,
                self.grants,
            ) = before  # type: ignore[assignment]
            raise

    # What the gate reads
    def get_peer(self, ae_title: str) -> Peer | None:
        self.reads += 1
        return self.peers.get(ae_title)

    def get_user(self, name: str) -> UserRecord | None:
        self.reads += 1
        return self.users.get(name)

    def get_token_holder(self, token_id: str) -> tuple[TokenRecord, UserRecord | None] | None:
        self.reads += 1
        token = self.tokens.get(token_id)
        return None if token is None else (token, self.users.get(token.user_name))

    def pinned_certificates(self) -> list[bytes]:
        self.reads += 1
        return [
            pem for sha, (_, pem) in self.certificates.items() if pem is not None and sha not in self.revoked
        ]

    def certificate_revoked(self, sha256: str) -> bool:
        self.reads += 1
        return sha256 in self.revoked

    # Peers and certificates
    def list_peers(self) -> list[Peer]:
        return list(self.peers.values())

    def add_peer(
        self, peer: Peer, *, pin: PinnedCertificate | None = None, also: Callable[[Any], object] | None = None
    ) -> None:
        if peer.ae_title in self.peers:
            raise ConflictError(f"the AE title {peer.ae_title!r} is registered already; remove it first")
        self._write(lambda: self.peers.__setitem__(peer.ae_title, peer), also)

    def remove_peer(self, ae_title: str, *, also: Callable[[Any], object] | None = None) -> None:
        if ae_title not in self.peers:
            raise NotFoundError(f"no peer {ae_title!r}")
        self._write(lambda: self.peers.__delitem__(ae_title), also)

    def record_certificate(
        self,
        sha256: str,
        ae_title: str,
        *,
        source: str,
        serial: str = "",
        not_after: datetime | None = None,
        pem: bytes | None = None,
        also: Callable[[Any], object] | None = None,
    ) -> None:
        self._write(lambda: self.certificates.__setitem__(sha256, (ae_title, pem)), also)

    def revoke_certificates(
        self,
        ae_title: str,
        sha256: str | None = None,
        *,
        pinned: str | None = None,
        also: Callable[[Any], object] | None = None,
    ) -> int:
        wanted = {
            sha
            for sha, (ae, _) in self.certificates.items()
            if ae == ae_title and (sha256 is None or sha == sha256) and sha not in self.revoked
        }
        if not wanted:
            return 0
        self._write(lambda: self.revoked.update(wanted), also)
        return len(wanted)

    # Users and tokens
    def list_users(self) -> list[UserRecord]:
        return list(self.users.values())

    def add_user(
        self,
        name: str,
        password_hash: str,
        roles: frozenset[str],
        *,
        must_change_password: bool = False,
        also: Callable[[Any], object] | None = None,
    ) -> None:
        if name in self.users:
            raise ConflictError(f"a user named {name!r} exists already; pick another name")
        record = UserRecord(name, password_hash, roles, False, must_change_password)
        self._write(lambda: self.users.__setitem__(name, record), also)

    def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        roles: frozenset[str] | None = None,
        disabled: bool | None = None,
        must_change_password: bool | None = None,
        end_sessions: datetime | None = None,
        also: Callable[[Any], object] | None = None,
    ) -> None:
        old = self.users.get(name)
        if old is None:
            raise NotFoundError(f"no user named {name!r}")
        new = replace(
            old,
            password_hash=old.password_hash if password_hash is None else password_hash,
            roles=old.roles if roles is None else roles,
            disabled=old.disabled if disabled is None else disabled,
            must_change_password=old.must_change_password
            if must_change_password is None
            else must_change_password,
        )
        self._write(lambda: self.users.__setitem__(name, new), also)

    def set_totp_secret(
        self, name: str, sealed: str | None, *, also: Callable[[Any], object] | None = None
    ) -> None:
        self._write(lambda: self.totp.__setitem__(name, sealed), also)

    def unlock_user(self, name: str, *, also: Callable[[Any], object] | None = None) -> None:
        self._write(lambda: self.unlocked.append(name), also)

    def add_token(self, record: TokenRecord, *, also: Callable[[Any], object] | None = None) -> None:
        self._write(lambda: self.tokens.__setitem__(record.token_id, record), also)

    def list_tokens(self, user_name: str | None = None) -> list[TokenRecord]:
        return [t for t in self.tokens.values() if user_name is None or t.user_name == user_name]

    def revoke_token(self, token_id: str, *, also: Callable[[Any], object] | None = None) -> None:
        old = self.tokens.get(token_id)
        if old is None:
            raise NotFoundError(f"no token {token_id!r}")
        new = replace(old, revoked_at=datetime.now(UTC))
        self._write(lambda: self.tokens.__setitem__(token_id, new), also)

    # Access rules
    def set_user_scope(
        self, name: str, scope: Scope | None, *, also: Callable[[Any], object] | None = None
    ) -> None:
        self._write(lambda: self.scopes.__setitem__(name, scope), also)

    def add_study_group(
        self, study_uid: str, group: str, *, also: Callable[[Any], object] | None = None
    ) -> bool:
        if (study_uid, group) in self.groups:
            return False
        self._write(lambda: self.groups.add((study_uid, group)), also)
        return True

    def remove_study_group(
        self, study_uid: str, group: str, *, also: Callable[[Any], object] | None = None
    ) -> None:
        self._write(lambda: self.groups.discard((study_uid, group)), also)

    def list_study_groups(self, study_uid: str | None = None) -> list[tuple[str, str]]:
        return sorted(g for g in self.groups if study_uid is None or g[0] == study_uid)

    def grant_study(
        self,
        study_uid: str,
        user_name: str,
        expires_at: datetime | None,
        *,
        also: Callable[[Any], object] | None = None,
    ) -> None:
        self._write(lambda: self.grants.__setitem__((study_uid, user_name), expires_at), also)

    def revoke_grant(
        self, study_uid: str, user_name: str, *, also: Callable[[Any], object] | None = None
    ) -> None:
        self._write(lambda: self.grants.pop((study_uid, user_name), None), also)


# The audit log --------------------------------------------------------------------------------------------
@dataclass
class FakeAuditLog:
    """The audit log as :class:`~safepacs.services.audittrail.AuditTrail` and
    :class:`~safepacs.services.audittrail.AuditSearchService` use it.  ``failures``: errors
    ``append_audit`` raises, one per call, before it appends; ``records``: what ``search_audit``
    answers; ``on_search``: called when a search runs (a test looks at the trail then)."""

    appended: list[AuditEvent] = field(default_factory=list)
    failures: list[SafePacsError] = field(default_factory=list)
    records: list[StoredRecord] = field(default_factory=list)
    searches: list[tuple[AuditFilter, int | None]] = field(default_factory=list)
    on_search: Callable[[], None] | None = None
    listener: object = None
    attempts: int = 0

    def set_audit_listener(self, listener: object) -> None:
        self.listener = listener

    def append_audit(
        self, events: Sequence[AuditEvent], signer: object, *, checkpoint: bool = False, durable: bool = True
    ) -> int:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.appended.extend(events)
        return len(self.appended)

    def search_audit(
        self,
        where: AuditFilter,
        limit: int | None = None,
        *,
        before: int | None = None,
        newest_first: bool = False,
    ) -> list[StoredRecord]:
        if self.on_search is not None:
            self.on_search()
        self.searches.append((where, limit))
        found = [r for r in self.records if before is None or r.seq < before]
        return found[::-1] if newest_first else found

    def audit_records(self, after_seq: int = 0, limit: int = 1000) -> list[StoredRecord]:
        return [r for r in self.records if r.seq > after_seq][:limit]

    # What the head file asks (it is built by the trail, and not used by these tests)
    def sync_audit(self) -> None:
        pass

    def audit_anchor(self) -> int | None:
        return None

    def set_audit_anchor(self, seq: int) -> None:
        pass
