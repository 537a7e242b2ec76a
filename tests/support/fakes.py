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
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from safepacs.audit import AuditEvent
from safepacs.errors import NotFoundError, SafePacsError
from safepacs.records import TokenRecord, TrashRecord, UserRecord
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
    "CT_IMAGE",
    "Archive",
    "EmptyDirectory",
    "FakeIndex",
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
