"""The C-STORE receive path, without pynetdicom's queues, polls and threads in the way.

pynetdicom hands every received PDU from its DUL thread through an event queue, a Python state
machine and a message queue to the association thread, which polls that queue every millisecond;
the response goes back through another queue the DUL thread polls.  Each instance waits for
those polls and costs more CPU than Orthanc spends on the whole store (measured in bench/README.md,
"Baseline measurements").  A modality sends thousands of instances one after the other, so that
is where the time goes.

:class:`StoreDUL` is pynetdicom's DUL provider with two changes:

* its reactor waits on the socket (``select``) instead of sleeping between polls, so a request is
  read as soon as it arrives and an idle association costs almost nothing;
* while the association is established (Sta6), it reads P-DATA-TF PDUs itself.  A complete
  C-STORE-RQ on an accepted context whose abstract syntax is the request's SOP class is stored in
  this thread, through the same handler pynetdicom would call, and its C-STORE-RSP is written to the
  socket at once.  Every other message (C-ECHO, C-FIND, C-GET, C-MOVE, C-CANCEL, responses to our
  own sub-operations, anything unusual) and every other PDU is handed to pynetdicom unchanged, in
  order, as if it had read it itself.  All writes to the socket still happen in this one thread.

It also bounds memory: a PDU longer than the maximum we announced, a command set over 64 KiB, or
a data set over ``storage.max_object_bytes`` is not buffered (the first two abort the association,
the last is drained and refused with a failure status).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

import pynetdicom.association
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dsutils import decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import InvalidEventError

from safepacs.protocols.dimse.engine.pdu import MAX_ASSOCIATE_RQ_BYTES, abort_pdu

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext
    from pynetdicom.transport import AssociationSocket

__all__ = [
    "StoreCommand",
    "StoreDUL",
    "StoreHandler",
    "encode_store_response",
    "install_store_path",
    "parse_store_command",
]

log = logging.getLogger(__name__)

#: ``handler(assoc, transfer_syntax, sop_class_uid, sop_instance_uid, data)`` -> status (int or data set)
StoreHandler = Callable[["Association", str, str, str, bytes], "int | Dataset"]

_P_DATA_TF = 0x04
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_MAX_COMMAND_BYTES = 64 * 1024
_STATUS_CANNOT_UNDERSTAND = 0xC000
_HEADER = struct.Struct(">BxL")
_ITEM = struct.Struct(">LB")
_ELEMENT = struct.Struct("<HHL")

# The reactor's longest wait when neither the peer nor the association thread wakes it (StoreDUL._wait):
# what is left to notice then is a timer (ARTIM) or an event pynetdicom queued without sending a PDU.
_WAIT = 0.01


# The association thread's longest sleep between looks at its timers when nothing wakes it.
_REACTOR_WAIT = 0.05


class _ProtocolError(Exception):
    """The peer broke PS3.8; the association is aborted."""


def _element(group: int, elem: int, value: bytes) -> bytes:
    return _ELEMENT.pack(group, elem, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def command_set(elements: list[bytes]) -> bytes:
    """A command set from its encoded elements (ascending), led by its Command Group Length (0000,0000)."""
    body = b"".join(elements)
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def encode_store_response(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, comment: str | None = None
) -> bytes:
    """A C-STORE-RSP command set (PS3.7 9.3.1.2), Implicit VR Little Endian as PS3.7 6.3.1 requires.

    Written here because pynetdicom's and pydicom's general encoders cost as much for these seven
    elements as storing a small instance (bench/README.md); tests decode it with pynetdicom.
    """
    elements = [
        _element(0x0000, 0x0002, _ui(sop_class_uid)),
        _element(0x0000, 0x0100, struct.pack("<H", _C_STORE_RSP)),
        _element(0x0000, 0x0120, struct.pack("<H", message_id)),
        _element(0x0000, 0x0800, struct.pack("<H", _NO_DATA_SET)),
        _element(0x0000, 0x0900, struct.pack("<H", status)),
    ]
    if comment:  # (0000,0902) Error Comment, LO: before (0000,1000), elements ascend (PS3.5 7.1)
        text = comment[:64].encode("ascii", "replace")
        elements.append(_element(0x0000, 0x0902, text + b" " if len(text) % 2 else text))
    elements.append(_element(0x0000, 0x1000, _ui(sop_instance_uid)))
    return command_set(elements)


@dataclass(frozen=True)
class StoreCommand:
    """What the fast path needs of a C-STORE-RQ command set."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


