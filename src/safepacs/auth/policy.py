"""The one access decision: ``decide(principal, action, resource)``.

Every adapter (DIMSE handlers now, DICOMweb routes later) asks this function and nothing else;
there are no inline permission checks in protocol code.  Deny by default: a principal may do
only what it was explicitly granted.
"""

from __future__ import annotations

from dataclasses import dataclass

from safepacs.errors import AccessDenied
from safepacs.types import Principal, Service

__all__ = ["Resource", "decide", "require"]


@dataclass(frozen=True)
class Resource:
    """What an action touches (a study, a series...); ``None`` fields mean "the service as a whole"."""

    study_uid: str | None = None
    patient_id: str | None = None


def decide(principal: Principal | None, action: Service, resource: Resource | None = None) -> bool:
    """Whether ``principal`` may perform ``action`` on ``resource``.

    A DIMSE peer may use exactly the services listed for it in the peer table
    (``safepacs peer add --allow``).  Anything unknown is denied.
    """
    if principal is None:
        return False
    if principal.kind == "system":
        return True
    return action in principal.allow


def require(principal: Principal | None, action: Service, resource: Resource | None = None) -> None:
    """Raise :class:`AccessDenied` unless :func:`decide` allows the action."""
    if not decide(principal, action, resource):
        raise AccessDenied(
            f"this peer is not allowed to use {action.value}; ask the administrator to allow it"
        )
