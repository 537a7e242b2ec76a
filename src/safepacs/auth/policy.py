"""The one access decision: ``decide(principal, action, resource)``.

Every adapter (DIMSE handlers now, DICOMweb routes later) asks this function and nothing else;
there are no inline permission checks in protocol code.  Deny by default: a principal may do
only what it was explicitly granted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from safepacs.errors import AccessDenied
from safepacs.types import DIMSE_SERVICES, Peer, Principal, PrincipalKind, Scope, Service

if TYPE_CHECKING:
    from safepacs.records import UserRecord

__all__ = [
    "RESTRICTED_ROLES",
    "ROLES",
    "Resource",
    "decide",
    "identified_principal",
    "peer_principal",
    "require",
    "scope_of",
    "services_of_roles",
    "user_principal",
]

#: What each role may do (docs/security.md lists the roles).  The services are the DIMSE ones;
#: DICOMweb maps onto them (QIDO-RS = find, WADO-RS = get, STOW-RS = store).  An unknown role grants
#: nothing.
ROLES: dict[str, frozenset[Service]] = {
    "admin": frozenset(Service),
    "radiologist": frozenset({Service.ECHO, Service.FIND, Service.GET, Service.MOVE, Service.STORE}),
    "technologist": frozenset({Service.ECHO, Service.FIND, Service.STORE}),
    "referrer": frozenset({Service.FIND, Service.GET}),
    "researcher": frozenset({Service.FIND, Service.GET}),
    "auditor": frozenset({Service.AUDIT}),
}


#: Roles that never see the whole archive by themselves: a user holding only these roles sees what their
#: scope allows (their referred studies, their groups, their grants) and nothing else, even unconfigured.
RESTRICTED_ROLES = frozenset({"referrer", "researcher"})


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
    return Principal(
        kind=PrincipalKind.USER,
        name=user.name,
        roles=user.roles,
        allow=allow,
        address=address,
        scope=scope_of(user),
        user=user.name,
    )


def scope_of(user: UserRecord) -> Scope | None:
    """Which studies ``user`` sees: None (all) or a :class:`Scope`.

    A user is restricted when an administrator gave them a scope (``safepacs user scope``) or when
    every role they hold is a restricted one (referrer, researcher).  A restricted user also sees
    the studies explicitly granted to them (``safepacs access grant``).
    """
    if user.scope is None and not (user.roles and user.roles <= RESTRICTED_ROLES):
        return None
    return replace(user.scope or Scope(), grantee=user.name)


def peer_principal(peer: Peer, user: UserRecord | None, address: str | None) -> Principal | None:
    """The principal of an association from ``peer``; None when the peer must be refused.

    A peer bound to a user (``safepacs peer add --user``) acts for that person: its services are
    those of the peer table narrowed to what the user's roles allow, and it sees what the user
    sees, so C-FIND and QIDO-RS answer the same person alike.  A peer bound to a user who is
    unknown or disabled is refused.
    """
    if peer.user is None:
        return Principal(
            kind=PrincipalKind.PEER, name=peer.ae_title, allow=peer.allow & DIMSE_SERVICES, address=address
        )
    if user is None or user.disabled or user.name != peer.user:
        return None
    person = user_principal(user, address=address)
    return replace(
        person, kind=PrincipalKind.PEER, name=peer.ae_title, allow=peer.allow & person.allow & DIMSE_SERVICES
    )


def identified_principal(peer: Peer, person: Principal, how: str) -> Principal:
    """The principal of an association from ``peer`` on which ``person`` proved who they are
    (DIMSE User Identity Negotiation, PS3.7 D.3.3.7; ``how``: "password" or "jwt").

    The association acts for that person: their roles and scope, their services narrowed to those
    the peer table allows the AE - so a person sees the same studies over C-FIND as over QIDO-RS.
    """
    return replace(
        person,
        kind=PrincipalKind.PEER,
        name=peer.ae_title,
        allow=peer.allow & person.allow & DIMSE_SERVICES,
        user=person.user or person.name,
        user_identity=how,
    )


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
    if principal.kind is PrincipalKind.SYSTEM:
        return True
    return action in principal.allow


def require(principal: Principal | None, action: Service, resource: Resource | None = None) -> None:
    """Raise :class:`AccessDenied` unless :func:`decide` allows the action."""
    if not decide(principal, action, resource):
        who = "this user" if principal is not None and principal.kind is PrincipalKind.USER else "this peer"
        raise AccessDenied(f"{who} is not allowed to use {action.value}; ask the administrator to allow it")
