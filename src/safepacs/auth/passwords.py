"""Local passwords: Argon2id hashing, login-safe verification, generated passwords.

Hashes are Argon2id (RFC 9106) with the RFC 9106 section 4 "second recommended option"
(low memory: t=3, m=64 MiB, p=4, 16-byte salt, 32-byte tag) in the PHC string format,
so each hash carries its own parameters and old hashes keep verifying after the
parameters change (:func:`needs_rehash` tells when to re-hash at the next login).
"""

from __future__ import annotations

import functools
import logging
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.profiles import RFC_9106_LOW_MEMORY

__all__ = ["generate_password", "hash_password", "needs_rehash", "verify_password"]

_log = logging.getLogger(__name__)

# Pure parameters: building it does no work.
_HASHER = PasswordHasher.from_parameters(RFC_9106_LOW_MEMORY)
_GENERATED_BYTES = 24  # 192 bits of entropy; base64url gives 32 characters


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random, discarded password with the current parameters (computed once, lazily)."""
    return _HASHER.hash(secrets.token_urlsafe(_GENERATED_BYTES))


def hash_password(password: str) -> str:
    """The Argon2id hash of ``password`` (RFC 9106), as a PHC string ``$argon2id$v=19$...``."""
    if not isinstance(password, str):
        raise TypeError("password must be a str")
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored_hash``; never raises on a mismatch.

    ``stored_hash=None`` (no such user) and an unreadable stored hash are verified
    against a dummy hash with the same parameters and return ``False``, so a login
    for an unknown user costs the same Argon2id computation as one for a known user
    and the response time does not reveal which user names exist.
    """
    if stored_hash is None:
        _burn(password)
        return False
    try:
        return _HASHER.verify(stored_hash, password)
    except InvalidHashError:
        _log.warning("a stored password hash is not a valid Argon2 hash; the login was refused")
        _burn(password)
        return False
    except VerificationError:
        return False


def _burn(password: str) -> None:
    """Spend one verification's worth of work and discard the result."""
    try:
        _HASHER.verify(_dummy_hash(), password)
    except VerificationError:
        pass


def needs_rehash(stored_hash: str) -> bool:
    """Whether ``stored_hash`` was made with other parameters than :func:`hash_password` uses now."""
    try:
        return _HASHER.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


def generate_password() -> str:
    """A random password: 192 bits from :mod:`secrets`, 32 URL-safe characters ``[A-Za-z0-9_-]``."""
    return secrets.token_urlsafe(_GENERATED_BYTES)
