"""The local certificate authority: a CA, server and client certificates, fingerprints.

``safepacs init`` creates a CA and a server certificate so TLS works with zero
configuration (DICOM TLS, PS3.15 B.12 BCP 195 profile; HTTPS).  Peers configured for
mutual TLS get client certificates from the same CA.

Certificates follow RFC 5280 and the CA/Browser Forum profile closely enough for
OpenSSL and :mod:`cryptography.x509.verification` to accept them: ECDSA P-256 with
SHA-256 (RFC 5480, RFC 5758), a CA restricted to ``pathLenConstraint = 0``
(RFC 5280 4.2.1.9), subject alternative names for servers (RFC 5280 4.2.1.6; TLS
clients match host names against SAN only, RFC 6125 6.4.4), extended key usage
(4.2.1.12), authority and subject key identifiers (4.2.1.1, 4.2.1.2) and random
positive serial numbers of up to 159 bits (4.1.2.2).
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import os
import re
import socket
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from safepacs.errors import DataDirError, KeyMaterialError

__all__ = [
    "CA_VALIDITY_DAYS",
    "DEFAULT_CERT_DAYS",
    "certificate_fingerprint",
    "certificate_names",
    "create_ca",
    "default_server_names",
    "issue_certificate",
    "issued_by",
    "load_certificate",
    "normalize_fingerprint",
    "write_private",
]

CA_VALIDITY_DAYS = 3650  # ten years
DEFAULT_CERT_DAYS = 825
_CLOCK_SKEW = dt.timedelta(minutes=5)  # not_before is back-dated so peers with slow clocks accept at once
_CN_MAX = 64  # RFC 5280 ub-common-name
_HOST_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _name(common_name: str) -> x509.Name:
    if not isinstance(common_name, str) or not common_name.strip() or len(common_name) > _CN_MAX:
        raise ValueError(f"a certificate common name must be 1-{_CN_MAX} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in common_name):
        raise ValueError("a certificate common name must not contain control characters")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_ca(common_name: str = "SafePACS Local CA") -> tuple[bytes, bytes]:
    """A self-signed CA: ``(cert_pem, key_pem)``.

    ECDSA P-256 / SHA-256, valid ten years, BasicConstraints ``CA:TRUE, pathlen:0``
    (critical), KeyUsage ``keyCertSign, cRLSign`` (critical), subject and authority key
    identifiers.  The key PEM is unencrypted PKCS #8: store it with :func:`write_private`.
    """
    key = _new_key()
    name = _name(common_name)
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def default_server_names() -> list[str]:
    """``localhost``, ``127.0.0.1``, ``::1`` and this machine's host name (when it is a valid DNS name)."""
    names = ["localhost", "127.0.0.1", "::1"]
    try:
        hostname = socket.gethostname().strip().lower().rstrip(".")
    except OSError:  # pragma: no cover - gethostname does not fail on POSIX
        hostname = ""
    if hostname and _is_dns_name(hostname) and hostname not in names:
        names.append(hostname)
    return names