_US = struct.Struct("<H")


def _ui_text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        return None


def command_elements(raw: bytes) -> dict[int, bytes] | None:
    """The elements of a command set (group 0000, Implicit VR Little Endian, PS3.7 6.3.1) by element
    number, their values undecoded; None when an element lies outside group 0000 or past the end."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = _ELEMENT.unpack_from(raw, offset)
        offset += 8
        if group != 0x0000 or length > end - offset:
            return None
        values[element] = raw[offset : offset + length]
        offset += length
    return values


def parse_store_command(raw: bytes) -> StoreCommand | None:
    """A C-STORE-RQ command set with a data set (PS3.7 9.3.1.1), read straight from its Implicit VR
    Little Endian encoding (PS3.7 6.3.1); None for any other command and anything unusual (an element
    outside group 0000, a length past the end, a malformed value), which pynetdicom then decodes.

    pydicom's decoder and its value converters are slow for this (bench/README.md), and it is every
    instance.
    """
    values = command_elements(raw)
    if values is None:
        return None
    field, data_set_type, message_id = values.get(0x0100), values.get(0x0800), values.get(0x0110)
    if field is None or data_set_type is None or message_id is None:
        return None
    if len(field) != 2 or len(data_set_type) != 2 or len(message_id) != 2:
        return None
    if _US.unpack(field)[0] != _C_STORE_RQ or _US.unpack(data_set_type)[0] == _NO_DATA_SET:
        return None
    sop_class = _ui_text(values.get(0x0002))
    sop_instance = _ui_text(values.get(0x1000, b""))
    if not sop_class or sop_instance is None:
        return None
    return StoreCommand(_US.unpack(message_id)[0], sop_class, sop_instance)


def _decoded_store_command(raw: bytes) -> tuple[StoreCommand | None, bool]:
    """The same through pynetdicom's decoder, and whether a data set follows (for other commands)."""
    try:
        command = decode(BytesIO(raw), True, True)
        has_data = int(command.get("CommandDataSetType", _NO_DATA_SET)) != _NO_DATA_SET
        if has_data and int(command.CommandField) == _C_STORE_RQ and isinstance(command.MessageID, int):
            instance = str(command.get("AffectedSOPInstanceUID", "") or "")
            return StoreCommand(command.MessageID, str(command.AffectedSOPClassUID), instance), True
        return None, has_data
    except Exception:  # noqa: BLE001 - pynetdicom answers malformed commands as it always has
        log.debug("malformed command set; handed to pynetdicom")
        return None, False


def _status_of(result: int | Dataset) -> tuple[int, str | None]:
    if isinstance(result, Dataset):
        comment = result.get("ErrorComment")
        return int(result.Status), (str(comment) if comment else None)
    return int(result), None


class _Message:
    """The DIMSE message being received: its command fragments, then (fast path) its data fragments."""

    __slots__ = ("context", "context_id", "data", "data_size", "fast", "held", "size", "too_large")

    def __init__(self) -> None:
        self.context_id: int | None = None
        self.size = 0  # command bytes so far
        self.held: list[bytes] = []  # the command's raw PDV items, until we know whose they are
        self.fast: StoreCommand | None = None  # the C-STORE-RQ command once it is ours
        self.context: PresentationContext | None = None  # and its accepted presentation context
        self.data: list[memoryview] = []
        self.data_size = 0
        self.too_large = False


