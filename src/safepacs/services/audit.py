"""What each access path records: the services' and adapters' one way into the audit trail.

:class:`Auditor` has one method per kind of access.  Each builds the PS3.15 A.5.3 event from the
:class:`~safepacs.types.Principal` that acted (who, from which address, on what device: AE title, TLS
certificate, user agent) and what it touched (patients, studies with their SOP classes and instance
counts, the query), and records it through the sink *before* the caller answers.  When the sink cannot
write, :class:`~safepacs.errors.AuditError` propagates and the caller refuses the access (fail closed:
a DIMSE failure status, HTTP 503).

The event IDs, type codes and participant roles follow PS3.15 A.5.3 and PS3.16 CID 400-403:

=====================================  ===========================================================
what happened                          event
=====================================  ===========================================================
application start / stop               110100 Application Activity, 110120 / 110121
association accepted / rejected,       110113 Security Alert, 110126 Node Authentication
TLS handshake failed
request refused (role, service)        110113 Security Alert, 110132 Use of Restricted Function
user, peer, token, access changes      110113 Security Alert, 110136 Security Roles Changed /
                                       110137 User Security Attributes Changed / 110129 Security
                                       Configuration
C-STORE, STOW-RS                       110103 DICOM Instances Accessed, action C (Create), at the
                                       first instance of each study; at the end of the association
                                       or request 110104 DICOM Instances Transferred, action C, with
                                       the counts (:class:`StoreBatch`)
``safepacs import``                    110107 Import, action C (the same way, per run)
C-FIND, QIDO-RS                        110112 Query, action E, with the query keys
C-GET, WADO-RS and WADO-URI instances  110104 DICOM Instances Transferred, action R
C-MOVE                                 110102 Begin Transferring DICOM Instances, action R
a stored object that fails its          110113 Security Alert naming the instance, and the
integrity check as it is read          retrieval's event for it, both outcome 8 (not sent)
metadata, frames, bulk data, rendered  110103 DICOM Instances Accessed, action R
delete / purge / restore               110105 DICOM Study Deleted, action D / 110103 action U
login, logout, failed login            110114 User Authentication, 110122 Login / 110123 Logout
reading the audit trail                110101 Audit Log Used, action R
=====================================  ===========================================================

An Auditor with ``enabled=False`` records nothing on the access paths (``audit.record = false``, for
measuring what auditing costs); start-up then records 110133 "Audit Recording Stopped", so the gap
itself is on the trail.

Whether an access is allowed is not decided here: that is the gate (:mod:`safepacs.services.gate`),
which records its refusals through an Auditor.  The sink the events go to is the trail in the
database (:class:`~safepacs.services.audittrail.AuditTrail`), or a list in tests
(:class:`~safepacs.services.audittrail.MemoryAuditSink`).
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from safepacs.audit.events import Action, AuditEvent, AuditObject, EventID, ObjectKind, Outcome, Participant
from safepacs.types import InstanceRef, Principal, PrincipalKind

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "AuditSink",
    "Auditor",
    "StoreBatch",
    "StudyFacts",
    "Types",
    "actor",
    "because",
    "facts_of",
    "operator",
    "query_text",
    "study_facts",
]

#: The index's lookup of the (PatientID, PatientName) of studies by Study Instance UID.
StudyPatients = Callable[[Iterable[str]], dict[str, tuple[str, str]]]

SOURCE = "Source Role ID"
DESTINATION = "Destination Role ID"
APPLICATION = "Application"
LAUNCHER = "Application Launcher"


class AuditSink(Protocol):
    """Where an :class:`Auditor`'s events go: the trail in the database, or a list in tests."""

    def record(self, *events: AuditEvent, checkpoint: bool = False, durable: bool = True) -> None:
        """Record before returning (synced to disk unless ``durable`` is False: then within a second);
        :class:`AuditError` when that is impossible."""

    def writer(self, events: Sequence[AuditEvent]) -> Callable[[Any], None]:
        """A function that records ``events`` inside an index write transaction it is given (the
        instance row and its audit record commit together, or neither does)."""


