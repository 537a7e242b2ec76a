"""``safepacs peer``: the DICOM TLS and user identity options of ``peer add``, ``peer cert`` and
``peer revoke-cert``.

* ``peer add ... --tls required|off`` (default ``required``): a ``required`` peer connects over DICOM
  TLS with a client certificate that proves it and is refused on the plain port; ``off`` is for a
  legacy device on its own address (plain DICOM, reported as a posture finding).
* ``--cert-fingerprint SHA256`` pins the one certificate the peer may present; ``--cert FILE`` pins a
  certificate the device brings (its vendor's, or self-signed) and trusts it for this peer only.
* ``--user-identity none|optional|required``: User Identity Negotiation (PS3.7 D.3.3.7).
* ``peer cert AE --out DIR`` issues DIR/cert.pem (CN = AE title), DIR/key.pem (0600) and DIR/ca.pem.
* ``peer revoke-cert AE [--fingerprint SHA256]`` revokes the peer's certificates (all, or one);
  admission refuses them from the next association on.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safepacs.errors import SafePacsError
from safepacs.types import Peer, TlsMode, UserIdentityMode

if TYPE_CHECKING:
    from safepacs.db.ports import Directory

__all__ = [
    "add_cert_parsers",
    "add_security_options",
    "cmd_peer_cert",
    "cmd_peer_revoke",
    "describe_security",
    "peer_security",
    "plain_peer_warning",
    "record_pinned",
]


class PeerOptionError(SafePacsError):
    """A ``peer`` command line option is wrong."""


def add_security_options(sp: argparse.ArgumentParser) -> None:
    """The DICOM TLS and user identity options of ``peer add``."""
    sp.add_argument(
        "--tls",
        choices=[m.value for m in TlsMode],
        default=TlsMode.REQUIRED.value,
        help="required (default): DICOM TLS with a client certificate, never plain; "
        "off: plain DICOM for a legacy device on its own address (a posture finding)",
    )
    sp.add_argument(
        "--cert-fingerprint",
        metavar="SHA256",
        help="pin the peer's client certificate by its SHA-256 fingerprint (64 hex digits, colons allowed)",
    )
    sp.add_argument(
        "--cert",
        metavar="FILE",
        help="pin a certificate the device brings (PEM): trusted for this peer only, whoever issued it",
    )
    sp.add_argument(
        "--user-identity",
        choices=[m.value for m in UserIdentityMode],
        default=UserIdentityMode.NONE.value,
        help="DIMSE user identity (username+passcode or JWT): none (default), optional, required",
    )


def add_cert_parsers(peer: Any, data_opt: Callable[[argparse.ArgumentParser], None]) -> None:
    """``peer cert`` and ``peer revoke-cert``."""
    sp = peer.add_parser("cert", help="issue a client certificate for a peer from the SafePACS CA")
    data_opt(sp)
    sp.add_argument("ae_title", metavar="AE_TITLE")
    sp.add_argument(
        "--out", required=True, metavar="DIR", help="folder for cert.pem, key.pem (mode 0600), ca.pem"
    )
    sp.add_argument("--days", type=int, default=825, metavar="N", help="validity in days (default 825)")
    sp = peer.add_parser("revoke-cert", help="revoke a peer's client certificates (refused at once)")
    data_opt(sp)
    sp.add_argument("ae_title", metavar="AE_TITLE")
    sp.add_argument("--fingerprint", metavar="SHA256", help="revoke only this certificate")


def _fingerprint(text: str, option: str) -> str:
    from safepacs.auth.pki import normalize_fingerprint

    try:
        return normalize_fingerprint(text)
    except ValueError as exc:
        raise PeerOptionError(f"{option}: {exc}") from None


def peer_security(args: argparse.Namespace) -> tuple[dict[str, Any], bytes | None]:
    """The TLS and user identity fields of the peer ``peer add`` registers, and the PEM of a
    certificate pinned with ``--cert`` (None without one)."""
    from safepacs.auth.pki import certificate_fingerprint

    tls = TlsMode(args.tls)
    pinned = _fingerprint(args.cert_fingerprint, "--cert-fingerprint") if args.cert_fingerprint else None
    pem: bytes | None = None
    if args.cert:
        try:
            raw = Path(args.cert).read_bytes()
        except OSError as exc:
            raise PeerOptionError(f"--cert: cannot read {args.cert} ({exc.strerror})") from None
        if not raw.lstrip().startswith(b"-----BEGIN CERTIFICATE"):
            raise PeerOptionError(f"--cert: {args.cert} is not a PEM certificate")
        from cryptography.hazmat.primitives import serialization

        from safepacs.auth.pki import load_certificate

        try:
            cert = load_certificate(raw)
        except SafePacsError:
            raise PeerOptionError(f"--cert: {args.cert} is not a PEM certificate") from None
        pem = cert.public_bytes(serialization.Encoding.PEM)  # the first certificate only
        digest = certificate_fingerprint(pem)
        if pinned is not None and pinned != digest:
            raise PeerOptionError("--cert and --cert-fingerprint name different certificates")
        pinned = digest
    if pinned is not None and tls is TlsMode.OFF:
        raise PeerOptionError("a pinned certificate needs DICOM TLS: drop --tls off or the pin")
    identity = UserIdentityMode(args.user_identity)
    if identity is UserIdentityMode.REQUIRED and args.user:
        raise PeerOptionError("--user-identity required names the user on every association; drop --user")
    return {"tls": tls, "cert_sha256": pinned, "user_identity": identity}, pem


def record_pinned(directory: Directory, peer: Peer, pem: bytes | None) -> None:
    """Remember a certificate pinned with ``--cert`` (a trust anchor for this peer)."""
    if pem is None or peer.cert_sha256 is None:
        return
    from safepacs.auth.pki import load_certificate

    cert = load_certificate(pem)
    directory.record_certificate(
        peer.cert_sha256,
        peer.ae_title,
        source="pinned",
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc,
        pem=pem,
    )


def describe_security(peer: Peer, separator: str = "  ") -> str:
    """The TLS and user identity columns of ``peer list`` (each preceded by ``separator``)."""
    out = f"{separator}tls {peer.tls.value}"
    if peer.cert_sha256:
        out += f"{separator}pinned {peer.cert_sha256[:16]}..."
    if peer.user_identity is not UserIdentityMode.NONE:
        out += f"{separator}user-identity {peer.user_identity.value}"
    return out


def _server_names(peer: Peer) -> list[str] | None:
    """SAN entries for a peer that is also a C-MOVE destination (it then serves TLS to us)."""
    if peer.port is None:
        return None
    try:
        net = ipaddress.ip_network(peer.host, strict=False)
    except ValueError:
        return [peer.host]  # a host name
    return [str(net.network_address)] if net.num_addresses == 1 else None


def cmd_peer_cert(args: argparse.Namespace, directory: Directory, keys_dir: Path) -> int:
    """``peer cert AE --out DIR``: DIR/cert.pem, DIR/key.pem (0600), DIR/ca.pem; the certificate is
    recorded (so ``revoke-cert`` can revoke it)."""
    from safepacs.auth.pki import certificate_fingerprint, issue_certificate, load_certificate, write_private

    ae_title = args.ae_title.strip()
    peer = directory.get_peer(ae_title)
    if peer is None:
        raise PeerOptionError(
            f"no peer with AE title {ae_title!r} is registered; add it with 'safepacs peer add'"
        )
    if not 1 <= args.days <= 3650:
        raise PeerOptionError("--days must be between 1 and 3650")
    out = Path(args.out)
    try:
        out.mkdir(mode=0o700, parents=False, exist_ok=True)
    except OSError as exc:
        raise PeerOptionError(f"--out: cannot create {out} ({exc.strerror})") from None
    targets = [out / "cert.pem", out / "key.pem", out / "ca.pem"]
    present = [str(p) for p in targets if p.exists() or p.is_symlink()]
    if present:
        raise PeerOptionError(f"{present[0]} exists already; refusing to overwrite it (choose another --out)")
    try:
        ca_cert, ca_key = (keys_dir / "ca.pem").read_bytes(), (keys_dir / "ca.key").read_bytes()
    except OSError as exc:
        raise PeerOptionError(f"cannot read the CA in {keys_dir} ({exc.strerror})") from None
    cert, key = issue_certificate(
        ca_cert, ca_key, ae_title, server_names=_server_names(peer), client=True, days=args.days
    )
    write_private(targets[1], key)
    write_private(targets[0], cert)
    write_private(targets[2], ca_cert)
    for public in (targets[0], targets[2]):
        public.chmod(0o644)
    parsed = load_certificate(cert)
    digest = certificate_fingerprint(cert)
    directory.record_certificate(
        digest,
        ae_title,
        source="issued",
        serial=format(parsed.serial_number, "x"),
        not_after=parsed.not_valid_after_utc,
    )
    note = "" if peer.tls is TlsMode.REQUIRED else " (the peer is registered --tls off: it may connect plain)"
    print(
        f"Certificate for {ae_title} written to {out}: cert.pem, key.pem (keep it secret), ca.pem; "
        f"SHA-256 {digest}{note}",
        file=sys.stderr,
    )
    return 0


def cmd_peer_revoke(args: argparse.Namespace, directory: Directory) -> int:
    """``peer revoke-cert AE [--fingerprint SHA256]``."""
    ae_title = args.ae_title.strip()
    only = _fingerprint(args.fingerprint, "--fingerprint") if args.fingerprint else None
    peer = directory.get_peer(ae_title)
    count = 0
    if only is None and peer is not None and peer.cert_sha256 is not None:
        count += directory.revoke_certificates(ae_title, peer.cert_sha256)  # pinned by fingerprint only
    count += directory.revoke_certificates(ae_title, only)
    if count == 0 and only is None:
        print(f"No unrevoked certificate of {ae_title} is on record", file=sys.stderr)
        return 1
    print(f"Revoked {count} certificate(s) of {ae_title}; they are refused from now on", file=sys.stderr)
    return 0


def plain_peer_warning(peers: Iterable[Peer]) -> str | None:
    """The posture warning when the plain DICOM port is on a non-loopback address: which peers may use
    it (``--tls off``), or None when none may."""
    plain = sorted(p.ae_title for p in peers if p.tls is TlsMode.OFF)
    if not plain:
        return None
    return (
        f"plain DICOM port on a non-loopback address, serving {len(plain)} peer(s) registered --tls off "
        f"({', '.join(plain[:10])}{', ...' if len(plain) > 10 else ''}): their traffic is not encrypted; "
        "move them to DICOM TLS with 'safepacs peer cert' when they support it"
    )
