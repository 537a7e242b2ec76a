"""The local CA: certificate profiles, verification, real TLS 1.3 handshakes with and without client certs."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from safepacs.auth.pki import (
    certificate_fingerprint,
    create_ca,
    default_server_names,
    issue_certificate,
    write_private,
)
from safepacs.errors import DataDirError, KeyMaterialError


@dataclass(frozen=True)
class Pair:
    cert: bytes
    key: bytes

    def files(self, directory: Path, name: str) -> tuple[Path, Path]:
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        cert.write_bytes(self.cert)
        write_private(key, self.key)
        return cert, key

    @property
    def x509(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert)


@pytest.fixture(scope="module")
def ca() -> Pair:
    return Pair(*create_ca())


@pytest.fixture(scope="module")
def other_ca() -> Pair:
    return Pair(*create_ca("Somebody Else's CA"))


@pytest.fixture(scope="module")
def server(ca: Pair) -> Pair:
    return Pair(*issue_certificate(ca.cert, ca.key, "safepacs server"))


@pytest.fixture(scope="module")
def client(ca: Pair) -> Pair:
    return Pair(*issue_certificate(ca.cert, ca.key, "MODALITY1", client=True))


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------


def test_ca_profile(ca: Pair) -> None:
    cert = ca.x509
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "SafePACS Local CA"
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical
    assert isinstance(usage.value, x509.KeyUsage)
    assert usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3650) <= lifetime <= dt.timedelta(days=3651)
    assert cert.not_valid_before_utc <= _now()
    cert.verify_directly_issued_by(cert)
    key = serialization.load_pem_private_key(ca.key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == public
    assert b"ENCRYPTED" not in ca.key and ca.key.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_server_profile(ca: Pair, server: Pair) -> None:
    cert = server.x509
    cert.verify_directly_issued_by(ca.x509)
    assert cert.issuer == ca.x509.subject
    assert _ext(cert, x509.BasicConstraints).value == x509.BasicConstraints(ca=False, path_length=None)
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]  # type: ignore[call-overload]
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("::1") in ips
    assert set(san.get_values_for_type(x509.DNSName)) | {str(ip) for ip in ips} == set(default_server_names())
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    ca_ski = _ext(ca.x509, x509.SubjectKeyIdentifier).value
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ca_ski.digest
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=825) <= lifetime <= dt.timedelta(days=826)
    assert 0 < cert.serial_number < 2**159


def test_default_names_include_this_host() -> None:
    names = default_server_names()
    assert names[:3] == ["localhost", "127.0.0.1", "::1"]
    hostname = socket.gethostname().lower()
    if hostname and "_" not in hostname:
        assert hostname in names


def test_client_profile(ca: Pair, client: Pair) -> None:
    cert = client.x509
    cert.verify_directly_issued_by(ca.x509)
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # type: ignore[call-overload]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_dual_use_peer_certificate(ca: Pair) -> None:
    cert = Pair(*issue_certificate(ca.cert, ca.key, "ARCHIVE2", client=True, server_names=["10.1.2.3"])).x509
    usages = set(_ext(cert, x509.ExtendedKeyUsage).value)  # type: ignore[call-overload]
    assert usages == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}


def test_explicit_server_names(ca: Pair) -> None:
    pem, _ = issue_certificate(
        ca.cert, ca.key, "pacs", server_names=["PACS.Example.org.", "10.0.0.5", "fe80::1", "10.0.0.5"]
    )
    san = _ext(x509.load_pem_x509_certificate(pem), x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["pacs.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("fe80::1"),
    ]


@pytest.mark.parametrize("bad", [["*.example.org"], ["bad name"], ["-x.org"], ["a..b"], [""], [], ["x" * 64]])
def test_invalid_server_names(ca: Pair, bad: list[str]) -> None:
    with pytest.raises(ValueError):
        issue_certificate(ca.cert, ca.key, "pacs", server_names=bad)


@pytest.mark.parametrize("bad", ["", " ", "x" * 65, "new\nline"])
def test_invalid_common_names(ca: Pair, bad: str) -> None:
    with pytest.raises(ValueError):
        issue_certificate(ca.cert, ca.key, bad)
    with pytest.raises(ValueError):
        create_ca(bad)


def test_serials_are_random(ca: Pair) -> None:
    serials = {issue_certificate(ca.cert, ca.key, "x", client=True)[0] for _ in range(3)}
    assert len({x509.load_pem_x509_certificate(pem).serial_number for pem in serials}) == 3


def test_validity_days_and_ca_expiry(ca: Pair) -> None:
    short = x509.load_pem_x509_certificate(issue_certificate(ca.cert, ca.key, "x", days=30)[0])
    assert (
        dt.timedelta(days=30)
        <= short.not_valid_after_utc - short.not_valid_before_utc
        <= dt.timedelta(days=31)
    )
    long = x509.load_pem_x509_certificate(issue_certificate(ca.cert, ca.key, "x", days=100_000)[0])
    assert long.not_valid_after_utc == ca.x509.not_valid_after_utc  # never outlives its CA
    for bad in (0, -1):
        with pytest.raises(ValueError):
            issue_certificate(ca.cert, ca.key, "x", days=bad)


def test_mismatched_or_unusable_ca_material(ca: Pair, other_ca: Pair, server: Pair) -> None:
    with pytest.raises(KeyMaterialError, match="does not belong"):
        issue_certificate(ca.cert, other_ca.key, "x")
    with pytest.raises(KeyMaterialError, match="not a CA"):
        issue_certificate(server.cert, server.key, "x")
    with pytest.raises(KeyMaterialError):
        issue_certificate(b"garbage", ca.key, "x")
    with pytest.raises(KeyMaterialError):
        issue_certificate(ca.cert, b"garbage", "x")


# --------------------------------------------------------------------------------------
# Verification with cryptography's path builder (RFC 5280 6, CA/B Forum profile)
# --------------------------------------------------------------------------------------


def _builder(ca: Pair) -> verification.PolicyBuilder:
    return verification.PolicyBuilder().store(verification.Store([ca.x509])).time(_now())


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "::1"])
def test_ca_verifies_server_certificate(ca: Pair, server: Pair, name: str) -> None:
    try:
        subject: verification.Subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    chain = _builder(ca).build_server_verifier(subject).verify(server.x509, [])
    assert chain == [server.x509, ca.x509]


def test_server_certificate_is_not_valid_for_other_names(ca: Pair, server: Pair) -> None:
    verifier = _builder(ca).build_server_verifier(x509.DNSName("evil.example.org"))
    with pytest.raises(verification.VerificationError):
        verifier.verify(server.x509, [])


def test_other_ca_does_not_verify(other_ca: Pair, server: Pair) -> None:
    verifier = _builder(other_ca).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(verification.VerificationError):
        verifier.verify(server.x509, [])


def test_ca_verifies_client_certificate(ca: Pair, client: Pair, server: Pair) -> None:
    # The Web PKI profile wants a SAN in every leaf; SafePACS client certificates name an AE or a
    # person in the subject only, so the SAN is made optional here (OpenSSL never requires it).
    ee_policy = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )
    verifier = (
        _builder(ca)
        .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
        .build_client_verifier()
    )
    assert verifier.verify(client.x509, []).chain == [client.x509, ca.x509]
    with pytest.raises(verification.VerificationError):
        verifier.verify(server.x509, [])  # serverAuth only: not a client certificate


# --------------------------------------------------------------------------------------
# Real TLS over loopback
# --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    client_error: BaseException | None = None
    server_error: BaseException | None = None
    version: str | None = None
    server_saw: bytes | None = None  # the client certificate, DER
    echoed: bytes | None = None


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> Outcome:
    outcome = Outcome()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    outcome.server_saw = tls.getpeercert(binary_form=True)
                    tls.sendall(tls.recv(5))
            except Exception as exc:
                outcome.server_error = exc

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                outcome.version = tls.version()
                tls.sendall(b"hello")
                outcome.echoed = tls.recv(5)
                if not outcome.echoed:
                    raise ConnectionError("server closed the connection")
        except Exception as exc:
            outcome.client_error = exc
        finally:
            thread.join(15)
    assert not thread.is_alive()
    return outcome


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    return tmp_path


def _server_ctx(pki_dir: Path, ca: Pair, server: Pair, *, require_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(*server.files(pki_dir, "server"))
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=ca.cert.decode())
    return ctx


def _client_ctx(pki_dir: Path, trust: Pair, cert: Pair | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=trust.cert.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        ctx.load_cert_chain(*cert.files(pki_dir, f"client-{os.urandom(4).hex()}"))
    return ctx


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_tls13_handshake(pki_dir: Path, ca: Pair, server: Pair, hostname: str) -> None:
    outcome = _handshake(
        _server_ctx(pki_dir, ca, server, require_client=False), _client_ctx(pki_dir, ca), hostname
    )
    assert outcome.client_error is None and outcome.server_error is None
    assert outcome.version == "TLSv1.3"
    assert outcome.echoed == b"hello"


def test_client_refuses_server_from_another_ca(pki_dir: Path, ca: Pair, other_ca: Pair, server: Pair) -> None:
    outcome = _handshake(
        _server_ctx(pki_dir, ca, server, require_client=False), _client_ctx(pki_dir, other_ca), "localhost"
    )
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)


def test_client_refuses_wrong_host_name(pki_dir: Path, ca: Pair, server: Pair) -> None:
    outcome = _handshake(
        _server_ctx(pki_dir, ca, server, require_client=False), _client_ctx(pki_dir, ca), "pacs.example.org"
    )
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)


def test_mutual_tls(pki_dir: Path, ca: Pair, server: Pair, client: Pair) -> None:
    outcome = _handshake(
        _server_ctx(pki_dir, ca, server, require_client=True), _client_ctx(pki_dir, ca, client), "localhost"
    )
    assert outcome.client_error is None and outcome.server_error is None
    assert outcome.version == "TLSv1.3"
    assert outcome.echoed == b"hello"
    assert outcome.server_saw is not None
    assert certificate_fingerprint(outcome.server_saw) == certificate_fingerprint(client.cert)


def test_mutual_tls_refuses_missing_client_cert(pki_dir: Path, ca: Pair, server: Pair) -> None:
    outcome = _handshake(
        _server_ctx(pki_dir, ca, server, require_client=True), _client_ctx(pki_dir, ca), "localhost"
    )
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert outcome.client_error is not None
    assert outcome.echoed is None


def test_mutual_tls_refuses_client_cert_from_another_ca(
    pki_dir: Path, ca: Pair, other_ca: Pair, server: Pair
) -> None:
    stranger = Pair(*issue_certificate(other_ca.cert, other_ca.key, "MODALITY1", client=True))
    outcome = _handshake(
        _server_ctx(pki_dir, ca, server, require_client=True),
        _client_ctx(pki_dir, ca, stranger),
        "localhost",
    )
    assert isinstance(outcome.server_error, ssl.SSLCertVerificationError)
    assert outcome.echoed is None


def test_mutual_tls_refuses_server_cert_used_as_client_cert(pki_dir: Path, ca: Pair, server: Pair) -> None:
    outcome = _handshake(
        _server_ctx(pki_dir, ca, server, require_client=True), _client_ctx(pki_dir, ca, server), "localhost"
    )
    assert isinstance(
        outcome.server_error, ssl.SSLError
    )  # EKU serverAuth only: "unsupported certificate purpose"
    assert outcome.echoed is None


# --------------------------------------------------------------------------------------
# Fingerprints and private files
# --------------------------------------------------------------------------------------


def test_fingerprint(ca: Pair, server: Pair) -> None:
    fingerprint = certificate_fingerprint(server.cert)
    assert fingerprint == certificate_fingerprint(server.cert)
    assert fingerprint == certificate_fingerprint(b"\n" + server.cert)
    der = server.x509.public_bytes(serialization.Encoding.DER)
    assert fingerprint == hashlib.sha256(der).hexdigest()
    assert fingerprint == certificate_fingerprint(der)
    assert len(fingerprint) == 64 and fingerprint == fingerprint.lower() and ":" not in fingerprint
    assert fingerprint != certificate_fingerprint(ca.cert)
    with pytest.raises(KeyMaterialError):
        certificate_fingerprint(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_write_private(tmp_path: Path, umask_zero: None) -> None:
    path = tmp_path / "ca.key"
    write_private(path, b"secret")
    assert path.read_bytes() == b"secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(DataDirError, match="exists already"):
        write_private(path, b"other")
    assert path.read_bytes() == b"secret"


def test_write_private_refuses_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    link = tmp_path / "server.key"
    link.symlink_to(target)
    with pytest.raises(DataDirError):
        write_private(link, b"secret")
    assert target.read_bytes() == b"untouched"
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "does-not-exist")
    with pytest.raises(DataDirError):
        write_private(dangling, b"secret")
    assert not (tmp_path / "does-not-exist").exists()


def test_write_private_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataDirError, match="cannot create"):
        write_private(tmp_path / "missing" / "x.key", b"secret")