class Types:
    """EventTypeCodes (PS3.16 CID 401-403) as (code, display)."""

    APPLICATION_START = ("110120", "Application Start")
    APPLICATION_STOP = ("110121", "Application Stop")
    LOGIN = ("110122", "Login")
    LOGOUT = ("110123", "Logout")
    NODE_AUTHENTICATION = ("110126", "Node Authentication")
    SECURITY_CONFIGURATION = ("110129", "Security Configuration")
    RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")
    AUDIT_STOPPED = ("110133", "Audit Recording Stopped")
    AUDIT_STARTED = ("110134", "Audit Recording Started")
    ROLES_CHANGED = ("110136", "Security Roles Changed")
    USER_ATTRIBUTES_CHANGED = ("110137", "User Security Attributes Changed")


@dataclass
class StudyFacts:
    """One study an event is about: its patient and the instances touched, per SOP class."""

    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    sop_classes: dict[str, int] = field(default_factory=dict)

    def add(self, sop_class_uid: str, count: int = 1) -> None:
        self.sop_classes[sop_class_uid] = self.sop_classes.get(sop_class_uid, 0) + count


class StoreBatch:
    """What one requestor stored in one go: an association, a STOW-RS request, an ``import`` run.

    The first instance of each study in a batch is recorded as it is stored (110103, in the index
    transaction that stores it); the others of that study are counted here, and
    :meth:`Auditor.stored_batch` records the whole (110104, per study and SOP class, with how many were
    stored, stored already, or not stored because other bytes are stored under their SOP Instance UID:
    "conflict") when the batch ends.  IHE ATNA aggregates C-STORE the same way: per study and
    association, not per instance.
    """

    def __init__(self, *, summarise_refusals: bool = False) -> None:
        self.studies: dict[str, StudyFacts] = {}
        self.outcomes: dict[str, int] = {}
        # Stores refused for lack of disk space are recorded once per batch, not once per instance:
        # each record takes some of the space that is left for the records of reads.
        self.refused_for_space = False
        #: True (a STOW-RS request): an instance refused is counted here, by reason, and recorded in the
        #: batch's summary instead of on its own, so a request of many bad parts costs one record.
        self.summarise_refusals = summarise_refusals
        self.refusals: dict[str, int] = {}
        self.refused_studies: dict[str, StudyFacts] = {}

    def first(self, facts: StudyFacts) -> bool:
        """Whether this is the first instance of its study in the batch (then its event is recorded)."""
        return facts.study_uid not in self.studies

    def count(self, facts: StudyFacts, outcome: str) -> None:
        known = self.studies.get(facts.study_uid)
        if known is None:
            known = StudyFacts(facts.study_uid, facts.patient_id, facts.patient_name)
            self.studies[facts.study_uid] = known
        for sop_class, n in facts.sop_classes.items():
            known.add(sop_class, n)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def refuse(self, why: str, facts: StudyFacts | None = None) -> None:
        """An instance of the batch refused (``why``: one sentence without PHI), of ``facts``' study when
        it was read far enough to know it."""
        self.refusals[why] = self.refusals.get(why, 0) + 1
        if facts is not None and facts.study_uid:
            known = self.refused_studies.setdefault(
                facts.study_uid, StudyFacts(facts.study_uid, facts.patient_id, facts.patient_name)
            )
            for sop_class, n in facts.sop_classes.items():
                known.add(sop_class, n)

    def all_studies(self) -> list[StudyFacts]:
        """The studies of every instance received, stored or refused, with their counts per SOP class."""
        merged: dict[str, StudyFacts] = {}
        for source in (self.studies, self.refused_studies):
            for uid, s in source.items():
                into = merged.setdefault(uid, StudyFacts(s.study_uid, s.patient_id, s.patient_name))
                for sop_class, n in s.sop_classes.items():
                    into.add(sop_class, n)
        return list(merged.values())


