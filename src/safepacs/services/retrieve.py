"""The one retrieve path (C-GET, C-MOVE, WADO-RS, WADO-URI): locate, authorize, audit, read and verify."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pydicom.dataset import Dataset

from safepacs.audit.events import EventID, Participant
from safepacs.audit.recorder import Auditor, StudyFacts, study_facts
from safepacs.errors import AuditError, IntegrityError, SafePacsError
from safepacs.index import SqlIndex
from safepacs.storage import BlobStore, EnvelopeCipher
from safepacs.types import InstanceRef, Principal, QueryLevel, QueryModel, Service

__all__ = ["RetrieveService"]

NOTHING_FOUND = "no instance matched that the requestor may retrieve"


class RetrieveService:
    """Find the instances a retrieve names and hand out their verified bytes."""

    def __init__(self, index: SqlIndex, blobs: BlobStore, cipher: EnvelopeCipher, audit: Auditor) -> None:
        self._index = index
        self._blobs = blobs
        self._cipher = cipher
        self._audit = audit

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
        self._audit.require(principal, action)
        try:
            refs = self._index.instances_for(model, level, identifier, principal.scope)
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
        patients = self._index.study_patients if self._audit.enabled else None
        self._audit.retrieved(principal, study_facts(refs, patients), event, destination=destination)

    def read(self, ref: InstanceRef) -> bytes:
        """The stored Part 10 bytes, decrypted and checked against what the index recorded at ingest.

        The check is the GCM tag recorded with the instance (the object must be exactly the ciphertext
        sealed then, and it authenticates under its data key), which makes hashing the plaintext again
        redundant; objects indexed before tags were recorded are checked against their SHA-256.
        """
        sealed = self._blobs.get(ref.blob.blob_id)
        if ref.blob.seal_tag is not None:
            return self._cipher.open(sealed, expect_tag=ref.blob.seal_tag)
        part10 = self._cipher.open(sealed)
        if hashlib.sha256(part10).hexdigest() != ref.blob.sha256:
            raise IntegrityError(
                "a stored object does not match its recorded SHA-256; restore it from backup"
            )
        return part10


def _asked(identifier: Dataset) -> list[StudyFacts]:
    """The study a retrieve named, when it named one plain UID (for the record of a retrieve that failed)."""
    value = identifier.get("StudyInstanceUID")
    uid = value.strip() if isinstance(value, str) else ""  # a list of UIDs is a MultiValue, not a str
    if not uid or "\\" in uid or len(uid) > 64:
        return []
    return [StudyFacts(uid)]
