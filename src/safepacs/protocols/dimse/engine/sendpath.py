"""The C-STORE send path of C-GET and C-MOVE, without pynetdicom's encoders and queues in the way.

A C-GET or C-MOVE of a 500-slice series spent about four times Orthanc's CPU per instance in the
serving worker (measured in bench/README.md, "DIMSE retrieval benchmark").  Reading and decrypting the
stored object was a tenth of it; py-spy (``--gil``) put the rest in pynetdicom: ~40% in ``send_msg`` (each
C-STORE-RQ command set and each pending C-GET/C-MOVE response built as a pydicom ``Dataset`` and
encoded by pydicom, the data set copied into P-DATA fragments through ``BytesIO`` and PDU objects),
~35% in the DUL thread (each PDU taken from a queue it polls every 0.5 ms, passed through the state
machine and encoded; each C-STORE-RSP decoded twice by pydicom, by the fast receive path's check and by
pynetdicom's DIMSE provider), the rest in queues and thread hand-overs.

Here, when an instance goes out in its stored transfer syntax (the usual case), the association thread

* encodes the C-STORE-RQ command set itself (:func:`encode_store_request`),
* cuts the P-DATA-TF PDUs of the command and of the stored data set straight from the decrypted Part 10
  buffer: memoryview slices past the file meta group, no copy, each no longer than the peer's maximum
  PDU length (:func:`pdata_pdus`),
* hands them to the association's DUL thread as one :class:`RawPData` through pynetdicom's own outgoing
  queue, so every write to the socket still happens in that one thread and in order with pynetdicom's
  own messages (PS3.8 forbids interleaving; a TLS socket must not be written from two threads), and
  wakes it at once (:meth:`SendDUL.poke`) instead of waiting for its next poll;
* waits for the C-STORE-RSP, which the DUL thread recognises and parses itself
  (:func:`parse_store_response`) and hands over directly.

Pending C-GET and C-MOVE responses without an identifier (one after each sub-operation) are encoded
directly too (:func:`encode_retrieve_response`).  Everything else - negotiation, release, abort, the
timers, C-CANCEL, the final responses with a Failed SOP Instance UID List, instances that must be
transcoded, an unusual or unexpected response - takes pynetdicom's path as before (``raw.py``), and
``server.dimse_send_path = false`` sends everything that way (the reference the tests compare with).

:class:`SendDUL` is the fast receive path's :class:`~.fastpath.StoreDUL` with these additions; a C-MOVE
sub-association, which SafePACS requests, gets one too (:func:`install_send_path`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from safepacs.protocols.dimse.engine.fastpath import (
    StoreDUL,
    _element,
    _ui,
    command_elements,
    command_set,
    install_store_path,
)

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.transport import AssociationSocket

__all__ = [
    "RawPData",
    "SendDUL",
    "StoreResponse",
    "encode_retrieve_response",
    "encode_store_request",
    "install_send_path",
    "parse_store_response",
    "pdata_pdus",
    "send_encoded_response",
    "send_stored",
]

log = logging.getLogger(__name__)

_P_DATA_TF = 0x04
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_C_GET_RSP = 0x8010
_C_MOVE_RSP = 0x8021
_DATA_SET_PRESENT = 0x0001  # what pynetdicom writes; any value but 0x0101 means a data set follows
_NO_DATA_SET = 0x0101
_HEADER = struct.Struct(">BxL")
_ITEM = struct.Struct(">LB")
_US = struct.Struct("<H")

#: The longest PDV fragment sent when the peer announced no maximum PDU length (PS3.8 9.3.1: 0 = none).
_UNLIMITED_FRAGMENT = 1024 * 1024
#: Buffers per ``sendmsg`` call (Linux's IOV_MAX is 1024).
_IOV_BATCH = 512
#: Bytes joined per ``sendall`` on a TLS socket (each write is at least one TLS record).
_TLS_BATCH = 256 * 1024
#: How often a waiting sub-operation also looks at pynetdicom's message queue (an unusual response).
_QUEUE_LOOK = 0.01


# Encoding -------------------------------------------------------------------------------------------


def _text(value: str | bytes) -> bytes:
    raw = value if isinstance(value, bytes) else value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode_store_request(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    priority: int = 2,
    move_originator_aet: str | bytes | None = None,
    move_originator_id: int | None = None,
) -> bytes:
    """A C-STORE-RQ command set with a data set (PS3.7 9.3.1.1), Implicit VR Little Endian (PS3.7 6.3.1),
    byte for byte as pynetdicom encodes it (tests compare), without pydicom's slower general encoder."""
    elements = [
        _element(0x0000, 0x0002, _ui(sop_class_uid)),
        _element(0x0000, 0x0100, _US.pack(_C_STORE_RQ)),
        _element(0x0000, 0x0110, _US.pack(message_id)),
        _element(0x0000, 0x0700, _US.pack(priority)),
        _element(0x0000, 0x0800, _US.pack(_DATA_SET_PRESENT)),
        _element(0x0000, 0x1000, _ui(sop_instance_uid)),
    ]
    if move_originator_aet:
        elements.append(_element(0x0000, 0x1030, _text(move_originator_aet)))
    if move_originator_id is not None:
        elements.append(_element(0x0000, 0x1031, _US.pack(move_originator_id)))
    return command_set(elements)