def facts_of(header: Dataset) -> StudyFacts:
    """What the audit record of an instance names: its study, patient and SOP class."""
    facts = StudyFacts(
        str(header.get("StudyInstanceUID", "")),
        str(header.get("PatientID", "") or "").strip(),
        str(header.get("PatientName", "") or "").strip(),
    )
    facts.add(str(header.get("SOPClassUID", "")))
    return facts


def study_facts(refs: Iterable[InstanceRef], patients: StudyPatients | None = None) -> list[StudyFacts]:
    """The studies of ``refs`` with their instance counts per SOP class, and their patients when
    ``patients`` (the index's :meth:`~safepacs.db.ports.Instances.study_patients`) is given."""
    by_study: dict[str, StudyFacts] = {}
    for ref in refs:
        by_study.setdefault(ref.study_uid, StudyFacts(ref.study_uid)).add(ref.sop_class_uid)
    if patients is not None:
        for uid, (pid, name) in patients(by_study).items():
            by_study[uid].patient_id, by_study[uid].patient_name = pid, name
    return list(by_study.values())


def actor(principal: Principal, role: str | None = None) -> Participant:
    """The requesting participant: a peer's AE title (and the person it acts for), a user, or a process."""
    peer = principal.kind is PrincipalKind.PEER
    return Participant(
        user_id=principal.name,
        requestor=True,
        role=role,
        address=principal.address,
        ae_title=principal.name if peer else None,
        user_name=principal.user if principal.user != principal.name else None,
        certificate_sha256=principal.certificate_sha256,
        user_agent=principal.user_agent,
    )


def operator(command: str) -> Participant:
    """Whoever runs a ``safepacs`` command on this machine: the operating-system account (the CLI needs
    access to the data directory, so that account is the administrator)."""
    try:
        account = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary UID)
        account = f"uid {os.getuid()}"
    return Participant(account, requestor=True, role=LAUNCHER, user_agent=f"safepacs {command}")


def because(reason: str | None) -> str:
    """The reason a person gave for a change (a deletion, a restore) as the end of its audit record's
    description: ``"; reason: ..."`` on one line, or nothing when none was given."""
    text = " ".join((reason or "").split())
    return f"; reason: {text}" if text else ""


def query_text(identifier: Dataset) -> str:
    """The query keys as compact DICOM JSON (their keywords when a value cannot be encoded)."""
    try:
        return json.dumps(identifier.to_json_dict(), sort_keys=True, separators=(",", ":"))
    except Exception:  # noqa: BLE001 - an undecodable value: the keys still say what was asked
        return json.dumps(sorted(elem.keyword or str(elem.tag) for elem in identifier))


def _study_objects(studies: Iterable[StudyFacts]) -> tuple[AuditObject, ...]:
    out: list[AuditObject] = []
    patients: set[str] = set()
    for s in studies:
        if s.patient_id and s.patient_id not in patients:
            patients.add(s.patient_id)
            out.append(AuditObject(ObjectKind.PATIENT, s.patient_id, name=s.patient_name or None))
        out.append(
            AuditObject(ObjectKind.STUDY, s.study_uid, sop_classes=tuple(sorted(s.sop_classes.items())))
        )
    return tuple(out)


#: How many distinct reasons for refused instances a batch's summary lists (the most frequent first).
_MAX_REASONS = 8


def _outcome(why: str | None, failure: Outcome = Outcome.MINOR_FAILURE) -> Outcome:
    return Outcome.SUCCESS if why is None else failure


