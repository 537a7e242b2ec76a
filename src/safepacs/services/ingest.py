"""The one ingest path for every protocol (C-STORE, ``safepacs import``, later STOW-RS).

authorize -> seal and stage the blob (written, unnamed) -> validate -> commit the blob (fsync, link into
place, directory fsync) -> index and audit record (one durable commit) -> acknowledge.  A refusal
before the commit leaves nothing (a staged blob has no name); a failure after it removes the blob
again, so nothing half-stored remains, and nothing already stored is altered unless
``storage.overwrite`` is on.  An instance whose SOP Instance UID is stored with other bytes is not
stored (:attr:`~safepacs.types.IngestOutcome.CONFLICT`, which C-STORE and STOW-RS answer as a
failure: docs/conformance.md says why), recorded on its own with both SHA-256 and logged.  Every
attempt leaves an audit event: stored, stored already, not stored against different bytes, or refused
and why (a STOW-RS request counts its refused instances, by reason, in its one summary record
instead: :class:`~safepacs.services.audit.StoreBatch`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from safepacs.db.ports import Instances
from safepacs.db.write import InstanceRows, read_header
from safepacs.dicom import nesting
from safepacs.dicom.attributes import HEADER_TAGS
from safepacs.dicom.header import TRUNCATED, read_indexed_elements
from safepacs.dicom.transcode import MAX_PIXEL_BYTES, dataset_bytes, inflate
from safepacs.errors import (
    AuditError,
    ConflictError,
    InvalidObjectError,
    SafePacsError,
    StorageError,
    StorageFullError,
    UnsyncedCommitError,
)
from safepacs.services.audit import Auditor, StoreBatch, StudyFacts
from safepacs.services.gate import Gate
from safepacs.storage import BlobStore, EnvelopeCipher, StagedBlob
from safepacs.storage.space import FreeSpace
from safepacs.types import (
    IngestOutcome,
    IngestResult,
    InstanceRef,
    Principal,
    QueryLevel,
    Service,
    StoredBlob,
)

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "IngestService",
    "SopClassMismatch",
    "SopInstanceMismatch",
    "valid_uid",
]

log = logging.getLogger(__name__)

#: Our Implementation Class UID (PS3.7 D.3.3.2), under the pydicom-registered prefix for SafePACS.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1474.1"
IMPLEMENTATION_VERSION_NAME = "SAFEPACS_010"

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SopClassMismatch(InvalidObjectError):
    """The data set's SOP Class UID differs from the one the request announced (PS3.4 B.2.3)."""


class SopInstanceMismatch(InvalidObjectError):
    """The data set's SOP Instance UID differs from the one the request announced (PS3.4 B.2.3).

    Answered like :class:`SopClassMismatch` (C-STORE 0xA900, STOW-RS FailureReason 0xA900)."""


