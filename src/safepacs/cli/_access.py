"""``safepacs access``, ``safepacs trash`` and ``safepacs purge``: who sees which study; deleted data.

* ``access scope NAME``: restrict a user to institutions, modalities, the studies they referred,
  access groups (``--clear`` lifts the restriction; referrers and researchers stay restricted by role).
* ``access group add|remove|list``: put studies in access groups.
* ``access grant|revoke|grants``: explicit per-study grants to one user, optionally expiring.
* ``trash``: what was deleted and when its bytes will be destroyed; ``restore``: undo a deletion;
  ``purge``: destroy them.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from safepacs.audit.recorder import operator
from safepacs.errors import SafePacsError

if TYPE_CHECKING:
    from safepacs.db.ports import Directory, Instances

__all__ = ["add_parsers", "cmd_access", "cmd_purge", "cmd_restore", "cmd_trash"]


class AccessUsageError(SafePacsError):
    """A wrong access, trash or purge command line."""


def add_parsers(sub: Any, data_opt: Any) -> None:
    access = sub.add_parser(
        "access", help="restrict users to studies: scopes, access groups, per-study grants"
    ).add_subparsers(dest="access_command", required=True, metavar="ACTION")
    sp = access.add_parser("scope", help="restrict what a user sees (replaces their scope)")
    data_opt(sp)
    sp.add_argument("name", metavar="USER")
    sp.add_argument("--institution", action="append", default=[], metavar="NAME", help="repeatable")
    sp.add_argument("--modality", action="append", default=[], metavar="CODE", help="repeatable, e.g. CT")
    sp.add_argument(
        "--referring-physician",
        metavar="PERSON_NAME",
        help="only studies whose Referring Physician's Name is this (e.g. 'Doe^Jane'), case-insensitive",
    )
    sp.add_argument("--group", action="append", default=[], metavar="GROUP", help="repeatable")
    sp.add_argument("--clear", action="store_true", help="remove the user's scope")
    sp = access.add_parser("show", help="show users' scopes")
    data_opt(sp)

    group = access.add_parser("group", help="put studies in access groups").add_subparsers(
        dest="group_command", required=True, metavar="ACTION"
    )
    for action, text in (("add", "put a study in a group"), ("remove", "take a study out of a group")):
        sp = group.add_parser(action, help=text)
        data_opt(sp)
        sp.add_argument("study_uid", metavar="STUDY_UID")
        sp.add_argument("group", metavar="GROUP")
    sp = group.add_parser("list", help="list studies and their groups")
    data_opt(sp)
    sp.add_argument("--study", metavar="STUDY_UID")

    sp = access.add_parser("grant", help="let one user see one study")
    data_opt(sp)
    sp.add_argument("study_uid", metavar="STUDY_UID")
    sp.add_argument("--user", required=True, metavar="NAME")
    sp.add_argument("--expires", metavar="LIFETIME", help="e.g. 12h, 30d (default: until revoked)")
    sp = access.add_parser("revoke", help="revoke a grant")
    data_opt(sp)
    sp.add_argument("study_uid", metavar="STUDY_UID")
    sp.add_argument("--user", required=True, metavar="NAME")
    sp = access.add_parser("grants", help="list grants")
    data_opt(sp)
    sp.add_argument("--user", metavar="NAME")

    sp = sub.add_parser("trash", help="list deleted instances whose bytes are still kept")
    data_opt(sp)
    sp = sub.add_parser("restore", help="put a deleted study back while its retention period lasts")
    data_opt(sp)
    sp.add_argument("study_uid", metavar="STUDY_UID")
    sp = sub.add_parser("purge", help="destroy deleted instances whose retention period has ended")
    data_opt(sp)
    sp.add_argument("--now", action="store_true", help="destroy every deleted instance now, retention or not")


def _uid(text: str) -> str:
    from safepacs.services.ingest import valid_uid

    if not valid_uid(text):
        raise AccessUsageError(f"{text!r} is not a valid Study Instance UID (digits and dots, 64 at most)")
    return text


def _word(text: str, what: str) -> str:
    value = text.strip()
    if not value or len(value) > 64 or any(c in value for c in "*?\\\n\r"):
        raise AccessUsageError(f"{what} must be 1-64 characters without * ? or \\")
    return value


def _scope(args: argparse.Namespace) -> Any:
    from safepacs.types import Scope

    if args.clear:
        if args.institution or args.modality or args.group or args.referring_physician:
            raise AccessUsageError("--clear cannot be combined with other scope options")
        return None
    scope = Scope(
        institutions=frozenset(_word(v, "an institution") for v in args.institution),
        modalities=frozenset(_word(v, "a modality").upper() for v in args.modality),
        referring_physician=(
            _word(args.referring_physician, "a person name") if args.referring_physician else None
        ),
        groups=frozenset(_word(v, "a group") for v in args.group),
    )
    if not scope.has_attributes and not scope.groups:
        raise AccessUsageError(
            "give at least one of --institution, --modality, --referring-physician, --group (or --clear)"
        )
    return scope


def _describe(scope: Any) -> str:
    parts = []
    if scope.institutions:
        parts.append("institutions " + ", ".join(sorted(scope.institutions)))
    if scope.modalities:
        parts.append("modalities " + ",".join(sorted(scope.modalities)))
    if scope.referring_physician:
        parts.append("referred by " + scope.referring_physician)
    if scope.groups:
        parts.append("groups " + ",".join(sorted(scope.groups)))
    return "; ".join(parts) or "nothing but explicit grants"


def cmd_access(args: argparse.Namespace, directory: Directory) -> int:
    from safepacs.auth.policy import scope_of

    action = args.access_command
    if action == "scope":
        scope = _scope(args)
        directory.set_user_scope(args.name, scope)
        if scope is None:
            print(f"User {args.name} is no longer restricted by a scope", file=sys.stderr)
        else:
            print(f"User {args.name} now sees: {_describe(scope)} (and their grants)", file=sys.stderr)
    elif action == "show":
        for user in directory.list_users():
            scope = scope_of(user)
            print(f"{user.name:<24}  {'everything' if scope is None else _describe(scope)}")
    elif action == "group":
        if args.group_command == "list":
            for study, group in directory.list_study_groups(_uid(args.study) if args.study else None):
                print(f"{group:<24}  {study}")
        elif args.group_command == "add":
            added = directory.add_study_group(_uid(args.study_uid), _word(args.group, "a group"))
            state = "added to" if added else "already in"
            print(f"Study {args.study_uid} {state} group {args.group}", file=sys.stderr)
        else:
            directory.remove_study_group(_uid(args.study_uid), args.group)
            print(f"Study {args.study_uid} removed from group {args.group}", file=sys.stderr)
    elif action == "grant":
        expires = None
        if args.expires:
            from safepacs.auth.tokens import parse_lifetime

            try:
                expires = datetime.now(UTC) + parse_lifetime(args.expires)
            except ValueError as exc:
                raise AccessUsageError(f"--expires: {exc}") from None
        directory.grant_study(_uid(args.study_uid), args.user, expires)
        until = "until revoked" if expires is None else "until " + expires.strftime("%Y-%m-%d %H:%M UTC")
        print(f"User {args.user} may see study {args.study_uid} {until}", file=sys.stderr)
    elif action == "revoke":
        directory.revoke_grant(_uid(args.study_uid), args.user)
        print(f"Grant of study {args.study_uid} to {args.user} revoked", file=sys.stderr)
    else:
        now = datetime.now(UTC)
        for g in directory.list_grants(args.user):
            if g.expires_at is None:
                state = "until revoked"
            elif g.expires_at <= now:
                state = "expired"
            else:
                state = "until " + g.expires_at.strftime("%Y-%m-%d %H:%M")
            print(f"{g.user_name:<24}  {g.study_instance_uid:<64}  {state}")
    return 0


def cmd_trash(args: argparse.Namespace, instances: Instances) -> int:
    records = instances.list_trash()
    if not records:
        print("The trash is empty.", file=sys.stderr)
    for r in records:
        print(
            f"{r.deleted_at:%Y-%m-%d %H:%M}  {r.deleted_by:<16}  purge after {r.purge_after:%Y-%m-%d %H:%M}  "
            f"study {r.study_instance_uid}  instance {r.sop_instance_uid}"
        )
    return 0


def cmd_purge(args: argparse.Namespace, archive: Any) -> int:
    report = archive.delete.purge(everything=args.now, who=operator("purge"))
    print(
        f"Purged {report.instances} deleted instances ({report.bytes / 1e6:.1f} MB destroyed)",
        file=sys.stderr,
    )
    return 0


def cmd_restore(args: argparse.Namespace, archive: Any) -> int:
    report = archive.restore.restore(_uid(args.study_uid), operator("restore"))
    kept = f"; {report.kept} kept in the trash (stored again since)" if report.kept else ""
    print(f"Restored {report.restored} instances of study {args.study_uid}{kept}", file=sys.stderr)
    return 0
