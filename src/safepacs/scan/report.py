"""Rendering a report: a rich table for the terminal, JSON, SARIF 2.1.0 and a self-contained HTML page.

Every renderer works from the :class:`ScanReport` alone, which holds counts and the scanner's own words,
never a value of the target's data.
"""

from __future__ import annotations

import html
import io
import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from safepacs import __version__
from safepacs.scan._model import Finding, ScanReport, Severity

__all__ = ["FORMATS", "as_dict", "print_table", "render"]

FORMATS = ("text", "json", "sarif", "html")

_STYLE = {
    Severity.CRITICAL: "bold white on red",
    Severity.HIGH: "bold red",
    Severity.MEDIUM: "yellow",
    Severity.LOW: "cyan",
    Severity.INFO: "dim",
}
_SARIF_LEVEL = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
    Severity.INFO: "note",
}
_SARIF_SCORE = {
    Severity.CRITICAL: "9.5",
    Severity.HIGH: "8.0",
    Severity.MEDIUM: "5.5",
    Severity.LOW: "3.0",
    Severity.INFO: "0.0",
}
_HTML_COLOUR = {
    Severity.CRITICAL: "#b00020",
    Severity.HIGH: "#e65100",
    Severity.MEDIUM: "#b58900",
    Severity.LOW: "#00796b",
    Severity.INFO: "#607d8b",
}


def _tool(report: ScanReport) -> str:
    return f"safepacs {report.kind}"


def _summary(report: ScanReport) -> str:
    counts = report.counts()
    parts = [f"{n} {sev}" for sev, n in counts.items() if n]
    what = f"{len(report.endpoints)} open endpoint(s) on {report.addresses} address(es)"
    if report.kind == "doctor":
        what = "configuration and local listeners"
    return f"{what}: {len(report.findings)} finding(s)" + (f" ({', '.join(parts)})" if parts else "")


def as_dict(report: ScanReport) -> dict[str, Any]:
    return {
        "format": "safepacs-scan-report/1",
        "tool": {"name": _tool(report), "version": __version__},
        "started_at": report.started_at.isoformat(),
        "finished_at": report.finished_at.isoformat(),
        "duration_seconds": round(report.duration, 3),
        "summary": {
            "addresses": report.addresses,
            "probes": report.probes,
            "endpoints": len(report.endpoints),
            "findings": report.counts(),
            "worst": (w.label if (w := report.worst()) is not None else None),
            "errors": len(report.runtime_errors()),
        },
        "endpoints": [e.as_dict() for e in report.endpoints],
        "findings": [f.as_dict() for f in report.sorted_findings()],
        "errors": list(report.errors),
    }


def _uri(f: Finding) -> str:
    scheme = {"dicom": "dicom", "dicom-tls": "dicom-tls", "http": "http", "https": "https"}.get(f.service)
    if scheme:
        return f"{scheme}://{f.target}"
    return f"safepacs-{f.service or 'target'}:{f.target.replace(' ', '-')}"


def _sarif(report: ScanReport) -> dict[str, Any]:
    findings = report.sorted_findings()
    rules: dict[str, dict[str, Any]] = {}
    for f in findings:
        rule = rules.setdefault(
            f.check,
            {
                "id": f.check,
                "name": f.check.replace(".", "-"),
                "shortDescription": {"text": f.title},
                "help": {"text": f.remediation or f.title},
                "properties": {"security-severity": _SARIF_SCORE[f.severity], "tags": ["security", "dicom"]},
            },
        )
        if float(_SARIF_SCORE[f.severity]) > float(rule["properties"]["security-severity"]):
            rule["properties"]["security-severity"] = _SARIF_SCORE[f.severity]
    index = {check: i for i, check in enumerate(rules)}
    results = [
        {
            "ruleId": f.check,
            "ruleIndex": index[f.check],
            "level": _SARIF_LEVEL[f.severity],
            "message": {"text": f"{f.title}. {f.detail} Remediation: {f.remediation}".strip()},
            "locations": [
                {
                    "physicalLocation": {"artifactLocation": {"uri": _uri(f)}},
                    "logicalLocations": [{"name": f.target, "kind": "module"}],
                }
            ],
            "partialFingerprints": {"target/check/title": f"{f.target}/{f.check}/{f.title}"},
            "properties": {
                "severity": f.severity.label,
                "product": f.product,
                "remediation": f.remediation,
                "evidence": dict(f.evidence),
            },
        }
        for f in findings
    ]
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {"name": _tool(report), "version": __version__, "rules": list(rules.values())}
                },
                "invocations": [
                    {
                        # Some targets or probes failed: the run finished, its results are incomplete.
                        "executionSuccessful": not report.runtime_errors(),
                        "startTimeUtc": report.started_at.isoformat().replace("+00:00", "Z"),
                        "endTimeUtc": report.finished_at.isoformat().replace("+00:00", "Z"),
                        "toolExecutionNotifications": [
                            {"level": "error", "message": {"text": e}} for e in report.runtime_errors()
                        ],
                    }
                ],
                "results": results,
            }
        ],
    }


