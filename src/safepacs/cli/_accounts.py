"""``safepacs user`` and ``safepacs token``: the people of DICOMweb and their access tokens.

``token create``, ``user add``/``reset-password`` (the one-time password) and ``user totp-enroll``
(the otpauth:// URI) print their secret alone on standard output (scripts capture it); everything
else is said on standard error.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from safepacs.errors import SafePacsError

if TYPE_CHECKING:
    from safepacs.db.ports import Directory

__all__ = ["add_parsers", "cmd_token", "cmd_user"]

_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class AccountUsageError(SafePacsError):
    """A wrong user or token command line."""


def add_parsers(sub: Any, data_opt: Any) -> None:
    from safepacs.auth.policy import ROLES

    user = sub.add_parser("user", help="add, list, disable DICOMweb users; reset passwords").add_subparsers(
        dest="user_command", required=True, metavar="ACTION"
    )
    sp = user.add_parser("add", help="create a user with one or more roles")
    data_opt(sp)
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--role", required=True, metavar="ROLES", help=f"comma list of {','.join(ROLES)}")
    sp.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (default: generate a one-time password)",
    )
    sp = user.add_parser("list", help="list users")
    data_opt(sp)
    for action, text in (
        ("disable", "disable a user (their tokens stop working)"),
        ("enable", "enable a user"),
    ):
        sp = user.add_parser(action, help=text)
        data_opt(sp)
        sp.add_argument("name", metavar="NAME")
    sp = user.add_parser("reset-password", help="set a new one-time password, printed once")
    data_opt(sp)
    sp.add_argument("name", metavar="NAME")
    sp = user.add_parser(
        "totp-enroll",
        help="give a user a new TOTP secret (second factor); prints its otpauth:// URI once on stdout",
    )
    data_opt(sp)
    sp.add_argument("name", metavar="NAME")
    for action, text in (
        ("totp-remove", "remove a user's TOTP secret (a lost phone); enrol again before the next login"),
        ("unlock", "lift the lockout that failed logins put on a user"),
    ):
        sp = user.add_parser(action, help=text)
        data_opt(sp)
        sp.add_argument("name", metavar="NAME")

    token = sub.add_parser("token", help="create, list and revoke personal access tokens").add_subparsers(
        dest="token_action", required=True, metavar="ACTION"
    )
    sp = token.add_parser("create", help="create a token for a user; prints it once on standard output")
    data_opt(sp)
    sp.add_argument("--user", required=True, metavar="NAME")
    sp.add_argument("--expires", default="30d", metavar="LIFETIME", help="e.g. 12h, 30d, 2w (default 30d)")
    sp.add_argument(
        "--scope",
        metavar="SERVICES",
        help="narrow the token to some of the user's rights: comma list of find,get,store (default: all)",
    )
    sp = token.add_parser("list", help="list tokens (never the tokens themselves)")
    data_opt(sp)
    sp.add_argument("--user", metavar="NAME")
    sp = token.add_parser("revoke", help="revoke a token by its id")
    data_opt(sp)
    sp.add_argument("token_id", metavar="ID")


def _roles(text: str) -> frozenset[str]:
    from safepacs.auth.policy import ROLES

    roles = frozenset(r.strip().lower() for r in text.split(",") if r.strip())
    unknown = sorted(roles - set(ROLES))
    if not roles or unknown:
        raise AccountUsageError(
            f"unknown role {unknown[0]!r}; use {','.join(ROLES)}" if unknown else "--role needs a role"
        )
    return roles


def _name(text: str) -> str:
    if not _USER_RE.match(text):
        raise AccountUsageError(
            "a user name is 1-64 letters, digits and . _ @ - (starting with a letter or digit)"
        )
    return text


def cmd_user(args: argparse.Namespace, directory: Directory) -> int:
    from safepacs.auth import generate_password, hash_password

    if args.user_command == "add":
        name, roles = _name(args.name), _roles(args.role)
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
            if len(password) < 12:
                raise AccountUsageError("the password must be at least 12 characters")
            directory.add_user(name, hash_password(password), roles)
            print(f"User {name} added with roles {','.join(sorted(roles))}", file=sys.stderr)
        else:
            password = generate_password()
            directory.add_user(name, hash_password(password), roles, must_change_password=True)
            print(
                f"User {name} added with roles {','.join(sorted(roles))}; one-time password:", file=sys.stderr
            )
            print(password)
    elif args.user_command == "list":
        for u in directory.list_users():
            state = "disabled" if u.disabled else "enabled"
            print(f"{u.name:<24}  {','.join(sorted(u.roles)):<32}  {state}")
    elif args.user_command in ("disable", "enable"):
        directory.update_user(args.name, disabled=args.user_command == "disable")
        if args.user_command == "disable":
            directory.revoke_user_sessions(args.name, datetime.now(UTC))
        print(f"User {args.name} {args.user_command}d", file=sys.stderr)
    elif args.user_command == "totp-enroll":
        return _totp_enroll(args, directory)
    elif args.user_command == "totp-remove":
        directory.set_totp_secret(args.name, None)
        print(
            f"TOTP removed for {args.name}; enrol again with 'safepacs user totp-enroll {args.name}'",
            file=sys.stderr,
        )
    elif args.user_command == "unlock":
        directory.unlock_user(args.name)
        print(f"User {args.name} unlocked", file=sys.stderr)
    else:
        password = generate_password()
        directory.update_user(args.name, password_hash=hash_password(password), must_change_password=True)
        directory.revoke_user_sessions(args.name, datetime.now(UTC))
        print(f"New one-time password of {args.name}:", file=sys.stderr)
        print(password)
    return 0


def _totp_enroll(args: argparse.Namespace, directory: Directory) -> int:
    """A new TOTP secret, sealed with the archive's key; the URI goes to standard output, once."""
    from safepacs.app import open_archive
    from safepacs.config import data_dir_from, load_settings

    if directory.get_user(args.name) is None:
        raise AccountUsageError(f"no user named {args.name!r}; add one with 'safepacs user add'")
    archive = open_archive(load_settings(data_dir_from(args.data)))
    try:
        uri = archive.logins.enrol_totp(args.name)
    finally:
        archive.close()
    print(
        f"TOTP enrolled for {args.name}. Add this URI to their authenticator app now (e.g. as a QR code); "
        "it is shown only once and replaces any earlier secret:",
        file=sys.stderr,
    )
    print(uri)
    return 0


