"""Upper-layer PDUs SafePACS reads or writes outside an association, through pynetdicom's PDU classes.

Before a connection becomes an association (``pending.py``) its A-ASSOCIATE-RQ is decoded as pynetdicom
will decode it (PS3.8 Table 9-10, AE-6): one it could not read would leave its association waiting.  An
A-ABORT sent before admission, or by the receive path past pynetdicom's state machine
(:meth:`~safepacs.protocols.dimse.engine.fastpath.StoreDUL._abort_now`), is encoded by pynetdicom too.
"""

from __future__ import annotations

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RQ

__all__ = ["MAX_ASSOCIATE_RQ_BYTES", "abort_pdu", "check_associate_rq"]

#: The longest A-ASSOCIATE-RQ PDU accepted.  128 presentation contexts (PS3.8 9.3.2.2) with a dozen
#: transfer syntaxes each, role selection and extended negotiation for each, and a 64 KiB user identity
#: item stay well under it.
MAX_ASSOCIATE_RQ_BYTES = 256 * 1024

#: A-ABORT source: DICOM UL service-provider (initiated abort), PS3.8 9.3.8.
SOURCE_PROVIDER = 0x02


def check_associate_rq(pdu: bytes) -> None:
    """Decode a whole A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) and its primitive as pynetdicom will; raises
    whatever its decoder trips on when the PDU is malformed."""
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(pdu)
    decoded.to_primitive()


def abort_pdu(reason: int, source: int = SOURCE_PROVIDER) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8) with ``source`` and ``reason``/diagnostic."""
    pdu = A_ABORT_RQ()
    pdu.source = source
    pdu.reason_diagnostic = reason
    return bytes(pdu.encode())