def encode_retrieve_response(
    command_field: int,
    message_id: int,
    sop_class_uid: str | None,
    status: int,
    counts: Sequence[int | None],
) -> bytes:
    """A C-GET-RSP (``0x8010``) or C-MOVE-RSP (``0x8021``) command set without an identifier (PS3.7
    9.3.3.2, 9.3.4.2), as pynetdicom encodes it; ``counts``: the Number of Remaining, Completed, Failed
    and Warning Sub-operations, each left out when None."""
    elements = []
    if sop_class_uid:
        elements.append(_element(0x0000, 0x0002, _ui(sop_class_uid)))
    elements += [
        _element(0x0000, 0x0100, _US.pack(command_field)),
        _element(0x0000, 0x0120, _US.pack(message_id)),
        _element(0x0000, 0x0800, _US.pack(_NO_DATA_SET)),
        _element(0x0000, 0x0900, _US.pack(status)),
    ]
    for number, value in zip((0x1020, 0x1021, 0x1022, 0x1023), counts, strict=True):
        if value is not None:
            elements.append(_element(0x0000, number, _US.pack(value)))
    return command_set(elements)


@dataclass(frozen=True)
class StoreResponse:
    """What the send path needs of a C-STORE-RSP (PS3.7 9.3.1.2)."""

    message_id: int  # Message ID Being Responded To
    status: int
    plain: bool  # nothing but the usual elements: no Error Comment, Offending Element, ...


#: The elements of a C-STORE-RSP that carry no status detail.
_PLAIN_RSP = frozenset({0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000})


def parse_store_response(raw: bytes) -> StoreResponse | None:
    """A C-STORE-RSP command set read straight from its Implicit VR Little Endian encoding; None for any
    other command and anything unusual (which pynetdicom then decodes as before)."""
    values = command_elements(raw)
    if values is None:
        return None
    field, data_set_type = values.get(0x0100), values.get(0x0800)
    message_id, status = values.get(0x0120), values.get(0x0900)
    if field is None or data_set_type is None or message_id is None or status is None:
        return None
    if not len(field) == len(data_set_type) == len(message_id) == len(status) == 2:
        return None
    if _US.unpack(field)[0] != _C_STORE_RSP or _US.unpack(data_set_type)[0] != _NO_DATA_SET:
        return None
    return StoreResponse(_US.unpack(message_id)[0], _US.unpack(status)[0], values.keys() <= _PLAIN_RSP)


def pdata_pdus(context_id: int, command: bytes, data: memoryview | None, peer_max: int) -> list[Any]:
    """The P-DATA-TF PDUs (PS3.8 9.3.5) of one message, as buffers to write in order: one PDV per PDU,
    none longer than ``peer_max`` (the peer's Maximum Length, 0 for none); the data set's fragments are
    slices of ``data``, not copies."""
    size = max(peer_max - 6, 1) if peer_max else _UNLIMITED_FRAGMENT
    out: list[Any] = []
    for part, flags in ((memoryview(command), 0x01), (data, 0x00)):
        if part is None:
            continue
        total = len(part)
        for start in range(0, max(total, 1), size):
            chunk = part[start : start + size]
            last = 0x02 if start + size >= total else 0x00
            out.append(
                _HEADER.pack(_P_DATA_TF, len(chunk) + 6)
                + _ITEM.pack(len(chunk) + 2, context_id)
                + bytes((flags | last,))
            )
            out.append(chunk)
    return out


