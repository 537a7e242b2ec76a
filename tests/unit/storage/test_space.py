"""Disk space (safepacs/storage/space.py) with the free space and the clock faked: stores are refused
below the low-water mark and resume above it, a released audit reserve counts as taken until it is
refilled, and "disk full" is recognised however a driver wraps it."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from safepacs.errors import StorageFullError
from safepacs.storage import space
from safepacs.storage.space import AuditReserve, FreeSpace, is_disk_full

MB = 1024 * 1024


class Disk:
    """The free bytes every path reports, and a clock."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.now = 0.0
        self.asked = 0

    def available(self, path: Path) -> int:
        self.asked += 1
        return self.free

    def clock(self) -> float:
        return self.now


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    fake = Disk(100 * MB)
    monkeypatch.setattr(space, "available_bytes", fake.available)
    return fake


def test_stores_are_refused_below_the_mark_and_resume_above_it(
    disk: Disk, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    free = FreeSpace([tmp_path], 50 * MB, clock=disk.clock)
    free.check()
    disk.free = 10 * MB
    disk.now += 1.0
    with pytest.raises(
        StorageFullError, match=rf"less free space than storage.min_free_bytes \({50 * MB} bytes\)"
    ):
        free.check()
    assert "stores are refused, reads go on" in caplog.text
    disk.free = 60 * MB
    disk.now += 1.0
    free.check()
    assert "above storage.min_free_bytes again" in caplog.text


def test_the_answer_is_reused_for_an_interval(disk: Disk, tmp_path: Path) -> None:
    free = FreeSpace([tmp_path], 50 * MB, clock=disk.clock, interval=1.0)
    free.check()
    asked = disk.asked
    disk.free = 0
    free.check()  # within the interval: the last answer
    assert disk.asked == asked
    disk.now += 1.0
    with pytest.raises(StorageFullError):
        free.check()


def test_no_mark_means_no_check(disk: Disk, tmp_path: Path) -> None:
    disk.free = 0
    FreeSpace([tmp_path], 0, clock=disk.clock).check()
    assert disk.asked == 0


def test_each_file_system_is_reported_once(disk: Disk, tmp_path: Path) -> None:
    (tmp_path / "blobs").mkdir()
    disk.free = 1
    free = FreeSpace([tmp_path, tmp_path / "blobs", tmp_path], 10, clock=disk.clock)
    assert free.below() == [(tmp_path, 1, 10)]
    assert FreeSpace([tmp_path / "missing"], 10).below() == []  # the write itself will say


def test_a_released_reserve_counts_as_taken_until_refilled(disk: Disk, tmp_path: Path) -> None:
    reserve = AuditReserve(tmp_path / "index.sqlite3-audit-reserve", 4096)
    assert reserve.ensure() and reserve.held() == 4096
    free = FreeSpace([tmp_path], 1000, reserve=reserve, clock=disk.clock)
    disk.free = 2000
    free.check()
    assert reserve.release() and reserve.held() == 0 and reserve.releases == 1
    with pytest.raises(StorageFullError):  # a release is looked at at once, whatever the interval
        free.check()
    assert free.below() == [(tmp_path, 2000, 1000 + 4096)]
    disk.free = 10_000
    disk.now += 1.0
    free.check()  # room for the mark and the reserve: refilled, stores go on
    assert reserve.held() == 4096


def test_a_reserve_is_created_only_once_and_released_only_when_it_holds_space(tmp_path: Path) -> None:
    path = tmp_path / "reserve"
    reserve = AuditReserve(path, 8192)
    assert reserve.held() is None
    assert not reserve.release()  # no file
    assert reserve.ensure() and path.stat().st_size == 8192
    assert path.stat().st_mode & 0o777 == 0o600
    assert reserve.release() and not reserve.release()
    assert reserve.releases == 1
    assert AuditReserve(tmp_path / "none", 0).ensure()  # a size of 0: nothing to reserve


def test_a_reserve_through_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "reserve").symlink_to(target)
    assert not AuditReserve(tmp_path / "reserve", 4096).ensure()
    assert target.stat().st_size == 0


class DBAPIError(Exception):
    """Like SQLAlchemy's: the driver's error in ``orig``."""

    def __init__(self, orig: BaseException) -> None:
        super().__init__("wrapped")
        self.orig = orig


class PgError(Exception):
    sqlstate = "53100"


def sqlite_full() -> sqlite3.Error:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = sqlite3.SQLITE_FULL
    return exc


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        sqlite_full(),
        DBAPIError(sqlite_full()),
        DBAPIError(PgError()),
    ],
    ids=["enospc", "edquot", "sqlite-full", "wrapped-sqlite", "wrapped-postgres"],
)
def test_disk_full_is_recognised(exc: BaseException) -> None:
    assert is_disk_full(exc)


def test_disk_full_is_recognised_as_a_cause() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("the audit record failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.EIO, "I/O error"), sqlite3.OperationalError("database is locked"), ValueError("x")],
)
def test_other_errors_are_not_disk_full(exc: BaseException) -> None:
    assert not is_disk_full(exc)


def test_a_cycle_of_causes_ends() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert not is_disk_full(a)
