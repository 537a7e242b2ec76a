"""Audit events as DICOM audit messages: the XML of PS3.15 A.5.1, filled in per A.5.2 and A.5.3.

:func:`to_xml` turns one :class:`~safepacs.audit.events.AuditEvent` into an ``AuditMessage`` that
validates against the DICOM Audit Message Schema (PS3.15 A.5.1.1, RELAX NG; the test suite checks
every :class:`~safepacs.audit.events.EventID` against it).  The element tree is built with
:mod:`xml.etree.ElementTree`, never from strings, and every value is first stripped of the
characters XML 1.0 cannot carry, so no user name, AE title or query can break the message.

Choices the standard leaves open or that the schema forces:

* Codes are ``csd-code`` + ``codeSystemName`` + ``originalText`` (and ``displayName``): DCM codes of
  PS3.16 CID 400-404, or the RFC 3881 ParticipantObjectIDTypeCodes with ``codeSystemName="RFC-3881"``.
* The schema requires a ``ParticipantObjectName`` or a ``ParticipantObjectQuery`` on every object;
  an object without a name (a study, a patient whose name is not known) repeats its ID as the name.
* Only the first requestor is marked ``UserIsRequestor="true"`` (A.5.2: "shall not identify multiple
  participants as UserIsRequestor").  An event without participants names the audit source itself.
* ``AlternativeUserID`` of a DICOM participant is ``AETITLES=<ae>`` (A.5.2.2).
  ``NetworkAccessPointTypeCode`` is 2 for an IP address, 1 for a host name (A.5.2.4).
* The TLS certificate fingerprint and the user agent of a participant have no field in A.5.1; they
  stay in the local trail (``safepacs audit query``) and are not in the exported message.
* A Security Alert's objects always carry the "Alert Description" detail A.5.3.11 requires.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC

from safepacs.audit.events import AuditEvent, AuditObject, EventID, ObjectKind, Participant

__all__ = ["AuditSource", "to_element", "to_xml"]

DCM = "DCM"
RFC3881 = "RFC-3881"

#: PS3.16 CID 402 "Audit Active Participant Role ID": role name -> code.
ROLE_CODES = {
    "Application": "110150",
    "Application Launcher": "110151",
    "Destination Role ID": "110152",
    "Source Role ID": "110153",
    "Destination Media": "110154",
    "Source Media": "110155",
}


@dataclass(frozen=True)
class _ObjectType:
    type_code: str  # ParticipantObjectTypeCode: 1 Person, 2 System Object
    role: str | None  # ParticipantObjectTypeCodeRole (A.5.2.6)
    id_type: tuple[str, str, str]  # ParticipantObjectIDTypeCode (code, code system, meaning)


#: How each kind of object is identified (PS3.15 A.5.3 tables; RFC 3881 5.5.4 for the RFC-3881 codes).
OBJECT_TYPES = {
    ObjectKind.PATIENT: _ObjectType("1", "1", ("2", RFC3881, "Patient Number")),
    ObjectKind.STUDY: _ObjectType("2", "3", ("110180", DCM, "Study Instance UID")),
    ObjectKind.QUERY: _ObjectType("2", "3", ("110181", DCM, "SOP Class UID")),
    ObjectKind.NODE: _ObjectType("2", None, ("110182", DCM, "Node ID")),
    ObjectKind.ACCOUNT: _ObjectType("2", "11", ("11", RFC3881, "User Identifier")),
    ObjectKind.AUDIT_LOG: _ObjectType("2", "13", ("12", RFC3881, "URI")),
}

AUDIT_LOG_NAME = "Security Audit Log"  # ParticipantObjectName of the audit log (A.5.3.2)
ALERT_DESCRIPTION = "Alert Description"  # the detail every Security Alert object carries (A.5.3.11)

# XML 1.0 "Char": anything else (NUL, most C0 controls, lone surrogates, U+FFFE/U+FFFF) is replaced.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: the archive that detected the events (PS3.15 A.5.2)."""

    source_id: str  # AuditSourceID: the archive's AE title (or host name)
    site_id: str | None = None  # AuditEnterpriseSiteID, e.g. the hospital
    type_code: str = "4"  # AuditSourceTypeCode: 4 = application server process (A.5.1.2.1)


