"""The hash chain, its signed checkpoints and signed heads, and their verification (pure functions, no I/O).

Record ``n`` stores ``hash_n = SHA-256(hash_{n-1} "\\n" n "\\n" body_n)`` with ``hash_0`` = 64 zeros,
so editing, deleting, inserting or reordering a record breaks every later link.  Every
``CHECKPOINT_EVERY`` records (and at application start and stop) the archive signs
``(n, hash_n)`` with its Ed25519 audit key: a rewritten chain would need that key.

Cutting records off the end leaves a shorter chain that is intact in itself, and checkpoints can be
deleted with the records they name.  So the head of the chain is also kept outside the index: after
every commit that appends records, the committing process adds a :class:`SignedHead` (``n``,
``hash_n``, the time, an Ed25519 signature) to the head file (``db/headfile.py``); heads go to the
syslog collectors too, and ``safepacs audit head`` exports one.  :func:`verify_chain` checks the
records against every signed head it is given: a head naming a record that is gone, or that has
another hash, means the trail was cut short or rewritten.

What a search uses is checked as well: the ``event_id``, ``outcome`` and ``recorded_at`` columns and
the search keys in ``audit_refs`` are derived again from each hashed body and compared (records made
before the body carried its recording time, ``"recorded"``, have an unchecked ``recorded_at``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from safepacs.audit.events import format_time, recorded_time, search_keys

__all__ = [
    "ANCHOR_KIND",
    "ANCHOR_VALUE",
    "CHECKPOINT_EVERY",
    "GENESIS",
    "UNANCHORED_GRACE",
    "AuditRow",
    "Checkpoint",
    "HeadLine",
    "SignedHead",
    "Signer",
    "StoredRecord",
    "Verification",
    "chain_hash",
    "verify_chain",
]

GENESIS = "0" * 64
CHECKPOINT_EVERY = 100
KEY_FILE = "audit-ed25519.pem"
#: The ``audit_refs`` kind of the one row that marks the record where the head file began.
ANCHOR_KIND = "anchor"
ANCHOR_VALUE = "audit-head"
#: How long a record may go without a signed head naming it (or a later record) before verify calls
#: it unanchored: a head is written before the answer for changes, within a second for reads.
UNANCHORED_GRACE = timedelta(seconds=10)
_HASH = re.compile(r"[0-9a-f]{64}")


def chain_hash(prev: str, seq: int, body: str) -> str:
    return hashlib.sha256(f"{prev}\n{seq}\n{body}".encode()).hexdigest()


def _checkpoint_message(seq: int, digest: str) -> bytes:
    return f"safepacs-audit-checkpoint\n{seq}\n{digest}".encode()


def _head_message(seq: int, digest: str, time: str) -> bytes:
    return f"safepacs-audit-head\n{seq}\n{digest}\n{time}".encode()


@dataclass(frozen=True)
class StoredRecord:
    seq: int
    body: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class AuditRow(StoredRecord):
    """A record with the columns that searches use (checked against its body when verifying)."""

    recorded_at: datetime = field(default=datetime.min.replace(tzinfo=UTC))
    event_id: str = ""
    outcome: int = 0


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    signature: str  # base64 of the Ed25519 signature


@dataclass(frozen=True)
class SignedHead:
    """``(seq, hash)`` of a record, signed at ``time``: one line ``SEQ HASH TIME SIGNATURE`` of the head
    file, of an exported head, and the parameters of the head sent to syslog collectors."""

    seq: int
    hash: str
    time: str  # format_time(), UTC
    signature: str  # base64 of the Ed25519 signature of _head_message

    def line(self) -> str:
        return f"{self.seq} {self.hash} {self.time} {self.signature}"

    @classmethod
    def parse(cls, line: str) -> SignedHead:
        """The head a line holds; ValueError when it is not one."""
        parts = line.split()
        if len(parts) != 4 or not parts[0].isdigit() or not _HASH.fullmatch(parts[1]):
            raise ValueError("not a signed head line")
        datetime.strptime(parts[2], "%Y-%m-%dT%H:%M:%S.%fZ")  # ValueError when it is not a time
        return cls(int(parts[0]), parts[1], parts[2], parts[3])

    def signed_by(self, public: Ed25519PublicKey) -> bool:
        try:
            signature = base64.b64decode(self.signature, validate=True)
            public.verify(signature, _head_message(self.seq, self.hash, self.time))
        except (InvalidSignature, ValueError, binascii.Error):
            return False
        return True


@dataclass(frozen=True)
class HeadLine:
    """A line of the head file as read: its number and the head, or None when it cannot be read."""

    number: int
    head: SignedHead | None


class Signer:
    """The archive's Ed25519 audit key (``keys/audit-ed25519.pem``, created by ``safepacs init``)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> Signer:
        """The key in ``keys_dir``; a data directory from before the audit trail gets one now (0600)."""
        path = keys_dir / KEY_FILE
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            fd_path = path.with_suffix(".tmp")
            fd_path.write_bytes(pem)
            fd_path.chmod(0o600)
            fd_path.replace(path)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(loaded)

    def checkpoint(self, seq: int, digest: str) -> Checkpoint:
        signature = self._key.sign(_checkpoint_message(seq, digest))
        return Checkpoint(seq, digest, base64.b64encode(signature).decode("ascii"))

    def head(self, seq: int, digest: str, at: datetime | None = None) -> SignedHead:
        """Sign record ``seq`` with hash ``digest`` as the head of the chain at ``at`` (now)."""
        time = format_time(at or datetime.now(UTC))
        signature = self._key.sign(_head_message(seq, digest, time))
        return SignedHead(seq, digest, time, base64.b64encode(signature).decode("ascii"))


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    checkpoints: int
    first_bad_seq: int | None = None
    problem: str | None = None
    head_seq: int | None = None  # the last record the head file names
    anchored_from: int | None = None  # where the head file began (None: no head file yet)
    unchecked_times: int = 0  # records from before the body carried its recording time
    against: int | None = None  # the newest record an exported head named


