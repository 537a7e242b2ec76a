"""OpenID Connect bearer tokens: JWTs signed by a configured provider, checked against its JWKS.

A token is accepted only when all of these hold (RFC 7519, RFC 7515, RFC 8725 "JWT Best Current
Practices"):

* its ``iss`` is exactly one of the configured issuers (``[[auth.oidc]]``), and everything below
  is checked with *that* issuer's settings;
* its header ``alg`` is one of the issuer's ``algorithms`` - asymmetric only: ``none`` and HS*
  are refused before any key is looked at (RFC 8725 2.1, 3.1: an HS256 token "signed" with the
  provider's public RSA key must not verify), and the key's type must fit the algorithm;
* its ``kid`` names a signing key in the issuer's JWKS, fetched over https (system CAs or the
  issuer's ``ca_file``, TLS 1.2+, no redirects, ``jwks_timeout``), cached ``jwks_cache_seconds``
  and re-fetched for an unknown ``kid`` at most once per ``jwks_refresh_cooldown``;
* the signature verifies; ``exp`` is present and not past, ``nbf``/``iat`` not in the future
  (``leeway_seconds``, at most 60 s); ``aud`` contains the issuer's ``audience``.

The person is named by ``username_claim`` and gets the SafePACS roles that ``role_map`` gives the
values of ``roles_claim``, and nothing else: a local account of the same name never lends its roles
(a provider's user name is not a proof of being that local user), but it can refuse the person
(disabled) or narrow what they see (its scope).  A token that maps to no role is refused.

The JWKS fetch is blocking I/O: callers run :meth:`OidcVerifier.verify` in a worker thread (FastAPI
runs the synchronous routes that authenticate in its thread pool), bounded by ``jwks_timeout``.
"""

from __future__ import annotations

import hmac
import logging
import math
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from safepacs.auth.policy import ROLES, user_principal
from safepacs.errors import AccessDenied, AuthenticationError, ConfigError, IdentityProviderError
from safepacs.records import UserRecord

if TYPE_CHECKING:
    from safepacs.config import OidcIssuerSettings
    from safepacs.types import Principal

__all__ = [
    "MAX_TOKEN_LENGTH",
    "ExternalUser",
    "OidcVerifier",
    "looks_like_jwt",
    "oidc_principal",
    "oidc_user",
]

log = logging.getLogger(__name__)

MAX_TOKEN_LENGTH = 16 * 1024  # larger "tokens" are refused before they are parsed
_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf or iat in the future)"),
    (jwt.InvalidAudienceError, "the token is not meant for SafePACS (wrong audience)"),
    (jwt.InvalidIssuerError, "the token's issuer is not accepted"),
    (jwt.MissingRequiredClaimError, "the token lacks a required claim (exp, iss, aud)"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidAlgorithmError, "the token's signature algorithm is not accepted"),
    (jwt.DecodeError, "the token is malformed"),
)


@dataclass(frozen=True)
class ExternalUser:
    """A person as an identity provider vouched for them."""

    name: str
    roles: frozenset[str]
    issuer: str


def looks_like_jwt(token: str) -> bool:
    """A compact JWS: three base64url parts separated by dots (RFC 7515 7.1)."""
    parts = token.split(".")
    return len(parts) == 3 and all(parts[:2]) and len(token) <= MAX_TOKEN_LENGTH


def _invalid(detail: str) -> AuthenticationError:
    return AuthenticationError(detail, code="invalid_token")


def _key_fits(alg: str, key: Any) -> bool:
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg in _CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _CURVES[alg])
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class _Issuer:
    def __init__(self, settings: OidcIssuerSettings, position: int) -> None:
        where = f"auth.oidc[{position}]"
        bad = sorted(set(settings.role_map.values()) - set(ROLES))
        if bad:
            raise ConfigError(
                f"setting '{where}.role_map' maps to unknown role {bad[0]!r}; use {', '.join(ROLES)}"
            )
        if settings.ca_file and not Path(settings.ca_file).is_file():
            raise ConfigError(f"setting '{where}.ca_file': {settings.ca_file} is not a readable file")
        try:
            context = ssl.create_default_context(cafile=settings.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"setting '{where}.ca_file' holds no usable PEM certificates") from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.settings = settings
        self.tls = context  # also for the sign-in's discovery and token requests (auth.oidc_login)
        # The JWK Set is cached for jwks_cache_seconds; the re-fetch an unknown kid causes is rate-limited
        # here (not every PyJWT version has a cooldown of its own).
        self.jwks = jwt.PyJWKClient(
            settings.jwks_uri,
            cache_jwk_set=True,
            lifespan=settings.jwks_cache_seconds,
            timeout=settings.jwks_timeout,
            ssl_context=context,
            headers={"User-Agent": "SafePACS", "Accept": "application/json"},
        )
        self._lock = threading.Lock()
        self._last_refresh = -math.inf

    def _keys(self, refresh: bool) -> list[jwt.PyJWK]:
        try:
            return self.jwks.get_signing_keys(refresh=refresh)
        except jwt.PyJWKClientConnectionError as exc:
            log.warning(
                "the JWKS of an OIDC issuer could not be fetched", extra={"issuer": self.settings.issuer}
            )
            raise IdentityProviderError(
                "the identity provider's signing keys could not be fetched; try again later",
                code="temporarily_unavailable",
            ) from exc
        except jwt.PyJWTError as exc:  # not a JWK Set, or one without usable signing keys
            log.warning(
                "the JWKS of an OIDC issuer holds no usable key", extra={"issuer": self.settings.issuer}
            )
            raise _invalid("the token is signed with a key the identity provider does not list") from exc

    def signing_key(self, kid: str) -> Any:
        """The public key ``kid`` names; an unknown kid re-fetches the set at most once per cooldown."""
        with self._lock:  # one fetch at a time; each bounded by jwks_timeout
            found = self.jwks.match_kid(self._keys(refresh=False), kid)
            now = time.monotonic()
            if found is None and now - self._last_refresh >= self.settings.jwks_refresh_cooldown:
                self._last_refresh = now
                found = self.jwks.match_kid(self._keys(refresh=True), kid)
        if found is None:
            raise _invalid("the token is signed with a key the identity provider does not list")
        return found.key