class Auditor:
    """Builds and records the events of every access path (see the module docstring)."""

    def __init__(self, sink: AuditSink, ae_title: str, *, enabled: bool = True) -> None:
        self.sink = sink
        self.ae_title = ae_title
        self.enabled = enabled  # False: the access paths record nothing (``audit.record = false``)

    def record(self, *events: AuditEvent, checkpoint: bool = False, durable: bool = True) -> None:
        """Record now; :class:`~safepacs.errors.AuditError` when the trail cannot be written.

        ``durable=False`` (reads: queries, retrievals, accepted associations): committed before the
        answer, synced to disk within a second rather than before it (a crash of SafePACS loses
        nothing; a power cut may lose the last second of them).  Everything that changes data or
        security (stores, deletions, logins, refusals, administration) is synced before the answer.
        """
        if self.enabled:
            self.sink.record(*events, checkpoint=checkpoint, durable=durable)

    def writer(self, *events: AuditEvent) -> Callable[[Any], None] | None:
        """Record ``events`` inside an index write transaction (None when recording is off)."""
        return self.sink.writer(events) if self.enabled else None

    def archive(self, role: str | None = None, address: str | None = None) -> Participant:
        """The archive itself as a participant (the non-requesting side)."""
        return Participant(self.ae_title, requestor=False, role=role, address=address, ae_title=self.ae_title)

    # Associations -------------------------------------------------------------------------------------
    def node_authentication(
        self, who: Participant, why: str | None, detail: Sequence[tuple[str, str]] = ()
    ) -> None:
        """An association accepted (``why`` None) or rejected, a TLS handshake that failed."""
        objects = (
            AuditObject(ObjectKind.NODE, who.ae_title or who.address or "unknown", detail=tuple(detail)),
        )
        self.record(
            AuditEvent(
                EventID.SECURITY_ALERT,
                Action.EXECUTE,
                _outcome(why),
                (who, self.archive(DESTINATION)),
                objects,
                type_code=Types.NODE_AUTHENTICATION,
                outcome_description=why,
            ),
            durable=why is not None,  # an accepted association is recorded like a read
        )

    # Data ---------------------------------------------------------------------------------------------
    def stored(
        self,
        principal: Principal,
        study: StudyFacts,
        *,
        imported: bool,
        why: str | None = None,
        replaced: bool = False,
        detail: Sequence[tuple[str, str]] = (),
    ) -> AuditEvent:
        """The event of one instance stored (C-STORE, STOW-RS) or imported - ``replaced``: over one
        stored with other content (``storage.overwrite``), action U; ``why``: why it was not stored
        (outcome 4); ``detail``: ParticipantObjectDetail of the study (e.g. the instance's UIDs).  The
        caller records it, usually in the index transaction that stores the instance (:meth:`writer`)."""
        objects = _study_objects([study]) if study.study_uid else ()
        if detail:
            objects = tuple(
                replace(o, detail=(*o.detail, *detail)) if o.kind is ObjectKind.STUDY else o for o in objects
            )
        return AuditEvent(
            EventID.IMPORT if imported else EventID.INSTANCES_ACCESSED,
            Action.UPDATE if replaced else Action.CREATE,
            _outcome(why),
            (actor(principal, SOURCE), self.archive(DESTINATION)),
            objects,
            outcome_description=why,
        )

    def stored_batch(self, principal: Principal, batch: StoreBatch, *, imported: bool) -> None:
        """The end of a batch of stores (see :class:`StoreBatch`); nothing when nothing was stored (or,
        for a batch that summarises its refusals, refused)."""
        refused = sum(batch.refusals.values())
        if not batch.studies and not refused:
            return
        conflicts = batch.outcomes.get("conflict", 0)
        counts = [f"{n} {outcome}" for outcome, n in sorted(batch.outcomes.items())]
        if refused:
            by_count = sorted(batch.refusals.items(), key=lambda item: (-item[1], item[0]))
            reasons = "; ".join(f"{why}: {n}" for why, n in by_count[:_MAX_REASONS])
            more = f"; {len(by_count) - _MAX_REASONS} other reasons" if len(by_count) > _MAX_REASONS else ""
            counts.append(f"{refused} refused ({reasons}{more})")
        self.record(
            AuditEvent(
                EventID.IMPORT if imported else EventID.INSTANCES_TRANSFERRED,
                Action.CREATE,
                Outcome.MINOR_FAILURE if conflicts or refused else Outcome.SUCCESS,
                (actor(principal, SOURCE), self.archive(DESTINATION)),
                _study_objects(batch.all_studies()),
                outcome_description=f"instances received: {', '.join(counts)}",
            )
        )

    def store_failed(
        self, principal: Principal, study: StudyFacts | None, why: str, *, imported: bool
    ) -> None:
        facts = study or StudyFacts("")
        self.record(self.stored(principal, facts, imported=imported, why=why))

    def queried(
        self,
        principal: Principal,
        model: str,
        query: str,
        *,
        results: int | None,
        patient_id: str | None = None,
        why: str | None = None,
    ) -> None:
        """A C-FIND or QIDO-RS query (``model``: the SOP Class UID of the C-FIND model or "QIDO-RS")."""
        detail = (("Results", str(results)),) if results is not None else ()
        objects = [AuditObject(ObjectKind.QUERY, model, query=query, detail=detail)]
        if patient_id:
            objects.append(AuditObject(ObjectKind.PATIENT, patient_id))
        self.record(
            AuditEvent(
                EventID.QUERY,
                Action.EXECUTE,
                _outcome(why),
                (actor(principal, SOURCE), self.archive(DESTINATION)),
                tuple(objects),
                outcome_description=why,
            ),
            durable=False,
        )

    def retrieved(
        self,
        principal: Principal,
        studies: Sequence[StudyFacts],
        event_id: EventID,
        *,
        destination: Participant | None = None,
        why: str | None = None,
    ) -> None:
        """Instances handed out: to the requestor, or (C-MOVE) to ``destination``."""
        self.record(
            AuditEvent(
                event_id,
                Action.READ,
                _outcome(why),
                self._retrieval_participants(principal, destination),
                _study_objects(studies),
                outcome_description=why,
            ),
            durable=False,
        )

    def integrity_failed(
        self,
        principal: Principal,
        study: StudyFacts,
        instance: InstanceRef,
        event_id: EventID,
        *,
        destination: Participant | None = None,
        why: str,
    ) -> None:
        """A stored object failed its integrity check when it was read for ``principal``'s retrieval
        (recorded as ``event_id``): a Security Alert naming the instance (PS3.15 A.5.3.11; outcome 8,
        serious: the check held, nothing altered was sent, but the object is lost until restored), and
        the retrieval's failure for that instance (outcome 8: it was not sent), synced together.

        The alert carries no EventTypeCode: PS3.16 CID 403 has none for a failed integrity check, and
        another of its codes would misname the alert; the outcome description and the Alert Description
        of the object say what happened."""
        where = (
            ("Series Instance UID", instance.series_uid),
            ("SOP Instance UID", instance.sop_instance_uid),
        )
        named = StudyFacts(study.study_uid, study.patient_id, study.patient_name)
        named.add(instance.sop_class_uid)
        objects = tuple(
            replace(o, detail=where) if o.kind is ObjectKind.STUDY else o for o in _study_objects([named])
        )
        alert = f"a stored object failed its integrity check and was not sent: {why}"
        self.record(
            AuditEvent(
                EventID.SECURITY_ALERT,
                Action.EXECUTE,
                Outcome.SERIOUS_FAILURE,
                (actor(principal), self.archive()),
                tuple(
                    replace(o, detail=(*o.detail, ("Alert Description", alert)))
                    if o.kind is ObjectKind.STUDY
                    else o
                    for o in objects
                ),
                outcome_description=alert,
            ),
            AuditEvent(
                event_id,
                Action.READ,
                Outcome.SERIOUS_FAILURE,
                self._retrieval_participants(principal, destination),
                objects,
                outcome_description="1 instance not sent: its stored object failed its integrity check",
            ),
        )

    def _retrieval_participants(
        self, principal: Principal, destination: Participant | None
    ) -> tuple[Participant, ...]:
        """The archive as source; the requestor as destination, or (C-MOVE) beside ``destination``."""
        if destination is None:
            return (self.archive(SOURCE), actor(principal, DESTINATION))
        return (self.archive(SOURCE), actor(principal), destination)

    def deletion(self, who: Participant | None, studies: Sequence[StudyFacts], detail: str) -> AuditEvent:
        """The event of a deletion by ``who`` (None: the archive's own purge after retention)."""
        return AuditEvent(
            EventID.STUDY_DELETED,
            Action.DELETE,
            Outcome.SUCCESS,
            (*((who,) if who is not None else ()), self.archive(APPLICATION)),
            _study_objects(studies),
            outcome_description=detail,
        )

    def restored(self, who: Participant, studies: Sequence[StudyFacts], reason: str | None = None) -> None:
        self.record(
            AuditEvent(
                EventID.INSTANCES_ACCESSED,
                Action.UPDATE,
                Outcome.SUCCESS,
                (who, self.archive(APPLICATION)),
                _study_objects(studies),
                outcome_description="restored from the trash" + because(reason),
            )
        )

    # People, configuration, the trail itself ----------------------------------------------------------
    def authenticated(self, who: Participant, *, logout: bool = False, why: str | None = None) -> None:
        """A login (or logout) by ``who``; ``why`` says why a login failed."""
        self.record(
            AuditEvent(
                EventID.USER_AUTHENTICATION,
                Action.EXECUTE,
                _outcome(why),
                (who, self.archive()),
                type_code=Types.LOGOUT if logout else Types.LOGIN,
                outcome_description=why,
            )
        )

    def changed(self, who: Participant, type_code: tuple[str, str], target: str, description: str) -> None:
        """An administrator changed a user, a peer, a token or an access rule."""
        self.record(self.change(who, type_code, target, description))

    def change(
        self, who: Participant, type_code: tuple[str, str], target: str, description: str
    ) -> AuditEvent:
        """The event of an administrative change (:meth:`changed`), for the caller to record in the
        transaction that makes the change (:meth:`writer`)."""
        return AuditEvent(
            EventID.SECURITY_ALERT,
            Action.EXECUTE,
            Outcome.SUCCESS,
            (who, self.archive()),
            (AuditObject(ObjectKind.ACCOUNT, target, detail=(("Alert Description", description),)),),
            type_code=type_code,
            outcome_description=description,
        )

    def audit_used(self, who: Participant, query: str) -> None:
        self.record(
            AuditEvent(
                EventID.AUDIT_LOG_USED,
                Action.READ,
                Outcome.SUCCESS,
                (who, self.archive()),
                (
                    AuditObject(
                        ObjectKind.AUDIT_LOG, "safepacs-audit-trail", name="Security Audit Log", query=query
                    ),
                ),
            )
        )

    def application(self, who: Participant, *, start: bool) -> None:
        """Start or stop of the archive, checkpointed (a signed head at each boundary).  Recorded even
        when the access paths are not: a start with recording off adds 110133 "Audit Recording Stopped"."""
        events = [
            AuditEvent(
                EventID.APPLICATION_ACTIVITY,
                Action.EXECUTE,
                Outcome.SUCCESS,
                (self.archive(APPLICATION), who),
                type_code=Types.APPLICATION_START if start else Types.APPLICATION_STOP,
            )
        ]
        if start and not self.enabled:
            events.append(
                AuditEvent(
                    EventID.SECURITY_ALERT,
                    Action.EXECUTE,
                    Outcome.SUCCESS,
                    (self.archive(APPLICATION), who),
                    type_code=Types.AUDIT_STOPPED,
                    outcome_description="audit.record is false: access to patient data is not recorded",
                )
            )
        self.sink.record(*events, checkpoint=True)
