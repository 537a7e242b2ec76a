"""The study pages: ``/studies`` (search), ``/studies/{uid}`` (a study's series) and the built-in
viewer ``/studies/{uid}/series/{uid}/view``.

Each runs the same query as QIDO-RS (:meth:`safepacs.services.query.QueryService.search`) as the
signed-in person, so it shows only what their policy lets them see and is recorded like any query;
a study they may not see is "not found", exactly like one that does not exist.  Images are fetched
by the browser from DICOMweb (thumbnails, rendered frames) with the same session.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import ImmutableMultiDict

from safepacs.auth.login import LoginService
from safepacs.errors import AccessDenied, QueryError
from safepacs.protocols.dicomweb.problems import Problem
from safepacs.protocols.dicomweb.qido import build_identifier
from safepacs.protocols.webui.render import PageError, page
from safepacs.protocols.webui.visitors import Visitor, checked_form, visitor_of
from safepacs.services.query import QueryService
from safepacs.types import QueryLevel, Service

__all__ = ["PAGE_SIZE", "studies_router"]

PAGE_SIZE = 25
_MAX_PAGE = 400
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SEARCH_FIELDS = ("name", "patient_id", "date_from", "date_to", "modality", "accession", "referring")
_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")
_NOT_FOUND = PageError(404, "Study not found", "There is no such study, or it is not one you may see.")


def value(result: dict[str, Any], tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON result as text ('' when empty); a person name's
    alphabetic form with its ``^`` shown as spaces."""
    values = result.get(tag, {}).get("Value") or [""]
    first = values[0]
    if isinstance(first, dict):
        first = first.get("Alphabetic", "")
        return " ".join(part for part in str(first).replace("^", " ").split())
    return str(first)


def values(result: dict[str, Any], tag: str) -> list[str]:
    return [str(v) for v in result.get(tag, {}).get("Value") or []]


def shown_date(text: str) -> str:
    """A DICOM date as ISO 8601 (YYYY-MM-DD) for the page; other text as it is."""
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


def _dicom_date(text: str, field: str) -> str:
    try:
        return dt.date.fromisoformat(text).strftime("%Y%m%d")
    except ValueError:
        raise PageError(400, "Search not understood", f"{field} must be a date (YYYY-MM-DD).") from None


def _prefix(text: str) -> str:
    """What a person types, as a DICOM match: a prefix unless they gave wildcards themselves."""
    return text if ("*" in text or "?" in text) else text + "*"


def _number(text: str) -> int:
    """A series or instance number for sorting (those without one last)."""
    return int(text) if text.lstrip("-").isdigit() else 1 << 30


def search_keys(form: dict[str, str]) -> list[tuple[str, str]]:
    """The QIDO-RS query keys of the search form's fields (which are all optional)."""
    keys: list[tuple[str, str]] = []
    if form.get("name"):
        keys.append(("PatientName", _prefix(form["name"])))
    if form.get("patient_id"):
        keys.append(("PatientID", form["patient_id"]))
    start = _dicom_date(form["date_from"], "From") if form.get("date_from") else ""
    end = _dicom_date(form["date_to"], "To") if form.get("date_to") else ""
    if start or end:
        keys.append(("StudyDate", f"{start}-{end}" if start != end else start))
    if form.get("modality"):
        modality = form["modality"].upper()
        if not _MODALITY.match(modality):
            raise PageError(400, "Search not understood", "Modality is a code such as CT, MR or US.")
        keys.append(("ModalitiesInStudy", modality))
    if form.get("accession"):
        keys.append(("AccessionNumber", form["accession"]))
    if form.get("referring"):
        keys.append(("ReferringPhysicianName", _prefix(form["referring"])))
    return keys


