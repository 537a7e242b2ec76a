"""What every administration page shares: the admin role check, the audited :class:`Change` of a
form, the one-line confirmations after a change, and turning a refused change into a message.

Each change goes through :class:`~safepacs.services.admin.AdminService`, exactly as the CLI's, so it
is recorded in the transaction that makes it; the record names the signed-in administrator with
their address and browser, and the command is ``web UI: <what was done>`` (never a secret).  After
a change the browser is redirected (POST-redirect-GET) to the list with ``?done=<key>``: a fixed key
of :data:`DONE`, never free text, so a link cannot make a page say anything else.  A change whose
answer is a secret (a one-time password, a token, a TOTP secret, a certificate's key) answers the
POST itself, with ``Cache-Control: no-store``: the secret is never in a URL, a log or the database.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from safepacs.auth.login import LoginService
from safepacs.errors import AuditError, ConflictError, InputError, NotFoundError, SafePacsError
from safepacs.protocols.dicomweb.security import requestor
from safepacs.protocols.webui.render import PageError, page
from safepacs.protocols.webui.visitors import Visitor, checked_form, visitor_of
from safepacs.services.admin import Change

__all__ = [
    "DONE",
    "Refusal",
    "admin_form",
    "admin_visitor",
    "change_by",
    "changing",
    "done",
    "notice",
    "shown_once",
]

T = TypeVar("T")

#: The confirmations a list page shows after a change (``?done=KEY``).
DONE: dict[str, str] = {
    "peer-added": "The peer was registered.",
    "peer-removed": "The peer was removed.",
    "certs-revoked": "The peer's certificates were revoked; they are refused from the next association on.",
    "certs-none": "The peer has no unrevoked certificate on record: nothing was revoked.",
    "user-disabled": "The user was disabled: their sessions ended and their tokens stopped working.",
    "user-enabled": "The user was enabled.",
    "totp-removed": "The user's second factor was removed; enrol a new one before their next sign-in.",
    "user-unlocked": "The user was unlocked.",
    "token-revoked": "The token was revoked.",
    "scope-set": "The user's scope was changed.",
    "scope-cleared": "The user is no longer restricted by a scope.",
    "group-added": "The study was put in the access group.",
    "group-present": "The study was in that access group already.",
    "group-removed": "The study was taken out of the access group.",
    "grant-added": "The study was granted to the user.",
    "grant-revoked": "The grant was revoked.",
}

_NOT_ADMIN = PageError(
    403, "Administrators only", "This page needs the admin role; ask an administrator if you need it."
)


class Refusal(Exception):
    """A change that was not made: ``message`` says why (shown on the form's page), ``status`` the answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def admin_visitor(request: Request, logins: LoginService) -> Visitor:
    """The signed-in administrator of a page (blocking: the database); 403 for anyone else."""
    visitor = visitor_of(request, logins)
    if not visitor.has("admin"):
        raise _NOT_ADMIN
    return visitor


async def admin_form(request: Request, logins: LoginService) -> tuple[Visitor, dict[str, str]]:
    """The administrator posting a form and its fields, after the role, origin and form token checks
    (the role first: a non-administrator's post is refused whatever it holds)."""
    visitor = await run_in_threadpool(admin_visitor, request, logins)
    return visitor, await checked_form(request, visitor)


def change_by(request: Request, visitor: Visitor, what: str) -> Change:
    """The audited author of a change made on a page: the administrator, their address and browser."""
    return Change(requestor(request, visitor.name), f"web UI: {what}")


async def changing(call: Callable[[], T]) -> T:
    """Run a change (blocking) in the thread pool; a value refused, an unknown or taken name, or an
    audit trail that cannot be written (the change is then not made) is a :class:`Refusal`."""
    try:
        return await run_in_threadpool(call)
    except (InputError, NotFoundError, ConflictError) as exc:
        raise Refusal(str(exc)) from None
    except AuditError:
        message = "Nothing was changed: the audit trail cannot be written. Try again later."
        raise Refusal(message, 503) from None
    except SafePacsError as exc:
        raise Refusal(f"Nothing was changed: {exc}", 503) from None


def done(path: str, key: str) -> RedirectResponse:
    """The redirect after a change, to ``path`` with its confirmation ``key`` (one of :data:`DONE`)."""
    if key not in DONE:  # pragma: no cover - a programming error
        raise KeyError(key)
    return RedirectResponse(f"{path}?done={key}", status_code=303)


def notice(request: Request) -> str | None:
    """The confirmation of the change just made (``?done=KEY``), if the key is one of :data:`DONE`."""
    return DONE.get(request.query_params.get("done", ""))


def shown_once(request: Request, visitor: Visitor, **context: Any) -> HTMLResponse:
    """The page that shows a secret once (``admin_once.html``), never cached."""
    response = page(request, "admin_once.html", visitor=visitor, **context)
    response.headers["Cache-Control"] = "no-store"
    return response
