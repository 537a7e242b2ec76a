"""The settings model and its sources."""

from __future__ import annotations

import contextvars
import os
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from safepacs.errors import ConfigError

DATA_ENV = "SAFEPACS_DATA"
DEFAULT_DATA_DIR = "safepacs-data"
CONFIG_FILE = "safepacs.toml"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars

_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("safepacs_toml", default=None)


def validate_ae_title(value: str) -> str:
    """PS3.5 6.2: AE titles are 1-16 characters of the default repertoire, no backslash."""
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value) or len(value) > 16:
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Section):
    ae_title: str = Field("SAFEPACS", description="AE title this archive answers to (called AE title).")
    bind: str = Field("127.0.0.1", description="Address the listeners bind to; loopback unless you mean it.")
    dicom_port: int = Field(11112, ge=0, le=65535, description="Plain DICOM (DIMSE) port.")
    dicom_tls_port: int = Field(
        2762, ge=0, le=65535, description="DICOM TLS port (PS3.15 B.12 BCP 195 profile, mutual TLS)."
    )
    http_port: int = Field(8443, ge=0, le=65535, description="HTTPS port for DICOMweb and the web UI.")
    workers: int = Field(
        0, ge=0, le=64, description="DIMSE worker processes sharing the port (0: one per CPU core)."
    )
    max_associations: int = Field(
        16,
        ge=1,
        le=1024,
        description="Associations admitted at once per worker process; more are rejected (connections "
        "not admitted yet do not count).",
    )
    associate_timeout: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Seconds a new DICOM connection has to complete its TLS handshake and send its "
        "A-ASSOCIATE-RQ; then it is closed.",
    )
    max_pending_per_address: int = Field(
        16,
        ge=1,
        le=1024,
        description="Connections from one address that may await admission at once, per worker process; "
        "a further one closes the oldest that has not sent its A-ASSOCIATE-RQ yet.",
    )
    max_pending: int = Field(
        256,
        ge=1,
        le=768,
        description="Connections awaiting admission at once, per worker process (all addresses); "
        "keeps each worker's sockets well under 1024.",
    )
    max_pdu_size: int = Field(
        1048576, ge=0, description="Largest P-DATA PDU we accept (bytes; 0 means no limit)."
    )
    network_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds of silence before a connection is dropped (not while a request is served).",
    )
    acse_timeout: float = Field(30.0, gt=0, description="Seconds to wait for association messages.")
    dimse_timeout: float = Field(60.0, gt=0, description="Seconds to wait for DIMSE messages.")
    dimse_send_path: bool = Field(
        True,
        description="Send C-GET/C-MOVE sub-operations in the stored transfer syntax straight from the stored "
        "bytes, and C-FIND answers straight from the index rows (false: through pynetdicom's encoders, "
        "the slower reference path).",
    )
    unchecked_pynetdicom: bool = Field(
        False,
        description="Serve DICOM with a pynetdicom release SafePACS's DICOM engine was not checked with "
        "(a warning is logged); false: safepacs serve refuses to start with one.",
    )
    max_request_bytes: int = Field(
        512 * 1024**2, ge=1024, description="Largest HTTPS request body (a STOW-RS upload), in bytes."
    )
    max_stow_parts: int = Field(
        2000,
        ge=1,
        le=1_000_000,
        description="Most instances (multipart parts) in one STOW-RS request; more: 413, nothing stored.",
    )
    http_head_timeout: float = Field(
        5.0,
        gt=0,
        le=120,
        description="Seconds a new HTTPS connection has to complete its TLS handshake and send a request's "
        "head (and a kept-alive one to finish a head it has begun); then it is closed.",
    )
    http_max_connections: int = Field(
        512,
        ge=1,
        le=16384,
        description="HTTPS connections at once; a further one closes the longest idle one, or is closed "
        "itself when every one is busy.",
    )
    shutdown_grace: float = Field(
        10.0,
        ge=0,
        le=3600,
        description="Seconds running requests and associations may take to finish on SIGTERM before they "
        "are cut off; every process has stopped within this plus 5 seconds.",
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return validate_ae_title(value)


_INDEX_URL_RE = re.compile(r"^(sqlite|postgresql)(\+[A-Za-z0-9_]+)?://", re.IGNORECASE)


class IndexSettings(_Section):
    url: str | None = Field(
        None,
        description="SQLAlchemy URL of the index (PostgreSQL); leave it out for the SQLite file "
        "'index.sqlite3' in the data directory.",
    )

    @field_validator("url")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        """An empty URL is an error, never the SQLite default: a blank ``SAFEPACS_INDEX__URL=`` in
        front of a settings file that names PostgreSQL must not open a fresh, empty SQLite index."""
        if value is None:
            return None
        url = value.strip()
        if not url:
            raise ValueError(
                "is empty; leave the setting out to use the SQLite file index.sqlite3 in the data "
                "directory, or name the database (postgresql+psycopg://USER@HOST:5432/DB)"
            )
        match = _INDEX_URL_RE.match(url)
        if match is None:
            raise ValueError(
                "must name SQLite (sqlite:///FILE) or PostgreSQL (postgresql+psycopg://USER@HOST:5432/DB)"
            )
        database = url[match.end() :]
        memory = database in ("", "/", "/:memory:") or database.startswith(("/:memory:", "/file:"))
        if match.group(1).lower() == "sqlite" and (memory or "mode=memory" in database.lower()):
            raise ValueError("names no SQLite file (an in-memory index would be lost at exit)")
        return url


class StorageSettings(_Section):
    path: str = Field(
        "", description="Directory of the encrypted object store; empty: 'objects' in the data dir."
    )
    overwrite: bool = Field(
        False,
        description="Replace a stored instance when the same SOP Instance UID arrives with other bytes "
        "(otherwise the received one is refused: C-STORE 0xC111).",
    )
    max_object_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Largest single DICOM object accepted, in bytes."
    )
    fsync: bool = Field(True, description="fsync objects and directories before acknowledging (keep on).")
    min_free_bytes: int = Field(
        1024**3,
        ge=0,
        description="Stores are refused (C-STORE 0xA700, STOW-RS 507) while the object store's or the "
        "index's file system has less free space than this, so that reads and their audit records "
        "go on (0: never refuse).",
    )
    audit_reserve_bytes: int = Field(
        64 * 1024**2,
        ge=0,
        description="Disk space 'serve' preallocates beside the SQLite index and releases when the disk "
        "is full, so that reads can still be recorded (0: none).",
    )
    retention_days: float = Field(
        30.0,
        ge=0,
        le=3650,
        description="Days a deleted instance's bytes are kept (restorable by an administrator) before "
        "they are destroyed; 'safepacs purge --now' destroys them earlier.",
    )


