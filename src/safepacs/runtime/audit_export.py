"""Forwarding the audit trail to audit record repositories: IHE ITI-20 over syslog and TLS.

Each audit record becomes one RFC 5424 syslog message whose MSG is the PS3.15 A.5.1 XML of the event
(``audit/xml.py``), preceded by a BOM (RFC 5424 6.4), sent over TLS 1.2+ with the octet-counting
framing of RFC 5425 4.3 (``MSG-LEN SP SYSLOG-MSG``).  The header follows IHE ITI TF-2 3.20.4.1.2:
facility 10 (security/authorization), severity 5 (notice) for a success and 4 (warning) for a
failure, APP-NAME ``safepacs``, MSGID ``IHE+RFC-3881``.  The header's TIMESTAMP is the event's time.

The STRUCTURED-DATA (RFC 5424 6.3) is one element, ``[safepacs-head@32473 seq="N" hash="H"]``: the
record's sequence number and chain hash.  The last message of each batch also carries ``time`` and
``sig``, the Ed25519 signature of that head (:class:`~safepacs.audit.chain.SignedHead`): the collector
then holds, at least every ``audit.forward_interval``, a signed head that the trail in the index must
keep (``safepacs audit verify --against`` a file with the line ``N H TIME SIG``), so a trail cut short
or rewritten together with its head file is still found.  32473 is the example enterprise number of
RFC 5612, standing in for one of SafePACS's own.

Delivery.  The trail in the index is the spool: a :class:`Forwarder` (one per collector, one thread
each) sends the records after that collector's cursor, in sequence order, and moves the cursor only
when the collector's TCP stack has acknowledged every byte of them (the socket's send queue is empty,
``SIOCOUTQ``).  A collector that is down or unreachable is retried with a growing pause; nothing is
skipped and nothing is reordered, and records appended meanwhile wait in the trail.  What is not
guaranteed, because syslog has no acknowledgement of its own:

* a record is sent again when the connection broke after the collector's host acknowledged it but
  before the cursor was stored (a crash between the two, or an acknowledgement slower than
  ``ack_timeout``): the collector can then see it twice;
* a collector that crashes after its host acknowledged bytes but before it stored them loses them.

The cursor is kept under the collector's ``name``: a new name starts at the first record and sends
the whole trail.  A record whose stored body cannot be read (the trail was edited; ``safepacs audit
verify`` says where) is sent as a Security Alert naming its sequence number, so the collector learns
of it and forwarding does not stall.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING

from safepacs.audit.chain import SignedHead, Signer, StoredRecord
from safepacs.audit.events import (
    Action,
    AuditEvent,
    AuditObject,
    EventID,
    ObjectKind,
    Outcome,
    Participant,
    from_canonical,
)
from safepacs.audit.xml import AuditSource, to_xml
from safepacs.config import AuditCollectorSettings, Settings
from safepacs.errors import ConfigError, SafePacsError

if TYPE_CHECKING:
    from safepacs.db.ports import AuditCursors

try:  # Linux: the bytes of a TCP socket the peer has not acknowledged yet
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # pragma: no cover - other platforms: sendall is all we know
    _OUTQ = None

__all__ = [
    "APP_NAME",
    "FACILITY",
    "MSGID",
    "SD_ID",
    "Forwarder",
    "check_collectors",
    "frame",
    "head_data",
    "start_forwarders",
    "syslog_message",
    "tls_context",
]

log = logging.getLogger(__name__)

FACILITY = 10  # security/authorization messages (RFC 5424 Table 1; IHE ITI TF-2 3.20.4.1.2)
NOTICE, WARNING = 5, 4  # severities: success, failure
APP_NAME = "safepacs"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
SD_ID = "safepacs-head@32473"  # RFC 5424 6.3.2 name@<private enterprise number> (RFC 5612's example)
MAX_BACKOFF = 60.0  # seconds between attempts to reach a collector that is down, at most


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: 1 to ``limit`` PRINTUSASCII characters, or the NILVALUE ``-``."""
    clean = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return clean or "-"


