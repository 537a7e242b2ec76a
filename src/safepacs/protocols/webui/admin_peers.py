"""``/admin/peers``: the DICOM peers, as ``safepacs peer add|list|remove|cert|revoke-cert``.

A new peer is checked by :func:`safepacs.services.admininput.new_peer`, the function ``peer add``
uses, so the page and the command accept and refuse the same values.

A client certificate is issued like ``peer cert`` does (recorded, with its audit record, before its
key exists anywhere but in memory) and answered at once as a ZIP of ``cert.pem``, ``key.pem`` and
``ca.pem`` - the very files ``peer cert`` writes, in PEM because that is what DICOM TLS toolkits
read (DCMTK's ``+cf``/``+ck``, pynetdicom's ``ssl.SSLContext``, Orthanc); a PKCS#12 file would need a
passphrase to carry beside it and a conversion on most of them.  The key is in that one answer and
nowhere else: SafePACS keeps no copy, so a lost bundle is revoked and issued again.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections import defaultdict
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from safepacs.auth.login import LoginService
from safepacs.errors import InputError, KeyMaterialError
from safepacs.protocols.webui.adminkit import (
    Refusal,
    admin_form,
    admin_visitor,
    change_by,
    changing,
    done,
    notice,
)
from safepacs.protocols.webui.render import page
from safepacs.protocols.webui.visitors import Visitor
from safepacs.records import CertificateRecord
from safepacs.services.admin import AdminService, IssuedCertificate
from safepacs.services.admininput import PeerEntry, new_peer
from safepacs.types import DIMSE_SERVICES, TlsMode, UserIdentityMode

__all__ = ["PAGE_PEER_FIELDS", "peers_router"]

#: How the add-peer form names its fields in the messages of :func:`~safepacs.services.admininput.new_peer`.
PAGE_PEER_FIELDS = {
    "host": "Host or network",
    "port": "Port",
    "allow": "Allowed services",
    "tls": "DICOM TLS",
    "tls_off": "DICOM TLS off",
    "cert_fingerprint": "Pinned fingerprint",
    "cert": "Pinned certificate",
    "user_identity": "User identity",
    "user": "Acts for user",
}
_SERVICES = sorted(s.value for s in DIMSE_SERVICES)
_DEFAULT_DAYS = 825
_FILE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _port(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 5:
        raise InputError("Port must be a number between 1 and 65535 (or empty)")
    return int(text)


def _entry(fields: dict[str, str]) -> PeerEntry:
    """The new peer as the form gives it."""
    return PeerEntry(
        fields.get("ae_title", ""),
        fields.get("host", "").strip(),
        [s for s in _SERVICES if fields.get(f"allow_{s}")],
        _port(fields.get("port", "")),
        fields.get("user", "").strip() or None,
        tls=fields.get("tls", TlsMode.REQUIRED.value),
        cert_fingerprint=fields.get("cert_fingerprint", "").strip() or None,
        cert_pem=fields.get("cert_pem", "").strip().encode() or None,
        user_identity=fields.get("user_identity", UserIdentityMode.NONE.value),
    )


def bundle(issued: IssuedCertificate, ca_cert: bytes) -> bytes:
    """The ZIP a peer's certificate is downloaded as: the files ``safepacs peer cert`` writes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cert.pem", issued.cert_pem)
        archive.writestr("key.pem", issued.key_pem)
        archive.writestr("ca.pem", ca_cert)
    return buffer.getvalue()


def peers_router(logins: LoginService, admin: AdminService, keys_dir: Path) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def peers_page(
        request: Request,
        visitor: Visitor,
        status: int = 200,
        error: str | None = None,
        entered: dict[str, str] | None = None,
    ) -> HTMLResponse:
        certificates: dict[str, list[CertificateRecord]] = defaultdict(list)
        for record in admin.certificates():
            certificates[record.ae_title].append(record)
        return page(
            request,
            "admin_peers.html",
            status,
            visitor=visitor,
            peers=admin.peers(),
            certificates=certificates,
            users=[u.name for u in admin.users()],
            services=_SERVICES,
            tls_modes=[m.value for m in TlsMode],
            identity_modes=[m.value for m in UserIdentityMode],
            notice=None if error else notice(request),
            error=error,
            entered=entered if entered is not None else {"tls": "required", "user_identity": "none"},
            default_days=_DEFAULT_DAYS,
        )

    @router.get("/admin/peers")
    def peers(request: Request) -> HTMLResponse:
        return peers_page(request, admin_visitor(request, logins))

    async def refused(request: Request, visitor: Visitor, exc: Refusal, entered: dict[str, str]) -> Response:
        return await run_in_threadpool(peers_page, request, visitor, exc.status, exc.message, entered)

    @router.post("/admin/peers")
    async def add(request: Request) -> Response:
        visitor, fields = await admin_form(request, logins)

        def add_peer() -> None:
            peer, pin = new_peer(_entry(fields), PAGE_PEER_FIELDS)
            admin.add_peer(peer, change_by(request, visitor, f"added peer {peer.ae_title}"), pin)

        try:
            await changing(add_peer)
        except Refusal as exc:
            return await refused(request, visitor, exc, fields)
        return done("/admin/peers", "peer-added")

    @router.post("/admin/peers/remove")
    async def remove(request: Request) -> Response:
        visitor, fields = await admin_form(request, logins)
        ae_title = fields.get("ae_title", "").strip()
        by = change_by(request, visitor, f"removed peer {ae_title}")
        try:
            await changing(lambda: admin.remove_peer(ae_title, by))
        except Refusal as exc:
            return await refused(request, visitor, exc, {})
        return done("/admin/peers", "peer-removed")

    @router.post("/admin/peers/certificate")
    async def certificate(request: Request) -> Response:
        visitor, fields = await admin_form(request, logins)
        ae_title = fields.get("ae_title", "").strip()
        days = fields.get("days", "").strip() or str(_DEFAULT_DAYS)
        by = change_by(request, visitor, f"issued a client certificate for peer {ae_title}")

        def issue() -> tuple[IssuedCertificate, bytes]:
            if not days.isdigit() or len(days) > 4:
                raise InputError("the validity is a whole number of days, 1 to 3650")
            try:
                ca_cert, ca_key = (keys_dir / "ca.pem").read_bytes(), (keys_dir / "ca.key").read_bytes()
            except OSError as exc:
                raise KeyMaterialError(f"the CA cannot be read ({exc.strerror})") from None
            return admin.issue_certificate(ae_title, int(days), (ca_cert, ca_key), by), ca_cert

        try:
            issued, ca_cert = await changing(issue)
        except Refusal as exc:
            return await refused(request, visitor, exc, {})
        name = _FILE_NAME.sub("_", ae_title) or "peer"
        return Response(
            bundle(issued, ca_cert),
            media_type="application/zip",
            headers={
                "Content-Disposition": f'attachment; filename="{name}-certificate.zip"',
                "Cache-Control": "no-store",
            },
        )

    @router.post("/admin/peers/revoke")
    async def revoke(request: Request) -> Response:
        visitor, fields = await admin_form(request, logins)
        ae_title = fields.get("ae_title", "").strip()
        by = change_by(request, visitor, f"revoked the certificates of peer {ae_title}")
        try:
            count = await changing(lambda: admin.revoke_certificates(ae_title, by))
        except Refusal as exc:
            return await refused(request, visitor, exc, {})
        return done("/admin/peers", "certs-revoked" if count else "certs-none")

    return router
