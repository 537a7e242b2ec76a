"""The database: its engines, the writers' turns, transactions (retried, synced) and the audit head hook.

SQLite (a file, WAL journal, ``synchronous=FULL``, foreign keys on, 30 s busy timeout) by default,
PostgreSQL (psycopg 3) when ``index.url`` names it.  Several processes may write one SQLite file: write
transactions start with ``BEGIN IMMEDIATE`` and are retried when the database stays locked; on PostgreSQL
they are retried on serialization failures, deadlocks and the constraint races of concurrent inserts.
On SQLite an instance's rows are synced after the write lock is released, not while it is held
(:meth:`Database.run_then_sync`, which :meth:`~safepacs.db.instances.SqlInstances.add_instance` uses):
durable before the call returns all the same.

The schema is created and upgraded by :func:`migrate` (Alembic, scripts shipped in the package);
:class:`Database` never migrates by itself.  The repositories (:mod:`safepacs.db.instances`,
:mod:`safepacs.db.directory`, :mod:`safepacs.db.auditlog`) run their statements through
:meth:`Database.run`; any of them may write audit records in the same transaction
(:func:`~safepacs.db.auditlog.append_events`), whose new head :class:`Database` hands to its
:class:`HeadListener` once the transaction has committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

from safepacs.db.write import driver_execute
from safepacs.errors import DatabaseError, UnsyncedCommitError

__all__ = ["AUDIT_HEAD", "Database", "HeadListener", "RelaxedSync", "WriterTurns", "migrate"]

log = logging.getLogger(__name__)

#: Where :func:`~safepacs.db.auditlog.append_events` leaves ``(seq, hash)`` of the new head of the audit
#: chain in ``Connection.info``; :class:`Database` hands it to its :class:`HeadListener` after the commit.
AUDIT_HEAD = "safepacs.audit_head"


class HeadListener(Protocol):
    """Told of each new head of the chain once its transaction has committed (``audit/head.py``)."""

    def committed(self, seq: int, digest: str, *, durable: bool) -> None:
        """Records up to ``seq`` are committed; ``durable``: and synced to disk."""

    def close(self) -> None:
        """Write what is pending; the index closes after this."""


_BUSY_SECONDS = 30
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_RETRIES = 8
MIGRATIONS = Path(__file__).resolve().parent / "migrations"  # the Alembic scripts, shipped in the package
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
                raise DatabaseError("the index needs a SQLite file, not an in-memory database; set index.url")
            # hide_parameters: an error's message never carries the values of a statement (patient
            # names and IDs, audit records) into a log or a traceback.
            engine = sa.create_engine(parsed, connect_args={"timeout": _BUSY_SECONDS}, hide_parameters=True)
            event.listen(engine, "connect", _sqlite_connect_relaxed if relaxed else _sqlite_connect)
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        if backend == "postgresql":
            return sa.create_engine(parsed, pool_pre_ping=True, hide_parameters=True)
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError("index.url is not a usable database URL; check its spelling and driver") from exc
    raise DatabaseError(
        "index.url must name SQLite (sqlite:///file) or PostgreSQL (postgresql+psycopg://...)"
    )


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
        config.set_main_option("script_location", str(MIGRATIONS))
        with engine.execution_options(safepacs_write=True).begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except (sa.exc.SQLAlchemyError, CommandError) as exc:
        raise DatabaseError(
            f"the index schema could not be created or upgraded ({type(exc).__name__}); check index.url"
        ) from exc
    finally:
        engine.dispose()


class WriterTurns:
    """SQLite writers of every SafePACS process take turns through an ``flock`` on ``<index>-writers``.

    SQLite lets one writer in at a time; the others wait in its busy handler, which polls with sleeps
    of 1, 2, 5, 10 ... ms, while a store's transaction holds the lock far shorter than that plus its
    commit's sync: at four associations the handler slept more often than instances were stored
    (measured with bench/ingest.py).  The
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


class Database:
    """One SQL database (see the module docstring): thread-safe; one per process.  The repositories
    are built on it and share its transactions."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine = _make_engine(url)
        self._writer = self._engine.execution_options(safepacs_write=True)
        self._sqlite = self._engine.dialect.name == "sqlite"
        self._relaxed: RelaxedSync | None = None
        self._relaxed_lock = threading.Lock()
        self._closed = False
        database = sa.make_url(url).database if self._sqlite else None
        self._turns = WriterTurns(database) if database else None
        self._audit_listener: HeadListener | None = None

    @property
    def engine(self) -> sa.Engine:
        """The (reading) engine: for the repositories' snapshots and for tests, not for writes."""
        return self._engine

    @property
    def sqlite(self) -> bool:
        """Whether the database is a SQLite file (else PostgreSQL)."""
        return self._sqlite

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return str(self._engine.dialect.name)

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
        None once the database is closed."""
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

    def run(self, work: Callable[[sa.Connection], _T], *, write: bool, relaxed: bool = False) -> _T:
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

    def run_then_sync(self, work: Callable[[sa.Connection], _T]) -> _T:
        """A write transaction committed durably before returning, its sync taken out of the write lock.

        On SQLite the transaction commits without a sync while it holds the write lock, and the WAL is
        synced once the lock is released: a sync takes longer than the rest of the transaction, and every
        other writer (each association storing at once) waited for it.  Syncs of several processes then
        overlap.  A sync that fails raises :class:`UnsyncedCommitError`: the rows are committed, maybe not
        on disk, and the caller must not acknowledge what it wrote nor remove what the rows refer to.
        PostgreSQL (or a closed database): :meth:`run`, committed and synced by the normal writer.
        """
        sync = self._relaxed_sync() if self._sqlite else None
        if sync is None:
            return self.run(work, write=True)
        result, head = self._run_on(sync.writer, work, True, begin=sync.transaction if self._turns else None)
        try:
            sync.sync_now()
        except OSError as exc:
            log.error("the index's write-ahead log could not be synced", extra={"reason": exc.strerror})
            raise UnsyncedCommitError(
                "the instance was indexed but the index could not be synced to disk; check the disk"
            ) from exc
        return self._anchored(result, head, durable=True)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sa.Connection]:
        """A read transaction that sees one moment (PostgreSQL: REPEATABLE READ) for as long as it is
        open, while other processes write; not retried."""
        try:
            with self._engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise DatabaseError(
                f"the index database failed ({type(exc).__name__}); check that it is reachable"
            ) from exc

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
        self.run(lambda conn: conn.exec_driver_sql("SELECT txid_current()"), write=True)

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
                raise DatabaseError(
                    f"the index database failed ({type(exc.orig).__name__}); check that it is reachable"
                ) from exc
            except sa.exc.SQLAlchemyError as exc:
                raise DatabaseError(f"the index database failed ({type(exc).__name__})") from exc
        raise AssertionError("unreachable")  # pragma: no cover
