"""Send stored instances as their stored bytes in C-STORE sub-operations (C-GET, C-MOVE).

pynetdicom's C-GET/C-MOVE service classes send what a handler yields through
``Association.send_c_store``, which re-encodes a pydicom ``Dataset``.  A PACS must hand back what
it was given, byte for byte, and must not decode a 500-slice series to send it.  The handlers
therefore yield a :class:`RawInstance` placeholder and the association's ``send_c_store`` is
wrapped so that a placeholder is sent as the stored data set bytes (or transcoded, when the peer
did not accept the stored transfer syntax; PS3.4 C.4.2.3.1).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE

from safepacs.errors import RetrieveError, SafePacsError
from safepacs.services.retrieve import RetrieveService
from safepacs.services.transcode import choose_transfer_syntax, dataset_bytes, transcode
from safepacs.types import InstanceRef

if TYPE_CHECKING:
    from pynetdicom.association import Association

__all__ = ["RawInstance", "enable_raw_store", "set_nodelay"]

log = logging.getLogger(__name__)


class RawInstance(Dataset):
    """A placeholder for one stored instance; carries only what pynetdicom inspects."""

    def __init__(self, ref: InstanceRef, retrieve: RetrieveService) -> None:
        super().__init__()
        self.SOPClassUID = UID(ref.sop_class_uid)
        self.SOPInstanceUID = UID(ref.sop_instance_uid)
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = UID(ref.transfer_syntax_uid)
        self.ref = ref
        self.retrieve = retrieve


def _accepted_syntaxes(assoc: Association, sop_class_uid: str) -> list[str]:
    out: list[str] = []
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == sop_class_uid and cx.as_scu:
            out += [str(ts) for ts in cx.transfer_syntax]
    return out


def _send_raw(
    assoc: Association,
    inst: RawInstance,
    msg_id: int,
    priority: int,
    originator_aet: str | None,
    originator_id: int | None,
) -> Dataset:
    ref = inst.ref
    accepted = _accepted_syntaxes(assoc, ref.sop_class_uid)
    target = choose_transfer_syntax(ref.transfer_syntax_uid, accepted)
    if target is None:
        raise RetrieveError("the peer accepted no transfer syntax this instance can be sent in")
    part10 = inst.retrieve.read(ref)
    if target == ref.transfer_syntax_uid:
        encoded = dataset_bytes(part10)[1]
    else:
        encoded = transcode(part10, target)
    context = assoc._get_valid_context(ref.sop_class_uid, target, "scu", allow_conversion=False)
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = priority
    req.MoveOriginatorApplicationEntityTitle = originator_aet
    req.MoveOriginatorMessageID = originator_id
    req.AffectedSOPClassUID = ref.sop_class_uid
    req.AffectedSOPInstanceUID = ref.sop_instance_uid
    req.DataSet = BytesIO(encoded)
    # Same hand-over as pynetdicom's own send_c_store: pause the reactor, send, wait for the response.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, cast(int, context.context_id))
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)


def enable_raw_store(assoc: Association) -> None:
    """Make ``assoc.send_c_store`` send :class:`RawInstance` placeholders as stored bytes."""
    original: Callable[..., Dataset] = assoc.send_c_store

    def send_c_store(
        dataset: Any,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        if not isinstance(dataset, RawInstance):
            return original(dataset, msg_id, priority, originator_aet, originator_id)
        try:
            return _send_raw(assoc, dataset, msg_id, priority, originator_aet, originator_id)
        except SafePacsError as exc:
            log.warning("C-STORE sub-operation failed: %s", exc)
            raise

    assoc.send_c_store = send_c_store  # type: ignore[method-assign]


def set_nodelay(sock: socket.socket | None) -> None:
    """TCP_NODELAY: DIMSE sends a small command PDU before the data PDUs; Nagle would stall each one."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
