"""Encryption at rest: envelope encryption with AES-256-GCM and RFC 3394 key wrap.

Every object gets its own random 256-bit data key.  The payload is encrypted with
AES-256-GCM (NIST SP 800-38D) under that key and a random 96-bit nonce; the data key
itself is wrapped with a key-encryption key (KEK) using the AES Key Wrap of RFC 3394
(NIST SP 800-38F "KW").  The KEK id travels with the object, so several KEKs can be
in use at once and rotating the KEK only re-wraps data keys (:meth:`EnvelopeCipher.rewrap`),
it never touches the ciphertext.

Sealed format (``docs/architecture.md``, "Storage format")::

    offset  size  field
    0       4     magic b"SPX1"
    4       1     key id length (always 16)
    5       16    key id, ASCII [0-9a-f]
    21      2     wrapped data key length, big endian (always 40: RFC 3394 of a 32-byte key)
    23      40    wrapped data key
    63      12    GCM nonce (SP 800-38D 8.2.2, random; each data key encrypts exactly one message)
    75      n     ciphertext
    75+n    16    GCM authentication tag (128 bits, SP 800-38D 5.2.1.2)

Integrity of each part:

* payload and tag: GCM authentication under the data key;
* magic (the format version): GCM associated data;
* key id and wrapped data key: the RFC 3394 integrity check (2.2.3), which fails when
  the wrapped key is altered or unwrapped with another KEK; a wrapped key taken from
  another object yields another data key and the GCM tag fails.

The key id and wrapped key are deliberately *not* in the GCM associated data: they change
when the KEK is rotated, and binding them would force re-encrypting (or re-tagging under
the same nonce, which SP 800-38D forbids) every object on rotation.

Parsing is defensive: every length is checked against the one value it may have before
it is used, and key ids must match ``[0-9a-f]{16}`` (they name files).
"""

from __future__ import annotations

import errno
import hmac
import os
import re
import secrets
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeGuard, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from safepacs.errors import IntegrityError, KeyMaterialError
from safepacs.storage.blobstore import _ensure_dir, _fsync_dir

__all__ = [
    "KEK_BYTES",
    "MAGIC",
    "EnvelopeCipher",
    "FileKeyProvider",
    "KeyProvider",
    "MemoryKeyProvider",
    "is_valid_key_id",
]

MAGIC = b"SPX1"
KEK_BYTES = 32  # AES-256 key-encryption key
_DATA_KEY_BYTES = 32  # AES-256 data key
_KEY_ID_LEN = 16
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_WRAPPED_LEN = _DATA_KEY_BYTES + 8  # RFC 3394 2.2.1: n+1 64-bit blocks
_NONCE_BYTES = 12  # SP 800-38D 5.2.1.1: 96-bit IVs are the recommended length
_TAG_BYTES = 16  # SP 800-38D 5.2.1.2: full 128-bit tag
_AAD = MAGIC
_HEADER_LEN = len(MAGIC) + 1 + _KEY_ID_LEN + 2 + _WRAPPED_LEN
_MIN_SEALED = _HEADER_LEN + _NONCE_BYTES + _TAG_BYTES

_CURRENT_FILE = "current-kek"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def is_valid_key_id(key_id: object) -> TypeGuard[str]:
    """Whether ``key_id`` has the shape of a KEK id (16 lowercase hex digits)."""
    return isinstance(key_id, str) and _KEY_ID_RE.fullmatch(key_id) is not None


def _new_key_id() -> str:
    return secrets.token_hex(_KEY_ID_LEN // 2)


# --------------------------------------------------------------------------------------
# Key providers
# --------------------------------------------------------------------------------------


@runtime_checkable
class KeyProvider(Protocol):
    """Source of key-encryption keys (KEKs), each named by a key id."""

    def current_key_id(self) -> str:
        """The id of the KEK new objects are sealed with."""
        ...

    def get_key(self, key_id: str) -> bytes:
        """The 32-byte KEK named ``key_id``; :class:`KeyMaterialError` if there is none."""
        ...


class MemoryKeyProvider:
    """A :class:`KeyProvider` in memory, for tests.  Starts with one random KEK unless given keys."""

    def __init__(self, keys: Mapping[str, bytes] | None = None, current: str | None = None) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, bytes] = {}
        if keys:
            for key_id, key in keys.items():
                if not is_valid_key_id(key_id) or len(key) != KEK_BYTES:
                    raise KeyMaterialError("a test key must have a 16-hex-digit id and 32 bytes")
                self._keys[key_id] = bytes(key)
            self._current = current if current is not None else next(iter(self._keys))
            if self._current not in self._keys:
                raise KeyMaterialError("the current key id names none of the given keys")
        else:
            self._current = _new_key_id()
            self._keys[self._current] = secrets.token_bytes(KEK_BYTES)

    def current_key_id(self) -> str:
        with self._lock:
            return self._current

    def get_key(self, key_id: str) -> bytes:
        with self._lock:
            try:
                return self._keys[key_id]
            except (KeyError, TypeError):
                raise KeyMaterialError("unknown key-encryption key id") from None

    def rotate(self) -> str:
        """Add a new random KEK, make it current, return its id."""
        with self._lock:
            key_id = _new_key_id()
            while key_id in self._keys:  # pragma: no cover - 2**-64
                key_id = _new_key_id()
            self._keys[key_id] = secrets.token_bytes(KEK_BYTES)
            self._current = key_id
            return key_id

    def forget(self, key_id: str) -> None:
        """Drop a KEK (tests of the "key lost" path)."""
        with self._lock:
            self._keys.pop(key_id, None)


