"""Every access path records the events it should, before it answers, with who, from where and what.

DIMSE paths against a running ``safepacs serve`` with pynetdicom and DCMTK peers; DICOMweb and the
session API in-process on a real data directory; the CLI as a user types it.  Events are read back
from the trail with :class:`tests.support.audit_capture.AuditCapture`, as ``safepacs audit query`` would.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from lxml import etree
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from safepacs.app import Repositories
from safepacs.audit import Action, AuditEvent, EventID, ObjectKind, Outcome
from safepacs.audit.xml import AuditSource, to_xml
from tests.support import auditxml
from tests.support.audit_capture import AuditCapture
from tests.support.auditxml import _assert_valid
from tests.support.corpus import make_ct
from tests.support.dicom_client import associate, c_find, c_get, c_move, rejection
from tests.support.server import Server, run_cli, start_server
from tests.support.webapp import PASSWORD, add_user, execute, inprocess, multipart, part10

pytestmark = pytest.mark.dcmtk
schema = auditxml.schema  # the standard's RELAX NG schema, compiled once per module

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
AGENT = "pytest-viewer/1.0"
DENY_AUDIT = sa.text(
    "CREATE TRIGGER deny_audit BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'disk full'); END"
)


def _one(events: list[AuditEvent], event_id: EventID, type_code: str | None = None) -> AuditEvent:
    found = [
        e for e in events if e.event_id is event_id and (type_code is None or e.type_code[0] == type_code)
    ]  # type: ignore[index]
    assert len(found) == 1, [(e.event_id, e.type_code, e.outcome_description) for e in events]
    return found[0]


def _wait(capture: AuditCapture, event_id: EventID, timeout: float = 10.0) -> AuditEvent:
    """The one event of ``event_id`` once it is recorded (by a thread that runs after the answer)."""
    deadline = time.monotonic() + timeout
    while not (found := capture.events(event_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) == 1, found
    return found[0]


def _requestor(event: AuditEvent) -> tuple[str, str | None]:
    (who,) = [p for p in event.participants if p.requestor]
    return who.user_id, who.address


def _objects(event: AuditEvent, kind: ObjectKind) -> list[str]:
    return [o.id for o in event.objects if o.kind is kind]


def _find(patient_id: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = ""
    return ds


def test_dimse_paths_record_who_did_what_to_which_patient_from_where(
    srv: Server, repos: Repositories, tmp_path: Path
) -> None:
    started = AuditCapture(repos.audit_log)
    started.start = 0
    start = _one(started.events(), EventID.APPLICATION_ACTIVITY)
    assert start.type_code == ("110120", "Application Start")

    srv.add_peer("MOD", "echo,store,find,get,move")
    capture = AuditCapture(repos.audit_log)
    ct = make_ct(patient_id="AUD-1", patient_name="Audit^Alice")
    with associate(srv.port, [build_context(CTImageStorage)], calling="MOD") as assoc:
        assert assoc.send_c_store(ct).Status == 0x0000
        assert assoc.send_c_store(ct).Status == 0x0000  # again: stored already, counted in the summary
    summary = _wait(capture, EventID.INSTANCES_TRANSFERRED)  # recorded when the association closes
    events = capture.events()
    accepted = _one(events, EventID.SECURITY_ALERT, "110126")
    assert accepted.outcome is Outcome.SUCCESS and _requestor(accepted) == ("MOD", "127.0.0.1")
    assert {("Transport", "plain TCP"), ("Called AE Title", "SAFEPACS")} <= set(accepted.objects[0].detail)
    # The first instance of the study is recorded as it is stored; the association's end sums up.
    stored = _one(events, EventID.INSTANCES_ACCESSED)
    assert (stored.action, stored.outcome) == (Action.CREATE, Outcome.SUCCESS)
    assert _requestor(stored) == ("MOD", "127.0.0.1")
    assert _objects(stored, ObjectKind.PATIENT) == ["AUD-1"]
    assert _objects(stored, ObjectKind.STUDY) == [str(ct.StudyInstanceUID)]
    study = next(o for o in stored.objects if o.kind is ObjectKind.STUDY)
    assert study.sop_classes == ((CT, 1),)
    assert [o.name for o in stored.objects if o.kind is ObjectKind.PATIENT] == ["Audit^Alice"]
    assert (summary.action, summary.outcome) == (Action.CREATE, Outcome.SUCCESS)
    total = next(o for o in summary.objects if o.kind is ObjectKind.STUDY)
    assert total.sop_classes == ((CT, 2),) and _objects(summary, ObjectKind.PATIENT) == ["AUD-1"]
    assert summary.outcome_description == "instances received: 1 duplicate, 1 stored"

    capture.reset()
    results, final = c_find(srv.port, _find("AUD-1"), calling="MOD")
    assert len(results) == 1 and final.Status == 0
    query = _one(capture.events(), EventID.QUERY)
    assert query.action is Action.EXECUTE and _requestor(query) == ("MOD", "127.0.0.1")
    (asked,) = [o for o in query.objects if o.kind is ObjectKind.QUERY]
    assert asked.id == STUDY_FIND and ("Results", "1") in asked.detail
    assert json.loads(asked.query or "")["00100020"]["Value"] == ["AUD-1"]
    assert _objects(query, ObjectKind.PATIENT) == ["AUD-1"]

    capture.reset()
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ct.StudyInstanceUID
    received, final = c_get(srv.port, ident, [(CT, ["1.2.840.10008.1.2.1"])], calling="MOD")
    assert len(received) == 1 and final.Status == 0
    got = _one(capture.events(), EventID.INSTANCES_TRANSFERRED)
    assert got.action is Action.READ and _objects(got, ObjectKind.PATIENT) == ["AUD-1"]
    roles = {p.user_id: (p.role, p.requestor) for p in got.participants}
    assert roles == {"SAFEPACS": ("Source Role ID", False), "MOD": ("Destination Role ID", True)}

    # C-MOVE to a registered storescp: Begin Transferring, naming the destination node.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        scp_port = probe.getsockname()[1]
    srv.add_peer("DEST", "echo", port=scp_port)
    moved = tmp_path / "moved"
    moved.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "DEST", "-od", str(moved), str(scp_port)])
    try:
        time.sleep(0.5)
        capture.reset()
        assert c_move(srv.port, ident, "DEST", calling="MOD").Status == 0
        move = _one(capture.events(), EventID.BEGIN_TRANSFERRING)
        assert {p.user_id for p in move.participants} == {"SAFEPACS", "MOD", "DEST"}
        assert [p.address for p in move.participants if p.user_id == "DEST"] == ["127.0.0.1"]
        capture.reset()
        assert c_move(srv.port, ident, "NOWHERE", calling="MOD").Status == 0xA801
        refused = _one(capture.events(), EventID.SECURITY_ALERT, "110132")
        assert refused.outcome is Outcome.MINOR_FAILURE and _objects(refused, ObjectKind.NODE) == ["NOWHERE"]
    finally:
        scp.terminate()
        scp.wait(10)

    # A stranger's association: rejected, and the rejection is on the trail.
    capture.reset()
    with associate(srv.port, [build_context(CTImageStorage)], calling="STRANGER") as assoc:
        assert not assoc.is_established and rejection(assoc) == (1, 1, 3)
    rejected = _one(capture.events(), EventID.SECURITY_ALERT, "110126")
    assert rejected.outcome is Outcome.MINOR_FAILURE and _requestor(rejected) == ("STRANGER", "127.0.0.1")
    assert rejected.outcome_description == "calling AE title not registered"

    assert srv.stop() == 0
    stop = started.events(EventID.APPLICATION_ACTIVITY)[-1]
    assert stop.type_code == ("110121", "Application Stop")
    assert (
        repos.audit_log.audit_checkpoints()[-1].seq == repos.audit_log.audit_records(0, 10**6)[-1].seq
    )  # signed at stop
    assert run_cli("audit", "verify", "--data", str(srv.data)) == 0


def test_an_access_that_cannot_be_recorded_is_refused(
    srv: Server, repos: Repositories, data_dir: Path
) -> None:
    srv.add_peer("MOD", "echo,store,find")
    contexts = [build_context(CTImageStorage), build_context(StudyRootQueryRetrieveInformationModelFind)]
    stored = make_ct(patient_id="AUD-2")
    with associate(srv.port, contexts, calling="MOD") as assoc:
        assert assoc.send_c_store(stored).Status == 0x0000
        execute(data_dir, DENY_AUDIT)  # the audit store can no longer write
        found = list(assoc.send_c_find(_find("AUD-2"), StudyRootQueryRetrieveInformationModelFind))
        assert [int(s.Status) for s, _ in found] == [0xA700]  # no match was sent
        assert "audit trail" in str(found[0][0].ErrorComment)
        refused_store = assoc.send_c_store(make_ct(patient_id="AUD-3"))
        assert refused_store.Status == 0xA700 and "audit trail" in str(refused_store.ErrorComment)
    assert repos.instances.count_instances() == 1  # the refused instance was not kept
    with associate(srv.port, contexts, calling="MOD") as refused:
        assert not refused.is_established and rejection(refused) == (2, 1, 1)  # rejected-transient

    execute(data_dir, sa.text("DROP TRIGGER deny_audit"))
    results, final = c_find(srv.port, _find("AUD-2"), calling="MOD")
    assert len(results) == 1 and final.Status == 0


def test_dicomweb_and_sessions_record_user_address_and_user_agent(
    data_dir: Path,
    repos: Repositories,
    capsys: pytest.CaptureFixture[str],
    schema: etree.RelaxNG,
) -> None:
    ct = make_ct(patient_id="WEB-1", patient_name="Web^Wendy")
    study = str(ct.StudyInstanceUID)
    with inprocess(data_dir) as (client, archive):
        add_user(archive, "rad", "radiologist")
        add_user(archive, "boss", "admin")
        add_user(archive, "aud", "auditor")
        tokens = {name: _token(data_dir, name, capsys) for name in ("rad", "boss", "aud")}

        def call(method: str, url: str, user: str | None, **kwargs: object) -> httpx.Response:
            headers = {"User-Agent": AGENT, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
            if user is not None:
                headers["Authorization"] = f"Bearer {tokens.get(user, user)}"
            return client.request(method, url, headers=headers, **kwargs)  # type: ignore[arg-type]

        capture = AuditCapture(repos.audit_log)
        body, content_type = multipart([part10(ct)])
        assert (
            call(
                "POST", "/dicomweb/studies", "rad", content=body, headers={"Content-Type": content_type}
            ).status_code
            == 200
        )
        stow = _one(capture.events(), EventID.INSTANCES_ACCESSED)
        assert stow.action is Action.CREATE and _objects(stow, ObjectKind.PATIENT) == ["WEB-1"]
        request = _one(capture.events(), EventID.INSTANCES_TRANSFERRED)  # the request's summary
        assert request.outcome_description == "instances received: 1 stored"
        (who,) = [p for p in stow.participants if p.requestor]
        assert (who.user_id, who.address, who.user_agent) == ("rad", "127.0.0.1", AGENT)

        capture.reset()
        assert call("GET", "/dicomweb/studies?PatientID=WEB-1", "rad").status_code == 200
        qido = _one(capture.events(), EventID.QUERY)
        (asked,) = [o for o in qido.objects if o.kind is ObjectKind.QUERY]
        assert asked.id == "QIDO-RS" and ("Results", "1") in asked.detail
        assert _objects(qido, ObjectKind.PATIENT) == ["WEB-1"]

        capture.reset()
        assert call("GET", f"/dicomweb/studies/{study}", "rad").status_code == 200
        assert call("GET", f"/dicomweb/studies/{study}/metadata", "rad").status_code == 200
        transferred, accessed = capture.events()
        assert (transferred.event_id, transferred.action) == (EventID.INSTANCES_TRANSFERRED, Action.READ)
        assert (accessed.event_id, accessed.action) == (EventID.INSTANCES_ACCESSED, Action.READ)
        assert _objects(transferred, ObjectKind.STUDY) == [study] == _objects(accessed, ObjectKind.STUDY)

        capture.reset()
        jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
        assert call("GET", f"/dicomweb/studies/{study}", "rad", headers={"Accept": jpeg}).status_code == 406
        assert capture.events() == []  # refused before anything went out: no transfer recorded

        capture.reset()
        assert call("GET", "/dicomweb/studies/1.2.3.999", "rad").status_code == 404
        missed = _one(capture.events(), EventID.INSTANCES_TRANSFERRED)
        assert missed.outcome is Outcome.MINOR_FAILURE and _objects(missed, ObjectKind.STUDY) == ["1.2.3.999"]

        capture.reset()
        assert call("DELETE", f"/dicomweb/studies/{study}", "rad").status_code == 404  # not allowed
        assert _one(capture.events(), EventID.SECURITY_ALERT, "110132").outcome is Outcome.MINOR_FAILURE
        capture.reset()
        assert call("DELETE", f"/dicomweb/studies/{study}", "boss").status_code == 204
        deleted = _one(capture.events(), EventID.STUDY_DELETED)
        assert deleted.action is Action.DELETE and _objects(deleted, ObjectKind.PATIENT) == ["WEB-1"]
        capture.reset()
        assert run_cli("restore", study, "--data", str(data_dir)) == 0
        restored = _one(capture.events(), EventID.INSTANCES_ACCESSED)
        assert restored.action is Action.UPDATE and _objects(restored, ObjectKind.PATIENT) == ["WEB-1"]
        assert restored.participants[0].role == "Application Launcher"  # the operator who ran it

        capture.reset()
        assert call("GET", "/dicomweb/studies", "spat_not-a-real-token").status_code == 401
        failed = _one(capture.events(), EventID.USER_AUTHENTICATION)
        assert failed.outcome is Outcome.MINOR_FAILURE and failed.type_code == ("110122", "Login")

        capture.reset()
        assert client.post("/api/session", json={"username": "rad", "password": "wrong"}).status_code == 401
        login = client.post(
            "/api/session", json={"username": "rad", "password": PASSWORD}, headers={"User-Agent": AGENT}
        )
        assert login.status_code == 200
        cookie = login.headers["set-cookie"].split(";")[0]
        headers = {"Cookie": cookie, "X-CSRF-Token": login.json()["csrf_token"]}
        assert client.delete("/api/session", headers=headers).status_code == 204
        bad, good, out = capture.events(EventID.USER_AUTHENTICATION)
        assert (bad.outcome, good.outcome, out.outcome) == (
            Outcome.MINOR_FAILURE,
            Outcome.SUCCESS,
            Outcome.SUCCESS,
        )
        assert [_requestor(e)[0] for e in (bad, good, out)] == ["rad"] * 3
        assert out.type_code == ("110123", "Logout")

        capture.reset()
        rows = call("GET", "/api/audit?patient=WEB-1", "aud")
        assert rows.status_code == 200 and {r["event"][:6] for r in rows.json()} >= {
            "110103",
            "110112",
            "110105",
        }
        assert _one(capture.events(), EventID.AUDIT_LOG_USED).action is Action.READ

        # Every event of every path is a valid DICOM PS3.15 A.5.1 audit message.
        capture.start = 0
        every = capture.events()
        assert len({e.event_id for e in every}) >= 6
        for event in every:
            _assert_valid(schema, to_xml(event, AuditSource("SAFEPACS")))

        # Fail closed on every path: nothing is answered, stored, deleted or changed unrecorded.
        kept = make_ct(patient_id="WEB-2")
        body, content_type = multipart([part10(kept)])
        headers = {"Content-Type": content_type}
        assert call("POST", "/dicomweb/studies", "rad", content=body, headers=headers).status_code == 200
        add_user(archive, "newbie", "radiologist", must_change=True)
        login = client.post("/api/session", json={"username": "rad", "password": PASSWORD})
        session = {
            "Cookie": login.headers["set-cookie"].split(";")[0],
            "X-CSRF-Token": login.json()["csrf_token"],
        }
        execute(data_dir, DENY_AUDIT)
        refused = call("GET", "/dicomweb/studies", "rad")
        assert refused.status_code == 503 and "audit" in refused.json()["detail"]
        assert refused.headers["retry-after"]
        other = make_ct(patient_id="WEB-3")
        body, content_type = multipart([part10(other)])
        headers = {"Content-Type": content_type}
        assert call("POST", "/dicomweb/studies", "rad", content=body, headers=headers).status_code == 503
        assert archive.instances.get_instance(str(other.SOPInstanceUID)) is None
        assert call("DELETE", f"/dicomweb/studies/{kept.StudyInstanceUID}", "boss").status_code == 503
        assert archive.instances.get_instance(str(kept.SOPInstanceUID)) is not None
        change = {"username": "newbie", "password": PASSWORD, "new_password": "a brand new passphrase"}
        assert client.post("/api/session/password", json=change).status_code == 503
        assert client.delete("/api/session", headers=session).status_code == 204  # a session still ends
        assert client.get("/api/session", headers=session).status_code in (401, 503)
        execute(data_dir, sa.text("DROP TRIGGER deny_audit"))
        assert client.get("/api/session", headers=session).status_code == 401  # it did end
        still = {"username": "newbie", "password": "a brand new passphrase"}
        assert client.post("/api/session", json=still).status_code == 401  # the change was not made


def _token(data: Path, user: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert run_cli("token", "create", "--user", user, "--data", str(data)) == 0
    return capsys.readouterr().out.strip()


def test_administrative_changes_on_the_command_line_are_recorded(data_dir: Path, repos: Repositories) -> None:
    capture = AuditCapture(repos.audit_log)
    data = ("--data", str(data_dir))
    assert (
        run_cli("peer", "add", "CT1", "--host", "127.0.0.1", "--allow", "store", "--tls", "off", *data) == 0
    )
    assert run_cli("user", "add", "eve", "--role", "radiologist", *data) == 0
    assert run_cli("access", "grant", "1.2.3.4", "--user", "eve", *data) == 0
    assert run_cli("user", "disable", "eve", *data) == 0
    assert run_cli("peer", "list", *data) == 0  # reading changes nothing: no event
    assert run_cli("peer", "remove", "CT1", *data) == 0
    events = capture.events(EventID.SECURITY_ALERT)
    assert [(e.type_code[0], e.objects[0].id) for e in events] == [  # type: ignore[index]
        ("110129", "CT1"),
        ("110136", "eve"),
        ("110137", "eve"),
        ("110137", "eve"),
        ("110129", "CT1"),
    ]
    assert all(
        e.participants[0].requestor and e.participants[0].role == "Application Launcher" for e in events
    )
    assert events[0].outcome_description is not None and "peer add CT1" in events[0].outcome_description


def test_with_recording_off_only_the_gap_is_recorded(data_dir: Path, repos: Repositories) -> None:
    server = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_AUDIT__RECORD": "false"})
    try:
        server.add_peer("MOD", "echo,find")
        capture = AuditCapture(repos.audit_log)
        assert c_find(server.port, _find("X"), calling="MOD")[1].Status == 0
        assert capture.events() == []
    finally:
        server.stop()
    capture.start = 0
    types = [e.type_code[0] for e in capture.events() if e.type_code]
    assert types[:1] == ["110120"] and "110133" in types and types[-1] == "110121"
