"""Audit records as rows for a privacy officer (safepacs/audit/report.py): who, from where, on what
device, about which patients; and a recorded value can neither forge a line on the auditor's terminal
nor run as a spreadsheet formula."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from safepacs.audit.events import Action, AuditEvent, AuditObject, EventID, ObjectKind, Outcome, Participant
from safepacs.audit.report import FIELDS, for_csv, for_terminal, summary_row

WHEN = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


def event(**overrides: object) -> AuditEvent:
    values: dict[str, object] = {
        "event_id": EventID.INSTANCES_TRANSFERRED,
        "action": Action.READ,
        "outcome": Outcome.SUCCESS,
        "participants": (
            Participant("SAFEPACS", requestor=False, ae_title="SAFEPACS"),
            Participant(
                "MODALITY1",
                requestor=True,
                address="192.0.2.10",
                ae_title="MODALITY1",
                user_name="alice",
                certificate_sha256="ab" * 32,
            ),
        ),
        "objects": (
            AuditObject(ObjectKind.PATIENT, "P1", name="Doe^Jane"),
            AuditObject(ObjectKind.STUDY, "1.2.3"),
            AuditObject(ObjectKind.STUDY, "1.2.4"),
        ),
        "time": WHEN,
    }
    values.update(overrides)
    return AuditEvent(**values)  # type: ignore[arg-type]


def test_a_summary_row_has_every_field_in_order() -> None:
    row = summary_row(42, event())
    assert tuple(row) == FIELDS
    assert row == {
        "seq": 42,
        "time": "2026-03-04T05:06:07.890123Z",
        "event": "110104 DICOM Instances Transferred",
        "type": "",
        "action": "R",
        "outcome": 0,
        "who": "MODALITY1 (for alice)",
        "from": "192.0.2.10",
        "device": f"MODALITY1, certificate SHA-256 {'ab' * 32}",
        "patients": "P1",
        "studies": "1.2.3 1.2.4",
        "why": "",
    }


def test_a_refusal_row_says_why_and_its_type() -> None:
    refused = event(
        event_id=EventID.SECURITY_ALERT,
        action=Action.EXECUTE,
        outcome=Outcome.MINOR_FAILURE,
        participants=(Participant("bob", requestor=True, user_agent="curl/8"),),
        objects=(),
        type_code=("110132", "Use of Restricted Function"),
        outcome_description="delete: this user is not allowed to use delete",
    )
    row = summary_row(1, refused)
    assert row["type"] == "Use of Restricted Function"
    assert (row["who"], row["from"], row["device"]) == ("bob", "", "curl/8")
    assert (row["outcome"], row["why"]) == (4, "delete: this user is not allowed to use delete")


def test_a_person_acting_as_themself_is_not_named_twice() -> None:
    row = summary_row(1, event(participants=(Participant("alice", requestor=True, user_name="alice"),)))
    assert row["who"] == "alice"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("alice", "alice"),
        ("evil\nseq 99 forged line", "evil\\u000aseq 99 forged line"),
        ("\x1b[2J", "\\u001b[2J"),  # a terminal escape sequence, harmless once escaped
        ("tab\there", "tab\\u0009here"),
        ("Müller", "Müller"),  # printable non-ASCII is kept
    ],
)
def test_for_terminal_escapes_what_is_not_printable(value: str, shown: str) -> None:
    assert for_terminal({"who": value, "seq": 3}) == {"who": shown, "seq": 3}


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1", "'+1"),
        ("-1+2", "'-1+2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("alice", "alice"),
        ("a=b", "a=b"),  # only a leading sign is a formula
        ("", ""),
    ],
)
def test_for_csv_quotes_what_a_spreadsheet_would_run(value: str, cell: str) -> None:
    assert for_csv({"who": value}) == {"who": cell}


def test_for_csv_escapes_too_and_leaves_numbers_alone() -> None:
    assert for_csv({"why": "=1\n", "outcome": -4}) == {"why": "'=1\\u000a", "outcome": -4}
