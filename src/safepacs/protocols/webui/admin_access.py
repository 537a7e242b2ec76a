"""``/admin/access``: who sees which study, as ``safepacs access``: a user's scope (institutions,
modalities, referred studies, access groups), studies' access groups, and per-study grants that may
expire.  Values are checked by :mod:`safepacs.services.admininput`, as the command's are."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from safepacs.auth.login import LoginService
from safepacs.auth.policy import scope_of
from safepacs.errors import InputError
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
from safepacs.services.admin import AdminService
from safepacs.services.admininput import describe_scope, lifetime, scope, study_uid, word
from safepacs.types import Scope

__all__ = ["access_router"]


def _items(text: str) -> list[str]:
    """A comma-separated field's values."""
    return [part for part in (p.strip() for p in text.split(",")) if part]


def _scope(fields: dict[str, str]) -> Scope | None:
    """The scope the form sets (None: ``clear`` lifts it)."""
    institutions, modalities = _items(fields.get("institutions", "")), _items(fields.get("modalities", ""))
    groups, referring = _items(fields.get("groups", "")), fields.get("referring", "").strip() or None
    if fields.get("clear"):
        if institutions or modalities or groups or referring:
            raise InputError("Lifting the scope cannot be combined with other restrictions")
        return None
    return scope(
        institutions,
        modalities,
        referring,
        groups,
        what="Give at least one institution, modality, referring physician or group (or lift the scope)",
    )


def access_router(logins: LoginService, admin: AdminService) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def access_page(
        request: Request,
        visitor: Visitor,
        status: int = 200,
        error: str | None = None,
        entered: dict[str, str] | None = None,
    ) -> HTMLResponse:
        users = admin.users()
        seen = []
        for user in users:
            restriction = scope_of(user)
            seen.append((user, "everything" if restriction is None else describe_scope(restriction)))
        return page(
            request,
            "admin_access.html",
            status,
            visitor=visitor,
            seen=seen,
            users=[u.name for u in users],
            groups=admin.study_groups(),
            grants=admin.grants(),
            now=datetime.now(UTC),
            notice=None if error else notice(request),
            error=error,
            entered=entered or {},
        )

    @router.get("/admin/access")
    def access(request: Request) -> HTMLResponse:
        return access_page(request, admin_visitor(request, logins))

    async def attempt(
        request: Request, visitor: Visitor, call: Callable[[], None], fields: dict[str, str]
    ) -> Response | None:
        try:
            await changing(call)
        except Refusal as exc:
            return await run_in_threadpool(access_page, request, visitor, exc.status, exc.message, fields)
        return None

    @router.post("/admin/access/scope")
    async def set_scope(request: Request) -> Response:
        visitor, fields = await admin_form(request, logins)
        name = fields.get("name", "").strip()
        outcome: list[Scope | None] = []

        def change() -> None:
            restriction = _scope(fields)
            admin.set_scope(name, restriction, change_by(request, visitor, f"set the scope of user {name}"))
            outcome.append(restriction)

        refused = await attempt(request, visitor, change, fields)
        return refused or done("/admin/access", "scope-cleared" if outcome[0] is None else "scope-set")

    @router.post("/admin/access/groups")
    async def add_group(request: Request) -> Response:
        visitor, fields = await admin_form(request, logins)
        added: list[bool] = []

        def change() -> None:
            study = study_uid(fields.get("study_uid", "").strip())
            group = word(fields.get("group", ""), "a group")
            by = change_by(request, visitor, f"put study {study} in access group {group}")
            added.append(admin.add_study_group(study, group, by))

        refused = await attempt(request, visitor, change, fields)
        return refused or done("/admin/access", "group-added" if added[0] else "group-present")

    @router.post("/admin/access/groups/remove")
    async def remove_group(request: Request) -> Response:
        visitor, fields = await admin_form(request, logins)

        def change() -> None:
            study, group = study_uid(fields.get("study_uid", "").strip()), fields.get("group", "")
            by = change_by(request, visitor, f"took study {study} out of access group {group}")
            admin.remove_study_group(study, group, by)

        return await attempt(request, visitor, change, {}) or done("/admin/access", "group-removed")

    @router.post("/admin/access/grants")
    async def grant(request: Request) -> Response:
        visitor, fields = await admin_form(request, logins)

        def change() -> None:
            study, name = study_uid(fields.get("study_uid", "").strip()), fields.get("user", "").strip()
            expires_text = fields.get("expires", "").strip()
            expires = datetime.now(UTC) + lifetime(expires_text, "Expires after") if expires_text else None
            by = change_by(request, visitor, f"granted study {study} to user {name}")
            admin.grant_study(study, name, expires, by)

        return await attempt(request, visitor, change, fields) or done("/admin/access", "grant-added")

    @router.post("/admin/access/grants/revoke")
    async def revoke(request: Request) -> Response:
        visitor, fields = await admin_form(request, logins)

        def change() -> None:
            study, name = study_uid(fields.get("study_uid", "").strip()), fields.get("user", "").strip()
            by = change_by(request, visitor, f"revoked the grant of study {study} to user {name}")
            admin.revoke_grant(study, name, by)

        return await attempt(request, visitor, change, {}) or done("/admin/access", "grant-revoked")

    return router
