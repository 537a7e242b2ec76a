"""Audit records as the rows a privacy officer reads (CLI ``audit query|report`` and ``/api/audit``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from safepacs.audit.chain import Verification
from safepacs.audit.events import AuditEvent

__all__ = ["ACTIONS", "FIELDS", "OUTCOMES", "described", "for_csv", "for_terminal", "summary_row", "verified"]

#: What an outcome code means, in the reader's words (PS3.15 EventOutcomeIndicator).
OUTCOMES = {0: "success", 4: "refused/minor failure", 8: "serious failure", 12: "major failure"}
#: What an action code means (PS3.15 EventActionCode).
ACTIONS = {"C": "create", "R": "read", "U": "update", "D": "delete", "E": "execute"}

FIELDS = (
    "seq",
    "time",
    "event",
    "type",
    "action",
    "outcome",
    "who",
    "from",
    "device",
    "patients",
    "studies",
    "why",
)


def for_terminal(row: dict[str, Any]) -> dict[str, Any]:
    """The row with every character that is not printable escaped (``\\uXXXX``): a recorded value is
    anything a stranger typed (a user name at a failed login), and must not forge lines or send
    terminal escape sequences to the auditor reading it."""
    return {
        k: "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in v) if isinstance(v, str) else v
        for k, v in row.items()
    }


def for_csv(row: dict[str, Any]) -> dict[str, Any]:
    """:func:`for_terminal`, and a cell that a spreadsheet would run as a formula (``= + - @``) quoted
    with a leading apostrophe (OWASP CSV injection)."""
    return {
        k: "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@") else v
        for k, v in for_terminal(row).items()
    }


def summary_row(seq: int, event: AuditEvent) -> dict[str, Any]:
    requestors = [p for p in event.participants if p.requestor]
    who = ", ".join(
        p.user_id + (f" (for {p.user_name})" if p.user_name and p.user_name != p.user_id else "")
        for p in requestors
    )
    device = ", ".join(
        filter(
            None,
            [p.ae_title or "" for p in requestors]
            + [f"certificate SHA-256 {p.certificate_sha256}" for p in requestors if p.certificate_sha256]
            + [p.user_agent or "" for p in requestors],
        )
    )
    return {
        "seq": seq,
        "time": event.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "event": f"{event.event_id.code} {event.event_id.display}",
        "type": event.type_code[1] if event.type_code else "",
        "action": event.action.value,
        "outcome": int(event.outcome),
        "who": who,
        "from": ", ".join(p.address for p in requestors if p.address),
        "device": device,
        "patients": " ".join(event.patient_ids),
        "studies": " ".join(event.study_uids),
        "why": event.outcome_description or "",
    }


def described(row: Mapping[str, Any]) -> str:
    """What a summary row's event did, in words: its action, its type and why it failed
    (``read; Login; wrong password``)."""
    return "; ".join(
        filter(None, [ACTIONS.get(str(row["action"]), str(row["action"])), str(row["type"]), str(row["why"])])
    )


def verified(result: Verification) -> str:
    """What a verification found, as ``safepacs audit verify`` and the web UI's audit page say it:
    intact (how much, what is anchored, what is not checked), or tampered at which record and how."""
    if not result.ok:
        at = f" at record {result.first_bad_seq}" if result.first_bad_seq is not None else ""
        return f"Audit trail TAMPERED{at}: {result.problem}."
    text = f"Audit trail intact: {result.records} records, {result.checkpoints} signed checkpoints"
    if result.anchored_from is None:
        text += "; no signed head file yet (truncation cannot be detected until one is written)"
    else:
        text += f"; the signed head file names record {result.head_seq}"
        if result.anchored_from > 1:
            text += f" (it began at record {result.anchored_from}: truncation before that is not detected)"
    if result.against is not None:
        text += f"; the exported head of record {result.against} matches"
    if result.unchecked_times:
        text += (
            f"; the recording times of the {result.unchecked_times} records made before they were "
            "hashed are not checked"
        )
    return text + "."
