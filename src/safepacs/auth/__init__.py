"""Authentication and authorization: who is acting, and with which keys and certificates."""

from __future__ import annotations

from safepacs.auth.passwords import generate_password, hash_password, verify_password
from safepacs.auth.pki import certificate_fingerprint, create_ca, issue_certificate, write_private

__all__ = [
    "certificate_fingerprint",
    "create_ca",
    "generate_password",
    "hash_password",
    "issue_certificate",
    "verify_password",
    "write_private",
]
