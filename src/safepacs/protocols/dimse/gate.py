"""Association admission: deny by default (PS3.8 7.1.1.9, Table 9-21).

An association is accepted only when the called AE title is ours, the calling AE title is a
registered peer, and the connection comes from that peer's host.  Otherwise A-ASSOCIATE-RJ
rejected-permanent, source "DICOM UL service-user", reason "called AE title not recognized" (7)
or "calling AE title not recognized" (3) - a known AE from the wrong address gets the same
answer as an unknown one, so a stranger learns nothing.  The accepted presentation contexts are
exactly those of the services the peer is allowed (``contexts_for``).  DICOM TLS certificates and
User Identity Negotiation are checked next, by :class:`~safepacs.protocols.dimse.admission.SecureAdmission`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from safepacs.audit.events import Participant
from safepacs.auth.policy import peer_principal
from safepacs.errors import AuditError, SafePacsError
from safepacs.protocols.dimse.admission import Credentials, SecureAdmission
from safepacs.protocols.dimse.contexts import negotiable_contexts
from safepacs.protocols.dimse.engine.acse import Accept, AssociateRequest, Reject, install_acse
from safepacs.protocols.dimse.engine.slots import AssociationSlot
from safepacs.protocols.dimse.tls import TlsSession, tls_session_of
from safepacs.services.audit import Auditor, actor
from safepacs.types import Peer, Principal

if TYPE_CHECKING:
    from pynetdicom.association import Association

    from safepacs.records import UserRecord

__all__ = ["AssociationGate", "install_gate", "principal_of"]

log = logging.getLogger(__name__)

# PS3.8 Table 9-21: (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_TRANSIENT = (0x02, 0x01, 0x01)  # rejected-transient, service-user, no reason given
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit
_REJECTED_LINGER = 1.0  # seconds a rejected peer has to close the connection itself
MAX_PRESENTATION_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1-255

_PRINCIPAL_ATTR = "_safepacs_principal"
_PRINCIPAL: AssociationSlot[Principal] = AssociationSlot(_PRINCIPAL_ATTR)


def principal_of(assoc: Association) -> Principal | None:
    """The principal an accepted association acts as."""
    return _PRINCIPAL.get(assoc)


class AssociationGate:
    """Decides admission from the peer table; counts refusals (per reason) in this process."""

    def __init__(
        self,
        ae_title: str,
        lookup: Callable[[str], Peer | None],
        lookup_user: Callable[[str], UserRecord | None] | None = None,
        *,
        dns_ttl: float = 60.0,
        secure: SecureAdmission | None = None,
        audit: Auditor | None = None,
        max_associations: int | None = None,
    ) -> None:
        """``max_associations``: admitted associations at once (None: no limit here)."""
        self.ae_title = ae_title
        self.max_associations = max_associations
        self._admitted: set[Association] = set()
        self.audit = audit  # None: nothing recorded (unit tests of the decision alone)
        self._secure = secure or SecureAdmission()  # without one: no TLS, no credentials accepted
        self._lookup = lookup
        self._lookup_user = lookup_user
        self._dns: dict[str, tuple[float, frozenset[str]]] = {}
        self._dns_ttl = dns_ttl
        self._lock = threading.Lock()
        self.rejections: Counter[str] = Counter()

    def _resolve(self, host: str) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            hit = self._dns.get(host)
        if hit and hit[0] > now:
            return hit[1]
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            addrs = frozenset(str(info[4][0]) for info in infos)
        except OSError:
            addrs = frozenset()
        with self._lock:
            self._dns[host] = (now + self._dns_ttl, addrs)
        return addrs

    def admit(
        self,
        calling: str,
        called: str,
        address: str,
        n_contexts: int,
        *,
        session: TlsSession | None = None,
        credentials: Credentials | None = None,
    ) -> tuple[Principal | None, tuple[int, int, int] | None, str]:
        """(principal, rejection, reason text): rejection is None when the association may proceed."""
        if n_contexts > MAX_PRESENTATION_CONTEXTS:
            return None, REJECT_NO_REASON, "more than 128 presentation contexts proposed"
        if called.strip() != self.ae_title:
            return None, REJECT_CALLED_AE, "called AE title not recognized"
        try:
            peer = self._lookup(calling.strip())
            user = (
                self._lookup_user(peer.user)
                if peer is not None and peer.user and self._lookup_user is not None
                else None
            )
        except SafePacsError:
            log.exception("peer lookup failed; refusing the association")
            return None, (0x02, 0x01, 0x01), "peer table unavailable"
        if peer is None:
            return None, REJECT_CALLING_AE, "calling AE title not registered"
        if not peer.matches_address(
            address, self._resolve(peer.host) if _is_name(peer.host) else frozenset()
        ):
            return None, REJECT_CALLING_AE, "calling AE title registered for another address"
        principal = peer_principal(peer, user, address)
        if principal is None:  # acts for a user who is disabled or gone: the same answer as a stranger
            return None, REJECT_CALLING_AE, "calling AE title acts for a disabled or unknown user"
        return self._secure.admit(peer, principal, address, session, credentials)

    def record(
        self,
        principal: Principal | None,
        calling: str,
        address: str,
        session: TlsSession | None,
        reason: str | None,
        credentials: Credentials | None = None,
        called: str | None = None,
        *,
        transport: str | None = None,
    ) -> bool:
        """Record an association accepted (``reason`` None) or rejected (110113 Node Authentication) with
        what its TLS handshake and User Identity Negotiation proved; False when the trail cannot be
        written (an accepted association is then refused: fail closed).  ``transport`` describes the
        connection when no TLS session does (connections dropped before admission)."""
        if self.audit is None:
            return True
        if principal is not None:
            who = actor(principal)
        else:
            who = Participant(
                calling.strip()[:16] or "(no AE title)",
                requestor=True,
                address=address or None,
                ae_title=calling.strip()[:16] or None,
                certificate_sha256=session.sha256 if session is not None else None,
            )
        if transport is None:
            transport = f"DICOM TLS {session.version} {session.cipher}" if session else "plain TCP"
        detail = [("Transport", transport)]
        if called is not None:
            detail.append(("Called AE Title", called.strip()[:16]))
        if principal is not None and principal.user_identity:
            detail.append(("User Identity", f"{principal.user} ({principal.user_identity})"))
        elif credentials is not None:
            detail.append(("User Identity", "offered, not accepted"))
        try:
            self.audit.node_authentication(who, reason, detail)
        except AuditError:
            log.error("the audit trail cannot be written; associations are refused until it can")
            return False
        return True

    def reserve(self, assoc: Association) -> bool:
        """Take one of the ``max_associations`` places for an association the gate admits; False when
        all are taken.  Only admitted associations hold places, and a place is free again once its
        association's thread has ended, so connections still negotiating, being rejected or never
        sending a request do not count."""
        with self._lock:
            self._admitted = {a for a in self._admitted if a.is_alive()}
            if self.max_associations is not None and len(self._admitted) >= self.max_associations:
                return False
            self._admitted.add(assoc)
            return True

    def release(self, assoc: Association) -> None:
        """Give back the place of an association that is refused after all."""
        with self._lock:
            self._admitted.discard(assoc)

    def count(self, reason: str) -> int:
        with self._lock:
            self.rejections[reason] += 1
            return self.rejections[reason]

    def decide(self, assoc: Association, request: AssociateRequest) -> Accept | Reject:
        """Admission of one association (``engine.acse.GateACSE`` asks, in the association's thread):
        decided, reserved a place, recorded on the audit trail and logged."""
        calling, called, address = request.calling, request.called, request.address
        session = tls_session_of(request.socket)
        credentials = Credentials.of(request.identity)
        principal, rejection, reason = self.admit(
            calling, called, address, len(request.contexts), session=session, credentials=credentials
        )
        if rejection is None and not self.reserve(assoc):
            rejection, reason = REJECT_LOCAL_LIMIT, "more associations at once than server.max_associations"
        if not self.record(
            principal,
            calling,
            address,
            session,
            reason if rejection is not None else None,
            credentials,
            called,
        ):
            self.release(assoc)
            principal, rejection, reason = None, REJECT_TRANSIENT, "the audit trail cannot be written"
        if rejection is not None:
            total = self.count(reason)
            log.warning(
                "association rejected",
                extra={
                    "calling_ae": calling.strip()[:16],
                    "called_ae": called.strip()[:16],
                    "peer_address": address,
                    "reason": reason,
                    "rejections_total": total,
                },
            )
            return Reject(rejection, _REJECTED_LINGER)
        assert principal is not None
        _PRINCIPAL.set(assoc, principal)
        identity = request.identity
        # PS3.7 D.3.3.7.2: zero-length server response (we hand out no Kerberos/SAML/JWT in return)
        respond = bool(
            principal.user_identity and identity is not None and identity.positive_response_requested
        )
        contexts = negotiable_contexts(principal.allow, request.contexts, request.retrieving)
        log.info(
            "association accepted",
            extra={
                "calling_ae": principal.name,
                "peer_address": address,
                "acting_for": principal.user or "",
                "services": ",".join(sorted(s.value for s in principal.allow)),
                "tls": f"{principal.tls} {principal.tls_cipher}" if principal.tls else "off",
                "certificate_sha256": principal.certificate_sha256 or "",
                "user_identity": principal.user_identity or "",
            },
        )
        return Accept(contexts, identity_response=respond)


def _is_name(host: str) -> bool:
    try:
        ipaddress.ip_network(host, strict=False)
    except ValueError:
        return True
    return False


def install_gate(assoc: Association, gate: AssociationGate) -> None:
    """Put the gate in front of the association's negotiation (called before the association starts)."""
    install_acse(assoc, gate.decide)