def valid_uid(value: object) -> bool:
    """PS3.5 9.1: digits and dots, at most 64 characters; never a path separator."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


@dataclass(frozen=True)
class _Sealed:
    """The sealed Part 10 file, written but not yet committed (:class:`~safepacs.storage.StagedBlob`)."""

    staged: StagedBlob
    sha256: str  # of the Part 10 bytes
    size: int
    key_id: str
    seal_tag: str


@dataclass(frozen=True)
class _Candidate:
    sealed: _Sealed
    rows: InstanceRows  # the header's indexed attributes, read once
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    def facts(self) -> StudyFacts:
        """What the audit record of this instance names: its study, patient and SOP class."""
        patient = self.rows.levels[QueryLevel.PATIENT].columns
        facts = StudyFacts(
            self.rows.study_uid,
            str(patient["patient_id"] or "").strip(),
            str(patient["patient_name"] or "").strip(),
        )
        facts.add(self.sop_class_uid)
        return facts


class IngestService:
    """Store DICOM instances durably, encrypted, indexed, exactly once."""

    def __init__(
        self,
        instances: Instances,
        blobs: BlobStore,
        cipher: EnvelopeCipher,
        audit: Auditor,
        gate: Gate,
        *,
        overwrite: bool = False,
        max_object_bytes: int = 2 * 1024**3,
        space: FreeSpace | None = None,
        max_sequence_depth: int = nesting.MAX_SEQUENCE_DEPTH,
    ) -> None:
        """``max_sequence_depth``: the deepest level a sequence item may be at
        (:mod:`safepacs.dicom.nesting`); what docs/conformance.md promises, not a setting."""
        self._instances = instances
        self._audit = audit
        self._gate = gate
        self._blobs = blobs
        self._cipher = cipher
        self._overwrite = overwrite
        self._max_bytes = max_object_bytes
        self._space = space  # the low-water mark (storage.min_free_bytes); None: never refuse for it
        self._max_depth = max_sequence_depth

    # Entry points ------------------------------------------------------------
    def ingest_dataset(
        self,
        principal: Principal,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        encoded: bytes,
        *,
        batch: StoreBatch | None = None,
    ) -> IngestResult:
        """Store a data set received over the network (C-STORE), encoded in ``transfer_syntax_uid``;
        ``batch`` is the association's (:class:`~safepacs.services.audit.StoreBatch`)."""
        self._gate.require(principal, Service.STORE)
        return self._audited(
            principal,
            lambda: self._network_candidate(sop_class_uid, sop_instance_uid, transfer_syntax_uid, encoded),
            imported=False,
            batch=batch,
        )

    def ingest_file(
        self, principal: Principal, data: bytes, *, imported: bool = True, batch: StoreBatch | None = None
    ) -> IngestResult:
        """Store a DICOM Part 10 file (``safepacs import``; STOW-RS with ``imported=False``); the file meta
        is rebuilt by SafePACS.  ``batch``: the import run's or the STOW-RS request's."""
        self._gate.require(principal, Service.STORE)
        return self._audited(principal, lambda: self._file_candidate(data), imported=imported, batch=batch)

    def require(self, principal: Principal) -> None:
        """Whether ``principal`` may store at all (:class:`AccessDenied`, recorded, when not)."""
        self._gate.require(principal, Service.STORE)

    def check_space(
        self, principal: Principal, batch: StoreBatch | None = None, *, imported: bool = False
    ) -> None:
        """Whether there is room to store (:class:`StorageFullError` when free disk space is below
        ``storage.min_free_bytes``), before a request's instances are read; the refusal is recorded,
        once per ``batch``."""
        try:
            if self._space is not None:
                self._space.check()
        except StorageFullError as exc:
            self._refused(principal, None, exc, imported=imported, batch=batch)
            raise

    def refuse_request(self, principal: Principal, why: str) -> None:
        """Record a request refused as a whole before any of its instances was looked at (a STOW-RS
        request over its size or part limit): one record, whatever it carried."""
        self._audit.store_failed(principal, None, why, imported=False)

    def end_batch(self, principal: Principal, batch: StoreBatch, *, imported: bool = False) -> None:
        """Record what a batch stored (the end of an association, a STOW-RS request, an import run)."""
        self._audit.stored_batch(principal, batch, imported=imported)

    def _audited(
        self,
        principal: Principal,
        build: Callable[[], _Candidate],
        *,
        imported: bool,
        batch: StoreBatch | None,
    ) -> IngestResult:
        """Validate and store, recording the outcome; a refusal is recorded with its reason."""
        facts: StudyFacts | None = None
        candidate: _Candidate | None = None
        try:
            if self._space is not None:
                self._space.check()  # before anything is written: what is left is for reads
            candidate = build()
            facts = candidate.facts()
            result = self._store(principal, candidate, facts, imported=imported, batch=batch)
            if batch is not None:
                batch.count(facts, result.outcome.value)
            return result
        except AuditError:
            raise
        except SafePacsError as exc:
            self._refused(principal, facts, exc, imported=imported, batch=batch)
            raise
        finally:
            if candidate is not None:
                candidate.sealed.staged.discard()  # nothing, once committed

    def _refused(
        self,
        principal: Principal,
        facts: StudyFacts | None,
        exc: SafePacsError,
        *,
        imported: bool,
        batch: StoreBatch | None,
    ) -> None:
        """Record a refused store: in the batch's summary when it summarises its refusals (STOW-RS),
        else on its own, with one refusal for lack of space per batch (see :class:`StoreBatch`)."""
        if batch is not None and batch.summarise_refusals:
            batch.refuse(str(exc), facts)
            return
        if isinstance(exc, StorageFullError) and batch is not None:
            if batch.refused_for_space:
                return
            batch.refused_for_space = True
        self._audit.store_failed(principal, facts, str(exc), imported=imported)

    def _network_candidate(
        self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, encoded: bytes
    ) -> _Candidate:
        if len(encoded) > self._max_bytes:
            raise InvalidObjectError(
                f"the object is larger than storage.max_object_bytes ({self._max_bytes})"
            )
        for name, uid in (("SOP Class", sop_class_uid), ("SOP Instance", sop_instance_uid)):
            if not valid_uid(uid):
                raise InvalidObjectError(f"the request's Affected {name} UID is not a valid UID")
        if not UID(transfer_syntax_uid).is_transfer_syntax:
            raise InvalidObjectError("the transfer syntax is not one SafePACS knows")
        return self._validate(sop_class_uid, sop_instance_uid, transfer_syntax_uid, encoded, _REQUEST_DIFFERS)

    def _file_candidate(self, data: bytes) -> _Candidate:
        if len(data) > self._max_bytes:
            raise InvalidObjectError(f"the file is larger than storage.max_object_bytes ({self._max_bytes})")
        if len(data) < 132 or data[128:132] != b"DICM":
            raise InvalidObjectError(
                "not a DICOM Part 10 file (no 'DICM' prefix after the preamble, PS3.10 7.1)"
            )
        try:
            ts, encoded = dataset_bytes(data)
            # The file meta alone: pydicom would read the whole data set (every sequence, recursively).
            meta = pydicom.dcmread(BytesIO(data[: len(data) - len(encoded)])).file_meta
        except SafePacsError:
            raise
        except Exception as exc:
            raise InvalidObjectError("the file meta information cannot be read (PS3.10 7.1)") from exc
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", ""))
        if not (valid_uid(sop_class) and valid_uid(sop_instance) and valid_uid(ts)):
            raise InvalidObjectError(
                "the file meta lacks a valid SOP Class, SOP Instance or Transfer Syntax UID"
            )
        if not UID(ts).is_transfer_syntax:
            raise InvalidObjectError("the transfer syntax is not one SafePACS knows")
        return self._validate(sop_class, sop_instance, ts, encoded, _META_DIFFERS)

    # Steps -------------------------------------------------------------------
    def _validate(
        self, sop_class_uid: str, sop_instance_uid: str, ts: str, encoded: bytes, differs: tuple[str, str]
    ) -> _Candidate:
        """The Part 10 file of the data set ``encoded`` (in transfer syntax ``ts``), sealed and staged,
        once its header is parsed and its indexed attributes read: the checks here, the audit facts
        and the index rows use them.  The UIDs given are the request's or the file meta's; the data
        set's must be the same (PS3.4 B.2.3), else :class:`SopInstanceMismatch` or
        :class:`SopClassMismatch` with ``differs``' message for the SOP Instance UID or the SOP Class UID.

        The object is staged before the header is parsed: the disk writes it while the parse runs,
        and the sync that makes it durable later waits less (about half as long for a 10 KB object,
        measured with bench/ingest.py).  A data set refused here leaves nothing: a staged object has
        no name."""
        part10 = _part10(sop_class_uid, sop_instance_uid, ts, encoded)
        sealed = self._seal(part10)
        try:
            try:
                rows = read_header(_read_header(ts, encoded, self._max_depth))
            except SafePacsError:
                raise
            except Exception as exc:
                raise InvalidObjectError(f"the data set cannot be parsed ({type(exc).__name__})") from exc
            sop_class = str(rows.levels[QueryLevel.IMAGE].columns["sop_class_uid"] or "")
            for keyword, value in (
                ("SOP Class UID", sop_class),
                ("SOP Instance UID", rows.sop_uid),
                ("Study Instance UID", rows.study_uid),
                ("Series Instance UID", rows.series_uid),
            ):
                if not valid_uid(value):
                    raise InvalidObjectError(f"the data set has no valid {keyword}")
            if rows.sop_uid != sop_instance_uid:
                raise SopInstanceMismatch(differs[0])
            if sop_class != sop_class_uid:
                raise SopClassMismatch(differs[1])
        except BaseException:
            sealed.staged.discard()
            raise
        return _Candidate(sealed, rows, sop_class, rows.sop_uid, ts)

    def _seal(self, part10: bytes) -> _Sealed:
        """Hash and seal ``part10`` and stage the sealed object (:meth:`BlobStore.stage`)."""
        digest = hashlib.sha256(part10).hexdigest()
        sealed, key_id, tag = self._cipher.seal_noting(part10)
        return _Sealed(self._blobs.stage(sealed), digest, len(part10), key_id, tag)

    def _store(
        self,
        principal: Principal,
        c: _Candidate,
        facts: StudyFacts,
        *,
        imported: bool,
        batch: StoreBatch | None,
    ) -> IngestResult:
        """Write, then index.  The index is asked first only when the instance turns out to exist.

        New instances are the common case, so they cost one index transaction, which also appends the
        audit record when the instance is the first of its study in ``batch`` (or there is no batch);
        a re-sent instance costs a blob write that is undone.  Nothing stored is altered unless
        ``overwrite`` is on.
        """
        first = batch is None or batch.first(facts)
        # Only the first instance of a study in a batch is recorded on its own (the rest are counted).
        event = self._audit.stored(principal, facts, imported=imported) if first else None
        stored = self._audit.writer(event) if event is not None else None
        s = c.sealed
        blob_id = s.staged.commit()
        blob = StoredBlob(blob_id, s.key_id, s.sha256, s.size, s.seal_tag)
        digest = s.sha256
        keep = False
        try:
            try:
                self._instances.add_instance(c.rows, blob, c.transfer_syntax_uid, replace=False, also=stored)
            except ConflictError:
                existing = self._instances.get_instance(c.sop_instance_uid)
                if existing is not None and existing.blob.sha256 == digest:
                    if event is not None:
                        self._audit.record(event)
                    return IngestResult(IngestOutcome.DUPLICATE, c.sop_instance_uid)
                if not self._overwrite:
                    return self._conflict(principal, c, facts, existing, imported=imported)
                # Always recorded, first of its study or not: stored content was replaced.
                replaced = self._audit.stored(principal, facts, imported=imported, replaced=True)
                old = self._instances.add_instance(
                    c.rows, blob, c.transfer_syntax_uid, replace=True, also=self._audit.writer(replaced)
                )
                keep = True
                if old is not None:
                    self._delete_quietly(old.blob_id)
                return IngestResult(IngestOutcome.REPLACED, c.sop_instance_uid)
            keep = True
            return IngestResult(IngestOutcome.STORED, c.sop_instance_uid)
        except UnsyncedCommitError:
            keep = True  # the committed rows refer to this blob (and to the one it replaces): keep both
            raise
        except SafePacsError:
            raise
        except Exception as exc:
            raise InvalidObjectError(f"an indexed attribute cannot be read ({type(exc).__name__})") from exc
        finally:
            if not keep:
                self._delete_quietly(blob_id)

    def _conflict(
        self,
        principal: Principal,
        c: _Candidate,
        facts: StudyFacts,
        existing: InstanceRef | None,
        *,
        imported: bool,
    ) -> IngestResult:
        """Another object is stored under ``c``'s SOP Instance UID: ``c`` is not stored.  Recorded on
        its own (first of its study in the batch or not) naming the instance and both objects'
        SHA-256, so the trail shows what arrived and what was kept; logged without PHI."""
        result = IngestResult(IngestOutcome.CONFLICT, c.sop_instance_uid, (_CONFLICT,))
        detail = [
            ("Series Instance UID", c.rows.series_uid),
            ("SOP Instance UID", c.sop_instance_uid),
            ("Received SHA-256", c.sealed.sha256),
        ]
        if existing is not None:
            detail.append(("Stored SHA-256", existing.blob.sha256))
        event = self._audit.stored(principal, facts, imported=imported, why=_CONFLICT, detail=detail)
        self._audit.record(event)
        log.warning(
            "an instance was not stored: its SOP Instance UID is stored with other content",
            extra={"requestor": principal.name},
        )
        return result

    def _delete_quietly(self, blob_id: str) -> None:
        try:
            self._blobs.delete(blob_id)
        except StorageError:
            log.warning("an unreferenced object could not be removed", extra={"blob_id": blob_id})