class _Waker:
    """A file descriptor that another thread makes readable, to end a ``select`` early: an eventfd
    where the OS has one (one descriptor per association), else a socket pair.  ``set`` after
    ``close`` does nothing, so a descriptor number the OS has handed out again is never written to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._release: Callable[[], object]
        if hasattr(os, "eventfd"):
            self._read = self._write = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            # closes it if the association never ran its reactor
            self._release = weakref.finalize(self, os.close, self._read)
        else:  # pragma: no cover - not Linux
            reader, writer = socket.socketpair()
            reader.setblocking(False)
            writer.setblocking(False)
            self._read, self._write = reader.fileno(), writer.fileno()
            self._release = weakref.finalize(self, _close_pair, (reader, writer))

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(OSError):  # full: it is set already
                os.write(self._write, _ONE)

    def clear(self) -> None:
        """In the thread that waits on it."""
        with contextlib.suppress(OSError):  # not set (BlockingIOError)
            os.read(self._read, 4096)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._release()


_ONE = (1).to_bytes(8, sys.byteorder)  # an eventfd adds this 64-bit value to its counter


def _close_pair(pair: tuple[socket.socket, socket.socket]) -> None:  # pragma: no cover - not Linux
    for sock in pair:
        sock.close()


class StoreDUL(DULServiceProvider):
    """pynetdicom's DUL provider with a select-based reactor and the C-STORE fast path (see the module)."""

    def __init__(self, assoc: Association, handler: StoreHandler, max_object_bytes: int) -> None:
        super().__init__(assoc)
        self._store_handler = handler
        self._max_object_bytes = max_object_bytes
        self._message: _Message | None = None
        self._slow_open = False  # a message handed to pynetdicom is not complete yet
        #: Set whenever this thread has done something the association thread may have to act on.
        self.wake = threading.Event()
        # The other way round: wakes the reactor when the association thread queued something for it
        # (send_pdu, kill_dul, stop_dul); closed when the reactor ends.
        self._waker = _Waker()
        #: The A-ASSOCIATE-RQ PDU read before the association existed (``pending.py``).
        self.preface: bytes | None = None
        #: Seconds a PDU outside Sta6 has to arrive whole (``server.associate_timeout``).
        self.pdu_timeout = 5.0

    # Reactor -------------------------------------------------------------------------------------------
    def run_reactor(self) -> None:
        """pynetdicom's reactor loop, waiting on the socket instead of sleeping between polls."""
        try:
            self._react()
        finally:
            self.wake.set()  # the association thread notices the DUL is gone at once
            self._waker.close()

    def send_pdu(self, primitive: Any) -> None:
        """pynetdicom's: queue ``primitive`` for this thread to send; and wake it to do so now."""
        super().send_pdu(primitive)
        self._waker.set()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._waker.set()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._waker.set()
        return bool(super().stop_dul())

    def _react(self) -> None:
        self._idle_timer.start()
        if self.preface is not None:  # after the connection's Evt5, as pynetdicom would have read it
            pdu, self.preface = self.preface, None
            self._hand_over(pdu)
            try:
                while not self.event_queue.empty():  # Sta3 before the socket is looked at again
                    self.state_machine.do_action(self.event_queue.get(block=False))
            except Exception:
                log.exception("DICOM upper layer failed; aborting the association")
                self._abort_now()
                return
        while not self._kill_thread:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if not self._process_recv_primitive() and self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                log.exception("DICOM upper layer failed; aborting the association")
                self._abort_now()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                self._wait()
                continue
            try:
                self.state_machine.do_action(event)
            except InvalidEventError:  # e.g. our A-ASSOCIATE-RJ after the peer's PDU aborted it already
                log.info("an event the association's state does not allow; aborting the association")
                self._abort_now()
                return
            # Every message, release and abort reaches the association thread through the state
            # machine's actions: wake it (see _ReactorClock).
            self.wake.set()

    def _wait(self) -> None:
        """Sleep until the peer sends, the association thread queues something (``_Waker``) or ``_WAIT``
        has passed.  This thread used to poll pynetdicom's outgoing queue every 0.5 ms while messages
        flowed: between two C-STORE-RQs of a modality that is how often it woke, took the GIL from the
        association storing an instance in the same process and gave it back (~20 times per CT slice
        with two associations per worker on a busy machine), for a queue the fast path leaves empty."""
        # The waker is cleared before the queues are looked at: a wake-up that comes after that look
        # leaves it readable and the select returns at once.  (Clearing it after the select lost the
        # wake-ups that came in between: the association thread's next PDU then waited out _WAIT, 10 ms
        # per instance of a C-GET.)
        self._waker.clear()
        if not self.to_provider_queue.empty() or not self.event_queue.empty():
            return
        sock = getattr(self.socket, "socket", None)
        waits: list[Any] = [self._waker]
        if sock is not None and sock.fileno() >= 0:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return
            waits.append(sock)
        try:
            select.select(waits, [], [], _WAIT)
        except (OSError, ValueError):
            time.sleep(_WAIT)

    def _abort_now(self) -> None:
        """Bypass the state machine: send A-ABORT and stop both reactors (as pynetdicom does on errors).

        What the peer has sent already and nobody will read is read and dropped first: a socket closed
        with unread data answers with a TCP reset, and a reset that overtakes the A-ABORT makes the
        peer's system drop it (the peer sees "connection reset" instead of the abort)."""
        self._drain()
        try:
            cast("AssociationSocket", self.socket).send(abort_pdu(0x00))
        except Exception:  # noqa: BLE001 - the connection may be gone already
            log.debug("A-ABORT could not be sent")
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True
        self.wake.set()
        # What the state machine's abort actions announce; the handlers record the association's
        # stores when it ends (handlers.DimseHandlers.on_close), however it ends.
        info = self.assoc.requestor.address_info
        evt.trigger(self.assoc, evt.EVT_CONN_CLOSE, {"address": info.as_tuple if info else ("", 0)})

    # Reading -------------------------------------------------------------------------------------------
    def _read_pdu_data(self) -> None:
        state = self.state_machine.current_state
        if state == "Sta13":
            self._discard()
            return
        if state == "Sta3":
            # The peer sends before we answered its A-ASSOCIATE-RQ: PS3.8 Table 9-10 (AA-8) aborts on
            # any PDU here, so it is not read at all.
            log.info("the peer sent data before its association was answered; aborting")
            self._abort_now()
            return
        if state != "Sta6":
            self._read_bounded()
            return
        sock = cast("AssociationSocket", self.socket).socket
        assert sock is not None
        try:
            header = self._recv_exact(sock, 6)
            pdu_type, length = _HEADER.unpack(header)
            limit = self._pdu_limit()
            if pdu_type == _P_DATA_TF and limit and length > limit:
                raise _ProtocolError(f"P-DATA-TF of {length} bytes exceeds the maximum PDU length {limit}")
            body = self._recv_exact(sock, length)
        except (OSError, EOFError):
            log.info("connection closed before the whole PDU was received")
            self.event_queue.put("Evt17")
            return
        except _ProtocolError as exc:
            log.warning("aborting association: %s", exc)
            self._abort_now()
            return
        if pdu_type != _P_DATA_TF:
            self._hand_over(header + body)
            return
        try:
            self._on_p_data(body)
        except _ProtocolError as exc:
            log.warning("aborting association: %s", exc)
            self._abort_now()

    def _drain(self, reads: int = 16) -> None:
        """Read and drop what has arrived (at most ``reads`` x 64 KiB), without waiting for more."""
        sock = getattr(self.socket, "socket", None)
        if sock is None:
            return
        try:
            sock.settimeout(0.0)
            for _ in range(reads):
                if not sock.recv(65536):
                    return
        except OSError:  # nothing more to read (BlockingIOError, SSLWantReadError), or gone
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(None)

    def _discard(self) -> None:
        """Sta13 (the association is over; waiting for the peer to close, ARTIM running): whatever the
        peer sends is ignored (PS3.8 Table 9-10, AA-6/AA-7), so it is read and dropped without waiting
        for a whole PDU - a peer that keeps sending cannot keep the association past ARTIM."""
        sock = cast("AssociationSocket", self.socket).socket
        if sock is None:
            return
        sock.settimeout(0.0)
        try:
            if not sock.recv(65536):
                self.event_queue.put("Evt17")
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except OSError:
            self.event_queue.put("Evt17")
        finally:
            sock.settimeout(None)

    def _read_bounded(self) -> None:
        """Any other state but Sta6: one PDU, whole within ``pdu_timeout`` and no longer than it may be
        (an A-ASSOCIATE-RQ, or a P-DATA-TF of our maximum), handed to pynetdicom.  pynetdicom's own
        reader would wait for ever for a PDU announced and never sent: in Sta3, while the gate
        decides, that held the association, and its place, indefinitely."""
        sock = cast("AssociationSocket", self.socket).socket
        if sock is None:
            return
        deadline = time.monotonic() + self.pdu_timeout
        try:
            header = self._recv_by(sock, 6, deadline)
            pdu_type, length = _HEADER.unpack(header)
            limit = self._pdu_limit() if pdu_type == _P_DATA_TF else MAX_ASSOCIATE_RQ_BYTES
            if limit and length > limit:
                raise _ProtocolError(f"a PDU of type {pdu_type} announced {length} bytes")
            body = self._recv_by(sock, length, deadline)
        except (OSError, EOFError):  # closed, reset, or not sent in time (TimeoutError)
            self.event_queue.put("Evt17")
            return
        except _ProtocolError as exc:
            log.warning("aborting association: %s", exc)
            self._abort_now()
            return
        self._hand_over(header + body)

    @staticmethod
    def _recv_by(sock: socket.socket, size: int, deadline: float) -> bytearray:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        try:
            while got < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise EOFError
                got += n
        finally:
            sock.settimeout(None)
        return buf

    def _pdu_limit(self) -> int:
        ours = int(self.assoc.acceptor.maximum_length or 0)
        return ours + 6 if ours else 0

    @staticmethod
    def _recv_exact(sock: socket.socket, size: int) -> bytearray:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise EOFError
            got += n
        return buf

    def _hand_over(self, pdu: bytes | bytearray) -> None:
        """Give a PDU to pynetdicom exactly as its own reader would have."""
        try:
            decoded, event = self._decode_pdu(bytearray(pdu))
        except Exception:  # noqa: BLE001 - undecodable: pynetdicom's answer is Evt19 (abort)
            log.warning("undecodable PDU received; aborting the association")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _hand_over_items(self, items: list[bytes]) -> None:
        if items:
            body = b"".join(items)
            self._hand_over(_HEADER.pack(_P_DATA_TF, len(body)) + body)

    # P-DATA --------------------------------------------------------------------------------------------
    def _on_p_data(self, body: bytearray) -> None:
        view = memoryview(body)
        slow: list[bytes] = []  # consecutive items for pynetdicom, sent as one PDU in order
        offset = 0
        while offset < len(body):
            if len(body) - offset < 6:
                raise _ProtocolError("a presentation data value item is cut short")
            item_length, context_id = _ITEM.unpack_from(body, offset)
            end = offset + 4 + item_length
            if item_length < 2 or end > len(body):
                raise _ProtocolError("a presentation data value item has an invalid length")
            control = body[offset + 5]
            fragment = view[offset + 6 : end]
            item = view[offset:end]
            offset = end
            if self._slow_open and control & 1:
                self._end_slow()  # a new message although the data set was due: pynetdicom judges it
            if self._slow_open:  # the data set of a message pynetdicom is receiving
                slow.append(bytes(item))
                if control & 2:
                    self._end_slow()
                continue
            msg = self._message or _Message()
            self._message = msg
            if msg.context_id is None:
                msg.context_id = context_id
            elif msg.context_id != context_id:
                raise _ProtocolError("one message's fragments arrive on different presentation contexts")
            if msg.fast is None:
                if not control & 1:
                    raise _ProtocolError("a data fragment arrived before its command was complete")
                msg.held.append(bytes(item))
                msg.size += len(fragment)
                if msg.size > _MAX_COMMAND_BYTES:
                    raise _ProtocolError("the command set is larger than 64 KiB")
                if control & 2:
                    self._decide(msg, slow)
                continue
            # data fragment of a C-STORE-RQ we are storing
            if control & 1:
                raise _ProtocolError("a command fragment arrived in the middle of a data set")
            msg.data_size += len(fragment)
            if msg.data_size > self._max_object_bytes:
                msg.too_large = True
                msg.data.clear()
            elif not msg.too_large:
                msg.data.append(fragment)
            if control & 2:
                self._message = None
                self._hand_over_items(slow)
                slow = []
                self._store(msg)
        self._hand_over_items(slow)

    def _end_slow(self) -> None:
        self._message = None
        self._slow_open = False

    def _decide(self, msg: _Message, slow: list[bytes]) -> None:
        """The command is complete: keep a C-STORE-RQ we can store, hand anything else to pynetdicom."""
        # each held item: length (4), context ID (1), message control header (1), fragment
        raw = b"".join(item[6:] for item in msg.held)
        command, has_data = parse_store_command(raw), True
        if command is None:
            command, has_data = _decoded_store_command(raw)
        context = self._store_context(msg.context_id, command.sop_class_uid) if command else None
        if context is not None:
            msg.fast, msg.context = command, context
            msg.held.clear()
            return
        slow.extend(msg.held)
        msg.held.clear()
        self._message = None
        self._slow_open = has_data  # its data set follows: hand that over too

    def _store_context(self, context_id: int | None, sop_class_uid: str) -> PresentationContext | None:
        cx = self.assoc._accepted_cx.get(cast(int, context_id))
        if cx is None or not cx.as_scp or cx.abstract_syntax != sop_class_uid:
            return None
        return cx

    # Storing -------------------------------------------------------------------------------------------
    def _store(self, msg: _Message) -> None:
        command = cast(StoreCommand, msg.fast)
        sop_class, sop_instance = command.sop_class_uid, command.sop_instance_uid
        context = cast("PresentationContext", msg.context)
        if msg.too_large:
            log.warning("C-STORE refused: the object is larger than storage.max_object_bytes")
            status = _STATUS_CANNOT_UNDERSTAND
            comment: str | None = f"the object is larger than {self._max_object_bytes} bytes"
        else:
            data = b"".join(msg.data)
            msg.data.clear()
            syntax = str(context.transfer_syntax[0])
            status, comment = _status_of(
                self._store_handler(self.assoc, syntax, sop_class, sop_instance, data)
            )
        rsp = encode_store_response(command.message_id, sop_class, sop_instance, status, comment)
        self._send_command(cast(int, msg.context_id), rsp)

    def _send_command(self, context_id: int, command: bytes) -> None:
        """Send a command set as P-DATA-TF PDUs no longer than the peer accepts (PS3.8 9.3.5)."""
        peer_max = int(self.assoc.requestor.maximum_length or 0)
        size = max(peer_max - 6, 1) if peer_max else len(command)
        out = []
        for start in range(0, len(command), size):
            chunk = command[start : start + size]
            last = start + size >= len(command)
            item = _ITEM.pack(len(chunk) + 2, context_id) + bytes((0x03 if last else 0x01,)) + chunk
            out.append(_HEADER.pack(_P_DATA_TF, len(item)) + item)
        sock = cast("AssociationSocket", self.socket).socket
        assert sock is not None
        try:
            sock.sendall(b"".join(out))
        except OSError:
            log.info("connection lost while sending a C-STORE response")
            self.event_queue.put("Evt17")


