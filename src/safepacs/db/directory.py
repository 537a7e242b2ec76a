"""The directory repository: who may connect and who may see what.

Peers (DICOM applications), users, API tokens, login state, sessions and TOTP secrets
(:mod:`safepacs.db.logins`), peer certificates (:mod:`safepacs.db.certificates`), user scopes, study
access groups and grants (:mod:`safepacs.db.access`), on one
:class:`~safepacs.db.database.Database`.  Each method is one transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from safepacs.db.access import AccessMixin, scope_from_json
from safepacs.db.certificates import CertificateMixin, write_certificate
from safepacs.db.database import Database
from safepacs.db.logins import LoginMixin, revoke_sessions
from safepacs.db.schema import peers, tokens, user_scopes, users
from safepacs.db.write import driver_execute
from safepacs.errors import ConflictError, DatabaseError, NotFoundError
from safepacs.records import PinnedCertificate, TokenRecord, UserRecord
from safepacs.types import Peer, Service, TlsMode, UserIdentityMode

__all__ = ["SqlDirectory"]


def _now() -> datetime:
    return datetime.now(UTC)


def _services(text: str) -> frozenset[Service]:
    try:
        return frozenset(Service(part) for part in text.split(",") if part)
    except ValueError as exc:
        raise DatabaseError("the peer table holds an unknown service name; re-add the peer") from exc


def _join(values: frozenset[str] | frozenset[Service]) -> str:
    return ",".join(sorted(str(v) for v in values))


class SqlDirectory(AccessMixin, LoginMixin, CertificateMixin):
    """Peers, users, tokens, logins, certificates and access rules on a
    :class:`~safepacs.db.database.Database` (see the module docstring).  Thread-safe; one per process."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # Peers ------------------------------------------------------------------------------------------------
    def add_peer(
        self,
        peer: Peer,
        *,
        pin: PinnedCertificate | None = None,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None:
        """Register a peer; :class:`ConflictError` when its AE title is registered already.  ``pin``: the
        certificate pinned with ``peer add --cert``, recorded in the same transaction; ``also`` runs in it
        once the rows are written (the change's audit record: both commit or neither)."""

        def work(conn: sa.Connection) -> None:
            if conn.execute(sa.select(peers.c.ae_title).where(peers.c.ae_title == peer.ae_title)).first():
                raise ConflictError(f"the AE title {peer.ae_title!r} is registered already; remove it first")
            conn.execute(
                sa.insert(peers).values(
                    ae_title=peer.ae_title,
                    host=peer.host,
                    port=peer.port,
                    allow=_join(peer.allow),
                    created_at=_now(),
                    user_name=peer.user,
                    tls=peer.tls.value,
                    cert_sha256=peer.cert_sha256,
                    user_identity=peer.user_identity.value,
                )
            )
            if pin is not None and peer.cert_sha256 is not None:
                write_certificate(
                    conn,
                    peer.cert_sha256,
                    peer.ae_title,
                    source="pinned",
                    serial=pin.serial,
                    not_after=pin.not_after,
                    pem=pin.pem,
                )
            if also is not None:
                also(conn)

        self._db.run(work, write=True)

    def remove_peer(self, ae_title: str, *, also: Callable[[sa.Connection], object] | None = None) -> None:
        """Unregister a peer; :class:`NotFoundError` when unknown.  ``also``: as in :meth:`add_peer`."""

        def work(conn: sa.Connection) -> None:
            if conn.execute(sa.delete(peers).where(peers.c.ae_title == ae_title)).rowcount == 0:
                raise NotFoundError(f"no peer with AE title {ae_title!r} is registered")
            if also is not None:
                also(conn)

        self._db.run(work, write=True)

    def get_peer(self, ae_title: str) -> Peer | None:
        """The peer registered under ``ae_title``, read afresh on every call (a peer removed or changed
        is refused or narrowed from the next association on: nothing is cached).  Every association
        asks this before it is admitted; on SQLite the statement goes to the driver directly (the
        peers' columns are text and integers: nothing for SQLAlchemy to convert), which spares
        SQLAlchemy's statement machinery on every association (measured in bench/README.md,
        "Per-association cost"); ``_peer_reference`` is the same lookup through SQLAlchemy, for the
        differential test."""
        if not self._db.sqlite:
            return self._peer_reference(ae_title)

        def work(conn: sa.Connection) -> Peer | None:
            cursor = driver_execute(conn, _PEER_SQL, (ae_title,))
            row = cursor.fetchone()
            return None if row is None else _peer(dict(zip(_PEER_COLUMNS, row, strict=True)))

        return self._db.run(work, write=False)

    def _peer_reference(self, ae_title: str) -> Peer | None:
        def work(conn: sa.Connection) -> Peer | None:
            row = conn.execute(_PEER, {"ae_title": ae_title}).mappings().first()
            return None if row is None else _peer(row)

        return self._db.run(work, write=False)

    def list_peers(self) -> list[Peer]:
        def work(conn: sa.Connection) -> list[Peer]:
            rows = conn.execute(sa.select(peers).order_by(peers.c.ae_title)).mappings()
            return [_peer(r) for r in rows]

        return self._db.run(work, write=False)

    # Users ------------------------------------------------------------------------------------------------
    def add_user(
        self,
        name: str,
        password_hash: str,
        roles: frozenset[str],
        *,
        must_change_password: bool = False,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None:
        """Create a user; :class:`ConflictError` when the name is taken.  ``also``: as in :meth:`add_peer`."""

        def work(conn: sa.Connection) -> None:
            if conn.execute(sa.select(users.c.name).where(users.c.name == name)).first():
                raise ConflictError(f"a user named {name!r} exists already; pick another name")
            conn.execute(
                sa.insert(users).values(
                    name=name,
                    password_hash=password_hash,
                    roles=_join(roles),
                    disabled=False,
                    must_change_password=must_change_password,
                    created_at=_now(),
                )
            )
            if also is not None:
                also(conn)

        self._db.run(work, write=True)

    def get_user(self, name: str) -> UserRecord | None:
        def work(conn: sa.Connection) -> UserRecord | None:
            row = conn.execute(_USERS.where(users.c.name == name)).mappings().first()
            return None if row is None else _scoped(_user(row), row["scope"])

        return self._db.run(work, write=False)

    def list_users(self) -> list[UserRecord]:
        def work(conn: sa.Connection) -> list[UserRecord]:
            rows = conn.execute(_USERS.order_by(users.c.name)).mappings()
            return [_scoped(_user(r), r["scope"]) for r in rows]

        return self._db.run(work, write=False)

    def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        roles: frozenset[str] | None = None,
        disabled: bool | None = None,
        must_change_password: bool | None = None,
        end_sessions: datetime | None = None,
        also: Callable[[sa.Connection], object] | None = None,
    ) -> None:
        """Change the given fields of a user; :class:`NotFoundError` when unknown.  ``end_sessions``: also
        revoke the user's open sessions at that time; ``also``: as in :meth:`add_peer`."""
        values: dict[str, object] = {}
        if password_hash is not None:
            values["password_hash"] = password_hash
        if roles is not None:
            values["roles"] = _join(roles)
        if disabled is not None:
            values["disabled"] = disabled
        if must_change_password is not None:
            values["must_change_password"] = must_change_password

        def work(conn: sa.Connection) -> None:
            stmt = sa.update(users).where(users.c.name == name)
            done = conn.execute(stmt.values(**values) if values else stmt.values(name=name))
            if done.rowcount == 0:
                raise NotFoundError(f"no user named {name!r} exists")
            if end_sessions is not None:
                revoke_sessions(conn, name, end_sessions)
            if also is not None:
                also(conn)

        self._db.run(work, write=True)

    # Tokens -----------------------------------------------------------------------------------------------
    def add_token(
        self, record: TokenRecord, *, also: Callable[[sa.Connection], object] | None = None
    ) -> None:
        """Store a new token; :class:`NotFoundError` when its user does not exist.  ``also``: as in
        :meth:`add_peer`."""

        def work(conn: sa.Connection) -> None:
            if not conn.execute(sa.select(users.c.name).where(users.c.name == record.user_name)).first():
                raise NotFoundError(f"no user named {record.user_name!r} exists")
            conn.execute(
                sa.insert(tokens).values(
                    token_id=record.token_id,
                    user_name=record.user_name,
                    secret_sha256=record.secret_sha256,
                    scopes=_join(record.scopes),
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                    revoked_at=record.revoked_at,
                )
            )
            if also is not None:
                also(conn)

        self._db.run(work, write=True)

    def get_token(self, token_id: str) -> TokenRecord | None:
        def work(conn: sa.Connection) -> TokenRecord | None:
            row = conn.execute(sa.select(tokens).where(tokens.c.token_id == token_id)).mappings().first()
            return None if row is None else _token(row)

        return self._db.run(work, write=False)

    def get_token_holder(self, token_id: str) -> tuple[TokenRecord, UserRecord | None] | None:
        """The token and its user (None if the user is gone), read by one statement in one transaction:
        every request with a bearer token asks this, and a second transaction for the user cost as much
        as the statement.  One statement also costs the same whether the id exists or not."""

        def work(conn: sa.Connection) -> tuple[TokenRecord, UserRecord | None] | None:
            row = conn.execute(_TOKEN_HOLDER, {"token_id": token_id}).mappings().first()
            if row is None:
                return None
            if row["holder"] is None:
                return _token(row), None
            user = _user({**row, "name": row["holder"]})
            return _token(row), _scoped(user, row["scope"])

        return self._db.run(work, write=False)

    def list_tokens(self, user_name: str | None = None) -> list[TokenRecord]:
        def work(conn: sa.Connection) -> list[TokenRecord]:
            stmt = sa.select(tokens).order_by(tokens.c.user_name, tokens.c.created_at)
            if user_name is not None:
                stmt = stmt.where(tokens.c.user_name == user_name)
            return [_token(r) for r in conn.execute(stmt).mappings()]

        return self._db.run(work, write=False)

    def revoke_token(self, token_id: str, *, also: Callable[[sa.Connection], object] | None = None) -> None:
        """Mark a token revoked (kept for the record); :class:`NotFoundError` when unknown.  ``also``: as in
        :meth:`add_peer`."""

        def work(conn: sa.Connection) -> None:
            stmt = sa.update(tokens).where(tokens.c.token_id == token_id, tokens.c.revoked_at.is_(None))
            if conn.execute(stmt.values(revoked_at=_now())).rowcount == 0:
                if not conn.execute(
                    sa.select(tokens.c.token_id).where(tokens.c.token_id == token_id)
                ).first():
                    raise NotFoundError(f"no token with id {token_id!r} exists")
            if also is not None:
                also(conn)

        self._db.run(work, write=True)


def _user(row: Any) -> UserRecord:
    roles = frozenset(part for part in row["roles"].split(",") if part)
    return UserRecord(
        row["name"], row["password_hash"], roles, bool(row["disabled"]), bool(row["must_change_password"])
    )


_USERS = sa.select(users, user_scopes.c.scope).select_from(
    users.outerjoin(user_scopes, user_scopes.c.user_name == users.c.name)
)


# Built once (SQLAlchemy finds its compiled form in its cache): a token, its user and the user's scope.
_TOKEN_HOLDER = (
    sa.select(
        tokens,
        users.c.name.label("holder"),
        users.c.password_hash,
        users.c.roles,
        users.c.disabled,
        users.c.must_change_password,
        user_scopes.c.scope,
    )
    .select_from(
        tokens.outerjoin(users, users.c.name == tokens.c.user_name).outerjoin(
            user_scopes, user_scopes.c.user_name == users.c.name
        )
    )
    .where(tokens.c.token_id == sa.bindparam("token_id"))
)


# created_at is left out: a peer's admission does not need it, and it alone would need type processing.
_PEER = sa.select(*(c for c in peers.c if c.name != "created_at")).where(
    peers.c.ae_title == sa.bindparam("ae_title")
)
_PEER_COLUMNS = tuple(c.name for c in _PEER.selected_columns)
_PEER_SQL = str(_PEER.compile(dialect=sqlite_dialect()))


def _scoped(user: UserRecord, stored: Any) -> UserRecord:
    return user if stored is None else replace(user, scope=scope_from_json(stored))


def _peer(row: Any) -> Peer:
    try:
        tls, identity = TlsMode(row["tls"]), UserIdentityMode(row["user_identity"])
    except ValueError as exc:
        raise DatabaseError(
            "the peer table holds an unknown TLS or user identity mode; re-add the peer"
        ) from exc
    return Peer(
        row["ae_title"],
        row["host"],
        row["port"],
        _services(row["allow"]),
        row["user_name"],
        tls=tls,
        cert_sha256=row["cert_sha256"],
        user_identity=identity,
    )


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes for timezone-aware columns; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _token(row: Any) -> TokenRecord:
    return TokenRecord(
        row["token_id"],
        row["user_name"],
        row["secret_sha256"],
        frozenset(part for part in row["scopes"].split(",") if part),
        _aware(row["created_at"]),
        _aware(row["expires_at"]),
        None if row["revoked_at"] is None else _aware(row["revoked_at"]),
    )
