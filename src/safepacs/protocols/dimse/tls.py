"""DICOM TLS: the listener's and the C-MOVE client's TLS contexts, and what a connection proved.

PS3.15 B.12 "BCP 195 RFC 8996, 9325" Secure Transport Connection Profile: TLS 1.2 and 1.3 only
(RFC 8996 deprecates 1.0 and 1.1), TLS 1.2 cipher suites ECDHE-{ECDSA,RSA}-AES{128,256}-GCM only
(RFC 9325 4.2; the TLS 1.3 suites are all AEAD), no compression (RFC 9325 3.3), no renegotiation.

The listener asks every client for a certificate (``CERT_OPTIONAL``): one that does not verify
against the SafePACS CA - or against a certificate an administrator pinned with
``safepacs peer add --cert`` - ends the handshake; whether a verified certificate belongs to the
AE title that then asks for an association is decided at admission (:func:`certificate_refusal`),
where a missing certificate is refused too, with the same answer a stranger gets.

Pinned certificates are trust anchors in their own right (``VERIFY_X509_PARTIAL_CHAIN``), so a
vendor's self-signed or externally issued certificate works without its CA being trusted for
anyone else.  They are read from the index on every connection, so ``peer add --cert`` and
``peer revoke-cert`` take effect at once, without a restart.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from safepacs.auth.pki import (
    certificate_fingerprint,
    certificate_names,
    issue_certificate,
    issued_by,
    load_certificate,
    write_private,
)
from safepacs.errors import KeyMaterialError
from safepacs.types import Peer

__all__ = [
    "BCP195_CIPHERS",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "DicomTls",
    "TlsSession",
    "certificate_refusal",
    "ensure_client_certificate",
    "tls_session_of",
]

log = logging.getLogger(__name__)

#: TLS 1.2 cipher suites of the BCP 195 profile (PS3.15 B.12; RFC 9325 4.2), OpenSSL names.
BCP195_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
    ]
)
#: The certificate SafePACS presents as a TLS client (C-MOVE to a TLS peer); CN = our AE title.
CLIENT_CERT = "dicom-client.pem"
CLIENT_KEY = "dicom-client.key"


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def _trust(context: ssl.SSLContext, ca_file: Path, anchors: list[bytes]) -> None:
    context.load_verify_locations(cafile=str(ca_file))
    for pem in anchors:
        try:
            context.load_verify_locations(cadata=pem.decode("ascii"))
        except (ssl.SSLError, ValueError):
            log.warning("a pinned peer certificate could not be loaded; it is not trusted")
    if anchors:
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN


@dataclass(frozen=True)
class TlsSession:
    """What a DICOM TLS connection negotiated and which client certificate it presented."""

    version: str
    cipher: str
    certificate: x509.Certificate | None
    sha256: str | None


def tls_session_of(sock: Any) -> TlsSession | None:
    """The TLS session of a connected socket (None: a plain TCP connection)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cipher = sock.cipher()
    der = sock.getpeercert(binary_form=True)
    cert = load_certificate(der) if der else None
    return TlsSession(
        version=sock.version() or "",
        cipher=cipher[0] if cipher else "",
        certificate=cert,
        sha256=certificate_fingerprint(der) if der else None,
    )


def certificate_refusal(
    peer: Peer, session: TlsSession, ca: x509.Certificate, revoked: Callable[[str], bool]
) -> str | None:
    """Why the certificate of ``session`` does not prove ``peer`` (None: it does).

    It must be present and not revoked, and either be the certificate pinned for the peer
    (``--cert-fingerprint``/``--cert``) or, when none is pinned, be issued by the SafePACS CA to the
    peer's AE title (subject CN or subject alternative name).
    """
    if session.certificate is None or session.sha256 is None:
        return "no client certificate presented over DICOM TLS"
    if revoked(session.sha256):
        return "the client certificate was revoked"
    if peer.cert_sha256 is not None:
        if not hmac.compare_digest(session.sha256, peer.cert_sha256):
            return "the client certificate is not the one pinned for this AE title"
        return None
    if not issued_by(session.certificate, ca):
        return "the client certificate was not issued by the SafePACS CA and none is pinned for this AE title"
    if peer.ae_title not in certificate_names(session.certificate):
        return "the client certificate was issued to another AE title"
    return None


class DicomTls:
    """The TLS contexts of one process: the listener's and the C-MOVE client's, rebuilt whenever the
    pinned certificates change.  Thread-safe."""

    def __init__(self, keys_dir: Path, pinned: Callable[[], list[bytes]]) -> None:
        self._keys = keys_dir
        self._pinned = pinned
        self._lock = threading.Lock()
        self._anchors: list[bytes] | None = None
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        try:
            self.ca = load_certificate((keys_dir / "ca.pem").read_bytes())
        except OSError as exc:
            raise KeyMaterialError(
                f"cannot read the CA certificate {keys_dir / 'ca.pem'} ({exc.strerror})"
            ) from exc

    def _refresh(self) -> None:
        anchors = self._pinned()
        if anchors == self._anchors:
            return
        server = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        server.load_cert_chain(self._keys / "server.pem", self._keys / "server.key")
        _trust(server, self._keys / "ca.pem", anchors)
        server.verify_mode = ssl.CERT_OPTIONAL  # a missing certificate is refused at admission
        client = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        client.check_hostname = False  # the peer's certificate is matched to its AE title instead
        client.verify_mode = ssl.CERT_REQUIRED
        _trust(client, self._keys / "ca.pem", anchors)
        if (self._keys / CLIENT_CERT).is_file():
            client.load_cert_chain(self._keys / CLIENT_CERT, self._keys / CLIENT_KEY)
        self._anchors, self._server, self._client = anchors, server, client

    def server_context(self) -> ssl.SSLContext:
        """The listener's context, with the pinned certificates as they are now."""
        with self._lock:
            self._refresh()
            assert self._server is not None
            return self._server

    def client_context(self) -> ssl.SSLContext:
        """The context C-MOVE sub-associations to TLS peers connect with (our client certificate)."""
        with self._lock:
            self._refresh()
            assert self._client is not None
            return self._client


def ensure_client_certificate(keys_dir: Path, ae_title: str) -> Path:
    """The certificate SafePACS presents to TLS peers it connects to (C-MOVE destinations): issued
    from the local CA on first use, CN = our AE title, key mode 0600.  Returns its path."""
    cert_path, key_path = keys_dir / CLIENT_CERT, keys_dir / CLIENT_KEY
    if cert_path.is_file() and key_path.is_file():
        return cert_path
    try:
        ca_cert, ca_key = (keys_dir / "ca.pem").read_bytes(), (keys_dir / "ca.key").read_bytes()
    except OSError as exc:
        raise KeyMaterialError(
            f"cannot read the CA in {keys_dir} ({exc.strerror}); it issues SafePACS's DICOM TLS client "
            "certificate"
        ) from exc
    cert, key = issue_certificate(ca_cert, ca_key, ae_title, client=True)
    key_path.unlink(missing_ok=True)  # a half-written pair from an interrupted start
    write_private(key_path, key)
    tmp = cert_path.with_suffix(".tmp")
    tmp.write_bytes(cert)
    tmp.replace(cert_path)
    log.info("issued SafePACS's DICOM TLS client certificate", extra={"ae_title": ae_title})
    return cert_path