def _signed(public: Ed25519PublicKey, cp: Checkpoint) -> bool:
    try:
        public.verify(base64.b64decode(cp.signature), _checkpoint_message(cp.seq, cp.hash))
    except (InvalidSignature, ValueError):
        return False
    return True


class _Tampered(Exception):
    def __init__(self, seq: int | None, problem: str) -> None:
        super().__init__(problem)
        self.seq = seq
        self.problem = problem


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _keys_differ(expected: list[tuple[str, str]], actual: list[tuple[str, str]]) -> str:
    """What is wrong with a record's search keys, by kind only (the values are patient data)."""
    missing, extra = list(expected), []
    for key in actual:
        if key in missing:
            missing.remove(key)
        else:
            extra.append(key)
    parts = [f"a {kind} key is missing" for kind in dict.fromkeys(k for k, _ in missing)]
    parts += [f"a {kind} key was added" for kind in dict.fromkeys(k for k, _ in extra)]
    return ", ".join(parts)


class _Heads:
    """The lines of the head file, consumed in order of the records they name."""

    def __init__(self, lines: Iterable[HeadLine], public: Ed25519PublicKey) -> None:
        self._lines = iter(lines)
        self._public = public
        self._next: HeadLine | None = None
        self.first: HeadLine | None = None
        self.last: SignedHead | None = None

    def peek(self) -> SignedHead | None:
        if self._next is None:
            line = next(self._lines, None)
            if line is None:
                return None
            if line.head is None:
                raise _Tampered(None, f"line {line.number} of the signed head file cannot be read (edited)")
            if not line.head.signed_by(self._public):
                raise _Tampered(
                    line.head.seq, f"line {line.number} of the signed head file has a bad signature (edited)"
                )
            if self.last is not None and line.head.seq <= self.last.seq:
                raise _Tampered(
                    line.head.seq,
                    f"line {line.number} of the signed head file names record {line.head.seq} after "
                    f"record {self.last.seq} (edited)",
                )
            self._next = line
            if self.first is None:
                self.first = line
        return self._next.head

    def take(self) -> tuple[int, SignedHead]:
        line = self._next
        assert line is not None and line.head is not None
        self._next, self.last = None, line.head
        return line.number, line.head


def _refs_by_seq(refs: Iterable[tuple[int, str, str]]) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """``audit_refs`` rows ordered by seq, grouped: (seq, [(kind, value), ...])."""
    seq: int | None = None
    group: list[tuple[str, str]] = []
    for s, kind, value in refs:
        if s != seq:
            if seq is not None:
                yield seq, group
            seq, group = s, []
        group.append((kind, value))
    if seq is not None:
        yield seq, group


def verify_chain(
    records: Iterable[StoredRecord],
    checkpoints: Iterable[Checkpoint],
    public: Ed25519PublicKey,
    *,
    refs: Iterable[tuple[int, str, str]] | None = None,
    heads: Iterable[HeadLine] | None = None,
    against: Sequence[SignedHead] = (),
    holdings: int = 0,
    now: datetime | None = None,
) -> Verification:
    """Check every link, checkpoint and signed head; name the first record where the trail was changed.

    ``records`` in order of seq; ``AuditRow`` records also have their columns checked against their
    bodies, and ``refs`` (``audit_refs`` rows ordered by seq) against the search keys derived from
    them.  ``heads``: the lines of the head file, None when there is none.  ``against``: heads
    exported earlier, each of which the trail must still hold.  ``holdings``: instances the archive
    holds (an empty trail then means a deleted one).
    """
    try:
        walk = _Walk(checkpoints, public, refs, heads, against, now or datetime.now(UTC))
    except _Tampered as exc:
        return Verification(False, 0, 0, exc.seq, exc.problem)
    try:
        walk.run(records)
        walk.finish(holdings)
    except _Tampered as exc:
        return Verification(False, walk.count, 0, exc.seq, exc.problem)
    return Verification(
        True,
        walk.count,
        len(walk.checkpoints),
        head_seq=walk.heads.last.seq if walk.heads is not None and walk.heads.last else None,
        anchored_from=walk.anchor,
        unchecked_times=walk.unchecked_times,
        against=max((h.seq for h in against), default=None),
    )


