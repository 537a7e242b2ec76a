"""Admission past the AE title and the address: DICOM TLS certificates and User Identity Negotiation.

Called by the gate (``gate.py``) once the calling AE title is a registered peer connecting from its
own address.  In this order:

1. Transport (PS3.15 B.12).  A peer registered ``--tls required`` is refused on the plain port.  Over
   DICOM TLS every peer must present a client certificate that proves it
   (:func:`~safepacs.protocols.dimse.tls.certificate_refusal`: not revoked, and the pinned one, or one the
   SafePACS CA issued to its AE title).  A failure gets the answer a stranger gets: A-ASSOCIATE-RJ
   rejected-permanent, "calling AE title not recognized" (PS3.8 Table 9-21).
2. User identity (PS3.7 D.3.3.7).  Credentials - a passcode (type 2) or a JWT (type 5) - are refused
   over a plain connection unless the peer's address is loopback.  Per peer (``--user-identity``):
   ``none`` ignores the item (the association acts as the peer), ``optional`` checks it when sent,
   ``required`` refuses an association without one.  Type 2 is checked as a local login is (Argon2id
   at constant cost, lockout, TOTP: :meth:`~safepacs.auth.login.LoginService.authenticate`), type 5
   as a DICOMweb bearer token (:class:`~safepacs.auth.oidc.OidcVerifier`); types 1 (a user name
   without proof), 3 (Kerberos) and 4 (SAML) are not accepted.  A failure is A-ASSOCIATE-RJ
   rejected-permanent, "no reason given" - the same whichever check failed; a busy login service
   or an unreachable identity provider is rejected-transient.  The association then acts for the
   person (:func:`~safepacs.auth.policy.identified_principal`).

The principal records how the association came in (TLS version, cipher suite, certificate
fingerprint, how the user proved who they are) for the audit trail.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from safepacs.auth.login import MAX_PASSWORD_LENGTH
from safepacs.auth.policy import identified_principal, user_principal
from safepacs.errors import AccessDenied, AuthenticationError, IdentityProviderError, SafePacsError
from safepacs.protocols.dimse.tls import DicomTls, TlsSession, certificate_refusal
from safepacs.types import Peer, Principal, TlsMode, UserIdentityMode

if TYPE_CHECKING:
    from safepacs.records import UserRecord

__all__ = ["Credentials", "SecureAdmission", "Verdict"]

log = logging.getLogger(__name__)

# PS3.8 Table 9-21: (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_IDENTITY = (0x01, 0x01, 0x01)  # rejected-permanent, DICOM UL service-user, no reason given
REJECT_TRANSIENT = (0x02, 0x01, 0x01)  # rejected-transient: try again later

USERNAME_PASSCODE, JWT = 2, 5  # PS3.7 D.3.3.7.1 User-Identity-Type
_MAX_NAME = 256

#: (principal, rejection, reason): rejection None when the association may proceed
Verdict = tuple[Principal | None, tuple[int, int, int] | None, str]


@dataclass(frozen=True)
class Credentials:
    """A User Identity Negotiation request (PS3.7 D.3.3.7.1) as received."""

    kind: int
    primary: bytes
    secondary: bytes
    positive_response_requested: bool

    @classmethod
    def of(cls, item: Any) -> Credentials | None:
        """From pynetdicom's ``UserIdentityNegotiation`` item (None: the request had none)."""
        if item is None:
            return None
        return cls(
            int(item.user_identity_type or 0),
            bytes(item.primary_field or b""),
            bytes(item.secondary_field or b""),
            bool(item.positive_response_requested),
        )


