"""Local login state and browser sessions: failed-login counters, lockouts, TOTP secrets, sessions.

Part of the directory repository (:class:`safepacs.db.directory.SqlDirectory`).  It stores
what it is given: TOTP secrets arrive sealed, sessions as the SHA-256 of their cookie and of their
CSRF token; deciding what is valid is :mod:`safepacs.auth.login`'s job.  Sessions of people who
signed in through OpenID Connect (``SessionRecord.issuer`` set) are kept in ``oidc_sessions``, since
they may have no local account; every session method below covers both tables.  Counters and the TOTP
replay guard are single ``UPDATE`` statements, so concurrent logins cannot both pass.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from safepacs.db.database import Database
from safepacs.db.schema import oidc_sessions, sessions, users
from safepacs.errors import NotFoundError
from safepacs.records import LoginState, SessionRecord

__all__ = ["LoginMixin"]

_KEEP_ENDED = timedelta(days=1)  # ended sessions are deleted a day after they end


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes for timezone-aware columns; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_SESSION_TABLES = (sessions, oidc_sessions)


def _session(row: Any) -> SessionRecord:
    issuer = row.get("issuer")
    return SessionRecord(
        row["id_sha256"],
        row["user_name"],
        row["csrf_sha256"],
        _aware(row["created_at"]),
        _aware(row["last_seen_at"]),
        _aware(row["expires_at"]),
        None if row["revoked_at"] is None else _aware(row["revoked_at"]),
        issuer,
        frozenset(r for r in row["roles"].split(",") if r) if issuer is not None else frozenset(),
    )


class LoginMixin:
    """Login counters, TOTP secrets and sessions (see the module docstring)."""

    _db: Database

    # Login state ------------------------------------------------------------------------------------------
    def get_login_state(self, name: str) -> LoginState | None:
        def work(conn: sa.Connection) -> LoginState | None:
            stmt = sa.select(users.c.failed_logins, users.c.locked_until, users.c.totp_secret)
            row = conn.execute(stmt.where(users.c.name == name)).first()
            if row is None:
                return None
            locked = row.locked_until
            return LoginState(
                int(row.failed_logins), None if locked is None else _aware(locked), row.totp_secret
            )

        return self._db.run(work, write=False)

    def record_failed_login(self, name: str, *, limit: int, lock_for: timedelta, now: datetime) -> bool:
        """Count a failed login of ``name``; at ``limit`` consecutive failures lock the account for
        ``lock_for`` (and start counting afresh).  Failures while locked are not counted (they neither
        extend the lock nor unlock).  Whether the account is locked now; False for an unknown name."""

        def work(conn: sa.Connection) -> bool:
            not_locked = sa.or_(users.c.locked_until.is_(None), users.c.locked_until <= now)
            counted = conn.execute(
                sa.update(users)
                .where(users.c.name == name, not_locked)
                .values(failed_logins=users.c.failed_logins + 1)
            ).rowcount
            if not counted:
                return conn.execute(sa.select(users.c.name).where(users.c.name == name)).first() is not None
            locked = conn.execute(
                sa.update(users)
                .where(users.c.name == name, users.c.failed_logins >= limit)
                .values(failed_logins=0, locked_until=now + lock_for)
            ).rowcount
            return bool(locked)

        return self._db.run(work, write=True)

    def record_login(self, name: str) -> None:
        """A successful login: the failure counter and any (expired) lock are cleared."""
        self._db.run(
            lambda conn: conn.execute(
                sa.update(users).where(users.c.name == name).values(failed_logins=0, locked_until=None)
            ),
            write=True,
        )

    def unlock_user(self, name: str, *, also: Callable[[sa.Connection], object] | None = None) -> None:
        """Lift a lockout now (``safepacs user unlock``); :class:`NotFoundError` when unknown.  ``also`` runs
        in the same transaction once the row is written (the change's audit record)."""

        def work(conn: sa.Connection) -> None:
            stmt = sa.update(users).where(users.c.name == name).values(failed_logins=0, locked_until=None)
            if conn.execute(stmt).rowcount == 0:
                raise NotFoundError(f"no user named {name!r} exists")
            if also is not None:
                also(conn)

        self._db.run(work, write=True)

    def set_totp_secret(
        self, name: str, sealed: str | None, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None:
        """Store a (sealed) TOTP secret, or remove it with None; :class:`NotFoundError` when unknown.
        ``also``: as in :meth:`unlock_user`."""

        def work(conn: sa.Connection) -> None:
            stmt = (
                sa.update(users).where(users.c.name == name).values(totp_secret=sealed, totp_last_step=None)
            )
            if conn.execute(stmt).rowcount == 0:
                raise NotFoundError(f"no user named {name!r} exists")
            if also is not None:
                also(conn)

        self._db.run(work, write=True)

    def claim_totp_step(self, name: str, step: int) -> bool:
        """Record that the code of time step ``step`` was used; False when that step or a later one
        was used already (RFC 6238 5.2: a verifier must not accept the same code twice)."""

        def work(conn: sa.Connection) -> bool:
            fresh = sa.or_(users.c.totp_last_step.is_(None), users.c.totp_last_step < step)
            stmt = sa.update(users).where(users.c.name == name, fresh).values(totp_last_step=step)
            return bool(conn.execute(stmt).rowcount)

        return self._db.run(work, write=True)

    # Sessions ---------------------------------------------------------------------------------------------
    def add_session(self, record: SessionRecord) -> None:
        """Store a new session (and forget the person's sessions that ended over a day ago)."""
        table = sessions if record.issuer is None else oidc_sessions
        extra = (
            {}
            if record.issuer is None
            else {"issuer": record.issuer, "roles": ",".join(sorted(record.roles))}
        )

        def work(conn: sa.Connection) -> None:
            old = record.created_at - _KEEP_ENDED
            conn.execute(
                sa.delete(table).where(
                    table.c.user_name == record.user_name,
                    sa.or_(table.c.expires_at < old, table.c.revoked_at < old),
                )
            )
            conn.execute(
                sa.insert(table).values(
                    id_sha256=record.id_sha256,
                    user_name=record.user_name,
                    csrf_sha256=record.csrf_sha256,
                    created_at=record.created_at,
                    last_seen_at=record.last_seen_at,
                    expires_at=record.expires_at,
                    revoked_at=record.revoked_at,
                    **extra,
                )
            )

        self._db.run(work, write=True)

    def get_session(self, id_sha256: str) -> SessionRecord | None:
        def work(conn: sa.Connection) -> SessionRecord | None:
            for table in _SESSION_TABLES:
                row = conn.execute(sa.select(table).where(table.c.id_sha256 == id_sha256)).mappings().first()
                if row is not None:
                    return _session(row)
            return None

        return self._db.run(work, write=False)

    def list_sessions(self, user_name: str) -> list[SessionRecord]:
        """Every stored session of the name, local and OpenID Connect alike, oldest first."""

        def work(conn: sa.Connection) -> list[SessionRecord]:
            found = [
                _session(r)
                for table in _SESSION_TABLES
                for r in conn.execute(sa.select(table).where(table.c.user_name == user_name)).mappings()
            ]
            return sorted(found, key=lambda r: r.created_at)

        return self._db.run(work, write=False)

    def touch_session(self, id_sha256: str, now: datetime) -> None:
        """Note activity on a session (its idle timeout counts from here)."""

        def work(conn: sa.Connection) -> None:
            for table in _SESSION_TABLES:
                conn.execute(sa.update(table).where(table.c.id_sha256 == id_sha256).values(last_seen_at=now))

        self._db.run(work, write=True)

    def revoke_session(self, id_sha256: str, now: datetime) -> bool:
        """End one session (logout); False when it was unknown or ended already."""

        def work(conn: sa.Connection) -> bool:
            ended = 0
            for table in _SESSION_TABLES:
                stmt = sa.update(table).where(table.c.id_sha256 == id_sha256, table.c.revoked_at.is_(None))
                ended += conn.execute(stmt.values(revoked_at=now)).rowcount
            return bool(ended)

        return self._db.run(work, write=True)

    def revoke_user_sessions(self, user_name: str, now: datetime) -> int:
        """End every session of a user (new password, disabled account), and those of people of the
        same name signed in through OpenID Connect (a local account can refuse them); how many were open."""

        return self._db.run(lambda conn: revoke_sessions(conn, user_name, now), write=True)


def revoke_sessions(conn: sa.Connection, user_name: str, now: datetime) -> int:
    """End every open session of a user in this transaction (OpenID Connect sessions of the same name
    too: a local account that is disabled refuses them); how many were open."""
    ended = 0
    for table in _SESSION_TABLES:
        stmt = sa.update(table).where(table.c.user_name == user_name, table.c.revoked_at.is_(None))
        ended += int(conn.execute(stmt.values(revoked_at=now)).rowcount)
    return ended
