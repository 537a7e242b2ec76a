"""The one retrieve path (C-GET, C-MOVE, WADO-RS, WADO-URI): locate, authorize, audit, read and verify.

A stored object that fails its integrity check as it is read for someone (:meth:`RetrieveService.fetch`)
is never sent, and is recorded before the caller goes on: a Security Alert naming the instance and the
retrieval's failure for it (:meth:`~safepacs.services.audit.Auditor.integrity_failed`).  A retrieval of
several instances (:meth:`RetrieveService.begin`) reads and checks the first before it is recorded, so
that a damaged first instance is not counted as sent and a caller can still answer with an error; the
others are checked as they go out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pydicom.dataset import Dataset

from safepacs.audit.events import EventID, Participant
from safepacs.db.ports import Instances
from safepacs.errors import AuditError, IntegrityError, NotFoundError, SafePacsError
from safepacs.services.audit import Auditor, StudyFacts, study_facts
from safepacs.services.gate import Gate
from safepacs.storage import BlobStore, EnvelopeCipher
from safepacs.types import InstanceRef, Principal, QueryLevel, QueryModel, Service

__all__ = ["Retrieval", "RetrieveService"]

NOTHING_FOUND = "no instance matched that the requestor may retrieve"


class RetrieveService:
    """Find the instances a retrieve names and hand out their verified bytes."""

    def __init__(
        self, instances: Instances, blobs: BlobStore, cipher: EnvelopeCipher, audit: Auditor, gate: Gate
    ) -> None:
        self._instances = instances
        self._blobs = blobs
        self._cipher = cipher
        self._audit = audit
        self._gate = gate

    def locate(
        self,
        principal: Principal,
        action: Service,
        model: QueryModel,
        level: QueryLevel,
        identifier: Dataset,
        *,
        event: EventID = EventID.INSTANCES_TRANSFERRED,
        destination: Participant | None = None,
        record: bool = True,
    ) -> list[InstanceRef]:
        """The instances under the identifier's unique keys (PS3.4 C.4.2.2.1, C.4.3.2.1) that the
        principal may see: others are treated as if they did not exist.

        Recorded as ``event`` (110104 Transferred, 110102 Begin Transferring, 110103 Accessed) per study,
        with its patient and instance counts, before the caller hands anything out; a retrieve that finds
        nothing is recorded too (a minor failure naming the study asked for).  ``record=False``: the
        caller still has checks to make and calls :meth:`record` once they pass."""
        self._gate.require(principal, action)
        try:
            refs = self._instances.instances_for(model, level, identifier, principal.scope)
        except AuditError:
            raise
        except SafePacsError as exc:
            self._audit.retrieved(principal, _asked(identifier), event, destination=destination, why=str(exc))
            raise
        if not refs:
            self._audit.retrieved(
                principal, _asked(identifier), event, destination=destination, why=NOTHING_FOUND
            )
            return refs
        if record:
            self.record(principal, refs, event, destination=destination)
        return refs

    def record(
        self,
        principal: Principal,
        refs: Sequence[InstanceRef],
        event: EventID,
        *,
        destination: Participant | None = None,
    ) -> None:
        """Record that ``refs`` are handed out (see :meth:`locate`)."""
        patients = self._instances.study_patients if self._audit.enabled else None
        self._audit.retrieved(principal, study_facts(refs, patients), event, destination=destination)

    def fetch(
        self,
        principal: Principal,
        ref: InstanceRef,
        event: EventID,
        *,
        destination: Participant | None = None,
    ) -> bytes:
        """:meth:`read` for ``principal``'s retrieval recorded as ``event``: an object that fails its
        check is recorded (Security Alert, and the retrieval's failure for the instance) before its
        :class:`IntegrityError` is raised."""
        try:
            return self.read(ref)
        except IntegrityError as exc:
            self._damaged(principal, ref, event, destination, exc)
            raise

    def begin(
        self,
        principal: Principal,
        refs: Sequence[InstanceRef],
        event: EventID,
        *,
        destination: Participant | None = None,
    ) -> Retrieval:
        """A retrieval of ``refs`` (located with ``record=False``), its first instance read and checked
        now; see :class:`Retrieval`."""
        return Retrieval(self, principal, refs, event, destination)

    def _damaged(
        self,
        principal: Principal,
        ref: InstanceRef,
        event: EventID,
        destination: Participant | None,
        exc: IntegrityError,
    ) -> None:
        patients = self._instances.study_patients if self._audit.enabled else None
        (study,) = study_facts([ref], patients)
        self._audit.integrity_failed(principal, study, ref, event, destination=destination, why=str(exc))

    def read(self, ref: InstanceRef) -> bytes:
        """The stored Part 10 bytes, decrypted and checked against what the index recorded at ingest.

        The check is the GCM tag recorded with the instance (the object must be exactly the ciphertext
        sealed then, and it authenticates under its data key), which makes hashing the plaintext again
        redundant; objects indexed before tags were recorded are checked against their SHA-256.
        """
        try:
            sealed = self._blobs.get(ref.blob.blob_id)
        except NotFoundError:
            # The index names an object that is gone: removed or lost from the object store, which is
            # as much an alteration of what was stored as a changed byte, and recorded the same way.
            raise IntegrityError(
                "a stored object is missing from the object store; restore it from backup"
            ) from None
        if ref.blob.seal_tag is not None:
            return self._cipher.open(sealed, expect_tag=ref.blob.seal_tag)
        part10 = self._cipher.open(sealed)
        if hashlib.sha256(part10).hexdigest() != ref.blob.sha256:
            raise IntegrityError(
                "a stored object does not match its recorded SHA-256; restore it from backup"
            )
        return part10


class Retrieval:
    """One retrieval of several instances under way (C-GET, C-MOVE, a WADO-RS series or study).

    The first instance is read and checked when the retrieval begins, before anything is recorded or
    sent: when it is damaged that is recorded (:meth:`RetrieveService.fetch`) and kept in
    :attr:`first_error`, and :meth:`record` leaves it out of the instances recorded as sent; a caller
    that can still answer with an error (WADO-RS, before its headers) does so.  :meth:`read` hands out
    each instance's checked bytes; a damaged one is recorded as it is found and raises.
    """

    def __init__(
        self,
        service: RetrieveService,
        principal: Principal,
        refs: Sequence[InstanceRef],
        event: EventID,
        destination: Participant | None,
    ) -> None:
        self.refs = list(refs)
        self._service = service
        self._principal = principal
        self._event = event
        self._destination = destination
        #: What reading the first instance raised (an :class:`IntegrityError` is recorded already).
        self.first_error: SafePacsError | None = None
        self._first: bytes | None = None
        if self.refs:
            try:
                self._first = self.fetch(self.refs[0])
            except AuditError:
                raise  # not even the damage could be recorded: the retrieval is refused (fail closed)
            except SafePacsError as exc:
                self.first_error = exc

    def fetch(self, ref: InstanceRef) -> bytes:
        return self._service.fetch(self._principal, ref, self._event, destination=self._destination)

    def record(self) -> None:
        """Record that the instances are handed out (all but a first one that could not be read)."""
        sent = self.refs[1:] if self.first_error is not None else self.refs
        if sent:
            self._service.record(self._principal, sent, self._event, destination=self._destination)

    def read(self, ref: InstanceRef) -> bytes:
        """The checked bytes of ``ref``: those read when the retrieval began for the first instance (once;
        its error when it failed), else read now (:meth:`RetrieveService.fetch`)."""
        if self.refs and ref is self.refs[0]:
            if self.first_error is not None:
                raise self.first_error
            if self._first is not None:
                first, self._first = self._first, None  # handed out once, not kept while the rest go
                return first
        return self.fetch(ref)


def _asked(identifier: Dataset) -> list[StudyFacts]:
    """The study a retrieve named, when it named one plain UID (for the record of a retrieve that failed)."""
    value = identifier.get("StudyInstanceUID")
    uid = value.strip() if isinstance(value, str) else ""  # a list of UIDs is a MultiValue, not a str
    if not uid or "\\" in uid or len(uid) > 64:
        return []
    return [StudyFacts(uid)]
