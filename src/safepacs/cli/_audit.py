"""``safepacs audit verify|head|query|report``: prove the trail untouched and complete; answer "who
saw this patient?".

``verify`` checks the hash chain, the signed checkpoints, the columns and search keys that searches
use, the signed head file (``DATA/audit-head``) and, with ``--against FILE``, heads exported earlier
with ``head`` (or taken from a syslog collector).  Reading the trail is itself recorded (110101 Audit
Log Used): before anything is printed, or, for ``verify``, right after the check.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import sys
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safepacs.errors import SafePacsError

if TYPE_CHECKING:
    from safepacs.db.ports import AuditLog

__all__ = ["add_parsers", "cmd_audit"]


class AuditUsageError(SafePacsError):
    """A wrong audit command line."""


def add_parsers(sub: Any, data_opt: Any) -> None:
    audit = sub.add_parser("audit", help="verify, search and report on the audit trail").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    sp = audit.add_parser(
        "verify",
        help="check the hash chain, signed checkpoints, search keys and signed heads (exit 1 if tampered)",
    )
    data_opt(sp)
    sp.add_argument(
        "--against",
        metavar="FILE",
        help="a head exported earlier with 'safepacs audit head': the trail must still hold its record",
    )
    sp = audit.add_parser(
        "head", help="export the signed head of the trail, to check later that nothing was cut off"
    )
    data_opt(sp)
    sp.add_argument("--out", metavar="FILE", help="write it to FILE (default: standard output)")
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


def _exported(path: str) -> list[Any]:
    """The signed heads in ``path`` (lines ``SEQ HASH TIME SIGNATURE``; blank and ``#`` lines skipped)."""
    from safepacs.audit import SignedHead

    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not text"
        raise AuditUsageError(f"cannot read the exported head {path} ({why})") from None
    heads = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            heads.append(SignedHead.parse(line))
        except ValueError:
            raise AuditUsageError(
                f"line {number} of {path} is not a signed head (SEQ HASH TIME SIGNATURE, "
                "as 'safepacs audit head' writes it)"
            ) from None
    if not heads:
        raise AuditUsageError(f"{path} holds no signed head; export one with 'safepacs audit head'")
    return heads


def _intact(result: Any) -> str:
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


def cmd_audit(args: argparse.Namespace, audit_log: AuditLog, settings: Any) -> int:
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
    from safepacs.db.auditlog import AuditFilter

    signer = Signer.load_or_create(settings.keys_dir)
    trail = AuditTrail(audit_log, signer, settings.audit_head_file)
    reader = Participant(user_id=getpass.getuser(), requestor=True, role="Application Launcher")
    action = args.audit_command
    if action in ("verify", "head"):
        used = AuditEvent(
            EventID.AUDIT_LOG_USED,
            Action.READ,
            Outcome.SUCCESS,
            (reader,),
            (AuditObject(ObjectKind.AUDIT_LOG, "safepacs-audit-trail", detail=(("operation", action),)),),
        )
    if action == "head":
        trail.record(used)  # first, so that the exported head covers this export too
        head = audit_log.audit_head()
        if head is None:  # not after a record was just appended
            raise AuditUsageError("the audit trail is empty: there is no head to export")
        line = signer.head(*head).line() + "\n"
        if args.out:
            try:
                Path(args.out).write_text(line, encoding="ascii")
            except OSError as exc:
                raise AuditUsageError(f"cannot write {args.out} ({exc.strerror})") from None
            print(f"Signed head of record {head[0]} written to {args.out}.", file=sys.stderr)
        else:
            sys.stdout.write(line)
        return 0
    if action == "verify":
        against = _exported(args.against) if args.against else []
        result = verify_trail(audit_log, signer, settings.audit_head_file, against)
        trail.record(used)  # after the check, so verifying never changes what it verified
        if result.ok:
            print(_intact(result), file=sys.stderr)
            return 0
        at = f" at record {result.first_bad_seq}" if result.first_bad_seq is not None else ""
        print(f"Audit trail TAMPERED{at}: {result.problem}.", file=sys.stderr)
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
    rows = [summary_row(r.seq, from_canonical(r.body)) for r in audit_log.search_audit(where)]
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
