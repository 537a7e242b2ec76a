"""``safepacs peer add|list|remove|cert|revoke-cert``: the DICOM peers, their TLS and user identity.

* ``peer add ... --tls required|off`` (default ``required``): a ``required`` peer connects over DICOM
  TLS with a client certificate that proves it and is refused on the plain port; ``off`` is for a
  legacy device on its own address (plain DICOM, reported as a posture finding).
* ``--cert-fingerprint SHA256`` pins the one certificate the peer may present; ``--cert FILE`` pins a
  certificate the device brings (its vendor's, or self-signed) and trusts it for this peer only.
* ``--user-identity none|optional|required``: User Identity Negotiation (PS3.7 D.3.3.7).
* ``peer cert AE --out DIR`` issues DIR/cert.pem (CN = AE title), DIR/key.pem (0600) and DIR/ca.pem.
* ``peer revoke-cert AE [--fingerprint SHA256]`` revokes the peer's certificates (all, or one);
  admission refuses them from the next association on.

Every change is recorded on the audit trail with the change itself (:mod:`safepacs.services.admin`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from safepacs.cli._common import EXIT_OK, UsageError, add_data_option, admin_service, change, settings_of
from safepacs.services.admininput import CLI_PEER_FIELDS, PeerEntry, fingerprint, new_peer
from safepacs.types import Peer, TlsMode, UserIdentityMode

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers
    from safepacs.services.admin import AdminService

__all__ = ["describe_security", "register", "run"]


def register(sub: Subparsers) -> None:
    parser = sub.add_parser("peer", help="register, list and remove DICOM peers")
    parser.set_defaults(handler=run)
    peer = parser.add_subparsers(dest="peer_command", required=True, metavar="ACTION")
    sp = peer.add_parser("add", help="register a peer: AE title, its host, the services it may use")
    add_data_option(sp)
    sp.add_argument("ae_title", metavar="AE_TITLE")
    sp.add_argument(
        "--host", required=True, metavar="HOST_OR_CIDR", help="IP address, CIDR network or host name"
    )
    sp.add_argument(
        "--port", type=int, metavar="N", help="port the peer listens on (needed as a C-MOVE destination)"
    )
    sp.add_argument(
        "--allow", required=True, metavar="SERVICES", help="comma list of echo,store,find,get,move"
    )
    sp.add_argument(
        "--user",
        metavar="NAME",
        help="the user this AE acts for: it gets no more than that user's rights and sees what they see",
    )
    _add_security_options(sp)
    sp = peer.add_parser("list", help="list registered peers")
    add_data_option(sp)
    sp = peer.add_parser("remove", help="remove a registered peer")
    add_data_option(sp)
    sp.add_argument("ae_title", metavar="AE_TITLE")
    sp = peer.add_parser("cert", help="issue a client certificate for a peer from the SafePACS CA")
    add_data_option(sp)
    sp.add_argument("ae_title", metavar="AE_TITLE")
    sp.add_argument(
        "--out", required=True, metavar="DIR", help="folder for cert.pem, key.pem (mode 0600), ca.pem"
    )
    sp.add_argument("--days", type=int, default=825, metavar="N", help="validity in days (default 825)")
    sp = peer.add_parser("revoke-cert", help="revoke a peer's client certificates (refused at once)")
    add_data_option(sp)
    sp.add_argument("ae_title", metavar="AE_TITLE")
    sp.add_argument("--fingerprint", metavar="SHA256", help="revoke only this certificate")


def _add_security_options(sp: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    action = str(args.peer_command)
    if action == "add":
        return _add(args, argv)
    with admin_service(args) as admin:
        if action == "cert":
            return _issue(args, argv, admin)
        if action == "revoke-cert":
            return _revoke(args, argv, admin)
        if action == "remove":
            admin.remove_peer(args.ae_title.strip(), change("peer", argv))
            print(f"Peer {args.ae_title.strip()} removed", file=sys.stderr)
        else:
            _list(admin)
    return EXIT_OK


def _list(admin: AdminService) -> None:
    peers = admin.peers()
    if not peers:
        print("No peers registered: nothing can connect. Add one with 'safepacs peer add'.", file=sys.stderr)
    for p in peers:
        port = p.port if p.port is not None else "-"
        user = f"  user {p.user}" if p.user else ""
        allow = ",".join(sorted(p.allow))
        print(f"{p.ae_title:<16}  {p.host:<24}  {port!s:<5}  {allow}{user}{describe_security(p)}")


def _add(args: argparse.Namespace, argv: Sequence[str]) -> int:
    cert_pem: bytes | None = None
    if args.cert:
        try:
            cert_pem = Path(args.cert).read_bytes()
        except OSError as exc:
            raise UsageError(f"--cert: cannot read {args.cert} ({exc.strerror})") from None
    entry = PeerEntry(
        args.ae_title,
        args.host,
        args.allow.split(","),
        args.port,
        args.user,
        tls=args.tls,
        cert_fingerprint=args.cert_fingerprint,
        cert_pem=cert_pem,
        user_identity=args.user_identity,
    )
    peer, pin = new_peer(entry, {**CLI_PEER_FIELDS, "cert": f"--cert {args.cert}"})
    with admin_service(args) as admin:
        admin.add_peer(peer, change("peer", argv), pin)
    acting = f", acting for user {peer.user}" if peer.user else ""
    print(
        f"Peer {peer.ae_title} registered: host {peer.host}, "
        f"allowed {','.join(sorted(peer.allow))}{acting}{describe_security(peer, ', ')}",
        file=sys.stderr,
    )
    return EXIT_OK


def describe_security(peer: Peer, separator: str = "  ") -> str:
    """The TLS and user identity columns of ``peer list`` (each preceded by ``separator``)."""
    out = f"{separator}tls {peer.tls.value}"
    if peer.cert_sha256:
        out += f"{separator}pinned {peer.cert_sha256[:16]}..."
    if peer.user_identity is not UserIdentityMode.NONE:
        out += f"{separator}user-identity {peer.user_identity.value}"
    return out


def _issue(args: argparse.Namespace, argv: Sequence[str], admin: AdminService) -> int:
    """``peer cert AE --out DIR``: DIR/cert.pem, DIR/key.pem (0600), DIR/ca.pem; the certificate is
    recorded (so ``revoke-cert`` can revoke it) before its files exist."""
    from safepacs.auth.pki import write_private

    keys_dir = settings_of(args).keys_dir
    ae_title = args.ae_title.strip()
    peer = admin.peer(ae_title)
    if peer is None:
        raise UsageError(f"no peer with AE title {ae_title!r} is registered; add it with 'safepacs peer add'")
    if not 1 <= args.days <= 3650:
        raise UsageError("--days must be between 1 and 3650")
    out = Path(args.out)
    try:
        out.mkdir(mode=0o700, parents=False, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {out} ({exc.strerror})") from None
    targets = [out / "cert.pem", out / "key.pem", out / "ca.pem"]
    present = [str(p) for p in targets if p.exists() or p.is_symlink()]
    if present:
        raise UsageError(f"{present[0]} exists already; refusing to overwrite it (choose another --out)")
    try:
        ca_cert, ca_key = (keys_dir / "ca.pem").read_bytes(), (keys_dir / "ca.key").read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the CA in {keys_dir} ({exc.strerror})") from None
    issued = admin.issue_certificate(ae_title, args.days, (ca_cert, ca_key), change("peer", argv))
    write_private(targets[1], issued.key_pem)
    write_private(targets[0], issued.cert_pem)
    write_private(targets[2], ca_cert)
    for public in (targets[0], targets[2]):
        public.chmod(0o644)
    note = "" if peer.tls is TlsMode.REQUIRED else " (the peer is registered --tls off: it may connect plain)"
    print(
        f"Certificate for {ae_title} written to {out}: cert.pem, key.pem (keep it secret), ca.pem; "
        f"SHA-256 {issued.sha256}{note}",
        file=sys.stderr,
    )
    return EXIT_OK


def _revoke(args: argparse.Namespace, argv: Sequence[str], admin: AdminService) -> int:
    """``peer revoke-cert AE [--fingerprint SHA256]``."""
    ae_title = args.ae_title.strip()
    only = fingerprint(args.fingerprint, "--fingerprint") if args.fingerprint else None
    count = admin.revoke_certificates(ae_title, change("peer", argv), only)
    if count == 0 and only is None:
        print(f"No unrevoked certificate of {ae_title} is on record", file=sys.stderr)
        return 1
    print(f"Revoked {count} certificate(s) of {ae_title}; they are refused from now on", file=sys.stderr)
    return EXIT_OK
