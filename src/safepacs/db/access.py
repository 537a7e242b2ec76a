"""Who sees which study, and deleted instances: user scopes, access groups, grants, the trash.

A mixin of :class:`safepacs.db.SqlIndex` (it uses its ``_run`` transactions); the matching SQL
that applies a scope to a query is :func:`safepacs.db.sql.visible_clause`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from safepacs.db.schema import (
    instances,
    series,
    studies,
    study_grants,
    study_groups,
    trash,
    user_scopes,
    users,
)
from safepacs.errors import NotFoundError
from safepacs.records import GrantRecord, TrashRecord
from safepacs.types import Scope, StoredBlob

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from safepacs.db.write import Writer

__all__ = ["AccessMixin", "scope_from_json", "scope_to_json"]

_T = TypeVar("_T")


def scope_to_json(scope: Scope) -> dict[str, Any]:
    return {
        "referring_physician": scope.referring_physician or "",
        "institutions": sorted(scope.institutions),
        "modalities": sorted(scope.modalities),
        "groups": sorted(scope.groups),
    }


def scope_from_json(stored: Mapping[str, Any]) -> Scope:
    return Scope(
        institutions=frozenset(stored.get("institutions", ())),
        modalities=frozenset(stored.get("modalities", ())),
        referring_physician=stored.get("referring_physician") or None,
        groups=frozenset(stored.get("groups", ())),
    )


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _user_must_exist(conn: sa.Connection, name: str) -> None:
    if conn.execute(sa.select(users.c.name).where(users.c.name == name)).first() is None:
        raise NotFoundError(f"no user named {name!r} exists")


class AccessMixin:
    """Scopes, groups, grants and the trash (see the module docstring)."""

    _instance_writer: Writer

    def _run(self, work: Callable[[sa.Connection], _T], *, write: bool) -> _T:  # pragma: no cover
        raise NotImplementedError

    # Scopes -----------------------------------------------------------------------------------------------
    def set_user_scope(
        self, name: str, scope: Scope | None, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None:
        """Restrict ``name`` to ``scope`` (None: lift the restriction); :class:`NotFoundError` if unknown.
        ``also`` runs in the same transaction once the rows are written (the change's audit record)."""

        def work(conn: sa.Connection) -> None:
            _user_must_exist(conn, name)
            conn.execute(sa.delete(user_scopes).where(user_scopes.c.user_name == name))
            if scope is not None:
                conn.execute(sa.insert(user_scopes).values(user_name=name, scope=scope_to_json(scope)))
            if also is not None:
                also(conn)

        self._run(work, write=True)

    # Access groups ----------------------------------------------------------------------------------------
    def add_study_group(
        self, study_uid: str, group: str, *, also: Callable[[sa.Connection], object] | None = None
    ) -> bool:
        """Put a study in an access group; False when it was in it already.  ``also``: as in
        :meth:`set_user_scope` (it runs either way)."""

        def work(conn: sa.Connection) -> bool:
            key = (study_groups.c.study_instance_uid == study_uid) & (study_groups.c.group_name == group)
            found = conn.execute(sa.select(study_groups.c.group_name).where(key)).first() is not None
            if not found:
                conn.execute(
                    sa.insert(study_groups).values(
                        study_instance_uid=study_uid, group_name=group, created_at=datetime.now(UTC)
                    )
                )
            if also is not None:
                also(conn)
            return not found

        return self._run(work, write=True)

    def remove_study_group(
        self, study_uid: str, group: str, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None:
        def work(conn: sa.Connection) -> None:
            key = (study_groups.c.study_instance_uid == study_uid) & (study_groups.c.group_name == group)
            if conn.execute(sa.delete(study_groups).where(key)).rowcount == 0:
                raise NotFoundError(f"study {study_uid} is not in group {group!r}")
            if also is not None:
                also(conn)

        self._run(work, write=True)

    def list_study_groups(self, study_uid: str | None = None) -> list[tuple[str, str]]:
        """(study UID, group) pairs, for one study or all."""

        def work(conn: sa.Connection) -> list[tuple[str, str]]:
            stmt = sa.select(study_groups.c.study_instance_uid, study_groups.c.group_name).order_by(
                study_groups.c.group_name, study_groups.c.study_instance_uid
            )
            if study_uid is not None:
                stmt = stmt.where(study_groups.c.study_instance_uid == study_uid)
            return [(r[0], r[1]) for r in conn.execute(stmt)]

        return self._run(work, write=False)

    # Grants -----------------------------------------------------------------------------------------------
    def grant_study(
        self,
        study_uid: str,
        user_name: str,
        expires_at: datetime | None,
        *,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None:
        """Let ``user_name`` see one study (until ``expires_at``); re-granting replaces the expiry."""

        def work(conn: sa.Connection) -> None:
            _user_must_exist(conn, user_name)
            key = (study_grants.c.study_instance_uid == study_uid) & (study_grants.c.user_name == user_name)
            conn.execute(sa.delete(study_grants).where(key))
            conn.execute(
                sa.insert(study_grants).values(
                    study_instance_uid=study_uid,
                    user_name=user_name,
                    created_at=datetime.now(UTC),
                    expires_at=expires_at,
                )
            )
            if also is not None:
                also(conn)

        self._run(work, write=True)

    def revoke_grant(
        self, study_uid: str, user_name: str, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None:
        def work(conn: sa.Connection) -> None:
            key = (study_grants.c.study_instance_uid == study_uid) & (study_grants.c.user_name == user_name)
            if conn.execute(sa.delete(study_grants).where(key)).rowcount == 0:
                raise NotFoundError(f"user {user_name!r} holds no grant for study {study_uid}")
            if also is not None:
                also(conn)

        self._run(work, write=True)

    def list_grants(self, user_name: str | None = None) -> list[GrantRecord]:
        def work(conn: sa.Connection) -> list[GrantRecord]:
            stmt = sa.select(study_grants).order_by(study_grants.c.user_name, study_grants.c.created_at)
            if user_name is not None:
                stmt = stmt.where(study_grants.c.user_name == user_name)
            return [
                GrantRecord(
                    r["study_instance_uid"],
                    r["user_name"],
                    _aware(r["created_at"]),
                    None if r["expires_at"] is None else _aware(r["expires_at"]),
                )
                for r in conn.execute(stmt).mappings()
            ]

        return self._run(work, write=False)

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

        return self._run(work, write=True)

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

        return self._run(work, write=False)

    def restore_from_trash(self, pk: int, header: Dataset) -> bool:
        """Put a trashed instance back in the index (its blob as it was) and drop its trash row, in one
        transaction; False when an instance with its SOP Instance UID was stored since (it stays in
        the trash).  ``header`` is the stored object's header."""
        from safepacs.db.write import read_header

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

        return self._run(work, write=True)

    def blob_in_use(self, blob_id: str) -> bool:
        """Whether an indexed instance refers to ``blob_id`` (purge never destroys such bytes)."""

        def work(conn: sa.Connection) -> bool:
            stmt = sa.select(instances.c.pk).where(instances.c.blob_id == blob_id).limit(1)
            return conn.execute(stmt).first() is not None

        return self._run(work, write=False)

    def forget_trash(self, pk: int) -> None:
        """Drop one trash row (after its blob was destroyed)."""

        def work(conn: sa.Connection) -> None:
            conn.execute(sa.delete(trash).where(trash.c.pk == pk))

        self._run(work, write=True)
