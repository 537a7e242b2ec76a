"""Pending C-FIND responses written straight to the association, without pynetdicom's message path.

pynetdicom sends each pending C-FIND-RSP by encoding the handler's ``Dataset`` with pydicom, building
and encoding a command set, fragmenting both into P-DATA primitives and queueing those for the DUL
thread, which polls its queue, runs the state machine and encodes each PDU again.  With the data set
built per match, that was ~1 ms of server CPU per match, where the query itself costs a tenth of it
(bench/README.md, "C-FIND encoding").

:class:`FindResponder` takes identifiers encoded already (from the index rows:
:meth:`~safepacs.services.query.QueryService.find_encoded`) and writes each pending response as
pynetdicom would frame it - the command set (Implicit VR Little Endian, PS3.7 6.3.1; the same bytes
for every pending response of a request) in its own P-DATA-TF PDU, then the identifier, each
fragmented to the peer's maximum PDU length (PS3.8 9.3.5) - gathering several responses into one
socket write.  The final response (success, cancel, failure) still goes through pynetdicom.

On a plain TCP connection served by :class:`~safepacs.dimse.fastpath.StoreDUL` the bytes go to the
socket from the association's thread, under the DUL's send lock, so that they never interleave with
what the DUL thread sends.  On DICOM TLS an ``SSLSocket`` must not be written by one thread while
another reads it, so there the PDUs are queued for the DUL thread as pynetdicom queues its own; only
the encoding is saved.
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Callable
from typing import Any

from pynetdicom.pdu_primitives import P_DATA

from safepacs.dimse.fastpath import _element, _ui

__all__ = ["FindResponder", "encode_find_response"]

_C_FIND_RSP = 0x8020
_DATA_SET_PRESENT = 0x0001  # what pynetdicom writes; PS3.7 E.2: anything but 0x0101
_NO_DATA_SET = 0x0101
_PENDING = 0xFF00
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_PDU = struct.Struct(">BxLLB")  # P-DATA-TF header, then one PDV item's length and context ID
_P_DATA_TF = 0x04
#: Responses are gathered up to about this many bytes per socket write.
_WRITE_BYTES = 64 * 1024

#: A socket writer: the bytes, whole; False once the connection is gone.
Writer = Callable[[bytes], bool]


def encode_find_response(message_id: int, sop_class_uid: str, status: int, *, identifier: bool) -> bytes:
    """A C-FIND-RSP command set (PS3.7 9.3.2.2) as pynetdicom encodes it: Affected SOP Class UID,
    Command Field, Message ID Being Responded To, Command Data Set Type, Status."""
    body = b"".join(
        (
            _element(0x0000, 0x0002, _ui(sop_class_uid)),
            _element(0x0000, 0x0100, _US.pack(_C_FIND_RSP)),
            _element(0x0000, 0x0120, _US.pack(message_id)),
            _element(0x0000, 0x0800, _US.pack(_DATA_SET_PRESENT if identifier else _NO_DATA_SET)),
            _element(0x0000, 0x0900, _US.pack(status)),
        )
    )
    return _element(0x0000, 0x0000, _UL.pack(len(body))) + body


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
        """A responder on ``assoc`` (a pynetdicom association served by a ``StoreDUL``); None when
        the association is not one, and pynetdicom sends everything as before."""
        dul = getattr(assoc, "dul", None)
        send_direct = getattr(dul, "send_direct", None)
        if send_direct is None:
            return None
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        max_pdu = int(assoc.dimse.maximum_pdu_size or 0)
        if isinstance(sock, ssl.SSLSocket):
            write: Writer = _queued(dul, context_id)
        else:
            write = send_direct
        return cls(write, context_id, message_id, sop_class_uid, max_pdu)


def _queued(dul: Any, context_id: int) -> Writer:
    """A writer that hands each PDU to the DUL thread as a P-DATA primitive (DICOM TLS)."""

    def write(data: bytes) -> bool:
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset + 2 : offset + 6], "big")
            pdu = data[offset + 6 : offset + 6 + length]
            offset += 6 + length
            primitive = P_DATA()
            # one PDV per PDU: its length (4), context ID (1), then the control header and the value
            primitive.presentation_data_value_list.append((context_id, bytes(pdu[5:])))
            dul.send_pdu(primitive)
        return True

    return write
