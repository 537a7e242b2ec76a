"""Store, find and retrieve over DIMSE against a running server, with DCMTK and pynetdicom peers."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import build_context
from pynetdicom.dimse_messages import C_CANCEL_RQ, C_FIND_RQ
from pynetdicom.dimse_primitives import C_CANCEL, C_FIND
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification
from pynetdicom.transport import AssociationSocket

from tests.support.corpus import make_ct
from tests.support.dicom_client import associate, c_find, c_get, c_move, store_files
from tests.support.server import Server, dcmtk, start_server


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _study(tmp_path: Path, n: int = 3, **kw: str) -> tuple[str, list[Path]]:
    study = generate_uid()
    series = generate_uid()
    paths = [
        _write(make_ct(study_uid=study, series_uid=series, **kw), tmp_path / f"{study[-6:]}-{i}.dcm")
        for i in range(n)
    ]
    return study, paths


def _dataset_bytes(path: Path) -> bytes:
    from safepacs.dicom.transcode import dataset_bytes

    return dataset_bytes(path.read_bytes())[1]


@pytest.mark.dcmtk
def test_dcmtk_store_find_get_move_round_trip(server: Server, tmp_path: Path) -> None:
    server.add_peer("CT1", "echo,store")
    server.add_peer("VIEWER", "echo,find,get,move")
    study, paths = _study(tmp_path, 3, patient_id="RT-1")
    result = dcmtk(
        "storescu", "-aet", "CT1", "-aec", "SAFEPACS", server.host, str(server.port), *map(str, paths)
    )
    assert result.returncode == 0, result.stderr

    found = dcmtk(
        "findscu",
        "-S",
        "-aet",
        "VIEWER",
        "-aec",
        "SAFEPACS",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientID=RT-1",
        "-k",
        "StudyInstanceUID",
        "-k",
        "NumberOfStudyRelatedInstances",
        server.host,
        str(server.port),
    )
    assert found.returncode == 0, found.stderr
    assert study in found.stdout + found.stderr

    out = tmp_path / "get"
    out.mkdir()
    got = dcmtk(
        "getscu",
        "-S",
        "-aet",
        "VIEWER",
        "-aec",
        "SAFEPACS",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "-od",
        str(out),
        server.host,
        str(server.port),
    )
    assert got.returncode == 0, got.stderr
    received = sorted(out.iterdir())
    assert len(received) == 3
    assert {_dataset_bytes(p) for p in received} == {_dataset_bytes(p) for p in paths}

    # C-MOVE to a registered storescp.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        scp_port = probe.getsockname()[1]
    moved = tmp_path / "moved"
    moved.mkdir()
    server.add_peer("ARCHIVE2", "echo", port=scp_port)
    scp = subprocess.Popen(["storescp", "-aet", "ARCHIVE2", "-od", str(moved), str(scp_port)])
    try:
        time.sleep(0.5)
        mv = dcmtk(
            "movescu",
            "-S",
            "-aet",
            "VIEWER",
            "-aec",
            "SAFEPACS",
            "-aem",
            "ARCHIVE2",
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={study}",
            "-k",
            f"SeriesInstanceUID={pydicom.dcmread(paths[0]).SeriesInstanceUID}",
            server.host,
            str(server.port),
        )
        assert mv.returncode == 0, mv.stderr
    finally:
        scp.terminate()
        scp.wait(10)
    assert len(list(moved.iterdir())) == 3


def test_move_to_an_unregistered_destination_is_refused(server: Server, tmp_path: Path) -> None:
    server.add_peer("CT1", "store")
    server.add_peer("VIEWER", "move")
    study, paths = _study(tmp_path, 1)
    assert set(store_files(server.port, paths, calling="CT1").values()) == {0}
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study
    final = c_move(server.port, ds, "EVIL-SCP")
    assert final.Status == 0xA801
    # A registered peer without a port cannot be a destination either.
    final = c_move(server.port, ds, "CT1")
    assert final.Status == 0xA801


def test_c_find_levels_keys_and_character_set(server: Server, tmp_path: Path) -> None:
    server.add_peer("CT1", "store")
    server.add_peer("VIEWER", "find")
    study, paths = _study(tmp_path, 2, patient_id="FIND-1")
    ds0 = pydicom.dcmread(paths[0])
    ds0.PatientName = "Müller^Jürgen"
    ds0.SpecificCharacterSet = "ISO_IR 192"
    _write(ds0, paths[0])
    ds1 = pydicom.dcmread(paths[1])
    ds1.PatientName = "Müller^Jürgen"
    ds1.SpecificCharacterSet = "ISO_IR 192"
    _write(ds1, paths[1])
    assert set(store_files(server.port, paths, calling="CT1").values()) == {0}

    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = "FIND-*"
    q.PatientName = ""
    q.StudyInstanceUID = ""
    q.NumberOfStudyRelatedInstances = ""
    q.ModalitiesInStudy = ""
    results, final = c_find(server.port, q)
    assert final.Status == 0x0000
    assert len(results) == 1
    r = results[0]
    assert r.StudyInstanceUID == study
    assert int(r.NumberOfStudyRelatedInstances) == 2
    assert "CT" in r.ModalitiesInStudy
    assert str(r.PatientName) == "Müller^Jürgen"
    assert "StudyDescription" not in r  # only the requested keys come back
    assert "SpecificCharacterSet" in r

    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study
    q.SeriesInstanceUID = ds0.SeriesInstanceUID
    q.SOPInstanceUID = ""
    results, final = c_find(server.port, q)
    assert final.Status == 0x0000
    assert {str(r.SOPInstanceUID) for r in results} == {str(ds0.SOPInstanceUID), str(ds1.SOPInstanceUID)}

    bad = Dataset()
    bad.QueryRetrieveLevel = "PLANET"
    results, final = c_find(server.port, bad)
    assert results == [] and 0xA900 <= final.Status <= 0xCFFF and "ErrorComment" in final


def test_c_find_limit_asks_to_narrow_the_query(data_dir: Path, tmp_path: Path) -> None:
    srv = start_server(data_dir, env={"SAFEPACS_QUERY__MAX_RESULTS": "2", "SAFEPACS_SERVER__WORKERS": "1"})
    try:
        srv.add_peer("CT1", "store")
        srv.add_peer("VIEWER", "find")
        paths = [_study(tmp_path, 1)[1][0] for _ in range(3)]
        assert set(store_files(srv.port, paths, calling="CT1").values()) == {0}
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        results, final = c_find(srv.port, q)
        assert final.Status == 0xA700
        assert "narrow" in final.ErrorComment
        assert results == []
    finally:
        srv.stop()


def test_c_find_cancel(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.add_peer("CT1", "store")
    server.add_peer("VIEWER", "find")
    study, series = generate_uid(), generate_uid()
    contexts = [build_context(CTImageStorage, ExplicitVRLittleEndian)]
    # ~20 KB per answer (two 10,000-character LT values): the 400 answers are far more than the kernel
    # may buffer between the two sockets (the sender's tcp_wmem maximum, the peer's small window).
    long_text = {"PatientComments": "c" * 10_000, "AdditionalPatientHistory": "h" * 10_000}
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    assert 400 * 20_000 > 1.5 * wmem_max
    with associate(server.port, contexts, calling="CT1") as assoc:
        for _ in range(400):
            ds = make_ct(rows=4, cols=4, study_uid=study, series_uid=series, **long_text)
            assert assoc.send_c_store(ds).Status == 0x0000
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study
    q.SeriesInstanceUID = series
    q.SOPInstanceUID = ""
    for keyword in _FIND_KEYS:
        setattr(q, keyword, "")
    create = AssociationSocket._create_socket

    def small_window(self: AssociationSocket, address: Any) -> socket.socket:
        sock = create(self, address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
        return sock

    monkeypatch.setattr(AssociationSocket, "_create_socket", small_window)
    statuses = _find_then_cancel(server.port, q)
    assert statuses[0] == 0xFF00
    assert statuses[-1] == 0xFE00
    assert len(statuses) < 401


_FIND_KEYS = (
    "PatientComments", "AdditionalPatientHistory",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription", "Modality", "SeriesNumber",
    "SeriesDescription", "SeriesDate", "SeriesTime", "BodyPartExamined", "Manufacturer", "SOPClassUID",
    "InstanceNumber", "ContentDate", "ContentTime", "Rows", "Columns", "BitsAllocated",
    "PhotometricInterpretation", "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances",
    "ModalitiesInStudy", "SOPClassesInStudy", "AvailableTransferSyntaxUID", "InstanceAvailability",
)  # fmt: skip


def _find_then_cancel(port: int, q: Dataset) -> list[int]:
    """C-FIND, then C-CANCEL as soon as the first answer is there, from a peer that reads nothing until
    the C-CANCEL is sent (and whose receive buffer the caller made small): a server that honours it
    cannot have sent every answer by then, however fast it is, since the sockets hold far less than
    the answers.  The statuses of the responses, in order."""
    with associate(port, [build_context(StudyRootQueryRetrieveInformationModelFind)]) as assoc:
        assert assoc.is_established
        cx = assoc.accepted_contexts[0].context_id
        sock: socket.socket = assoc.dul.socket.socket
        assoc.dul._is_transport_event = lambda: False  # pynetdicom reads nothing more; we do
        find = C_FIND()
        find.MessageID = 7
        find.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
        find.Priority = 2
        find.Identifier = BytesIO(encode(q, True, True))
        sock.sendall(_message(C_FIND_RQ(), find, cx))
        select.select([sock], [], [], 30)
        cancel = C_CANCEL()
        cancel.MessageIDBeingRespondedTo = 7
        sock.sendall(_message(C_CANCEL_RQ(), cancel, cx))
        statuses = _read_find_responses(sock)
        assoc.abort()
    return statuses


def _message(message: Any, primitive: Any, context_id: int) -> bytes:
    message.primitive_to_message(primitive)
    return b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, 16382))


def _read_find_responses(sock: socket.socket) -> list[int]:
    """Read C-FIND-RSP messages off the socket until a final one (not Pending); their statuses."""
    sock.settimeout(30)
    buf = b""
    statuses: list[int] = []
    command: list[bytes] = []
    data_due = False
    while True:
        while len(buf) < 6 or len(buf) < 6 + struct.unpack(">BxL", buf[:6])[1]:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            buf += chunk
        pdu_type, length = struct.unpack(">BxL", buf[:6])
        body, buf = buf[6 : 6 + length], buf[6 + length :]
        assert pdu_type == 0x04, pdu_type
        offset = 0
        while offset < len(body):
            item_length, _, control = struct.unpack(">LBB", body[offset : offset + 6])
            value = body[offset + 6 : offset + 4 + item_length]
            offset += 4 + item_length
            if control & 1:
                command.append(value)
                if control & 2:
                    decoded = decode(BytesIO(b"".join(command)), True, True)
                    command = []
                    statuses.append(int(decoded.Status))
                    data_due = decoded.CommandDataSetType != 0x0101
                    if statuses[-1] != 0xFF00 and not data_due:
                        return statuses
            elif control & 2:
                data_due = False
                if statuses[-1] != 0xFF00:
                    return statuses


def test_duplicate_and_conflicting_instances(server: Server, tmp_path: Path) -> None:
    server.add_peer("CT1", "store")
    server.add_peer("VIEWER", "get")
    original = make_ct(patient_id="DUP-1")
    with associate(
        server.port, [build_context(CTImageStorage, ExplicitVRLittleEndian)], calling="CT1"
    ) as assoc:
        assert assoc.send_c_store(original).Status == 0x0000
        assert assoc.send_c_store(original).Status == 0x0000  # same bytes: success, nothing changes
        changed = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_to_bytes(original)))
        changed.PatientName = "Someone^Else"
        rsp = assoc.send_c_store(changed)
        assert rsp.Status == 0xC111  # a failure: not stored, the stored one is kept
        assert rsp.ErrorComment == "SOP Instance UID stored with other content; not stored"
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = original.StudyInstanceUID
    q.SeriesInstanceUID = original.SeriesInstanceUID
    q.SOPInstanceUID = original.SOPInstanceUID
    received, final = c_get(server.port, q, [(str(CTImageStorage), [ExplicitVRLittleEndian])])
    assert final.Status == 0x0000
    _, data = received[str(original.SOPInstanceUID)]
    assert b"Someone" not in data


@pytest.mark.dcmtk
def test_dcmtk_storescu_is_told_an_instance_with_other_content_was_not_stored(
    server: Server, tmp_path: Path
) -> None:
    """An object whose SOP Instance UID is stored with other content is a failure for the sender (0xC111,
    "Error: Cannot understand" class; storescu exits non-zero and keeps it), not the misleading warning
    0xB006 "Elements Discarded"; the stored object is unchanged and the audit trail names what arrived."""
    from safepacs.app import open_repositories
    from safepacs.audit import EventID, ObjectKind, Outcome
    from tests.support.audit_capture import AuditCapture

    server.add_peer("CT1", "store")
    original = make_ct(patient_id="DUP-2")
    changed = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_to_bytes(original)))
    changed.PatientName = "Someone^Else"
    first, second = _write(original, tmp_path / "first.dcm"), _write(changed, tmp_path / "second.dcm")
    store = ("storescu", "-v", "-aet", "CT1", "-aec", "SAFEPACS", server.host, str(server.port))
    assert dcmtk(*store, str(first)).returncode == 0
    assert dcmtk(*store, str(first)).returncode == 0  # the same bytes again: success
    repos = open_repositories(f"sqlite:///{server.data / 'index.sqlite3'}")
    try:
        capture = AuditCapture(repos.audit_log)
        result = dcmtk(*store, str(second))
        assert result.returncode != 0, result.stderr  # DCMTK reports the failure in its exit code
        assert "Received Store Response (Error: CannotUnderstand)" in result.stdout + result.stderr
        (conflict,) = capture.events(EventID.INSTANCES_ACCESSED)  # recorded before the answer
        assert conflict.outcome is Outcome.MINOR_FAILURE
        assert conflict.outcome_description is not None
        assert "was not stored" in conflict.outcome_description
        (study,) = [o for o in conflict.objects if o.kind is ObjectKind.STUDY]
        detail = dict(study.detail)
        assert detail["SOP Instance UID"] == original.SOPInstanceUID
        assert detail["Received SHA-256"] != detail["Stored SHA-256"]
        stored = repos.instances.get_instance(str(original.SOPInstanceUID))
        assert stored is not None and stored.blob.sha256 == detail["Stored SHA-256"]
    finally:
        repos.close()
    deadline = time.monotonic() + 10  # the server's log is read by a thread of the test
    while "its SOP Instance UID is stored with other content" not in server.stderr_text():
        assert time.monotonic() < deadline, server.stderr_text()
        time.sleep(0.05)
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = original.StudyInstanceUID
    q.SeriesInstanceUID = original.SeriesInstanceUID
    q.SOPInstanceUID = original.SOPInstanceUID
    server.add_peer("VIEWER", "get")
    received, final = c_get(server.port, q, [(str(CTImageStorage), [ExplicitVRLittleEndian])])
    assert final.Status == 0x0000
    assert b"Someone" not in received[str(original.SOPInstanceUID)][1]


def _to_bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_malformed_c_store_data_sets_are_refused(server: Server) -> None:
    server.add_peer("CT1", "store")
    good = make_ct()
    encoded = _to_bytes(good)
    from safepacs.dicom.transcode import dataset_bytes

    body = dataset_bytes(encoded)[1]
    cases = {
        "truncated": body[: len(body) // 3],
        "garbage": b"\xff\xfe\x00\x01garbage" * 10,
        "huge length": b"\x10\x00\x10\x00PN\xff\xff" + b"A" * 8,
    }
    with associate(
        server.port, [build_context(CTImageStorage, ExplicitVRLittleEndian)], calling="CT1"
    ) as assoc:
        cx = assoc.accepted_contexts[0]
        for name, payload in cases.items():
            status = _raw_store(assoc, cx, str(good.SOPInstanceUID), payload)
            assert 0xA700 <= status.Status <= 0xCFFF, name
            assert "ErrorComment" in status, name
        # A SOP Instance UID that tries to be a path.
        evil = make_ct()
        evil.SOPInstanceUID = "1.2.3/../../../etc/passwd"
        status = _raw_store(assoc, cx, "1.2.3", dataset_bytes(_to_bytes(evil))[1])
        assert 0xA700 <= status.Status <= 0xCFFF
        # The association still works afterwards.
        assert assoc.send_c_store(good).Status == 0x0000
    assert not list(server.data.rglob("passwd"))


def _raw_store(assoc: object, cx: object, sop_instance: str, payload: bytes) -> Dataset:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = BytesIO(payload)
    assoc._reactor_checkpoint.clear()  # type: ignore[attr-defined]
    while not assoc._is_paused:  # type: ignore[attr-defined]
        time.sleep(0.0001)
    assoc.dimse.send_msg(req, cx.context_id)  # type: ignore[attr-defined]
    _, rsp = assoc.dimse.get_msg(block=True)  # type: ignore[attr-defined]
    assoc._reactor_checkpoint.set()  # type: ignore[attr-defined]
    ds = Dataset()
    ds.Status = rsp.Status
    if getattr(rsp, "ErrorComment", None):
        ds.ErrorComment = rsp.ErrorComment
    return ds


def test_peer_dropping_mid_transfer_leaves_nothing_behind(server: Server) -> None:
    server.add_peer("CT1", "store")
    big = make_ct(rows=512, cols=512)
    with associate(
        server.port, [build_context(CTImageStorage, ExplicitVRLittleEndian)], calling="CT1"
    ) as assoc:
        assoc.dimse_timeout = 0.5
        # Send the first half of the data PDUs, then cut the connection.
        sock = assoc.dul.socket.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        from threading import Thread

        Thread(target=lambda: (time.sleep(0.05), sock.close()), daemon=True).start()
        with contextlib.suppress(Exception):  # the client side breaks by design
            assoc.send_c_store(big)
    time.sleep(0.5)
    server.add_peer("VIEWER", "find")
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = big.StudyInstanceUID
    q.SeriesInstanceUID = big.SeriesInstanceUID
    q.SOPInstanceUID = ""
    results, final = c_find(server.port, q)
    assert final.Status == 0x0000
    # Either the instance arrived whole before the cut, or not at all; never a half object.
    objects = [p for p in (server.data / "objects").rglob("*") if p.is_file()]
    assert len(objects) == len(results)
    assert not [p for p in (server.data / "tmp").iterdir()]


def test_sigterm_stops_cleanly_and_acknowledged_data_survives(data_dir: Path, tmp_path: Path) -> None:
    srv = start_server(data_dir)
    srv.add_peer("CT1", "store")
    srv.add_peer("VIEWER", "find")
    study, paths = _study(tmp_path, 2)
    assert set(store_files(srv.port, paths, calling="CT1").values()) == {0}
    assert srv.stop() == 0
    again = start_server(data_dir)
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study
        q.SeriesInstanceUID = pydicom.dcmread(paths[0]).SeriesInstanceUID
        q.SOPInstanceUID = ""
        results, final = c_find(again.port, q)
        assert len(results) == 2 and final.Status == 0x0000
    finally:
        again.stop()


def test_stop_signals_during_start_up_and_twice_in_a_row_stop_every_process(data_dir: Path) -> None:
    """A SIGTERM that arrives while the workers and the HTTPS process are still starting is not lost,
    and a second one while the first is handled does not hang the server."""
    import signal

    for repeat in (1, 2):
        srv = start_server(data_dir, env={"SAFEPACS_SERVER__WORKERS": "2"})
        for _ in range(repeat):
            srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
        srv.stop()
        assert "did not stop in time" not in srv.stderr_text()


def test_c_get_converts_for_a_peer_without_the_stored_syntax(server: Server) -> None:
    """A JPEG-stored image goes to a viewer that accepts only Explicit VR LE decompressed (PS3.4 C.4.3)."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEGBaseline8Bit

    server.add_peer("CT1", "store")
    server.add_peer("VIEWER", "get")
    path = Path(str(get_testdata_file("SC_rgb_jpeg_gdcm.dcm")))
    header = pydicom.dcmread(path)
    assert header.file_meta.TransferSyntaxUID.is_compressed
    assert store_files(server.port, [path], calling="CT1") == {path: 0}
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = header.StudyInstanceUID
    q.SeriesInstanceUID = header.SeriesInstanceUID
    q.SOPInstanceUID = header.SOPInstanceUID
    sop_class = str(header.SOPClassUID)

    received, final = c_get(server.port, q, [(sop_class, [ExplicitVRLittleEndian])])
    assert final.Status == 0x0000
    ts, data = received[str(header.SOPInstanceUID)]
    assert ts == ExplicitVRLittleEndian
    from pydicom.filereader import read_dataset

    got = read_dataset(pydicom.filebase.DicomBytesIO(data), is_implicit_VR=False, is_little_endian=True)
    got.file_meta = pydicom.dataset.FileMetaDataset()
    got.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert got.SOPInstanceUID == header.SOPInstanceUID
    assert (got.pixel_array == header.pixel_array).all()  # lossless JPEG: the same pixels

    # Offered only a lossy syntax, which SafePACS never produces: that sub-operation fails, and says which
    # instance.
    received, final = c_get(server.port, q, [(sop_class, [JPEGBaseline8Bit])])
    assert received == {}
    assert final.Status in (0xA702, 0xB000)
    assert final.NumberOfFailedSuboperations == 1
    failed = final.FailedSOPInstanceUIDList
    assert str(header.SOPInstanceUID) in ([failed] if isinstance(failed, str) else list(failed))


