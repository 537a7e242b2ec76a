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
import sqlalchemy as sa
import structlog

from safepacs.audit.chain import Signer
from safepacs.auth.login import LoginService
from safepacs.auth.oidc import OidcVerifier
from safepacs.auth.oidc_login import OidcSignIn
from safepacs.auth.passwords import generate_password, hash_password
from safepacs.auth.pki import create_ca, issue_certificate, write_private
from safepacs.config import Settings, render_default_toml
from safepacs.db.auditlog import SqlAuditLog
from safepacs.db.database import MIGRATIONS, Database, migrate
from safepacs.db.directory import SqlDirectory
from safepacs.db.instances import SqlInstances
from safepacs.db.ports import AuditLog, Directory, Instances
from safepacs.errors import ConfigError, DataDirError
from safepacs.services.admin import AdminService
from safepacs.services.audit import Auditor
from safepacs.services.audittrail import AuditSearchService, AuditTrail
from safepacs.services.delete import DeleteService
from safepacs.services.gate import Gate
from safepacs.services.ingest import IngestService
from safepacs.services.query import QueryService
from safepacs.services.restore import RestoreService
from safepacs.services.retrieve import RetrieveService
from safepacs.services.trail import TrailService
from safepacs.storage import EnvelopeCipher, FileBlobStore, FileKeyProvider
from safepacs.storage.space import AuditReserve, FreeSpace

__all__ = [
    "Administration",
    "Archive",
    "Repositories",
    "audit_reserve",
    "check_data_dir",
    "check_index_choice",
    "configure_logging",
    "free_space",
    "initialize",
    "open_admin",
    "open_archive",
    "open_repositories",
    "open_repositories_read_only",
    "sqlite_database",
    "upgrade_index",
]

ADMIN_PASSWORD_FILE = "admin-password.txt"  # noqa: S105 - a file name, not a password
RESERVE_SUFFIX = "-audit-reserve"  # beside the SQLite index: index.sqlite3-audit-reserve
INDEX_BACKEND_FILE = "index-backend"  # "postgresql" once the archive was opened on PostgreSQL


@dataclass(frozen=True)
class Repositories:
    """One :class:`~safepacs.db.database.Database` and the repositories built on it (what the command
    line opens without the rest of the archive, and tests)."""

    db: Database
    instances: SqlInstances
    directory: SqlDirectory
    audit_log: SqlAuditLog

    def close(self) -> None:
        self.db.close()


def open_repositories(url: str) -> Repositories:
    """The database at ``url`` (its schema not created nor upgraded: :func:`migrate`) and its repositories."""
    db = Database(url)
    return Repositories(db, SqlInstances(db), SqlDirectory(db), SqlAuditLog(db))


def upgrade_index(settings: Settings) -> None:
    """Create the index schema, or upgrade it to this SafePACS's (Alembic, serialized between processes)."""
    migrate(settings.index_url)


def open_repositories_read_only(url: str) -> Repositories:
    """The index opened for reading only: its schema is checked, never created or upgraded (the doctor
    changes nothing, and runs on a read-only data directory).  SQLite is opened with ``mode=ro``,
    PostgreSQL sessions with ``default_transaction_read_only``."""
    from urllib.parse import quote

    import sqlalchemy as sa
    from alembic.script import ScriptDirectory

    from safepacs.errors import DatabaseError

    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        path = Path(parsed.database).resolve()
        if not path.is_file():
            raise DatabaseError(f"the index {path} does not exist; 'safepacs doctor' does not create it")
        query = {**parsed.query, "mode": "ro", "uri": "true"}
        parsed = parsed.set(database=f"file:{quote(str(path))}", query=query)
    elif parsed.get_backend_name() == "postgresql":
        # Every transaction of this connection read-only: the server refuses a write, whatever runs.
        options = parsed.query.get("options", "")
        options = " ".join(options) if isinstance(options, tuple) else options
        read_only = f"{options} -c default_transaction_read_only=on".strip()
        parsed = parsed.update_query_dict({"options": read_only})
    url = parsed.render_as_string(hide_password=False)
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    engine = sa.create_engine(url, hide_parameters=True)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.SQLAlchemyError as exc:
        raise DatabaseError(
            f"the index cannot be read ({type(exc).__name__}): no schema, or index.url is wrong; "
            "'safepacs doctor' does not create or change it"
        ) from exc
    finally:
        engine.dispose()
    if version != head:
        raise DatabaseError(
            f"the index schema is at revision {version}, this SafePACS expects {head}; 'safepacs doctor' "
            "does not change it: upgrade it with 'safepacs serve' (run once), then run the doctor again"
        )
    return open_repositories(url)


