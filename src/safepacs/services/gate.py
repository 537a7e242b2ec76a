"""The authorizer: whether a principal may use a service, and the record of every refusal.

Every access path asks :meth:`Gate.require` before it touches data: the policy decides
(:func:`~safepacs.auth.policy.require`: role, token scopes, a peer's allowed services) and a refusal is
recorded - 110113 Security Alert, 110132 "Use of Restricted Function", naming who was refused and for
what - before :class:`~safepacs.errors.AccessDenied` reaches the caller, which answers with its
protocol's refusal.  :meth:`Gate.refused` records the refusals the adapters decide themselves (a
C-MOVE destination that is not a registered peer, a search of the trail by someone not allowed it).
When the trail cannot be written, :class:`~safepacs.errors.AuditError` propagates instead and the
access is refused all the same (fail closed).

The gate also answers the adapters' questions about who is asking - the peer registered under an AE
title, a user, the holder of a personal access token, the certificates pinned for peers and whether
one was revoked - from the directory (the index), read afresh on every call, so that no adapter reads
the database itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from safepacs.audit.events import Action, AuditEvent, AuditObject, EventID, Outcome
from safepacs.auth.policy import require
from safepacs.errors import AccessDenied
from safepacs.records import TokenRecord, UserRecord
from safepacs.services.audit import Auditor, Types, actor
from safepacs.types import Peer, Principal, Service

if TYPE_CHECKING:
    from safepacs.db.ports import Identities

__all__ = ["Gate"]


class Gate:
    """The one place access is decided (see the module docstring)."""

    def __init__(self, directory: Identities, auditor: Auditor) -> None:
        self._directory = directory
        self._audit = auditor

    # Decisions ----------------------------------------------------------------------------------------
    def require(self, principal: Principal | None, service: Service) -> None:
        """The policy's :func:`~safepacs.auth.policy.require`; a refusal is recorded before it is raised."""
        try:
            require(principal, service)
        except AccessDenied as exc:
            if principal is not None:
                self.refused(principal, f"{service.value}: {exc}")
            raise

    def refused(self, principal: Principal, why: str, objects: Sequence[AuditObject] = ()) -> None:
        """Record that ``principal`` was refused (``why``; ``objects``: what it asked for)."""
        self._audit.record(
            AuditEvent(
                EventID.SECURITY_ALERT,
                Action.EXECUTE,
                Outcome.MINOR_FAILURE,
                (actor(principal), self._audit.archive()),
                tuple(objects),
                type_code=Types.RESTRICTED_FUNCTION,
                outcome_description=why,
            )
        )

    # Who is asking ------------------------------------------------------------------------------------
    def peer(self, ae_title: str) -> Peer | None:
        """The peer registered under ``ae_title`` (None: not registered), read afresh on every call."""
        return self._directory.get_peer(ae_title)

    def user(self, name: str) -> UserRecord | None:
        """The local user ``name`` (None: no such user)."""
        return self._directory.get_user(name)

    def token_holder(self, token_id: str) -> tuple[TokenRecord, UserRecord | None] | None:
        """The personal access token ``token_id`` and its user (None if the user is gone), by one read."""
        return self._directory.get_token_holder(token_id)

    def pinned_certificates(self) -> list[bytes]:
        """The PEM of every unrevoked certificate pinned for a registered peer."""
        return self._directory.pinned_certificates()

    def certificate_revoked(self, sha256: str) -> bool:
        """Whether the certificate with this SHA-256 was revoked."""
        return self._directory.certificate_revoked(sha256)
