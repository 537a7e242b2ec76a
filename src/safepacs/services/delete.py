"""The one delete path (DICOMweb DELETE now): policy and scope, then soft delete; purge after retention.

A deletion takes the instances out of the index at once (no query or retrieve finds them), and
moves their encrypted blobs to the trash, kept for ``storage.retention_days``.  Purging destroys
the bytes of trash entries whose retention has passed (or all of them when asked), blob first,
then the trash row, so an interrupted purge is simply run again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydicom.dataset import Dataset

from safepacs.audit.events import Participant
from safepacs.db.ports import Instances
from safepacs.errors import NotFoundError
from safepacs.services.audit import Auditor, StudyFacts, actor, because, study_facts
from safepacs.services.gate import Gate
from safepacs.storage import BlobStore
from safepacs.types import Principal, QueryLevel, QueryModel, Service

__all__ = ["DeleteService", "PurgeReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PurgeReport:
    instances: int
    bytes: int


class DeleteService:
    """Soft-delete studies, series and instances; destroy them once their retention has passed."""

    def __init__(
        self, instances: Instances, blobs: BlobStore, audit: Auditor, gate: Gate, *, retention: timedelta
    ) -> None:
        self._instances = instances
        self._blobs = blobs
        self._audit = audit
        self._gate = gate
        self._retention = retention

    def delete(
        self,
        principal: Principal,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        *,
        reason: str | None = None,
    ) -> int:
        """Move what the UIDs name (a study, a series of it, or an instance of that) to the trash; how
        many instances.  :class:`NotFoundError` when the principal sees nothing there.  The deletion and
        its audit record (110105, with the ``reason`` given, if any) commit together."""
        self._gate.require(principal, Service.DELETE)
        identifier = Dataset()
        identifier.StudyInstanceUID = study_uid
        level = QueryLevel.STUDY
        if series_uid is not None:
            identifier.SeriesInstanceUID = series_uid
            level = QueryLevel.SERIES
        if sop_uid is not None:
            identifier.SOPInstanceUID = sop_uid
            level = QueryLevel.IMAGE
        identifier.QueryRetrieveLevel = level.value
        refs = self._instances.instances_for(QueryModel.STUDY_ROOT, level, identifier, principal.scope)
        if not refs:
            raise NotFoundError("no such resource")
        purge_after = datetime.now(UTC) + self._retention
        patients = self._instances.study_patients if self._audit.enabled else None
        event = self._audit.deletion(
            actor(principal),
            study_facts(refs, patients),
            f"moved to the trash; destroyed after {purge_after:%Y-%m-%d}" + because(reason),
        )
        done = self._instances.trash_instances(
            (r.sop_instance_uid for r in refs), principal.name, purge_after, also=self._audit.writer(event)
        )
        log.info("instances deleted", extra={"instances": done, "by": principal.name})
        return done

    def purge(
        self, *, everything: bool = False, now: datetime | None = None, who: Participant | None = None
    ) -> PurgeReport:
        """Destroy the bytes of the trash entries due (all of them with ``everything``); ``who`` asked for
        it (None: the archive's hourly purge)."""
        due = None if everything else (now or datetime.now(UTC))
        count = size = 0
        records = self._instances.list_trash(due_before=due)
        if records:  # recorded first: bytes are never destroyed without a trace
            studies = [StudyFacts(uid) for uid in dict.fromkeys(r.study_instance_uid for r in records)]
            why = f"{len(records)} instances destroyed from the trash" + (
                "" if everything else " after the retention period"
            )
            self._audit.record(self._audit.deletion(who, studies, why))
        for record in records:
            if not self._instances.blob_in_use(record.blob.blob_id):  # never the bytes of a live instance
                self._blobs.delete(record.blob.blob_id)
            self._instances.forget_trash(record.pk)
            count += 1
            size += record.blob.size
        if count:
            log.info("trash purged", extra={"instances": count, "bytes": size})
        return PurgeReport(count, size)
