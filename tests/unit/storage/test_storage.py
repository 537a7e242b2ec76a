"""Encrypted object storage: blob stores, key providers, the envelope format."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safepacs.errors import IntegrityError, KeyMaterialError, NotFoundError, StorageError
from safepacs.storage import (
    BlobStore,
    EnvelopeCipher,
    FileBlobStore,
    FileKeyProvider,
    KeyProvider,
    MemoryBlobStore,
    MemoryKeyProvider,
    is_valid_blob_id,
)
from safepacs.storage.blobstore import _NoUnnamedFiles
from safepacs.storage.crypto import MAGIC

# Layout of the SPX1 header (docs/architecture.md, "Storage format").
KEY_ID = slice(5, 21)
WRAPPED = slice(23, 63)
BODY = 63  # nonce, ciphertext, tag
OVERHEAD = 63 + 12 + 16

BAD_IDS = [
    "",
    "..",
    "../../../etc/passwd",
    "ab/cd",
    "/" + "0" * 31,
    "0" * 15 + "/" + "0" * 16,
    "0" * 15 + "\\" + "0" * 16,
    "0" * 30 + "..",
    "0" * 31,
    "0" * 33,
    "0" * 32 + "\n",
    "0" * 32 + "\x00",
    "A" * 32,
    "g" * 32,
    " " + "0" * 31,
    "0" * 32 + "/../x",
    "\uff10" * 32,  # fullwidth digits: str.isdigit() would say yes
]


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Modes must come from the code, not from a friendly umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _files_under(path: Path) -> list[Path]:
    return [Path(d) / f for d, _, files in os.walk(path) for f in files]


# --------------------------------------------------------------------------------------
# Blob stores
# --------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "file", "file-nofsync"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "memory":
        return MemoryBlobStore()
    return FileBlobStore(tmp_path / "objects", tmp_path / "tmp", fsync=request.param == "file")


def test_store_implements_protocol(store: BlobStore) -> None:
    assert isinstance(store, BlobStore)


@pytest.mark.parametrize("payload", [b"", b"x", os.urandom(70_001)])
def test_blob_round_trip(store: BlobStore, payload: bytes) -> None:
    blob_id = store.put(payload)
    assert is_valid_blob_id(blob_id)
    assert store.exists(blob_id)
    assert store.get(blob_id) == payload
    store.delete(blob_id)
    assert not store.exists(blob_id)
    with pytest.raises(NotFoundError):
        store.get(blob_id)
    store.delete(blob_id)  # idempotent


def test_blob_ids_are_random_and_distinct(store: BlobStore) -> None:
    ids = {store.put(b"same bytes") for _ in range(50)}
    assert len(ids) == 50


def test_get_of_never_stored_id(store: BlobStore) -> None:
    with pytest.raises(NotFoundError):
        store.get("0" * 32)
    assert not store.exists("0" * 32)
    store.delete("0" * 32)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_malformed_blob_ids_are_refused(store: BlobStore, bad: str) -> None:
    assert not is_valid_blob_id(bad)
    with pytest.raises(StorageError):
        store.get(bad)
    with pytest.raises(StorageError):
        store.exists(bad)
    with pytest.raises(StorageError):
        store.delete(bad)


@pytest.mark.parametrize("bad", [None, b"0" * 32, 12345])
def test_non_string_blob_ids_are_refused(store: BlobStore, bad: Any) -> None:
    with pytest.raises(StorageError):
        store.get(bad)


def test_traversal_cannot_reach_outside_the_root(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    store = FileBlobStore(tmp_path / "objects", tmp_path / "tmp")
    for attempt in ["../../victim", "../victim", str(victim)]:
        with pytest.raises(StorageError):
            store.delete(attempt)
        with pytest.raises(StorageError):
            store.get(attempt)
    assert victim.read_bytes() == b"keep me"


def test_file_layout_and_modes(tmp_path: Path, umask_zero: None) -> None:
    root, tmp = tmp_path / "data" / "objects", tmp_path / "data" / "tmp"
    store = FileBlobStore(root, tmp)
    assert _mode(root) == 0o700
    assert _mode(tmp) == 0o700
    blob_id = store.put(b"sealed bytes")
    path = root / blob_id[:2] / blob_id
    assert store.path_of(blob_id) == path
    assert path.read_bytes() == b"sealed bytes"
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert _mode(path.parent.parent) == 0o700
    assert list(tmp.iterdir()) == []  # the temporary file was renamed, not copied


def test_existing_directories_are_used(tmp_path: Path) -> None:
    (tmp_path / "objects").mkdir()
    (tmp_path / "tmp").mkdir()
    store = FileBlobStore(tmp_path / "objects", tmp_path / "tmp")
    first = store.put(b"a")
    second = FileBlobStore(tmp_path / "objects", tmp_path / "tmp")
    assert second.get(first) == b"a"


def test_tmp_dir_on_another_file_system_is_refused(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to test with")
    other = shm / f"safepacs-test-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with pytest.raises(StorageError, match="same file system"):
            FileBlobStore(tmp_path / "objects", other)
    finally:
        if other.exists():
            other.rmdir()


class _DiskFullStore(FileBlobStore):
    """Writes half the bytes, then fails the way a full disk does."""

    def _write_all(self, fd: int, data: memoryview) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _RenameFailsStore(FileBlobStore):
    """The fan-out directory cannot be created (e.g. a read-only or full file system)."""

    def _make_parents(self, directory: Path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-temp-file"])
@pytest.mark.parametrize("broken", [_DiskFullStore, _RenameFailsStore])
def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, broken: type[FileBlobStore], unnamed: bool
) -> None:
    root, tmp = tmp_path / "objects", tmp_path / "tmp"
    store = broken(root, tmp, unnamed_temp_files=unnamed)
    with pytest.raises(StorageError) as info:
        store.put(os.urandom(10_000))
    assert isinstance(info.value.__cause__, OSError)
    assert _files_under(root) == []
    assert list(tmp.iterdir()) == []
    # The directories still work for a healthy writer.
    healthy = FileBlobStore(root, tmp)
    assert healthy.get(healthy.put(b"ok")) == b"ok"


def test_unwritable_tmp_dir_is_a_storage_error(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "objects", tmp_path / "tmp", unnamed_temp_files=False)
    (tmp_path / "tmp").rmdir()
    (tmp_path / "tmp").write_bytes(b"not a directory")
    with pytest.raises(StorageError, match="temporary file"):
        store.put(b"data")
    assert _files_under(tmp_path / "objects") == []


class _NoTmpfileStore(FileBlobStore):
    """A file system without O_TMPFILE: opening an unnamed file fails as Linux then fails it."""

    attempts = 0

    def _open_unnamed(self, dir_fd: int) -> int:
        self.attempts += 1
        raise _NoUnnamedFiles from OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def test_without_unnamed_temporary_files_objects_go_through_tmp_dir(tmp_path: Path) -> None:
    """Where the file system has no O_TMPFILE, the store says so once and writes through named
    temporary files (and still leaves none behind)."""
    store = _NoTmpfileStore(tmp_path / "objects", tmp_path / "tmp")
    ids = [store.put(f"object {n}".encode()) for n in range(3)]
    assert [store.get(i) for i in ids] == [b"object 0", b"object 1", b"object 2"]
    assert store.attempts == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def _resident_pages(path: Path) -> int:
    """How many pages of ``path`` are in the page cache (Linux ``mincore`` on a mapping of it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(address, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(v & 1 for v in vec)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("unnamed", [True, False])
def test_a_stored_object_does_not_stay_in_the_page_cache(tmp_path: Path, unnamed: bool) -> None:
    """Written once and synced, an object's pages are given back (the index and the objects being
    read keep the memory); reading it still works."""
    store = (FileBlobStore if unnamed else _NoTmpfileStore)(tmp_path / "objects", tmp_path / "tmp")
    payload = os.urandom(512 * 1024)
    blob_id = store.put(payload)
    assert _resident_pages(store.path_of(blob_id)) == 0
    assert store.get(blob_id) == payload
    # Without a sync (storage.fsync off) the pages are still dirty: they are left alone.
    unsynced = FileBlobStore(tmp_path / "objects2", tmp_path / "tmp2", fsync=False)
    kept = unsynced.put(payload)
    assert _resident_pages(unsynced.path_of(kept)) > 0


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-temp-file"])
def test_a_staged_object_has_no_name_until_committed_and_leaves_nothing_when_discarded(
    tmp_path: Path, unnamed: bool
) -> None:
    """Ingest stages an object before it has parsed the data set (the disk starts writing it) and
    commits it only once the data set is accepted."""
    root, tmp = tmp_path / "objects", tmp_path / "tmp"
    store = FileBlobStore(root, tmp, unnamed_temp_files=unnamed)
    refused = store.stage(b"refused")
    accepted = store.stage(b"accepted")
    assert _files_under(root) == []
    refused.discard()
    refused.discard()  # twice: nothing happens
    blob_id = accepted.commit()
    accepted.discard()  # after the commit: nothing happens either
    assert _files_under(root) == [store.path_of(blob_id)]
    assert store.get(blob_id) == b"accepted"
    assert list(tmp.iterdir()) == []


def test_an_object_is_never_visible_half_written(tmp_path: Path) -> None:
    """With O_TMPFILE the bytes are written to an unnamed file in the object's own directory: while a
    put writes, no name exists, in that directory or in tmp_dir."""
    seen: list[list[Path]] = []

    class Watching(FileBlobStore):
        def _write_all(self, fd: int, data: memoryview) -> None:
            seen.append(_files_under(tmp_path))
            super()._write_all(fd, data)

    store = Watching(tmp_path / "objects", tmp_path / "tmp")
    first = store.put(b"first")
    store.put(b"second")
    assert seen == [[], [store.path_of(first)]]


def test_symlink_in_place_of_a_blob_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for you")
    store = FileBlobStore(tmp_path / "objects", tmp_path / "tmp")
    blob_id = store.put(b"x")
    path = store.path_of(blob_id)
    path.unlink()
    path.symlink_to(secret)
    with pytest.raises(StorageError):
        store.get(blob_id)
    assert not store.exists(blob_id)


def test_memory_store_counts() -> None:
    store = MemoryBlobStore()
    blob_id = store.put(bytearray(b"abc"))  # type: ignore[arg-type]  # bytes-like input is copied
    assert store.get(blob_id) == b"abc"
    assert isinstance(store.get(blob_id), bytes)
    assert len(store) == 1


# --------------------------------------------------------------------------------------
# Key providers
# --------------------------------------------------------------------------------------


def test_file_key_provider_create(tmp_path: Path, umask_zero: None) -> None:
    keys_dir = tmp_path / "keys"
    provider = FileKeyProvider.create(keys_dir)
    assert isinstance(provider, KeyProvider)
    key_id = provider.current_key_id()
    key_file = keys_dir / f"kek-{key_id}.key"
    assert _mode(keys_dir) == 0o700
    assert _mode(key_file) == 0o600
    assert len(key_file.read_bytes()) == 32
    assert provider.get_key(key_id) == key_file.read_bytes()
    assert (keys_dir / "current-kek").read_text().strip() == key_id
    assert provider.key_ids() == [key_id]
    assert [p.name for p in keys_dir.iterdir() if p.name.startswith(".")] == []


def test_file_key_provider_refuses_to_create_twice(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    provider = FileKeyProvider.create(keys_dir)
    before = provider.get_key(provider.current_key_id())
    with pytest.raises(KeyMaterialError, match="already holds"):
        FileKeyProvider.create(keys_dir)
    assert FileKeyProvider(keys_dir).get_key(provider.current_key_id()) == before


def test_file_key_provider_rotate(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    provider = FileKeyProvider.create(keys_dir)
    first = provider.current_key_id()
    second = provider.rotate()
    assert second != first
    assert provider.current_key_id() == second
    assert FileKeyProvider(keys_dir).current_key_id() == second  # seen by another process
    assert provider.key_ids() == sorted([first, second])
    assert provider.get_key(first) != provider.get_key(second)
    assert _mode(keys_dir / f"kek-{second}.key") == 0o600


def test_running_provider_sees_a_rotation_by_another_process(tmp_path: Path) -> None:
    """A serving worker caches the current key id; a rotation elsewhere must still take effect."""
    keys_dir = tmp_path / "keys"
    worker = FileKeyProvider.create(keys_dir)
    first = worker.current_key_id()
    assert worker.current_key_id() == first  # cached now
    second = FileKeyProvider(keys_dir).rotate()  # e.g. an administrator's command
    assert worker.current_key_id() == second
    assert EnvelopeCipher.key_id_of(EnvelopeCipher(worker).seal(b"x")) == second


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620, 0o644])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    keys_dir = tmp_path / "keys"
    key_id = FileKeyProvider.create(keys_dir).current_key_id()
    key_file = keys_dir / f"kek-{key_id}.key"
    key_file.chmod(mode)
    with pytest.raises(KeyMaterialError) as info:
        FileKeyProvider(keys_dir)
    assert str(key_file) in str(info.value)
    assert "chmod 600" in str(info.value)
    key_file.chmod(0o600)
    assert FileKeyProvider(keys_dir).current_key_id() == key_id


def test_key_file_of_wrong_size_is_refused(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    key_id = FileKeyProvider.create(keys_dir).current_key_id()
    (keys_dir / f"kek-{key_id}.key").write_bytes(b"short")
    with pytest.raises(KeyMaterialError, match="32-byte"):
        FileKeyProvider(keys_dir)


def test_key_file_symlink_is_refused(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    key_id = FileKeyProvider.create(keys_dir).current_key_id()
    key_file = keys_dir / f"kek-{key_id}.key"
    elsewhere = tmp_path / "elsewhere.key"
    key_file.rename(elsewhere)
    key_file.symlink_to(elsewhere)
    with pytest.raises(KeyMaterialError):
        FileKeyProvider(keys_dir)


def test_missing_key_material(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="does not exist"):
        FileKeyProvider(tmp_path / "nowhere")
    keys_dir = tmp_path / "keys"
    provider = FileKeyProvider.create(keys_dir)
    with pytest.raises(KeyMaterialError, match="missing"):
        provider.get_key("0123456789abcdef")
    (keys_dir / "current-kek").write_text("../../etc/passwd\n")
    with pytest.raises(KeyMaterialError, match="does not hold a key id"):
        provider.current_key_id()
    (keys_dir / "current-kek").unlink()
    with pytest.raises(KeyMaterialError, match="current-kek"):
        FileKeyProvider(keys_dir)


@pytest.mark.parametrize("bad", ["../kek", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef\n", ""])
def test_malformed_key_ids_are_refused(tmp_path: Path, bad: str) -> None:
    provider = FileKeyProvider.create(tmp_path / "keys")
    with pytest.raises(KeyMaterialError, match="malformed"):
        provider.get_key(bad)
    with pytest.raises(KeyMaterialError):
        MemoryKeyProvider().get_key(bad)


# --------------------------------------------------------------------------------------
# Envelope cipher
# --------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "file"])
def keys(request: pytest.FixtureRequest, tmp_path: Path) -> KeyProvider:
    if request.param == "memory":
        return MemoryKeyProvider()
    return FileKeyProvider.create(tmp_path / "keys")


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 1 << 20])
def test_seal_open_round_trip(keys: KeyProvider, size: int) -> None:
    cipher = EnvelopeCipher(keys)
    plaintext = os.urandom(size)
    sealed = cipher.seal(plaintext)
    assert sealed.startswith(MAGIC)
    assert len(sealed) == size + OVERHEAD
    assert EnvelopeCipher.key_id_of(sealed) == keys.current_key_id()
    assert sealed[KEY_ID].decode() == keys.current_key_id()
    assert int.from_bytes(sealed[21:23], "big") == 40
    assert cipher.open(sealed) == plaintext
    if size >= 16:
        assert plaintext not in sealed


_PROPERTY_KEYS = MemoryKeyProvider()


@given(st.binary(max_size=4096))
@settings(max_examples=50, deadline=None)
def test_seal_open_property(plaintext: bytes) -> None:
    cipher = EnvelopeCipher(_PROPERTY_KEYS)
    assert cipher.open(cipher.seal(plaintext)) == plaintext


def test_each_seal_uses_a_fresh_data_key_and_nonce() -> None:
    cipher = EnvelopeCipher(MemoryKeyProvider())
    first, second = cipher.seal(b"same"), cipher.seal(b"same")
    assert first[WRAPPED] != second[WRAPPED]
    assert first[BODY : BODY + 12] != second[BODY : BODY + 12]
    assert first[BODY + 12 :] != second[BODY + 12 :]


def test_through_a_file_store(tmp_path: Path) -> None:
    cipher = EnvelopeCipher(FileKeyProvider.create(tmp_path / "keys"))
    store = FileBlobStore(tmp_path / "objects", tmp_path / "tmp")
    plaintext = b"\0" * 128 + b"DICM" + os.urandom(500)
    blob_id = store.put(cipher.seal(plaintext))
    assert b"DICM" not in store.path_of(blob_id).read_bytes()
    assert cipher.open(store.get(blob_id)) == plaintext


def test_tampering_any_byte_is_detected() -> None:
    keys = MemoryKeyProvider()
    cipher = EnvelopeCipher(keys)
    sealed = cipher.seal(os.urandom(40))
    for index in range(len(sealed)):
        for flip in (0x01, 0x80):
            tampered = bytearray(sealed)
            tampered[index] ^= flip
            expected: tuple[type[Exception], ...] = (IntegrityError,)
            if KEY_ID.start <= index < KEY_ID.stop:
                # Still a well-formed id, but one no KEK has: "unknown key" is all we can know.
                expected = (IntegrityError, KeyMaterialError)
            with pytest.raises(expected):
                cipher.open(bytes(tampered))


def test_key_id_pointing_at_another_known_kek_is_an_integrity_error() -> None:
    keys = MemoryKeyProvider()
    cipher = EnvelopeCipher(keys)
    sealed = cipher.seal(b"payload")
    other = keys.rotate()
    swapped = sealed[: KEY_ID.start] + other.encode() + sealed[KEY_ID.stop :]
    with pytest.raises(IntegrityError):
        cipher.open(swapped)


def test_wrapped_key_from_another_object_is_an_integrity_error() -> None:
    cipher = EnvelopeCipher(MemoryKeyProvider())
    first, second = cipher.seal(b"first object"), cipher.seal(b"second object")
    spliced = first[:BODY] + second[BODY:]
    with pytest.raises(IntegrityError):
        cipher.open(spliced)


def test_truncation_and_extension_are_detected() -> None:
    cipher = EnvelopeCipher(MemoryKeyProvider())
    sealed = cipher.seal(os.urandom(64))
    for length in range(len(sealed)):
        with pytest.raises(IntegrityError):
            cipher.open(sealed[:length])
    with pytest.raises(IntegrityError):
        cipher.open(sealed + b"\0")
    with pytest.raises(IntegrityError):
        cipher.open(sealed[:-16] + sealed[-15:])


@pytest.mark.parametrize(
    "garbage",
    [b"", b"SPX", b"SPX2" + b"\0" * 100, b"\0" * 128 + b"DICM" + b"\0" * 100, os.urandom(200)],
)
def test_not_a_sealed_object(garbage: bytes) -> None:
    cipher = EnvelopeCipher(MemoryKeyProvider())
    with pytest.raises(IntegrityError):
        cipher.open(garbage)
    with pytest.raises(IntegrityError):
        EnvelopeCipher.key_id_of(garbage)
    with pytest.raises(IntegrityError):
        cipher.rewrap(garbage)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (slice(4, 5), b"\x0f"),
        (slice(4, 5), b"\xff"),
        (slice(4, 5), b"\x10\x00"),
        (slice(21, 23), b"\x00\x30"),
        (slice(21, 23), b"\xff\xff"),
        (slice(21, 23), b"\x00\x00"),
    ],
)
def test_header_length_lies(field: slice, value: bytes) -> None:
    cipher = EnvelopeCipher(MemoryKeyProvider())
    sealed = cipher.seal(b"payload")
    with pytest.raises(IntegrityError, match="header"):
        cipher.open(sealed[: field.start] + value + sealed[field.stop :])


def test_wrong_kek_with_same_id() -> None:
    honest = MemoryKeyProvider()
    key_id = honest.current_key_id()
    impostor = MemoryKeyProvider({key_id: os.urandom(32)})
    sealed = EnvelopeCipher(honest).seal(b"payload")
    with pytest.raises(IntegrityError):
        EnvelopeCipher(impostor).open(sealed)


def test_unknown_key_id() -> None:
    keys = MemoryKeyProvider()
    cipher = EnvelopeCipher(keys)
    sealed = cipher.seal(b"payload")
    old = keys.current_key_id()
    keys.rotate()
    keys.forget(old)
    with pytest.raises(KeyMaterialError):
        cipher.open(sealed)
    with pytest.raises(KeyMaterialError):
        cipher.rewrap(sealed)
    assert EnvelopeCipher.key_id_of(sealed) == old


def test_unknown_key_id_on_disk(tmp_path: Path) -> None:
    keys = FileKeyProvider.create(tmp_path / "keys")
    sealed = EnvelopeCipher(keys).seal(b"payload")
    old = keys.current_key_id()
    keys.rotate()
    (tmp_path / "keys" / f"kek-{old}.key").unlink()
    with pytest.raises(KeyMaterialError, match="missing"):
        EnvelopeCipher(FileKeyProvider(tmp_path / "keys")).open(sealed)


def _rotate(keys: KeyProvider) -> str:
    assert isinstance(keys, MemoryKeyProvider | FileKeyProvider)
    return keys.rotate()


def _drop_kek(keys: KeyProvider, key_id: str) -> KeyProvider:
    """Remove one KEK; return a provider that no longer has it (a fresh one: no cache)."""
    if isinstance(keys, MemoryKeyProvider):
        keys.forget(key_id)
        return keys
    assert isinstance(keys, FileKeyProvider)
    (keys.keys_dir / f"kek-{key_id}.key").unlink()
    return FileKeyProvider(keys.keys_dir)


def test_rotation_and_rewrap(keys: KeyProvider) -> None:
    cipher = EnvelopeCipher(keys)
    plaintext = os.urandom(5000)
    sealed = cipher.seal(plaintext)
    old = keys.current_key_id()

    new = _rotate(keys)
    assert new != old
    assert keys.current_key_id() == new
    assert cipher.open(sealed) == plaintext  # old objects stay readable while the old KEK exists
    assert EnvelopeCipher.key_id_of(cipher.seal(b"x")) == new

    rewrapped = cipher.rewrap(sealed)
    assert EnvelopeCipher.key_id_of(rewrapped) == new
    assert rewrapped[BODY:] == sealed[BODY:]  # nonce, ciphertext and tag untouched
    assert rewrapped[WRAPPED] != sealed[WRAPPED]
    assert cipher.open(rewrapped) == plaintext
    assert cipher.rewrap(rewrapped) == rewrapped  # already current: unchanged

    # Once every object is re-wrapped, the old KEK can go.
    without_old = EnvelopeCipher(_drop_kek(keys, old))
    assert without_old.open(rewrapped) == plaintext
    with pytest.raises(KeyMaterialError):
        without_old.open(sealed)


def test_rewrap_detects_a_damaged_wrapped_key() -> None:
    keys = MemoryKeyProvider()
    cipher = EnvelopeCipher(keys)
    sealed = bytearray(cipher.seal(b"payload"))
    sealed[WRAPPED.start + 3] ^= 0x40
    keys.rotate()
    with pytest.raises(IntegrityError):
        cipher.rewrap(bytes(sealed))


def test_provider_returning_a_bad_key_is_refused() -> None:
    class ShortKeys:
        def current_key_id(self) -> str:
            return "0123456789abcdef"

        def get_key(self, key_id: str) -> bytes:
            return b"too short"

    with pytest.raises(KeyMaterialError, match="32-byte"):
        EnvelopeCipher(ShortKeys()).seal(b"x")


def test_memory_key_provider_validates_keys() -> None:
    with pytest.raises(KeyMaterialError):
        MemoryKeyProvider({"0123456789abcdef": b"short"})
    with pytest.raises(KeyMaterialError):
        MemoryKeyProvider({"not-an-id": os.urandom(32)})
    with pytest.raises(KeyMaterialError):
        MemoryKeyProvider({"0123456789abcdef": os.urandom(32)}, current="fedcba9876543210")


def test_sealing_notes_what_reading_the_object_back_would_say() -> None:
    """The KEK id and tag the index records at ingest come from sealing, not from parsing the result."""
    keys = MemoryKeyProvider()
    cipher = EnvelopeCipher(keys)
    sealed, key_id, tag = cipher.seal_noting(b"object" * 100)
    assert (key_id, tag) == (EnvelopeCipher.key_id_of(sealed), EnvelopeCipher.tag_of(sealed))
    assert key_id == keys.current_key_id()
    assert cipher.open(sealed, expect_tag=tag) == b"object" * 100


def test_an_expected_tag_refuses_another_intact_object_and_survives_rewrapping() -> None:
    keys = MemoryKeyProvider()
    cipher = EnvelopeCipher(keys)
    mine, other = cipher.seal(b"mine" * 100), cipher.seal(b"other" * 100)
    tag = EnvelopeCipher.tag_of(mine)
    assert len(tag) == 32 and tag == mine[-16:].hex()
    assert cipher.open(mine, expect_tag=tag) == b"mine" * 100
    with pytest.raises(IntegrityError, match="not the one"):
        cipher.open(other, expect_tag=tag)  # authentic on its own, but not this record's object
    keys.rotate()
    rewrapped = cipher.rewrap(mine)
    assert rewrapped != mine and EnvelopeCipher.tag_of(rewrapped) == tag
    assert cipher.open(rewrapped, expect_tag=tag) == b"mine" * 100
