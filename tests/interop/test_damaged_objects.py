"""A stored object altered on disk (one flipped byte in its encrypted file): never served, recorded as
a Security Alert naming it and as a failed retrieval, and reported to the client on every path -
WADO-RS (an error answer, or an answer cut short), C-GET and C-MOVE (a failed sub-operation, the others
delivered, a clean release) - with real servers, real DCMTK peers and the real audit trail."""

from __future__ import annotations

import socket
import sqlite3
import ssl
import subprocess
import time
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage

from safepacs.app import Repositories
from safepacs.audit.events import AuditEvent, EventID, ObjectKind, Outcome
from safepacs.audit.xml import AuditSource, to_xml
from tests.support import auditxml
from tests.support.audit_capture import AuditCapture
from tests.support.auditxml import _assert_valid
from tests.support.corpus import make_ct
from tests.support.dicom_client import c_get, store_files
from tests.support.server import Server, dcmtk, run_cli

pytestmark = pytest.mark.dcmtk
schema = auditxml.schema  # the standard's RELAX NG schema, compiled once per module

DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _study(srv: Server, tmp_path: Path, n: int = 3) -> tuple[str, str, list[Dataset]]:
    """A study of ``n`` small CT instances in one series, stored over C-STORE; the datasets in the order
    the archive hands them out."""
    study, series = generate_uid(), generate_uid()
    datasets = [
        make_ct(16, 16, study_uid=study, series_uid=series, patient_id="DMG-1", instance_number=i + 1)
        for i in range(n)
    ]
    paths = []
    for i, ds in enumerate(datasets):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    srv.add_peer("CT1", "echo,store")
    assert set(store_files(srv.port, paths, calling="CT1").values()) == {0x0000}
    db = sqlite3.connect(srv.data / "index.sqlite3")
    try:
        order = [uid for (uid,) in db.execute("SELECT sop_instance_uid FROM instances ORDER BY pk")]
    finally:
        db.close()
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    return study, series, [by_uid[uid] for uid in order]


def _damage(srv: Server, ds: Dataset) -> None:
    """Flip one byte in the middle of the instance's encrypted object (its GCM ciphertext)."""
    db = sqlite3.connect(srv.data / "index.sqlite3")
    try:
        (blob,) = db.execute(
            "SELECT blob_id FROM instances WHERE sop_instance_uid = ?", (str(ds.SOPInstanceUID),)
        ).fetchone()
    finally:
        db.close()
    path = srv.data / "objects" / blob[:2] / blob
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _token(srv: Server, capsys: pytest.CaptureFixture[str]) -> str:
    assert run_cli("user", "add", "rad", "--role", "radiologist", "--data", str(srv.data)) == 0
    assert run_cli("token", "create", "--user", "rad", "--data", str(srv.data)) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def _client(srv: Server, token: str) -> httpx.Client:
    verify = ssl.create_default_context(cafile=str(srv.ca_file))
    return httpx.Client(
        base_url=srv.base_url, verify=verify, headers={"Authorization": f"Bearer {token}"}, timeout=20
    )


def _instance_details(event: AuditEvent) -> dict[str, str]:
    (study,) = [o for o in event.objects if o.kind is ObjectKind.STUDY]
    return dict(study.detail)


def _assert_recorded_as_damaged(
    events: list[AuditEvent], damaged: Dataset, retrieval: EventID
) -> tuple[AuditEvent, AuditEvent]:
    """The Security Alert naming the damaged instance, and the retrieval's failure for it."""
    # (an accepted association is a Security Alert too: 110126 Node Authentication)
    (alert,) = [e for e in events if e.event_id is EventID.SECURITY_ALERT and e.type_code is None]
    assert alert.outcome is Outcome.SERIOUS_FAILURE
    assert alert.study_uids == (str(damaged.StudyInstanceUID),) and alert.patient_ids == ("DMG-1",)
    details = _instance_details(alert)
    assert details["SOP Instance UID"] == str(damaged.SOPInstanceUID)
    assert details["Series Instance UID"] == str(damaged.SeriesInstanceUID)
    assert "integrity check" in details["Alert Description"]
    (failed,) = [e for e in events if e.event_id is retrieval and e.outcome is not Outcome.SUCCESS]
    assert failed.outcome is Outcome.SERIOUS_FAILURE
    assert _instance_details(failed)["SOP Instance UID"] == str(damaged.SOPInstanceUID)
    (study,) = [o for o in failed.objects if o.kind is ObjectKind.STUDY]
    assert study.sop_classes == ((CTImageStorage, 1),)
    return alert, failed


def _read_cut_short(
    client: httpx.Client, url: str, accept: str = DICOM_ACCEPT
) -> tuple[int, bytes, Exception | None]:
    """Status, the body bytes that arrived, and the error that ended the body (None: it ended well)."""
    got = bytearray()
    with client.stream("GET", url, headers={"Accept": accept}) as r:
        try:
            for chunk in r.iter_raw():
                got += chunk
        except httpx.HTTPError as exc:
            return r.status_code, bytes(got), exc
        return r.status_code, bytes(got), None


