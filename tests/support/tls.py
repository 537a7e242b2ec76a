"""DICOM TLS clients: a peer certificate issued with the CLI, and client contexts trusting the local CA."""

from __future__ import annotations

import ssl
from pathlib import Path

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