def _html(report: ScanReport) -> str:
    e = html.escape
    rows = []
    for f in report.sorted_findings():
        colour = _HTML_COLOUR[f.severity]
        rows.append(
            "<tr>"
            f'<td><span class="sev" style="background:{colour}">{e(f.severity.label)}</span></td>'
            f"<td>{e(f.target)}</td><td>{e(f.product)}</td>"
            f"<td><strong>{e(f.title)}</strong><br>{e(f.detail)}</td>"
            f"<td>{e(f.remediation)}</td>"
            "</tr>"
        )
    endpoints = "".join(
        f"<tr><td>{e(ep.label)}</td><td>{e(ep.service)}</td><td>{e(ep.display_product)}</td>"
        f"<td>{len(ep.findings)}</td></tr>"
        for ep in report.endpoints
    )
    errors = "".join(f"<li>{e(x)}</li>" for x in report.runtime_errors())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{e(_tool(report))} report</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;width:100%}}
td,th{{border:1px solid #ccc;padding:.4em;vertical-align:top;text-align:left}} th{{background:#f0f0f0}}
.sev{{color:#fff;padding:.1em .5em;border-radius:.3em;font-weight:bold}}
</style></head><body>
<h1>{e(_tool(report))} report</h1>
<p>{e(_summary(report))}. Started {e(report.started_at.isoformat(timespec="seconds"))}, took
{report.duration:.1f} s. The report holds counts only: no patient names, IDs, dates or UIDs.</p>
<h2>Findings</h2>
<table><thead><tr><th>Severity</th><th>Target</th><th>Product</th><th>Finding</th><th>What to change</th></tr>
</thead><tbody>{"".join(rows)}</tbody></table>
<h2>Endpoints</h2>
<table><thead><tr><th>Endpoint</th><th>Service</th><th>Product</th><th>Findings</th></tr></thead>
<tbody>{endpoints}</tbody></table>
{f"<h2>Errors: not scanned or not completely</h2><ul>{errors}</ul>" if errors else ""}
</body></html>
"""


def render(report: ScanReport, fmt: str) -> str:
    """The report as ``json``, ``sarif``, ``html`` or ``text`` (the table, without colours)."""
    if fmt == "json":
        return json.dumps(as_dict(report), indent=2) + "\n"
    if fmt == "sarif":
        return json.dumps(_sarif(report), indent=2) + "\n"
    if fmt == "html":
        return _html(report)
    console = Console(width=160, record=True, no_color=True, force_terminal=False, file=io.StringIO())
    print_table(report, console)
    return console.export_text()


def print_table(report: ScanReport, console: Console, *, minimum: Severity = Severity.INFO) -> None:
    """The findings as a table, worst first, then a one-line summary."""
    shown = [f for f in report.sorted_findings() if f.severity >= minimum]
    if shown:
        table = Table(show_lines=True, expand=False)
        table.add_column("Severity", no_wrap=True)
        table.add_column("Target", no_wrap=True)
        table.add_column("Finding", ratio=3)
        table.add_column("What to change", ratio=2)
        for f in shown:
            product = f" [{f.product}]" if f.product else ""
            table.add_row(
                f"[{_STYLE[f.severity]}]{f.severity.label}[/]",
                f"{f.target}{product}",
                f"[bold]{_escape(f.title)}[/bold]\n{_escape(f.detail)}",
                _escape(f.remediation),
            )
        console.print(table)
    for error in report.errors:
        console.print(f"[yellow]not scanned:[/] {_escape(error)}", highlight=False)
    for ep in report.endpoints:
        if ep.error:
            console.print(
                f"[yellow]probe error:[/] {_escape(ep.label)}: {_escape(ep.error)}", highlight=False
            )
    hidden = len(report.findings) - len(shown)
    more = f"; {hidden} below {minimum.label} not shown" if hidden else ""
    console.print(_escape(f"{_summary(report)}{more}. Took {report.duration:.1f} s."), highlight=False)


def _escape(text: str) -> str:
    return escape(text)