def _part_uids(body: bytes) -> list[str]:
    out = []
    for chunk in body.split(b"\r\n\r\n")[1:]:
        if chunk[128:132] == b"DICM":
            out.append(str(pydicom.dcmread(BytesIO(chunk), stop_before_pixels=True).SOPInstanceUID))
    return out


def test_wado_rs_answers_an_error_for_a_damaged_object_and_records_it(
    srv: Server,
    tmp_path: Path,
    repos: Repositories,
    capsys: pytest.CaptureFixture[str],
    schema: etree.RelaxNG,
) -> None:
    study, series, (first, second, third) = _study(srv, tmp_path)
    _damage(srv, second)
    token = _token(srv, capsys)
    base = f"/dicomweb/studies/{study}/series/{series}/instances"
    with _client(srv, token) as client:
        # Instance level: a 500 problem before any part, and no transfer recorded as done.
        capture = AuditCapture(repos.audit_log)
        r = client.get(f"{base}/{second.SOPInstanceUID}", headers={"Accept": DICOM_ACCEPT})
        assert r.status_code == 500
        assert r.headers["content-type"] == "application/problem+json"
        assert "integrity" in r.json()["detail"] and "Traceback" not in r.text
        events = capture.events()
        for event in _assert_recorded_as_damaged(events, second, EventID.INSTANCES_TRANSFERRED):
            _assert_valid(schema, to_xml(event, AuditSource("SAFEPACS")))  # valid PS3.15 A.5.1 messages
        assert [e for e in events if e.outcome is Outcome.SUCCESS] == []

        # Every other way to the same object: an error too, and each read recorded.
        for url in (
            f"{base}/{second.SOPInstanceUID}/metadata",
            f"{base}/{second.SOPInstanceUID}/rendered",
            f"{base}/{second.SOPInstanceUID}/frames/1",
            f"/dicomweb/studies/{study}/metadata",
            f"/dicomweb/wado?requestType=WADO&studyUID={study}&seriesUID={series}"
            f"&objectUID={second.SOPInstanceUID}&contentType=application/dicom",
        ):
            capture.reset()
            r = client.get(url)
            assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json", url
            _assert_recorded_as_damaged(
                capture.events(),
                second,
                EventID.INSTANCES_ACCESSED if "wado?" not in url else EventID.INSTANCES_TRANSFERRED,
            )

        # Study level, damaged in the middle: the intact instances are sent, then the answer is cut
        # short (no closing delimiter, the body short of its Content-Length): the client sees an error.
        capture.reset()
        status, body, error = _read_cut_short(client, f"/dicomweb/studies/{study}")
        assert status == 200 and isinstance(error, httpx.RemoteProtocolError), error
        assert _part_uids(body) == [str(first.SOPInstanceUID), str(third.SOPInstanceUID)]
        assert not body.rstrip().endswith(b"--")
        _assert_recorded_as_damaged(capture.events(), second, EventID.INSTANCES_TRANSFERRED)
        # The study rendered: the same.
        capture.reset()
        jpeg = 'multipart/related; type="image/jpeg"'
        status, body, error = _read_cut_short(client, f"/dicomweb/studies/{study}/rendered", jpeg)
        assert status == 200 and isinstance(error, httpx.RemoteProtocolError), error
        assert body.count(b"Content-Type: image/jpeg") == 2
        _assert_recorded_as_damaged(capture.events(), second, EventID.INSTANCES_ACCESSED)

        # Damaged first: known before the answer begins, so the answer is a 500 problem.
        _damage(srv, first)
        r = client.get(f"/dicomweb/studies/{study}", headers={"Accept": DICOM_ACCEPT})
        assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
        # The intact instance is still served, and completely.
        status, body, error = _read_cut_short(client, f"{base}/{third.SOPInstanceUID}")
        assert (status, error) == (200, None) and _part_uids(body) == [str(third.SOPInstanceUID)]
    deadline = time.monotonic() + 10  # the server's log is read by a thread of its own
    while "a multipart answer was cut short" not in srv.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = srv.stderr_text()
    assert "a multipart answer was cut short" in log and "Traceback" not in log


