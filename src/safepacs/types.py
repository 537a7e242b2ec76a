"""Plain value types shared by every layer.  Imports nothing from the package."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

__all__ = [
    "IngestOutcome",
    "IngestResult",
    "InstanceRef",
    "Peer",
    "Principal",
    "PrincipalKind",
    "QueryLevel",
    "QueryModel",
    "Scope",
    "Service",
    "StoredBlob",
    "TlsMode",
    "UserIdentityMode",
]


class Service(enum.StrEnum):
    """DIMSE services a peer may be allowed to use."""

    ECHO = "echo"
    STORE = "store"
    FIND = "find"
    GET = "get"
    MOVE = "move"
    DELETE = "delete"  # DICOMweb only: no DIMSE service deletes; never granted to a peer
    AUDIT = "audit"  # reading the audit trail over HTTPS (auditors, administrators)


#: The services a DIMSE peer can be allowed (``safepacs peer add --allow``).
DIMSE_SERVICES = frozenset({Service.ECHO, Service.STORE, Service.FIND, Service.GET, Service.MOVE})


class QueryLevel(enum.StrEnum):
    """Query/Retrieve Level (0008,0052), PS3.4 C.6."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class QueryModel(enum.StrEnum):
    """Information models of PS3.4 C.6.1 (Patient Root) and C.6.2 (Study Root)."""

    PATIENT_ROOT = "PATIENT"
    STUDY_ROOT = "STUDY"


class TlsMode(enum.StrEnum):
    """How a peer must connect (``safepacs peer add --tls``)."""

    REQUIRED = "required"  # DICOM TLS with a client certificate that matches the peer; never plain
    OFF = "off"  # a legacy device: plain DICOM from its registered address (a posture finding)


class UserIdentityMode(enum.StrEnum):
    """Whether a peer's associations must name a person (PS3.7 D.3.3.7, ``--user-identity``)."""

    NONE = "none"  # user identity items are ignored; the association acts as the peer
    OPTIONAL = "optional"  # checked when sent; then the association acts as that person
    REQUIRED = "required"  # an association without a valid user identity is refused


@dataclass(frozen=True)
class Peer:
    """A registered DICOM application entity.

    ``host`` is an IP address, a CIDR network or a host name; ``port`` is where
    it listens for C-MOVE sub-operations (``None``: it cannot be a move destination).  A peer bound
    to a ``user`` acts for that person: the user's roles and scope narrow what the peer is allowed.
    """

    ae_title: str
    host: str
    port: int | None
    allow: frozenset[Service]
    user: str | None = None  # the person this AE acts for: it sees what that user sees
    tls: TlsMode = TlsMode.REQUIRED  # peers registered before migration 0006 were set to OFF
    cert_sha256: str | None = None  # a pinned client certificate (SHA-256 of its DER, lowercase hex)
    user_identity: UserIdentityMode = UserIdentityMode.NONE

    def matches_address(self, address: str, resolved: frozenset[str] = frozenset()) -> bool:
        """Whether a connection from ``address`` may act as this peer.

        ``resolved`` holds the addresses ``host`` resolved to, when it is a host name.
        """
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        try:
            network = ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return str(ip) in resolved
        return ip in network


@dataclass(frozen=True)
class Scope:
    """Which studies a restricted principal may see.

    A study is visible when it satisfies *every* attribute constraint (an institution among
    ``institutions`` in one of its series, a modality among ``modalities`` in one of its series, its
    Referring Physician's Name equal to ``referring_physician``) - if any attribute constraint is
    set - *or* it carries one of the access ``groups``, *or* it was granted to ``grantee``.  An empty
    scope sees nothing.
    """

    institutions: frozenset[str] = frozenset()
    modalities: frozenset[str] = frozenset()
    referring_physician: str | None = None
    groups: frozenset[str] = frozenset()
    grantee: str | None = None

    @property
    def has_attributes(self) -> bool:
        return bool(self.institutions or self.modalities or self.referring_physician)


class PrincipalKind(enum.StrEnum):
    """Who a :class:`Principal` is; a string enum, so logs and JSON show the same words as before."""

    PEER = "peer"  # a DIMSE peer (AE title)
    USER = "user"  # a person: token, OIDC, session
    SYSTEM = "system"  # SafePACS itself (``safepacs import``, tests)


@dataclass(frozen=True)
class Principal:
    """Who is acting: a DIMSE peer, a person (by token, OIDC or session), or the system itself.

    ``scope`` None means unrestricted: every study the services in ``allow`` reach.
    """

    kind: PrincipalKind
    name: str
    roles: frozenset[str] = frozenset()
    allow: frozenset[Service] = frozenset()
    address: str | None = None
    scope: Scope | None = None
    user: str | None = None  # the person a peer acts for (``peer add --user``), or the user's own name
    # How a DIMSE association came in, for the audit trail (None: not over DICOM TLS / not applicable).
    tls: str | None = None  # the negotiated protocol version, e.g. "TLSv1.3"
    tls_cipher: str | None = None  # the negotiated cipher suite, e.g. "TLS_AES_256_GCM_SHA384"
    certificate_sha256: str | None = None  # SHA-256 of the peer's client certificate (DER), lowercase hex
    user_identity: str | None = None  # how ``user`` proved who they are over DIMSE: "password" or "jwt"
    user_agent: str | None = None  # the HTTP User-Agent of a DICOMweb or API request, for the audit trail


@dataclass(frozen=True)
class StoredBlob:
    """Where and how one object's bytes are kept."""

    blob_id: str
    key_id: str
    sha256: str  # of the plaintext (the Part 10 bytes)
    size: int
    #: The AES-GCM tag of the sealed object, hex; binds the index row to that exact ciphertext, so a
    #: read need not hash the plaintext again (None for objects indexed before it was recorded).
    seal_tag: str | None = None


@dataclass(frozen=True)
class InstanceRef:
    """What retrieval needs to know about one stored instance."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    blob: StoredBlob


class IngestOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same bytes stored already: success, nothing changed
    CONFLICT = "conflict"  # different bytes stored already: the received ones not stored (a failure)
    REPLACED = "replaced"  # different bytes stored already, replaced (overwrite on)


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    sop_instance_uid: str
    warnings: tuple[str, ...] = field(default_factory=tuple)
