"""Audit events: what happened to patient data or to security, in the terms of DICOM PS3.15 A.5.

An :class:`AuditEvent` is a plain value; :func:`canonical` turns it into the canonical JSON that the
hash chain covers and that the store keeps, :func:`from_canonical` back.  The XML form of PS3.15
A.5.1 and syslog forwarding are built from the same value (``audit/xml.py``, ``runtime/audit_export.py``).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "Action",
    "AuditEvent",
    "AuditFilter",
    "AuditObject",
    "EventID",
    "ObjectKind",
    "Outcome",
    "Participant",
    "address_fragment",
    "canonical",
    "format_time",
    "from_canonical",
    "recorded_time",
    "search_keys",
]


_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class EventID(enum.Enum):
    """DICOM PS3.16 CID 400 "Audit Event ID" (DCM code, display name) used by PS3.15 A.5.3."""

    APPLICATION_ACTIVITY = ("110100", "Application Activity")
    AUDIT_LOG_USED = ("110101", "Audit Log Used")
    BEGIN_TRANSFERRING = ("110102", "Begin Transferring DICOM Instances")
    INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
    INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
    STUDY_DELETED = ("110105", "DICOM Study Deleted")
    EXPORT = ("110106", "Export")
    IMPORT = ("110107", "Import")
    NETWORK_ENTRY = ("110108", "Network Entry")
    QUERY = ("110112", "Query")
    SECURITY_ALERT = ("110113", "Security Alert")
    USER_AUTHENTICATION = ("110114", "User Authentication")

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def display(self) -> str:
        return self.value[1]

    @classmethod
    def from_code(cls, code: str) -> EventID:
        for member in cls:
            if member.code == code:
                return member
        raise ValueError(f"unknown audit event id {code!r}")


class Action(enum.StrEnum):
    """EventActionCode (PS3.15 A.5.1): Create, Read, Update, Delete, Execute."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # e.g. refused: the request was valid but not allowed
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class ObjectKind(enum.StrEnum):
    """ParticipantObjectIDTypeCode families used by SafePACS (PS3.15 A.5.2.5 / RFC 3881)."""

    PATIENT = "patient"  # (2, RFC-3881, "Patient Number"), type 1 Person
    STUDY = "study"  # (110180, DCM, "Study Instance UID"), type 2 System Object
    QUERY = "query"  # (110181, DCM, "SOP Class UID") of the query model, with the query itself
    NODE = "node"  # (110182, DCM, "Node ID"), a DICOM peer named in the event (e.g. move destination)
    ACCOUNT = "account"  # (12, RFC-3881, "URI"), a user, peer or token changed by an administrator
    AUDIT_LOG = "audit_log"  # (12, RFC-3881, "URI"), the audit trail itself


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: who or what took part, from where, on what device.

    ``user_id`` is the user name, the AE title of a peer, or the archive's own AE title / process.
    ``role`` is a PS3.15 role name: "Source Role ID", "Destination Role ID", "Application",
    "Application Launcher".
    """

    user_id: str
    requestor: bool
    role: str | None = None
    address: str | None = None  # NetworkAccessPointID (IP address)
    ae_title: str | None = None  # AlternativeUserID: the AE title(s) of a DICOM participant
    user_name: str | None = None  # the person behind a peer (``peer add --user``) or a login name
    certificate_sha256: str | None = None  # TLS client certificate fingerprint, when there is one
    user_agent: str | None = None


@dataclass(frozen=True)
class AuditObject:
    """A ParticipantObject: a patient, a study (with its SOP classes and counts), a query..."""

    kind: ObjectKind
    id: str  # PatientID, Study Instance UID, SOP Class UID of the query, AE title, account name
    name: str | None = None  # ParticipantObjectName, e.g. the patient's name
    sop_classes: tuple[tuple[str, int], ...] = ()  # (SOP Class UID, number of instances)
    query: str | None = None  # the query keys, as DICOM JSON or a URL query string
    detail: tuple[tuple[str, str], ...] = ()  # ParticipantObjectDetail (type, value)


@dataclass(frozen=True)
class AuditEvent:
    event_id: EventID
    action: Action
    outcome: Outcome
    participants: tuple[Participant, ...]
    objects: tuple[AuditObject, ...] = ()
    type_code: tuple[str, str] | None = (
        None  # EventTypeCode (code, display), e.g. ("110120", "Application Start")
    )
    outcome_description: str | None = None  # why it failed, one sentence, never PHI
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def patient_ids(self) -> tuple[str, ...]:
        return tuple(o.id for o in self.objects if o.kind is ObjectKind.PATIENT)

    @property
    def study_uids(self) -> tuple[str, ...]:
        return tuple(o.id for o in self.objects if o.kind is ObjectKind.STUDY)

    @property
    def user_ids(self) -> tuple[str, ...]:
        """Who acted: the requestors' user ids and the people behind them."""
        out: list[str] = []
        for p in self.participants:
            if p.requestor:
                out.append(p.user_id)
                if p.user_name and p.user_name != p.user_id:
                    out.append(p.user_name)
        return tuple(out)


