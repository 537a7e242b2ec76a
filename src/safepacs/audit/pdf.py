"""The patient access report ("who saw this patient's images") as a PDF, for a privacy officer to
file or hand on: the same rows as ``safepacs audit report`` and the web UI's report page
(:func:`safepacs.audit.report.summary_row`), with a title naming the patient, when it was made and by
whom.

Made with fpdf2 and its built-in Helvetica, so that no font file is needed: that font holds Latin-1
only, so every other character is written as ``\\uXXXX`` (as :func:`~safepacs.audit.report.for_terminal`
writes the unprintable ones): a recorded value is never lost or silently changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from fpdf import FPDF
from fpdf.enums import TableCellFillMode

from safepacs.audit.report import OUTCOMES, described, for_terminal

__all__ = ["report_pdf"]

#: The columns of the PDF's table: heading, width (mm of the 277 of a landscape A4 page), row key.
_COLUMNS = (
    ("Record", 12, "seq"),
    ("Time (UTC)", 28, "time"),
    ("Event", 34, "event"),
    ("Outcome", 18, "outcome"),
    ("Who", 26, "who"),
    ("Address", 24, "from"),
    ("Device / user agent", 42, "device"),
    ("Studies", 50, "studies"),
    ("What", 43, "what"),
)


def _latin1(text: str) -> str:
    """``text`` printable and in Latin-1 (the core font's characters), every other character escaped."""
    printable = str(for_terminal({"v": text})["v"])
    return "".join(c if ord(c) < 256 else f"\\u{ord(c):04x}" for c in printable)


def _cells(row: Mapping[str, Any]) -> list[str]:
    shown = {
        **row,
        "time": str(row["time"])[:19].replace("T", " "),
        "outcome": OUTCOMES.get(int(row["outcome"]), str(row["outcome"])),
        "what": described(row),
    }
    return [_latin1(str(shown[key] or "-")) for _, _, key in _COLUMNS]


def report_pdf(
    rows: Sequence[Mapping[str, Any]],
    *,
    patient_id: str,
    made_by: str,
    made_at: datetime,
    scope: str = "",
    note: str = "",
) -> bytes:
    """The report of ``rows`` (summary rows, oldest first) for ``patient_id``, made by ``made_by`` at
    ``made_at``; ``scope``: the study or time range it was narrowed to; ``note``: a line under the
    title (rows left out)."""
    pdf = FPDF(orientation="L", unit="mm", format="A4")
    pdf.set_title(_latin1(f"Patient access report: {patient_id}"))
    pdf.set_author(_latin1(made_by))
    pdf.set_creator("SafePACS")
    pdf.set_creation_date(made_at)
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.set_margins(10, 10, 10)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 14)
    pdf.cell(0, 8, _latin1(f"Patient access report: patient {patient_id}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=9)
    made = made_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"Made {made} by {made_by}. {len(rows)} events, oldest first."]
    if scope:
        lines.append(f"Narrowed to: {scope}.")
    if note:
        lines.append(note)
    for line in lines:
        pdf.multi_cell(0, 5, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.set_font("Helvetica", size=7)
    with pdf.table(
        col_widths=tuple(width for _, width, _ in _COLUMNS),
        text_align="LEFT",
        line_height=3.5,
        cell_fill_color=(240, 243, 247),
        cell_fill_mode=TableCellFillMode.ROWS,
        repeat_headings=1,
    ) as table:
        table.row([heading for heading, _, _ in _COLUMNS])
        for row in rows:
            table.row(_cells(row))
    if not rows:
        pdf.set_font("Helvetica", size=9)
        pdf.cell(0, 8, "No audit records match.", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
