"""TLS checks of one endpoint with the ``ssl`` module: versions below 1.2, cipher suites outside the
PS3.15 B.12 profile ("BCP 195 RFC 8996, 9325"), and the certificate (trusted, valid now, for this host,
not self-signed, strong key and signature).

A server that requires a client certificate fails every handshake of ours (we have none to give), but
with TLS 1.2 and older only after its ServerHello, Certificate and CertificateRequest, sent in clear:
the version and cipher suite it agreed to and its certificate are taken from those (``observe_tls``).
An old version is accepted when the server's ServerHello agreed to it, refused when it answered with an
alert (protocol_version) or closed the connection."""

from __future__ import annotations

import contextlib
import functools
import ssl
import threading
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, rsa

from safepacs.scan._wire import RateLimiter, connect, observe_tls, permissive_context

__all__ = ["PROFILE_CIPHERS", "TlsResult", "check_tls", "is_broken_cipher", "is_weak_cipher"]

#: TLS 1.2 suites of the PS3.15 B.12 profile (RFC 9325 4.2, with the ECDSA variants);
#: TLS 1.3 suites are all in.
PROFILE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
)
_BROKEN = ("RC4", "DES", "NULL", "EXP", "MD5", "ADH", "AECDH", "anon", "PSK", "SRP", "IDEA", "SEED")
_OLD = (("TLS 1.0", ssl.TLSVersion.TLSv1), ("TLS 1.1", ssl.TLSVersion.TLSv1_1))
_OLD_NAMES = {"TLS 1.0": "TLSv1", "TLS 1.1": "TLSv1.1"}  # as ``SSLSocket.version()`` names them
#: OpenSSL names of what is worse than "outside the profile": no forward secrecy, SHA-1 CBC, broken ciphers.
WEAK_SPEC = "kRSA:aNULL:eNULL:EXP:LOW:3DES:RC4:MD5:SHA1:PSK:SRP"
_MAX_WEAK, _MAX_OTHER = 4, 3  # suites enumerated at most, of each kind
_LOCK = threading.Lock()


def is_broken_cipher(name: str) -> bool:
    """No authentication (anonymous), no encryption, or a broken cipher: a man in the middle reads all."""
    return any(part in name for part in ("ADH", "AECDH", "anon", "NULL", "EXP", "RC4", "DES-CBC-", "MD5"))


def is_weak_cipher(name: str) -> bool:
    """Broken or without forward secrecy or with SHA-1 CBC: worse than merely outside the profile."""
    if any(part in name for part in _BROKEN):
        return True
    if not (name.startswith("ECDHE-") or name.startswith("DHE-") or name.startswith("TLS_")):
        return True  # static RSA key exchange: no forward secrecy
    return name.endswith("-SHA")


@dataclass
class TlsResult:
    version: str = ""
    cipher: str = ""
    old_versions: list[str] = field(default_factory=list)
    untested_versions: list[str] = field(default_factory=list)
    outside_profile: list[str] = field(default_factory=list)
    expired: bool = False
    not_yet_valid: bool = False
    days_left: int | None = None
    self_signed: bool = False
    untrusted: str = ""  # why the chain or the name did not verify, "" when it did
    weak_key: str = ""
    weak_signature: str = ""
    client_cert_required: bool | None = None  # True: handshakes without one fail after a CertificateRequest
    error: str = ""


@functools.cache
def _old_contexts() -> tuple[tuple[str, ssl.SSLContext | None], ...]:
    """Client contexts offering only TLS 1.0 or 1.1, made once: ``ssl`` warns that these versions are
    deprecated (they are: that is what we look for), and the warning filters are process-wide state."""
    out: list[tuple[str, ssl.SSLContext | None]] = []
    with _LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for label, version in _OLD:
            try:
                out.append(
                    (label, permissive_context(minimum=version, maximum=version, ciphers="ALL:@SECLEVEL=0"))
                )
            except (ssl.SSLError, ValueError):
                out.append((label, None))
    return tuple(out)


def _handshake(
    address: str, port: int, timeout: float, ctx: ssl.SSLContext, server_name: str | None
) -> tuple[str, str, bytes | None]:
    with connect(address, port, timeout) as raw, ctx.wrap_socket(raw, server_hostname=server_name) as sock:
        cipher = sock.cipher()
        return sock.version() or "", cipher[0] if cipher else "", sock.getpeercert(binary_form=True)


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", "") or type(exc).__name__)