def _param(value: str) -> str:
    """An RFC 5424 PARAM-VALUE: '"', '\\' and ']' escaped (6.3.3)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def head_data(seq: int, digest: str, signed: SignedHead | None = None) -> str:
    """The STRUCTURED-DATA of the message of record ``seq``; with its signed head when given."""
    params = [("seq", str(seq)), ("hash", digest)]
    if signed is not None:
        params += [("time", signed.time), ("sig", signed.signature)]
    return "[" + SD_ID + "".join(f' {name}="{_param(value)}"' for name, value in params) + "]"


def syslog_message(
    event: AuditEvent, source: AuditSource, *, hostname: str, procid: str, structured: str = "-"
) -> bytes:
    """The RFC 5424 SYSLOG-MSG carrying ``event`` as a DICOM audit message (``structured``: its
    STRUCTURED-DATA, ``-`` for none)."""
    severity = NOTICE if event.outcome is Outcome.SUCCESS else WARNING
    header = " ".join(
        (
            f"<{FACILITY * 8 + severity}>1",
            event.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            _header_field(hostname, 255),
            APP_NAME,
            _header_field(procid, 128),
            MSGID,
            structured,
        )
    )
    return header.encode("ascii") + b" " + BOM + to_xml(event, source)


def frame(message: bytes) -> bytes:
    """RFC 5425 4.3 octet-counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


def tls_context(collector: AuditCollectorSettings, where: str) -> ssl.SSLContext:
    """The client context for ``collector``: TLS 1.2+, its CA only, host name checked, optional
    client certificate.  :class:`ConfigError` naming the setting when a file is missing or unusable."""
    if not Path(collector.ca_file).is_file():
        raise ConfigError(f"setting '{where}.ca_file': {collector.ca_file} is not a readable file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=collector.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"setting '{where}.ca_file' holds no usable PEM certificates") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM")  # TLS 1.2 suites of PS3.15 B.12 (BCP 195); 1.3 has its own
    if collector.client_cert:
        try:
            context.load_cert_chain(collector.client_cert, collector.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"setting '{where}.client_cert': cannot load the certificate and key "
                f"({collector.client_cert}, {collector.client_key})"
            ) from exc
    return context


def _unacknowledged(sock: socket.socket) -> int | None:
    """Bytes sent on ``sock`` that the peer has not acknowledged yet; None if the platform cannot tell."""
    if _OUTQ is None:  # pragma: no cover
        return None
    try:
        raw = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except OSError:  # pragma: no cover
        return None
    return int(struct.unpack("i", raw)[0])


def _unreadable(seq: int) -> AuditEvent:
    return AuditEvent(
        EventID.SECURITY_ALERT,
        Action.EXECUTE,
        Outcome.SERIOUS_FAILURE,
        (Participant(APP_NAME, False, "Application"),),
        (
            AuditObject(
                ObjectKind.AUDIT_LOG,
                f"safepacs-audit-trail#{seq}",
                detail=(
                    ("Alert Description", f"audit record {seq} cannot be read; run safepacs audit verify"),
                ),
            ),
        ),
        outcome_description=f"audit record {seq} cannot be read (the trail may have been edited)",
    )


