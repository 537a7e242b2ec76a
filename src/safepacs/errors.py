"""The exception tree of SafePACS.

Every error the package raises derives from :class:`SafePacsError`; third-party
exceptions are translated at the boundary with ``raise X from exc``.  Each
protocol maps these to its wire form in exactly one place (``dimse/status.py``
for DIMSE status codes, the CLI's ``main`` for exit codes).

::

    SafePacsError
    ├── ConfigError              settings invalid or insecure
    ├── DataDirError             data directory missing, exists already, bad mode
    ├── InvalidObjectError       input is not a DICOM object we can store
    ├── StorageError             the blob store failed (disk, permissions)
    │   └── IntegrityError       stored bytes do not decrypt or do not match their hash
    ├── KeyError_                key material missing or unusable
    ├── IndexError_              the index (database) failed
    ├── ConflictError            same SOP Instance UID, different bytes, overwrite off
    ├── NotFoundError            a peer, user or object that does not exist
    ├── QueryError               a C-FIND identifier that cannot be answered
    │   └── QueryLimitError      more matches than the per-query limit allows
    ├── AccessDenied             the policy refused the action
    └── RetrieveError            a sub-operation of C-GET/C-MOVE could not be done
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "ConfigError",
    "ConflictError",
    "DataDirError",
    "IndexError_",
    "IntegrityError",
    "InvalidObjectError",
    "KeyError_",
    "NotFoundError",
    "QueryError",
    "QueryLimitError",
    "RetrieveError",
    "SafePacsError",
    "StorageError",
]


class SafePacsError(Exception):
    """Root of every SafePACS error.  ``str(err)`` is one sentence safe to show a user (no PHI)."""


class ConfigError(SafePacsError):
    """The settings are invalid or would run SafePACS insecurely."""


class DataDirError(SafePacsError):
    """The data directory is missing, already exists, or is unsafe."""


class InvalidObjectError(SafePacsError):
    """The input is not a DICOM object SafePACS can store."""


class StorageError(SafePacsError):
    """The blob store could not read or write an object."""


class IntegrityError(StorageError):
    """Stored bytes failed authentication or do not match their recorded hash."""


class KeyError_(SafePacsError):
    """Key material is missing or unusable."""


class IndexError_(SafePacsError):
    """The index database failed."""


class ConflictError(SafePacsError):
    """An instance with this SOP Instance UID is stored already with different bytes."""


class NotFoundError(SafePacsError):
    """The named peer, user or object does not exist."""


class QueryError(SafePacsError):
    """The query identifier cannot be answered as asked."""


class QueryLimitError(QueryError):
    """The query matched more results than the per-query limit allows."""


class AccessDenied(SafePacsError):
    """The access policy refused the action."""


class RetrieveError(SafePacsError):
    """An instance could not be sent to the retrieving peer."""
