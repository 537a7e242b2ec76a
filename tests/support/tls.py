"""DICOM TLS clients: a peer certificate issued with the CLI, and client contexts trusting the local CA."""

from __future__ import annotations

import io
import ssl
import zipfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.server import Server, run_cli


def issue(srv: Server, ae: str, out: Path) -> Path:
    """``safepacs peer cert AE --out DIR``."""
    assert run_cli("peer", "cert", ae, "--out", str(out), "--data", str(srv.data)) == 0
    return out


def context(
    srv: Server,
    cert_dir: Path | None = None,
    *,
    cert_pair: tuple[Path, Path] | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """A TLS client context that trusts the SafePACS CA, with a client certificate when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(srv.ca_file))
    if cert_dir is not None:
        ctx.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
    if cert_pair is not None:
        ctx.load_cert_chain(*cert_pair)
    if maximum is not None:
        ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


def tls(ctx: ssl.SSLContext) -> tuple[ssl.SSLContext, str]:
    return (ctx, "127.0.0.1")  # the server certificate names 127.0.0.1: the host name is checked


def bundle_context(bundle: bytes, ca_file: Path, ae_title: str, out: Path) -> ssl.SSLContext:
    """A peer's certificate bundle as the web UI downloads it (a ZIP of ``cert.pem``, ``key.pem`` and
    ``ca.pem``), checked: the CA is ``ca_file``, it signed the certificate, which names ``ae_title``,
    and the key is the certificate's own.  Its files are written to ``out``; a TLS client context
    that presents them and trusts that CA."""
    files = zipfile.ZipFile(io.BytesIO(bundle))
    assert sorted(files.namelist()) == ["ca.pem", "cert.pem", "key.pem"]
    ca_pem = ca_file.read_bytes()
    assert files.read("ca.pem") == ca_pem
    cert = x509.load_pem_x509_certificate(files.read("cert.pem"))
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))  # raises unless the CA signed it
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == ae_title
    key = serialization.load_pem_private_key(files.read("key.pem"), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    out.mkdir(parents=True, exist_ok=True)
    for name in files.namelist():
        (out / name).write_bytes(files.read(name))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(out / "ca.pem"))
    ctx.load_cert_chain(out / "cert.pem", out / "key.pem")
    return ctx
