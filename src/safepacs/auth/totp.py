"""TOTP second factor (RFC 6238): enrolment URIs, sealed secrets, code checks with replay protection.

Parameters are the ones every authenticator app supports: HMAC-SHA1, 6 digits, 30-second steps
(RFC 6238 4, 5.2), a 160-bit random secret (RFC 4226 4, R6).  A code is accepted for the current
step and one step either side (RFC 6238 5.2 recommends at most one step of network delay), and only
once: the step of an accepted code is recorded and no code of that step or an earlier one is
accepted again (RFC 6238 5.2: "the verifier MUST NOT accept the second attempt of the OTP").

The secret is kept sealed with the server's key-encryption key (the ``seal``/``open`` of
:class:`safepacs.storage.EnvelopeCipher`, passed in by the composition root) and bound to the user
name, so a database dump does not reveal it and one user's secret cannot be copied to another.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor import InvalidToken
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from safepacs.errors import IntegrityError

__all__ = [
    "DIGITS",
    "STEP_SECONDS",
    "Enrolment",
    "Sealer",
    "code_at",
    "enrol",
    "matching_step",
    "open_secret",
]

DIGITS = 6
STEP_SECONDS = 30
_SECRET_BYTES = 20  # 160 bits (RFC 4226 4, R6)
_WINDOW = 1  # steps accepted either side of the current one
_ISSUER = "SafePACS"


class Sealer(Protocol):
    """Authenticated encryption with the server's key (``EnvelopeCipher`` is one)."""

    def seal(self, plaintext: bytes) -> bytes: ...

    def open(self, sealed: bytes) -> bytes: ...


@dataclass(frozen=True)
class Enrolment:
    uri: str  # otpauth://totp/... with the secret: shown once, never stored in the clear
    sealed: str  # what the index keeps


def _bound(user_name: str, secret: bytes) -> bytes:
    return user_name.encode("utf-8") + b"\0" + secret


def _totp(secret: bytes) -> TOTP:
    # SHA-1 is the RFC 6238 default and what authenticator apps implement; HMAC-SHA1 is not weakened by
    # SHA-1 collisions.
    return TOTP(secret, DIGITS, SHA1(), STEP_SECONDS, enforce_key_length=True)  # noqa: S303


def enrol(user_name: str, sealer: Sealer) -> Enrolment:
    """A new random secret for ``user_name``: its provisioning URI and its sealed form."""
    secret = secrets.token_bytes(_SECRET_BYTES)
    sealed = base64.b64encode(sealer.seal(_bound(user_name, secret))).decode("ascii")
    uri = _totp(secret).get_provisioning_uri(user_name, _ISSUER)
    return Enrolment(uri, sealed)


def open_secret(user_name: str, sealed: str, sealer: Sealer) -> bytes:
    """The secret of ``user_name`` from its sealed form; :class:`IntegrityError` if it is not theirs."""
    try:
        plain = sealer.open(base64.b64decode(sealed, validate=True))
    except ValueError as exc:
        raise IntegrityError("a stored TOTP secret is not readable; enrol the user again") from exc
    prefix = _bound(user_name, b"")
    if not hmac.compare_digest(plain[: len(prefix)], prefix) or len(plain) != len(prefix) + _SECRET_BYTES:
        raise IntegrityError("a stored TOTP secret belongs to another user; enrol the user again")
    return plain[len(prefix) :]


def matching_step(secret: bytes, code: str, *, now: float | None = None) -> int | None:
    """The time step whose code ``code`` is (current step +/- one), or None.

    Every candidate step is checked (in constant time each), so the time taken does not tell which
    one matched.
    """
    if len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    current = int((time.time() if now is None else now) // STEP_SECONDS)
    totp = _totp(secret)
    found: int | None = None
    for step in range(current - _WINDOW, current + _WINDOW + 1):
        try:
            totp.verify(code.encode("ascii"), step * STEP_SECONDS)
        except InvalidToken:
            continue
        found = step if found is None else found
    return found


def code_at(secret: bytes, when: float) -> str:
    """The code of the step containing ``when`` (for tests and for ``totp-enroll`` confirmation)."""
    return _totp(secret).generate(int(when)).decode("ascii")