@dataclass
class Archive:
    """Everything one process needs to serve: backends and the services built on them."""

    settings: Settings
    db: Database  # engines and transactions, shared by the repositories below
    instances: Instances  # instance rows, queries, the trash
    directory: Directory  # peers, users, tokens, logins, certificates, access rules
    audit_log: AuditLog  # the audit trail's tables
    ingest: IngestService
    query: QueryService
    retrieve: RetrieveService
    delete: DeleteService
    restore: RestoreService  # undo a deletion while its retention lasts
    logins: LoginService  # local password login, TOTP, browser sessions
    oidc: OidcVerifier  # bearer JWTs of the configured OpenID Connect providers
    oidc_sign_in: OidcSignIn  # "Sign in with" for the providers with a client_id (web UI)
    gate: Gate  # who may do what (every refusal recorded); who a peer, user or token is
    auditor: Auditor  # what every access path records, into the tamper-evident trail (``auditor.sink``)
    audits: AuditSearchService  # the trail's search for auditors (``/api/audit``), itself recorded
    admin: AdminService  # the administrative changes (the web UI's pages), always recorded
    space: FreeSpace  # the low-water mark under which stores are refused (storage.min_free_bytes)
    reserve: AuditReserve | None  # disk space kept for the audit trail (SQLite index only)

    def close(self) -> None:
        self.db.close()


def check_data_dir(settings: Settings) -> None:
    """Refuse a directory that is not an initialised, private SafePACS data directory, or settings
    that name another kind of index than the one it uses (:func:`check_index_choice`)."""
    data = settings.data_dir
    if not (data / "safepacs.toml").is_file():
        raise DataDirError(
            f"{data} is not a SafePACS data directory; create it with 'safepacs init --data {data}'"
        )
    mode = data.stat().st_mode & 0o777
    if mode & 0o077:
        raise DataDirError(f"{data} is accessible to other users (mode {mode:o}); run 'chmod 700 {data}'")
    check_index_choice(settings)


def check_index_choice(settings: Settings, *, record: bool = True) -> None:
    """A data directory whose index was opened on PostgreSQL never opens a SQLite index.

    ``init`` creates a SQLite index; once a command opens the archive with ``index.url`` naming
    PostgreSQL, ``DATA/index-backend`` records it (``record``; the doctor only reads).  From then on
    settings that name SQLite - the setting dropped from safepacs.toml, an environment that overrides
    it - are a configuration error, instead of an empty index that answers every query with nothing
    and whose audit trail verifies as "intact: 0 records"."""
    marker = settings.data_dir / INDEX_BACKEND_FILE
    postgres = settings.index_url.lower().startswith("postgresql")
    try:
        recorded = marker.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        recorded = ""
    except OSError as exc:
        raise DataDirError(f"cannot read {marker} ({exc.strerror})") from exc
    if recorded == "postgresql" and not postgres:
        raise ConfigError(
            f"setting 'index.url' names SQLite, but this data directory's index is on PostgreSQL "
            f"({marker}); set index.url to its PostgreSQL URL (delete {marker} only if the index was "
            "moved back to SQLite on purpose)"
        )
    if record and postgres and not recorded:
        try:
            write_private(marker, b"postgresql\n")
        except DataDirError:
            if not marker.is_file():  # not another process recording it at the same moment
                raise


def open_archive(settings: Settings) -> Archive:
    """Open an initialised data directory: index, encrypted store, services."""
    check_data_dir(settings)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    repos = open_repositories(settings.index_url)
    instances = repos.instances
    cipher = EnvelopeCipher(FileKeyProvider(settings.keys_dir))
    blobs = FileBlobStore(settings.objects_dir, settings.data_dir / "tmp", fsync=settings.storage.fsync)
    reserve = audit_reserve(settings)
    space = free_space(settings, reserve)
    trail = AuditTrail(
        repos.audit_log, Signer.load_or_create(settings.keys_dir), settings.audit_head_file, reserve
    )
    auditor = Auditor(trail, settings.server.ae_title, enabled=settings.audit.record)
    gate = Gate(repos.directory, auditor)
    oidc = OidcVerifier(settings.auth.oidc)
    return Archive(
        settings=settings,
        db=repos.db,
        instances=instances,
        directory=repos.directory,
        audit_log=repos.audit_log,
        ingest=IngestService(
            instances,
            blobs,
            cipher,
            auditor,
            gate,
            overwrite=settings.storage.overwrite,
            max_object_bytes=settings.storage.max_object_bytes,
            space=space,
        ),
        query=QueryService(
            instances,
            auditor,
            gate,
            max_results=settings.query.max_results,
            max_scoped_results=settings.query.max_scoped_results,
            ae_title=settings.server.ae_title,
        ),
        retrieve=RetrieveService(instances, blobs, cipher, auditor, gate),
        delete=DeleteService(
            instances, blobs, auditor, gate, retention=timedelta(days=settings.storage.retention_days)
        ),
        restore=RestoreService(instances, blobs, cipher, auditor),
        logins=LoginService(repos.directory, cipher, settings.auth),
        oidc=oidc,
        oidc_sign_in=OidcSignIn(settings.auth.oidc, oidc, cipher),
        gate=gate,
        auditor=auditor,
        audits=AuditSearchService(repos.audit_log, gate, auditor, trail),
        admin=_admin_service(settings, repos, trail),
        space=space,
        reserve=reserve,
    )


