"""The audit log repository: append (hash chain, checkpoints), read, search, collector cursors.

:func:`append_events` also runs inside another repository's write transaction (the index row of a
stored instance and its audit record commit together, so recording costs no extra sync and neither
exists without the other).  It leaves the new head of the chain in the connection's ``info`` under
:data:`~safepacs.db.database.AUDIT_HEAD`; once the transaction has committed, the
:class:`~safepacs.db.database.Database` hands that head to its
:class:`~safepacs.db.database.HeadListener` (the head file, ``db/headfile.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator, Sequence
from datetime import UTC, datetime

import sqlalchemy as sa

from safepacs.audit.chain import (
    ANCHOR_KIND,
    ANCHOR_VALUE,
    CHECKPOINT_EVERY,
    GENESIS,
    AuditRow,
    Checkpoint,
    Signer,
    StoredRecord,
    chain_hash,
)
from safepacs.audit.events import AuditEvent, AuditFilter, address_fragment, canonical, search_keys
from safepacs.db.database import AUDIT_HEAD, Database, HeadListener
from safepacs.db.schema import audit_checkpoints, audit_cursors, audit_log, audit_refs, instances, trash

__all__ = ["AuditSnapshot", "SqlAuditLog", "append_events"]

_AUDIT_LOCK = 0x5AFE_A0D1  # pg_advisory_xact_lock key: one appender at a time keeps the chain linear


# Built once: SQLAlchemy then finds their compiled forms in its cache (an instance's record is appended
# on every C-STORE, so building statements per call would cost more than the record itself).
_HEAD = sa.select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
_INSERT_RECORD = sa.insert(audit_log)
_INSERT_REFS = sa.insert(audit_refs)
_INSERT_CHECKPOINT = sa.insert(audit_checkpoints)
_LOCK = sa.select(sa.func.pg_advisory_xact_lock(_AUDIT_LOCK))
_ANCHOR = (
    sa.select(audit_refs.c.seq)
    .where(audit_refs.c.kind == ANCHOR_KIND, audit_refs.c.value == ANCHOR_VALUE)
    .order_by(audit_refs.c.seq)
)


def append_events(
    conn: sa.Connection, events: Sequence[AuditEvent], signer: Signer, *, checkpoint: bool = False
) -> int:
    """Append ``events`` to the chain in this transaction; the last sequence number.  ``checkpoint``
    signs the new head whatever its number (application start and stop).  Each body carries the
    time it was recorded (``recorded_at``), so that searches by time can be checked against it."""
    if not events:
        raise ValueError("no events to append")
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK)
    head = conn.execute(_HEAD).first()
    seq, prev = (int(head.seq), str(head.hash)) if head is not None else (0, GENESIS)
    now = datetime.now(UTC)
    records: list[dict[str, object]] = []
    refs: list[dict[str, object]] = []
    checkpoints: list[dict[str, object]] = []
    for event in events:
        seq += 1
        body = canonical(event, recorded=now)
        digest = chain_hash(prev, seq, body)
        records.append(
            {
                "seq": seq,
                "recorded_at": now,
                "event_id": event.event_id.code,
                "outcome": int(event.outcome),
                "body": body,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        refs += [{"seq": seq, "kind": kind, "value": value} for kind, value in search_keys(event)]
        if seq % CHECKPOINT_EVERY == 0 or (checkpoint and event is events[-1]):
            cp = signer.checkpoint(seq, digest)
            checkpoints.append({"seq": cp.seq, "hash": cp.hash, "signature": cp.signature, "created_at": now})
        prev = digest
    conn.execute(_INSERT_RECORD, records)
    if refs:
        conn.execute(_INSERT_REFS, refs)
    if checkpoints:
        conn.execute(_INSERT_CHECKPOINT, checkpoints)
    conn.info[AUDIT_HEAD] = (seq, prev)
    return seq


class AuditSnapshot:
    """The whole trail as of one moment, read in one transaction (``SqlAuditLog.audit_snapshot``).  The
    streams are to be closed (``close()``) before the transaction ends, read to the end or not."""

    def __init__(self, conn: sa.Connection) -> None:
        self._conn = conn

    def rows(self) -> Generator[AuditRow]:
        """Every record with the columns searches use, in order, streamed."""
        c = audit_log.c
        stmt = sa.select(c.seq, c.body, c.prev_hash, c.hash, c.recorded_at, c.event_id, c.outcome)
        with self._conn.execute(stmt.order_by(c.seq).execution_options(yield_per=2000)) as result:
            for r in result:
                yield AuditRow(
                    int(r.seq), r.body, r.prev_hash, r.hash, r.recorded_at, str(r.event_id), int(r.outcome)
                )

    def refs(self) -> Generator[tuple[int, str, str]]:
        """Every ``audit_refs`` row as (seq, kind, value), ordered by seq, streamed."""
        c = audit_refs.c
        stmt = sa.select(c.seq, c.kind, c.value).order_by(c.seq).execution_options(yield_per=5000)
        with self._conn.execute(stmt) as result:
            for r in result:
                yield int(r.seq), str(r.kind), str(r.value)

    def checkpoints(self) -> list[Checkpoint]:
        stmt = sa.select(audit_checkpoints).order_by(audit_checkpoints.c.seq)
        return [
            Checkpoint(int(r["seq"]), r["hash"], r["signature"]) for r in self._conn.execute(stmt).mappings()
        ]

    def holdings(self) -> int:
        """The instances the archive holds, in the index or in its trash."""
        count = 0
        for table in (instances, trash):
            count += int(self._conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
        return count


class SqlAuditLog:
    """Reading and writing the audit trail on a :class:`~safepacs.db.database.Database` (see the module
    docstring).  Thread-safe; one per process."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def set_audit_listener(self, listener: HeadListener | None) -> None:
        """Who is told of each new head of the chain once it is committed (the head file)."""
        self._db.set_audit_listener(listener)

    def sync_audit(self) -> None:
        """Make every committed audit record durable (those recorded "within a second" too)."""
        self._db.sync_audit()

    def append_audit(
        self, events: Sequence[AuditEvent], signer: Signer, *, checkpoint: bool = False, durable: bool = True
    ) -> int:
        """Append events, committed before returning (and synced, unless ``durable`` is False: then
        within a second); the last sequence number."""
        return self._db.run(
            lambda conn: append_events(conn, events, signer, checkpoint=checkpoint),
            write=True,
            relaxed=not durable,
        )

    @contextlib.contextmanager
    def audit_snapshot(self) -> Iterator[AuditSnapshot]:
        """The trail as of one moment (a read transaction; PostgreSQL: REPEATABLE READ), for verifying
        records, search keys and checkpoints together while other processes append."""
        with self._db.snapshot() as conn:
            yield AuditSnapshot(conn)

    def audit_head(self) -> tuple[int, str] | None:
        """``(seq, hash)`` of the last record; None when the trail is empty."""

        def work(conn: sa.Connection) -> tuple[int, str] | None:
            row = conn.execute(_HEAD).first()
            return None if row is None else (int(row.seq), str(row.hash))

        return self._db.run(work, write=False)

    def audit_anchor(self) -> int | None:
        """The record where the head file began (its ``anchor`` row in ``audit_refs``); None: not yet."""
        return self._db.run(lambda conn: conn.execute(_ANCHOR).scalar(), write=False)

    def set_audit_anchor(self, seq: int) -> None:
        """Mark record ``seq`` as where the head file began."""
        self._db.run(
            lambda conn: conn.execute(
                sa.insert(audit_refs).values(seq=seq, kind=ANCHOR_KIND, value=ANCHOR_VALUE)
            ),
            write=True,
        )

    def audit_records(self, after_seq: int = 0, limit: int = 1000) -> list[StoredRecord]:
        """The records after ``after_seq`` in order, at most ``limit``."""

        def work(conn: sa.Connection) -> list[StoredRecord]:
            stmt = (
                sa.select(audit_log.c.seq, audit_log.c.body, audit_log.c.prev_hash, audit_log.c.hash)
                .where(audit_log.c.seq > after_seq)
                .order_by(audit_log.c.seq)
                .limit(limit)
            )
            return [StoredRecord(int(r.seq), r.body, r.prev_hash, r.hash) for r in conn.execute(stmt)]

        return self._db.run(work, write=False)

    def audit_checkpoints(self) -> list[Checkpoint]:
        def work(conn: sa.Connection) -> list[Checkpoint]:
            stmt = sa.select(audit_checkpoints).order_by(audit_checkpoints.c.seq)
            return [
                Checkpoint(int(r["seq"]), r["hash"], r["signature"]) for r in conn.execute(stmt).mappings()
            ]

        return self._db.run(work, write=False)

    def search_audit(
        self,
        where: AuditFilter,
        limit: int | None = None,
        *,
        before: int | None = None,
        newest_first: bool = False,
    ) -> list[StoredRecord]:
        """Records matching every given filter, oldest first (``newest_first``: newest first);
        ``before``: only records before that sequence number (the next page of a newest-first search)."""

        def work(conn: sa.Connection) -> list[StoredRecord]:
            stmt = sa.select(audit_log.c.seq, audit_log.c.body, audit_log.c.prev_hash, audit_log.c.hash)
            for kind, value in (
                ("patient", where.patient_id),
                ("study", where.study_uid),
                ("user", where.user),
            ):
                if value is not None:
                    ref = audit_refs.alias(f"r_{kind}")
                    stmt = stmt.where(
                        sa.exists(
                            sa.select(1)
                            .select_from(ref)
                            .where(ref.c.seq == audit_log.c.seq, ref.c.kind == kind, ref.c.value == value)
                        )
                    )
            if where.since is not None:
                stmt = stmt.where(audit_log.c.recorded_at >= where.since)
            if where.until is not None:
                stmt = stmt.where(audit_log.c.recorded_at <= where.until)
            if where.failed is not None:
                stmt = stmt.where(audit_log.c.outcome != 0 if where.failed else audit_log.c.outcome == 0)
            if where.address is not None:  # not a search key: the body's text (a scan, see the docs)
                stmt = stmt.where(audit_log.c.body.contains(address_fragment(where.address), autoescape=True))
            if before is not None:
                stmt = stmt.where(audit_log.c.seq < before)
            stmt = stmt.order_by(audit_log.c.seq.desc() if newest_first else audit_log.c.seq)
            if limit:
                stmt = stmt.limit(limit)
            return [StoredRecord(int(r.seq), r.body, r.prev_hash, r.hash) for r in conn.execute(stmt)]

        return self._db.run(work, write=False)

    def get_audit_cursor(self, collector: str) -> int:
        def work(conn: sa.Connection) -> int:
            seq = conn.execute(
                sa.select(audit_cursors.c.seq).where(audit_cursors.c.collector == collector)
            ).scalar()
            return 0 if seq is None else int(seq)

        return self._db.run(work, write=False)

    def set_audit_cursor(self, collector: str, seq: int) -> None:
        def work(conn: sa.Connection) -> None:
            now = datetime.now(UTC)
            done = conn.execute(
                sa.update(audit_cursors)
                .where(audit_cursors.c.collector == collector)
                .values(seq=seq, updated_at=now)
            )
            if done.rowcount == 0:
                conn.execute(sa.insert(audit_cursors).values(collector=collector, seq=seq, updated_at=now))

        self._db.run(work, write=True)