def _scopes(text: str | None) -> frozenset[str]:
    from safepacs.types import Service

    if text is None:
        return frozenset()
    names = frozenset(n.strip().lower() for n in text.split(",") if n.strip())
    bad = sorted(n for n in names if n not in {s.value for s in Service})
    if not names or bad:
        raise AccountUsageError(
            f"unknown scope {bad[0]!r}; use find,get,store" if bad else "--scope is empty"
        )
    return names


def cmd_token(args: argparse.Namespace, directory: Directory) -> int:
    from safepacs.auth.tokens import issue_token, parse_lifetime

    action = str(args.token_action)
    if action == "create":
        try:
            lifetime = parse_lifetime(args.expires)
        except ValueError as exc:
            raise AccountUsageError(f"--expires: {exc}") from None
        user = directory.get_user(args.user)
        if user is None:
            raise AccountUsageError(f"no user named {args.user!r}; add one with 'safepacs user add'")
        issued = issue_token(user.name, lifetime, _scopes(args.scope))
        directory.add_token(issued.record)
        expires = issued.record.expires_at.strftime("%Y-%m-%d %H:%M UTC")
        print(
            f"Token {issued.record.token_id} for {user.name}, valid until {expires}. "
            "It is shown only now; store it like a password.",
            file=sys.stderr,
        )
        print(issued.token)
    elif action == "list":
        for t in directory.list_tokens(args.user):
            state = "revoked" if t.revoked_at is not None else "expires " + t.expires_at.strftime("%Y-%m-%d")
            scopes = ",".join(sorted(t.scopes)) or "all"
            print(f"{t.token_id}  {t.user_name:<24}  {scopes:<16}  {state}")
    else:
        directory.revoke_token(args.token_id)
        print(f"Token {args.token_id} revoked", file=sys.stderr)
    return 0