def _drop_empty(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v not in (None, (), [], "")}


def format_time(value: datetime) -> str:
    """A time as the trail writes it: UTC with microseconds, ``2026-11-22T08:00:00.000000Z``."""
    return value.astimezone(UTC).strftime(_TIME_FORMAT)


def search_keys(event: AuditEvent) -> list[tuple[str, str]]:
    """The (kind, value) search keys of ``event`` that ``audit_refs`` holds: its patient IDs, study
    UIDs and acting users, each once.  Written with the record and derived again when verifying it."""
    return [
        (kind, value)
        for kind, values in (
            ("patient", event.patient_ids),
            ("study", event.study_uids),
            ("user", event.user_ids),
        )
        for value in dict.fromkeys(values)
    ]


@dataclass(frozen=True)
class AuditFilter:
    """A search of the trail (``audit query``, ``/api/audit``, the web UI's audit page): the records
    whose search keys (:func:`search_keys`) name this patient, this study and this user, recorded
    from ``since`` to ``until``; ``failed``: only failures (outcome not 0, True) or only successes
    (False); ``address``: a participant's network address is exactly this one.  None: any."""

    patient_id: str | None = None
    study_uid: str | None = None
    user: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    failed: bool | None = None
    address: str | None = None


def address_fragment(address: str) -> str:
    """The text a canonical body holds for a participant at ``address`` (``"address":"..."``): a
    search by address looks for it, since an address is not a search key.  Only a participant's
    address can produce it: a quote inside any recorded value is escaped (``\\"``)."""
    return '"address":' + json.dumps(address, ensure_ascii=False)


def canonical(event: AuditEvent, *, recorded: datetime | None = None) -> str:
    """The canonical JSON of an event: sorted keys, no spaces, UTC time with microseconds.

    ``recorded``: when the trail recorded it (the ``recorded_at`` column that searches by time use),
    kept in the hashed body as ``"recorded"`` so that the column can be checked against it."""
    body = {
        "event": event.event_id.code,
        "action": event.action.value,
        "outcome": int(event.outcome),
        "time": format_time(event.time),
        "recorded": None if recorded is None else format_time(recorded),
        "type": list(event.type_code) if event.type_code else None,
        "why": event.outcome_description,
        "participants": [
            _drop_empty(
                {
                    "user": p.user_id,
                    "requestor": p.requestor,
                    "role": p.role,
                    "address": p.address,
                    "ae": p.ae_title,
                    "person": p.user_name,
                    "cert": p.certificate_sha256,
                    "agent": p.user_agent,
                }
            )
            | {"requestor": p.requestor}
            for p in event.participants
        ],
        "objects": [
            _drop_empty(
                {
                    "kind": o.kind.value,
                    "id": o.id,
                    "name": o.name,
                    "sop_classes": [list(pair) for pair in o.sop_classes],
                    "query": o.query,
                    "detail": [list(pair) for pair in o.detail],
                }
            )
            for o in event.objects
        ],
    }
    return json.dumps(
        _drop_empty(body) | {"participants": body["participants"]},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def from_canonical(text: str) -> AuditEvent:
    """The event a canonical JSON text describes (the inverse of :func:`canonical`)."""
    return _event(json.loads(text))


def recorded_time(text: str) -> tuple[AuditEvent, str | None]:
    """The event of a stored body and the recording time it carries (None: a record made before the
    trail kept it in the body)."""
    d = json.loads(text)
    recorded = d.get("recorded")
    return _event(d), None if recorded is None else str(recorded)


def _event(d: dict[str, Any]) -> AuditEvent:
    return AuditEvent(
        event_id=EventID.from_code(d["event"]),
        action=Action(d["action"]),
        outcome=Outcome(d["outcome"]),
        time=datetime.strptime(d["time"], _TIME_FORMAT).replace(tzinfo=UTC),
        type_code=(d["type"][0], d["type"][1]) if d.get("type") else None,
        outcome_description=d.get("why"),
        participants=tuple(
            Participant(
                user_id=p["user"],
                requestor=bool(p["requestor"]),
                role=p.get("role"),
                address=p.get("address"),
                ae_title=p.get("ae"),
                user_name=p.get("person"),
                certificate_sha256=p.get("cert"),
                user_agent=p.get("agent"),
            )
            for p in d.get("participants", [])
        ),
        objects=tuple(
            AuditObject(
                kind=ObjectKind(o["kind"]),
                id=o["id"],
                name=o.get("name"),
                sop_classes=tuple((str(a), int(b)) for a, b in o.get("sop_classes", [])),
                query=o.get("query"),
                detail=tuple((str(a), str(b)) for a, b in o.get("detail", [])),
            )
            for o in d.get("objects", [])
        ),
    )
