"""``safepacs token create|list|revoke``: personal access tokens.

``token create`` prints the token alone on standard output, once (scripts capture it); everything else
is said on standard error.  Creating and revoking a token are recorded on the audit trail with the
change itself (:mod:`safepacs.services.admin`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from safepacs.cli._common import EXIT_OK, UsageError, add_data_option, admin_service, change
from safepacs.services.admininput import lifetime, token_scopes

if TYPE_CHECKING:
    from safepacs.cli._common import Subparsers

__all__ = ["register", "run"]


def register(sub: Subparsers) -> None:
    parser = sub.add_parser("token", help="create, list and revoke personal access tokens")
    parser.set_defaults(handler=run)
    token = parser.add_subparsers(dest="token_action", required=True, metavar="ACTION")
    sp = token.add_parser("create", help="create a token for a user; prints it once on standard output")
    add_data_option(sp)
    sp.add_argument("--user", required=True, metavar="NAME")
    sp.add_argument("--expires", default="30d", metavar="LIFETIME", help="e.g. 12h, 30d, 2w (default 30d)")
    sp.add_argument(
        "--scope",
        metavar="SERVICES",
        help="narrow the token to some of the user's rights: comma list of find,get,store (default: all)",
    )
    sp = token.add_parser("list", help="list tokens (never the tokens themselves)")
    add_data_option(sp)
    sp.add_argument("--user", metavar="NAME")
    sp = token.add_parser("revoke", help="revoke a token by its id")
    add_data_option(sp)
    sp.add_argument("token_id", metavar="ID")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    action = str(args.token_action)
    with admin_service(args) as admin:
        if action == "create":
            expires_in = lifetime(args.expires, "--expires")
            if admin.user(args.user) is None:
                raise UsageError(f"no user named {args.user!r}; add one with 'safepacs user add'")
            issued = admin.issue_token(
                args.user,
                expires_in,
                token_scopes(args.scope.split(",") if args.scope is not None else None, "--scope"),
                change("token", argv),
            )
            expires = issued.record.expires_at.strftime("%Y-%m-%d %H:%M UTC")
            print(
                f"Token {issued.record.token_id} for {issued.record.user_name}, valid until {expires}. "
                "It is shown only now; store it like a password.",
                file=sys.stderr,
            )
            print(issued.token)
        elif action == "list":
            for t in admin.tokens(args.user):
                state = (
                    "revoked" if t.revoked_at is not None else "expires " + t.expires_at.strftime("%Y-%m-%d")
                )
                scopes = ",".join(sorted(t.scopes)) or "all"
                print(f"{t.token_id}  {t.user_name:<24}  {scopes:<16}  {state}")
        else:
            admin.revoke_token(args.token_id, change("token", argv))
            print(f"Token {args.token_id} revoked", file=sys.stderr)
    return EXIT_OK