@pytest.mark.postgres
def test_the_archive_on_postgresql(data_dir: Path, tmp_path: Path, postgres_url: str) -> None:
    """The same store/find/get path with the index on PostgreSQL (index.url)."""
    env = {"SAFEPACS_INDEX__URL": postgres_url, "SAFEPACS_SERVER__WORKERS": "2"}
    srv = start_server(data_dir, env=env)
    try:
        import os

        os.environ["SAFEPACS_INDEX__URL"] = postgres_url  # the in-process CLI (peer add) uses it too
        try:
            srv.add_peer("CT1", "store")
            srv.add_peer("VIEWER", "find,get")
        finally:
            del os.environ["SAFEPACS_INDEX__URL"]
        study, paths = _study(tmp_path, 3, patient_id="PG-1")
        assert set(store_files(srv.port, paths, calling="CT1").values()) == {0}
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = "PG-1"
        q.StudyInstanceUID = ""
        q.NumberOfStudyRelatedInstances = ""
        results, final = c_find(srv.port, q)
        assert final.Status == 0x0000
        assert [(r.StudyInstanceUID, int(r.NumberOfStudyRelatedInstances)) for r in results] == [(study, 3)]
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study
        received, final = c_get(srv.port, q, [(str(CTImageStorage), [ExplicitVRLittleEndian])])
        assert final.Status == 0x0000
        assert {data for _, data in received.values()} == {_dataset_bytes(p) for p in paths}
    finally:
        srv.stop()
    from safepacs.app import open_repositories

    local = open_repositories(f"sqlite:///{data_dir / 'index.sqlite3'}")
    try:
        assert local.instances.count_instances() == 0  # everything went to PostgreSQL
    finally:
        local.close()


