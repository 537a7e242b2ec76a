"""The posture page ``/posture`` (administrators): what ``safepacs doctor`` finds in this installation's
configuration, and the latest ``safepacs scan`` report of the site.

Both come as the scanner's JSON report (``safepacs-scan-report/1``, ``--format json``), so one table
shows them.  The web UI does not import the scanner (``pyproject.toml``): the configuration review is
given to :func:`posture_router` by the process that composes the site (``runtime/posture.py``: the
doctor without its network probes, run afresh on each view), and the scan report is a file,
``Settings.scan_report_file`` (``DATA/reports/scan-latest.json``), written by
``safepacs scan ... --save-to-data DATA``.  Scan reports hold counts and the scanner's own words, never
patient data, so neither the file nor the page holds any.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from safepacs.auth.login import LoginService
from safepacs.config import Settings
from safepacs.protocols.webui.render import PageError, page
from safepacs.protocols.webui.visitors import visitor_of

__all__ = ["REPORT_FORMAT", "Review", "ShownFinding", "ShownReport", "posture_router", "read_report", "shown"]

#: The scanner's JSON report format (``safepacs.scan.report.as_dict``).
REPORT_FORMAT = "safepacs-scan-report/1"
#: A report larger than this is not read (a scan of a /16 with every port open stays far below).
MAX_REPORT_BYTES = 32 * 1024 * 1024
#: A saved scan older than this is shown with a reminder to scan again.
STALE_AFTER = dt.timedelta(days=30)
_SEVERITIES = ("critical", "high", "medium", "low", "info")

#: The doctor's configuration review, as the scanner's JSON report.
Review = Callable[[], Mapping[str, Any]]


class ReportError(ValueError):
    """A saved report that cannot be shown (not JSON, another format); one sentence for the page."""


@dataclass(frozen=True)
class ShownFinding:
    severity: str
    target: str
    product: str
    title: str
    detail: str
    remediation: str


@dataclass(frozen=True)
class ShownReport:
    """What the page shows of one report: when it ran, its counts, findings (worst first) and errors."""

    tool: str
    started_at: dt.datetime | None
    duration: float
    addresses: int
    endpoints: int
    counts: dict[str, int]
    findings: list[ShownFinding]
    errors: list[str]

    @property
    def when(self) -> str:
        return f"{self.started_at:%Y-%m-%d %H:%M} UTC" if self.started_at else "at an unknown time"

    @property
    def stale(self) -> bool:
        return self.started_at is not None and dt.datetime.now(dt.UTC) - self.started_at > STALE_AFTER


def _text(value: object, limit: int = 2000) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def shown(report: Mapping[str, Any]) -> ShownReport:
    """The page's view of a scanner JSON report; :class:`ReportError` when it is not one."""
    if report.get("format") != REPORT_FORMAT:
        raise ReportError(f"it is not a SafePACS scan report ({REPORT_FORMAT})")
    try:
        started = dt.datetime.fromisoformat(_text(report.get("started_at"))).astimezone(dt.UTC)
    except ValueError:
        started = None
    summary = _dict(report.get("summary"))
    counts = _dict(summary.get("findings"))
    findings = []
    for item in report.get("findings") or []:
        if not isinstance(item, dict):
            continue
        severity = _text(item.get("severity"))
        findings.append(
            ShownFinding(
                severity if severity in _SEVERITIES else "info",
                _text(item.get("target")),
                _text(item.get("product")),
                _text(item.get("title")),
                _text(item.get("detail")),
                _text(item.get("remediation")),
            )
        )
    findings.sort(key=lambda f: _SEVERITIES.index(f.severity))  # stable: the report's order within one
    tool = _dict(report.get("tool"))
    duration = report.get("duration_seconds")
    return ShownReport(
        tool=_text(tool.get("name")) or "safepacs scan",
        started_at=started,
        duration=float(duration) if isinstance(duration, int | float) else 0.0,
        addresses=_number(summary.get("addresses")),
        endpoints=_number(summary.get("endpoints")),
        counts={s: _number(counts.get(s)) for s in _SEVERITIES},
        findings=findings,
        errors=[_text(e) for e in report.get("errors") or [] if isinstance(e, str)],
    )


def read_report(path: Path) -> ShownReport | None:
    """The saved scan report at ``path`` (None: there is none); :class:`ReportError` when unreadable."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_REPORT_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReportError(f"it cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_REPORT_BYTES:
        raise ReportError(f"it is larger than {MAX_REPORT_BYTES // (1024 * 1024)} MiB")
    try:
        report = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ReportError("it is not JSON") from None
    if not isinstance(report, dict):
        raise ReportError(f"it is not a SafePACS scan report ({REPORT_FORMAT})")
    return shown(report)


def posture_router(logins: LoginService, settings: Settings, review: Review | None) -> APIRouter:
    """``/posture``; ``review``: the doctor's configuration review (None: this process has none, the
    page says to run ``safepacs doctor``)."""
    router = APIRouter(include_in_schema=False)
    report_file = settings.scan_report_file

    @router.get("/posture")
    def posture(request: Request) -> HTMLResponse:
        visitor = visitor_of(request, logins)
        if not visitor.has("admin"):
            raise PageError(403, "Refused", "The posture page is for administrators.")
        doctor = shown(review()) if review is not None else None
        scan_problem = ""
        try:
            scan = read_report(report_file)
        except ReportError as exc:
            scan, scan_problem = None, f"The saved scan report {report_file} cannot be shown: {exc}."
        return page(request, "posture.html", visitor=visitor, doctor=doctor, scan=scan,
                    scan_problem=scan_problem, report_file=report_file,
                    data_dir=settings.data_dir)  # fmt: skip

    return router
