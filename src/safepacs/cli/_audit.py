"""``safepacs audit verify|query|report``: prove the trail untouched; answer "who saw this patient?".

Reading the trail is itself recorded (110101 Audit Log Used) before anything is printed.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import sys
from datetime import UTC, date, datetime, time
from typing import Any

from safepacs.errors import SafePacsError

__all__ = ["add_parsers", "cmd_audit"]


class AuditUsageError(SafePacsError):
    """A wrong audit command line."""


def add_parsers(sub: Any, data_opt: Any) -> None:
    audit = sub.add_parser("audit", help="verify, search and report on the audit trail").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    sp = audit.add_parser("verify", help="check the hash chain and signed checkpoints (exit 1 if tampered)")
    data_opt(sp)
    for name, text in (
        ("query", "audit records matching every filter given (none: all)"),
        ("report", "who accessed a patient's data: when, what, from where, on what device, outcome"),
    ):
        sp = audit.add_parser(name, help=text)
        data_opt(sp)
        sp.add_argument("--patient", metavar="PATIENT_ID", required=name == "report")
        sp.add_argument("--study", metavar="STUDY_UID")
        sp.add_argument("--user", metavar="USER_OR_AE")
        sp.add_argument(
            "--since", metavar="TIME", help="ISO date or date-time (UTC unless an offset is given)"
        )
        sp.add_argument("--until", metavar="TIME", help="ISO date or date-time; a date means its whole day")
        sp.add_argument("--format", choices=["text", "json", "csv"], default="text")


def _time(text: str | None, *, end: bool) -> datetime | None:
    if text is None:
        return None
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day, time.max if end else time.min, tzinfo=UTC)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise AuditUsageError(
            f"{text!r} is not an ISO date (2026-11-22) or date-time (2026-11-22T08:30)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


_OUTCOMES = {0: "success", 4: "refused/minor failure", 8: "serious failure", 12: "major failure"}


def cmd_audit(args: argparse.Namespace, index: Any, keys_dir: Any) -> int:
    from safepacs.audit import (
        Action,
        AuditEvent,
        AuditObject,
        AuditTrail,
        EventID,
        ObjectKind,
        Outcome,
        Participant,
        Signer,
        from_canonical,
        verify_trail,
    )
    from safepacs.audit.report import FIELDS, for_csv, for_terminal, summary_row
    from safepacs.index.auditlog import AuditFilter

    signer = Signer.load_or_create(keys_dir)
    trail = AuditTrail(index, signer)
    reader = Participant(user_id=getpass.getuser(), requestor=True, role="Application Launcher")
    action = args.audit_command
    if action == "verify":
        used = AuditEvent(
            EventID.AUDIT_LOG_USED,
            Action.READ,
            Outcome.SUCCESS,
            (reader,),
            (AuditObject(ObjectKind.AUDIT_LOG, "safepacs-audit-trail", detail=(("operation", "verify"),)),),
        )
        result = verify_trail(index, signer)
        trail.record(used)  # after the check, so verifying never changes what it verified
        if result.ok:
            print(
                f"Audit trail intact: {result.records} records, {result.checkpoints} signed checkpoints.",
                file=sys.stderr,
            )
            return 0
        print(f"Audit trail TAMPERED at record {result.first_bad_seq}: {result.problem}.", file=sys.stderr)
        return 1
    where = AuditFilter(
        patient_id=args.patient,
        study_uid=args.study,
        user=args.user,
        since=_time(args.since, end=False),
        until=_time(args.until, end=True),
    )
    asked = " ".join(
        f"{k}={v}"
        for k, v in (
            ("patient", args.patient),
            ("study", args.study),
            ("user", args.user),
            ("since", args.since),
            ("until", args.until),
        )
        if v
    )
    trail.record(
        AuditEvent(
            EventID.AUDIT_LOG_USED,
            Action.READ,
            Outcome.SUCCESS,
            (reader,),
            (
                AuditObject(
                    ObjectKind.AUDIT_LOG,
                    "safepacs-audit-trail",
                    query=asked or None,
                    detail=(("operation", action),),
                ),
            ),
        )
    )
    rows = [summary_row(r.seq, from_canonical(r.body)) for r in index.search_audit(where)]
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=1)
        print()
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(FIELDS))
        writer.writeheader()
        writer.writerows(for_csv(row) for row in rows)
    elif action == "report":
        print(f"Accesses to the data of patient {args.patient}: {len(rows)} events")
        for row in map(for_terminal, rows):
            outcome = _OUTCOMES.get(row["outcome"], str(row["outcome"]))
            parts = [
                f"{row['time'][:19]}Z",
                f"{row['event']:<40}",
                f"by {row['who'] or '-'}",
                f"from {row['from'] or '-'}",
                f"device {row['device'] or '-'}",
                outcome,
            ]
            if row["studies"]:
                parts.append(f"studies {row['studies']}")
            print("  ".join(parts))
    else:
        for row in map(for_terminal, rows):
            parts = [
                f"{row['seq']:>8}",
                f"{row['time'][:19]}Z",
                f"{row['event']:<40}",
                row["action"],
                f"{row['outcome']:>2}",
                row["who"] or "-",
                row["from"] or "-",
                f"patients {row['patients'] or '-'}",
                f"studies {row['studies'] or '-'}",
            ]
            print("  ".join(parts))
    if not rows:
        print("No audit records match.", file=sys.stderr)
    return 0
