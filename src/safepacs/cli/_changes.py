"""Administrative changes made with the CLI, recorded on the audit trail (110113 Security Alert).

``peer``, ``user``, ``token`` and ``access`` commands change who may do what.  After one succeeds,
:func:`record_change` appends an event naming the operating-system account that ran it, the account,
peer or study it changed, and the command line (which never holds a secret: passwords and tokens are
generated and printed, never given as arguments).  When the trail cannot be written the command says
so and exits non-zero, so the gap is never silent.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

from safepacs.audit.recorder import Types

__all__ = ["change_of", "record_change"]

_READ_ONLY = {"list", "show", "grants"}


def change_of(args: argparse.Namespace) -> tuple[tuple[str, str], str] | None:
    """(EventTypeCode, what was changed) of a changing command; None for the commands that only read."""
    command = args.command
    action = {
        "peer": "peer_command",
        "user": "user_command",
        "token": "token_action",
        "access": "access_command",
    }.get(command)
    if action is None:
        return None
    verb = getattr(args, action, None)
    if verb in _READ_ONLY or (verb == "group" and getattr(args, "group_command", None) == "list"):
        return None
    target = next(
        (
            str(value)
            for name in ("ae_title", "name", "user", "study_uid", "token_id")
            if (value := getattr(args, name, None))
        ),
        "(unknown)",
    )
    if command == "peer":
        return Types.SECURITY_CONFIGURATION, target
    if command == "user" and verb == "add":
        return Types.ROLES_CHANGED, target
    if command == "access" and verb == "scope":
        return Types.ROLES_CHANGED, target
    return Types.USER_ATTRIBUTES_CHANGED, target


def record_change(args: argparse.Namespace, argv: Sequence[str], settings: Any) -> None:
    """Record a successful changing command (see the module docstring); raises AuditError/SafePacsError."""
    change = change_of(args)
    if change is None:
        return
    from safepacs.app import open_repositories
    from safepacs.audit import AuditTrail, Signer
    from safepacs.audit.recorder import Auditor, operator

    type_code, target = change
    repos = open_repositories(settings.index_url)
    try:
        auditor = Auditor(
            AuditTrail(repos.audit_log, Signer.load_or_create(settings.keys_dir), settings.audit_head_file),
            settings.server.ae_title,
        )
        auditor.changed(
            operator(args.command), type_code, target[:256], ("safepacs " + shlex.join(argv))[:1000]
        )
    finally:
        repos.close()
