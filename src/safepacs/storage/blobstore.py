"""Object storage: opaque byte blobs under random ids.

The store never sees plaintext (the ingest service seals objects with
:class:`~safepacs.storage.crypto.EnvelopeCipher` first) and never builds a path
from an untrusted string: every blob id is checked against ``[0-9a-f]{32}``
before it is joined to the root (the DCMTK CVE-2022-2119/2120 class of path
traversal cannot happen here).

A write is durable when :meth:`FileBlobStore.put` returns: the bytes go to an
unnamed temporary file in the directory the object will live in (Linux
``O_TMPFILE``), the file is fsynced, linked under its name (``linkat``: atomic,
and it never replaces an existing name), and the directory is fsynced, as are
directories created for it.  Where the file system has no ``O_TMPFILE``, the
temporary file is a named one in ``tmp_dir`` (same file system), renamed into
place with :func:`os.replace` (atomic on POSIX) after its fsync.  A crash at any
point leaves either no object or the whole object, never a partial one; an
unnamed temporary file leaves nothing at all.

Once synced, an object's pages are dropped from the page cache (``POSIX_FADV_DONTNEED``): an
archive writes each object once, and keeping the pages would push the index and the objects being
read out of memory.  The kernel reuses the freed pages for the next object instead of taking fresh
ones: writing into pages the guest had not touched yet cost kernel time, and four associations of CT
slices went faster with it (measured in bench/README.md, "Ingest benchmark").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeGuard, runtime_checkable

from safepacs.errors import NotFoundError, StorageError

__all__ = [
    "BlobStore",
    "FileBlobStore",
    "MemoryBlobStore",
    "StagedBlob",
    "is_valid_blob_id",
    "new_blob_id",
]

_log = logging.getLogger(__name__)

_BLOB_ID_RE = re.compile(r"[0-9a-f]{32}")
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
# open(2): what a kernel or file system without O_TMPFILE answers; linkat(2) through /proc without /proc.
_NO_TMPFILE_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT})


class _NoUnnamedFiles(Exception):
    """This file system (or this system without /proc) cannot link an unnamed file into place."""


@runtime_checkable
class BlobStore(Protocol):
    """Where sealed objects live.  Ids are chosen by the store, never by the caller."""

    def put(self, data: bytes) -> str:
        """Store ``data`` under a new random id and return it; the data is durable on return."""
        ...

    def stage(self, data: bytes) -> StagedBlob:
        """Start storing ``data``: written (the disk may start on it) but not durable and under no id
        until the :class:`StagedBlob` is committed; ``put`` is ``stage(data).commit()``."""
        ...

    def get(self, blob_id: str) -> bytes:
        """The bytes stored under ``blob_id``; :class:`NotFoundError` if there are none."""
        ...

    def delete(self, blob_id: str) -> None:
        """Remove ``blob_id``; removing an absent blob is not an error."""
        ...

    def exists(self, blob_id: str) -> bool:
        """Whether ``blob_id`` is stored."""
        ...


def new_blob_id() -> str:
    """A fresh blob id: 128 random bits from :mod:`secrets` as 32 lowercase hex digits."""
    return secrets.token_hex(16)


def is_valid_blob_id(blob_id: object) -> TypeGuard[str]:
    """Whether ``blob_id`` has the one shape a blob id may have (``[0-9a-f]{32}``, nothing else)."""
    return isinstance(blob_id, str) and _BLOB_ID_RE.fullmatch(blob_id) is not None


def _check_blob_id(blob_id: object) -> str:
    if not is_valid_blob_id(blob_id):
        # The value is not echoed: it is untrusted input.
        raise StorageError("refused a malformed blob id (must be 32 lowercase hex digits)")
    return blob_id


class MemoryBlobStore:
    """A :class:`BlobStore` in a dict, for tests.  Thread-safe; same id rules as the file store."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        payload = bytes(data)
        with self._lock:
            blob_id = new_blob_id()
            while blob_id in self._blobs:  # pragma: no cover - 2**-128
                blob_id = new_blob_id()
            self._blobs[blob_id] = payload
        return blob_id

    def stage(self, data: bytes) -> StagedBlob:
        return _StagedInMemory(self, bytes(data))

    def get(self, blob_id: str) -> bytes:
        key = _check_blob_id(blob_id)
        with self._lock:
            try:
                return self._blobs[key]
            except KeyError:
                raise NotFoundError("no stored object has this blob id") from None

    def delete(self, blob_id: str) -> None:
        key = _check_blob_id(blob_id)
        with self._lock:
            self._blobs.pop(key, None)

    def exists(self, blob_id: str) -> bool:
        key = _check_blob_id(blob_id)
        with self._lock:
            return key in self._blobs

    def __len__(self) -> int:
        with self._lock:
            return len(self._blobs)