class QuerySettings(_Section):
    max_results: int = Field(
        500,
        ge=0,
        description="Most C-FIND results per query; past it the query must be narrowed (0: no limit).",
    )
    max_scoped_results: int = Field(
        20_000,
        ge=1,
        le=1_000_000,
        description="Most results of a query within one study or series (it names one Study or Series "
        "Instance UID), e.g. a viewer listing a study's instances; at least max_results.",
    )

    @field_validator("max_scoped_results")
    @classmethod
    def _at_least_max_results(cls, value: int, info: ValidationInfo) -> int:
        max_results = info.data.get("max_results") or 0
        if value < max_results:
            raise ValueError(
                f"must be at least query.max_results ({max_results}): a query within one study or "
                "series may answer as much as any other"
            )
        return value


#: JWS algorithms an OIDC provider may sign with: asymmetric only.  ``none`` and the HMAC family (HS*)
#: are never accepted - with HS256 anyone holding the provider's *public* key could forge tokens.
OIDC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class OidcIssuerSettings(_Section):
    """One OpenID Connect provider whose bearer JWTs DICOMweb accepts (``[[auth.oidc]]``).

    With a ``client_id`` the web UI also offers "Sign in with ``display_name``": the authorization code
    flow with PKCE (S256) at the endpoints of the issuer's discovery document
    (``{issuer}/.well-known/openid-configuration``, fetched over https like the JWKS).  The provider
    must list ``https://<SafePACS host>/login/oidc/callback`` as a redirect URI of that client.
    """

    issuer: str = Field(description="The provider's issuer ('iss' claim) exactly as it writes it; https.")
    audience: str = Field(description="The audience ('aud') tokens must name: SafePACS's client id there.")
    jwks_uri: str = Field(description="https URL of the provider's JSON Web Key Set (its signing keys).")
    ca_file: str = Field("", description="PEM file of the CAs trusted for jwks_uri; empty: the system CAs.")
    algorithms: tuple[str, ...] = Field(
        ("RS256", "ES256", "PS256"), description="Accepted signature algorithms (asymmetric only)."
    )
    username_claim: str = Field(
        "sub", description="Claim naming the person ('sub' is stable; 'preferred_username' is not unique)."
    )
    roles_claim: str = Field(
        "roles", description="Claim with the person's roles or groups; a dotted path like realm_access.roles."
    )
    role_map: dict[str, str] = Field(
        default_factory=dict, description="Claim value -> SafePACS role; values not listed grant nothing."
    )
    leeway_seconds: int = Field(30, ge=0, le=60, description="Clock skew allowed on exp and nbf (seconds).")
    jwks_timeout: float = Field(5.0, gt=0, le=30, description="Seconds a JWKS fetch may take.")
    jwks_cache_seconds: int = Field(300, ge=10, le=86400, description="Seconds the JWKS is cached.")
    jwks_refresh_cooldown: float = Field(
        30.0, ge=0, le=3600, description="Least seconds between JWKS re-fetches caused by an unknown key id."
    )
    client_id: str | None = Field(
        None, description="SafePACS's client id at the provider; set it to offer sign-in in the web UI."
    )
    client_secret_file: Path | None = Field(
        None, description="File holding the client secret of a confidential client (PKCE is used anyway)."
    )
    display_name: str | None = Field(
        None, max_length=64, description="Name on the 'Sign in with' button; the issuer's host when unset."
    )
    scopes: tuple[str, ...] = Field(
        ("openid", "profile", "email"), description="Scopes asked for at sign-in; 'openid' is required."
    )

    @field_validator("issuer", "jwks_uri")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://") or len(value) <= len("https://"):
            raise ValueError("must be an https:// URL (tokens and keys are never trusted over plain HTTP)")
        return value

    @field_validator("audience", "username_claim", "roles_claim")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in value if a not in OIDC_ALGORITHMS]
        if bad:
            allowed = ", ".join(sorted(OIDC_ALGORITHMS))
            raise ValueError(f"{bad[0]!r} is not accepted; use asymmetric algorithms ({allowed})")
        if not value:
            raise ValueError("name at least one algorithm")
        return value

    @field_validator("client_id", "display_name")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip() or not value.isprintable():
            raise ValueError("must be printable text, not empty")
        return value.strip()

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in value:
            raise ValueError("must include 'openid' (without it the provider issues no ID token)")
        bad = [v for v in value if not v or not all("!" <= c <= "~" and c not in '"\\' for c in v)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a scope token (RFC 6749 3.3)")
        return value

    @model_validator(mode="after")
    def _client(self) -> OidcIssuerSettings:
        if self.client_secret_file is not None and self.client_id is None:
            raise ValueError("client_secret_file needs client_id")
        return self


class AuthSettings(_Section):
    max_failed_logins: int = Field(
        5, ge=1, le=100, description="Consecutive failed logins after which an account is locked."
    )
    lockout_minutes: float = Field(15.0, gt=0, le=1440, description="Minutes a locked account stays locked.")
    totp_required_roles: tuple[str, ...] = Field(
        ("admin",), description="Roles that must log in with a TOTP code (safepacs user totp-enroll)."
    )
    session_idle_minutes: float = Field(
        30.0, gt=0, le=1440, description="Minutes without a request after which a browser session ends."
    )
    session_max_hours: float = Field(
        12.0, gt=0, le=168, description="Hours after login at which a browser session ends in any case."
    )
    oidc: tuple[OidcIssuerSettings, ...] = Field(
        (), description="OpenID Connect providers whose bearer JWTs are accepted ([[auth.oidc]] tables)."
    )


class AuditCollectorSettings(_Section):
    """An audit record repository the trail is forwarded to, syslog over TLS (``[[audit.collectors]]``)."""

    name: str = Field(description="A name for this collector; its forwarding position is kept under it.")
    host: str = Field(description="Host name or IP address of the collector; its certificate must name it.")
    port: int = Field(6514, ge=1, le=65535, description="TCP port of syslog over TLS (6514, RFC 5425).")
    ca_file: str = Field(description="PEM file of the CA(s) that issued the collector's certificate.")
    client_cert: str = Field("", description="PEM certificate to present to the collector (mutual TLS).")
    client_key: str = Field("", description="PEM private key of client_cert.")

    @field_validator("name", "host", "ca_file")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()


class AuditSettings(_Section):
    record: bool = Field(
        True,
        description=(
            "Record every access to patient data; false only to measure what auditing costs "
            "(start-up then records 'Audit Recording Stopped')."
        ),
    )
    forward_interval: float = Field(
        1.0, gt=0, le=3600, description="Seconds between looks for new audit records to forward."
    )
    source_id: str = Field("", description="AuditSourceID of forwarded messages; empty: server.ae_title.")
    site_id: str = Field("", description="AuditEnterpriseSiteID of forwarded messages (e.g. the hospital).")
    # Last, so that the [[audit.collectors]] example ends the [audit] table in safepacs.toml.
    collectors: tuple[AuditCollectorSettings, ...] = Field(
        (), description="Audit record repositories the trail is forwarded to ([[audit.collectors]] tables)."
    )

    @field_validator("collectors")
    @classmethod
    def _complete(cls, value: tuple[AuditCollectorSettings, ...]) -> tuple[AuditCollectorSettings, ...]:
        names = [c.name for c in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"collector name {twice[0]!r} is used twice; give each collector its own name")
        for c in value:
            if bool(c.client_cert) != bool(c.client_key):
                raise ValueError(f"collector {c.name!r}: set client_cert and client_key together")
        return value


class UiSettings(_Section):
    viewer_dir: str = Field(
        "",
        description="Directory of the OHIF viewer ('safepacs viewer install' puts it there); empty: "
        "share/safepacs/ohif in the Python environment SafePACS runs in.",
    )


class Settings(BaseSettings):
    """All settings.  Sections map to TOML tables and to ``SAFEPACS_<SECTION>__<KEY>``."""

    model_config = SettingsConfigDict(
        env_prefix="SAFEPACS_",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )

    server: ServerSettings = Field(default_factory=ServerSettings)  # type: ignore[arg-type]
    index: IndexSettings = Field(default_factory=IndexSettings)  # type: ignore[arg-type]
    storage: StorageSettings = Field(default_factory=StorageSettings)  # type: ignore[arg-type]
    query: QuerySettings = Field(default_factory=QuerySettings)  # type: ignore[arg-type]
    auth: AuthSettings = Field(default_factory=AuthSettings)  # type: ignore[arg-type]
    audit: AuditSettings = Field(default_factory=AuditSettings)  # type: ignore[arg-type]
    ui: UiSettings = Field(default_factory=UiSettings)  # type: ignore[arg-type]

    data_dir: Path = Field(Path(DEFAULT_DATA_DIR), exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None and path.exists():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # Derived locations -------------------------------------------------
    @property
    def index_url(self) -> str:
        if self.index.url is not None:
            return self.index.url
        return f"sqlite:///{(self.data_dir / 'index.sqlite3').resolve()}"

    @property
    def objects_dir(self) -> Path:
        return Path(self.storage.path) if self.storage.path else self.data_dir / "objects"

    @property
    def viewer_dir(self) -> Path:
        """Where the OHIF viewer is installed (``safepacs viewer install``), outside the data directory."""
        if self.ui.viewer_dir:
            return Path(self.ui.viewer_dir)
        return Path(sys.prefix) / "share" / "safepacs" / "ohif"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def scan_report_file(self) -> Path:
        """The latest ``safepacs scan --save-to-data`` report (JSON, counts only, never patient data),
        which the web UI's posture page shows."""
        return self.data_dir / "reports" / "scan-latest.json"

    @property
    def audit_head_file(self) -> Path:
        """The audit trail's signed head, kept outside the index (``safepacs.db.headfile``)."""
        return self.data_dir / "audit-head"


def data_dir_from(option: str | os.PathLike[str] | None) -> Path:
    """The data directory: the ``--data`` option, else ``$SAFEPACS_DATA``, else ``./safepacs-data``."""
    if option:
        return Path(option)
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)


def load_settings(data_dir: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Read and validate the settings of ``data_dir``; ``overrides`` (from the command line) win over all."""
    token = _toml_path.set(data_dir / CONFIG_FILE)
    try:
        clean = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in (overrides or {}).items()}
        merged: dict[str, Any] = {k: v for k, v in clean.items() if v}
        settings = Settings(data_dir=data_dir, **merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"setting '{where}' is invalid: {first['msg']}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {data_dir / CONFIG_FILE}: {exc}") from exc
    finally:
        _toml_path.reset(token)
    _refuse_insecure(settings)
    return settings


def _refuse_insecure(settings: Settings) -> None:
    if not settings.storage.fsync and not os.environ.get("SAFEPACS_UNSAFE_NO_FSYNC_I_ACCEPT_DATA_LOSS"):
        raise ConfigError(
            "setting 'storage.fsync' is off: acknowledged instances could be lost on a crash; "
            "turn it back on (only benchmarks may turn it off, "
            "with SAFEPACS_UNSAFE_NO_FSYNC_I_ACCEPT_DATA_LOSS=1)"
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


#: Settings shown as a commented example instead of ``key = default``: lists of tables, and settings
#: whose default is to leave them out.
_TOML_EXAMPLES: dict[str, dict[str, list[str]]] = {
    "index": {"url": ['# url = "postgresql+psycopg://safepacs@db.example.org:5432/safepacs"']},
    "auth": {
        "oidc": [
            "# [[auth.oidc]]",
            '# issuer = "https://login.example.org/realms/hospital"',
            '# audience = "safepacs"',
            '# jwks_uri = "https://login.example.org/realms/hospital/protocol/openid-connect/certs"',
            '# roles_claim = "realm_access.roles"',
            '# role_map = { "pacs-radiologists" = "radiologist", "pacs-admins" = "admin" }',
            "# # For 'Sign in with' in the web UI (redirect URI: https://<host>/login/oidc/callback):",
            '# client_id = "safepacs-web"',
            '# display_name = "Hospital login"',
            '# client_secret_file = "/etc/safepacs/oidc-client-secret"',
        ]
    },
    "audit": {
        "collectors": [
            "# [[audit.collectors]]",
            '# name = "siem"',
            '# host = "audit.example.org"',
            "# port = 6514",
            '# ca_file = "/etc/safepacs/audit-ca.pem"',
            '# client_cert = ""',
            '# client_key = ""',
        ]
    },
}


def render_default_toml() -> str:
    """The ``safepacs.toml`` that ``init`` writes: every setting, its default and a one-line comment."""
    lines = [
        "# SafePACS settings.  Every setting is listed with its default.",
        "# Each can also be set as SAFEPACS_<SECTION>__<KEY> in the environment",
        "# (e.g. SAFEPACS_SERVER__DICOM_PORT).",
        "",
    ]
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            continue
        lines.append(f"[{name}]")
        for key, sub in annotation.model_fields.items():
            if key in _TOML_EXAMPLES.get(name, {}):  # shown as a commented example
                lines.append(f"# {sub.description}")
                lines.extend(_TOML_EXAMPLES[name][key])
                continue
            lines.append(f"# {sub.description}")
            lines.append(f"{key} = {_toml_value(sub.default)}")
        lines.append("")
    return "\n".join(lines)
