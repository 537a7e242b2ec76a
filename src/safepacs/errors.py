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
    │   ├── IntegrityError       stored bytes do not decrypt or do not match their hash
    │   └── StorageFullError     free disk space is below storage.min_free_bytes: stores are refused
    ├── KeyMaterialError         key material missing or unusable
    ├── DatabaseError            the index (database) failed
    ├── ConflictError            same SOP Instance UID, different bytes, overwrite off
    ├── InputError               an administrator's value for a change is not valid (CLI or web form)
    ├── NotFoundError            a peer, user or object that does not exist
    ├── QueryError               a C-FIND identifier that cannot be answered
    │   └── QueryLimitError      more matches than the per-query limit allows
    ├── AccessDenied             the policy refused the action
    ├── AuditError               the audit trail cannot be written (the access is refused: fail closed)
    ├── AuthenticationError      a credential is missing, wrong, expired or refused (``code`` says which)
    │   └── IdentityProviderError   an OIDC provider's signing keys could not be fetched
    └── RetrieveError            a sub-operation of C-GET/C-MOVE could not be done
        └── RenderError          an image cannot be rendered (no pixels, no decoder, too large)
            └── RenderRequestError   the rendering asked for does not fit the image (frame, region)
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AuditError",
    "AuthenticationError",
    "ConfigError",
    "ConflictError",
    "DataDirError",
    "DatabaseError",
    "IdentityProviderError",
    "InputError",
    "IntegrityError",
    "InvalidObjectError",
    "KeyMaterialError",
    "NotFoundError",
    "QueryError",
    "QueryLimitError",
    "RenderError",
    "RenderRequestError",
    "RetrieveError",
    "SafePacsError",
    "StorageError",
    "StorageFullError",
    "UnsyncedCommitError",
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


class StorageFullError(StorageError):
    """Free disk space is below ``storage.min_free_bytes``: nothing is stored, so that what is
    stored can still be read and each read recorded."""


class KeyMaterialError(SafePacsError):
    """Key material is missing or unusable."""


class DatabaseError(SafePacsError):
    """The index database failed."""


class UnsyncedCommitError(DatabaseError):
    """A write was committed to the index but could not be synced to disk: not known to be durable.

    Unlike other index errors, what the write refers to (a stored object) must be kept."""


class ConflictError(SafePacsError):
    """An instance with this SOP Instance UID is stored already with different bytes."""


class InputError(SafePacsError):
    """What an administrator typed for a change is not valid (a command line or a web form): the
    message says which value and what to give instead."""


class NotFoundError(SafePacsError):
    """The named peer, user or object does not exist."""


class QueryError(SafePacsError):
    """The query identifier cannot be answered as asked."""


class QueryLimitError(QueryError):
    """The query matched more results than the per-query limit allows."""


class AccessDenied(SafePacsError):
    """The access policy refused the action."""


class AuditError(SafePacsError):
    """The audit trail cannot be written; what it would have described is refused (fail closed)."""


class AuthenticationError(SafePacsError):
    """A credential (password, one-time code, token, session) is missing, wrong, expired or refused.

    ``code`` is a short machine-readable reason for the protocol adapter (e.g. ``invalid_token``);
    the message is one sentence for the user, which never tells which part of a login was wrong.
    """

    def __init__(self, message: str, code: str = "invalid_credentials") -> None:
        super().__init__(message)
        self.code = code


class IdentityProviderError(AuthenticationError):
    """An OIDC identity provider's signing keys (JWKS) could not be fetched in time."""


class RetrieveError(SafePacsError):
    """An instance could not be sent to the retrieving peer."""


class RenderError(RetrieveError):
    """An instance cannot be rendered as an image (no pixel data, no decoder, too large to render)."""


class RenderRequestError(RenderError):
    """The rendering asked for does not fit the image: a frame it does not have, a region outside it."""
