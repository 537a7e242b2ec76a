"""Undo a deletion while its retention lasts: put trashed instances back in the index, bytes as kept.

Each restored object is decrypted and checked against its recorded SHA-256 first; the index row
is added and the trash row dropped in one transaction, so a blob is never both live and due for
purging.  An instance whose SOP Instance UID was stored again since its deletion stays in the trash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.dataset import Dataset

from safepacs.audit.events import Participant
from safepacs.db.ports import Instances
from safepacs.dicom import bulkdata
from safepacs.errors import IntegrityError, NotFoundError
from safepacs.records import TrashRecord
from safepacs.services.audit import Auditor, facts_of
from safepacs.storage import BlobStore, EnvelopeCipher

__all__ = ["RestoreReport", "RestoreService"]


@dataclass(frozen=True)
class RestoreReport:
    restored: int
    kept: int  # stored again since the deletion: left in the trash


class RestoreService:
    def __init__(
        self, instances: Instances, blobs: BlobStore, cipher: EnvelopeCipher, audit: Auditor
    ) -> None:
        self._instances = instances
        self._blobs = blobs
        self._cipher = cipher
        self._audit = audit

    def trash(self) -> list[TrashRecord]:
        """The deleted instances whose bytes are still kept: what :meth:`restore` can bring back."""
        return self._instances.list_trash()

    def restore(self, study_uid: str, who: Participant, *, reason: str | None = None) -> RestoreReport:
        """Restore every trashed instance of a study for ``who`` (recorded first, with the ``reason``
        given, if any); :class:`NotFoundError` when none is in the trash."""
        records = [r for r in self._instances.list_trash() if r.study_instance_uid == study_uid]
        if not records:
            raise NotFoundError(f"no deleted instance of study {study_uid} is in the trash")
        headers = [(record, self._header(record)) for record in records]  # all checked before any change
        facts = facts_of(headers[0][1])
        for _, header in headers[1:]:
            facts.add(str(header.get("SOPClassUID", "")))
        self._audit.restored(who, [facts], reason)
        restored = kept = 0
        for record, header in headers:
            if self._instances.restore_from_trash(record.pk, header):
                restored += 1
            else:
                kept += 1
        return RestoreReport(restored, kept)

    def _header(self, record: TrashRecord) -> Dataset:
        """The header of a trashed object, decrypted and checked against its recorded SHA-256 (read as
        every read path reads it, :func:`~safepacs.dicom.bulkdata.load`: deeply nested sequences too)."""
        part10 = self._cipher.open(self._blobs.get(record.blob.blob_id))
        if hashlib.sha256(part10).hexdigest() != record.blob.sha256:
            raise IntegrityError("a deleted object does not match its recorded SHA-256; it was not restored")
        return bulkdata.load(part10, stop_before_pixels=True)
