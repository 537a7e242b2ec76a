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
    "QueryLevel",
    "QueryModel",
    "Service",
    "StoredBlob",
]


class Service(enum.StrEnum):
    """DIMSE services a peer may be allowed to use."""

    ECHO = "echo"
    STORE = "store"
    FIND = "find"
    GET = "get"
    MOVE = "move"


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


@dataclass(frozen=True)
class Peer:
    """A registered DICOM application entity.

    ``host`` is an IP address, a CIDR network or a host name; ``port`` is where
    it listens for C-MOVE sub-operations (``None``: it cannot be a move destination).
    """

    ae_title: str
    host: str
    port: int | None
    allow: frozenset[Service]

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
class Principal:
    """Who is acting: a DIMSE peer or (later) a person or token."""

    kind: str  # "peer", "user", "system"
    name: str
    roles: frozenset[str] = frozenset()
    allow: frozenset[Service] = frozenset()
    address: str | None = None


@dataclass(frozen=True)
class StoredBlob:
    """Where and how one object's bytes are kept."""

    blob_id: str
    key_id: str
    sha256: str
    size: int


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
    CONFLICT = "conflict"  # different bytes stored already, kept (warning status)
    REPLACED = "replaced"  # different bytes stored already, replaced (overwrite on)


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    sop_instance_uid: str
    warnings: tuple[str, ...] = field(default_factory=tuple)
