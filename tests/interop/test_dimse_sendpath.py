"""The C-GET/C-MOVE send path (dimse/engine/sendpath.py): its encodings against pynetdicom's, and the same
retrievals with it on and off (``server.dimse_send_path``) giving the peers the same bytes, statuses
and counts - with a damaged object, an instance that must be transcoded, a cancel, a small maximum PDU
length, DCMTK getscu/movescu/storescp and pynetdicom as peers."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import struct
import subprocess
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StudyRootQueryRetrieveInformationModelGet

from safepacs.protocols.dimse.engine.sendpath import (
    encode_retrieve_response,
    encode_store_request,
    parse_store_response,
    pdata_pdus,
)
from tests.support.corpus import make_ct
from tests.support.dicom_client import c_move, store_files
from tests.support.server import dcmtk, start_server

UID = "1.2.826.0.1.3680043.8.498.12345"


# Encodings ------------------------------------------------------------------------------------------


def _command(message: Any, primitive: Any) -> bytes:
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


@pytest.mark.parametrize(("aet", "move_id"), [(None, None), ("VIEWER", 7), ("ODD", 3)])
def test_store_request_is_encoded_as_pynetdicom_encodes_it(aet: str | None, move_id: int | None) -> None:
    req = C_STORE()
    req.MessageID = 513
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = UID
    req.Priority = 2
    req.MoveOriginatorApplicationEntityTitle = aet
    req.MoveOriginatorMessageID = move_id
    req.DataSet = BytesIO(b"\x00" * 8)
    ours = encode_store_request(513, CTImageStorage, UID, 2, aet, move_id)
    assert ours == _command(C_STORE_RQ(), req)


@pytest.mark.parametrize("kind", [C_GET, C_MOVE])
@pytest.mark.parametrize(
    ("status", "counts"),
    [(0xFF00, (499, 1, 0, 0)), (0xFF00, (3, 5, 1, 2)), (0x0000, (None, 500, 0, 0)), (0xFE00, (1, 2, 0, 0))],
)
def test_retrieve_responses_are_encoded_as_pynetdicom_encodes_them(
    kind: type, status: int, counts: tuple[int | None, int, int, int]
) -> None:
    rsp = kind()
    rsp.MessageID = 3  # pynetdicom's service class sets it; a response does not carry it
    rsp.MessageIDBeingRespondedTo = 3
    rsp.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelGet
    rsp.Status = status
    (
        rsp.NumberOfRemainingSuboperations,
        rsp.NumberOfCompletedSuboperations,
        rsp.NumberOfFailedSuboperations,
        rsp.NumberOfWarningSuboperations,
    ) = counts
    field = 0x8010 if kind is C_GET else 0x8021
    ours = encode_retrieve_response(field, 3, StudyRootQueryRetrieveInformationModelGet, status, counts)
    assert ours == _command(C_GET_RSP() if kind is C_GET else C_MOVE_RSP(), rsp)


def _store_rsp(status: int, comment: str | None = None, message_id: int = 9) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = UID
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    return _command(C_STORE_RSP(), rsp)


def test_store_responses_are_read_and_anything_else_is_left_to_pynetdicom() -> None:
    plain = parse_store_response(_store_rsp(0x0000))
    assert plain is not None and (plain.message_id, plain.status, plain.plain) == (9, 0, True)
    detailed = parse_store_response(_store_rsp(0xA700, "out of space"))
    assert detailed is not None and (detailed.status, detailed.plain) == (0xA700, False)
    request = encode_store_request(9, CTImageStorage, UID)
    assert parse_store_response(request) is None  # a C-STORE-RQ, not a response
    assert parse_store_response(_store_rsp(0)[:-3]) is None  # cut short
    assert parse_store_response(struct.pack("<HHL", 0x0008, 0x0016, 0)) is None  # not group 0000


@pytest.mark.parametrize("peer_max", [0, 4096, 16384, 13])
def test_pdus_are_within_the_peers_maximum_and_carry_the_message_whole(peer_max: int) -> None:
    command = encode_store_request(1, CTImageStorage, UID)
    data = bytes(range(256)) * 200
    raw = b"".join(bytes(b) for b in pdata_pdus(5, command, memoryview(data), peer_max))
    got = {0x01: b"", 0x00: b""}
    offset, last = 0, {0x01: False, 0x00: False}
    while offset < len(raw):
        length = struct.unpack_from(">L", raw, offset + 2)[0]
        assert raw[offset] == 0x04 and (not peer_max or length <= peer_max)
        pdu = P_DATA_TF()
        pdu.decode(raw[offset : offset + 6 + length])
        for item in pdu.presentation_data_value_items:
            assert item.presentation_context_id == 5
            value = item.presentation_data_value
            kind = value[0] & 0x01
            assert not last[kind]
            got[kind] += value[1:]
            last[kind] = bool(value[0] & 0x02)
        offset += 6 + length
    assert got == {0x01: command, 0x00: data} and last == {0x01: True, 0x00: True}


# The same retrievals with the send path on and off -------------------------------------------------


TEST_FILES = Path(pydicom.data.__file__).resolve().parent / "test_files"
GET_MODEL = StudyRootQueryRetrieveInformationModelGet


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _identifier(study: str) -> Dataset:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    return ident


def _fill(data: Path, tmp_path: Path, scp_port: int) -> tuple[str, str]:
    """A study of 6 CT slices and one JPEG-LS MR image (transcoded for peers that take only
    uncompressed syntaxes); the third CT object damaged.  (study UID, damaged SOP Instance UID)"""
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(6):
        ds = make_ct(64, 64, study_uid=study, series_uid=series, instance_number=i + 1, seed=i)
        paths.append(tmp_path / f"ct{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    mr = pydicom.dcmread(TEST_FILES / "MR_small_jpeg_ls_lossless.dcm")
    mr.StudyInstanceUID, mr.PatientID = study, "SP-0001"
    paths.append(tmp_path / "mr.dcm")
    mr.save_as(paths[-1])
    srv = start_server(data)
    try:
        srv.add_peer("CT1", "echo,store")
        srv.add_peer("VIEWER", "echo,find,get,move")
        srv.add_peer("ARCHIVE2", "echo", port=scp_port)
        assert set(store_files(srv.port, paths, calling="CT1").values()) == {0x0000}
    finally:
        srv.stop()
    damaged = str(pydicom.dcmread(paths[2], stop_before_pixels=True).SOPInstanceUID)
    db = sqlite3.connect(data / "index.sqlite3")
    try:
        query = "SELECT blob_id FROM instances WHERE sop_instance_uid = ?"
        (blob,) = db.execute(query, (damaged,)).fetchone()
    finally:
        db.close()
    path = data / "objects" / blob[:2] / blob
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    return study, damaged


_STATUS_KEYS = (
    "Status",
    "NumberOfRemainingSuboperations",
    "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations",
    "NumberOfWarningSuboperations",
)


def _status(final: Dataset) -> tuple[Any, ...]:
    return (*(final.get(k) for k in _STATUS_KEYS), _uids(final.get("FailedSOPInstanceUIDList")))


def _uids(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (str(value),) if isinstance(value, str) else tuple(str(v) for v in value)


def _pynetdicom_get(port: int, study: str, *, max_pdu: int, cancel_after: int | None) -> dict[str, Any]:
    """C-GET with a pynetdicom requestor announcing ``max_pdu``; Explicit/Implicit VR Little Endian only,
    so the JPEG-LS image is transcoded; a C-CANCEL sent while the ``cancel_after``-th instance is stored."""
    received: dict[str, tuple[str, bytes]] = {}
    ae = AE(ae_title="VIEWER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.maximum_pdu_size = max_pdu
    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    ae.requested_contexts = [
        build_context(GET_MODEL),
        build_context(CTImageStorage, uncompressed),
        build_context(MRImageStorage, uncompressed),
    ]
    roles = [build_role(CTImageStorage, scp_role=True), build_role(MRImageStorage, scp_role=True)]
    holder: dict[str, Any] = {}

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            event.request.DataSet.getvalue(),
        )
        if cancel_after is not None and len(received) == cancel_after:
            assoc = holder["assoc"]
            assoc.send_c_cancel(1, assoc._get_valid_context(GET_MODEL, "", "scu").context_id)
        return 0x0000

    assoc = ae.associate("127.0.0.1", port, ae_title="SAFEPACS", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
    holder["assoc"] = assoc
    statuses: list[tuple[Any, ...]] = []
    try:
        assert assoc.is_established
        for status, ident in assoc.send_c_get(_identifier(study), GET_MODEL, msg_id=1):
            if status is not None and "Status" in status:
                if ident is not None and "FailedSOPInstanceUIDList" in ident:
                    status.FailedSOPInstanceUIDList = ident.FailedSOPInstanceUIDList
                statuses.append(_status(status))
    finally:
        assoc.release()
    return {"received": received, "statuses": statuses}


def _getscu(port: int, study: str, out: Path) -> dict[str, Any]:
    out.mkdir()
    done = dcmtk("getscu", "-v", "-S", "-aet", "VIEWER", "-aec", "SAFEPACS", "-od", str(out),
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                 "127.0.0.1", str(port))  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if "Status" in line or "Sub-Operations" in line]
    return {
        "rc": done.returncode,
        "files": {p.name: p.read_bytes() for p in sorted(out.iterdir())},
        "log": [line.split(": ", 1)[-1] for line in lines],
        "clean": not any(s in done.stderr for s in ("Release Failed", "DUL", "ABORT")),
    }


def _move(port: int, study: str, out: Path, scp_port: int) -> dict[str, Any]:
    out.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "ARCHIVE2", "-od", str(out), str(scp_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", scp_port)) == 0:
                    break
            time.sleep(0.05)
        final = c_move(port, _identifier(study), "ARCHIVE2")
    finally:
        scp.terminate()
        scp.wait(10)
    return {"final": _status(final), "files": {p.name: p.read_bytes() for p in sorted(out.iterdir())}}


@pytest.mark.dcmtk
def test_retrievals_give_the_same_bytes_statuses_and_counts_with_the_send_path_on_and_off(
    data_dir: Path, tmp_path: Path
) -> None:
    if shutil.which("getscu") is None:
        pytest.skip("DCMTK not installed")
    scp_port = _free_port()
    study, damaged = _fill(data_dir, tmp_path, scp_port)
    results: dict[str, dict[str, Any]] = {}
    for mode in ("true", "false"):
        srv = start_server(data_dir, env={"SAFEPACS_SERVER__DIMSE_SEND_PATH": mode})
        try:
            out = tmp_path / mode
            out.mkdir()
            results[mode] = {
                "getscu": _getscu(srv.port, study, out / "getscu"),
                "small pdu": _pynetdicom_get(srv.port, study, max_pdu=4096, cancel_after=None),
                "cancel": _pynetdicom_get(srv.port, study, max_pdu=16384, cancel_after=2),
                "move": _move(srv.port, study, out / "moved", scp_port),
            }
        finally:
            srv.stop()
    fast, slow = results["true"], results["false"]
    for name in fast:
        assert fast[name] == slow[name], name
    # and what they agree on is right: 5 of 6 CT slices as stored, the MR transcoded, the damaged one failed
    get = fast["small pdu"]
    assert damaged not in get["received"] and len(get["received"]) == 6
    assert {ts for ts, _ in get["received"].values()} == {ExplicitVRLittleEndian}
    assert get["statuses"][-1] == (0xB000, 0, 6, 1, 0, (damaged,))
    assert fast["cancel"]["statuses"][-1][:2] == (0xFE00, 5) and len(fast["cancel"]["received"]) == 2
    assert fast["getscu"]["rc"] == 0 and fast["getscu"]["clean"] and len(fast["getscu"]["files"]) == 6
    assert fast["move"]["final"][:5] == (0xB000, 0, 6, 1, 0) and len(fast["move"]["files"]) == 6


def test_placeholder_is_what_pynetdicoms_service_class_reads() -> None:
    """The C-GET/C-MOVE service class takes a true ``Dataset`` per Pending sub-operation and lists its
    ``SOPInstanceUID`` when the sub-operation fails; the placeholder gives both without pydicom."""
    from safepacs.protocols.dimse.engine.raw import RawInstance, StoreStatus, _status_of
    from safepacs.protocols.dimse.engine.sendpath import StoreResponse
    from safepacs.types import InstanceRef

    uid = generate_uid()
    ref = InstanceRef("1.2.3", "1.2.3.4", CTImageStorage, uid, ExplicitVRLittleEndian, None)  # type: ignore[arg-type]
    inst = RawInstance(ref, lambda _ref: b"")
    assert isinstance(inst, Dataset) and inst and len(inst) == 1
    assert hasattr(inst, "SOPInstanceUID") and inst.SOPInstanceUID == uid
    assert inst.SOPClassUID == CTImageStorage and inst.ref is ref
    failed = Dataset()
    failed.FailedSOPInstanceUIDList = [inst.SOPInstanceUID]  # as pynetdicom builds the final identifier
    assert failed.FailedSOPInstanceUIDList == uid
    status = _status_of(None, StoreResponse(7, 0xB007, True))  # type: ignore[arg-type]
    assert isinstance(status, StoreStatus) and status.Status == 0xB007
