"""DICOM audit messages (PS3.15 A.5.1): every EventID validates against the standard's schema.

``tests/data/audit-message.rng`` is the DICOM Audit Message Schema of PS3.15 A.5.1.1 (see its header
for how it was converted from the standard's RELAX NG compact text, ``audit-message.rnc``).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from lxml import etree

from safepacs.audit import Action, AuditEvent, AuditObject, EventID, ObjectKind, Outcome, Participant
from safepacs.audit.xml import AuditSource, to_xml
from tests.support import auditxml
from tests.support.auditxml import _assert_valid, _parse

schema = auditxml.schema  # the standard's RELAX NG schema, compiled once per module
SOURCE = AuditSource("SAFEPACS", "St. Elsewhere Radiology")
WHEN = datetime(2026, 11, 22, 8, 30, 15, 123456, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

ARCHIVE = Participant("SAFEPACS", False, "Source Role ID", address="192.0.2.10", ae_title="SAFEPACS")
VIEWER = Participant(
    "VIEWER1",
    True,
    "Destination Role ID",
    address="10.0.0.7",
    ae_title="VIEWER1",
    user_name="dr.house",
    certificate_sha256="ab" * 32,
)
WEB_USER = Participant("dr.house", True, address="2001:db8::7", user_agent="Mozilla/5.0")
PATIENT = AuditObject(ObjectKind.PATIENT, "PID-0042", name="Doe^Jane")
STUDY = AuditObject(ObjectKind.STUDY, "1.2.826.0.1.3680043.2.1125.1", sop_classes=((CT, 120), (MR, 3)))


def _event(
    event_id: EventID,
    action: Action,
    participants: tuple[Participant, ...],
    objects: tuple[AuditObject, ...] = (),
    **kw: object,
) -> AuditEvent:
    return AuditEvent(
        event_id, action, kw.pop("outcome", Outcome.SUCCESS), participants, objects, time=WHEN, **kw
    )  # type: ignore[arg-type]


#: A representative event for every EventID, shaped as PS3.15 A.5.3 describes it.
SAMPLES: dict[EventID, Callable[[], AuditEvent]] = {
    EventID.APPLICATION_ACTIVITY: lambda: _event(
        EventID.APPLICATION_ACTIVITY,
        Action.EXECUTE,
        (
            Participant("SAFEPACS", False, "Application", ae_title="SAFEPACS"),
            Participant("root", True, "Application Launcher"),
        ),
        type_code=("110120", "Application Start"),
    ),
    EventID.AUDIT_LOG_USED: lambda: _event(
        EventID.AUDIT_LOG_USED,
        Action.READ,
        (WEB_USER,),
        (
            AuditObject(
                ObjectKind.AUDIT_LOG,
                "safepacs-audit-trail",
                query="patient=PID-0042",
                detail=(("operation", "query"),),
            ),
        ),
    ),
    EventID.BEGIN_TRANSFERRING: lambda: _event(
        EventID.BEGIN_TRANSFERRING, Action.EXECUTE, (ARCHIVE, VIEWER), (STUDY, PATIENT)
    ),
    EventID.INSTANCES_ACCESSED: lambda: _event(
        EventID.INSTANCES_ACCESSED,
        Action.READ,
        (WEB_USER,),
        (STUDY, AuditObject(ObjectKind.PATIENT, "PID-7")),
    ),
    EventID.INSTANCES_TRANSFERRED: lambda: _event(
        EventID.INSTANCES_TRANSFERRED, Action.CREATE, (VIEWER, ARCHIVE), (STUDY, PATIENT)
    ),
    EventID.STUDY_DELETED: lambda: _event(
        EventID.STUDY_DELETED, Action.DELETE, (WEB_USER,), (STUDY, PATIENT)
    ),
    EventID.EXPORT: lambda: _event(
        EventID.EXPORT,
        Action.READ,
        (ARCHIVE, Participant("ORTHANC", False, "Destination Role ID", address="pacs2.example.org")),
        (STUDY, PATIENT, AuditObject(ObjectKind.NODE, "ORTHANC@pacs2.example.org")),
    ),
    EventID.IMPORT: lambda: _event(
        EventID.IMPORT,
        Action.CREATE,
        (
            Participant("admin", True, "Destination Role ID"),
            Participant("/media/cdrom", False, "Source Media"),
        ),
        (STUDY, PATIENT),
    ),
    EventID.NETWORK_ENTRY: lambda: _event(
        EventID.NETWORK_ENTRY,
        Action.EXECUTE,
        (Participant("SAFEPACS", False, "Application", address="192.0.2.10"),),
        type_code=("110124", "Attach"),
    ),
    EventID.QUERY: lambda: _event(
        EventID.QUERY,
        Action.EXECUTE,
        (VIEWER, ARCHIVE),
        (
            AuditObject(
                ObjectKind.QUERY,
                STUDY_FIND,
                query='{"00100010":{"vr":"PN","Value":[{"Alphabetic":"Doe*"}]}}',
                detail=(("TransferSyntax", "1.2.840.10008.1.2.1"),),
            ),
        ),
    ),
    EventID.SECURITY_ALERT: lambda: _event(
        EventID.SECURITY_ALERT,
        Action.EXECUTE,
        (Participant("EVIL", False, address="203.0.113.66", ae_title="EVIL"),),
        (AuditObject(ObjectKind.NODE, "203.0.113.66"), AuditObject(ObjectKind.ACCOUNT, "mallory")),
        outcome=Outcome.MINOR_FAILURE,
        type_code=("110126", "Node Authentication"),
        outcome_description="unknown calling AE title; association rejected",
    ),
    EventID.USER_AUTHENTICATION: lambda: _event(
        EventID.USER_AUTHENTICATION,
        Action.EXECUTE,
        (WEB_USER,),
        outcome=Outcome.SERIOUS_FAILURE,
        type_code=("110122", "Login"),
        outcome_description="wrong password; account locked",
    ),
}


def test_every_event_id_has_a_sample() -> None:
    assert set(SAMPLES) == set(EventID)


@pytest.mark.parametrize("event_id", list(EventID), ids=lambda e: e.code)
def test_message_of_every_event_id_validates(schema: etree.RelaxNG, event_id: EventID) -> None:
    event = SAMPLES[event_id]()
    root = _assert_valid(schema, to_xml(event, SOURCE))
    ident = root.find("EventIdentification")
    assert ident is not None
    code = ident.find("EventID")
    assert code is not None
    assert (code.get("csd-code"), code.get("codeSystemName"), code.get("originalText")) == (
        event_id.code,
        "DCM",
        event_id.display,
    )
    assert ident.get("EventActionCode") == event.action.value
    assert ident.get("EventOutcomeIndicator") == str(int(event.outcome))
    assert ident.get("EventDateTime") == "2026-11-22T08:30:15.123456Z"
    requestors = [p for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert len(requestors) <= 1  # A.5.2: never more than one requestor
    source = root.find("AuditSourceIdentification")
    assert source is not None
    assert source.get("AuditSourceID") == "SAFEPACS"
    assert source.get("AuditEnterpriseSiteID") == "St. Elsewhere Radiology"


def _object(root: etree._Element, kind_code: str) -> etree._Element:
    for o in root.findall("ParticipantObjectIdentification"):
        type_code = o.find("ParticipantObjectIDTypeCode")
        if type_code is not None and type_code.get("csd-code") == kind_code:
            return o
    raise AssertionError(f"no participant object with ID type {kind_code}")


def test_study_and_patient_objects_follow_a53(schema: etree.RelaxNG) -> None:
    root = _assert_valid(schema, to_xml(SAMPLES[EventID.INSTANCES_TRANSFERRED](), SOURCE))
    study = _object(root, "110180")
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert study.get("ParticipantObjectID") == STUDY.id
    classes = [
        (c.get("UID"), c.get("NumberOfInstances"))
        for c in study.iterfind("ParticipantObjectDescription/SOPClass")
    ]
    assert classes == [(CT, "120"), (MR, "3")]
    patient = _object(root, "2")
    code = patient.find("ParticipantObjectIDTypeCode")
    assert code is not None and code.get("codeSystemName") == "RFC-3881"
    assert (patient.get("ParticipantObjectTypeCode"), patient.get("ParticipantObjectTypeCodeRole")) == (
        "1",
        "1",
    )
    assert (patient.get("ParticipantObjectID"), patient.findtext("ParticipantObjectName")) == (
        "PID-0042",
        "Doe^Jane",
    )


def test_participants_carry_ae_titles_addresses_and_roles(schema: etree.RelaxNG) -> None:
    root = _assert_valid(schema, to_xml(SAMPLES[EventID.INSTANCES_TRANSFERRED](), SOURCE))
    viewer, archive = root.findall("ActiveParticipant")
    assert viewer.get("UserID") == "VIEWER1" and viewer.get("UserIsRequestor") == "true"
    assert viewer.get("AlternativeUserID") == "AETITLES=VIEWER1"
    assert viewer.get("UserName") == "dr.house"
    assert (viewer.get("NetworkAccessPointID"), viewer.get("NetworkAccessPointTypeCode")) == ("10.0.0.7", "2")
    role = viewer.find("RoleIDCode")
    assert role is not None and (role.get("csd-code"), role.get("originalText")) == (
        "110152",
        "Destination Role ID",
    )
    assert archive.get("UserIsRequestor") == "false"
    export = _assert_valid(schema, to_xml(SAMPLES[EventID.EXPORT](), SOURCE))
    remote = export.findall("ActiveParticipant")[1]
    assert (remote.get("NetworkAccessPointID"), remote.get("NetworkAccessPointTypeCode")) == (
        "pacs2.example.org",
        "1",
    )
    node = _object(export, "110182")
    assert node.get("ParticipantObjectID") == "ORTHANC@pacs2.example.org"


def test_query_is_base64_with_its_transfer_syntax(schema: etree.RelaxNG) -> None:
    event = SAMPLES[EventID.QUERY]()
    root = _assert_valid(schema, to_xml(event, SOURCE))
    query = _object(root, "110181")
    assert query.get("ParticipantObjectID") == STUDY_FIND
    assert base64.b64decode(query.findtext("ParticipantObjectQuery") or "").decode() == event.objects[0].query
    detail = query.find("ParticipantObjectDetail")
    assert detail is not None and detail.get("type") == "TransferSyntax"
    assert base64.b64decode(detail.get("value") or "") == b"1.2.840.10008.1.2.1"


def test_audit_log_object_and_security_alert_details(schema: etree.RelaxNG) -> None:
    used = _assert_valid(schema, to_xml(SAMPLES[EventID.AUDIT_LOG_USED](), SOURCE))
    log_object = _object(used, "12")
    assert (log_object.get("ParticipantObjectTypeCode"), log_object.get("ParticipantObjectTypeCodeRole")) == (
        "2",
        "13",
    )
    assert log_object.findtext("ParticipantObjectName") == "Security Audit Log"
    details = {
        d.get("type"): base64.b64decode(d.get("value") or "").decode()
        for d in log_object.iter("ParticipantObjectDetail")
    }
    assert details == {"operation": "query", "Query": "patient=PID-0042"}

    alert = _assert_valid(schema, to_xml(SAMPLES[EventID.SECURITY_ALERT](), SOURCE))
    for o in alert.findall("ParticipantObjectIdentification"):  # A.5.3.11: "Alert Description" is M
        (d,) = o.findall("ParticipantObjectDetail")
        assert d.get("type") == "Alert Description"
        assert (
            base64.b64decode(d.get("value") or "").decode()
            == "unknown calling AE title; association rejected"
        )
    account = _object(alert, "11")
    assert account.get("ParticipantObjectTypeCodeRole") == "11"


def test_hostile_values_stay_well_formed_and_valid(schema: etree.RelaxNG) -> None:
    nasty = "x\x00y\x1b[31m<script>&\"'\ud800]]>\n\U0001f600"
    event = AuditEvent(
        EventID.USER_AUTHENTICATION,
        Action.EXECUTE,
        Outcome.MINOR_FAILURE,
        (Participant(nasty, True, nasty, address=nasty, ae_title=nasty, user_name=nasty),),
        (AuditObject(ObjectKind.ACCOUNT, nasty, name=nasty, detail=((nasty, nasty),)),),
        type_code=("110122", nasty),
        outcome_description=nasty,
        time=WHEN,
    )
    root = _assert_valid(schema, to_xml(event, SOURCE))
    user = root.find("ActiveParticipant")
    assert user is not None
    assert user.get("UserID") == "x\ufffdy\ufffd[31m<script>&\"'\ufffd]]>\n\U0001f600"
    assert root.findtext("EventIdentification/EventOutcomeDescription") == user.get("UserID")


def test_event_without_participants_names_the_source(schema: etree.RelaxNG) -> None:
    event = AuditEvent(EventID.APPLICATION_ACTIVITY, Action.EXECUTE, Outcome.SUCCESS, (), time=WHEN)
    root = _assert_valid(schema, to_xml(event, SOURCE))
    (only,) = root.findall("ActiveParticipant")
    assert (only.get("UserID"), only.get("UserIsRequestor")) == ("SAFEPACS", "false")


def test_only_the_first_of_several_requestors_is_marked(schema: etree.RelaxNG) -> None:
    event = _event(EventID.INSTANCES_ACCESSED, Action.READ, (WEB_USER, VIEWER), (STUDY, PATIENT))
    root = _assert_valid(schema, to_xml(event, SOURCE))
    assert [p.get("UserIsRequestor") for p in root.findall("ActiveParticipant")] == ["true", "false"]


def test_the_schema_refuses_what_the_standard_refuses(schema: etree.RelaxNG) -> None:
    """The schema bites: the same message without a required part is invalid."""
    good = to_xml(SAMPLES[EventID.INSTANCES_TRANSFERRED](), SOURCE)
    assert schema.validate(_parse(good))
    for path in (
        "ParticipantObjectIdentification/ParticipantObjectName",
        "AuditSourceIdentification",
        "EventIdentification/EventID",
    ):
        root = _parse(good)
        victim = root.find(path)
        assert victim is not None
        victim.getparent().remove(victim)  # type: ignore[union-attr]
        assert not schema.validate(root), path
    root = _parse(good)
    root.find("EventIdentification").set("EventOutcomeIndicator", "3")  # type: ignore[union-attr]
    assert not schema.validate(root)
