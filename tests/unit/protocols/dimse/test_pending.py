"""Connections before admission (protocols/dimse/pending.py), on socket pairs: only a whole, decodable
A-ASSOCIATE-RQ is handed on; anything else closes the connection with the reason counted and the
A-ABORT PS3.8 9.3.8 asks for; a flood from one address closes its own oldest waiting connections."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import build_context
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)

from safepacs.protocols.dimse.pending import (
    ABORT_INVALID_PARAMETER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PDU,
    CLOSED_EARLY,
    EVICTED,
    EVICTED_TOTAL,
    MALFORMED,
    MAX_ASSOCIATE_RQ_BYTES,
    NOT_ASSOCIATE_RQ,
    TIMED_OUT,
    TOO_LONG,
    Dropped,
    PendingConnections,
    receive_associate_rq,
    send_abort,
)


def associate_rq() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "MODALITY1"
    primitive.called_ae_title = "SAFEPACS"
    cx = build_context("1.2.840.10008.1.1")
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = "1.2.826.0.1.3680043.10.1474.99"
    primitive.user_information = [length, uid]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, peer = socket.socketpair()
    server.setblocking(False)
    try:
        yield server, peer
    finally:
        server.close()
        peer.close()


def soon(seconds: float = 2.0) -> float:
    return time.monotonic() + seconds


def test_a_whole_associate_rq_is_read_and_nothing_past_it(pair: tuple[socket.socket, socket.socket]) -> None:
    server, peer = pair
    pdu = associate_rq()
    peer.sendall(pdu + b"\x04next PDU")
    assert receive_associate_rq(server, soon()) == pdu
    assert server.recv(16) == b"\x04next PDU"  # left for the association to read


def test_an_associate_rq_sent_in_pieces_is_put_together(pair: tuple[socket.socket, socket.socket]) -> None:
    server, peer = pair
    pdu = associate_rq()
    peer.sendall(pdu[:3])
    sender = threading.Timer(0.1, lambda: peer.sendall(pdu[3:]))
    sender.start()
    try:
        assert receive_associate_rq(server, soon()) == pdu
    finally:
        sender.join()


def dropped(server: socket.socket, deadline: float | None = None) -> Dropped:
    with pytest.raises(Dropped) as caught:
        receive_associate_rq(server, deadline if deadline is not None else soon())
    return caught.value


def test_a_peer_that_closes_first_is_closed_early(pair: tuple[socket.socket, socket.socket]) -> None:
    server, peer = pair
    peer.sendall(b"\x01\x00")
    peer.close()
    d = dropped(server)
    assert (d.reason, d.abort) == (CLOSED_EARLY, None)


def test_silence_until_the_deadline_is_a_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    started = time.monotonic()
    d = dropped(server, soon(0.2))
    assert (d.reason, d.abort) == (TIMED_OUT, None)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("first", "abort"),
    [(0x05, ABORT_UNEXPECTED_PDU), (0x07, ABORT_UNEXPECTED_PDU), (0x47, ABORT_UNRECOGNIZED_PDU)],
    ids=["release-rq", "abort", "unknown"],
)
def test_another_pdu_first_is_aborted(
    pair: tuple[socket.socket, socket.socket], first: int, abort: int
) -> None:
    server, peer = pair
    peer.sendall(struct.pack(">BxL", first, 4) + b"\0" * 4)
    d = dropped(server)
    assert (d.reason, d.abort) == (NOT_ASSOCIATE_RQ, abort)


def test_an_announced_length_over_the_limit_is_refused_before_reading_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, peer = pair
    peer.sendall(struct.pack(">BxL", 0x01, MAX_ASSOCIATE_RQ_BYTES + 1))
    d = dropped(server)
    assert (d.reason, d.abort) == (TOO_LONG, ABORT_INVALID_PARAMETER)


def test_an_undecodable_associate_rq_is_malformed(pair: tuple[socket.socket, socket.socket]) -> None:
    server, peer = pair
    peer.sendall(struct.pack(">BxL", 0x01, 8) + b"\xff" * 8)
    d = dropped(server)
    assert (d.reason, d.abort) == (MALFORMED, ABORT_INVALID_PARAMETER)


def test_send_abort_writes_an_a_abort_from_the_service_provider(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, peer = pair
    send_abort(server, ABORT_INVALID_PARAMETER)
    data = peer.recv(64)
    pdu = A_ABORT_RQ()
    pdu.decode(data)
    assert (pdu.source, pdu.reason_diagnostic) == (0x02, ABORT_INVALID_PARAMETER)
    server.close()
    send_abort(server, ABORT_INVALID_PARAMETER)  # a closed socket: nothing raised


# Counting --------------------------------------------------------------------------------------------
class Conn:
    """A connected socket whose shutdown by the tally the test can see."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()

    def was_shut_down(self) -> bool:
        self.peer.settimeout(1.0)
        return self.peer.recv(1) == b""

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


@pytest.fixture
def conns() -> Iterator[list[Conn]]:
    made = [Conn() for _ in range(6)]
    try:
        yield made
    finally:
        for c in made:
            c.close()


def test_the_oldest_waiting_connection_of_an_address_makes_room(conns: list[Conn]) -> None:
    pending = PendingConnections(per_address=2, total=10)
    first = pending.enter("192.0.2.1", conns[0].sock)
    second = pending.enter("192.0.2.1", conns[1].sock)
    assert first is not None and second is not None
    third = pending.enter("192.0.2.1", conns[2].sock)
    assert third is not None
    assert first.evicted == EVICTED and conns[0].was_shut_down()
    assert second.evicted is None
    assert pending.count("192.0.2.1") == 2 and pending.count() == 2
    assert not pending.handed_over(first)  # its thread learns it was closed to make room


def test_a_connection_being_negotiated_is_never_closed_to_make_room(conns: list[Conn]) -> None:
    pending = PendingConnections(per_address=1, total=10)
    ticket = pending.enter("192.0.2.1", conns[0].sock)
    assert ticket is not None and pending.handed_over(ticket)
    assert pending.enter("192.0.2.1", conns[1].sock) is None  # no room: the caller closes it
    assert ticket.evicted is None


def test_past_the_total_the_busiest_address_gives_way(conns: list[Conn]) -> None:
    pending = PendingConnections(per_address=5, total=3)
    flood = [pending.enter("198.51.100.7", conns[i].sock) for i in range(2)]
    modality = pending.enter("192.0.2.1", conns[2].sock)
    assert modality is not None and all(t is not None for t in flood)
    newcomer = pending.enter("203.0.113.9", conns[3].sock)
    assert newcomer is not None
    assert flood[0] is not None and flood[0].evicted == EVICTED_TOTAL
    assert modality.evicted is None
    assert pending.count() == 3


def test_leave_uncounts_and_close_all_closes_the_waiting(conns: list[Conn]) -> None:
    pending = PendingConnections(per_address=5, total=5)
    a = pending.enter("192.0.2.1", conns[0].sock)
    b = pending.enter("192.0.2.2", conns[1].sock)
    assert a is not None and b is not None
    pending.leave(a)
    pending.leave(a)  # twice: counted once
    assert pending.count() == 1 and pending.count("192.0.2.1") == 0
    pending.close_all()
    assert b.evicted == "the server is stopping" and conns[1].was_shut_down()
    assert pending.enter("192.0.2.3", conns[2].sock) is None  # stopping: no more admitted
