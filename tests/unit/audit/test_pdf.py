"""The patient access report as a PDF (audit/pdf.py): the rows it is given, whatever characters a
recorded value holds (the core font has Latin-1 only), over as many pages as it takes."""

from __future__ import annotations

import re
import zlib
from datetime import UTC, datetime

from safepacs.audit import Action, AuditEvent, AuditObject, EventID, ObjectKind, Outcome, Participant
from safepacs.audit.pdf import report_pdf
from safepacs.audit.report import summary_row

MADE = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)


def _drawn(pdf: bytes) -> list[str]:
    """The strings the PDF's content streams draw, in order."""
    texts: list[str] = []
    for raw in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        content = zlib.decompress(raw).decode("latin-1")
        texts += [
            t.replace("\\(", "(").replace("\\)", ")").replace("\\\\", "\\")
            for t in re.findall(r"\(((?:[^()\\]|\\.)*)\) Tj", content)
        ]
    return texts


def _row(seq: int, who: str, *, outcome: Outcome = Outcome.SUCCESS) -> dict[str, object]:
    event = AuditEvent(
        EventID.INSTANCES_TRANSFERRED,
        Action.READ,
        outcome,
        (Participant(who, True, address="192.0.2.4", user_agent="Viewer/2"),),
        (AuditObject(ObjectKind.PATIENT, "PID-9"), AuditObject(ObjectKind.STUDY, "1.2.3")),
        outcome_description="not allowed" if outcome else None,
    )
    return summary_row(seq, event)


def test_the_report_names_the_patient_its_maker_and_holds_every_row() -> None:
    pdf = report_pdf([_row(7, "rad"), _row(8, "ref", outcome=Outcome.MINOR_FAILURE)], patient_id="PID-9",
                     made_by="carol", made_at=MADE, scope="study 1.2.3")  # fmt: skip
    assert pdf.startswith(b"%PDF-")
    drawn = _drawn(pdf)
    assert drawn[0] == "Patient access report: patient PID-9"
    assert "Made 2026-11-22 09:30:00 UTC by carol. 2 events, oldest first." in drawn
    assert "Narrowed to: study 1.2.3." in drawn
    assert {"7", "8", "rad", "ref", "192.0.2.4", "Viewer/2", "success", "refused/minor"} <= set(drawn)
    assert "read; not allowed" in drawn


def test_characters_outside_latin1_and_control_characters_are_escaped_not_lost() -> None:
    pdf = report_pdf([_row(1, "Łukasz\x1b[2J")], patient_id="P-Ø", made_by="Zoë", made_at=MADE)
    drawn = _drawn(pdf)
    assert "\\u0141ukasz\\u001b[2J" in "".join(drawn)  # as the CLI shows it (the cell wraps)
    assert drawn[0] == "Patient access report: patient P-\xd8"  # Latin-1 stays itself


def test_many_rows_take_many_pages_with_the_headings_repeated() -> None:
    pdf = report_pdf(
        [_row(n, "rad") for n in range(1, 301)], patient_id="PID-9", made_by="carol", made_at=MADE
    )
    drawn = _drawn(pdf)
    assert pdf.count(b"/Type /Page\n") > 3 and drawn.count("Device / user agent") > 3
    assert [t for t in drawn if t.isdigit() and int(t) <= 300][-1] == "300"


def test_an_empty_report_says_so() -> None:
    assert "No audit records match." in _drawn(report_pdf([], patient_id="P", made_by="c", made_at=MADE))
