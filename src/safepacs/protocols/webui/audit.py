"""The audit pages: ``/audit`` (search the trail, and whether it verifies), ``/audit/records/{seq}``
(one record, every field), ``/audit/verify`` (verify now), ``/audit/report`` (the patient access
report as HTML, CSV or PDF) and ``/activity`` (a person's own records).

Everything goes through :class:`~safepacs.services.audittrail.AuditSearchService`, as ``/api/audit``
does: the policy decides who reads the trail (auditors, and administrators, whose role allows
everything; anyone else gets the refusal page, recorded as a Security Alert), and every reading -
a search, a record, a report, a verification, one's own activity - is itself recorded (110101 Audit
Log Used) before anything is shown.  Rows are :func:`~safepacs.audit.report.summary_row`, as in
``safepacs audit query|report``; a CSV cell goes through :func:`~safepacs.audit.report.for_csv`.

No patient ID, user name or address goes into a URL (the browser's history, the server's access log,
a proxy's): the search and the report are forms that POST (urlencoded, origin and form token checked
by :func:`~safepacs.protocols.webui.visitors.checked_form`) and the answer to the POST is the page
itself, never a redirect.  Paging, the report of a patient and its CSV/PDF downloads are POST buttons
too, carrying the criteria as hidden fields.  ``GET /audit`` is the search without criteria (the
newest records) and ``GET /audit/report`` the empty report form: both ignore any parameter, so an old
bookmark with a patient ID in it searches nothing, and the sign-in page is not sent it either.
Pages go newest first, continuing before the last record shown (``before``), so records added
meanwhile - this page's own record among them - do not shift the pages.

Verifying the whole trail reads every record: about 23 s for 100,000 records on the development
machine, so minutes on a large trail.  The chain cannot be checked from a signed checkpoint onward
without trusting every record before it (the verifier has no such mode, and a record changed after
an earlier check would go unnoticed), so the pages never do less than the whole check; instead it
runs in the background, one at a time, and a page waits for it only briefly (``/audit`` 2 s,
``/audit/verify`` 20 s), showing the last result meanwhile.  ``/audit`` starts a new one when the last
is older than 60 times what it took (a check of a minute is redone after an hour; at least every
hour, at most every 10 s), so verifying takes at most about 2 % of the time; ``/audit/verify`` starts one
at once (or waits for the one under way, then starts one).  Each check is recorded on the trail,
naming the auditor whose page started it.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from safepacs.audit.chain import StoredRecord, Verification
from safepacs.audit.events import AuditEvent, AuditFilter, ObjectKind, from_canonical, recorded_time
from safepacs.audit.report import ACTIONS, FIELDS, OUTCOMES, described, for_csv, summary_row, verified
from safepacs.auth.login import LoginService
from safepacs.errors import AccessDenied, AuditError, SafePacsError
from safepacs.protocols.webui.render import PageError, page
from safepacs.protocols.webui.visitors import SignInRequired, Visitor, checked_form, visitor_of
from safepacs.services.audittrail import AuditSearchService

__all__ = ["MAX_REPORT_ROWS", "PAGE_SIZE", "Checked", "Status", "Verifier", "audit_router"]

_log = logging.getLogger(__name__)

PAGE_SIZE = 50
#: The most rows a report shows (HTML, CSV or PDF alike); more are announced, not silently dropped.
MAX_REPORT_ROWS = 10_000
#: How long a verification is shown, as a multiple of how long it took (bounded below and above).
_FRESH_FACTOR = 60
_FRESH_MIN = timedelta(seconds=10)  # a small trail: not a check (and its record) per page view
_FRESH_MAX = timedelta(hours=1)
_SEARCH_FIELDS = ("who", "patient", "study", "from", "to", "outcome", "address")
_REPORT_FIELDS = ("patient", "study", "from", "to")
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]*$")
_REFUSED = PageError(403, "Not allowed", "Reading the audit trail needs the auditor role.")


@dataclass(frozen=True)
class Checked:
    """A verification of the trail: what it found, when it began and ended, how long it took (s)."""

    result: Verification
    began: datetime
    at: datetime
    took: float

    @property
    def text(self) -> str:
        return verified(self.result)

    def fresh(self, now: datetime) -> bool:
        return now - self.at < min(_FRESH_MAX, max(_FRESH_MIN, timedelta(seconds=self.took * _FRESH_FACTOR)))


@dataclass(frozen=True)
class Status:
    """What a page shows of the verification: the last one (None: none yet), when the one under way
    began (None: none is), and why the last attempt gave no result (None: it did)."""

    last: Checked | None
    running_since: datetime | None
    error: str | None


class Verifier:
    """The verifications of this process, in the background, one at a time (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._last: Checked | None = None
        self._began: datetime | None = None  # of the verification under way
        self._error: str | None = None

    def status(self, verify: Callable[[], Verification], *, now: bool, wait: float) -> Status:
        """The last verification once there is a good one - fresh, or (``now``) begun after this call
        - or once ``wait`` seconds have passed; ``verify()`` is started in a thread when needed."""
        asked = datetime.now(UTC)
        end = time.monotonic() + wait
        started = False
        with self._cond:
            while True:
                last = self._last
                if last is not None and (last.began >= asked if now else last.fresh(asked)):
                    break
                if self._began is None:
                    if started:  # it ended without a result (the error is logged and shown)
                        break
                    self._start(verify)
                    started = True
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return Status(self._last, self._began, self._error)

    def _start(self, verify: Callable[[], Verification]) -> None:
        self._began = began = datetime.now(UTC)
        threading.Thread(target=self._run, args=(verify, began), name="audit-verify", daemon=True).start()

    def _run(self, verify: Callable[[], Verification], began: datetime) -> None:
        clock = time.monotonic()
        checked: Checked | None = None
        error: str | None = "the verification failed (see the server's log)"  # unless it ends below
        try:
            result = verify()
            checked, error = Checked(result, began, datetime.now(UTC), time.monotonic() - clock), None
        except SafePacsError as exc:  # the head file unreadable, the check not recordable...
            error = str(exc)
            _log.error("the audit trail could not be verified for the audit page: %s", exc)
        finally:  # anything else goes on to the thread's hook, which logs it
            with self._cond:
                self._last = checked or self._last
                self._error = error
                self._began = None
                self._cond.notify_all()


# Reading the fields ---------------------------------------------------------------------------------
def _text(fields: Mapping[str, str], name: str, limit: int = 64) -> str:
    value = fields.get(name, "").strip()
    if len(value) > limit or not _PRINTABLE.match(value):
        raise PageError(400, "Search not understood", f"The {name} field is too long or not text.")
    return value


def _day(text: str, label: str, *, end: bool) -> datetime | None:
    """A date field as the first (or, ``end``, the last) moment of that day in UTC, as the CLI reads
    ``--since``/``--until`` dates."""
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise PageError(400, "Search not understood", f"{label} must be a date (YYYY-MM-DD).") from None
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start + timedelta(days=1, microseconds=-1) if end else start


def _before(raw: str) -> int | None:
    """The paging cursor (a record's sequence number: no PHI), None when absent or not a number."""
    return int(raw) if raw.isdigit() and 0 < len(raw) <= 18 else None


def _asked(form: dict[str, str], *extra: str) -> str:
    """The search as the auditor put it, for its record (as ``/api/audit`` records its query)."""
    return " ".join([*extra, *(f"{k}={v}" for k, v in form.items() if v)])


def _shown(seq: int, event: AuditEvent) -> dict[str, Any]:
    """The summary row of a record (as ``audit query`` has it) with its outcome and action in words."""
    row = summary_row(seq, event)
    row["outcome_text"] = OUTCOMES.get(row["outcome"], str(row["outcome"]))
    row["what"] = described(row)
    return row


def _rows(records: list[StoredRecord]) -> list[dict[str, Any]]:
    return [_shown(record.seq, from_canonical(record.body)) for record in records]


def _unavailable() -> PageError:
    """The page when the trail cannot record a reading of it (nothing is shown unrecorded)."""
    return PageError(503, "Audit trail unavailable", "The audit trail cannot be written; try again later.")


def audit_router(logins: LoginService, audits: AuditSearchService) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    verifier = Verifier()

    def auditor_of(request: Request) -> Visitor:
        """The signed-in visitor, if the policy lets them read the trail (the refusal is recorded).
        Without a session the sign-in page brings the browser back to the page's path alone: any
        query (an old bookmark's patient ID) is left out of the sign-in URL."""
        try:
            visitor = visitor_of(request, logins)
        except SignInRequired:
            raise SignInRequired(request.url.path if request.method == "GET" else "/") from None
        try:
            audits.admit(visitor.principal)
        except AccessDenied:
            raise _REFUSED from None
        except AuditError:  # the refusal could not be recorded: refused all the same
            raise _unavailable() from None
        return visitor

    async def posted(request: Request) -> tuple[Visitor, dict[str, str]]:
        """The auditor posting a form and its fields: the role first (a refusal is recorded whatever
        the post holds), then the origin and form token."""
        visitor = await run_in_threadpool(auditor_of, request)
        return visitor, await checked_form(request, visitor)

    def status(visitor: Visitor, *, now: bool) -> Status:
        principal = visitor.principal
        return verifier.status(lambda: audits.verify(principal), now=now, wait=20.0 if now else 2.0)

    def search_page(request: Request, visitor: Visitor, fields: Mapping[str, str]) -> HTMLResponse:
        """The trail's page: the search of ``fields`` (none: the newest records), recorded first."""
        form = {field: _text(fields, field, 256 if field == "who" else 64) for field in _SEARCH_FIELDS}
        if form["outcome"] not in ("", "success", "failure"):
            raise PageError(400, "Search not understood", "Outcome is success or failure.")
        where = AuditFilter(
            patient_id=form["patient"] or None,
            study_uid=form["study"] or None,
            user=form["who"] or None,
            since=_day(form["from"], "From", end=False),
            until=_day(form["to"], "To", end=True),
            failed=None if not form["outcome"] else form["outcome"] == "failure",
            address=form["address"] or None,
        )
        before = _before(fields.get("before", ""))
        try:
            verification = status(visitor, now=False)
            found = audits.search(visitor.principal, where, PAGE_SIZE + 1, before=before, newest_first=True,
                                  asked=_asked(form, "web search"))  # fmt: skip
        except AuditError:
            raise _unavailable() from None
        rows = _rows(found[:PAGE_SIZE])
        older = rows[-1]["seq"] if len(found) > PAGE_SIZE else None
        return page(request, "audit_search.html", visitor=visitor, form=form, rows=rows, older=older,
                    before=before, searched=any(form.values()), verification=verification)  # fmt: skip

    @router.get("/audit")
    def search(request: Request) -> HTMLResponse:
        return search_page(request, auditor_of(request), {})  # any parameter is ignored

    @router.post("/audit")
    async def search_posted(request: Request) -> HTMLResponse:
        visitor, fields = await posted(request)
        return await run_in_threadpool(search_page, request, visitor, fields)

    @router.get("/audit/verify")
    def verify(request: Request) -> HTMLResponse:
        visitor = auditor_of(request)
        return page(request, "audit_verify.html", visitor=visitor, verification=status(visitor, now=True))

    @router.get("/audit/records/{seq}")
    def record(request: Request, seq: str) -> HTMLResponse:
        visitor = auditor_of(request)
        if not seq.isdigit() or len(seq) > 18:
            raise PageError(404, "No such record", "There is no audit record with this number.")
        try:
            found = audits.record(visitor.principal, int(seq))
        except AuditError:
            raise _unavailable() from None
        if found is None:
            raise PageError(404, "No such record", "There is no audit record with this number.")
        event, recorded = recorded_time(found.body)
        row = _shown(found.seq, event)
        return page(request, "audit_record.html", visitor=visitor, record=found, event=event, row=row,
                    recorded=recorded, action=ACTIONS.get(event.action.value, event.action.value),
                    patient_kind=ObjectKind.PATIENT)  # fmt: skip

    def report_page(request: Request, visitor: Visitor, fields: Mapping[str, str]) -> Response:
        """The patient access report of ``fields`` as HTML, CSV or PDF (recorded first); the empty
        form when no patient is given."""
        form = {field: _text(fields, field) for field in _REPORT_FIELDS}
        kind = fields.get("format") or "html"
        if kind not in ("html", "csv", "pdf"):
            raise PageError(400, "Report not understood", "The format is html, csv or pdf.")
        if not form["patient"]:
            if kind != "html":
                raise PageError(400, "Report not understood", "Give the patient ID the report is about.")
            return page(request, "audit_report.html", visitor=visitor, form=form, rows=None)
        where = AuditFilter(
            patient_id=form["patient"],
            study_uid=form["study"] or None,
            since=_day(form["from"], "From", end=False),
            until=_day(form["to"], "To", end=True),
        )
        try:
            found = audits.search(visitor.principal, where, MAX_REPORT_ROWS + 1,
                                  asked=_asked(form, "report", f"format={kind}"))  # fmt: skip
        except AuditError:
            raise _unavailable() from None
        rows = _rows(found[:MAX_REPORT_ROWS])
        note = (
            f"Only the first {MAX_REPORT_ROWS} events are shown: narrow the report by study or dates."
            if len(found) > MAX_REPORT_ROWS
            else ""
        )
        made = datetime.now(UTC)
        name = f"patient-access-report-{made.strftime('%Y%m%dT%H%M%SZ')}"  # no PHI in the file name
        if kind == "csv":
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=list(FIELDS), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(for_csv(row) for row in rows)
            return Response(
                out.getvalue(), media_type="text/csv; charset=utf-8", headers=_download(f"{name}.csv")
            )
        if kind == "pdf":
            scope = ", ".join(
                part
                for part in (
                    f"study {form['study']}" if form["study"] else "",
                    f"from {form['from']}" if form["from"] else "",
                    f"to {form['to']}" if form["to"] else "",
                )
                if part
            )
            from safepacs.audit.pdf import report_pdf  # fpdf2 only when a PDF is asked for (memory)

            body = report_pdf(rows, patient_id=form["patient"], made_by=visitor.name, made_at=made,
                              scope=scope, note=note)  # fmt: skip
            return Response(body, media_type="application/pdf", headers=_download(f"{name}.pdf"))
        return page(request, "audit_report.html", visitor=visitor, form=form, rows=rows, note=note, made=made)

    @router.get("/audit/report", response_model=None)
    def report(request: Request) -> Response:
        return report_page(request, auditor_of(request), {})  # the empty form: any parameter is ignored

    @router.post("/audit/report", response_model=None)
    async def report_posted(request: Request) -> Response:
        visitor, fields = await posted(request)
        return await run_in_threadpool(report_page, request, visitor, fields)

    @router.get("/activity")
    def activity(request: Request) -> HTMLResponse:
        visitor = visitor_of(request, logins)
        before = _before(request.query_params.get("before", ""))
        try:
            found, older = audits.activity(visitor.principal, PAGE_SIZE, before=before)
        except AuditError:
            raise _unavailable() from None
        except AccessDenied:
            raise PageError(
                403, "Not allowed", "Only a signed-in person has an activity of their own."
            ) from None
        return page(request, "activity.html", visitor=visitor, rows=_rows(found), older=older, before=before)

    return router


def _download(filename: str) -> dict[str, str]:
    """Headers of a file to save (never shown inline, never cached: it holds patient data)."""
    return {"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"}