class OidcVerifier:
    """Verifies bearer JWTs of the configured issuers (see the module docstring).  Thread-safe;
    builds no connection until the first token arrives."""

    def __init__(self, issuers: Sequence[OidcIssuerSettings]) -> None:
        self._issuers: dict[str, _Issuer] = {}
        for position, settings in enumerate(issuers):
            if settings.issuer in self._issuers:
                raise ConfigError(f"setting 'auth.oidc[{position}].issuer' repeats {settings.issuer!r}")
            self._issuers[settings.issuer] = _Issuer(settings, position)

    def __bool__(self) -> bool:
        return bool(self._issuers)

    def verify(self, token: str) -> ExternalUser:
        """The person a valid token names; :class:`AuthenticationError` (``invalid_token``) otherwise,
        :class:`IdentityProviderError` when the issuer's keys cannot be fetched."""
        claims, issuer = self._decode(token, None)
        return _person(claims, issuer.settings)

    def tls(self, issuer: str) -> ssl.SSLContext:
        """The TLS context trusted for ``issuer``'s endpoints (its ``ca_file`` or the system CAs)."""
        return self._issuers[issuer].tls

    def verify_id_token(self, token: str, issuer: str, *, nonce: str) -> ExternalUser:
        """The person of an ID token that ``issuer``'s token endpoint just returned to SafePACS's
        client (OIDC Core 3.1.3.7): checked like a bearer token (keys, algorithm, signature, times),
        but ``iss`` must be ``issuer``, ``aud`` must contain the issuer's ``client_id`` (and when it
        names others, ``azp`` must be that client) and ``nonce`` must be the one the sign-in sent."""
        expected = self._issuers.get(issuer)
        if expected is None or expected.settings.client_id is None:
            raise _invalid("the ID token's issuer offers no sign-in here")
        claims, _ = self._decode(token, expected)
        client_id = expected.settings.client_id
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != client_id:
            raise _invalid("the ID token was issued to another client (azp)")
        presented = claims.get("nonce")
        if not isinstance(presented, str) or not hmac.compare_digest(presented.encode(), nonce.encode()):
            raise _invalid("the ID token does not carry this sign-in's nonce")
        return _person(claims, expected.settings)

    def _decode(self, token: str, expected: _Issuer | None) -> tuple[dict[str, Any], _Issuer]:
        """The verified claims of a token and its issuer: a bearer token's (``expected`` None:
        audience ``audience``) or an ID token of ``expected`` (audience its ``client_id``)."""
        if not looks_like_jwt(token):
            raise _invalid("the token is malformed")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _invalid("the token is malformed") from exc
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None or (expected is not None and issuer is not expected):
            raise _invalid("the token's issuer is not accepted")
        settings = issuer.settings
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in settings.algorithms:
            raise _invalid("the token's signature algorithm is not accepted")
        if not isinstance(kid, str) or not kid:
            raise _invalid("the token names no signing key (kid)")
        key = issuer.signing_key(kid)
        if not _key_fits(alg, key):
            raise _invalid("the token's signature algorithm does not fit its key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=settings.audience if expected is None else settings.client_id,
                issuer=settings.issuer,
                leeway=settings.leeway_seconds,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            for kind, detail in _ERRORS:
                if isinstance(exc, kind):
                    raise _invalid(detail) from exc
            raise _invalid("the token is not valid") from exc
        return claims, issuer


def _person(claims: dict[str, Any], settings: OidcIssuerSettings) -> ExternalUser:
    """The person verified claims name, with the roles ``role_map`` gives their ``roles_claim``."""
    name = claims.get(settings.username_claim)
    if not isinstance(name, str) or not name.strip() or len(name) > 256:
        raise _invalid(f"the token has no usable {settings.username_claim!r} claim")
    values = _claim(claims, settings.roles_claim)
    if isinstance(values, str):
        values = values.split()
    if not isinstance(values, list):
        values = []
    roles = frozenset(settings.role_map[v] for v in values if isinstance(v, str) and v in settings.role_map)
    return ExternalUser(name, roles, settings.issuer)


def oidc_user(person: ExternalUser, local: UserRecord | None) -> UserRecord:
    """The account a verified person acts as: the local one of the same name (its scope narrows
    them) or a blank one, with the roles from the provider alone.

    :class:`AuthenticationError` for a disabled local account, :class:`AccessDenied` when the
    provider's claims map to no SafePACS role.
    """
    if local is not None and local.disabled:
        raise _invalid("this user is disabled in SafePACS")
    if not person.roles:
        raise AccessDenied(
            "the token grants no SafePACS role; ask the administrator to map one of its roles "
            "in auth.oidc.role_map"
        )
    base = local if local is not None else UserRecord(person.name, "", frozenset(), False, False)
    return replace(base, roles=person.roles, must_change_password=False)


def oidc_principal(person: ExternalUser, local: UserRecord | None, *, address: str | None) -> Principal:
    """The principal of a verified token's person, built like every person's by ``user_principal``.

    Roles come from the token alone; a local account of the same name can only refuse the person
    (disabled) or narrow what they see (its scope): see :func:`oidc_user`.
    """
    return user_principal(oidc_user(person, local), address=address)