@dataclass
class Administration:
    """What the ``safepacs`` administrative commands use: the changes, and reading the audit trail."""

    repos: Repositories
    admin: AdminService
    trail: TrailService

    def close(self) -> None:
        self.repos.close()


def open_admin(settings: Settings) -> Administration:
    """The administrative services of an initialised data directory whose index is migrated.  Changes
    are recorded on the trail whatever ``audit.record`` says; the key that seals TOTP secrets is read
    only when one is enrolled."""
    check_data_dir(settings)
    repos = open_repositories(settings.index_url)
    try:
        trail = AuditTrail(
            repos.audit_log, Signer.load_or_create(settings.keys_dir), settings.audit_head_file
        )
    except BaseException:
        repos.close()
        raise
    return Administration(
        repos,
        _admin_service(settings, repos, trail),
        TrailService(repos.audit_log, trail, settings.audit_head_file),
    )


def _admin_service(settings: Settings, repos: Repositories, trail: AuditTrail) -> AdminService:
    """The administrative service over ``repos``, recording on ``trail`` whatever ``audit.record``
    says (administration is always recorded: the CLI's and the web UI's alike); the key that seals
    TOTP secrets is read only when one is enrolled."""
    auditor = Auditor(trail, settings.server.ae_title)  # enabled, whatever audit.record says
    keys_dir = settings.keys_dir

    def sealer() -> EnvelopeCipher:
        return EnvelopeCipher(FileKeyProvider(keys_dir))

    return AdminService(repos.directory, repos.instances, auditor, sealer)


def sqlite_database(settings: Settings) -> Path | None:
    """The SQLite index file, or None when the index is on PostgreSQL."""
    url = sa.make_url(settings.index_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    return Path(url.database)


def free_space(settings: Settings, reserve: AuditReserve | None = None) -> FreeSpace:
    """The low-water mark on the file systems of the object store, of the SQLite index and of the audit
    trail's head file (with the audit ``reserve``: until a released one is refilled, stores stay
    refused)."""
    database = sqlite_database(settings)
    paths = [
        settings.objects_dir,
        *([database.parent] if database is not None else []),
        settings.audit_head_file.parent,
    ]
    return FreeSpace(paths, settings.storage.min_free_bytes, reserve=reserve)


def audit_reserve(settings: Settings) -> AuditReserve | None:
    """The disk space kept for the audit trail, beside the SQLite index (None on PostgreSQL, whose
    disk is the database server's, or when ``storage.audit_reserve_bytes`` is 0)."""
    database = sqlite_database(settings)
    if database is None or settings.storage.audit_reserve_bytes <= 0:
        return None
    return AuditReserve(
        database.with_name(database.name + RESERVE_SUFFIX), settings.storage.audit_reserve_bytes
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
    repos = open_repositories(url)
    try:
        repos.directory.add_user(
            "admin", hash_password(password), frozenset({"admin"}), must_change_password=True
        )
    finally:
        repos.close()
    write_private(data_dir / ADMIN_PASSWORD_FILE, (password + "\n").encode())
    return password


def configure_logging(level: str = "INFO", *, json: bool = False) -> None:
    """Structured logs to standard error, once per process.  Library modules use ``logging.getLogger``.

    A logged exception shows its type and its frames (``file:line in function``), never the values its
    frames held nor (outside SafePACS's own errors) its message, in the console and the JSON format
    alike (:mod:`safepacs._logging`); uncaught exceptions of threads and of the process are logged the
    same way."""
    from safepacs._logging import RedactExceptionText, exception_processor, install_hooks, render_exception

    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=render_exception)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exception_processor,  # before either renderer: its exc_info never reaches them
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(RedactExceptionText())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    install_hooks()
    # pynetdicom logs identifiers (names, IDs) at INFO/DEBUG: keep it to warnings, and never identifiers.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