def _is_dns_name(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and all(_HOST_LABEL_RE.fullmatch(label) for label in labels)


def _general_names(server_names: list[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in server_names:
        if not isinstance(raw, str):
            raise ValueError("server names must be strings")
        name = raw.strip().lower().rstrip(".")
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            address = None
        if address is not None:
            key = f"ip:{address}"
            entry: x509.GeneralName = x509.IPAddress(address)
        else:
            # "*." wildcards are deliberately unsupported: a local CA names its hosts exactly.
            if not _is_dns_name(name):
                raise ValueError(
                    f"{raw!r} is neither an IP address nor a DNS host name (letters, digits, hyphens, dots)"
                )
            key = f"dns:{name}"
            entry = x509.DNSName(name)
        if key not in seen:
            seen.add(key)
            result.append(entry)
    if not result:
        raise ValueError("a server certificate needs at least one host name or IP address")
    return result


def _load_ca(ca_cert_pem: bytes, ca_key_pem: bytes) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError as exc:
        raise KeyMaterialError("the CA certificate is not a PEM X.509 certificate") from exc
    try:
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyMaterialError("the CA key is not an unencrypted PEM private key") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError("the CA key is not an ECDSA key (SafePACS CAs use P-256)")
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if ca_key.public_key().public_bytes(*public) != ca_cert.public_key().public_bytes(*public):
        raise KeyMaterialError("the CA key does not belong to the CA certificate")
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise KeyMaterialError("the CA certificate is not a CA (BasicConstraints CA:TRUE missing)")
    return ca_cert, ca_key


def issue_certificate(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    *,
    server_names: list[str] | None = None,
    client: bool = False,
    days: int = DEFAULT_CERT_DAYS,
) -> tuple[bytes, bytes]:
    """A certificate signed by the CA and its new key: ``(cert_pem, key_pem)``.

    * ``client=False`` (a server): SAN with ``server_names`` (default
      :func:`default_server_names`), EKU ``serverAuth``.
    * ``client=True``: EKU ``clientAuth`` and no SAN.  Given ``server_names`` as well,
      the certificate also gets those SAN entries and ``serverAuth`` (a peer that both
      connects to us and receives C-MOVE sub-operations).

    KeyUsage ``digitalSignature`` (critical), BasicConstraints ``CA:FALSE`` (critical),
    authority and subject key identifiers, a random serial.  Validity is ``days`` days,
    cut to the CA's own expiry.
    """
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError("certificate validity must be a positive number of days")
    ca_cert, ca_key = _load_ca(ca_cert_pem, ca_key_pem)
    subject = _name(common_name)
    key = _new_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise KeyMaterialError("the CA certificate has expired; create a new CA")

    usages: list[x509.ObjectIdentifier] = []
    names: list[x509.GeneralName] = []
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if server_names is not None:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            names = _general_names(server_names)
    else:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        names = _general_names(server_names if server_names is not None else default_server_names())

    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def certificate_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex without colons.

    Accepts PEM or DER (``ssl.SSLSocket.getpeercert(binary_form=True)`` gives DER), so the
    fingerprint of a connected peer and of its PEM file compare equal.
    """
    return load_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes; :class:`KeyMaterialError` when it is neither."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise KeyMaterialError("not an X.509 certificate (PEM or DER)") from exc


def normalize_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as :func:`certificate_fingerprint` writes it (lowercase hex, no colons),
    from the forms tools print (``AB:CD:...``, upper case, ``SHA256:`` / ``sha256=`` prefixes);
    :class:`ValueError` when it is not 32 bytes of hex."""
    value = text.strip().lower()
    for prefix in ("sha256:", "sha256=", "sha256 fingerprint="):
        if value.startswith(prefix):
            value = value[len(prefix) :]
    value = value.replace(":", "").replace(" ", "")
    if not _FINGERPRINT_RE.fullmatch(value):
        raise ValueError("a certificate fingerprint is the SHA-256 of the certificate: 64 hex digits")
    return value


def certificate_names(cert: x509.Certificate) -> frozenset[str]:
    """The names a certificate carries: its subject common names and its subject alternative names
    (DNS names, URIs and IP addresses), as written - what a peer's AE title is matched against."""
    names = {str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names |= set(san.get_values_for_type(x509.DNSName))
        names |= set(san.get_values_for_type(x509.UniformResourceIdentifier))
        names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return frozenset(names)


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``ca_cert`` signed ``cert`` (issuer name and signature; validity is the TLS layer's)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 and write ``data`` durably; refuse if it exists.

    The mode is set by ``open(O_CREAT | O_EXCL, 0o600)`` itself, so there is no moment
    when the file is readable by others (no chmod race), and ``O_NOFOLLOW``/``O_EXCL``
    refuse planted symlinks.  The file and its directory are fsynced; on failure the
    partial file is removed.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
    except FileExistsError:
        raise DataDirError(f"{path} exists already; refusing to overwrite it") from None
    except OSError as exc:
        raise DataDirError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:  # pragma: no cover - POSIX raises instead
                    raise OSError(errno.EIO, "write made no progress")
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise DataDirError(f"cannot write {path}: {exc.strerror}") from exc
