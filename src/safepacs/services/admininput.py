"""What an administrator types for a change, parsed and checked once for the command line and the web UI.

``safepacs peer add`` and the administration page that adds a peer (and likewise for users, tokens and
access rules) must accept and refuse exactly the same values, so both call these functions.  Each
raises :class:`~safepacs.errors.InputError` with one sentence that names the value the way the caller
shows it (``field``: ``--host`` on the command line, ``Host`` on a page) and says what to give
instead; neither front end ever shows a traceback for a wrong value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from safepacs.errors import InputError, SafePacsError
from safepacs.records import PinnedCertificate
from safepacs.types import DIMSE_SERVICES, Peer, Scope, Service, TlsMode, UserIdentityMode

__all__ = [
    "CLI_PEER_FIELDS",
    "PeerEntry",
    "ae_title",
    "allowed_services",
    "describe_scope",
    "fingerprint",
    "lifetime",
    "new_peer",
    "peer_host",
    "peer_port",
    "pinned_certificate",
    "roles",
    "scope",
    "study_uid",
    "token_scopes",
    "user_name",
    "word",
]

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


# Peers ------------------------------------------------------------------------------------------------------
def ae_title(text: str) -> str:
    """A valid AE title (PS3.5 6.2), without surrounding spaces."""
    from safepacs.config._settings import validate_ae_title

    try:
        return validate_ae_title(text)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def peer_port(port: int | None, field: str) -> int | None:
    if port is not None and not 0 < port < 65536:
        raise InputError(f"{field} must be between 1 and 65535")
    return port


def peer_host(host: str, field: str) -> str:
    """An IP address or CIDR network (normalised), or a host name (lower case)."""
    try:
        return str(ipaddress.ip_network(host, strict=False))
    except ValueError:
        pass
    if _HOSTNAME_RE.match(host):
        return host.lower()
    raise InputError(f"{field} {host!r} is neither an IP address, a CIDR network nor a host name")


def allowed_services(names: Iterable[str], field: str) -> frozenset[Service]:
    """The DIMSE services a peer may use, from their names (echo, store, find, get, move)."""
    wanted = [n.strip().lower() for n in names if n.strip()]
    if not wanted:
        raise InputError(f"{field} needs at least one of echo,store,find,get,move")
    known = {s.value: s for s in DIMSE_SERVICES}
    bad = [n for n in wanted if n not in known]
    if bad:
        raise InputError(f"unknown service {bad[0]!r} in {field}; use echo,store,find,get,move")
    return frozenset(known[n] for n in wanted)


def fingerprint(text: str, field: str) -> str:
    """A certificate's SHA-256 fingerprint, normalised (64 lowercase hex digits)."""
    from safepacs.auth.pki import normalize_fingerprint

    try:
        return normalize_fingerprint(text)
    except ValueError as exc:
        raise InputError(f"{field}: {exc}") from None


def pinned_certificate(raw: bytes, field: str) -> PinnedCertificate:
    """The first certificate of a PEM a device brings, to pin for one peer."""
    from cryptography.hazmat.primitives import serialization

    from safepacs.auth.pki import load_certificate

    if not raw.lstrip().startswith(b"-----BEGIN CERTIFICATE"):
        raise InputError(f"{field} is not a PEM certificate")
    try:
        cert = load_certificate(raw)
    except SafePacsError:
        raise InputError(f"{field} is not a PEM certificate") from None
    pem = cert.public_bytes(serialization.Encoding.PEM)  # the first certificate only
    return PinnedCertificate(pem, format(cert.serial_number, "x"), cert.not_valid_after_utc)


#: How ``peer add`` names the fields of a new peer in its messages.
CLI_PEER_FIELDS: Mapping[str, str] = {
    "host": "--host",
    "port": "--port",
    "allow": "--allow",
    "tls": "--tls",
    "tls_off": "--tls off",
    "cert_fingerprint": "--cert-fingerprint",
    "cert": "--cert",
    "user_identity": "--user-identity",
    "user": "--user",
}


@dataclass(frozen=True)
class PeerEntry:
    """A new peer as typed (text, as a command line or a form gives it)."""

    ae_title: str
    host: str
    allow: Iterable[str]
    port: int | None = None
    user: str | None = None
    tls: str = TlsMode.REQUIRED.value
    cert_fingerprint: str | None = None
    cert_pem: bytes | None = None  # a certificate the device brings, to pin
    user_identity: str = UserIdentityMode.NONE.value