def check_tls(
    address: str,
    port: int,
    timeout: float,
    limiter: RateLimiter,
    *,
    server_name: str | None = None,
    ca_file: Path | None = None,
) -> TlsResult:
    """Observe the TLS service on ``address:port``; ``server_name`` is the name a client would check."""
    result = TlsResult()
    sni = server_name if server_name and not server_name[0].isdigit() and ":" not in server_name else None
    limiter.wait()
    try:
        first = observe_tls(address, port, timeout, permissive_context(), sni)
    except (OSError, ValueError) as exc:
        result.error = f"TLS handshake failed ({_reason(exc)})"
        return result
    if not first.answered:
        result.error = f"TLS handshake failed ({first.error or 'no ServerHello'})"
        return result
    result.version, result.cipher, der = first.version, first.cipher, first.certificate
    if not first.completed and first.asked_client_cert:
        result.client_cert_required = True
    for label, ctx in _old_contexts():
        if ctx is None:
            result.untested_versions.append(label)
            continue
        limiter.wait()
        try:
            hello = observe_tls(address, port, timeout, ctx, sni)
        except (OSError, ValueError):
            continue  # closed or reset: refused
        if "NO_PROTOCOLS_AVAILABLE" in hello.error or "NO_CIPHERS_AVAILABLE" in hello.error:
            result.untested_versions.append(label)
        elif hello.completed or (hello.version == _OLD_NAMES[label] and hello.alert != 70):
            # Completed, or agreed to in the ServerHello and then failed for want of a client certificate.
            result.old_versions.append(label)
    # Weak suites first (so that they are not hidden behind strong ones outside the profile), then the rest.
    seen: list[str] = []
    for spec, most in ((WEAK_SPEC, _MAX_WEAK), ("ALL:COMPLEMENTOFALL", _MAX_OTHER)):
        found = 0
        while found < most:
            excluded = ":".join("!" + c for c in (*PROFILE_CIPHERS, *seen))
            try:
                ctx = permissive_context(
                    maximum=ssl.TLSVersion.TLSv1_2, ciphers=f"{spec}:{excluded}:@SECLEVEL=0"
                )
            except (ssl.SSLError, ValueError):
                break  # nothing left to offer
            limiter.wait()
            try:
                cipher = observe_tls(address, port, timeout, ctx, sni).cipher  # the ServerHello's choice
            except (OSError, ValueError):
                break
            if not cipher or cipher in seen or cipher in PROFILE_CIPHERS:
                break
            seen.append(cipher)
            found += 1
    result.outside_profile = seen
    if der:
        _check_certificate(result, der)
    verify = ssl.create_default_context()
    if ca_file is not None:
        with contextlib.suppress(OSError, ssl.SSLError):
            verify.load_verify_locations(cafile=str(ca_file))
    limiter.wait()
    try:
        _handshake(address, port, timeout, verify, server_name or address)
    except ssl.SSLCertVerificationError as exc:
        result.untrusted = exc.verify_message or _reason(exc)
    except (OSError, ValueError):
        pass
    return result


def _check_certificate(result: TlsResult, der: bytes) -> None:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        result.untrusted = "the certificate cannot be parsed"
        return
    now = datetime.now(UTC)
    result.expired = cert.not_valid_after_utc < now
    result.not_yet_valid = cert.not_valid_before_utc > now
    result.days_left = (cert.not_valid_after_utc - now).days
    result.self_signed = cert.issuer == cert.subject
    key = cert.public_key()
    with warnings.catch_warnings():  # newer cryptography releases deprecate DSA; targets may still use it
        warnings.simplefilter("ignore")
        dsa_key = isinstance(key, dsa.DSAPublicKey)
    if (isinstance(key, rsa.RSAPublicKey) or dsa_key) and key.key_size < 2048:  # type: ignore[union-attr]
        result.weak_key = f"{'DSA' if dsa_key else 'RSA'} {key.key_size} bits"  # type: ignore[union-attr]
    algorithm = cert.signature_hash_algorithm
    if algorithm is not None and algorithm.name in ("md5", "sha1"):
        result.weak_signature = algorithm.name.upper()
