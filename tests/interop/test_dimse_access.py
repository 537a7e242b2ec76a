"""Deny by default: who may associate, and for what (issue: archive core, item 4)."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification

from tests.support.corpus import make_ct
from tests.support.dicom_client import associate, c_find, echo, rejection
from tests.support.server import Server, dcmtk

REJECTED_PERMANENT, SERVICE_USER = 0x01, 0x01
CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 0x03, 0x07


@pytest.mark.dcmtk
def test_registered_peer_can_echo_with_dcmtk(server: Server) -> None:
    server.add_peer("CT1", "echo")
    result = dcmtk("echoscu", "-aet", "CT1", "-aec", "SAFEPACS", server.host, str(server.port))
    assert result.returncode == 0, result.stderr


@pytest.mark.dcmtk
def test_unknown_calling_ae_is_rejected_with_dcmtk(server: Server) -> None:
    result = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "SAFEPACS", server.host, str(server.port))
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr


def test_unknown_calling_ae_is_rejected_permanently_and_counted(server: Server) -> None:
    assoc = echo(server.port, calling="STRANGER")
    assert assoc.is_rejected
    assert rejection(assoc) == (REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
    echo(server.port, calling="STRANGER")
    deadline = time.monotonic() + 5
    while "rejections_total" not in server.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.stderr_text()
    assert "association rejected" in log and "calling AE title not registered" in log
    assert "rejections_total" in log


def test_wrong_called_ae_is_rejected(server: Server) -> None:
    server.add_peer("VIEWER", "echo")
    assoc = echo(server.port, calling="VIEWER", called="ANY-SCP")
    assert assoc.is_rejected
    assert rejection(assoc) == (REJECTED_PERMANENT, SERVICE_USER, CALLED_AE_NOT_RECOGNIZED)


def test_known_ae_from_another_address_is_rejected(server: Server) -> None:
    server.add_peer("VIEWER", "echo", host="127.0.0.2")
    assoc = echo(server.port, calling="VIEWER")
    assert assoc.is_rejected
    assert rejection(assoc) == (REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
    # From its registered address the same AE is admitted.
    assert echo(server.port, calling="VIEWER", bind_address=("127.0.0.2", 0)).Status == 0x0000


def test_peer_registered_for_a_network_is_admitted_from_inside_it(server: Server) -> None:
    server.add_peer("WARD", "echo", host="127.0.0.0/8")
    assert echo(server.port, calling="WARD", bind_address=("127.0.0.9", 0)).Status == 0x0000


def test_service_not_allowed_has_its_contexts_rejected(server: Server) -> None:
    server.add_peer("VIEWER", "echo")
    contexts = [build_context(Verification), build_context(StudyRootQueryRetrieveInformationModelFind)]
    with associate(server.port, contexts, calling="VIEWER") as assoc:
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {str(Verification)}
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    # Nothing to ask with: the find context was not accepted.
    with pytest.raises(AssertionError):
        c_find(server.port, ds, calling="VIEWER")


@pytest.mark.dcmtk
def test_service_not_allowed_findscu_fails(server: Server) -> None:
    server.add_peer("VIEWER", "echo")
    result = dcmtk(
        "findscu",
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientID=",
        "-aet",
        "VIEWER",
        "-aec",
        "SAFEPACS",
        server.host,
        str(server.port),
    )
    assert result.returncode != 0


def test_store_on_a_shared_context_without_store_right_is_refused(server: Server) -> None:
    """A peer allowed only C-GET gets Storage contexts (for the sub-operations), not the right to store."""
    server.add_peer("VIEWER", "get")
    with associate(server.port, [build_context(CTImageStorage)], calling="VIEWER") as assoc:
        assert assoc.is_established
        status = assoc.send_c_store(make_ct())
        assert status.Status == 0x0124


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _associate_rq(calling: str, called: str, n_contexts: int) -> bytes:
    """An A-ASSOCIATE-RQ PDU written by hand (PS3.8 9.3.2); pynetdicom refuses to request > 128 contexts."""
    items = _item(0x10, b"1.2.840.10008.3.1.1.1")
    for i in range(n_contexts):
        sub = _item(0x30, str(Verification).encode()) + _item(0x40, b"1.2.840.10008.1.2")
        items += _item(0x20, struct.pack(">BBBB", (2 * i + 1) % 256, 0, 0, 0) + sub)
    items += _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    aes = called.ljust(16).encode() + calling.ljust(16).encode()
    body = struct.pack(">HH", 1, 0) + aes + b"\x00" * 32 + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def test_more_than_128_presentation_contexts_is_rejected(server: Server) -> None:
    server.add_peer("VIEWER", "echo")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_associate_rq("VIEWER", "SAFEPACS", 129))
        reply = sock.recv(10)
    assert reply[0] == 0x03  # A-ASSOCIATE-RJ
    assert reply[7:10] == bytes([REJECTED_PERMANENT, SERVICE_USER, 0x01])
    # The same request with 128 contexts is accepted (A-ASSOCIATE-AC).
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_associate_rq("VIEWER", "SAFEPACS", 128))
        assert sock.recv(1) == b"\x02"


def test_garbage_connection_does_not_hurt_the_server(server: Server) -> None:
    server.add_peer("CT1", "echo")
    for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 64, b""):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(payload)
    assert echo(server.port, calling="CT1").Status == 0x0000
