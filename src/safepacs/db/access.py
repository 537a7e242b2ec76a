"""Who sees which study: user scopes, study access groups, grants.

Part of the directory repository (:class:`safepacs.db.directory.SqlDirectory`, whose
:class:`~safepacs.db.database.Database` runs its transactions); the matching SQL that applies a
scope to a query is :func:`safepacs.db.sql.visible_clause`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from safepacs.db.database import Database
from safepacs.db.schema import study_grants, study_groups, user_scopes, users
from safepacs.errors import NotFoundError
from safepacs.records import GrantRecord
from safepacs.types import Scope

__all__ = ["AccessMixin", "scope_from_json", "scope_to_json"]


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
    """Scopes, groups and grants (see the module docstring)."""

    _db: Database

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

        self._db.run(work, write=True)

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

        return self._db.run(work, write=True)

    def remove_study_group(
        self, study_uid: str, group: str, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None:
        def work(conn: sa.Connection) -> None:
            key = (study_groups.c.study_instance_uid == study_uid) & (study_groups.c.group_name == group)
            if conn.execute(sa.delete(study_groups).where(key)).rowcount == 0:
                raise NotFoundError(f"study {study_uid} is not in group {group!r}")
            if also is not None:
                also(conn)

        self._db.run(work, write=True)

    def list_study_groups(self, study_uid: str | None = None) -> list[tuple[str, str]]:
        """(study UID, group) pairs, for one study or all."""

        def work(conn: sa.Connection) -> list[tuple[str, str]]:
            stmt = sa.select(study_groups.c.study_instance_uid, study_groups.c.group_name).order_by(
                study_groups.c.group_name, study_groups.c.study_instance_uid
            )
            if study_uid is not None:
                stmt = stmt.where(study_groups.c.study_instance_uid == study_uid)
            return [(r.study_instance_uid, r.group_name) for r in conn.execute(stmt)]

        return self._db.run(work, write=False)

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

        self._db.run(work, write=True)

    def revoke_grant(
        self, study_uid: str, user_name: str, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None:
        def work(conn: sa.Connection) -> None:
            key = (study_grants.c.study_instance_uid == study_uid) & (study_grants.c.user_name == user_name)
            if conn.execute(sa.delete(study_grants).where(key)).rowcount == 0:
                raise NotFoundError(f"user {user_name!r} holds no grant for study {study_uid}")
            if also is not None:
                also(conn)

        self._db.run(work, write=True)

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

        return self._db.run(work, write=False)
