"""The one place where SafePACS errors become DIMSE status codes (PS3.7 Annex C, PS3.4 B.2.3, C.4)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from safepacs.errors import (
    AccessDenied,
    AuditError,
    InvalidObjectError,
    QueryError,
    QueryLimitError,
    SafePacsError,
    StorageError,
    StorageFullError,
)
from safepacs.services.ingest import SopClassMismatch, SopInstanceMismatch

__all__ = ["SUCCESS", "find_failure", "retrieve_failure", "status", "store_conflict", "store_failure"]

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
REFUSED_NOT_AUTHORIZED = 0x0124
#: C-STORE of a SOP Instance UID stored with other content (PS3.4 B.2.3 "Error: Cannot understand",
#: Cxxx; 0x111 after PS3.7 C.5's "Duplicate SOP Instance", which PS3.7 9.1.1.1.9 does not allow a
#: C-STORE to answer).  A failure, not a warning: the object was not stored, and the sender keeps it.
DIFFERENT_INSTANCE_STORED = 0xC111
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNABLE_TO_PROCESS = 0xC001
RETRIEVE_OUT_OF_RESOURCES = 0xA701
FIND_IDENTIFIER_MISMATCH = 0xA900
#: A C-FIND response identifier that cannot be encoded: what pynetdicom answers in its place.
FIND_UNENCODABLE = 0xC312
AUDIT_DOWN = "refused: the audit trail cannot be written; try again later"
OUT_OF_SPACE = "refused: out of disk space (storage.min_free_bytes)"


def status(code: int, comment: str | None = None) -> Dataset:
    """A status data set; the Error Comment (0000,0902) is at most 64 characters (LO)."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _generic(exc: SafePacsError, *, retrieve: bool = False) -> Dataset | None:
    if isinstance(exc, AccessDenied):
        return status(REFUSED_NOT_AUTHORIZED, "refused: not authorized for this service")
    if isinstance(exc, AuditError):  # fail closed: no access that cannot be recorded
        return status(RETRIEVE_OUT_OF_RESOURCES if retrieve else OUT_OF_RESOURCES, AUDIT_DOWN)
    return None


def store_conflict() -> Dataset:
    """C-STORE answer for an instance not stored because its SOP Instance UID is stored with other
    content (``storage.overwrite`` off): see :data:`DIFFERENT_INSTANCE_STORED` and docs/conformance.md."""
    return status(DIFFERENT_INSTANCE_STORED, "SOP Instance UID stored with other content; not stored")


def store_failure(exc: SafePacsError) -> Dataset:
    """C-STORE failure for ``exc`` (PS3.4 B.2.3)."""
    if (ds := _generic(exc)) is not None:
        return ds
    if isinstance(exc, (SopClassMismatch, SopInstanceMismatch)):
        return status(DOES_NOT_MATCH_SOP_CLASS, str(exc))
    if isinstance(exc, InvalidObjectError):
        return status(CANNOT_UNDERSTAND, str(exc))
    if isinstance(exc, StorageFullError):  # A700 "Refused: Out of Resources"
        return status(OUT_OF_RESOURCES, OUT_OF_SPACE)
    if isinstance(exc, StorageError):
        return status(OUT_OF_RESOURCES, "the archive could not store the object; try again later")
    return status(OUT_OF_RESOURCES, "the archive could not index the object; try again later")


def find_failure(exc: SafePacsError) -> Dataset:
    """C-FIND failure for ``exc`` (PS3.4 C.4.1.1.4)."""
    if (ds := _generic(exc)) is not None:
        return ds
    if isinstance(exc, QueryLimitError):
        return status(OUT_OF_RESOURCES, "too many matches; narrow the query (add keys or a date range)")
    if isinstance(exc, QueryError):
        return status(FIND_IDENTIFIER_MISMATCH, str(exc))
    return status(UNABLE_TO_PROCESS, "the archive could not run the query; try again later")


def retrieve_failure(exc: SafePacsError) -> Dataset:
    """C-GET/C-MOVE failure for ``exc`` (PS3.4 C.4.2.1.5, C.4.3.1.4)."""
    if (ds := _generic(exc, retrieve=True)) is not None:
        return ds
    if isinstance(exc, QueryError):
        return status(FIND_IDENTIFIER_MISMATCH, str(exc))
    return status(RETRIEVE_OUT_OF_RESOURCES, "the archive could not retrieve the objects; try again later")
