"""Admission in front of pynetdicom's association negotiation (PS3.8 7.1.1.9, 9.2).

pynetdicom's acceptor negotiates every association it is asked for against the contexts its AE
supports.  :class:`GateACSE` replaces the association's ACSE (its ``_negotiate_as_acceptor``) so that
first a decision - :class:`~safepacs.protocols.dimse.gate.AssociationGate`, through the ``decide``
callback given to :func:`install_acse` - sees the request (:class:`AssociateRequest`) and answers
:class:`Accept` (with the presentation contexts that association may negotiate, and whether to answer
its User Identity Negotiation) or :class:`Reject` (an A-ASSOCIATE-RJ, after which the association is
killed).  The decision is taken in the association's thread, before any other PDU is read.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.pdu_primitives import A_ASSOCIATE, UserIdentityNegotiation

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

__all__ = ["Accept", "AssociateRequest", "Decide", "GateACSE", "Reject", "admission_decided", "install_acse"]


@dataclass(frozen=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ asked for, and where it came from."""

    calling: str  # Calling AE Title as received (not stripped)
    called: str  # Called AE Title as received
    address: str  # the peer's IP address
    contexts: list[PresentationContext]  # the presentation contexts proposed
    identity: UserIdentityNegotiation | None  # the User Identity Negotiation item, if any
    retrieving: frozenset[str]  # SOP classes proposed with the requestor as SCP (SCP/SCU Role Selection)
    socket: socket.socket | None  # the connection's socket (an ``ssl.SSLSocket`` over DICOM TLS)


@dataclass(frozen=True)
class Accept:
    """Negotiate the association with ``contexts``; ``identity_response``: answer its User Identity
    Negotiation with a zero-length server response (PS3.7 D.3.3.7.2)."""

    contexts: list[PresentationContext]
    identity_response: bool = False


@dataclass(frozen=True)
class Reject:
    """A-ASSOCIATE-RJ ``rejection`` (result, source, reason: PS3.8 Table 9-21); ``linger``: the seconds
    (ARTIM, PS3.8 9.2 AE-8) the peer then has to close the connection before it is closed."""

    rejection: tuple[int, int, int]
    linger: float


#: ``decide(assoc, request)``: admission's answer (called once per association, in its thread)
Decide = Callable[["Association", AssociateRequest], "Accept | Reject"]


class GateACSE(ACSE):
    """pynetdicom's ACSE with admission (``decide``) in front of the negotiation."""

    decide: Decide
    decided: threading.Event  # set once admission has decided (the connection's pending place is free)

    def _negotiate_as_acceptor(self) -> None:
        assoc = self.assoc
        rq = cast(A_ASSOCIATE, self.requestor.primitive)
        calling = str(rq.calling_ae_title or "")
        request = AssociateRequest(
            calling=calling,
            called=str(rq.called_ae_title or ""),
            address=str(self.requestor.address_info.address) if self.requestor.address_info else "",
            contexts=list(rq.presentation_context_definition_list or []),
            identity=self.requestor.user_identity,
            retrieving=frozenset(
                str(uid) for uid, role in self.requestor.role_selection.items() if role.scp_role
            ),
            socket=getattr(assoc.dul.socket, "socket", None),
        )
        verdict = self.decide(assoc, request)
        if isinstance(verdict, Reject):
            self.requestor.ae_title = calling
            # PS3.8 9.2 AE-8: after the A-ASSOCIATE-RJ, ARTIM bounds the wait for the peer to close;
            # a peer that keeps the connection open loses it after ``linger``, not acse_timeout.
            assoc.dul.artim_timer.timeout = verdict.linger
            self.send_reject(*verdict.rejection)
            self.decided.set()
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
            return
        self.decided.set()
        if verdict.identity_response:
            response = UserIdentityNegotiation()
            response.server_response = b""
            self.acceptor.add_negotiation_item(response)
        self.acceptor.supported_contexts = verdict.contexts
        super()._negotiate_as_acceptor()


def install_acse(assoc: Association, decide: Decide) -> None:
    """Swap the association's ACSE for the gated one (before the association starts)."""
    acse = GateACSE(assoc)
    acse.decide = decide
    acse.decided = threading.Event()
    assoc.acse = acse


def admission_decided(assoc: Association) -> threading.Event:
    """Set once admission has accepted or rejected ``assoc`` (which :func:`install_acse` prepared)."""
    return cast(GateACSE, assoc.acse).decided