# The DUL ---------------------------------------------------------------------------------------------


class RawPData(P_DATA):
    """A P-DATA request whose PDUs are encoded already (:func:`pdata_pdus`); :class:`SendDUL` writes them
    as they are, in its place in pynetdicom's outgoing queue."""

    def __init__(self, buffers: list[Any]) -> None:
        super().__init__()
        self.buffers = buffers
        self.sent = threading.Event()


class _Exchange:
    """A C-STORE-RQ sent by the association thread, waiting for its response from the DUL thread."""

    __slots__ = ("done", "message_id", "raw", "response")

    def __init__(self, message_id: int) -> None:
        self.message_id = message_id
        self.done = threading.Event()
        self.response: StoreResponse | None = None
        self.raw = b""


class SendDUL(StoreDUL):
    """:class:`~.fastpath.StoreDUL` that also writes :class:`RawPData` and hands matching
    C-STORE-RSPs straight to the waiting sub-operation (see the module docstring)."""

    def __init__(self, assoc: Association, *args: Any, **kwargs: Any) -> None:
        super().__init__(assoc, *args, **kwargs)
        self._awaiting: _Exchange | None = None

    def poke(self) -> None:
        """Wake the reactor (the waker every StoreDUL has; nothing once the reactor has ended)."""
        self._waker.set()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            waiting = self._awaiting
            if waiting is not None:
                waiting.done.set()  # no response will come: the waiting sub-operation sees None

    def _abort_now(self) -> None:
        super()._abort_now()
        waiting = self._awaiting
        if waiting is not None:
            waiting.done.set()

    def _process_recv_primitive(self) -> bool:
        try:
            head = self.to_provider_queue.queue[0]
        except IndexError:
            return False
        if not isinstance(head, RawPData):
            return bool(super()._process_recv_primitive())
        self.to_provider_queue.get(False)
        if self.state_machine.current_state == "Sta6":
            self._write(head.buffers)
        else:  # released or aborted meanwhile: nothing more may be sent (PS3.8 Table 9-10)
            log.info("association no longer established; a C-STORE sub-operation was not sent")
        head.sent.set()
        return True

    def _write(self, buffers: list[Any]) -> None:
        sock = cast("AssociationSocket", self.socket).socket
        try:
            if sock is None:
                raise OSError("no socket")
            _send_buffers(sock, buffers)
        except OSError:
            log.info("connection lost while sending a C-STORE sub-operation")
            self.event_queue.put("Evt17")

    def _send(self, pdu: Any) -> None:
        # A stray Evt9 could make pynetdicom's DT-1 take a RawPData for a P-DATA of its own: it would
        # send a P-DATA-TF with no PDV, which PS3.8 9.3.5 does not allow.  Never send one.
        if isinstance(pdu, P_DATA_TF) and not pdu.presentation_data_value_items:
            log.warning("an empty P-DATA-TF was not sent")
            return
        super()._send(pdu)

    def _decide(self, msg: Any, slow: list[bytes]) -> None:
        waiting = self._awaiting
        if waiting is not None and not waiting.done.is_set():
            raw = b"".join(item[6:] for item in msg.held)
            response = parse_store_response(raw)
            if response is not None and response.message_id == waiting.message_id:
                msg.held.clear()
                self._message = None
                waiting.raw, waiting.response = raw, response
                waiting.done.set()
                return
        super()._decide(msg, slow)

    # The association thread's side -------------------------------------------------------------------
    def send_raw(self, buffers: list[Any]) -> RawPData:
        """Queue encoded PDUs to be written in order with pynetdicom's own, and wake the reactor."""
        primitive = RawPData(buffers)
        self.to_provider_queue.put(primitive)
        self.poke()
        return primitive

    def exchange(self, buffers: list[Any], message_id: int, timeout: float | None) -> _Exchange:
        """Send a C-STORE-RQ's PDUs and wait for its response (``response`` None: none came)."""
        waiting = _Exchange(message_id)
        self._awaiting = waiting
        try:
            self.send_raw(buffers)
            deadline = None if timeout is None else time.monotonic() + timeout
            while not waiting.done.wait(_QUEUE_LOOK):
                if not self.assoc.dimse.msg_queue.empty() or not self.is_alive():
                    break  # an unusual response pynetdicom decoded, or the association has ended
                if deadline is not None and time.monotonic() > deadline:
                    break
        finally:
            self._awaiting = None
        return waiting


