"""``safepacs audit verify|head|query|report``: prove the trail untouched and complete; answer "who
saw this patient?".

``verify`` checks the hash chain, the signed checkpoints, the columns and search keys that searches
use, the signed head file (``DATA/audit-head``) and, with ``--against FILE``, heads exported earlier
with ``head`` (or taken from a syslog collector).  Reading the trail is itself recorded (110101 Audit
Log Used): before anything is printed, or, for ``verify``, right after the check
(:mod:`safepacs.services.trail`).
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import TYPE_CHECKING

from safepacs.cli._common import EXIT_OK, EXIT_REFUSED, UsageError, add_data_option, trail_service

if TYPE_CHECKING:
    from safepacs.audit import SignedHead
    from safepacs.cli._common import Subparsers

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    parser = sub.add_parser("audit", help="verify, search and report on the audit trail")
    parser.set_defaults(handler=run)
    audit = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    sp = audit.add_parser(
        "verify",
        help="check the hash chain, signed checkpoints, search keys and signed heads (exit 1 if tampered)",
    )
    add_data_option(sp)
    sp.add_argument(
        "--against",
        metavar="FILE",
        help="a head exported earlier with 'safepacs audit head': the trail must still hold its record",
    )
    sp = audit.add_parser(
        "head", help="export the signed head of the trail, to check later that nothing was cut off"
    )
    add_data_option(sp)
    sp.add_argument("--out", metavar="FILE", help="write it to FILE (default: standard output)")
    for name, text in (
        ("query", "audit records matching every filter given (none: all)"),
        ("report", "who accessed a patient's data: when, what, from where, on what device, outcome"),
    ):
        sp = audit.add_parser(name, help=text)
        add_data_option(sp)
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
        raise UsageError(
            f"{text!r} is not an ISO date (2026-11-22) or date-time (2026-11-22T08:30)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _exported(path: str) -> list[SignedHead]:
    """The signed heads in ``path`` (lines ``SEQ HASH TIME SIGNATURE``; blank and ``#`` lines skipped)."""
    from safepacs.audit.chain import SignedHead

    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not text"
        raise UsageError(f"cannot read the exported head {path} ({why})") from None
    heads = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            heads.append(SignedHead.parse(line))
        except ValueError:
            raise UsageError(
                f"line {number} of {path} is not a signed head (SEQ HASH TIME SIGNATURE, "
                "as 'safepacs audit head' writes it)"
            ) from None
    if not heads:
        raise UsageError(f"{path} holds no signed head; export one with 'safepacs audit head'")
    return heads


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from safepacs.audit import Participant, from_canonical
    from safepacs.audit.events import AuditFilter
    from safepacs.audit.report import FIELDS, OUTCOMES, for_csv, for_terminal, summary_row, verified

    with trail_service(args) as trail:
        reader = Participant(user_id=getpass.getuser(), requestor=True, role="Application Launcher")
        action = str(args.audit_command)
        if action == "head":
            head = trail.export_head(reader)
            if head is None:  # not after a record was just appended
                raise UsageError("the audit trail is empty: there is no head to export")
            line = head.line() + "\n"
            if args.out:
                try:
                    Path(args.out).write_text(line, encoding="ascii")
                except OSError as exc:
                    raise UsageError(f"cannot write {args.out} ({exc.strerror})") from None
                print(f"Signed head of record {head.seq} written to {args.out}.", file=sys.stderr)
            else:
                sys.stdout.write(line)
            return EXIT_OK
        if action == "verify":
            against = _exported(args.against) if args.against else []
            result = trail.verify(reader, against)
            print(verified(result), file=sys.stderr)
            return EXIT_OK if result.ok else EXIT_REFUSED
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
        records = trail.search(reader, action, where, asked or None)
    rows = [summary_row(r.seq, from_canonical(r.body)) for r in records]
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
            outcome = OUTCOMES.get(row["outcome"], str(row["outcome"]))
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
    return EXIT_OK
