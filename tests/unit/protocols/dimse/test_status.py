"""SafePACS errors as DIMSE status codes (protocols/dimse/status.py, PS3.4 B.2.3, C.4): the code a peer
sees and the Error Comment it may show its user, at most 64 characters."""

from __future__ import annotations

import pytest

from safepacs.errors import (
    AccessDenied,
    AuditError,
    IntegrityError,
    InvalidObjectError,
    NotFoundError,
    QueryError,
    QueryLimitError,
    SafePacsError,
    StorageError,
    StorageFullError,
)
from safepacs.protocols.dimse.status import (
    SUCCESS,
    find_failure,
    retrieve_failure,
    status,
    store_conflict,
    store_failure,
)
from safepacs.services.ingest import SopClassMismatch, SopInstanceMismatch

LONG = "x" * 100


def test_success_is_zero_and_a_status_without_comment_has_none() -> None:
    ds = status(SUCCESS)
    assert ds.Status == 0x0000
    assert "ErrorComment" not in ds


def test_the_error_comment_is_cut_to_64_characters() -> None:
    ds = status(0xC000, LONG)
    assert ds.ErrorComment == "x" * 64


@pytest.mark.parametrize(
    ("exc", "code", "comment"),
    [
        (AccessDenied("no"), 0x0124, "refused: not authorized for this service"),
        (AuditError("down"), 0xA700, "refused: the audit trail cannot be written; try again later"),
        (SopClassMismatch("the SOP Class UID differs"), 0xA900, "the SOP Class UID differs"),
        (SopInstanceMismatch("the SOP Instance UID differs"), 0xA900, "the SOP Instance UID differs"),
        (InvalidObjectError("not a DICOM file"), 0xC000, "not a DICOM file"),
        (StorageFullError("full"), 0xA700, "refused: out of disk space (storage.min_free_bytes)"),
        (IntegrityError("bad tag"), 0xA700, "the archive could not store the object; try again later"),
        (StorageError("EIO"), 0xA700, "the archive could not store the object; try again later"),
        (SafePacsError("db locked"), 0xA700, "the archive could not index the object; try again later"),
    ],
)
def test_store_failures(exc: SafePacsError, code: int, comment: str) -> None:
    ds = store_failure(exc)
    assert ds.Status == code
    assert ds.ErrorComment == comment[:64]


def test_a_store_failure_never_repeats_an_internal_message_of_the_storage() -> None:
    assert "EIO" not in store_failure(StorageError("EIO on /var/lib/safepacs/blobs/ab")).ErrorComment


def test_an_invalid_objects_own_sentence_is_cut_to_64() -> None:
    assert store_failure(InvalidObjectError(LONG)).ErrorComment == "x" * 64


def test_a_conflicting_store_is_a_failure_not_a_warning() -> None:
    ds = store_conflict()
    assert ds.Status == 0xC111
    assert ds.Status & 0xF000 == 0xC000  # "Error: Cannot understand" range, so the sender keeps the object
    assert ds.ErrorComment == "SOP Instance UID stored with other content; not stored"


@pytest.mark.parametrize(
    ("exc", "code", "comment"),
    [
        (AccessDenied("no"), 0x0124, "refused: not authorized for this service"),
        (AuditError("down"), 0xA700, "refused: the audit trail cannot be written; try again later"),
        (
            QueryLimitError("2000 > 1000"),
            0xA700,
            "too many matches; narrow the query (add keys or a date range)",
        ),
        (
            QueryError("the key PatientName has VR LO, not PN"),
            0xA900,
            "the key PatientName has VR LO, not PN",
        ),
        (NotFoundError("gone"), 0xC001, "the archive could not run the query; try again later"),
        (SafePacsError("db"), 0xC001, "the archive could not run the query; try again later"),
    ],
)
def test_find_failures(exc: SafePacsError, code: int, comment: str) -> None:
    ds = find_failure(exc)
    assert ds.Status == code
    assert ds.ErrorComment == comment[:64]


@pytest.mark.parametrize(
    ("exc", "code", "comment"),
    [
        (AccessDenied("no"), 0x0124, "refused: not authorized for this service"),
        # C-GET/C-MOVE have their own "Out of Resources" code (A701: unable to calculate matches)
        (AuditError("down"), 0xA701, "refused: the audit trail cannot be written; try again later"),
        (
            QueryError("a retrieve at the STUDY level needs a value"),
            0xA900,
            "a retrieve at the STUDY level needs a value",
        ),
        (QueryLimitError("too many"), 0xA900, "too many"),
        (IntegrityError("bad"), 0xA701, "the archive could not retrieve the objects; try again later"),
        (SafePacsError("db"), 0xA701, "the archive could not retrieve the objects; try again later"),
    ],
)
def test_retrieve_failures(exc: SafePacsError, code: int, comment: str) -> None:
    ds = retrieve_failure(exc)
    assert ds.Status == code
    assert ds.ErrorComment == comment[:64]


@pytest.mark.parametrize("build", [store_failure, find_failure, retrieve_failure])
def test_every_failure_is_a_failure_status(build: object) -> None:
    assert callable(build)
    for exc in (AccessDenied("x"), AuditError("x"), QueryError("x"), SafePacsError("x"), StorageError("x")):
        code = build(exc).Status
        # PS3.7 C: failures are 01xx, Axxx or Cxxx; never success, pending, cancel or a warning
        assert code >> 12 in (0xA, 0xC) or code >> 8 == 0x01, hex(code)
