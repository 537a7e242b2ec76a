"""The one access decision: ``decide(principal, action, resource)``.

Every adapter (DIMSE handlers now, DICOMweb routes later) asks this function and nothing else;
there are no inline permission checks in protocol code.  Deny by default: a principal may do
only what it was explicitly granted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from safepacs.errors import AccessDenied
from safepacs.types import Principal, Service

if TYPE_CHECKING:
    from safepacs.index import UserRecord

__all__ = ["ROLES", "Resource", "decide", "require", "services_of_roles", "user_principal"]

#: What each role may do (issue 3).  The services are the DIMSE ones; DICOMweb maps onto them
#: (QIDO-RS = find, WADO-RS = get, STOW-RS = store).  An unknown role grants nothing.
ROLES: dict[str, frozenset[Service]] = {
    "admin": frozenset(Service),
    "radiologist": frozenset({Service.ECHO, Service.FIND, Service.GET, Service.MOVE, Service.STORE}),
    "technologist": frozenset({Service.ECHO, Service.FIND, Service.STORE}),
    "referrer": frozenset({Service.FIND, Service.GET}),
    "researcher": frozenset({Service.FIND, Service.GET}),
    "auditor": frozenset(),
}


def services_of_roles(roles: frozenset[str]) -> frozenset[Service]:
    """The union of what ``roles`` allow."""
    out: set[Service] = set()
    for role in roles:
        out |= ROLES.get(role, frozenset())
    return frozenset(out)


def user_principal(
    user: UserRecord, *, address: str | None, scopes: frozenset[str] | None = None
) -> Principal:
    """The principal of an authenticated person, whichever backend authenticated them.

    Every authentication backend (personal access token, OIDC bearer token, login session) ends
    here, so a person has the same rights whatever way they prove who they are.  ``scopes`` (the
    service names a token was limited to) can only narrow what the user's roles allow.
    """
    allow = services_of_roles(user.roles)
    if scopes:
        allow &= frozenset(Service(s) for s in scopes if s in Service._value2member_map_)
    return Principal(kind="user", name=user.name, roles=user.roles, allow=allow, address=address)


@dataclass(frozen=True)
class Resource:
    """What an action touches (a study, a series...); ``None`` fields mean "the service as a whole"."""

    study_uid: str | None = None
    patient_id: str | None = None


def decide(principal: Principal | None, action: Service, resource: Resource | None = None) -> bool:
    """Whether ``principal`` may perform ``action`` on ``resource``.

    A DIMSE peer may use exactly the services listed for it in the peer table
    (``safepacs peer add --allow``); a person (or their token) what their roles allow, narrowed to
    the token's scopes, which the authenticating adapter has resolved into ``principal.allow``.
    Anything unknown is denied.
    """
    if principal is None:
        return False
    if principal.kind == "system":
        return True
    return action in principal.allow


def require(principal: Principal | None, action: Service, resource: Resource | None = None) -> None:
    """Raise :class:`AccessDenied` unless :func:`decide` allows the action."""
    if not decide(principal, action, resource):
        who = "this user" if principal is not None and principal.kind == "user" else "this peer"
        raise AccessDenied(f"{who} is not allowed to use {action.value}; ask the administrator to allow it")