def _loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _text(raw: bytes, limit: int) -> str | None:
    if not raw or len(raw) > limit:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class SecureAdmission:
    """The transport and user identity checks of admission (see the module docstring).

    ``authenticate(name, passcode)`` returns the user a local login proves; ``verify_jwt(token,
    address)`` the principal of a bearer JWT.  Either may be None: that kind of credential is
    refused.  ``tls`` None: no DICOM TLS here, so a TLS session cannot be checked and is refused.
    """

    def __init__(
        self,
        *,
        tls: DicomTls | None = None,
        revoked: Callable[[str], bool] = lambda _sha256: False,
        authenticate: Callable[[str, str], UserRecord] | None = None,
        verify_jwt: Callable[[str, str | None], Principal] | None = None,
    ) -> None:
        self._tls = tls
        self._revoked = revoked
        self._authenticate = authenticate
        self._verify_jwt = verify_jwt

    def admit(
        self,
        peer: Peer,
        principal: Principal,
        address: str,
        session: TlsSession | None,
        credentials: Credentials | None,
    ) -> Verdict:
        """The principal of an association from ``peer`` (whose AE title and address were checked
        already and whose principal as a peer is ``principal``), or why it is refused."""
        if session is None:
            if peer.tls is TlsMode.REQUIRED:
                return None, REJECT_CALLING_AE, "a TLS-required peer connected to the plain DICOM port"
        else:
            if self._tls is None:
                return None, REJECT_CALLING_AE, "DICOM TLS is not configured in this process"
            refusal = certificate_refusal(peer, session, self._tls.ca, self._revoked)
            if refusal is not None:
                return None, REJECT_CALLING_AE, refusal
        verdict = self._identify(peer, principal, address, session, credentials)
        if verdict[0] is not None and session is not None:
            tagged = replace(
                verdict[0], tls=session.version, tls_cipher=session.cipher, certificate_sha256=session.sha256
            )
            return tagged, None, verdict[2]
        return verdict

    def _identify(
        self,
        peer: Peer,
        principal: Principal,
        address: str,
        session: TlsSession | None,
        credentials: Credentials | None,
    ) -> Verdict:
        if credentials is not None and credentials.kind != 1 and session is None and not _loopback(address):
            return None, REJECT_IDENTITY, "user identity credentials sent over a plain connection"
        mode = peer.user_identity
        if mode is UserIdentityMode.NONE:
            return principal, None, "accepted"
        if credentials is None:
            if mode is UserIdentityMode.REQUIRED:
                return None, REJECT_IDENTITY, "this peer must send a user identity and sent none"
            return principal, None, "accepted"
        try:
            person, how = self._person(credentials, address)
        except AuthenticationError as exc:
            if exc.code == "busy":
                return None, REJECT_TRANSIENT, "too many logins at once"
            return None, REJECT_IDENTITY, f"user identity refused: {exc}"
        except IdentityProviderError:
            return None, REJECT_TRANSIENT, "the identity provider's signing keys could not be fetched"
        except AccessDenied:
            return None, REJECT_IDENTITY, "user identity refused: the token grants no SafePACS role"
        except SafePacsError:
            log.exception("user identity could not be checked; refusing the association")
            return None, REJECT_TRANSIENT, "user identity could not be checked"
        if person is None:
            return None, REJECT_IDENTITY, f"user identity type {credentials.kind} is not accepted"
        if peer.user is not None and person.name != peer.user:
            return None, REJECT_IDENTITY, "the identified user is not the user this AE acts for"
        return identified_principal(peer, person, how), None, "accepted"

    def _person(self, credentials: Credentials, address: str) -> tuple[Principal | None, str]:
        if credentials.kind == USERNAME_PASSCODE and self._authenticate is not None:
            name = _text(credentials.primary, _MAX_NAME)
            passcode = _text(credentials.secondary, MAX_PASSWORD_LENGTH)
            if name is None or passcode is None:
                raise AuthenticationError("the user name or passcode is empty, too long or not UTF-8")
            user = self._authenticate(name, passcode)
            return user_principal(user, address=address), "password"
        if credentials.kind == JWT and self._verify_jwt is not None:
            token = _text(credentials.primary, 16 * 1024)
            if token is None:
                raise AuthenticationError("the token is malformed")
            return self._verify_jwt(token.strip(), address), "jwt"
        return None, ""
