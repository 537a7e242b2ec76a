"""The administration pages (``/admin``, the admin role only): peers and their certificates, users
and their second factor, tokens, and who sees which study.

Every change goes through :class:`~safepacs.services.admin.AdminService` - the service the
``safepacs`` commands use - and is recorded in the transaction that makes it, with the administrator's
name, address and browser (:mod:`safepacs.protocols.webui.adminkit`).  Anyone else gets a 403 page on
every address here, for reading as for posting.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from safepacs.auth.login import LoginService
from safepacs.protocols.webui.admin_access import access_router
from safepacs.protocols.webui.admin_peers import peers_router
from safepacs.protocols.webui.admin_users import users_router
from safepacs.protocols.webui.adminkit import admin_visitor
from safepacs.protocols.webui.render import page
from safepacs.services.admin import AdminService

__all__ = ["admin_router"]


def admin_router(logins: LoginService, admin: AdminService, keys_dir: Path) -> APIRouter:
    """Every administration page; ``keys_dir`` holds the CA that issues peer certificates."""
    router = APIRouter(include_in_schema=False)

    @router.get("/admin")
    def overview(request: Request) -> HTMLResponse:
        visitor = admin_visitor(request, logins)
        now = datetime.now(UTC)
        counts = {
            "peers": len(admin.peers()),
            "users": len(admin.users()),
            "tokens": sum(1 for t in admin.tokens() if t.revoked_at is None and t.expires_at > now),
            "grants": len(admin.grants()),
        }
        return page(request, "admin.html", visitor=visitor, counts=counts)

    router.include_router(peers_router(logins, admin, keys_dir))
    router.include_router(users_router(logins, admin))
    router.include_router(access_router(logins, admin))
    return router