class _ReactorClock:
    """``time`` as pynetdicom's association module sees it (installed by :func:`install_store_path`).

    pynetdicom's acceptor reactor (``Association._run_reactor``) polls its queues every millisecond:
    a thousand wake-ups a second per association, each taking the GIL from the thread that is
    storing instances.  In that loop, and only there, an association served by a :class:`StoreDUL`
    instead waits until the DUL has acted (``StoreDUL.wake``: set after every state machine action,
    which is how each message, release and abort reaches the association) or ``_REACTOR_WAIT`` has
    passed (its timers).  Every other ``time`` use in that module is the real one.
    """

    _reactor = pynetdicom.association.Association._run_reactor.__code__

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        wake = getattr(getattr(threading.current_thread(), "dul", None), "wake", None)
        if wake is None or sys._getframe(1).f_code is not self._reactor:
            time.sleep(seconds)
            return
        wake.wait(_REACTOR_WAIT)
        wake.clear()  # before the loop looks at its queues: a later set is a later item


def install_store_path(
    assoc: Association,
    handler: StoreHandler,
    max_object_bytes: int,
    *,
    preface: bytes | None = None,
    pdu_timeout: float = 5.0,
    dul_type: type[StoreDUL] = StoreDUL,
) -> None:
    """Give an accepted (not yet started) association the :class:`StoreDUL`; ``preface``: the PDU its
    connection sent already (its A-ASSOCIATE-RQ), which the DUL takes as received first;
    ``pdu_timeout``: seconds a PDU has to arrive whole outside the established association;
    ``dul_type``: a subclass (``sendpath.SendDUL``, which also sends C-GET/C-MOVE sub-operations)."""
    if not isinstance(getattr(pynetdicom.association, "time", None), _ReactorClock):
        setattr(pynetdicom.association, "time", _ReactorClock())  # noqa: B010 - see _ReactorClock
    old = assoc.dul
    dul = dul_type(assoc, handler, max_object_bytes)
    dul.preface = preface
    dul.pdu_timeout = pdu_timeout
    dul.socket = old.socket
    # the socket announced the connection (Evt5) on the old provider's queues already
    dul.event_queue, dul.to_provider_queue = old.event_queue, old.to_provider_queue
    dul.to_user_queue, dul._recv_pdu = old.to_user_queue, old._recv_pdu
    assoc.dul = dul
    # pynetdicom's timeout setters configure the DUL's timers; apply them to the new one
    assoc.acse_timeout = assoc.acse_timeout
    assoc.network_timeout = assoc.network_timeout