class FileKeyProvider:
    """KEKs as files: ``keys_dir/kek-<id>.key`` (32 random bytes, mode 0600).

    ``keys_dir/current-kek`` holds the id of the current (newest) KEK as text.  It is
    read on every :meth:`current_key_id` call, so a rotation done by another process
    (``safepacs keys rotate``) takes effect without a restart.  KEKs are cached once
    loaded.  A key file that group or others may access is refused.

    The constructor checks at once that the current KEK loads, so a broken key
    directory fails at start-up rather than on the first C-STORE.
    """

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = Path(keys_dir)
        self._lock = threading.Lock()
        self._cache: dict[str, bytes] = {}
        self._current_cache: tuple[tuple[int, int, int], str] | None = None
        if not self.keys_dir.is_dir():
            raise KeyMaterialError(
                f"the key directory {self.keys_dir} does not exist; "
                "run `safepacs init` or restore it from backup"
            )
        self.get_key(self.current_key_id())

    # -- creation and rotation ----------------------------------------------------------
    @staticmethod
    def create(keys_dir: Path) -> FileKeyProvider:
        """Create ``keys_dir`` (0700) if needed and generate its first KEK.

        Refuses (:class:`KeyMaterialError`) when the directory already holds a KEK or a
        ``current-kek`` file: existing keys are never overwritten.
        """
        keys_dir = Path(keys_dir)
        try:
            _ensure_dir(keys_dir, fsync=True)
        except OSError as exc:
            raise KeyMaterialError(f"cannot create the key directory {keys_dir}: {exc.strerror}") from exc
        if (keys_dir / _CURRENT_FILE).exists() or any(keys_dir.glob("kek-*.key")):
            raise KeyMaterialError(
                f"{keys_dir} already holds a key-encryption key; refusing to replace it "
                "(use key rotation to add a new one)"
            )
        key_id = _write_new_kek(keys_dir)
        _write_current(keys_dir, key_id)
        return FileKeyProvider(keys_dir)

    def rotate(self) -> str:
        """Add a new KEK, make it current, return its id.  Old KEKs stay for reading."""
        with self._lock:
            key_id = _write_new_kek(self.keys_dir)
            _write_current(self.keys_dir, key_id)
            return key_id

    def key_ids(self) -> list[str]:
        """Ids of every KEK file in the directory, sorted."""
        ids = []
        for path in self.keys_dir.glob("kek-*.key"):
            candidate = path.name[len("kek-") : -len(".key")]
            if is_valid_key_id(candidate):
                ids.append(candidate)
        return sorted(ids)

    # -- KeyProvider ----------------------------------------------------------------------
    def current_key_id(self) -> str:
        """The id in ``current-kek``, re-read whenever the file changes (a rotation by another process).

        A ``stat`` per seal instead of an open and read: this sits on the ingest hot path.
        """
        path = self.keys_dir / _CURRENT_FILE
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise KeyMaterialError(
                f"{path} is missing; it names the current key-encryption key (restore it from backup)"
            ) from None
        except OSError as exc:
            raise KeyMaterialError(f"cannot read {path}: {exc.strerror}") from exc
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        with self._lock:
            if self._current_cache is not None and self._current_cache[0] == stamp:
                return self._current_cache[1]
        try:
            with open(path, "rb") as handle:
                raw = handle.read(64)
        except OSError as exc:
            raise KeyMaterialError(f"cannot read {path}: {exc.strerror}") from exc
        key_id = raw.strip().decode("ascii", errors="replace")
        if not is_valid_key_id(key_id):
            raise KeyMaterialError(f"{path} does not hold a key id (16 lowercase hex digits)")
        with self._lock:
            self._current_cache = (stamp, key_id)
        return key_id

    def get_key(self, key_id: str) -> bytes:
        if not is_valid_key_id(key_id):
            raise KeyMaterialError("refused a malformed key id (must be 16 lowercase hex digits)")
        with self._lock:
            cached = self._cache.get(key_id)
            if cached is not None:
                return cached
            key = _load_kek(self.keys_dir / f"kek-{key_id}.key")
            self._cache[key_id] = key
            return key


