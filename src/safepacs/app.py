"""The composition root: builds the concrete backends and services from the settings.

Nothing else in the package constructs a database engine, a blob store or a key provider.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
import structlog

from safepacs.audit import AuditTrail, Signer
from safepacs.audit.recorder import Auditor
from safepacs.auth.login import LoginService
from safepacs.auth.oidc import OidcVerifier
from safepacs.auth.passwords import generate_password, hash_password
from safepacs.auth.pki import create_ca, issue_certificate, write_private
from safepacs.config import Settings, render_default_toml
from safepacs.errors import DataDirError
from safepacs.index import SqlIndex, migrate
from safepacs.services.delete import DeleteService
from safepacs.services.ingest import IngestService
from safepacs.services.query import QueryService
from safepacs.services.restore import RestoreService
from safepacs.services.retrieve import RetrieveService
from safepacs.storage import EnvelopeCipher, FileBlobStore, FileKeyProvider

__all__ = ["Archive", "check_data_dir", "configure_logging", "initialize", "open_archive"]

ADMIN_PASSWORD_FILE = "admin-password.txt"  # noqa: S105 - a file name, not a password


@dataclass
class Archive:
    """Everything one process needs to serve: backends and the services built on them."""

    settings: Settings
    index: SqlIndex
    ingest: IngestService
    query: QueryService
    retrieve: RetrieveService
    delete: DeleteService
    restore: RestoreService  # undo a deletion while its retention lasts
    logins: LoginService  # local password login, TOTP, browser sessions
    oidc: OidcVerifier  # bearer JWTs of the configured OpenID Connect providers
    auditor: Auditor  # what every access path records, into the tamper-evident trail (``auditor.sink``)

    def close(self) -> None:
        self.index.close()


def check_data_dir(settings: Settings) -> None:
    """Refuse a directory that is not an initialised, private SafePACS data directory."""
    data = settings.data_dir
    if not (data / "safepacs.toml").is_file():
        raise DataDirError(
            f"{data} is not a SafePACS data directory; create it with 'safepacs init --data {data}'"
        )
    mode = data.stat().st_mode & 0o777
    if mode & 0o077:
        raise DataDirError(f"{data} is accessible to other users (mode {mode:o}); run 'chmod 700 {data}'")


def open_archive(settings: Settings) -> Archive:
    """Open an initialised data directory: index, encrypted store, services."""
    check_data_dir(settings)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    index = SqlIndex(settings.index_url)
    cipher = EnvelopeCipher(FileKeyProvider(settings.keys_dir))
    blobs = FileBlobStore(settings.objects_dir, settings.data_dir / "tmp", fsync=settings.storage.fsync)
    trail = AuditTrail(index, Signer.load_or_create(settings.keys_dir))
    auditor = Auditor(trail, settings.server.ae_title, enabled=settings.audit.record)
    return Archive(
        settings=settings,
        index=index,
        ingest=IngestService(
            index,
            blobs,
            cipher,
            auditor,
            overwrite=settings.storage.overwrite,
            max_object_bytes=settings.storage.max_object_bytes,
        ),
        query=QueryService(
            index, auditor, max_results=settings.query.max_results, ae_title=settings.server.ae_title
        ),
        retrieve=RetrieveService(index, blobs, cipher, auditor),
        delete=DeleteService(
            index, blobs, auditor, retention=timedelta(days=settings.storage.retention_days)
        ),
        restore=RestoreService(index, blobs, cipher, auditor),
        logins=LoginService(index, cipher, settings.auth),
        oidc=OidcVerifier(settings.auth.oidc),
        auditor=auditor,
    )


def initialize(data_dir: Path) -> str:
    """Create a data directory (mode 0700): settings, keys, CA, index, admin; return the admin password.

    Refuses to touch a directory that exists already.
    """
    try:
        data_dir.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        raise DataDirError(
            f"{data_dir} exists already; SafePACS will not touch it (choose another --data)"
        ) from None
    except FileNotFoundError:
        raise DataDirError(f"the parent directory of {data_dir} does not exist") from None
    os.chmod(data_dir, 0o700)  # umask may have narrowed mkdir's mode; never widened
    write_private(data_dir / "safepacs.toml", render_default_toml().encode())
    keys = data_dir / "keys"
    keys.mkdir(mode=0o700)
    (data_dir / "tmp").mkdir(mode=0o700)
    (data_dir / "objects").mkdir(mode=0o700)
    FileKeyProvider.create(keys)
    Signer.load_or_create(keys)  # the Ed25519 key that signs the audit trail's checkpoints
    ca_cert, ca_key = create_ca()
    (keys / "ca.pem").write_bytes(ca_cert)
    write_private(keys / "ca.key", ca_key)
    server_cert, server_key = issue_certificate(ca_cert, ca_key, "SafePACS server")
    (keys / "server.pem").write_bytes(server_cert)
    write_private(keys / "server.key", server_key)
    url = f"sqlite:///{(data_dir / 'index.sqlite3').resolve()}"
    db = data_dir / "index.sqlite3"
    write_private(db, b"")
    migrate(url)
    password = generate_password()
    index = SqlIndex(url)
    try:
        index.add_user("admin", hash_password(password), frozenset({"admin"}), must_change_password=True)
    finally:
        index.close()
    write_private(data_dir / ADMIN_PASSWORD_FILE, (password + "\n").encode())
    return password


def configure_logging(level: str = "INFO", *, json: bool = False) -> None:
    """Structured logs to standard error, once per process.  Library modules use ``logging.getLogger``.

    Tracebacks are plain text: structlog's default (rich, when installed) prints every frame's local
    variables - request values, tokens, patient data - and took seconds per traceback on a busy
    machine, which held up shutdown.
    """
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs identifiers (names, IDs) at INFO/DEBUG: keep it to warnings, and never identifiers.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
