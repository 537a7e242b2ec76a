"""``safepacs doctor``: the local SafePACS reviewed the way ``safepacs scan`` sees others.

Two halves: a review of the settings, the files of the data directory, the peer table and the accounts
(given as plain values, so this module reads no database), and the network checks of the scanner against
the local listeners.  A freshly ``init``-ed data directory has no finding above low but one: the index
holds patient data in plain text (medium), which no setting can change yet.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from safepacs.config import Settings
from safepacs.scan._model import Finding, ScanReport, Severity
from safepacs.scan.engine import ScanOptions, run_scan
from safepacs.scan.targets import parse_target
from safepacs.types import Peer, Service, TlsMode

__all__ = ["AccountInfo", "DiskInfo", "DoctorInput", "review_config", "run_doctor"]

ADMIN_PASSWORD_FILE = "admin-password.txt"  # noqa: S105 - a file name (safepacs.app writes it at init)
_CERT_WARN_DAYS = 30
_BROAD_V4, _BROAD_V6 = 24, 120  # peers admitted from networks wider than these prefixes


@dataclass(frozen=True)
class AccountInfo:
    """What the review needs of one user account."""

    name: str
    roles: frozenset[str]
    disabled: bool
    must_change_password: bool
    totp_enrolled: bool


@dataclass(frozen=True)
class DiskInfo:
    """What the review needs about disk space, measured by the caller."""

    # (path, bytes available, bytes needed: storage.min_free_bytes and a released audit reserve)
    below_mark: Sequence[tuple[str, int, int]] = ()
    reserve_path: str | None = None  # the audit reserve file; None: none is kept (PostgreSQL, or 0 bytes)
    reserve_held: int | None = None  # the bytes it holds (0: released); None: no such file


@dataclass(frozen=True)
class DoctorInput:
    settings: Settings
    peers: Sequence[Peer]
    accounts: Sequence[AccountInfo]
    disk: DiskInfo = DiskInfo()


def _f(check: str, severity: Severity, target: str, title: str, detail: str, remediation: str) -> Finding:
    return Finding(check, severity, target, title, detail, remediation, service="config", product="SafePACS")


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.lstat().st_mode)
    except OSError:
        return None


def _files(inp: DoctorInput) -> list[Finding]:
    s = inp.settings
    data = s.data_dir
    out: list[Finding] = []
    mode = _mode(data)
    if mode is not None and mode & 0o077:
        out.append(
            _f(
                "config.data-permissions",
                Severity.HIGH,
                str(data),
                "Data directory open to other users",
                f"Mode {mode:o}: other accounts on this machine can reach the index and the objects.",
                f"chmod 700 {data}",
            )
        )
    keys = s.keys_dir
    if keys.is_dir():
        for path in sorted(keys.iterdir()):
            if not path.is_file():
                continue
            try:
                public = path.read_bytes()[:64].startswith(b"-----BEGIN CERTIFICATE-----")
            except OSError:
                continue
            m = _mode(path)
            if not public and m is not None and m & 0o077:
                out.append(
                    _f(
                        "config.key-permissions",
                        Severity.HIGH,
                        str(path),
                        "Private key readable by others",
                        f"Mode {m:o}: whoever reads it can decrypt objects, impersonate the server "
                        "or sign audit checkpoints.",
                        f"chmod 600 {path}",
                    )
                )
    for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm", "safepacs.toml"):
        path = data / name
        m = _mode(path)
        if m is not None and m & 0o077:
            sev = Severity.LOW if name == "safepacs.toml" else Severity.MEDIUM
            out.append(
                _f(
                    "config.file-permissions",
                    sev,
                    str(path),
                    f"{name} readable by others",
                    f"Mode {m:o}.",
                    f"chmod 600 {path}",
                )
            )
    for folder in (s.objects_dir, data / "tmp"):
        m = _mode(folder)
        if m is not None and m & 0o077:
            out.append(
                _f(
                    "config.file-permissions",
                    Severity.MEDIUM,
                    str(folder),
                    "Object store open to other users",
                    f"Mode {m:o} (the objects are encrypted, but their number and sizes show).",
                    f"chmod 700 {folder}",
                )
            )
    password_file = data / ADMIN_PASSWORD_FILE
    if password_file.exists():
        still_initial = any("admin" in a.roles and a.must_change_password for a in inp.accounts)
        out.append(
            _f(
                "config.initial-password",
                Severity.LOW if still_initial else Severity.MEDIUM,
                str(password_file),
                "The one-time admin password is still on disk",
                "It is needed only for the first login."
                + (
                    ""
                    if still_initial
                    else " The administrator changed it already, so the file may hold a reused password."
                ),
                f"Log in once, change the password, then delete {password_file}.",
            )
        )
    out += _certificate(keys / "server.pem", "server certificate")
    out += _certificate(keys / "ca.pem", "CA certificate")
    return out


def _certificate(path: Path, what: str) -> list[Finding]:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return []
    days = (cert.not_valid_after_utc - datetime.now(UTC)).days
    if days < 0:
        return [
            _f(
                "config.certificate",
                Severity.HIGH,
                str(path),
                f"The {what} has expired",
                "Clients refuse the HTTPS listener.",
                "Issue a new one (a new 'safepacs init' CA, or your own CA).",
            )
        ]
    if days < _CERT_WARN_DAYS:
        return [
            _f(
                "config.certificate",
                Severity.MEDIUM,
                str(path),
                f"The {what} expires in {days} days",
                "Clients will refuse the HTTPS listener once it has.",
                "Issue a new one before it expires.",
            )
        ]
    return []


def _is_loopback_host(host: str) -> bool:
    try:
        net = ipaddress.ip_network(host, strict=False)
    except ValueError:
        return host.lower() == "localhost"
    return net.network_address.is_loopback and net.broadcast_address.is_loopback


def _network(inp: DoctorInput) -> list[Finding]:
    s = inp.settings
    out: list[Finding] = []
    if not _is_loopback_host(s.server.bind):
        out.append(
            _f(
                "config.bind",
                Severity.MEDIUM,
                "safepacs.toml [server] bind",
                f"Listeners on {s.server.bind}, not loopback",
                "The listeners are reachable from the network: peers registered '--tls off' talk plain "
                "DICOM there, unencrypted.",
                "Keep 'server.bind' on 127.0.0.1 unless modalities must reach it; then register each one "
                "with its exact address and DICOM TLS ('safepacs peer add AE --host IP', TLS by default).",
            )
        )
    for peer in inp.peers:
        target = f"peer {peer.ae_title}"
        try:
            net = ipaddress.ip_network(peer.host, strict=False)
        except ValueError:
            net = None
        if net is not None and net.prefixlen < (_BROAD_V4 if net.version == 4 else _BROAD_V6):
            out.append(
                _f(
                    "config.peer-broad",
                    Severity.HIGH,
                    target,
                    f"Peer {peer.ae_title} admitted from {net}",
                    f"{net.num_addresses} addresses may use this AE title (AE titles are sent in "
                    "clear: anyone on those networks can claim it).",
                    "Register the peer's exact address: 'safepacs peer add "
                    f"{peer.ae_title} --host IP --allow {','.join(sorted(peer.allow))}'.",
                )
            )
        elif not _is_loopback_host(peer.host) and peer.tls is TlsMode.OFF:
            out.append(
                _f(
                    "config.peer-plain",
                    Severity.MEDIUM,
                    target,
                    f"Peer {peer.ae_title} talks plain DICOM over the network",
                    f"Host {peer.host}: its associations, identifiers and images are not encrypted.",
                    f"Move it to DICOM TLS ('safepacs peer cert {peer.ae_title} --out DIR', then re-add it "
                    "without '--tls off'); otherwise keep it on an isolated network segment.",
                )
            )
        reads = peer.allow & {Service.FIND, Service.GET, Service.MOVE}
        if reads and peer.user is None:
            out.append(
                _f(
                    "config.peer-unscoped",
                    Severity.LOW,
                    target,
                    f"Peer {peer.ae_title} sees every study",
                    f"It may {','.join(sorted(reads))} without being bound to a user, "
                    "so no scope narrows it.",
                    f"Bind it to a user with a scope: 'safepacs peer add {peer.ae_title} --host {peer.host} "
                    f"--allow {','.join(sorted(peer.allow))} --user NAME'.",
                )
            )
    return out


def _accounts(inp: DoctorInput) -> list[Finding]:
    s = inp.settings
    out: list[Finding] = []
    admins = [a for a in inp.accounts if "admin" in a.roles and not a.disabled]
    if admins and "admin" not in s.auth.totp_required_roles:
        out.append(
            _f(
                "config.admin-no-2fa",
                Severity.HIGH,
                "safepacs.toml [auth] totp_required_roles",
                "Administrators may log in without a second factor",
                f"{len(admins)} administrator account(s); 'admin' is not in auth.totp_required_roles.",
                'Add "admin" to auth.totp_required_roles and enrol each one: '
                "'safepacs user totp-enroll NAME'.",
            )
        )
    for a in admins:
        if not a.totp_enrolled:
            required = "admin" in s.auth.totp_required_roles
            out.append(
                _f(
                    "config.admin-no-2fa",
                    Severity.LOW if required else Severity.HIGH,
                    f"user {a.name}",
                    f"Administrator {a.name} has no TOTP second factor",
                    "Logins are refused until one is enrolled." if required else "A password alone logs in.",
                    f"safepacs user totp-enroll {a.name}",
                )
            )
    return out


def _settings(inp: DoctorInput) -> list[Finding]:
    s = inp.settings
    out: list[Finding] = []
    if s.query.max_results == 0:
        out.append(
            _f(
                "config.no-result-limit",
                Severity.MEDIUM,
                "safepacs.toml [query] max_results",
                "No limit on query results",
                "query.max_results is 0: one universal-match C-FIND or QIDO can list every "
                "study a principal sees.",
                "Set query.max_results (default 500).",
            )
        )
    if not s.audit.record:
        out.append(
            _f(
                "config.audit-off",
                Severity.HIGH,
                "safepacs.toml [audit] record",
                "Access to patient data is not audited",
                "audit.record is false: queries, retrievals, stores and refusals leave no audit event, "
                "so nobody can tell who looked at which patient's images.",
                "Set audit.record = true (the default); false is meant for benchmarks only.",
            )
        )
    if not s.audit.collectors:
        out.append(
            _f(
                "config.audit-local-only",
                Severity.LOW,
                "safepacs.toml [audit]",
                "Audit trail not forwarded",
                "The trail is tamper-evident locally, but no copy goes to a collector (syslog over TLS, "
                "RFC 5425): whoever owns this machine owns its only copy.",
                "Forward the audit trail to your SIEM / ATNA audit record repository: add an "
                "[[audit.collectors]] table (syslog over TLS) to safepacs.toml.",
            )
        )
    if s.storage.overwrite:
        out.append(
            _f(
                "config.overwrite",
                Severity.LOW,
                "safepacs.toml [storage] overwrite",
                "Stored instances can be replaced",
                "An instance arriving again with other bytes replaces the stored one.",
                "Set storage.overwrite = false unless a workflow needs it.",
            )
        )
    if s.auth.max_failed_logins > 10:
        out.append(
            _f(
                "config.lockout",
                Severity.LOW,
                "safepacs.toml [auth] max_failed_logins",
                "Lenient account lockout",
                f"{s.auth.max_failed_logins} failed logins are allowed before an account is locked.",
                "Set auth.max_failed_logins to 10 or fewer (default 5).",
            )
        )
    if s.auth.session_max_hours > 24:
        out.append(
            _f(
                "config.sessions",
                Severity.LOW,
                "safepacs.toml [auth] session_max_hours",
                "Long browser sessions",
                f"Sessions last up to {s.auth.session_max_hours:g} hours.",
                "Set auth.session_max_hours to 12 or less.",
            )
        )
    if os.environ.get("SAFEPACS_UNSAFE_NO_FSYNC_I_ACCEPT_DATA_LOSS") and not s.storage.fsync:
        out.append(
            _f(
                "config.no-fsync",
                Severity.MEDIUM,
                "safepacs.toml [storage] fsync",
                "Acknowledged data can be lost",
                "storage.fsync is off (allowed by SAFEPACS_UNSAFE_NO_FSYNC_I_ACCEPT_DATA_LOSS).",
                "Turn storage.fsync back on and unset the variable.",
            )
        )
    return out


def _index(inp: DoctorInput) -> list[Finding]:
    """The index itself: reported on every installation until the index is encrypted."""
    s = inp.settings
    url = s.index_url
    sqlite = url.lower().startswith("sqlite")
    # Never the URL of a database server: it may carry a password.
    target = url.split("///", 1)[1] if sqlite and "///" in url else "index.url (PostgreSQL database)"
    where = (
        "index.sqlite3, its -wal file and every copy or backup of them"
        if sqlite
        else "the PostgreSQL database, its files, dumps and backups"
    )
    return [
        _f(
            "config.index-plaintext-phi",
            Severity.MEDIUM,
            target,
            "The index holds patient data in plain text",
            "Objects are encrypted, the index is not: patient names, IDs and birth dates, study "
            f"details and the audit trail's records are readable by whoever reads {where}. A stolen "
            "disk or backup lists every patient. (Encrypting the index is not implemented yet.)",
            "Keep the data directory and the database private to the SafePACS account, put them and "
            "every backup of the index on encrypted storage (full-disk or volume encryption, encrypted "
            "backups), and restrict who can read backups and the database server.",
        )
    ]


def _disk(inp: DoctorInput) -> list[Finding]:
    s, disk = inp.settings, inp.disk
    out: list[Finding] = []
    for path, free, needed in disk.below_mark:
        reserve = needed - s.storage.min_free_bytes
        out.append(
            _f(
                "config.disk-full",
                Severity.HIGH,
                path,
                "Stores are refused: the disk is nearly full",
                f"{free} bytes available, less than storage.min_free_bytes ({s.storage.min_free_bytes})"
                + (f" plus the {reserve} bytes of the audit reserve to refill" if reserve > 0 else "")
                + ": C-STORE, STOW-RS and import are refused; searching and retrieving go on as long "
                "as their audit records fit.",
                "Free disk space or grow the file system; stores resume within a second.",
            )
        )
    if disk.reserve_path is None:
        return out
    size = s.storage.audit_reserve_bytes
    if disk.reserve_held == 0:
        out.append(
            _f(
                "config.audit-reserve",
                Severity.HIGH,
                disk.reserve_path,
                "The disk space reserved for the audit trail was used",
                "The disk filled up and the reserve was released so that accesses could still be "
                "recorded; when the disk fills up again, every access is refused.",
                "Free disk space: the next store refills the reserve (so does 'safepacs serve' at start).",
            )
        )
    elif disk.reserve_held is None or disk.reserve_held < size:
        out.append(
            _f(
                "config.audit-reserve",
                Severity.LOW,
                disk.reserve_path,
                "No disk space reserved for the audit trail yet",
                f"storage.audit_reserve_bytes is {size}; 'safepacs serve' reserves it when it starts "
                "(if the disk has room).",
                "Start (or restart) 'safepacs serve'.",
            )
        )
    return out


def review_config(inp: DoctorInput) -> list[Finding]:
    """The configuration half of the doctor."""
    return _index(inp) + _disk(inp) + _files(inp) + _network(inp) + _accounts(inp) + _settings(inp)


def run_doctor(
    inp: DoctorInput,
    *,
    dicom_port: int | None = None,
    http_port: int | None = None,
    network: bool = True,
    timeout: float = 3.0,
) -> ScanReport:
    """Review the configuration, then scan the local listeners (``network``) as ``safepacs scan`` would."""
    s = inp.settings
    started = datetime.now(UTC)
    findings = review_config(inp)
    report = ScanReport("doctor", started, started)
    if network:
        host = s.server.bind
        if host in ("0.0.0.0", "", "::"):  # noqa: S104 - reading the setting, not binding
            host = "127.0.0.1" if host != "::" else "::1"
        ports = tuple(p for p in (dicom_port or s.server.dicom_port, http_port or s.server.http_port) if p)
        target = parse_target(f"[{host}]" if ":" in host else host)
        options = ScanOptions(
            ports=tuple(sorted(set(ports))),
            timeout=timeout,
            called_aes=(s.server.ae_title,),
            ca_file=s.keys_dir / "ca.pem" if (s.keys_dir / "ca.pem").is_file() else None,
            rate=0,
            assume_product="SafePACS",
        )
        scanned = run_scan([target], options)
        report.endpoints, report.addresses, report.probes = (
            scanned.endpoints,
            scanned.addresses,
            scanned.probes,
        )
        findings += scanned.findings
        report.errors = list(scanned.errors)
        if not scanned.endpoints:
            findings.append(
                Finding(
                    "doctor.not-running",
                    Severity.INFO,
                    f"{host} ports {', '.join(map(str, ports))}",
                    "The listeners are not running",
                    "Nothing answered, so the network checks were skipped.",
                    "Start 'safepacs serve' and run 'safepacs doctor' again to check the listeners.",
                    service="config",
                    product="SafePACS",
                )
            )
    report.findings = findings
    report.finished_at = datetime.now(UTC)
    return report
