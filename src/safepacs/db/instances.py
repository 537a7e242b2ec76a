"""The instances repository: patient, study, series and instance rows, the queries on them, and the trash.

How an instance is indexed (one read of its header, statements built once, two statements for another
instance of a known series) is in :mod:`safepacs.db.write`; the matching SQL of C-FIND, QIDO-RS and
retrieves in :mod:`safepacs.db.sql` (matching rules in :mod:`safepacs.dicom.matching`).  The trash is
here too: trashing an instance removes its rows and restoring adds them back through the same
:class:`~safepacs.db.write.Writer`, both in one transaction with the trash row (and, through ``also``,
with the audit record of the deletion).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydicom.dataset import Dataset

from safepacs.db import sql
from safepacs.db.database import Database
from safepacs.db.schema import instances, patients, series, studies, trash
from safepacs.db.write import InstanceRows, Writer, read_header
from safepacs.dicom.attributes import UNIQUE_KEYS
from safepacs.dicom.matching import parse_identifier, retrieve_keys
from safepacs.errors import NotFoundError
from safepacs.records import TrashRecord
from safepacs.types import InstanceRef, QueryLevel, QueryModel, Scope, StoredBlob

__all__ = ["SqlInstances"]


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class SqlInstances:
    """Instance rows and the trash on a :class:`~safepacs.db.database.Database` (see the module
    docstring).  Thread-safe; one per process."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._instance_writer = Writer(db.dialect)

    # Instances --------------------------------------------------------------------------------------------
    def get_instance(self, sop_instance_uid: str) -> InstanceRef | None:
        def work(conn: sa.Connection) -> InstanceRef | None:
            stmt = (
                sa.select(
                    studies.c.study_instance_uid,
                    series.c.series_instance_uid,
                    instances.c.sop_class_uid,
                    instances.c.sop_instance_uid,
                    instances.c.transfer_syntax_uid,
                    instances.c.blob_id,
                    instances.c.key_id,
                    instances.c.sha256,
                    instances.c.size,
                    instances.c.seal_tag,
                )
                .select_from(instances.join(series).join(studies, series.c.study_pk == studies.c.pk))
                .where(instances.c.sop_instance_uid == sop_instance_uid)
            )
            r = conn.execute(stmt).first()
            if r is None:
                return None
            blob = StoredBlob(r.blob_id, r.key_id, r.sha256, r.size, r.seal_tag)
            return InstanceRef(
                r.study_instance_uid,
                r.series_instance_uid,
                r.sop_class_uid,
                r.sop_instance_uid,
                r.transfer_syntax_uid,
                blob,
            )

        return self._db.run(work, write=False)

    def add_instance(
        self,
        header: Dataset | InstanceRows,
        blob: StoredBlob,
        transfer_syntax_uid: str,
        *,
        replace: bool = False,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> StoredBlob | None:
        """Index one instance from its header (read with ``stop_before_pixels``; optional keys may lack),
        or from the rows :func:`~safepacs.db.write.read_header` read from it.

        Creates the patient, study and series rows as needed; a later instance updates the study and
        series (and its patient) with the attributes it carries (latest non-empty value wins).  A study
        stays with the patient it was first stored under.  ``replace=False`` and the SOP Instance UID
        indexed already: :class:`ConflictError`.  ``replace=True``: the row is replaced and the old
        blob returned (the caller deletes its bytes).  ``also`` runs in the same transaction once the row
        is written (the instance's audit record: both commit or neither).  Committed durably before
        returning.

        Written by :meth:`~safepacs.db.database.Database.run_then_sync`: on SQLite the WAL is synced once
        the write lock is released.  A sync that fails raises :class:`UnsyncedCommitError`: the rows are
        committed, maybe not on disk, and the caller must not acknowledge the instance nor remove what the
        rows refer to.
        """
        rows = header if isinstance(header, InstanceRows) else read_header(header)
        values = {
            "transfer_syntax_uid": transfer_syntax_uid,
            "blob_id": blob.blob_id,
            "key_id": blob.key_id,
            "sha256": blob.sha256,
            "size": blob.size,
            "seal_tag": blob.seal_tag,
        }

        def work(conn: sa.Connection) -> StoredBlob | None:
            old = self._instance_writer.add(conn, rows, values, _now(), replace=replace)
            if also is not None:
                also(conn)
            return old

        return self._db.run_then_sync(work)

    def study_patients(self, study_uids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """(PatientID, PatientName) of each study that is indexed, by Study Instance UID."""
        uids = sorted(set(study_uids))

        def work(conn: sa.Connection) -> dict[str, tuple[str, str]]:
            out: dict[str, tuple[str, str]] = {}
            for start in range(0, len(uids), 500):
                stmt = (
                    sa.select(studies.c.study_instance_uid, patients.c.patient_id, patients.c.patient_name)
                    .select_from(studies.join(patients, studies.c.patient_pk == patients.c.pk))
                    .where(studies.c.study_instance_uid.in_(uids[start : start + 500]))
                )
                for uid, pid, name in conn.execute(stmt):
                    out[str(uid)] = (str(pid or ""), str(name or ""))
            return out

        return self._db.run(work, write=False) if uids else {}

    def delete_instance(self, sop_instance_uid: str) -> StoredBlob | None:
        """Remove an instance (and the series/study/patient it leaves empty); its blob, or None if unknown."""

        def work(conn: sa.Connection) -> StoredBlob | None:
            row = (
                conn.execute(sa.select(instances).where(instances.c.sop_instance_uid == sop_instance_uid))
                .mappings()
                .first()
            )
            if row is None:
                return None
            self._instance_writer.remove(conn, row["pk"], row["series_pk"], row["study_pk"])
            return StoredBlob(row["blob_id"], row["key_id"], row["sha256"], row["size"], row["seal_tag"])

        return self._db.run(work, write=True)

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
        """C-FIND (PS3.4 C.4.1): the response identifiers of the records matching ``identifier``.

        Each holds the keys of the request (unknown ones empty), QueryRetrieveLevel and Specific
        Character Set ``ISO_IR 192``.  More than ``limit`` matches (None or 0: no limit) raise
        :class:`~safepacs.errors.QueryLimitError` before anything is returned; a malformed identifier
        raises :class:`~safepacs.errors.QueryError`.  ``scoped_limit`` replaces ``limit`` for a query
        within one study or series (:attr:`~safepacs.dicom.matching.Query.scoped`).
        """
        query = replace(parse_identifier(model, level, identifier), scope=scope)
        if query.scoped and scoped_limit is not None:
            limit = scoped_limit
        return self._db.run(lambda conn: sql.run_find(conn, query, limit or None), write=False)

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
        """:meth:`find`'s response identifiers encoded in Implicit (``implicit_vr``) or Explicit VR Little
        Endian, byte for byte as pydicom encodes :meth:`find`'s data sets, without making them
        (:func:`~safepacs.db.sql.run_find_encoded`); ``fill``: the values of keys the index does not
        keep, by tag.  None in place of a response pydicom could not encode."""
        query = replace(parse_identifier(model, level, identifier), scope=scope)
        if query.scoped and scoped_limit is not None:
            limit = scoped_limit
        values = dict(fill or {})
        return self._db.run(
            lambda conn: sql.run_find_encoded(
                conn, query, limit or None, implicit_vr=implicit_vr, fill=values
            ),
            write=False,
        )

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
        """QIDO-RS (PS3.18 10.6): a page of the Study Root records matching ``identifier`` at ``level``,
        with the same matching as :meth:`find`, and whether more follow.  No Query/Retrieve Level is
        required, and a search need not name the records above its level.  ``as_json``: the records
        as DICOM JSON objects without Query/Retrieve Level (what QIDO-RS answers), not data sets.
        ``scoped_limit`` replaces ``limit`` for a search within one study or series."""
        query = parse_identifier(QueryModel.STUDY_ROOT, level, identifier, require_level=False)
        query = replace(query, scope=scope)
        if query.scoped and scoped_limit is not None:
            limit = scoped_limit
        run = sql.run_search_json if as_json else sql.run_search
        return self._db.run(lambda conn: run(conn, query, limit, offset), write=False)

    def instances_for(
        self, model: QueryModel, level: QueryLevel, identifier: Dataset, scope: Scope | None = None
    ) -> list[InstanceRef]:
        """C-GET/C-MOVE: the instances under the unique keys of the identifier (PS3.4 C.4.2.2.1, C.4.3).

        The unique key of the retrieve level (a value or a list of UIDs) is required, the unique keys
        above it restrict when given; a missing key raises :class:`~safepacs.errors.QueryError`.
        """
        keys = retrieve_keys(model, level, identifier)
        return self._db.run(lambda conn: sql.run_retrieve(conn, keys, UNIQUE_KEYS[level], scope), write=False)

    def count_instances(self) -> int:
        return self._db.run(
            lambda conn: int(conn.execute(sa.select(sa.func.count()).select_from(instances)).scalar_one()),
            write=False,
        )

    # Trash ------------------------------------------------------------------------------------------------
    def trash_instances(
        self,
        sop_instance_uids: Iterable[str],
        deleted_by: str,
        purge_after: datetime,
        *,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> int:
        """Take instances out of the index (with the series, study and patient rows they leave empty) and
        keep their blobs in the trash until ``purge_after``; all or nothing.  Returns how many.
        ``also`` runs in the same transaction (the deletion's audit record)."""
        uids = sorted(set(sop_instance_uids))

        def work(conn: sa.Connection) -> int:
            now = datetime.now(UTC)
            done = 0
            for uid in uids:
                row = (
                    conn.execute(
                        sa.select(
                            instances,
                            series.c.series_instance_uid,
                            studies.c.study_instance_uid,
                        )
                        .select_from(
                            instances.join(series, instances.c.series_pk == series.c.pk).join(
                                studies, instances.c.study_pk == studies.c.pk
                            )
                        )
                        .where(instances.c.sop_instance_uid == uid)
                    )
                    .mappings()
                    .first()
                )
                if row is None:
                    continue
                conn.execute(
                    sa.insert(trash).values(
                        sop_instance_uid=uid,
                        series_instance_uid=row["series_instance_uid"],
                        study_instance_uid=row["study_instance_uid"],
                        sop_class_uid=row["sop_class_uid"],
                        transfer_syntax_uid=row["transfer_syntax_uid"],
                        blob_id=row["blob_id"],
                        key_id=row["key_id"],
                        sha256=row["sha256"],
                        size=row["size"],
                        seal_tag=row["seal_tag"],
                        deleted_by=deleted_by,
                        deleted_at=now,
                        purge_after=purge_after,
                    )
                )
                self._instance_writer.remove(conn, row["pk"], row["series_pk"], row["study_pk"])
                done += 1
            if also is not None:
                also(conn)
            return done

        return self._db.run(work, write=True)

    def list_trash(self, *, due_before: datetime | None = None) -> list[TrashRecord]:
        """The trash, oldest deletion first; only what is due for purging before ``due_before`` if given."""

        def work(conn: sa.Connection) -> list[TrashRecord]:
            stmt = sa.select(trash).order_by(trash.c.deleted_at, trash.c.pk)
            if due_before is not None:
                stmt = stmt.where(trash.c.purge_after <= due_before)
            return [
                TrashRecord(
                    r["pk"],
                    r["sop_instance_uid"],
                    r["series_instance_uid"],
                    r["study_instance_uid"],
                    StoredBlob(r["blob_id"], r["key_id"], r["sha256"], r["size"], r["seal_tag"]),
                    r["deleted_by"],
                    _aware(r["deleted_at"]),
                    _aware(r["purge_after"]),
                )
                for r in conn.execute(stmt).mappings()
            ]

        return self._db.run(work, write=False)

    def restore_from_trash(self, pk: int, header: Dataset) -> bool:
        """Put a trashed instance back in the index (its blob as it was) and drop its trash row, in one
        transaction; False when an instance with its SOP Instance UID was stored since (it stays in
        the trash).  ``header`` is the stored object's header."""
        rows = read_header(header)

        def work(conn: sa.Connection) -> bool:
            r = conn.execute(sa.select(trash).where(trash.c.pk == pk)).mappings().first()
            if r is None:
                raise NotFoundError("this instance is not in the trash (purged or restored already)")
            values = {
                "transfer_syntax_uid": r["transfer_syntax_uid"],
                "blob_id": r["blob_id"],
                "key_id": r["key_id"],
                "sha256": r["sha256"],
                "size": r["size"],
                "seal_tag": r["seal_tag"],
            }
            taken = sa.select(instances.c.pk).where(instances.c.sop_instance_uid == r["sop_instance_uid"])
            if conn.execute(taken).first() is not None:
                return False  # checked first: a failed add would leave its parent updates behind
            self._instance_writer.add(conn, rows, values, datetime.now(UTC), replace=False)
            conn.execute(sa.delete(trash).where(trash.c.pk == pk))
            return True

        return self._db.run(work, write=True)

    def blob_in_use(self, blob_id: str) -> bool:
        """Whether an indexed instance refers to ``blob_id`` (purge never destroys such bytes)."""

        def work(conn: sa.Connection) -> bool:
            stmt = sa.select(instances.c.pk).where(instances.c.blob_id == blob_id).limit(1)
            return conn.execute(stmt).first() is not None

        return self._db.run(work, write=False)

    def forget_trash(self, pk: int) -> None:
        """Drop one trash row (after its blob was destroyed)."""

        def work(conn: sa.Connection) -> None:
            conn.execute(sa.delete(trash).where(trash.c.pk == pk))

        self._db.run(work, write=True)