def _load_kek(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        raise KeyMaterialError(
            f"the key-encryption key file {path} is missing; restore it from backup "
            "(objects sealed with it cannot be read without it)"
        ) from None
    except OSError as exc:
        raise KeyMaterialError(f"cannot open the key file {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyMaterialError(f"the key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyMaterialError(
                f"the key file {path} is accessible to group or others; "
                f"run `chmod 600 {path}` (and consider the key exposed)"
            )
        data = os.read(fd, KEK_BYTES + 1)
    except OSError as exc:
        raise KeyMaterialError(f"cannot read the key file {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) != KEK_BYTES:
        raise KeyMaterialError(
            f"the key file {path} does not hold a {KEK_BYTES}-byte key; restore it from backup"
        )
    return data


def _write_new_kek(keys_dir: Path) -> str:
    """Write a fresh random KEK under a fresh id (0600 from creation, fsynced) and return the id."""
    for _ in range(100):
        key_id = _new_key_id()
        path = keys_dir / f"kek-{key_id}.key"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        except FileExistsError:  # pragma: no cover - 2**-64
            continue
        except OSError as exc:
            raise KeyMaterialError(f"cannot create a key file in {keys_dir}: {exc.strerror}") from exc
        try:
            try:
                if os.write(fd, secrets.token_bytes(KEK_BYTES)) != KEK_BYTES:  # pragma: no cover
                    raise OSError(errno.EIO, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(keys_dir)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise KeyMaterialError(f"cannot write the key file {path}: {exc.strerror}") from exc
        return key_id
    raise KeyMaterialError("could not find a free key id")  # pragma: no cover


def _write_current(keys_dir: Path, key_id: str) -> None:
    """Atomically point ``current-kek`` at ``key_id`` (temp file, fsync, rename, fsync dir)."""
    target = keys_dir / _CURRENT_FILE
    tmp = keys_dir / f".{_CURRENT_FILE}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{key_id}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(keys_dir)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise KeyMaterialError(f"cannot update {target}: {exc.strerror}") from exc


# --------------------------------------------------------------------------------------
# Envelope cipher
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    key_id: str
    wrapped: bytes
    body_offset: int  # where the nonce starts


def _parse(sealed: bytes | memoryview) -> _Parsed:
    view = memoryview(sealed)
    if len(view) < len(MAGIC) or bytes(view[: len(MAGIC)]) != MAGIC:
        raise IntegrityError("stored object is not in the SafePACS sealed format (bad magic)")
    if len(view) < _MIN_SEALED:
        raise IntegrityError("stored object is truncated")
    pos = len(MAGIC)
    if view[pos] != _KEY_ID_LEN:
        raise IntegrityError("stored object has a malformed header (key id length)")
    pos += 1
    raw_id = bytes(view[pos : pos + _KEY_ID_LEN])
    pos += _KEY_ID_LEN
    key_id = raw_id.decode("ascii", errors="replace")
    if not is_valid_key_id(key_id):
        raise IntegrityError("stored object has a malformed header (key id)")
    if int.from_bytes(view[pos : pos + 2], "big") != _WRAPPED_LEN:
        raise IntegrityError("stored object has a malformed header (wrapped key length)")
    pos += 2
    wrapped = bytes(view[pos : pos + _WRAPPED_LEN])
    pos += _WRAPPED_LEN
    return _Parsed(key_id=key_id, wrapped=wrapped, body_offset=pos)


def _header(key_id: str, wrapped: bytes) -> bytes:
    return b"".join(
        (MAGIC, bytes((_KEY_ID_LEN,)), key_id.encode("ascii"), _WRAPPED_LEN.to_bytes(2, "big"), wrapped)
    )


class EnvelopeCipher:
    """Seals and opens objects in the ``SPX1`` format (see the module docstring)."""

    def __init__(self, keys: KeyProvider) -> None:
        self._keys = keys

    def _kek(self, key_id: str) -> bytes:
        key = self._keys.get_key(key_id)
        if not isinstance(key, bytes) or len(key) != KEK_BYTES:
            raise KeyMaterialError(f"key-encryption key {key_id} is not a {KEK_BYTES}-byte AES-256 key")
        return key

    def _current(self) -> tuple[str, bytes]:
        key_id = self._keys.current_key_id()
        if not is_valid_key_id(key_id):
            raise KeyMaterialError("the current key id is malformed (must be 16 lowercase hex digits)")
        return key_id, self._kek(key_id)

    def _unwrap(self, parsed: _Parsed) -> bytes:
        kek = self._kek(parsed.key_id)
        try:
            return aes_key_unwrap(kek, parsed.wrapped)
        except InvalidUnwrap:
            # RFC 3394 2.2.3: the integrity check value did not match.
            raise IntegrityError(
                "stored object failed its key-wrap integrity check (altered, or sealed with another key)"
            ) from None

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` under a fresh data key wrapped with the current KEK.

        AES-256-GCM per NIST SP 800-38D with a random 96-bit nonce and a 128-bit tag;
        the data key is wrapped per RFC 3394.  Each data key encrypts exactly one
        message, so nonce reuse under a key cannot happen (SP 800-38D 8.2).
        """
        return self.seal_noting(plaintext)[0]

    def seal_noting(self, plaintext: bytes) -> tuple[bytes, str, str]:
        """:meth:`seal`, and the KEK id and GCM tag (hex) the index keeps with the object - what
        :meth:`key_id_of` and :meth:`tag_of` would read back from it, without parsing it again."""
        key_id, kek = self._current()
        fresh = secrets.token_bytes(_DATA_KEY_BYTES + _NONCE_BYTES)  # one getrandom call for both
        data_key, nonce = fresh[:_DATA_KEY_BYTES], fresh[_DATA_KEY_BYTES:]
        wrapped = aes_key_wrap(kek, data_key)
        # The streaming interface has no 2**31-byte limit (AESGCM.encrypt has one).
        encryptor = Cipher(algorithms.AES(data_key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(_AAD)
        ciphertext = encryptor.update(plaintext)
        final = encryptor.finalize()
        tag = encryptor.tag
        return b"".join((_header(key_id, wrapped), nonce, ciphertext, final, tag)), key_id, tag.hex()

    def open(self, sealed: bytes, *, expect_tag: str | None = None) -> bytes:
        """Decrypt and authenticate ``sealed``.

        :class:`IntegrityError` on any alteration, truncation or bad magic (the GCM tag,
        SP 800-38D 7.2, and the RFC 3394 integrity check); :class:`KeyMaterialError` when the
        KEK it names is unknown.  No plaintext is returned unless the tag verified.

        ``expect_tag`` (hex, :meth:`tag_of` at sealing time, kept elsewhere): the object must carry
        exactly that tag, so an intact object of another instance put in this one's place is refused
        too.  Together with the GCM check that binds the caller's record to these plaintext bytes
        as long as the data key is secret (checked before anything is decrypted).
        """
        parsed = _parse(sealed)
        view = memoryview(sealed)
        tag = bytes(view[len(view) - _TAG_BYTES :])
        if expect_tag is not None and not hmac.compare_digest(tag.hex(), expect_tag):
            raise IntegrityError("stored object is not the one its index record names (replaced or altered)")
        data_key = self._unwrap(parsed)
        nonce = bytes(view[parsed.body_offset : parsed.body_offset + _NONCE_BYTES])
        body = view[parsed.body_offset + _NONCE_BYTES : len(view) - _TAG_BYTES]
        decryptor = Cipher(algorithms.AES(data_key), modes.GCM(nonce, tag)).decryptor()
        decryptor.authenticate_additional_data(_AAD)
        plaintext = decryptor.update(body)
        try:
            decryptor.finalize()
        except InvalidTag:
            raise IntegrityError("stored object failed authentication (altered or truncated)") from None
        return plaintext

    @staticmethod
    def tag_of(sealed: bytes) -> str:
        """The GCM tag of ``sealed`` as hex (unchanged by :meth:`rewrap`); see ``open(expect_tag=)``."""
        _parse(sealed)
        return bytes(memoryview(sealed)[len(sealed) - _TAG_BYTES :]).hex()

    @staticmethod
    def key_id_of(sealed: bytes) -> str:
        """The id of the KEK ``sealed`` was wrapped with (header only; nothing is decrypted)."""
        return _parse(sealed).key_id

    def rewrap(self, sealed: bytes) -> bytes:
        """Re-wrap the data key under the current KEK; nonce, ciphertext and tag are unchanged.

        The old KEK must still be available.  Returns ``sealed`` itself when it already uses
        the current KEK.  The payload is not decrypted, so a damaged payload is not detected
        here (the data key's RFC 3394 integrity check is).
        """
        parsed = _parse(sealed)
        key_id, kek = self._current()
        if parsed.key_id == key_id:
            return bytes(sealed)
        data_key = self._unwrap(parsed)
        view = memoryview(sealed)
        return b"".join((_header(key_id, aes_key_wrap(kek, data_key)), view[parsed.body_offset :]))