class Forwarder:
    """Sends the audit trail to one collector, in order, from where it stopped (module docstring)."""

    def __init__(
        self,
        audit_log: AuditCursors,
        collector: AuditCollectorSettings,
        source: AuditSource,
        *,
        signer: Signer,
        where: str = "audit.collectors",
        batch: int = 200,
        timeout: float = 10.0,
        ack_timeout: float = 10.0,
        hostname: str | None = None,
    ) -> None:
        self.collector = collector
        self._audit_log = audit_log
        self._source = source
        self._signer = signer
        self._context = tls_context(collector, where)
        self._batch = batch
        self._timeout = timeout
        self._ack_timeout = ack_timeout
        self._hostname = hostname or socket.gethostname()
        self._procid = str(os.getpid())
        self._sock: ssl.SSLSocket | None = None

    # Sending -------------------------------------------------------------
    def forward(self) -> int:
        """Send every record after the collector's cursor; how many were sent.  ``OSError`` when the
        collector cannot be reached or the connection fails: the cursor then stays after the last
        record the collector acknowledged."""
        name = self.collector.name
        cursor = self._audit_log.get_audit_cursor(name)
        sent = 0
        while True:
            records = self._audit_log.audit_records(cursor, self._batch)
            if not records:
                return sent
            last = records[-1]
            signed = self._signer.head(last.seq, last.hash)
            payload = b"".join(frame(self._message(r, signed if r is last else None)) for r in records)
            sock = self._connection()
            try:
                sock.sendall(payload)
                self._wait_acknowledged(sock)
            except OSError:
                self._abort()
                raise
            cursor = records[-1].seq
            self._audit_log.set_audit_cursor(name, cursor)
            sent += len(records)

    def _message(self, record: StoredRecord, signed: SignedHead | None) -> bytes:
        try:
            event = from_canonical(record.body)
        except (ValueError, KeyError, TypeError, IndexError):
            log.error("audit record %d cannot be read; forwarding a security alert in its place", record.seq)
            event = _unreadable(record.seq)
        structured = head_data(record.seq, record.hash, signed)
        return syslog_message(
            event, self._source, hostname=self._hostname, procid=self._procid, structured=structured
        )

    def _connection(self) -> ssl.SSLSocket:
        if self._sock is not None and self._alive(self._sock):
            return self._sock
        self._abort()
        host, port = self.collector.host, self.collector.port
        raw = socket.create_connection((host, port), timeout=self._timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = self._context.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        return self._sock

    def _alive(self, sock: ssl.SSLSocket) -> bool:
        """False when the collector has closed or reset the connection.  A syslog collector never
        sends anything, so a readable socket means end of stream, an error, or TLS housekeeping (a
        TLS 1.3 session ticket), which is consumed here."""
        try:
            readable = sock.pending() > 0 or bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        sock.setblocking(False)
        try:
            return bool(sock.recv(65536))  # b"": the collector closed the connection
        except ssl.SSLWantReadError:
            return True
        except OSError:
            return False
        finally:
            if sock.fileno() != -1:
                sock.settimeout(self._timeout)

    def _wait_acknowledged(self, sock: ssl.SSLSocket) -> None:
        """Return when the collector's host has acknowledged every byte sent; ``OSError`` otherwise."""
        deadline = time.monotonic() + self._ack_timeout
        pause = 0.001
        while True:
            left = _unacknowledged(sock)
            if not left:  # 0, or None: the platform cannot tell and sendall is all we know
                return
            if not self._alive(sock):
                raise ConnectionResetError("the collector closed the connection before acknowledging")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the collector did not acknowledge {left} bytes in time")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def close(self) -> None:
        """End the connection with a TLS close_notify first (RFC 5425 4.4), waiting at most 0.5 s."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.settimeout(0.5)
            sock.unwrap().close()
        except (OSError, ValueError):  # the connection is broken already
            sock.close()

    def _abort(self) -> None:
        """Drop a connection that failed, without a goodbye."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # The loop of the forwarding thread ------------------------------------------------
    def run(self, stop: threading.Event, interval: float, max_backoff: float = MAX_BACKOFF) -> None:
        """Forward every ``interval`` seconds until ``stop`` is set; after a failure wait twice as
        long each time (at most ``max_backoff``) and reconnect."""
        name = self.collector.name
        failures = 0
        try:
            while not stop.is_set():
                try:
                    self.forward()
                except (OSError, SafePacsError) as exc:
                    failures += 1
                    self._abort()
                    if failures == 1 or failures % 10 == 0:
                        log.warning(
                            "audit collector %s cannot be reached (%s: %s); records wait in the trail",
                            name,
                            type(exc).__name__,
                            exc,
                        )
                except Exception:  # a bug must not end forwarding for good: log it and retry
                    failures += 1
                    self._abort()
                    log.exception("forwarding the audit trail to %s failed", name)
                else:
                    if failures:
                        log.warning("audit collector %s reached again; forwarding resumed", name)
                    failures = 0
                delay = interval if not failures else min(max_backoff, interval * 2 ** min(failures, 16))
                stop.wait(delay)
        finally:
            self.close()


def _source(settings: Settings) -> AuditSource:
    return AuditSource(settings.audit.source_id or settings.server.ae_title, settings.audit.site_id or None)


def check_collectors(settings: Settings) -> None:
    """Refuse collectors whose CA, certificate or key files are unusable (:class:`ConfigError`)."""
    for i, collector in enumerate(settings.audit.collectors):
        tls_context(collector, f"audit.collectors[{i}]")


def start_forwarders(
    audit_log: AuditCursors, settings: Settings, stop: threading.Event
) -> list[threading.Thread]:
    """One daemon thread per configured collector, forwarding until ``stop`` is set."""
    source = _source(settings)
    signer = Signer.load_or_create(settings.keys_dir)
    threads = []
    for i, collector in enumerate(settings.audit.collectors):
        forwarder = Forwarder(audit_log, collector, source, signer=signer, where=f"audit.collectors[{i}]")
        thread = threading.Thread(
            target=forwarder.run,
            args=(stop, settings.audit.forward_interval),
            name=f"safepacs-audit-{collector.name}",
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    return threads