def studies_router(
    logins: LoginService, query: QueryService, *, viewer_installed: Callable[[], bool]
) -> APIRouter:
    """The study pages; ``viewer_installed()`` says whether to offer OHIF (asked on each study page, so
    an installation made while the server runs shows at once)."""
    router = APIRouter(include_in_schema=False)

    def search(
        visitor: Visitor,
        level: QueryLevel,
        keys: list[tuple[str, str]],
        path: dict[str, str],
        *,
        limit: int | None,
        offset: int = 0,
    ) -> tuple[list[dict[str, Any]], bool]:
        try:
            identifier = build_identifier(level, ImmutableMultiDict(keys), path)
            found, more = query.search(
                visitor.principal, level, identifier, limit=limit, offset=offset, as_json=True
            )
        except Problem as exc:
            raise PageError(400, "Search not understood", exc.detail) from None
        except QueryError as exc:
            raise PageError(400, "Search not understood", str(exc)) from None
        except AccessDenied:
            raise _NOT_FOUND from None
        return found, more

    def study_of(visitor: Visitor, study: str) -> dict[str, Any]:
        if not _UID.match(study) or len(study) > 64:
            raise _NOT_FOUND
        found, _ = search(visitor, QueryLevel.STUDY, [("includefield", "StudyDescription")],
                          {"StudyInstanceUID": study}, limit=1)  # fmt: skip
        if not found:
            raise _NOT_FOUND
        return found[0]

    def listing(request: Request, visitor: Visitor, form: dict[str, str], number: int) -> HTMLResponse:
        if not visitor.may_search:  # nothing hidden: the role searches no studies
            raise PageError(403, "Not available to your role", "Your role does not search studies.")
        keys = [*search_keys(form), ("includefield", "StudyDescription")]
        found, more = search(
            visitor, QueryLevel.STUDY, keys, {}, limit=PAGE_SIZE, offset=(number - 1) * PAGE_SIZE
        )
        rows = [
            {
                "uid": value(r, "0020000D"),
                "patient": value(r, "00100010"),
                "patient_id": value(r, "00100020"),
                "birth": shown_date(value(r, "00100030")),
                "date": shown_date(value(r, "00080020")),
                "modalities": ", ".join(values(r, "00080061")),
                "accession": value(r, "00080050"),
                "description": value(r, "00081030"),
                "series": value(r, "00201206"),
                "instances": value(r, "00201208"),
            }
            for r in found
        ]
        return page(request, "studies.html", visitor=visitor, form=form, rows=rows, page_number=number,
                    more=more, searched=any(form.values()), page_size=PAGE_SIZE)  # fmt: skip

    @router.get("/studies")
    def studies(request: Request) -> HTMLResponse:
        """The search form and the most recent studies.  Search criteria never come in the URL (a
        patient's name or ID would stay in the browser's history): the form posts them."""
        visitor = visitor_of(request, logins)
        return listing(request, visitor, dict.fromkeys(_SEARCH_FIELDS, ""), 1)

    @router.post("/studies")
    async def studies_search(request: Request) -> HTMLResponse:
        visitor = await run_in_threadpool(visitor_of, request, logins)
        fields = await checked_form(request, visitor)
        form = {field: fields.get(field, "").strip()[:64] for field in _SEARCH_FIELDS}
        raw_page = fields.get("page", "1")
        number = int(raw_page) if raw_page.isdigit() and 0 < int(raw_page) <= _MAX_PAGE else 1
        return await run_in_threadpool(listing, request, visitor, form, number)

    @router.get("/studies/{study}")
    def study(request: Request, study: str) -> HTMLResponse:
        visitor = visitor_of(request, logins)
        found = study_of(visitor, study)
        series, _ = search(visitor, QueryLevel.SERIES, [], {"StudyInstanceUID": study}, limit=None)
        images, more_images = search(visitor, QueryLevel.IMAGE, [], {"StudyInstanceUID": study}, limit=None)
        by_series: dict[str, list[dict[str, str]]] = {}
        for r in sorted(images, key=lambda r: _number(value(r, "00200013"))):
            by_series.setdefault(value(r, "0020000E"), []).append(
                {
                    "number": value(r, "00200013"),
                    "uid": value(r, "00080018"),
                    "size": "x".join(v for v in (value(r, "00280010"), value(r, "00280011")) if v),
                    "frames": value(r, "00280008"),
                }
            )
        rows: list[dict[str, Any]] = sorted(
            (
                {
                    "uid": value(r, "0020000E"),
                    "number": value(r, "00200011"),
                    "modality": value(r, "00080060"),
                    "description": value(r, "0008103E"),
                    "instances": value(r, "00201209"),
                    "images": by_series.get(value(r, "0020000E"), []),
                }
                for r in series
            ),
            key=lambda row: _number(str(row["number"])),
        )
        facts = {
            "uid": study,
            "patient": value(found, "00100010"),
            "patient_id": value(found, "00100020"),
            "birth": shown_date(value(found, "00100030")),
            "sex": value(found, "00100040"),
            "date": shown_date(value(found, "00080020")),
            "accession": value(found, "00080050"),
            "description": value(found, "00081030"),
            "referring": value(found, "00080090"),
            "modalities": ", ".join(values(found, "00080061")),
        }
        allow = visitor.principal.allow  # the actions offered (each route asks the services again)
        return page(request, "study.html", visitor=visitor, study=facts, series=rows,
                    images_cut=more_images, viewer_installed=viewer_installed(),
                    may_download=Service.GET in allow, may_delete=Service.DELETE in allow)  # fmt: skip

    @router.get("/studies/{study}/series/{series}/view")
    def view(request: Request, study: str, series: str) -> HTMLResponse:
        visitor = visitor_of(request, logins)
        facts = study_of(visitor, study)
        if not _UID.match(series) or len(series) > 64:
            raise _NOT_FOUND
        found, _ = search(visitor, QueryLevel.IMAGE, [],
                          {"StudyInstanceUID": study, "SeriesInstanceUID": series}, limit=None)  # fmt: skip
        if not found:
            raise _NOT_FOUND
        found.sort(
            key=lambda r: int(value(r, "00200013")) if value(r, "00200013").lstrip("-").isdigit() else 0
        )
        base = f"/dicomweb/studies/{study}/series/{series}/instances/"
        urls = [base + value(r, "00080018") + "/rendered" for r in found]
        return page(request, "viewer.html", visitor=visitor, study={"uid": study,
                    "patient": value(facts, "00100010")}, series=series,
                    frames=json.dumps(urls))  # fmt: skip

    return router
