"""Pending C-FIND responses written straight to the association, without pynetdicom's message path.

pynetdicom sends each pending C-FIND-RSP by encoding the handler's ``Dataset`` with pydicom, building
and encoding a command set, fragmenting both into P-DATA primitives and queueing those for the DUL
thread, which polls its queue, runs the state machine and encodes each PDU again.  With the data set
built per match, that took about ten times the server CPU the query itself costs per match
(measured in bench/README.md, "C-FIND encoding").

:class:`FindResponder` takes identifiers encoded already (from the index rows:
:meth:`~safepacs.services.query.QueryService.find_encoded`) and writes each pending response as
pynetdicom would frame it - the command set (Implicit VR Little Endian, PS3.7 6.3.1; the same bytes
for every pending response of a request) in its own P-DATA-TF PDU, then the identifier, each
fragmented to the peer's maximum PDU length (PS3.8 9.3.5) - gathering several responses into one
socket write.  The final response (success, cancel, failure) still goes through pynetdicom.

The PDUs go out like C-GET/C-MOVE sub-operations (``sendpath.py``): handed to the association's
:class:`~.sendpath.SendDUL` through pynetdicom's own outgoing queue, so that its thread
writes them, in order with pynetdicom's own messages (the final response comes after them) and on
DICOM TLS too; the association's thread goes on encoding meanwhile.  With ``server.dimse_send_path``
off (no ``SendDUL``), pynetdicom sends every response as before: the reference the tests compare with.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from safepacs.protocols.dimse.engine.fastpath import _element, _ui, command_set

__all__ = ["FindResponder", "encode_find_response", "sends_raw"]

_C_FIND_RSP = 0x8020
_DATA_SET_PRESENT = 0x0001  # what pynetdicom writes; PS3.7 E.2: anything but 0x0101
_NO_DATA_SET = 0x0101
_PENDING = 0xFF00
_US = struct.Struct("<H")
_PDU = struct.Struct(">BxLLB")  # P-DATA-TF header, then one PDV item's length and context ID
_P_DATA_TF = 0x04
#: Responses are gathered up to about this many bytes per socket write.
_WRITE_BYTES = 64 * 1024
#: How often a writer waiting for the previous batch to go out looks whether the association ended.
_SENT_LOOK = 0.1

#: Writes whole PDUs in order; False once the association is gone.
Writer = Callable[[bytes], bool]


def encode_find_response(message_id: int, sop_class_uid: str, status: int, *, identifier: bool) -> bytes:
    """A C-FIND-RSP command set (PS3.7 9.3.2.2) as pynetdicom encodes it: Affected SOP Class UID,
    Command Field, Message ID Being Responded To, Command Data Set Type, Status."""
    return command_set(
        [
            _element(0x0000, 0x0002, _ui(sop_class_uid)),
            _element(0x0000, 0x0100, _US.pack(_C_FIND_RSP)),
            _element(0x0000, 0x0120, _US.pack(message_id)),
            _element(0x0000, 0x0800, _US.pack(_DATA_SET_PRESENT if identifier else _NO_DATA_SET)),
            _element(0x0000, 0x0900, _US.pack(status)),
        ]
    )


def fragments(context_id: int, value: bytes, max_pdu: int, *, command: bool) -> list[bytes]:
    """``value`` as P-DATA-TF PDUs of one PDV each, as pynetdicom's ``DIMSEMessage.encode_msg``
    fragments it: at most ``max_pdu`` - 6 bytes of value per PDV (0: no limit), the message control
    header's last-fragment bit on the last one (PS3.8 E.2)."""
    size = max_pdu - 6 if max_pdu else max(len(value), 1)
    chunks = [value[start : start + size] for start in range(0, len(value), size)] or [b""]
    kind = 0x01 if command else 0x00
    out = []
    for n, chunk in enumerate(chunks):
        control = kind | (0x02 if n == len(chunks) - 1 else 0x00)
        out.append(
            _PDU.pack(_P_DATA_TF, len(chunk) + 6, len(chunk) + 2, context_id) + bytes((control,)) + chunk
        )
    return out


class FindResponder:
    """Writes the pending responses of one C-FIND request (see the module docstring)."""

    def __init__(
        self, write: Writer, context_id: int, message_id: int, sop_class_uid: str, max_pdu: int
    ) -> None:
        self._write = write
        self._context_id = context_id
        self._max_pdu = max_pdu
        command = encode_find_response(message_id, sop_class_uid, _PENDING, identifier=True)
        self._command = b"".join(fragments(context_id, command, max_pdu, command=True))
        self._held: list[bytes] = []
        self._size = 0
        self.alive = True

    def pending(self, identifier: bytes) -> bool:
        """Add one pending response carrying ``identifier``; False once the connection is gone."""
        self._held.append(self._command)
        self._held.extend(fragments(self._context_id, identifier, self._max_pdu, command=False))
        self._size += len(self._command) + len(identifier) + 12
        if self._size >= _WRITE_BYTES:
            self.flush()
        return self.alive

    def flush(self) -> None:
        """Write what is held (before the final response goes out through pynetdicom)."""
        if self._held and self.alive:
            self.alive = self._write(b"".join(self._held))
        self._held.clear()
        self._size = 0

    @classmethod
    def for_association(
        cls, assoc: Any, context_id: int, message_id: int, sop_class_uid: str
    ) -> FindResponder | None:
        """A responder on ``assoc``; None when its DUL is not a ``SendDUL`` (``server.dimse_send_path``
        off, or an association pynetdicom serves itself) and pynetdicom sends everything as before."""
        if not sends_raw(assoc):
            return None
        dul = assoc.dul
        return cls(
            _writer(assoc, dul), context_id, message_id, sop_class_uid, int(assoc.dimse.maximum_pdu_size or 0)
        )


def sends_raw(assoc: Any) -> bool:
    """Whether ``assoc`` is served by a ``SendDUL``, which writes PDUs encoded already
    (``server.dimse_send_path``)."""
    return callable(getattr(getattr(assoc, "dul", None), "send_raw", None))


def _writer(assoc: Any, dul: Any) -> Writer:
    """Queue each batch for the DUL thread once the one before it is written: the association's thread
    encodes the next batch meanwhile, but never runs far ahead of the socket, so that a C-CANCEL that
    arrives while the peer is slow to read still stops the answers not sent yet (the DUL thread reads
    it between two writes)."""
    queued: list[Any] = []

    def write(data: bytes) -> bool:
        while queued and not queued[0].sent.wait(_SENT_LOOK):
            if not (assoc.is_established and dul.is_alive()):
                return False
        queued.clear()
        if not (assoc.is_established and dul.is_alive()):
            return False
        queued.append(dul.send_raw([data]))
        return True

    return write