class FileBlobStore:
    """A :class:`BlobStore` on a POSIX file system: ``root/ab/<blob_id>``.

    Files are created 0600 and directories 0700.  ``tmp_dir`` must be on the
    same file system as ``root`` so the final rename is atomic; both are
    created (0700) if missing.  ``fsync=False`` skips every fsync and is only
    for benchmarks (the settings refuse it otherwise).  ``unnamed_temp_files=False``
    writes through named temporary files in ``tmp_dir`` even where ``O_TMPFILE``
    exists (what happens where it does not).
    """

    def __init__(
        self, root: Path, tmp_dir: Path, *, fsync: bool = True, unnamed_temp_files: bool = True
    ) -> None:
        self._known_dirs: set[Path] = set()
        # Unnamed temporary files until the file system says it has no O_TMPFILE (or when asked not to).
        self._unnamed = unnamed_temp_files and bool(_O_TMPFILE)
        self.root = Path(root)
        self.tmp_dir = Path(tmp_dir)
        self.fsync = fsync
        for directory in (self.root, self.tmp_dir):
            try:
                _ensure_dir(directory, fsync=fsync)
            except OSError as exc:
                raise StorageError(
                    f"cannot create or open the storage directory {directory}: {exc.strerror}; "
                    "check that it exists and is writable by this user"
                ) from exc
        try:
            same_fs = os.stat(self.root).st_dev == os.stat(self.tmp_dir).st_dev
        except OSError as exc:  # pragma: no cover - created just above
            raise StorageError(f"cannot stat the storage directories: {exc.strerror}") from exc
        if not same_fs:
            raise StorageError(
                f"the staging directory {self.tmp_dir} is not on the same file system as {self.root}; "
                "atomic writes need both on one file system"
            )
        self._create_fanout()

    def _create_fanout(self) -> None:
        """Create the 256 ``root/ab`` directories once, so a write never has to create (and fsync) one."""
        created = False
        for i in range(256):
            directory = self.root / f"{i:02x}"
            if directory.is_dir():
                self._known_dirs.add(directory)
                continue
            try:
                os.mkdir(directory, _DIR_MODE)
                os.chmod(directory, _DIR_MODE)
                created = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot create storage directory {directory}: {exc.strerror}") from exc
            self._known_dirs.add(directory)
        if created and self.fsync:
            _fsync_dir(self.root)

    # -- paths ----------------------------------------------------------------
    def path_of(self, blob_id: str) -> Path:
        """The file of ``blob_id`` (validated first: never a path from an unchecked string)."""
        key = _check_blob_id(blob_id)
        return self.root / key[0:2] / key

    # -- BlobStore ------------------------------------------------------------
    def put(self, data: bytes) -> str:
        return self.stage(data).commit()

    def stage(self, data: bytes) -> StagedBlob:
        payload = memoryview(data)
        if self._unnamed:
            try:
                return self._stage_unnamed(payload)
            except _NoUnnamedFiles:
                self._no_unnamed_files()
        return self._stage_renamed(payload)

    def _no_unnamed_files(self) -> None:
        _log.info("no O_TMPFILE here; objects are written through named temporary files")
        self._unnamed = False

    def _stage_unnamed(self, payload: memoryview) -> StagedBlob:
        """Write into an unnamed temporary file in the object's own directory (see the module)."""
        blob_id = new_blob_id()
        directory = self.path_of(blob_id).parent
        try:
            self._make_parents(directory)
            dir_fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"could not write an object to {self.root}: {_describe(exc)}") from exc
        try:
            fd = self._open_unnamed(dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        staged = _StagedUnnamed(self, dir_fd, fd, blob_id, payload)
        self._fill(fd, payload, staged.discard)
        return staged

    def _open_unnamed(self, dir_fd: int) -> int:
        try:
            return os.open(".", os.O_WRONLY | _O_TMPFILE | _O_CLOEXEC, _FILE_MODE, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in _NO_TMPFILE_ERRNOS:
                raise _NoUnnamedFiles from exc
            raise StorageError(f"could not create a file in {self.root}: {_describe(exc)}") from exc

    def _make_durable(self, sync_dir: Callable[[], None], undo: Callable[[], None]) -> None:
        """Sync the directory that just got an object's name; if that fails the object is in place
        but not known to be durable: ``undo`` it, so nothing is acknowledged."""
        if not self.fsync:
            return
        try:
            sync_dir()
        except OSError as exc:
            undo()
            raise StorageError(f"could not make an object durable in {self.root}: {_describe(exc)}") from exc

    def _stage_renamed(self, payload: memoryview) -> StagedBlob:
        """Write into a named temporary file in ``tmp_dir``; :meth:`_StagedRenamed.commit` renames it."""
        tmp_fd, tmp_name = self._mkstemp()
        staged = _StagedRenamed(self, tmp_fd, tmp_name)
        self._fill(tmp_fd, payload, staged.discard)
        return staged

    def _fill(self, fd: int, payload: memoryview, discard: Callable[[], None]) -> None:
        """Write ``payload`` into a staged file and start its write-back; on failure ``discard`` it."""
        try:
            self._write_all(fd, payload)
        except BaseException as exc:
            discard()
            if isinstance(exc, OSError):
                raise StorageError(f"could not write an object to {self.root}: {_describe(exc)}") from exc
            raise
        if self.fsync:
            _start_writeback(fd)

    def _sync_file(self, fd: int) -> None:
        """fsync a staged file (when syncing at all), then give its now clean pages back."""
        if self.fsync:
            os.fsync(fd)
            _drop_cached(fd)

    def get(self, blob_id: str) -> bytes:
        path = self.path_of(blob_id)
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError("no stored object has this blob id") from None
        except OSError as exc:
            raise StorageError(f"could not read a stored object: {_describe(exc)}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise StorageError("a stored object is not a regular file; the object store was altered")
            return _read_all(fd)
        except OSError as exc:
            raise StorageError(f"could not read a stored object: {_describe(exc)}") from exc
        finally:
            os.close(fd)

    def delete(self, blob_id: str) -> None:
        path = self.path_of(blob_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"could not delete a stored object: {_describe(exc)}") from exc
        if self.fsync:
            try:
                _fsync_dir(path.parent)
            except OSError as exc:
                raise StorageError(f"could not make a deletion durable: {_describe(exc)}") from exc
        # Empty fan-out directories are kept: removing them would race with a concurrent put.

    def exists(self, blob_id: str) -> bool:
        path = self.path_of(blob_id)
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"could not look up a stored object: {_describe(exc)}") from exc

    # -- internals (hooks a test subclass may override to inject failures) ----
    def _mkstemp(self) -> tuple[int, str]:
        """A new, empty 0600 file in ``tmp_dir``: ``(fd, path)``."""
        try:
            for _ in range(100):
                name = os.path.join(self.tmp_dir, f".put-{secrets.token_hex(8)}.tmp")
                try:
                    fd = os.open(
                        name,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                        _FILE_MODE,
                    )
                except FileExistsError:  # pragma: no cover - 2**-64
                    continue
                return fd, name
            raise FileExistsError(errno.EEXIST, "no free temporary file name")  # pragma: no cover
        except OSError as exc:
            raise StorageError(
                f"could not create a temporary file in {self.tmp_dir}: {_describe(exc)}; "
                "check its permissions and free space"
            ) from exc

    def _write_all(self, fd: int, data: memoryview) -> None:
        """Write every byte of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
        offset = 0
        total = len(data)
        while offset < total:
            written = os.write(fd, data[offset : offset + (1 << 30)])
            if written <= 0:  # pragma: no cover - POSIX raises instead
                raise OSError(errno.EIO, "write made no progress")
            offset += written

    def _make_parents(self, directory: Path) -> None:
        """Create ``root/ab`` as needed, 0700, made durable in its parent.

        One level of 256 directories: a second level (65,536 directories) would cost two extra
        directory fsyncs on nearly every write for the first tens of thousands of objects.
        """
        if directory in self._known_dirs:
            return
        _ensure_dir(directory, fsync=self.fsync)
        self._known_dirs.add(directory)


class StagedBlob(Protocol):
    """An object written but not yet stored: neither durable nor under an id until :meth:`commit`."""

    def commit(self) -> str:
        """Make the object durable under a new random id and return the id (as :meth:`BlobStore.put`)."""
        ...

    def discard(self) -> None:
        """Forget the object; nothing of it remains."""
        ...


class _StagedInMemory:
    def __init__(self, store: MemoryBlobStore, data: bytes) -> None:
        self._store, self._data = store, data

    def commit(self) -> str:
        return self._store.put(self._data)

    def discard(self) -> None:
        self._data = b""


class _StagedUnnamed:
    """Bytes in an unnamed file (``O_TMPFILE``) of the directory the object will live in."""

    def __init__(self, store: FileBlobStore, dir_fd: int, fd: int, blob_id: str, payload: memoryview) -> None:
        self._store, self._dir_fd, self._fd, self._id, self._payload = store, dir_fd, fd, blob_id, payload

    def commit(self) -> str:
        store = self._store
        try:
            try:
                store._sync_file(self._fd)
                while True:
                    try:  # linkat(AT_SYMLINK_FOLLOW): never replaces a name
                        os.link(f"/proc/self/fd/{self._fd}", self._id, dst_dir_fd=self._dir_fd)
                        break
                    except FileExistsError:  # 2**-128: another id in the same directory
                        self._id = self._id[:2] + new_blob_id()[2:]
            except FileNotFoundError:  # no /proc to name the unnamed file by
                store._no_unnamed_files()
                self.discard()
                return store._stage_renamed(self._payload).commit()
            except OSError as exc:
                raise StorageError(f"could not write an object to {store.root}: {_describe(exc)}") from exc
            finally:
                self._close_file()  # an unnamed file that was not linked is gone now
            name, dir_fd = self._id, self._dir_fd
            store._make_durable(lambda: os.fsync(dir_fd), lambda: _unlink_quietly(name, dir_fd=dir_fd))
            return name
        finally:
            self.discard()

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self._close_file()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


class _StagedRenamed:
    """Bytes in a named temporary file in ``tmp_dir``, renamed into place on commit."""

    def __init__(self, store: FileBlobStore, fd: int, tmp_name: str) -> None:
        self._store, self._fd, self._tmp_name = store, fd, tmp_name
        self._done = False

    def commit(self) -> str:
        store = self._store
        self._done = True  # renamed away or removed below: discard has nothing left to do
        try:
            try:
                store._sync_file(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1
            while True:
                blob_id = new_blob_id()
                target = store.path_of(blob_id)
                store._make_parents(target.parent)
                if not os.path.lexists(target):  # 2**-128 collision: never overwrite
                    break
            os.replace(self._tmp_name, target)
        except OSError as exc:
            _unlink_quietly(self._tmp_name)
            raise StorageError(f"could not write an object to {store.root}: {_describe(exc)}") from exc
        except BaseException:
            _unlink_quietly(self._tmp_name)
            raise
        store._make_durable(lambda: _fsync_dir(target.parent), lambda: _unlink_quietly(str(target)))
        return blob_id

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._done:
            self._done = True
            _unlink_quietly(self._tmp_name)


def _ensure_dir(directory: Path, *, fsync: bool) -> None:
    """Create ``directory`` (and missing parents) 0700; fsync the parent of each one created."""
    missing: list[Path] = []
    current = Path(directory)
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:  # pragma: no cover - the file system root exists
            break
        current = current.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, _DIR_MODE)
        except FileExistsError:
            if not path.is_dir():
                raise
            continue  # created concurrently by another writer: it made it durable
        os.chmod(path, _DIR_MODE)  # the umask may have removed owner bits
        if fsync:
            _fsync_dir(path.parent)


def _start_writeback(fd: int) -> None:
    """Have the kernel start writing ``fd``'s dirty pages now (``POSIX_FADV_DONTNEED`` does, for dirty
    pages, and drops nothing yet), so the fsync that follows other work finds them written."""
    _drop_cached(fd)


def _drop_cached(fd: int) -> None:
    """Drop ``fd``'s clean pages from the page cache (and start writing its dirty ones); only advice,
    never an error."""
    if _FADV_DONTNEED is not None:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, _FADV_DONTNEED)


_FADV_DONTNEED: int | None = getattr(os, "POSIX_FADV_DONTNEED", None)


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or unlink inside it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    """Every byte of ``fd`` (FileIO.readall sizes its buffer from fstat, so one copy at most)."""
    with open(fd, "rb", buffering=0, closefd=False) as handle:
        return handle.readall()


def _unlink_quietly(path: str, *, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - best effort cleanup
        _log.warning("could not remove temporary file %s: %s", path, exc.strerror)


def _describe(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
