"""The C-STORE receive path (dimse/engine/fastpath.py) against real peers: fragmentation, mixing with other
services on one association, size limits and protocol violations."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from safepacs.protocols.dimse.engine.fastpath import (
    StoreCommand,
    StoreDUL,
    encode_store_response,
    parse_store_command,
)
from tests.support.corpus import make_ct
from tests.support.dicom_client import associate, c_get
from tests.support.server import Server, start_server

STORE_CONTEXTS = [
    build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    build_context(Verification),
    build_context(StudyRootQueryRetrieveInformationModelFind),
]


def _pynetdicom_response(status: int, comment: str | None) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345"
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    return encode(msg.command_set, True, True)


@pytest.mark.parametrize(
    ("status", "comment"),
    [
        (0x0000, None),
        (0xC111, "SOP Instance UID stored with other content; not stored"),
        (0xC000, "the data set is truncated (an element is short)"),
    ],
)
def test_store_response_is_encoded_as_pynetdicom_encodes_it(status: int, comment: str | None) -> None:
    ours = encode_store_response(7, CTImageStorage, "1.2.826.0.1.3680043.8.498.12345", status, comment)
    assert ours == _pynetdicom_response(status, comment)
    decoded = decode(__import__("io").BytesIO(ours), True, True)
    assert decoded.CommandField == 0x8001
    assert decoded.MessageIDBeingRespondedTo == 7
    assert decoded.Status == status


def _pynetdicom_store_request(sop_instance: str, **extra: object) -> bytes:
    req = C_STORE()
    req.MessageID = 513
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    for keyword, value in extra.items():
        setattr(req, keyword, value)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.command_set.CommandDataSetType = 0x0000  # a data set follows, as in every real C-STORE-RQ
    return encode(msg.command_set, True, True)


@pytest.mark.parametrize(
    ("sop_instance", "extra"),
    [
        ("1.2.826.0.1.3680043.8.498.1", {}),  # odd length: padded with NUL
        ("1.2.826.0.1.3680043.8.498.12", {}),
        ("1.2.3", {"MoveOriginatorApplicationEntityTitle": "MOVER", "MoveOriginatorMessageID": 9}),
    ],
)
def test_store_requests_are_read_as_pynetdicom_reads_them(
    sop_instance: str, extra: dict[str, object]
) -> None:
    raw = _pynetdicom_store_request(sop_instance, **extra)
    ref = decode(__import__("io").BytesIO(raw), True, True)
    ours = parse_store_command(raw)
    assert ours == StoreCommand(ref.MessageID, str(ref.AffectedSOPClassUID), str(ref.AffectedSOPInstanceUID))
    assert ours.sop_instance_uid == sop_instance


def test_anything_but_a_store_request_is_left_to_pynetdicom() -> None:
    """None means: pynetdicom decodes it, as before (other commands, and anything unusual)."""
    echo = C_ECHO_RQ()
    primitive = C_ECHO()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = Verification
    echo.primitive_to_message(primitive)
    store = _pynetdicom_store_request("1.2.3")
    no_data = bytearray(store)
    no_data[no_data.index(b"\x00\x00\x00\x08") + 8 : no_data.index(b"\x00\x00\x00\x08") + 10] = b"\x01\x01"
    assert decode(__import__("io").BytesIO(bytes(no_data)), True, True).CommandDataSetType == 0x0101
    wrong_group = bytearray(store)
    wrong_group[0:2] = b"\x02\x00"
    for raw in (
        encode(echo.command_set, True, True),
        bytes(no_data),  # CommandDataSetType 0x0101: no data set
        store[:-3],  # cut short
        bytes(wrong_group),
        store[:7],
        b"",
    ):
        assert parse_store_command(raw) is None
    assert parse_store_command(store) is not None


def _find_images(assoc: object, study_uid: str) -> list[str]:
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.SOPInstanceUID = ""
    found = []
    for status, ds in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):  # type: ignore[attr-defined]
        if status.Status in (0xFF00, 0xFF01):
            found.append(str(ds.SOPInstanceUID))
        else:
            assert status.Status == 0x0000
    return sorted(found)


@pytest.fixture
def small_pdu_server(data_dir: Path) -> object:
    """A server announcing a 4 KiB maximum PDU, so every instance arrives in many fragments."""
    srv = start_server(
        data_dir,
        env={
            "SAFEPACS_SERVER__WORKERS": "1",
            "SAFEPACS_SERVER__MAX_PDU_SIZE": "4096",
            "SAFEPACS_STORAGE__MAX_OBJECT_BYTES": "200000",
        },
    )
    try:
        yield srv
    finally:
        srv.stop()


def test_fragmented_stores_mixed_with_echo_and_find_on_one_association(small_pdu_server: Server) -> None:
    srv = small_pdu_server
    srv.add_peer("CT1", "echo,store,find,get")
    first = make_ct(rows=128, cols=128)  # ~33 KB: nine 4 KiB PDUs
    second = make_ct(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID)
    with associate(srv.port, STORE_CONTEXTS, calling="CT1") as assoc:
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 4096
        assert assoc.send_c_store(first).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        assert _find_images(assoc, first.StudyInstanceUID) == [first.SOPInstanceUID]
        assert assoc.send_c_store(second).Status == 0x0000
        assert assoc.send_c_store(second).Status == 0x0000  # the same again: a duplicate, success
        assert _find_images(assoc, first.StudyInstanceUID) == sorted(
            [first.SOPInstanceUID, second.SOPInstanceUID]
        )
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = first.StudyInstanceUID
    received, final = c_get(srv.port, q, [(CTImageStorage, [ExplicitVRLittleEndian])], calling="CT1")
    assert final.Status == 0x0000
    assert received[first.SOPInstanceUID][1] == _encoded(first)


def _encoded(ds: Dataset) -> bytes:
    from io import BytesIO

    from safepacs.dicom.transcode import dataset_bytes

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return dataset_bytes(buf.getvalue())[1]


def test_response_respects_a_peer_with_a_tiny_maximum_pdu(server: Server) -> None:
    """Our C-STORE-RSP is split into PDUs no longer than the peer announced (PS3.8 9.3.5)."""
    server.add_peer("CT1", "store")
    from pynetdicom import AE

    ae = AE(ae_title="CT1")
    ae.maximum_pdu_size = 64  # smaller than the ~170-byte response command
    ae.network_timeout = ae.dimse_timeout = 20
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SAFEPACS")
    try:
        assert assoc.is_established
        rsp = assoc.send_c_store(make_ct())
        assert rsp.Status == 0x0000
    finally:
        assoc.release()
        ae.shutdown()


def test_object_over_the_size_limit_is_refused_and_the_association_goes_on(
    small_pdu_server: Server,
) -> None:
    srv = small_pdu_server
    srv.add_peer("CT1", "store,find")
    big = make_ct(rows=512, cols=512)  # 0.5 MB > 200,000 bytes
    small = make_ct()
    with associate(srv.port, STORE_CONTEXTS, calling="CT1") as assoc:
        rsp = assoc.send_c_store(big)
        assert rsp.Status == 0xC000
        assert "larger than" in rsp.ErrorComment
        assert assoc.send_c_store(small).Status == 0x0000
        assert _find_images(assoc, big.StudyInstanceUID) == []
        assert _find_images(assoc, small.StudyInstanceUID) == [small.SOPInstanceUID]


def _p_data(items: list[tuple[int, int, bytes]]) -> bytes:
    body = b"".join(struct.pack(">LBB", len(frag) + 2, cx, ctl) + frag for cx, ctl, frag in items)
    return struct.pack(">BxL", 0x04, len(body)) + body


def _aborted(assoc: object, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if assoc.is_aborted or not assoc.is_established:  # type: ignore[attr-defined]
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    "attack",
    [
        "pdu longer than announced",
        "item length below 2",
        "item past the end of the PDU",
        "data before the command",
        "command over 64 KiB",
    ],
)
def test_protocol_violations_abort_the_association_only(small_pdu_server: Server, attack: str) -> None:
    srv = small_pdu_server
    srv.add_peer("CT1", "echo,store")
    with associate(srv.port, STORE_CONTEXTS, calling="CT1") as assoc:
        assert assoc.is_established
        cx = assoc.accepted_contexts[0].context_id
        sock: socket.socket = assoc.dul.socket.socket
        if attack == "pdu longer than announced":
            raw = struct.pack(">BxL", 0x04, 10 * 1024 * 1024)  # 10 MiB announced, never sent
        elif attack == "item length below 2":
            raw = struct.pack(">BxL", 0x04, 6) + struct.pack(">LBB", 1, cx, 3)
        elif attack == "item past the end of the PDU":
            raw = struct.pack(">BxL", 0x04, 8) + struct.pack(">LBB", 400, cx, 3) + b"ab"
        elif attack == "data before the command":
            raw = _p_data([(cx, 0x00, b"\x08\x00\x18\x00")])
        else:
            raw = b"".join(_p_data([(cx, 0x01, b"\x00" * 4000)]) for _ in range(17))
        sock.sendall(raw)
        assert _aborted(assoc), f"{attack}: the association was not aborted"
    # The server is unharmed: a new association works.
    with associate(srv.port, STORE_CONTEXTS, calling="CT1") as assoc:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(make_ct()).Status == 0x0000


# The reactor's wake-ups ------------------------------------------------------------------------------------


@pytest.fixture
def idle_dul() -> Iterator[StoreDUL]:
    """A StoreDUL as an established association has it between two requests: a connected socket the
    peer sends nothing on, nothing queued by the association thread."""
    dul = StoreDUL(cast(Any, SimpleNamespace()), lambda *_: 0, 1 << 20)
    ours, theirs = socket.socketpair()
    dul.socket = cast(Any, SimpleNamespace(socket=ours))
    try:
        yield dul
    finally:
        ours.close()
        theirs.close()
        dul._waker.close()


def test_an_idle_reactor_sleeps_instead_of_polling(idle_dul: StoreDUL) -> None:
    """Between two C-STORE-RQs the reactor waits for the peer or the association thread, not for a
    0.5 ms poll of pynetdicom's outgoing queue: with two associations in a worker, each poll took the
    GIL from the one storing an instance (~20 wake-ups per CT slice on a busy machine)."""
    dul = idle_dul
    waits, stop = 0, time.monotonic() + 0.2
    while time.monotonic() < stop:
        dul._wait()
        waits += 1
    # ~20 at one wake-up per 10 ms; the old reactor woke every 0.5 ms for its first 0.25 s (~400)
    assert waits < 100


def test_the_association_thread_wakes_the_reactor_when_it_queues_a_pdu(idle_dul: StoreDUL) -> None:
    """A response pynetdicom's association thread queues (C-ECHO, C-FIND, release) wakes the reactor
    at once: its waker is readable until the reactor has waited on it."""
    dul = idle_dul
    assert select.select([dul._waker], [], [], 0)[0] == []
    sender = threading.Thread(target=dul.send_pdu, args=(P_DATA(),))
    sender.start()
    sender.join()
    assert dul.to_provider_queue.qsize() == 1
    assert select.select([dul._waker], [], [], 0)[0] == [dul._waker]
    dul._wait()  # returns at once, and consumes the wake-up
    assert select.select([dul._waker], [], [], 0)[0] == []
    dul.kill_dul()
    assert dul._kill_thread
    assert select.select([dul._waker], [], [], 0)[0] == [dul._waker]


def test_a_pdu_queued_while_the_reactor_was_busy_is_sent_without_waiting(
    idle_dul: StoreDUL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The association thread may queue its next PDU and set the waker while the reactor, just woken by
    the waker, is still sending the previous one.  That wake-up must not be lost: the reactor then
    waited out its whole timeout with the PDU in its queue (10 ms per instance of a C-GET, ~100
    instead of ~500 instances/s).  With the timeout made a minute long, a lost wake-up hangs."""
    import safepacs.protocols.dimse.engine.fastpath as fastpath

    monkeypatch.setattr(fastpath, "_WAIT", 60.0)
    dul = idle_dul
    dul.send_pdu(P_DATA())  # queued, waker set ...
    dul._waker.clear()  # ... and that wake-up consumed, as by the wait that preceded the busy turn
    waiter = threading.Thread(target=dul._wait, daemon=True)
    waiter.start()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "the reactor slept with a PDU in its queue"
    dul.kill_dul()


def test_a_finished_reactor_is_not_woken_through_a_reused_descriptor(idle_dul: StoreDUL) -> None:
    """Once the reactor has ended its waker is closed; a late send_pdu (an abort from another thread)
    must not write to whatever file now has that descriptor number."""
    dul = idle_dul
    dul._kill_thread = True
    dul.run_reactor()  # ends at once, closing the waker
    number = dul._waker.fileno()
    reuse_r, reuse_w = os.pipe()
    try:
        dul.send_pdu(P_DATA())
        os.set_blocking(reuse_r, False)
        if number in (reuse_r, reuse_w):
            with pytest.raises(BlockingIOError):
                os.read(reuse_r, 8)
    finally:
        os.close(reuse_r)
        os.close(reuse_w)