def _send_buffers(sock: socket.socket, buffers: list[Any]) -> None:
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg; join so that records are not 6-byte headers
        batch: list[Any] = []
        size = 0
        for buf in buffers:
            batch.append(buf)
            size += len(buf)
            if size >= _TLS_BATCH:
                sock.sendall(b"".join(batch))
                batch, size = [], 0
        if batch:
            sock.sendall(b"".join(batch))
        return
    views = [memoryview(buf) for buf in buffers]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + _IOV_BATCH])
        while sent and i < len(views):
            if sent >= len(views[i]):
                sent -= len(views[i])
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


# Sub-operations ---------------------------------------------------------------------------------------


def _peer_max(assoc: Association) -> int:
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return int(peer.maximum_length or 0)


def send_stored(
    assoc: Association,
    context_id: int,
    data: memoryview,
    *,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    priority: int,
    originator_aet: str | bytes | None,
    originator_id: int | None,
) -> StoreResponse | C_STORE | None:
    """Send one C-STORE-RQ with ``data`` (the stored data set, in the context's transfer syntax) over an
    association served by a :class:`SendDUL`, and return its response: as read (:class:`StoreResponse`)
    when it carries nothing but its status, else as pynetdicom's primitive (None when none came, as
    ``get_msg`` would say)."""
    dul = cast(SendDUL, assoc.dul)
    command = encode_store_request(
        message_id, sop_class_uid, sop_instance_uid, priority, originator_aet, originator_id
    )
    buffers = pdata_pdus(context_id, command, data, _peer_max(assoc))
    waiting = dul.exchange(buffers, message_id, assoc.dimse_timeout)
    response = waiting.response
    if response is None:  # nothing we could read ourselves: pynetdicom's message, if any, as before
        return cast("C_STORE | None", assoc.dimse.get_msg(block=False)[1])
    if response.plain:  # its status is all there is to check (``_raw._status_of``)
        return response
    detailed = C_STORE_RSP()  # Error Comment, Offending Element, ...: pynetdicom reads them
    detailed.command_set = decode(BytesIO(waiting.raw), True, True)
    return cast(C_STORE, detailed.message_to_primitive())


def send_encoded_response(assoc: Association, primitive: Any, context_id: int) -> bool:
    """Send a C-GET or C-MOVE response without an identifier straight as bytes; False when it is not one
    (or carries anything else, such as an Error Comment): pynetdicom then sends it."""
    dul = assoc.dul
    if not isinstance(dul, SendDUL) or not isinstance(primitive, C_GET | C_MOVE):
        return False
    if primitive.Identifier is not None or primitive.MessageIDBeingRespondedTo is None:
        return False
    if primitive.Status is None or any(
        getattr(primitive, keyword, None) is not None
        for keyword in ("ErrorComment", "OffendingElement", "ErrorID")
        if hasattr(type(primitive), keyword)
    ):
        return False
    command = encode_retrieve_response(
        _C_GET_RSP if isinstance(primitive, C_GET) else _C_MOVE_RSP,
        int(primitive.MessageIDBeingRespondedTo),
        str(primitive.AffectedSOPClassUID) if primitive.AffectedSOPClassUID else None,
        int(primitive.Status),
        (
            primitive.NumberOfRemainingSuboperations,
            primitive.NumberOfCompletedSuboperations,
            primitive.NumberOfFailedSuboperations,
            primitive.NumberOfWarningSuboperations,
        ),
    )
    dul.send_raw(pdata_pdus(context_id, command, None, _peer_max(assoc)))
    return True


def install_send_path(assoc: Association) -> None:
    """Give an association SafePACS requests (a C-MOVE sub-association, before its socket is made) a
    :class:`SendDUL`; it stores nothing (it has no contexts as SCP), so its handler is never called."""
    install_store_path(assoc, _refuse, 0, dul_type=SendDUL)


def _refuse(*_args: Any) -> int | Dataset:
    return 0xC000
