"""Rendering pages: the Jinja2 environment, the UI's Content-Security-Policy, and error pages.

The UI's CSP allows scripts, styles and images from this origin only: no inline script or style,
no ``eval``, no framing, forms posting only here.  (The DICOMweb API keeps its stricter
``default-src 'none'``; the OHIF viewer under ``/viewer`` has its own.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

__all__ = ["PAGE_HEADERS", "STATIC_DIR", "UI_CSP", "PageError", "page"]

_HERE = Path(__file__).parent
STATIC_DIR = _HERE / "static"

UI_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

#: Headers of every page beside the site's own (HSTS, nosniff, no-store...): the CSP above, and a
#: referrer policy that lets the browser send this origin on the pages' own form posts (under
#: ``no-referrer`` Chromium sends ``Origin: null``, which the origin check must refuse) while
#: another site still learns nothing, not even the address of the page a link was on.
PAGE_HEADERS = {"Content-Security-Policy": UI_CSP, "Referrer-Policy": "same-origin"}

_ENV = Environment(
    loader=FileSystemLoader(_HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


class PageError(Exception):
    """A page that cannot be shown: answered with the error page (``status``, a title and what to do)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """``template`` rendered with ``context`` (and ``visitor``, ``None`` unless given) as an HTML
    answer with the UI's CSP."""
    context.setdefault("visitor", None)
    html = _ENV.get_template(template).render(request_path=request.url.path, **context)
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)
