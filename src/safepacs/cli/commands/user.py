"""``safepacs user``: the people of DICOMweb.

``user add``/``reset-password`` (the one-time password) and ``user totp-enroll`` (the otpauth:// URI)
print their secret alone on standard output (scripts capture it); everything else is said on standard
error.  Every change is recorded on the audit trail with the change itself
(:mod:`safepacs.services.admin`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from safepacs.cli._common import EXIT_OK, UsageError, add_data_option, admin_service, change
from safepacs.services.admininput import roles as parse_roles
from safepacs.services.admininput import user_name

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

__all__ = ["register", "run", "user_name"]


def register(sub: Subparsers) -> None:
    from safepacs.auth.policy import ROLES

    parser = sub.add_parser("user", help="add, list, disable DICOMweb users; reset passwords")
    parser.set_defaults(handler=run)
    user = parser.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    sp = user.add_parser("add", help="create a user with one or more roles")
    add_data_option(sp)
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--role", required=True, metavar="ROLES", help=f"comma list of {','.join(ROLES)}")
    sp.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (default: generate a one-time password)",
    )
    sp = user.add_parser("list", help="list users")
    add_data_option(sp)
    for action, text in (
        ("disable", "disable a user (their tokens stop working)"),
        ("enable", "enable a user"),
    ):
        sp = user.add_parser(action, help=text)
        add_data_option(sp)
        sp.add_argument("name", metavar="NAME")
    sp = user.add_parser("reset-password", help="set a new one-time password, printed once")
    add_data_option(sp)
    sp.add_argument("name", metavar="NAME")
    sp = user.add_parser(
        "totp-enroll",
        help="give a user a new TOTP secret (second factor); prints its otpauth:// URI once on stdout",
    )
    add_data_option(sp)
    sp.add_argument("name", metavar="NAME")
    for action, text in (
        ("totp-remove", "remove a user's TOTP secret (a lost phone); enrol again before the next login"),
        ("unlock", "lift the lockout that failed logins put on a user"),
    ):
        sp = user.add_parser(action, help=text)
        add_data_option(sp)
        sp.add_argument("name", metavar="NAME")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    action = str(args.user_command)
    name: str | None = getattr(args, "name", None)
    with admin_service(args) as admin:
        by = change("user", argv)
        if action == "add":
            name, roles = user_name(args.name), parse_roles(args.role.split(","), "--role")
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\r\n")
                if len(password) < 12:
                    raise UsageError("the password must be at least 12 characters")
                admin.add_user(name, roles, by, password)
                print(f"User {name} added with roles {','.join(sorted(roles))}", file=sys.stderr)
            else:
                generated = admin.add_user(name, roles, by)
                print(
                    f"User {name} added with roles {','.join(sorted(roles))}; one-time password:",
                    file=sys.stderr,
                )
                print(generated)
        elif action == "list":
            for u in admin.users():
                state = "disabled" if u.disabled else "enabled"
                print(f"{u.name:<24}  {','.join(sorted(u.roles)):<32}  {state}")
        elif name is None:  # pragma: no cover - every other action has a NAME
            raise UsageError(f"user {action} needs a NAME")
        elif action in ("disable", "enable"):
            admin.set_disabled(name, action == "disable", by)
            print(f"User {name} {action}d", file=sys.stderr)
        elif action == "totp-enroll":
            uri = admin.enrol_totp(name, by)
            print(
                f"TOTP enrolled for {name}. Add this URI to their authenticator app now (e.g. as a QR code); "
                "it is shown only once and replaces any earlier secret:",
                file=sys.stderr,
            )
            print(uri)
        elif action == "totp-remove":
            admin.remove_totp(name, by)
            print(
                f"TOTP removed for {name}; enrol again with 'safepacs user totp-enroll {name}'",
                file=sys.stderr,
            )
        elif action == "unlock":
            admin.unlock(name, by)
            print(f"User {name} unlocked", file=sys.stderr)
        else:
            password = admin.reset_password(name, by)
            print(f"New one-time password of {name}:", file=sys.stderr)
            print(password)
    return EXIT_OK