# What a data set whose SOP Instance / Class UID is not the announced one is told (PS3.4 B.2.3).
_REQUEST_DIFFERS = (
    "the data set's SOP Instance UID differs from the request's",
    "the data set's SOP Class UID differs from the request's",
)
_META_DIFFERS = ("the file meta's SOP Class/Instance UID differs from the data set's",) * 2


#: Why an instance whose SOP Instance UID is stored with other content was not stored (no PHI).
_CONFLICT = (
    "an instance with this SOP Instance UID is stored already with other content; the received one "
    "was not stored (storage.overwrite would replace the stored one)"
)


def _part10(sop_class_uid: str, sop_instance_uid: str, ts: str, encoded: bytes) -> bytes:
    """A Part 10 file: zeroed preamble (CVE-2019-11687), 'DICM', our own file meta, the data set bytes.

    The meta is built only from the three UIDs and our implementation identity, so the same data set
    always yields the same bytes (and the same SHA-256), whoever sent it.
    """
    return b"".join((_PREFIX, file_meta(sop_class_uid, sop_instance_uid, ts), encoded))


_PREFIX = b"\x00" * 128 + b"DICM"


def _short(tag: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value


def _uid(tag: int, uid: str) -> bytes:
    raw = uid.encode("ascii")
    return _short(tag, b"UI", raw + b"\x00" if len(raw) % 2 else raw)


_VERSION = struct.pack("<HH2s2xL", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01"
_IMPLEMENTATION = _uid(0x0012, IMPLEMENTATION_CLASS_UID) + _short(
    0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii") + b" " * (len(IMPLEMENTATION_VERSION_NAME) % 2)
)


def file_meta(sop_class_uid: str, sop_instance_uid: str, ts: str) -> bytes:
    """Our File Meta Information (PS3.10 7.1), Explicit VR Little Endian, as pydicom's
    ``write_file_meta_info`` writes it (a test holds them equal).  Encoded here because pydicom's general
    writer costs up to a tenth of the time a small instance may take to store (bench/README.md)."""
    body = b"".join(
        (
            _VERSION,
            _uid(0x0002, sop_class_uid),
            _uid(0x0003, sop_instance_uid),
            _uid(0x0010, ts),
            _IMPLEMENTATION,
        )
    )
    return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _read_header(ts: str, encoded: bytes, max_depth: int) -> Dataset:
    """The elements of the data set the index reads, left undecoded, once the data set is known to be
    complete and its sequences not to nest deeper than ``max_depth`` levels (:mod:`safepacs.dicom.nesting`).
    Little endian data sets (Deflated ones once inflated, PS3.5 A.5) are read straight from their bytes
    and checked in the same pass, every other element (the pixel data: half a megabyte for a CT slice)
    skipped without being copied or kept; anything unusual, and big endian, goes through pydicom's reader
    after a separate walk of the nesting."""
    uid = UID(ts)
    implicit, little = uid.is_implicit_VR, uid.is_little_endian
    if uid == DeflatedExplicitVRLittleEndian:
        encoded = inflate(encoded, MAX_PIXEL_BYTES, InvalidObjectError)
    if little and (ds := read_indexed_elements(encoded, implicit, max_depth=max_depth)) is not None:
        return ds  # its lengths and its nesting checked on the way
    nesting.check(encoded, implicit=implicit, little_endian=little, limit=max_depth)
    fp = BytesIO(encoded)
    ds = read_dataset(fp, implicit, little, specific_tags=_HEADER_TAGS)
    if fp.tell() > len(encoded):  # a skipped element's value would end past the data set's end
        raise InvalidObjectError(TRUNCATED)
    _check_complete(ds)
    return ds


_HEADER_TAGS: list[BaseTag | int] = list(HEADER_TAGS)


def _check_complete(ds: Dataset) -> None:
    """Refuse a data set whose elements are cut short (a truncated file or transfer).

    pydicom reads a value shorter than its declared length without complaint; compare each
    top-level element's value with its length (PS3.5 7.1) without converting any value.
    """
    for tag in ds.keys():
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)  # converted elements (and sequences) carry no length
        value = getattr(raw, "value", None)
        if length not in (None, 0xFFFFFFFF) and isinstance(value, bytes) and len(value) != length:
            raise InvalidObjectError(TRUNCATED)