def test_c_get_of_a_study_with_a_damaged_object_fails_that_one_and_releases_cleanly(
    srv: Server, tmp_path: Path, repos: Repositories
) -> None:
    study, _, (first, second, third) = _study(srv, tmp_path)
    _damage(srv, second)
    srv.add_peer("VIEWER", "echo,find,get,move")
    capture = AuditCapture(repos.audit_log)
    out = tmp_path / "get"
    out.mkdir()
    got = dcmtk(
        "getscu", "-v", "-S", "-aet", "VIEWER", "-aec", "SAFEPACS",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "-od", str(out), srv.host, str(srv.port),
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert "Release Failed" not in got.stderr and "DUL" not in got.stderr, got.stderr
    assert "Warning: SubOperationsCompleteOneOrMoreFailures" in got.stderr
    assert "Number of Failed Suboperations    : 1" in got.stderr
    assert "Number of Completed Suboperations : 2" in got.stderr
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}
    assert received == {str(first.SOPInstanceUID), str(third.SOPInstanceUID)}
    events = capture.events()
    _assert_recorded_as_damaged(events, second, EventID.INSTANCES_TRANSFERRED)

    # pynetdicom reads the final response's identifier: 0xB000 naming the instance that failed.
    capture.reset()
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    received_bytes, final = c_get(srv.port, ident, [(CTImageStorage, [first.file_meta.TransferSyntaxUID])])
    assert final.Status == 0xB000 and final.NumberOfFailedSuboperations == 1
    assert final["FailedSOPInstanceUIDList"].VM == 1
    assert final.FailedSOPInstanceUIDList == str(second.SOPInstanceUID)
    assert set(received_bytes) == {str(first.SOPInstanceUID), str(third.SOPInstanceUID)}
    _assert_recorded_as_damaged(capture.events(), second, EventID.INSTANCES_TRANSFERRED)

    # Only the damaged instance asked for: all sub-operations failed (0xA702), nothing recorded as sent.
    capture.reset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.SeriesInstanceUID = second.SeriesInstanceUID
    ident.SOPInstanceUID = second.SOPInstanceUID
    received_bytes, final = c_get(srv.port, ident, [(CTImageStorage, [first.file_meta.TransferSyntaxUID])])
    assert final.Status == 0xA702 and received_bytes == {}
    events = capture.events()
    _assert_recorded_as_damaged(events, second, EventID.INSTANCES_TRANSFERRED)
    assert [
        e for e in events if e.event_id is EventID.INSTANCES_TRANSFERRED and e.outcome is Outcome.SUCCESS
    ] == []


def test_c_move_of_a_study_with_a_damaged_object_moves_the_others_and_records_it(
    srv: Server, tmp_path: Path, repos: Repositories
) -> None:
    study, _, (first, second, third) = _study(srv, tmp_path)
    _damage(srv, first)
    srv.add_peer("VIEWER", "echo,find,get,move")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        scp_port = probe.getsockname()[1]
    srv.add_peer("ARCHIVE2", "echo", port=scp_port)
    moved = tmp_path / "moved"
    moved.mkdir()
    capture = AuditCapture(repos.audit_log)
    scp = subprocess.Popen(
        ["storescp", "-aet", "ARCHIVE2", "-od", str(moved), str(scp_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        mv = dcmtk(
            "movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "SAFEPACS", "-aem", "ARCHIVE2",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
            srv.host, str(srv.port),
        )  # fmt: skip
    finally:
        scp.terminate()
        scp.wait(10)
    # movescu exits non-zero for a final Warning status (68 in DCMTK 3.6.7); the release is clean.
    assert mv.returncode != 0 and "Final Move Response (Warning" in mv.stderr, mv.stderr
    assert "Release Failed" not in mv.stderr and "DUL" not in mv.stderr, mv.stderr
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in moved.iterdir()}
    assert received == {str(second.SOPInstanceUID), str(third.SOPInstanceUID)}
    events = capture.events()
    _assert_recorded_as_damaged(events, first, EventID.BEGIN_TRANSFERRING)
    # Recorded as moved: the two instances sent, not the damaged one.
    (begun,) = [
        e for e in events if e.event_id is EventID.BEGIN_TRANSFERRING and e.outcome is Outcome.SUCCESS
    ]
    (moved_study,) = [o for o in begun.objects if o.kind is ObjectKind.STUDY]
    assert moved_study.sop_classes == ((CTImageStorage, 2),)


def test_an_object_missing_from_the_store_is_an_integrity_failure_recorded_as_such(
    srv: Server,
    tmp_path: Path,
    repos: Repositories,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The index names an object that is no longer on disk (deleted by someone with access to the object
    store): answered and recorded exactly like an altered one - never a 200, never a silent gap."""
    study, series, (first, second, _third) = _study(srv, tmp_path)
    db = sqlite3.connect(srv.data / "index.sqlite3")
    try:
        (blob,) = db.execute(
            "SELECT blob_id FROM instances WHERE sop_instance_uid = ?", (str(second.SOPInstanceUID),)
        ).fetchone()
    finally:
        db.close()
    (srv.data / "objects" / blob[:2] / blob).unlink()
    token = _token(srv, capsys)
    base = f"/dicomweb/studies/{study}/series/{series}/instances"
    with _client(srv, token) as client:
        capture = AuditCapture(repos.audit_log)
        r = client.get(f"{base}/{second.SOPInstanceUID}", headers={"Accept": DICOM_ACCEPT})
        assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
        alert, _failed = _assert_recorded_as_damaged(capture.events(), second, EventID.INSTANCES_TRANSFERRED)
        assert "missing" in _instance_details(alert)["Alert Description"]
        # Retrieved as part of its study: the others are sent and the answer is cut short.
        status, body, error = _read_cut_short(client, f"/dicomweb/studies/{study}")
        assert status == 200 and isinstance(error, httpx.RemoteProtocolError), error
        assert str(first.SOPInstanceUID) in _part_uids(body)
        assert str(second.SOPInstanceUID) not in _part_uids(body)
    assert "Traceback" not in srv.stderr_text()
