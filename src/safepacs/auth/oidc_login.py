"""Sign in through OpenID Connect: the authorization code flow with PKCE (RFC 6749 4.1, RFC 7636,
OIDC Core 3.1) for each ``[[auth.oidc]]`` issuer that has a ``client_id``.

:meth:`OidcSignIn.begin` makes the authorization request: a random ``state`` (CSRF of the redirect,
RFC 6749 10.12), a random ``nonce`` (binds the ID token to this sign-in, OIDC Core 15.5.2) and a
random PKCE ``code_verifier`` whose S256 challenge is sent (RFC 7636 4.2: the code is useless to
whoever intercepts it without the verifier).  The three, the issuer's position, the redirect URI
and the local path to return to travel in a cookie *sealed* with the server's key (authenticated
encryption, :class:`safepacs.auth.totp.Sealer`): the browser can neither read the verifier nor
forge any of it, and the server keeps no state per sign-in.  The sealed value carries its time of
issue and is refused after :data:`SIGN_IN_SECONDS`, whatever the cookie's own ``Max-Age``.

:meth:`OidcSignIn.finish` checks the returned ``state`` against the cookie's (constant time),
exchanges the code at the token endpoint (over https, TLS verified with the issuer's ``ca_file`` or
the system CAs, no redirects, ``jwks_timeout``; with the verifier, and HTTP Basic client
authentication when a ``client_secret_file`` is set, RFC 6749 2.3.1) and verifies the ID token with
the issuer's keys exactly as a bearer token is verified, its audience being the ``client_id`` and
its ``nonce`` the cookie's (:meth:`safepacs.auth.oidc.OidcVerifier.verify_id_token`).  The person
gets the roles ``role_map`` gives their claims, as on the bearer path.

The endpoints come from the issuer's discovery document (``{issuer}/.well-known/openid-configuration``,
OpenID Connect Discovery 1.0 4), fetched like the JWKS and cached ``jwks_cache_seconds``; its
``issuer`` must be the configured one exactly (Discovery 4.3) and its endpoints https.

Everything here blocks (the discovery fetch, the token request): call it from the thread pool.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from safepacs.auth.oidc import ExternalUser, OidcVerifier
from safepacs.errors import (
    AuthenticationError,
    ConfigError,
    IdentityProviderError,
    NotFoundError,
    SafePacsError,
)

if TYPE_CHECKING:
    import httpx

    from safepacs.auth.totp import Sealer
    from safepacs.config import OidcIssuerSettings

__all__ = ["SIGN_IN_SECONDS", "OidcSignIn", "SignInClient", "SignInStart", "SignedIn"]

log = logging.getLogger(__name__)

SIGN_IN_SECONDS = 600  # how long a browser may take at the provider
_PURPOSE = b"safepacs-oidc-sign-in\0"  # nothing else sealed with the same key opens as a sign-in
_MAX_NEXT = 1024
_MAX_DOCUMENT = 256 * 1024
_MAX_TOKEN_RESPONSE = 64 * 1024


@dataclass(frozen=True)
class SignInClient:
    """An issuer that offers sign-in: its position in ``auth.oidc`` and the name to show."""

    position: int
    display_name: str


@dataclass(frozen=True)
class SignInStart:
    """Where to send the browser, and the sealed value of the sign-in cookie."""

    location: str
    cookie: str


@dataclass(frozen=True)
class SignedIn:
    """A finished sign-in: who the provider vouched for, and the local path to return to."""

    person: ExternalUser
    next_path: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _refused(detail: str, code: str = "invalid_request") -> AuthenticationError:
    return AuthenticationError(detail, code=code)


@dataclass(frozen=True)
class _Pending:
    """What the sign-in cookie holds (sealed): the sign-in the browser began."""

    position: int
    state: str
    nonce: str
    verifier: str
    redirect_uri: str
    next_path: str
    issued: float  # time.time() of the authorization request

    def seal(self, sealer: Sealer) -> str:
        return _b64(sealer.seal(_PURPOSE + json.dumps(asdict(self), separators=(",", ":")).encode()))

    @classmethod
    def open(cls, cookie: str, sealer: Sealer) -> _Pending:
        """The sign-in a cookie holds; :class:`AuthenticationError` for one not sealed here."""
        try:
            plain = sealer.open(_unb64(cookie))
            if not plain.startswith(_PURPOSE):
                raise ValueError("sealed for another purpose")
            pending = cls(**json.loads(plain[len(_PURPOSE) :]))
        except (SafePacsError, ValueError, TypeError):
            raise _refused("the sign-in cookie is missing or not valid; start the sign-in again") from None
        return pending


@dataclass
class _Client:
    settings: OidcIssuerSettings
    client_id: str
    secret: str | None
    discovered: dict[str, str] | None = None
    discovered_at: float = 0.0


class OidcSignIn:
    """The sign-in flow of every issuer with a ``client_id`` (see the module docstring).  Thread-safe."""

    def __init__(
        self,
        issuers: Sequence[OidcIssuerSettings],
        verifier: OidcVerifier,
        sealer: Sealer,
        *,
        lifetime: float = SIGN_IN_SECONDS,
    ) -> None:
        self._lifetime = lifetime  # seconds a sign-in may take at the provider
        self._verifier = verifier
        self._sealer = sealer
        self._lock = threading.Lock()
        self._clients: dict[int, _Client] = {}
        for position, settings in enumerate(issuers):
            if settings.client_id is None:
                continue
            secret = None
            if settings.client_secret_file is not None:
                where = f"auth.oidc[{position}].client_secret_file"
                try:
                    secret = settings.client_secret_file.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(
                        f"setting '{where}': {settings.client_secret_file} is not readable"
                    ) from exc
                if not secret:
                    raise ConfigError(f"setting '{where}': {settings.client_secret_file} is empty")
            self._clients[position] = _Client(settings, settings.client_id, secret)

    def clients(self) -> list[SignInClient]:
        """The issuers to offer on the sign-in page, in the order of the settings."""
        return [
            SignInClient(
                p, c.settings.display_name or urlsplit(c.settings.issuer).hostname or c.settings.issuer
            )
            for p, c in sorted(self._clients.items())
        ]

    # The authorization request -------------------------------------------------------------------------
    def begin(self, position: int, redirect_uri: str, next_path: str) -> SignInStart:
        """The authorization request for the issuer at ``position``; :class:`NotFoundError` when
        there is none there or it has no client, :class:`IdentityProviderError` when its discovery
        document cannot be had.  ``next_path`` (the page to return to) is kept as given: the
        adapter makes sure it is a local path, and checks it again when it redirects."""
        client = self._clients.get(position)
        if client is None:
            raise NotFoundError("no identity provider offers sign-in here")
        endpoints = self._endpoints(client)
        state, nonce, verifier = (
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(48),
        )
        challenge = _b64(hashlib.sha256(verifier.encode("ascii")).digest())
        query = urlencode(
            {
                "response_type": "code",
                "client_id": client.client_id,
                "redirect_uri": redirect_uri,
                "scope": " ".join(client.settings.scopes),
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        endpoint = endpoints["authorization_endpoint"]
        location = endpoint + ("&" if urlsplit(endpoint).query else "?") + query
        pending = _Pending(
            position,
            state,
            nonce,
            verifier,
            redirect_uri,
            next_path if len(next_path) <= _MAX_NEXT else "/",
            time.time(),
        )
        return SignInStart(location, pending.seal(self._sealer))

    # The redirect back ---------------------------------------------------------------------------------
    def finish(self, cookie: str, state: str, code: str) -> SignedIn:
        """The person the provider vouched for in answer to the sign-in ``cookie`` began.
        :class:`AuthenticationError` when the cookie is missing, forged, expired or of another
        sign-in, when the code is refused or the ID token is not valid; :class:`IdentityProviderError`
        when the provider cannot be reached."""
        pending = _Pending.open(cookie, self._sealer)
        if not 0 <= time.time() - pending.issued <= self._lifetime:
            raise _refused("the sign-in took too long; start it again")
        if not hmac.compare_digest(state.encode(), pending.state.encode()):
            raise _refused("the sign-in answer does not belong to this browser's sign-in (state); try again")
        client = self._clients.get(pending.position)
        if client is None:  # the settings changed during the sign-in
            raise _refused("this identity provider no longer offers sign-in here")
        id_token = self._exchange(client, code, pending.redirect_uri, pending.verifier)
        person = self._verifier.verify_id_token(id_token, client.settings.issuer, nonce=pending.nonce)
        return SignedIn(person, pending.next_path)

    def _exchange(self, client: _Client, code: str, redirect_uri: str, verifier: str) -> str:
        """The ID token the token endpoint answers for ``code`` (RFC 6749 4.1.3, RFC 7636 4.5)."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        headers = {"Accept": "application/json"}
        if client.secret is None:
            form["client_id"] = client.client_id  # a public client names itself (RFC 6749 4.1.3)
        else:  # RFC 6749 2.3.1: both form-urlencoded, then Basic
            pair = f"{_form_encoded(client.client_id)}:{_form_encoded(client.secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        endpoint = self._endpoints(client)["token_endpoint"]
        import httpx  # here: every process builds this service, only the HTTPS one signs people in

        try:
            with self._http(client) as http:
                response = http.post(endpoint, data=form, headers=headers)
        except httpx.HTTPError as exc:
            log.warning(
                "the token endpoint of an OIDC issuer cannot be reached",
                extra={"issuer": client.settings.issuer},
            )
            raise IdentityProviderError(
                "the identity provider cannot be reached; try again later", code="temporarily_unavailable"
            ) from exc
        body = _json(response.content, _MAX_TOKEN_RESPONSE)
        if response.status_code != 200:
            error = body.get("error") if isinstance(body, dict) else None
            log.warning(
                "the token endpoint of an OIDC issuer refused a code",
                extra={
                    "issuer": client.settings.issuer,
                    "status": response.status_code,
                    "error": str(error)[:64],
                },
            )
            if error == "invalid_client":  # RFC 6749 5.2: a configuration problem, not the person's
                raise IdentityProviderError(
                    "the identity provider does not accept SafePACS's client credentials; tell the "
                    "administrator",
                    code="temporarily_unavailable",
                )
            if response.status_code >= 500 or response.status_code == 429:
                raise IdentityProviderError(
                    "the identity provider could not complete the sign-in; try again later",
                    code="temporarily_unavailable",
                )
            raise _refused(
                "the identity provider refused the sign-in code (used, expired or not ours)", "invalid_grant"
            )
        id_token = body.get("id_token") if isinstance(body, dict) else None
        if not isinstance(id_token, str):
            raise _refused("the identity provider answered no ID token", "invalid_grant")
        return id_token

    # Discovery -----------------------------------------------------------------------------------------
    def _http(self, client: _Client) -> httpx.Client:
        import httpx

        return httpx.Client(
            verify=self._verifier.tls(client.settings.issuer),
            timeout=client.settings.jwks_timeout,
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": "SafePACS"},
        )

    def _endpoints(self, client: _Client) -> dict[str, str]:
        """The authorization and token endpoints of the issuer's discovery document (cached)."""
        settings = client.settings
        with self._lock:  # one fetch at a time, each bounded by jwks_timeout
            now = time.monotonic()
            if client.discovered is not None and now - client.discovered_at < settings.jwks_cache_seconds:
                return client.discovered
            url = settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            import httpx

            try:
                with self._http(client) as http:
                    response = http.get(url, headers={"Accept": "application/json"})
            except httpx.HTTPError as exc:
                log.warning(
                    "the discovery document of an OIDC issuer cannot be fetched",
                    extra={"issuer": settings.issuer},
                )
                raise IdentityProviderError(
                    "the identity provider cannot be reached; try again later", code="temporarily_unavailable"
                ) from exc
            document = _json(response.content, _MAX_DOCUMENT) if response.status_code == 200 else None
            endpoints = _endpoints_of(document, settings.issuer)
            if endpoints is None:
                log.warning(
                    "the discovery document of an OIDC issuer is not usable",
                    extra={"issuer": settings.issuer},
                )
                raise IdentityProviderError(
                    "the identity provider's configuration is not usable; tell the administrator",
                    code="temporarily_unavailable",
                )
            client.discovered, client.discovered_at = endpoints, now
            return endpoints


def _form_encoded(value: str) -> str:
    """RFC 6749 2.3.1: the client id and secret are form-urlencoded before HTTP Basic."""
    return urlencode({"": value})[1:]


def _json(content: bytes, limit: int) -> Any:
    if len(content) > limit:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


def _endpoints_of(document: Any, issuer: str) -> dict[str, str] | None:
    """The https endpoints of a discovery document that names ``issuer`` exactly and allows S256."""
    if not isinstance(document, dict) or document.get("issuer") != issuer:
        return None
    methods = document.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        return None
    found = {}
    for key in ("authorization_endpoint", "token_endpoint"):
        value = document.get(key)
        if not isinstance(value, str) or not value.startswith("https://") or urlsplit(value).fragment:
            return None
        found[key] = value
    return found
