"""Argon2id password hashing and login-safe verification."""

from __future__ import annotations

import re
from typing import Any

import argon2
import pytest

from safepacs.auth.passwords import generate_password, hash_password, needs_rehash, verify_password


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password("correct horse battery staple")


def test_hash_is_argon2id_with_rfc9106_parameters(stored: str) -> None:
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert "correct horse" not in stored


def test_verify(stored: str) -> None:
    assert verify_password(stored, "correct horse battery staple") is True
    assert verify_password(stored, "correct horse battery stapl") is False
    assert verify_password(stored, "") is False
    assert verify_password(stored, "Correct horse battery staple") is False


def test_salted() -> None:
    first, second = hash_password("same"), hash_password("same")
    assert first != second
    assert verify_password(first, "same") and verify_password(second, "same")


@pytest.mark.parametrize("password", ["", "pässwörd ✓ 密码", "x" * 10_000])
def test_unusual_passwords_round_trip(password: str) -> None:
    assert verify_password(hash_password(password), password)


def test_hash_refuses_non_strings() -> None:
    with pytest.raises(TypeError):
        hash_password(b"bytes")  # type: ignore[arg-type]


class _CountingVerify:
    """Wraps argon2's own ``PasswordHasher.verify`` to count the Argon2 computations a login costs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hashes: list[str] = []
        real = argon2.PasswordHasher.verify

        def verify(hasher: argon2.PasswordHasher, hash: str | bytes, password: str | bytes) -> Any:
            self.hashes.append(hash if isinstance(hash, str) else hash.decode())
            return real(hasher, hash, password)

        monkeypatch.setattr(argon2.PasswordHasher, "verify", verify)


def test_unknown_user_costs_one_argon2_verification(stored: str, monkeypatch: pytest.MonkeyPatch) -> None:
    verify_password(None, "warm the dummy hash up")
    counter = _CountingVerify(monkeypatch)
    assert verify_password(None, "correct horse battery staple") is False
    assert len(counter.hashes) == 1
    dummy = counter.hashes[0]
    assert dummy != stored
    # Same algorithm and parameters as a real user's hash, so the same cost.
    assert dummy.split("$")[1:4] == stored.split("$")[1:4]
    assert verify_password(stored, "wrong") is False
    assert len(counter.hashes) == 2


@pytest.mark.parametrize(
    "broken",
    ["", "not a hash", "$argon2id$v=19$m=65536,t=3,p=4$garbage", "$2b$12$" + "a" * 53, "$argon2id$"],
)
def test_broken_stored_hash_never_raises(broken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _CountingVerify(monkeypatch)
    assert verify_password(broken, "anything") is False
    assert counter.hashes  # the dummy hash was still computed: no fast path


def test_needs_rehash(stored: str) -> None:
    assert not needs_rehash(stored)
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("x")
    assert needs_rehash(weak)
    assert verify_password(weak, "x")  # old parameters keep verifying
    assert needs_rehash("not a hash")


def test_generated_passwords() -> None:
    passwords = {generate_password() for _ in range(200)}
    assert len(passwords) == 200
    for password in passwords:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", password)
        assert len(password) * 6 >= 128  # bits of entropy: 6 per base64url character
