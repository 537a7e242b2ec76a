"""The hash chain and its signed checkpoints, and their verification (pure functions, no I/O).

Record ``n`` stores ``hash_n = SHA-256(hash_{n-1} "\\n" n "\\n" body_n)`` with ``hash_0`` = 64 zeros,
so editing, deleting, inserting or reordering a record breaks every later link.  Every
``CHECKPOINT_EVERY`` records (and at application start and stop) the archive signs
``(n, hash_n)`` with its Ed25519 audit key: a rewritten chain would need that key, and a trail cut
short past a checkpoint is noticed because the checkpoint names a record that is gone.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "CHECKPOINT_EVERY",
    "GENESIS",
    "Checkpoint",
    "Signer",
    "StoredRecord",
    "Verification",
    "chain_hash",
    "verify_chain",
]

GENESIS = "0" * 64
CHECKPOINT_EVERY = 100
KEY_FILE = "audit-ed25519.pem"


def chain_hash(prev: str, seq: int, body: str) -> str:
    return hashlib.sha256(f"{prev}\n{seq}\n{body}".encode()).hexdigest()


def _checkpoint_message(seq: int, digest: str) -> bytes:
    return f"safepacs-audit-checkpoint\n{seq}\n{digest}".encode()


@dataclass(frozen=True)
class StoredRecord:
    seq: int
    body: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    signature: str  # base64 of the Ed25519 signature


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


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    checkpoints: int
    first_bad_seq: int | None = None
    problem: str | None = None


def _signed(public: Ed25519PublicKey, cp: Checkpoint) -> bool:
    try:
        public.verify(base64.b64decode(cp.signature), _checkpoint_message(cp.seq, cp.hash))
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_chain(
    records: Iterable[StoredRecord], checkpoints: Iterable[Checkpoint], public: Ed25519PublicKey
) -> Verification:
    """Check every link and every checkpoint; name the first record where the trail was changed."""
    by_seq = {cp.seq: cp for cp in checkpoints}
    prev, expected, count = GENESIS, 1, 0
    for rec in records:
        if rec.seq != expected:
            if rec.seq > expected:
                return Verification(False, count, 0, expected, f"record {expected} is missing (deleted)")
            return Verification(False, count, 0, rec.seq, f"record {rec.seq} is out of order")
        if rec.prev_hash != prev:
            return Verification(
                False,
                count,
                0,
                rec.seq,
                f"record {rec.seq} does not follow record {rec.seq - 1} (inserted or reordered)",
            )
        if chain_hash(prev, rec.seq, rec.body) != rec.hash:
            return Verification(
                False, count, 0, rec.seq, f"record {rec.seq} was edited (its hash does not match)"
            )
        cp = by_seq.get(rec.seq)
        if cp is not None and (cp.hash != rec.hash or not _signed(public, cp)):
            return Verification(
                False, count, 0, rec.seq, f"the signed checkpoint at record {rec.seq} does not match"
            )
        prev, expected, count = rec.hash, expected + 1, count + 1
    past = sorted(s for s in by_seq if s >= expected)
    if past:
        return Verification(
            False,
            count,
            0,
            expected,
            f"the trail ends at record {expected - 1} but a checkpoint names record {past[-1]} (truncated)",
        )
    for cp in by_seq.values():
        if not _signed(public, cp):
            return Verification(
                False, count, 0, cp.seq, f"the checkpoint at record {cp.seq} has a bad signature"
            )
    return Verification(True, count, len(by_seq))