def new_peer(
    entry: PeerEntry, fields: Mapping[str, str] = CLI_PEER_FIELDS
) -> tuple[Peer, PinnedCertificate | None]:
    """The peer ``entry`` registers, and the certificate it pins (None without one); ``fields`` names
    the fields in the messages (see :data:`CLI_PEER_FIELDS` for the keys)."""
    try:
        tls = TlsMode(entry.tls)
    except ValueError:
        raise InputError(f"{fields['tls']} is one of {', '.join(m.value for m in TlsMode)}") from None
    try:
        identity = UserIdentityMode(entry.user_identity)
    except ValueError:
        choices = ", ".join(m.value for m in UserIdentityMode)
        raise InputError(f"{fields['user_identity']} is one of {choices}") from None
    pinned = None
    if entry.cert_fingerprint:
        pinned = fingerprint(entry.cert_fingerprint, fields["cert_fingerprint"])
    pin: PinnedCertificate | None = None
    if entry.cert_pem is not None:
        from safepacs.auth.pki import certificate_fingerprint

        pin = pinned_certificate(entry.cert_pem, fields["cert"])
        digest = certificate_fingerprint(pin.pem)
        if pinned is not None and pinned != digest:
            raise InputError(f"{fields['cert']} and {fields['cert_fingerprint']} name different certificates")
        pinned = digest
    if pinned is not None and tls is TlsMode.OFF:
        raise InputError(f"a pinned certificate needs DICOM TLS: drop {fields['tls_off']} or the pin")
    user = entry.user.strip() if entry.user else None
    if identity is UserIdentityMode.REQUIRED and user:
        raise InputError(
            f"{fields['user_identity']} required names the user on every association; drop {fields['user']}"
        )
    peer = Peer(
        ae_title(entry.ae_title),
        peer_host(entry.host.strip(), fields["host"]),
        peer_port(entry.port, fields["port"]),
        allowed_services(entry.allow, fields["allow"]),
        user or None,
        tls=tls,
        cert_sha256=pinned,
        user_identity=identity,
    )
    return peer, pin


# Users and tokens -------------------------------------------------------------------------------------------
def user_name(text: str) -> str:
    """A valid new user name."""
    if not _USER_RE.match(text):
        raise InputError("a user name is 1-64 letters, digits and . _ @ - (starting with a letter or digit)")
    return text


def roles(names: Iterable[str], field: str) -> frozenset[str]:
    """Known role names (at least one)."""
    from safepacs.auth.policy import ROLES

    wanted = frozenset(r.strip().lower() for r in names if r.strip())
    unknown = sorted(wanted - set(ROLES))
    if unknown:
        raise InputError(f"unknown role {unknown[0]!r}; use {','.join(ROLES)}")
    if not wanted:
        raise InputError(f"{field} needs a role")
    return wanted


def token_scopes(names: Iterable[str] | None, field: str) -> frozenset[str]:
    """What a token is narrowed to (empty: all its user's rights; ``None``: not narrowed)."""
    if names is None:
        return frozenset()
    wanted = frozenset(n.strip().lower() for n in names if n.strip())
    bad = sorted(n for n in wanted if n not in {s.value for s in Service})
    if not wanted or bad:
        raise InputError(f"unknown scope {bad[0]!r}; use find,get,store" if bad else f"{field} is empty")
    return wanted


def lifetime(text: str, field: str) -> timedelta:
    """``30d``, ``12h``, ``2w`` (at most a year)."""
    from safepacs.auth.tokens import parse_lifetime

    try:
        return parse_lifetime(text)
    except ValueError as exc:
        raise InputError(f"{field}: {exc}") from None


# Access -----------------------------------------------------------------------------------------------------
def study_uid(text: str) -> str:
    """A valid Study Instance UID."""
    from safepacs.services.ingest import valid_uid

    if not valid_uid(text):
        raise InputError(f"{text!r} is not a valid Study Instance UID (digits and dots, 64 at most)")
    return text


def word(text: str, what: str) -> str:
    """An institution, modality, person name or group: 1-64 characters, no wildcard."""
    value = text.strip()
    if not value or len(value) > 64 or any(c in value for c in "*?\\\n\r"):
        raise InputError(f"{what} must be 1-64 characters without * ? or \\")
    return value


def scope(
    institutions: Iterable[str],
    modalities: Iterable[str],
    referring_physician: str | None,
    groups: Iterable[str],
    *,
    what: str = "give at least one of --institution, --modality, --referring-physician, --group (or --clear)",
) -> Scope:
    """A user's scope (at least one restriction; ``what`` says so when there is none)."""
    made = Scope(
        institutions=frozenset(word(v, "an institution") for v in institutions),
        modalities=frozenset(word(v, "a modality").upper() for v in modalities),
        referring_physician=word(referring_physician, "a person name") if referring_physician else None,
        groups=frozenset(word(v, "a group") for v in groups),
    )
    if not made.has_attributes and not made.groups:
        raise InputError(what)
    return made


def describe_scope(seen: Scope) -> str:
    """A scope in words (``access show``, the access page)."""
    parts = []
    if seen.institutions:
        parts.append("institutions " + ", ".join(sorted(seen.institutions)))
    if seen.modalities:
        parts.append("modalities " + ",".join(sorted(seen.modalities)))
    if seen.referring_physician:
        parts.append("referred by " + seen.referring_physician)
    if seen.groups:
        parts.append("groups " + ",".join(sorted(seen.groups)))
    return "; ".join(parts) or "nothing but explicit grants"