def _dimse_connections(server: Server) -> list[int]:
    """How many established DICOM connections each child process of the server holds (from /proc):
    the DIMSE workers' counts, and 0 for the HTTPS process (and for a purge child while one runs)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == server.port and fields[3] == "01":  # ESTABLISHED
            inodes.add(fields[9])
    counts = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rfind(")") + 2 :].split()[1]) != server.proc.pid:
                continue
            links = [_readlink(fd) for fd in (entry / "fd").iterdir()]
            counts.append(sum(link[8:-1] in inodes for link in links if link.startswith("socket:[")))
    return sorted(counts)


def _readlink(fd: Path) -> str:
    """What an fd of another process points to; "" when it was closed meanwhile (the HTTPS process
    opens and closes files all the time: one such fd must not drop the whole process from the count)."""
    try:
        return os.readlink(fd)
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from Linux's /proc")
def test_associations_are_spread_over_the_worker_processes(server: Server) -> None:
    """Each worker is one process with one GIL: four associations opened one after the other end up two
    per worker, not wherever the kernel happened to wake first (which put three or four on one worker
    in most runs)."""
    server.add_peer("VIEWER", "echo")
    deadline = time.monotonic() + 60
    while server.stderr_text().count("DIMSE worker accepting") < 2:  # both workers are up
        assert time.monotonic() < deadline, server.stderr_text()
        time.sleep(0.05)
    with contextlib.ExitStack() as stack:
        for _ in range(4):
            assoc = stack.enter_context(associate(server.port, [build_context(Verification)]))
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
        assert [n for n in _dimse_connections(server) if n] == [2, 2]  # and none on the HTTPS process
