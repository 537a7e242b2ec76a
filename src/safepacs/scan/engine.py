"""The scan: TCP connect to every address x port (asyncio, bounded concurrency, a global rate limit), then
protocol probes of the open ports in a small thread pool, then per-host correlation and findings.

Telling the protocol of an open port: the port's usual protocol is tried first (DICOM on 104, 4242,
11112; TLS on 443, 2761, 2762, 8443; HTTP elsewhere), then the others.  An HTTP request to a DICOM port
is an unknown PDU type that DICOM peers answer with an abort or a closed connection, and a TLS
ClientHello is refused as quickly; a DICOM request to a silent HTTP server would wait, hence HTTP first
on ports nobody assigned.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from safepacs.scan._dicom import COMMON_CALLED_AES, GUESS_AES, DicomProbe, DicomResult, probe_dicom
from safepacs.scan._dicom import random_calling_ae as random_calling_ae
from safepacs.scan._findings import cve_findings, dicom_findings, http_findings, tls_findings
from safepacs.scan._http import HttpResult, probe_http
from safepacs.scan._model import Endpoint, Finding, ScanError, ScanReport, Severity
from safepacs.scan._remedies import remedy
from safepacs.scan._tls import TlsResult, check_tls
from safepacs.scan._wire import ProbeTimeout, RateLimiter, permissive_context, sniff, sniff_tls
from safepacs.scan.fingerprint import Product, match_implementation
from safepacs.scan.targets import (
    DEFAULT_DICOM_PORTS,
    DEFAULT_PORTS,
    MAX_ADDRESSES,
    Target,
    count_addresses,
    expand,
)

__all__ = ["ProgressHook", "ScanOptions", "run_scan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanOptions:
    """How to scan.  ``timeout`` bounds every single probe step (connect, association, DIMSE message,
    HTTP request); ``rate`` is new connections and requests per second over the whole scan (0: none)."""

    ports: tuple[int, ...] = DEFAULT_PORTS
    timeout: float = 3.0
    connect_timeout: float = 1.5
    rate: float = 500.0
    concurrency: int = 256
    workers: int = 8
    called_aes: tuple[str, ...] = ()
    guess_ae: bool = False
    calling_ae: str = ""
    intrusive: bool = False
    try_default_credentials: bool = False
    find_cap: int = 1000
    ca_file: Path | None = None
    max_addresses: int = MAX_ADDRESSES
    assume_product: str = ""  # what answers when a probe cannot tell (``doctor`` knows it is SafePACS)

    def validate(self) -> None:
        if not 0 < self.timeout <= 120 or not 0 < self.connect_timeout <= 120:
            raise ScanError("--timeout must be between 0 and 120 seconds")
        if self.rate < 0:
            raise ScanError("--rate must be 0 (no limit) or more")
        if not 1 <= self.concurrency <= 4096:
            raise ScanError("--concurrency must be between 1 and 4096")
        if not 1 <= self.workers <= 64:
            raise ScanError("--workers must be between 1 and 64")
        if not 1 <= self.find_cap <= 100000:
            raise ScanError("--find-cap must be between 1 and 100000")
        for ae in (*self.called_aes, *((self.calling_ae,) if self.calling_ae else ())):
            if not 0 < len(ae) <= 16 or not ae.isascii() or not ae.isprintable() or "\\" in ae:
                raise ScanError(f"{ae!r} is not a valid AE title (1-16 printable characters, no backslash)")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ScanError(f"--ca-file {self.ca_file} is not a file")


class ProgressHook(Protocol):
    def add(self, n: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...


class _NoProgress:
    def add(self, n: int) -> None:
        return None

    def advance(self, n: int = 1) -> None:
        return None


@dataclass
class _State:
    ep: Endpoint
    dicom: DicomResult | None = None
    tls: TlsResult | None = None
    http: HttpResult | None = None
    client_cert_required: bool | None = None
    extra: list[Finding] = field(default_factory=list)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _dicom_probe(
    options: ScanOptions, limiter: RateLimiter, calling: str, tls: bool, name: str
) -> DicomProbe:
    titles = list(
        dict.fromkeys((*options.called_aes, *COMMON_CALLED_AES, *(GUESS_AES if options.guess_ae else ())))
    )
    return DicomProbe(
        timeout=options.timeout,
        calling=calling,
        called_aes=tuple(titles),
        find_cap=options.find_cap,
        intrusive=options.intrusive,
        limiter=limiter,
        tls=permissive_context() if tls else None,
        server_name=name if tls and name and not _is_ip(name) else None,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _probe_endpoint(
    address: str, port: int, hostname: str, options: ScanOptions, limiter: RateLimiter, calling: str
) -> _State:
    ep = Endpoint(address, port, host=hostname)
    state = _State(ep)
    t = options.timeout
    name = hostname or address
    http_args: dict[str, Any] = {
        "timeout": t,
        "limiter": limiter,
        "find_cap": options.find_cap,
        "try_default_credentials": options.try_default_credentials,
        "host": hostname,
    }
    try:
        plain = _dicom_probe(options, limiter, calling, False, name)
        limiter.wait()
        limiter.wait()
        prefer = "dicom" if port in DEFAULT_DICOM_PORTS else "http"
        kind, first = sniff(address, port, t, calling=calling, called=plain.called_aes[0], prefer=prefer)
        if kind == "http":
            ep.service = "http"
            state.http = probe_http(address, port, tls=False, **http_args)
        elif kind == "dicom" and first is not None:
            ep.service = "dicom"
            state.dicom = probe_dicom(address, port, plain, (plain.called_aes[0], first))
        else:
            limiter.wait()
            if sniff_tls(address, port, t):
                secure = _dicom_probe(options, limiter, calling, True, name)
                limiter.wait()
                limiter.wait()
                kind, first = sniff(
                    address,
                    port,
                    t,
                    calling=calling,
                    called=secure.called_aes[0],
                    ctx=secure.tls,
                    server_name=secure.server_name,
                )
                ep.service = "tls"
                if kind == "http":
                    ep.service = "https"
                    state.http = probe_http(address, port, tls=True, **http_args)
                elif kind == "dicom" and first is not None:
                    ep.service = "dicom-tls"
                    state.client_cert_required = False
                    state.dicom = probe_dicom(address, port, secure, (secure.called_aes[0], first))
                # Last: each of its handshakes ends without a PDU, and a pynetdicom peer keeps such a
                # connection (and an association slot) until its ARTIM timer expires.
                state.tls = check_tls(address, port, t, limiter, server_name=name, ca_file=options.ca_file)
    except ProbeTimeout as exc:
        ep.error = f"probe timed out ({exc})"
    except Exception as exc:  # one endpoint's surprise must not end the scan of the others
        ep.error = f"probe failed ({type(exc).__name__})"
        log.debug("probe of %s failed", ep.label, exc_info=True)
    return state


async def _tcp_open(address: str, port: int, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _resolve(names: set[str], report: ScanReport) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    out: dict[str, str] = {}
    for name in sorted(names):
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), 10)
        except (OSError, TimeoutError, UnicodeError):
            report.errors.append(f"{name}: the host name cannot be resolved")
            continue
        out[name] = str(infos[0][4][0])
    return out


async def _scan(
    pairs: list[tuple[Target, str, int]], options: ScanOptions, progress: ProgressHook, report: ScanReport
) -> list[_State]:
    limiter = RateLimiter(options.rate)
    calling = options.calling_ae or random_calling_ae()
    resolved = await _resolve({t.hostname for t, _, _ in pairs if t.hostname}, report)
    loop = asyncio.get_running_loop()
    states: list[_State] = []
    probes: list[asyncio.Future[_State]] = []
    work: Iterator[tuple[Target, str, int]] = iter(pairs)
    with ThreadPoolExecutor(options.workers, thread_name_prefix="safepacs-scan") as executor:

        async def worker() -> None:
            for target, host, port in work:
                address = resolved.get(host, "") if target.hostname else host
                if not address:
                    progress.advance()
                    continue
                await limiter.wait_async()
                is_open = await _tcp_open(address, port, options.connect_timeout)
                progress.advance()
                if is_open:
                    progress.add(1)
                    hostname = target.hostname or ""
                    future = loop.run_in_executor(
                        executor, _probe_endpoint, address, port, hostname, options, limiter, calling
                    )
                    future.add_done_callback(lambda _f: progress.advance())
                    probes.append(future)

        await asyncio.gather(*(worker() for _ in range(min(options.concurrency, len(pairs)) or 1)))
        states.extend(await asyncio.gather(*probes))
        await _follow_up(states, options, limiter, calling, loop, executor)
    return states


async def _follow_up(
    states: list[_State],
    options: ScanOptions,
    limiter: RateLimiter,
    calling: str,
    loop: asyncio.AbstractEventLoop,
    executor: ThreadPoolExecutor,
) -> None:
    """Retry DICOM ports that refused every common called AE title with the titles the host gave away:
    its Orthanc REST API (``/system`` DicomAet, for this DICOM port) and the called AE title another of
    its DICOM ports put in an A-ASSOCIATE-AC when it differs from the one asked for (the server's own).
    """
    for s in states:
        if s.dicom is None or s.dicom.accepted_called is not None or not s.dicom.attempts:
            continue
        if not all(a.pdu == 3 and a.source == 1 and a.reason == 7 for _, a in s.dicom.attempts):
            continue
        tried = {c for c, _ in s.dicom.attempts}
        revealed = list(dict.fromkeys(t for t in _revealed_titles(s, states) if t not in tried))
        if not revealed:
            continue
        probe = replace(
            _dicom_probe(options, limiter, calling, s.ep.service == "dicom-tls", s.ep.host or s.ep.address),
            called_aes=tuple(revealed),
        )
        again = await loop.run_in_executor(executor, probe_dicom, s.ep.address, s.ep.port, probe, None)
        again.attempts = s.dicom.attempts + again.attempts
        s.dicom = again


def _valid_ae(title: str) -> bool:
    return 0 < len(title) <= 16 and title.isascii() and title.isprintable() and "\\" not in title


def _revealed_titles(s: _State, states: list[_State]) -> Iterator[str]:
    for other in states:
        if other.ep.address != s.ep.address:
            continue
        h, d = other.http, other.dicom
        if h is not None and h.orthanc_dicom_aet and h.orthanc_dicom_port in (None, s.ep.port):
            if _valid_ae(h.orthanc_dicom_aet):
                yield h.orthanc_dicom_aet
        if other is not s and d is not None and d.accepted_called and d.echoed_called:
            if d.echoed_called != d.accepted_called and _valid_ae(d.echoed_called):
                yield d.echoed_called


def _correlate(states: list[_State], assume_product: str) -> None:
    """Name products: DICOM fingerprints, HTTP answers, and Orthanc's /system naming its DICOM port."""
    for s in states:
        if s.dicom is not None and s.dicom.implementation_class_uid:
            found = match_implementation(
                s.dicom.implementation_class_uid, s.dicom.implementation_version_name
            )
            if found is not None:
                s.ep.product, s.ep.version = found.name, found.version
        if s.http is not None and s.http.product:
            s.ep.product, s.ep.version = s.http.product, s.http.version
        if not s.ep.product and assume_product:
            s.ep.product = assume_product
    for s in states:
        if s.dicom is None:
            continue
        for other in states:
            h = other.http
            if h is None or other.ep.address != s.ep.address or h.product != "Orthanc":
                continue
            if h.orthanc_dicom_port == s.ep.port or (
                h.orthanc_dicom_port is None and s.ep.product == "DCMTK"
            ):
                s.ep.facts["dicom_toolkit"] = s.ep.display_product
                s.ep.product, s.ep.version = "Orthanc", h.version
                break
    by_address: dict[str, list[_State]] = {}
    for s in states:
        by_address.setdefault(s.ep.address, []).append(s)
    for group in by_address.values():
        if any(s.ep.service == "dicom-tls" for s in group):
            for s in group:
                if s.ep.service == "dicom":
                    sev = Severity.LOW if _is_loopback(s.ep.address) else Severity.MEDIUM
                    s.extra.append(
                        Finding(
                            "tls.plain-beside-tls",
                            sev,
                            s.ep.label,
                            "Plain DICOM port open beside the TLS one",
                            "Peers that can use TLS could be talked into the plain port, and the plain port "
                            "bypasses TLS client authentication.",
                            remedy("tls.plain-beside-tls", s.ep.product),
                            s.ep.service,
                            s.ep.display_product,
                        )
                    )


def _facts(s: _State) -> None:
    d, h, t = s.dicom, s.http, s.tls
    if d is not None:
        s.ep.facts.update(
            {
                "called_ae_accepted": d.accepted_called,
                "called_ae_echoed": d.echoed_called if d.echoed_called != d.accepted_called else None,
                "called_ae_titles_tried": len(d.attempts),
                "implementation_class_uid": d.implementation_class_uid or None,
                "implementation_version_name": d.implementation_version_name or None,
                "studies": d.studies,
                "images": d.images,
                "patients": d.patients,
                "worklist_items": d.worklist,
                "contexts_accepted": ", ".join(k for k, v in d.contexts.items() if v) or None,
                "get": d.get or None,
                "move": d.move or None,
            }
        )
    if h is not None:
        s.ep.facts.update(
            {"server": h.server or None, "dicomweb_roots": len(h.qido), "orthanc_rest": h.orthanc_rest}
        )
    if t is not None and not t.error:
        s.ep.facts.update(
            {
                "tls_version": t.version,
                "tls_cipher": t.cipher,
                "certificate_days_left": t.days_left,
                "tls_client_certificate_required": t.client_cert_required,
            }
        )


def _findings(s: _State, options: ScanOptions) -> list[Finding]:
    loopback = _is_loopback(s.ep.address)
    out = list(s.extra)
    if s.tls is not None:
        cert_req = s.client_cert_required if s.ep.service == "dicom-tls" else None
        out += tls_findings(s.ep, s.tls, loopback=loopback, client_cert_required=cert_req)
    if s.dicom is not None:
        out += dicom_findings(
            s.ep, s.dicom, loopback=loopback, intrusive=options.intrusive, tls=s.ep.service == "dicom-tls"
        )
        impl = match_implementation(s.dicom.implementation_class_uid, s.dicom.implementation_version_name)
        if impl is not None:
            out += cve_findings(s.ep, impl)
    if s.http is not None:
        out += http_findings(s.ep, s.http, loopback=loopback)
        if s.http.product and s.http.version:
            out += cve_findings(s.ep, Product(s.http.product, s.http.version))
    if s.ep.service in ("unknown", "tls") and not s.ep.error:
        inside = ""
        if s.ep.service == "tls":
            required = s.tls is not None and s.tls.client_cert_required
            inside = (
                " inside TLS: the server requires a client certificate"
                if required
                else " inside TLS (a client certificate may be required)"
            )
        out.append(
            Finding(
                "port.unknown",
                Severity.INFO,
                s.ep.label,
                "Open port, service not recognised",
                f"Neither DICOM nor HTTP answered{inside}.",
                "",
                s.ep.service,
            )
        )
    return out


def run_scan(targets: list[Target], options: ScanOptions, progress: ProgressHook | None = None) -> ScanReport:
    """Scan ``targets`` x ``options.ports``; raises :class:`ScanError` for a scan that cannot be run."""
    options.validate()
    if not targets:
        raise ScanError("nothing to scan: give at least one target (host, host:port, CIDR) or --targets-file")
    pairs = expand(targets, options.ports, max_addresses=options.max_addresses)
    hook = progress or _NoProgress()
    hook.add(len(pairs))
    started = datetime.now(UTC)
    report = ScanReport("scan", started, started, addresses=count_addresses(targets), probes=len(pairs))
    states = asyncio.run(_scan(pairs, options, hook, report))
    _correlate(states, options.assume_product)
    for s in states:
        # A probe that stopped early (a peer answering byte by byte past the deadline, an association
        # accepted once and then refused) is a runtime error of the scan, shown with the endpoint.
        stopped = [r.error for r in (s.dicom, s.http) if r is not None and r.error]
        if stopped and not s.ep.error:
            s.ep.error = "; ".join(stopped)
        _facts(s)
        s.ep.findings = _findings(s, options)
    states.sort(key=lambda s: (_sort_key(s.ep.address), s.ep.port))
    report.endpoints = [s.ep for s in states]
    report.findings = [f for s in states for f in s.ep.findings]
    report.finished_at = datetime.now(UTC)
    return report


def _sort_key(address: str) -> tuple[int, int | str]:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (9, address)
    return (ip.version, int(ip))