def _text(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _b64(value: str) -> str:
    return base64.b64encode(value.encode("utf-8", "surrogatepass")).decode("ascii")


def _coded(parent: ET.Element, tag: str, code: str, system: str, meaning: str) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {
            "csd-code": _text(code),
            "codeSystemName": system,
            "displayName": _text(meaning),
            "originalText": _text(meaning),
        },
    )


def _access_point_type(address: str) -> str:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"  # machine name, including DNS name
    return "2"  # IP address


def _participant(parent: ET.Element, p: Participant, requestor: bool) -> None:
    attrs = {"UserID": _text(p.user_id), "UserIsRequestor": "true" if requestor else "false"}
    if p.ae_title:
        attrs["AlternativeUserID"] = _text(f"AETITLES={p.ae_title}")
    if p.user_name:
        attrs["UserName"] = _text(p.user_name)
    if p.address:
        attrs["NetworkAccessPointID"] = _text(p.address)
        attrs["NetworkAccessPointTypeCode"] = _access_point_type(p.address)
    node = ET.SubElement(parent, "ActiveParticipant", attrs)
    if p.role in ROLE_CODES:
        _coded(node, "RoleIDCode", ROLE_CODES[p.role], DCM, p.role)


def _object(parent: ET.Element, event: AuditEvent, o: AuditObject) -> None:
    kind = OBJECT_TYPES[o.kind]
    attrs = {"ParticipantObjectID": _text(o.id), "ParticipantObjectTypeCode": kind.type_code}
    if kind.role is not None:
        attrs["ParticipantObjectTypeCodeRole"] = kind.role
    node = ET.SubElement(parent, "ParticipantObjectIdentification", attrs)
    _coded(node, "ParticipantObjectIDTypeCode", *kind.id_type)
    details = list(o.detail)
    if o.kind is ObjectKind.QUERY:
        ET.SubElement(node, "ParticipantObjectQuery").text = _b64(o.query or "")
    else:
        default = AUDIT_LOG_NAME if o.kind is ObjectKind.AUDIT_LOG else o.id
        ET.SubElement(node, "ParticipantObjectName").text = _text(o.name or default)
        if o.query:
            details.append(("Query", o.query))
    if event.event_id is EventID.SECURITY_ALERT and all(t != ALERT_DESCRIPTION for t, _ in details):
        why = event.outcome_description or (event.type_code[1] if event.type_code else "")
        details.append((ALERT_DESCRIPTION, why or event.event_id.display))
    for kind_of_detail, value in details:
        ET.SubElement(node, "ParticipantObjectDetail", {"type": _text(kind_of_detail), "value": _b64(value)})
    if o.sop_classes:
        description = ET.SubElement(node, "ParticipantObjectDescription")
        for uid, count in o.sop_classes:
            ET.SubElement(description, "SOPClass", {"UID": _text(uid), "NumberOfInstances": str(int(count))})


def to_element(event: AuditEvent, source: AuditSource) -> ET.Element:
    """The ``AuditMessage`` element of ``event`` as reported by ``source``."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action.value,
            "EventDateTime": event.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "EventOutcomeIndicator": str(int(event.outcome)),
        },
    )
    _coded(ident, "EventID", event.event_id.code, DCM, event.event_id.display)
    if event.type_code:
        _coded(ident, "EventTypeCode", event.type_code[0], DCM, event.type_code[1])
    if event.outcome_description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _text(event.outcome_description)

    participants = event.participants or (Participant(source.source_id, False, "Application"),)
    first = next((i for i, p in enumerate(participants) if p.requestor), None)
    for i, p in enumerate(participants):
        _participant(root, p, i == first)

    src = {"AuditSourceID": _text(source.source_id)}
    if source.site_id:
        src["AuditEnterpriseSiteID"] = _text(source.site_id)
    audit_source = ET.SubElement(root, "AuditSourceIdentification", src)
    ET.SubElement(audit_source, "AuditSourceTypeCode", {"csd-code": source.type_code})

    for o in event.objects:
        _object(root, event, o)
    return root


def to_xml(event: AuditEvent, source: AuditSource) -> bytes:
    """The audit message as UTF-8 XML with an XML declaration."""
    data: bytes = ET.tostring(to_element(event, source), encoding="utf-8", xml_declaration=True)
    return data
