"""The index: patients, studies, series and instances, peers and users, in one SQL database.

SQLite (a file, WAL journal, ``synchronous=FULL``, foreign keys on, 30 s busy timeout) by default,
PostgreSQL (psycopg 3) when ``index.url`` names it.  Several processes may write one SQLite file: write
transactions start with ``BEGIN IMMEDIATE`` and are retried when the database stays locked; on PostgreSQL
they are retried on serialization failures, deadlocks and the constraint races of concurrent inserts.
On SQLite an instance's rows are synced after the write lock is released, not while it is held
(:meth:`SqlIndex.add_instance`): durable before the call returns all the same.

The schema is created and upgraded by :func:`migrate` (Alembic, scripts shipped in the package);
:class:`SqlIndex` never migrates by itself.  Matching rules are in :mod:`safepacs.dicom.matching`; how
an instance is indexed (one read of its header, statements built once, two statements for another
instance of a known series) in :mod:`safepacs.db.write`; how a received data set's indexed
elements are found in its bytes in :mod:`safepacs.dicom.header`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from pydicom.dataset import Dataset
from sqlalchemy import event
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from safepacs.db import sql
from safepacs.db.access import AccessMixin, scope_from_json
from safepacs.db.auditlog import AUDIT_HEAD, AuditLogMixin, HeadListener
from safepacs.db.certificates import CertificateMixin, write_certificate
from safepacs.db.logins import LoginMixin, revoke_sessions
from safepacs.db.schema import instances, patients, peers, series, studies, tokens, user_scopes, users
from safepacs.db.write import InstanceRows, Writer, driver_execute, read_header
from safepacs.dicom.attributes import UNIQUE_KEYS
from safepacs.dicom.matching import parse_identifier, retrieve_keys
from safepacs.errors import ConflictError, IndexError_, NotFoundError, UnsyncedCommitError
from safepacs.records import PinnedCertificate, TokenRecord, UserRecord
from safepacs.types import (
    InstanceRef,
    Peer,
    QueryLevel,
    QueryModel,
    Scope,
    Service,
    StoredBlob,
    TlsMode,
    UserIdentityMode,
)

__all__ = ["SqlIndex", "migrate"]

log = logging.getLogger(__name__)

_BUSY_SECONDS = 30
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_RETRIES = 8
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x5AFE_9AC5  # pg_advisory_xact_lock key serializing concurrent migrations
# PostgreSQL SQLSTATEs worth a retry: serialization failure, deadlock, lock not available, and the
# foreign key / unique races of two writers creating or removing the same study at once.
_PG_TRANSIENT = frozenset({"40001", "40P01", "55P03"})
_PG_WRITE_RACES = frozenset({"23503", "23505"})
_T = TypeVar("_T")


# Engines -------------------------------------------------------------------------------------------------
def _sqlite_connect(dbapi_conn: Any, _record: Any, synchronous: str = "FULL") -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_begin)
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {_BUSY_SECONDS * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed row survives a power cut.  NORMAL (the relaxed writer): it survives a crash of
        # SafePACS, and a power cut once the WAL is synced (RelaxedSync) - for an instance's rows right
        # after the commit, before add_instance returns; for audit records of reads within a second.
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA case_sensitive_like = ON")  # PS3.4 C.2.2.2.4: wild cards are case-sensitive
    finally:
        cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    # A writer takes the write lock up front, so it never fails half-way on a lock upgrade.
    immediate = conn.get_execution_options().get("safepacs_write", False)
    driver_execute(conn, "BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_connect_relaxed(dbapi_conn: Any, record: Any) -> None:
    _sqlite_connect(dbapi_conn, record, "NORMAL")


def _make_engine(url: str, *, relaxed: bool = False) -> sa.Engine:
    try:
        parsed = sa.make_url(url)
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            if parsed.database in (None, "", ":memory:"):
                raise IndexError_("the index needs a SQLite file, not an in-memory database; set index.url")
            # hide_parameters: an error's message never carries the values of a statement (patient
            # names and IDs, audit records) into a log or a traceback.
            engine = sa.create_engine(parsed, connect_args={"timeout": _BUSY_SECONDS}, hide_parameters=True)
            event.listen(engine, "connect", _sqlite_connect_relaxed if relaxed else _sqlite_connect)
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        if backend == "postgresql":
            return sa.create_engine(parsed, pool_pre_ping=True, hide_parameters=True)
    except sa.exc.SQLAlchemyError as exc:
        raise IndexError_("index.url is not a usable database URL; check its spelling and driver") from exc
    raise IndexError_("index.url must name SQLite (sqlite:///file) or PostgreSQL (postgresql+psycopg://...)")


def migrate(url: str) -> None:
    """Create or upgrade the index schema to the newest revision (``alembic upgrade head``); idempotent.

    Runs the migration scripts shipped in the package, in one transaction that holds the SQLite write
    lock or a PostgreSQL advisory lock, so several processes may call it at once.
    """
    from alembic import command  # imported here: only migrations need Alembic
    from alembic.config import Config
    from alembic.util import CommandError

    engine = _make_engine(url)
    try:
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with engine.execution_options(safepacs_write=True).begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except (sa.exc.SQLAlchemyError, CommandError) as exc:
        raise IndexError_(
            f"the index schema could not be created or upgraded ({type(exc).__name__}); check index.url"
        ) from exc
    finally:
        engine.dispose()


def _now() -> datetime:
    return datetime.now(UTC)


def _services(text: str) -> frozenset[Service]:
    try:
        return frozenset(Service(part) for part in text.split(",") if part)
    except ValueError as exc:
        raise IndexError_("the peer table holds an unknown service name; re-add the peer") from exc


def _join(values: frozenset[str] | frozenset[Service]) -> str:
    return ",".join(sorted(str(v) for v in values))


class WriterTurns:
    """SQLite writers of every SafePACS process take turns through an ``flock`` on ``<index>-writers``.

    SQLite lets one writer in at a time; the others wait in its busy handler, which polls with sleeps
    of 1, 2, 5, 10 ... ms, while a store's transaction holds the lock well under a millisecond plus
    its commit's sync: at four associations the handler slept ~1,300 times per 1,000 instances.  The
    kernel wakes the next ``flock`` waiter the moment the lock is released.  Within a process the
    threads queue on a mutex first (``flock`` is per open file, not per thread).  Only the order and
    the waiting change: SQLite's own locking still guards the data, so a process without this (an
    older SafePACS, the ``sqlite3`` shell) is merely slower, and a lock file that cannot be opened
    (a read-only data directory) leaves the busy handler to do the waiting.
    """

    def __init__(self, database: str) -> None:
        self._path = database + "-writers"
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self._unusable = False

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._mutex:
            fd = self._open()
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as exc:  # e.g. ENOLCK on a network file system
                    self._give_up(exc)
                    fd = None
            try:
                yield
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _open(self) -> int | None:
        if self._fd is None and not self._unusable:
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | _O_NOFOLLOW, 0o600)
            except OSError as exc:
                self._give_up(exc)
        return self._fd

    def _give_up(self, exc: OSError) -> None:
        self._unusable = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        log.info("index writers wait in SQLite's busy handler", extra={"reason": exc.strerror})

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


#: Syncs a file's data (and its size), as SQLite itself syncs its WAL on Linux; fsync where missing.
_sync_data: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


class RelaxedSync:
    """The relaxed SQLite writer, and syncing its commits to disk: at once, or by a thread within a second.

    A commit on the relaxed writer is in the WAL (visible, and kept if SafePACS crashes) but not synced.
    :meth:`sync_now` syncs the WAL file (``fdatasync``) and with it every commit written to it before;
    after :meth:`dirty` the thread does, at most ``interval`` seconds after a relaxed commit, and so does
    any later commit of the normal writer.  A commit the WAL no longer holds was checkpointed into the
    database file, which SQLite syncs before it reuses or removes the WAL.
    """

    def __init__(self, writer: sa.Engine, wal: Path, interval: float = 0.5) -> None:
        self.writer = writer.execution_options(safepacs_write=True)
        self._engine = writer
        self._wal = wal
        self._kept: sa.Connection | None = None  # see transaction()
        self._pending = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), name="safepacs-wal-sync", daemon=True
        )
        self._thread.start()

    def dirty(self) -> None:
        self._pending.set()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A write transaction on the writer's one kept connection (committed on return): no pool
        check-out and check-in around it (a third of an empty transaction's cost).  Only for a caller
        holding the process's writers' turn, so only one uses it at a time; after a failure the next
        transaction starts on a fresh connection."""
        if self._kept is None:
            self._kept = self.writer.connect()
        try:
            with self._kept.begin():
                yield self._kept
        except BaseException:
            self._drop_kept()
            raise

    def _drop_kept(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                kept.close()

    def sync(self) -> None:
        """Sync the WAL if a relaxed commit was made since the last sync."""
        if self._pending.is_set():
            self.sync_now()

    def sync_now(self) -> None:
        """Sync the WAL: every commit made before this call is durable when it returns."""
        self._pending.clear()
        try:
            fd = os.open(self._wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # checkpointed and removed: what it held is in the database file
            return
        try:
            _sync_data(fd)
        except OSError:
            self._pending.set()  # the thread tries again
            raise
        finally:
            os.close(fd)

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.sync()
            except OSError:
                log.exception("the index's write-ahead log could not be synced; retrying")
                self._pending.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._drop_kept()
        try:
            self.sync()
        except OSError as exc:  # what was committed stays committed; whether it is on disk is unknown
            log.error("the index's write-ahead log could not be synced", extra={"reason": exc.strerror})
        finally:
            self._engine.dispose()


class SqlIndex(AccessMixin, LoginMixin, AuditLogMixin, CertificateMixin):
    """The index on one database (see the module docstring).  Thread-safe; one per process."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine = _make_engine(url)
        self._writer = self._engine.execution_options(safepacs_write=True)
        self._sqlite = self._engine.dialect.name == "sqlite"
        self._instance_writer = Writer(self._engine.dialect.name)
        self._relaxed: RelaxedSync | None = None
        self._relaxed_lock = threading.Lock()
        self._closed = False
        database = sa.make_url(url).database if self._sqlite else None
        self._turns = WriterTurns(database) if database else None
        self._audit_listener: HeadListener | None = None

    def set_audit_listener(self, listener: HeadListener | None) -> None:
        """Who is told of each new head of the audit chain once it is committed (the head file)."""
        self._audit_listener = listener

    def close(self) -> None:
        """Release the connections; the within-a-second writer is synced and closed first, and a
        relaxed write after this (a thread still finishing) is synced before it returns instead.
        The audit head listener writes what it has pending before that."""
        listener = self._audit_listener
        if listener is not None:
            listener.close()
        with self._relaxed_lock:
            self._closed = True
            relaxed, self._relaxed = self._relaxed, None
        try:
            if relaxed is not None:
                relaxed.close()
        finally:
            self._engine.dispose()
            if self._turns is not None:
                self._turns.close()

    def _relaxed_sync(self) -> RelaxedSync | None:
        """The writer whose commits skip the sync (SQLite ``synchronous=NORMAL``), made on first use;
        None once the index is closed."""
        with self._relaxed_lock:
            if self._relaxed is None and not self._closed:
                database = sa.make_url(self._url).database or ""
                self._relaxed = RelaxedSync(_make_engine(self._url, relaxed=True), Path(database + "-wal"))
            return self._relaxed

    # Transactions ---------------------------------------------------------------------------------------
    def _turn(self, write: bool) -> contextlib.AbstractContextManager[None]:
        """A write's turn among the SQLite writers of every process (:class:`WriterTurns`)."""
        return self._turns.turn() if write and self._turns is not None else contextlib.nullcontext()

    def _transient(self, exc: sa.exc.DBAPIError, write: bool) -> bool:
        if self._sqlite:
            text = str(exc.orig).lower()
            return isinstance(exc, sa.exc.OperationalError) and ("locked" in text or "busy" in text)
        state = getattr(exc.orig, "sqlstate", None)
        return state in _PG_TRANSIENT or (write and state in _PG_WRITE_RACES)

    def _run(self, work: Callable[[sa.Connection], _T], *, write: bool, relaxed: bool = False) -> _T:
        """Run ``work`` in one transaction, committed (durably) on return, retried when transient.

        ``relaxed`` (a write): committed before returning, synced to disk within a second, not before
        (SQLite: the relaxed writer; PostgreSQL: ``synchronous_commit = off`` for this transaction).
        """
        if relaxed and write:
            if self._sqlite:
                sync = self._relaxed_sync()
                if sync is None:  # closed: the normal, synced writer
                    return self._anchored(*self._run_on(self._writer, work, write), durable=True)
                result, head = self._run_on(sync.writer, work, write)
                sync.dirty()
                return self._anchored(result, head, durable=False)
            inner = work

            def work(conn: sa.Connection) -> _T:
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                return inner(conn)

            return self._anchored(*self._run_on(self._writer, work, write), durable=False)
        return self._anchored(
            *self._run_on(self._writer if write else self._engine, work, write), durable=True
        )

    def _anchored(self, result: _T, head: tuple[int, str] | None, *, durable: bool) -> _T:
        """Tell the audit head listener of a new head of the chain that a transaction committed."""
        listener = self._audit_listener
        if head is not None and listener is not None:
            listener.committed(*head, durable=durable)
        return result

    def sync_audit(self) -> None:
        """Make every committed audit record durable (those recorded "within a second" too)."""
        if self._sqlite:
            with self._relaxed_lock:
                relaxed = self._relaxed
            if relaxed is not None:
                relaxed.sync_now()
            return
        # A transaction with a transaction id writes a commit record; synchronous_commit (on) waits
        # until the WAL is flushed up to it, and so past every asynchronous commit before it.
        self._run(lambda conn: conn.exec_driver_sql("SELECT txid_current()"), write=True)

    def _run_on(
        self,
        engine: sa.Engine,
        work: Callable[[sa.Connection], _T],
        write: bool,
        begin: Callable[[], contextlib.AbstractContextManager[sa.Connection]] | None = None,
    ) -> tuple[_T, tuple[int, str] | None]:
        """``work`` in a transaction of ``engine`` (or from ``begin``, entered once the turn is held);
        its result and the new head of the audit chain if it appended audit records."""
        delay = 0.02
        for attempt in range(_RETRIES + 1):
            try:
                with self._turn(write), (begin or engine.begin)() as conn:
                    conn.info.pop(AUDIT_HEAD, None)  # left by a transaction that was rolled back
                    result = work(conn)
                    head: tuple[int, str] | None = conn.info.pop(AUDIT_HEAD, None)
                return result, head
            except sa.exc.DBAPIError as exc:
                if attempt < _RETRIES and self._transient(exc, write):
                    time.sleep(delay * (1 + random.random()))  # noqa: S311 - jitter, not security
                    delay = min(delay * 2, 1.0)
                    continue
                raise IndexError_(
                    f"the index database failed ({type(exc.orig).__name__}); check that it is reachable"
                ) from exc
            except sa.exc.SQLAlchemyError as exc:
                raise IndexError_(f"the index database failed ({type(exc).__name__})") from exc
        raise AssertionError("unreachable")  # pragma: no cover

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
            return InstanceRef(r[0], r[1], r[2], r[3], r[4], StoredBlob(r[5], r[6], r[7], r[8], r[9]))

        return self._run(work, write=False)

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

        On SQLite the transaction commits without a sync while it holds the write lock, and the WAL is
        synced once the lock is released: a sync takes longer than the rest of the transaction, and every
        other writer (each association storing at once) waited for it.  Syncs of several processes then
        overlap.  A sync that fails raises :class:`UnsyncedCommitError`: the rows are committed, maybe not
        on disk, and the caller must not acknowledge the instance nor remove what the rows refer to.
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

        sync = self._relaxed_sync() if self._sqlite else None
        if sync is None:  # PostgreSQL, or closed: committed and synced by the normal writer
            return self._run(work, write=True)
        old, head = self._run_on(sync.writer, work, True, begin=sync.transaction if self._turns else None)
        try:
            sync.sync_now()
        except OSError as exc:
            log.error("the index's write-ahead log could not be synced", extra={"reason": exc.strerror})
            raise UnsyncedCommitError(
                "the instance was indexed but the index could not be synced to disk; check the disk"
            ) from exc
        return self._anchored(old, head, durable=True)

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

        return self._run(work, write=False) if uids else {}

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

        return self._run(work, write=True)

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
        return self._run(lambda conn: sql.run_find(conn, query, limit or None), write=False)

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
        return self._run(
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
        return self._run(lambda conn: run(conn, query, limit, offset), write=False)

    def instances_for(
        self, model: QueryModel, level: QueryLevel, identifier: Dataset, scope: Scope | None = None
    ) -> list[InstanceRef]:
        """C-GET/C-MOVE: the instances under the unique keys of the identifier (PS3.4 C.4.2.2.1, C.4.3).

        The unique key of the retrieve level (a value or a list of UIDs) is required, the unique keys
        above it restrict when given; a missing key raises :class:`~safepacs.errors.QueryError`.
        """
        keys = retrieve_keys(model, level, identifier)
        return self._run(lambda conn: sql.run_retrieve(conn, keys, UNIQUE_KEYS[level], scope), write=False)

    def count_instances(self) -> int:
        return self._run(
            lambda conn: int(conn.execute(sa.select(sa.func.count()).select_from(instances)).scalar_one()),
            write=False,
        )

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

        self._run(work, write=True)

    def remove_peer(self, ae_title: str, *, also: Callable[[sa.Connection], object] | None = None) -> None:
        """Unregister a peer; :class:`NotFoundError` when unknown.  ``also``: as in :meth:`add_peer`."""

        def work(conn: sa.Connection) -> None:
            if conn.execute(sa.delete(peers).where(peers.c.ae_title == ae_title)).rowcount == 0:
                raise NotFoundError(f"no peer with AE title {ae_title!r} is registered")
            if also is not None:
                also(conn)

        self._run(work, write=True)

    def get_peer(self, ae_title: str) -> Peer | None:
        """The peer registered under ``ae_title``, read afresh on every call (a peer removed or changed
        is refused or narrowed from the next association on: nothing is cached).  Every association
        asks this before it is admitted; on SQLite the statement goes to the driver directly (the
        peers' columns are text and integers: nothing for SQLAlchemy to convert), which spares the
        ~100 us of SQLAlchemy's statement machinery per association (bench/README.md, "Per-association
        cost"); ``_peer_reference`` is the same lookup through SQLAlchemy, for the differential test."""
        if not self._sqlite:
            return self._peer_reference(ae_title)

        def work(conn: sa.Connection) -> Peer | None:
            cursor = driver_execute(conn, _PEER_SQL, (ae_title,))
            row = cursor.fetchone()
            return None if row is None else _peer(dict(zip(_PEER_COLUMNS, row, strict=True)))

        return self._run(work, write=False)

    def _peer_reference(self, ae_title: str) -> Peer | None:
        def work(conn: sa.Connection) -> Peer | None:
            row = conn.execute(_PEER, {"ae_title": ae_title}).mappings().first()
            return None if row is None else _peer(row)

        return self._run(work, write=False)

    def list_peers(self) -> list[Peer]:
        def work(conn: sa.Connection) -> list[Peer]:
            rows = conn.execute(sa.select(peers).order_by(peers.c.ae_title)).mappings()
            return [_peer(r) for r in rows]

        return self._run(work, write=False)

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

        self._run(work, write=True)

    def get_user(self, name: str) -> UserRecord | None:
        def work(conn: sa.Connection) -> UserRecord | None:
            row = conn.execute(_USERS.where(users.c.name == name)).mappings().first()
            return None if row is None else _scoped(_user(row), row["scope"])

        return self._run(work, write=False)

    def list_users(self) -> list[UserRecord]:
        def work(conn: sa.Connection) -> list[UserRecord]:
            rows = conn.execute(_USERS.order_by(users.c.name)).mappings()
            return [_scoped(_user(r), r["scope"]) for r in rows]

        return self._run(work, write=False)

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

        self._run(work, write=True)

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

        self._run(work, write=True)

    def get_token(self, token_id: str) -> TokenRecord | None:
        def work(conn: sa.Connection) -> TokenRecord | None:
            row = conn.execute(sa.select(tokens).where(tokens.c.token_id == token_id)).mappings().first()
            return None if row is None else _token(row)

        return self._run(work, write=False)

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

        return self._run(work, write=False)

    def list_tokens(self, user_name: str | None = None) -> list[TokenRecord]:
        def work(conn: sa.Connection) -> list[TokenRecord]:
            stmt = sa.select(tokens).order_by(tokens.c.user_name, tokens.c.created_at)
            if user_name is not None:
                stmt = stmt.where(tokens.c.user_name == user_name)
            return [_token(r) for r in conn.execute(stmt).mappings()]

        return self._run(work, write=False)

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

        self._run(work, write=True)


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
        raise IndexError_(
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
