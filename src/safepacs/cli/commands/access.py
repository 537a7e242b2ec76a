"""``safepacs access``: who sees which study.

* ``access scope NAME``: restrict a user to institutions, modalities, the studies they referred,
  access groups (``--clear`` lifts the restriction; referrers and researchers stay restricted by role).
* ``access group add|remove|list``: put studies in access groups.
* ``access grant|revoke|grants``: explicit per-study grants to one user, optionally expiring.

Every change is recorded on the audit trail with the change itself (:mod:`safepacs.services.admin`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from safepacs.cli._common import EXIT_OK, UsageError, add_data_option, admin_service, change
from safepacs.services.admininput import describe_scope, lifetime, study_uid, word
from safepacs.services.admininput import scope as parse_scope
from safepacs.types import Scope

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers
    from safepacs.services.admin import AdminService

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "access", help="restrict users to studies: scopes, access groups, per-study grants"
    )
    parser.set_defaults(handler=run)
    access = parser.add_subparsers(dest="access_command", required=True, metavar="ACTION")
    sp = access.add_parser("scope", help="restrict what a user sees (replaces their scope)")
    add_data_option(sp)
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
    add_data_option(sp)

    group = access.add_parser("group", help="put studies in access groups").add_subparsers(
        dest="group_command", required=True, metavar="ACTION"
    )
    for action, text in (("add", "put a study in a group"), ("remove", "take a study out of a group")):
        sp = group.add_parser(action, help=text)
        add_data_option(sp)
        sp.add_argument("study_uid", metavar="STUDY_UID")
        sp.add_argument("group", metavar="GROUP")
    sp = group.add_parser("list", help="list studies and their groups")
    add_data_option(sp)
    sp.add_argument("--study", metavar="STUDY_UID")

    sp = access.add_parser("grant", help="let one user see one study")
    add_data_option(sp)
    sp.add_argument("study_uid", metavar="STUDY_UID")
    sp.add_argument("--user", required=True, metavar="NAME")
    sp.add_argument("--expires", metavar="LIFETIME", help="e.g. 12h, 30d (default: until revoked)")
    sp = access.add_parser("revoke", help="revoke a grant")
    add_data_option(sp)
    sp.add_argument("study_uid", metavar="STUDY_UID")
    sp.add_argument("--user", required=True, metavar="NAME")
    sp = access.add_parser("grants", help="list grants")
    add_data_option(sp)
    sp.add_argument("--user", metavar="NAME")


def _scope(args: argparse.Namespace) -> Scope | None:
    if args.clear:
        if args.institution or args.modality or args.group or args.referring_physician:
            raise UsageError("--clear cannot be combined with other scope options")
        return None
    return parse_scope(args.institution, args.modality, args.referring_physician, args.group)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    with admin_service(args) as admin:
        _run(args, argv, admin)
    return EXIT_OK


def _run(args: argparse.Namespace, argv: Sequence[str], admin: AdminService) -> None:
    from safepacs.auth.policy import scope_of

    action = str(args.access_command)
    if action == "scope":
        scope = _scope(args)
        admin.set_scope(args.name, scope, change("access", argv))
        if scope is None:
            print(f"User {args.name} is no longer restricted by a scope", file=sys.stderr)
        else:
            print(f"User {args.name} now sees: {describe_scope(scope)} (and their grants)", file=sys.stderr)
    elif action == "show":
        for user in admin.users():
            seen = scope_of(user)
            print(f"{user.name:<24}  {'everything' if seen is None else describe_scope(seen)}")
    elif action == "group":
        if args.group_command == "list":
            for study, group in admin.study_groups(study_uid(args.study) if args.study else None):
                print(f"{group:<24}  {study}")
        elif args.group_command == "add":
            added = admin.add_study_group(
                study_uid(args.study_uid), word(args.group, "a group"), change("access", argv)
            )
            state = "added to" if added else "already in"
            print(f"Study {args.study_uid} {state} group {args.group}", file=sys.stderr)
        else:
            admin.remove_study_group(study_uid(args.study_uid), args.group, change("access", argv))
            print(f"Study {args.study_uid} removed from group {args.group}", file=sys.stderr)
    elif action == "grant":
        expires = None
        if args.expires:
            expires = datetime.now(UTC) + lifetime(args.expires, "--expires")
        admin.grant_study(study_uid(args.study_uid), args.user, expires, change("access", argv))
        until = "until revoked" if expires is None else "until " + expires.strftime("%Y-%m-%d %H:%M UTC")
        print(f"User {args.user} may see study {args.study_uid} {until}", file=sys.stderr)
    elif action == "revoke":
        admin.revoke_grant(study_uid(args.study_uid), args.user, change("access", argv))
        print(f"Grant of study {args.study_uid} to {args.user} revoked", file=sys.stderr)
    else:
        now = datetime.now(UTC)
        for g in admin.grants(args.user):
            if g.expires_at is None:
                state = "until revoked"
            elif g.expires_at <= now:
                state = "expired"
            else:
                state = "until " + g.expires_at.strftime("%Y-%m-%d %H:%M")
            print(f"{g.user_name:<24}  {g.study_instance_uid:<64}  {state}")