class _Walk:
    def __init__(
        self,
        checkpoints: Iterable[Checkpoint],
        public: Ed25519PublicKey,
        refs: Iterable[tuple[int, str, str]] | None,
        heads: Iterable[HeadLine] | None,
        against: Sequence[SignedHead],
        now: datetime,
    ) -> None:
        self.checkpoints = {cp.seq: cp for cp in checkpoints}
        self.public = public
        self.refs = None if refs is None else _refs_by_seq(refs)
        self.pending_refs: tuple[int, list[tuple[str, str]]] | None = None
        self.heads = None if heads is None else _Heads(heads, public)
        for head in against:
            if not head.signed_by(public):
                raise _Tampered(head.seq, f"the exported head of record {head.seq} has a bad signature")
        self.against = sorted(against, key=lambda h: h.seq)
        self.now = now
        self.count = 0
        self.last_hash = GENESIS
        self.anchor: int | None = None
        self.unchecked_times = 0
        self.times_since: int | None = None  # the first record whose body carries its recording time
        # The records after the last one a signed head named: the first, and the oldest recording time
        # among them (None: one of them does not carry its recording time).
        self.tail: tuple[int, datetime | None] | None = None

    # Per record ----------------------------------------------------------------------------------
    def run(self, records: Iterable[StoredRecord]) -> None:
        prev, expected = GENESIS, 1
        for rec in records:
            if rec.seq != expected:
                if rec.seq > expected:
                    raise _Tampered(expected, f"record {expected} is missing (deleted)")
                raise _Tampered(rec.seq, f"record {rec.seq} is out of order")
            if rec.prev_hash != prev:
                raise _Tampered(
                    rec.seq, f"record {rec.seq} does not follow record {rec.seq - 1} (inserted or reordered)"
                )
            if chain_hash(prev, rec.seq, rec.body) != rec.hash:
                raise _Tampered(rec.seq, f"record {rec.seq} was edited (its hash does not match)")
            recorded = self._columns(rec) if isinstance(rec, AuditRow) else None
            cp = self.checkpoints.get(rec.seq)
            if cp is not None and (cp.hash != rec.hash or not _signed(self.public, cp)):
                raise _Tampered(rec.seq, f"the signed checkpoint at record {rec.seq} does not match")
            self._anchored(rec, recorded)
            prev, expected, self.count, self.last_hash = rec.hash, expected + 1, self.count + 1, rec.hash

    def _columns(self, rec: AuditRow) -> datetime | None:
        """Check what a search uses against the hashed body; the recording time the body carries."""
        try:
            event, recorded = recorded_time(rec.body)
        except (ValueError, KeyError, TypeError, IndexError):
            raise _Tampered(rec.seq, f"record {rec.seq} cannot be read as an audit event") from None
        if rec.event_id != event.event_id.code:
            raise _Tampered(rec.seq, f"record {rec.seq}'s event_id column does not match its body")
        if rec.outcome != int(event.outcome):
            raise _Tampered(rec.seq, f"record {rec.seq}'s outcome column does not match its body")
        if recorded is not None:
            if format_time(_aware(rec.recorded_at)) != recorded:
                raise _Tampered(rec.seq, f"record {rec.seq}'s recorded_at column does not match its body")
            if self.times_since is None:
                self.times_since = rec.seq
        elif self.times_since is not None:
            raise _Tampered(
                rec.seq,
                f"record {rec.seq} lacks the recording time that every record since {self.times_since} "
                "carries (replaced)",
            )
        else:
            self.unchecked_times += 1
        if self.refs is not None:
            expected = sorted(search_keys(event))
            actual = self._refs_of(rec.seq)
            if sorted(actual) != expected:
                raise _Tampered(
                    rec.seq,
                    f"record {rec.seq}'s search keys (audit_refs) do not match its body: "
                    + _keys_differ(expected, actual),
                )
        return None if recorded is None else _aware(rec.recorded_at)

    def _refs_of(self, seq: int) -> list[tuple[str, str]]:
        assert self.refs is not None
        while True:
            if self.pending_refs is None:
                self.pending_refs = next(self.refs, None)
                if self.pending_refs is None:
                    return []
            ref_seq, group = self.pending_refs
            if ref_seq > seq:
                return []
            self.pending_refs = None
            if ref_seq < seq:
                raise _Tampered(ref_seq, f"audit_refs names record {ref_seq}, which is not in the trail")
            keys = [k for k in group if k[0] != ANCHOR_KIND]
            if len(keys) != len(group):
                if self.anchor is not None or len(group) - len(keys) > 1:
                    raise _Tampered(seq, f"record {seq} is marked a second time as where the head file began")
                self.anchor = seq
            return keys

    def _anchored(self, rec: StoredRecord, recorded: datetime | None) -> None:
        """Compare the record with the signed heads naming it; remember it if none names it yet."""
        named = False
        if self.heads is not None:
            head = self.heads.peek()
            while head is not None and head.seq <= rec.seq:
                number, head = self.heads.take()
                if head.seq == rec.seq:
                    if head.hash != rec.hash:
                        raise _Tampered(
                            rec.seq,
                            f"record {rec.seq} is not the one the signed head file names at line {number} "
                            "(rewritten, or cut off and appended to again)",
                        )
                    named = True
                head = self.heads.peek()
        while self.against and self.against[0].seq <= rec.seq:
            head = self.against.pop(0)
            if head.hash != rec.hash:
                raise _Tampered(
                    rec.seq,
                    f"record {rec.seq} is not the one the head exported at {head.time} names "
                    "(rewritten, or cut off and appended to again)",
                )
        if named:
            self.tail = None
        elif self.tail is None:
            self.tail = (rec.seq, recorded)
        elif self.tail[1] is not None:
            self.tail = (self.tail[0], None if recorded is None else min(self.tail[1], recorded))

    # After the last record -----------------------------------------------------------------------
    def finish(self, holdings: int) -> None:
        end = self.count
        if self.refs is not None:
            if self.pending_refs is None:
                self.pending_refs = next(self.refs, None)
            if self.pending_refs is not None:
                seq = self.pending_refs[0]
                raise _Tampered(seq, f"audit_refs names record {seq}, which is not in the trail")
        gone = "the trail is empty" if end == 0 else f"the trail ends at record {end}"
        last: SignedHead | None = None
        while self.heads is not None and (head := self.heads.peek()) is not None:
            self.heads.take()
            last = head
        if last is not None:
            raise _Tampered(
                end + 1,
                f"{gone} but the signed head file names record {last.seq} (signed {last.time}): "
                f"records {end + 1}-{last.seq} are missing (truncated)",
            )
        if self.against:
            last = self.against[-1]
            raise _Tampered(
                end + 1,
                f"{gone} but the head exported at {last.time} names record {last.seq}: "
                f"records {end + 1}-{last.seq} are missing (truncated)",
            )
        past = sorted(s for s in self.checkpoints if s > end)
        if past:
            raise _Tampered(
                end + 1,
                f"{gone} but a checkpoint names record {past[-1]}: records {end + 1}-{past[-1]} "
                "are missing (truncated)",
            )
        for cp in self.checkpoints.values():
            if not _signed(self.public, cp):
                raise _Tampered(cp.seq, f"the checkpoint at record {cp.seq} has a bad signature")
        if end == 0 and holdings:
            raise _Tampered(
                1, f"the trail is empty but the archive holds {holdings} instances: its records were deleted"
            )
        self._head_file(end)

    def _head_file(self, end: int) -> None:
        """Where the head file began, and the records no signed head names yet."""
        if self.refs is None:  # where the head file began is not known
            return
        first = self.heads.first if self.heads is not None else None
        if self.anchor is not None and first is None:
            state = "missing" if self.heads is None else "empty"
            raise _Tampered(
                self.anchor,
                f"record {self.anchor} started the signed head file, which is {state} (deleted or replaced)",
            )
        if first is not None and first.head is not None and first.head.seq != self.anchor:
            began = (
                "no record says it began" if self.anchor is None else f"record {self.anchor} says it began"
            )
            raise _Tampered(
                first.head.seq,
                f"the signed head file begins at record {first.head.seq} but {began} there (replaced)",
            )
        if self.anchor is None and self.times_since is not None:
            raise _Tampered(
                self.times_since,
                f"records since {self.times_since} were made with a signed head file, but there is none "
                "and no record says where it began (deleted)",
            )
        if self.anchor is None or self.tail is None:
            return
        seq, oldest = self.tail
        if oldest is None or not self.now - UNANCHORED_GRACE <= oldest <= self.now + UNANCHORED_GRACE:
            raise _Tampered(
                seq,
                f"records {seq}-{end} are not named by the signed head file (added to the index "
                "directly, or SafePACS stopped before it could sign them)",
            )
