"""Personal access tokens: ``spat_<id>_<secret>``, shown once, stored as SHA-256 of the secret.

The id (64 random bits) finds the record; the secret (256 random bits) proves possession.  A
token is high-entropy, so a single SHA-256 is the right hash (a slow password hash would only
slow every request); comparison is constant-time, and an unknown id costs the same hash and
comparison as a known one, so response times do not tell which ids exist.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from safepacs.records import TokenRecord, UserRecord

__all__ = ["PREFIX", "IssuedToken", "check_token", "check_token_holder", "issue_token", "parse_lifetime"]

PREFIX = "spat"
_TOKEN_RE = re.compile(r"^spat_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_LIFETIME_RE = re.compile(r"^([1-9][0-9]{0,4})([hdw])$")
_UNITS = {"h": dt.timedelta(hours=1), "d": dt.timedelta(days=1), "w": dt.timedelta(weeks=1)}
MAX_LIFETIME = dt.timedelta(days=366)
_DUMMY = hashlib.sha256(b"safepacs: no such token").hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once, never stored
    record: TokenRecord


def parse_lifetime(text: str) -> dt.timedelta:
    """``30d``, ``12h``, ``2w``; at most a year (a token that never expires is refused)."""
    m = _LIFETIME_RE.match(text.strip())
    if not m:
        raise ValueError("give the lifetime as a number and h, d or w, e.g. 30d")
    lifetime = int(m.group(1)) * _UNITS[m.group(2)]
    if lifetime > MAX_LIFETIME:
        raise ValueError("a token may live at most 366 days; create a new one when it expires")
    return lifetime


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def issue_token(
    user_name: str,
    lifetime: dt.timedelta,
    scopes: frozenset[str] = frozenset(),
    *,
    now: dt.datetime | None = None,
) -> IssuedToken:
    now = now or dt.datetime.now(dt.UTC)
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = TokenRecord(token_id, user_name, _digest(secret), scopes, now, now + lifetime, None)
    return IssuedToken(f"{PREFIX}_{token_id}_{secret}", record)


def check_token(
    token: str,
    lookup: Callable[[str], TokenRecord | None],
    user_of: Callable[[str], UserRecord | None],
    *,
    now: dt.datetime | None = None,
) -> tuple[TokenRecord, UserRecord] | None:
    """The token's record and enabled user, or None (malformed, unknown, wrong secret, expired,
    revoked, or its user disabled) - the caller answers all of these alike."""

    def holder(token_id: str) -> tuple[TokenRecord, UserRecord | None] | None:
        record = lookup(token_id)
        return None if record is None else (record, user_of(record.user_name))

    return check_token_holder(token, holder, now=now)


def check_token_holder(
    token: str,
    lookup: Callable[[str], tuple[TokenRecord, UserRecord | None] | None],
    *,
    now: dt.datetime | None = None,
) -> tuple[TokenRecord, UserRecord] | None:
    """:func:`check_token` with one lookup of the token and its user together
    (:meth:`~safepacs.db.ports.TokenHolders.get_token_holder`: one statement per request, not two
    transactions); the same checks in the same order."""
    m = _TOKEN_RE.match(token)
    found = lookup(m.group(1)) if m else None
    record = found[0] if found is not None else None
    expected = record.secret_sha256 if record is not None else _DUMMY
    presented = _digest(m.group(2)) if m else _DUMMY
    if not hmac.compare_digest(expected, presented) or found is None or record is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    if record.revoked_at is not None or record.expires_at <= now:
        return None
    user = found[1]
    if user is None or user.disabled:
        return None
    return record, user
