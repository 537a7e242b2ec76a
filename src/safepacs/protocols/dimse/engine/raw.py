"""Send stored instances as their stored bytes in C-STORE sub-operations (C-GET, C-MOVE).

pynetdicom's C-GET/C-MOVE service classes send what a handler yields through
``Association.send_c_store``, which re-encodes a pydicom ``Dataset``.  A PACS must hand back what
it was given, byte for byte, and must not decode a 500-slice series to send it.  The handlers
therefore yield a :class:`RawInstance` placeholder and the association's ``send_c_store`` is
wrapped so that a placeholder is sent as the stored data set bytes (or transcoded, when the peer
did not accept the stored transfer syntax; PS3.4 C.4.2.3.1).  An instance that cannot be read
(its stored object fails its integrity check) raises, and pynetdicom counts that sub-operation as
failed and lists it in the Failed SOP Instance UID List of the final response.

The transfer syntax of each sub-operation is chosen per instance among the contexts the peer accepted
for its SOP class (:func:`~safepacs.dicom.transcode.choose_transfer_syntax`): the stored one, else
Explicit, then Implicit VR Little Endian, else a lossless compressed syntax SafePACS encodes into.

An association serving a retrieve is not idle: pynetdicom restarts its network timer
(``server.network_timeout``) only when data arrives, and checks it once the request has been served,
so a C-MOVE that ran longer than the timeout (the requestor sends nothing while it waits) was answered
and then aborted instead of released.  :func:`enable_raw_store` restarts the timer when a request has
been served; a C-MOVE sub-association's reactor, which checks it between sub-operations, is held while
an instance is read and converted, as pynetdicom holds it while a message is sent and answered.

That final response (Warning, Failure or Cancel, PS3.4 C.4.2.1.5 / C.4.3.1.3) carries the list as
an Identifier.  :func:`enable_raw_store` also makes it go out as one P-DATA-TF PDU, the command and
the identifier as two PDVs (PS3.8 9.3.5 allows several PDVs in one PDU), when that fits the peer's
maximum PDU length: DCMTK's ``getscu`` (``DcmSCU``) reads the command of a C-GET-RSP but not its
data set, and a PDU left unread fails its association release ("P-Data PDU arrived"); a PDV left
in a PDU it has read already is not looked at.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse import _RSP_TO_MESSAGE
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from safepacs.dicom.transcode import choose_transfer_syntax, dataset_bytes, dataset_offset, transcode
from safepacs.errors import RetrieveError, SafePacsError
from safepacs.protocols.dimse.engine.sendpath import (
    SendDUL,
    StoreResponse,
    send_encoded_response,
    send_stored,
)
from safepacs.types import InstanceRef

if TYPE_CHECKING:
    from pynetdicom.association import Association

__all__ = ["RawInstance", "enable_raw_store", "set_nodelay"]

log = logging.getLogger(__name__)


class RawInstance(Dataset):
    """A placeholder for one stored instance; carries only what pynetdicom inspects.

    pynetdicom's C-GET and C-MOVE service classes want a ``Dataset`` per sub-operation: one that is
    true (``status == Pending and dataset``), and whose ``SOPInstanceUID`` goes into the Failed SOP
    Instance UID List when its sub-operation fails.  They read nothing else of it (no SafePACS model
    is Composite Instance Retrieve Without Bulk Data, whose service class removes elements).  Setting
    those two UIDs and a file meta group as data elements cost (pydicom checks each UID against a
    regular expression) half the CPU the whole sub-operation may take (bench/README.md); so nothing
    of ``Dataset`` is initialised here, and the UIDs are plain attributes read off the reference.
    """

    def __init__(self, ref: InstanceRef, read: Callable[[InstanceRef], bytes]) -> None:
        """``read``: the retrieval's (:meth:`~safepacs.services.retrieve.Retrieval.read`), which checks
        the stored object and records one that fails its check."""
        # Dataset.__init__ and Dataset.__setattr__ skipped on purpose (see the class docstring).
        object.__setattr__(self, "ref", ref)
        object.__setattr__(self, "read", read)

    ref: InstanceRef
    read: Callable[[InstanceRef], bytes]

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:  # an empty Dataset is false; this one never is
        return 1

    @property
    def SOPClassUID(self) -> UID:
        return UID(self.ref.sop_class_uid)

    @property
    def SOPInstanceUID(self) -> UID:
        return UID(self.ref.sop_instance_uid)

    def __repr__(self) -> str:
        return f"RawInstance({self.ref.sop_instance_uid})"


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
) -> Dataset | StoreStatus:
    ref = inst.ref
    accepted = _accepted_syntaxes(assoc, ref.sop_class_uid)
    target = choose_transfer_syntax(ref.transfer_syntax_uid, accepted)
    if target is None:
        raise RetrieveError("the peer accepted no transfer syntax this instance can be sent in")
    # As pynetdicom's own send_c_store, but the reactor (and its network timer) is held from before the
    # instance is read and converted, which may take longer than the timeout, until the response is in.
    assoc._reactor_checkpoint.clear()
    wake = getattr(assoc.dul, "wake", None)  # a StoreDUL's reactor waits on it (fastpath._ReactorClock)
    if wake is not None:
        wake.set()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        part10 = inst.read(ref)
        context = assoc._get_valid_context(ref.sop_class_uid, target, "scu", allow_conversion=False)
        if target == ref.transfer_syntax_uid and isinstance(assoc.dul, SendDUL):
            rsp = send_stored(
                assoc,
                cast(int, context.context_id),
                memoryview(part10)[dataset_offset(part10)[1] :],
                message_id=msg_id,
                sop_class_uid=ref.sop_class_uid,
                sop_instance_uid=ref.sop_instance_uid,
                priority=priority,
                originator_aet=originator_aet,
                originator_id=originator_id,
            )
        else:
            rsp = _send_slow(assoc, part10, ref, target, cast(int, context.context_id), msg_id, priority,
                             originator_aet, originator_id)  # fmt: skip
        del part10
    finally:
        assoc._reactor_checkpoint.set()
    return _status_of(assoc, rsp)


def _send_slow(
    assoc: Association,
    part10: bytes,
    ref: InstanceRef,
    target: str,
    context_id: int,
    msg_id: int,
    priority: int,
    originator_aet: str | None,
    originator_id: int | None,
) -> Any:
    """pynetdicom's way: the data set (transcoded when the peer did not accept the stored syntax) through
    its encoders and queues."""
    if target == ref.transfer_syntax_uid:
        encoded = dataset_bytes(part10)[1]
    else:
        encoded = transcode(part10, target)
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = priority
    req.MoveOriginatorApplicationEntityTitle = originator_aet
    req.MoveOriginatorMessageID = originator_id
    req.AffectedSOPClassUID = ref.sop_class_uid
    req.AffectedSOPInstanceUID = ref.sop_instance_uid
    req.DataSet = BytesIO(encoded)
    del encoded
    assoc.dimse.send_msg(req, context_id)
    return assoc.dimse.get_msg(block=True)[1]


class StoreStatus:
    """The status of a C-STORE sub-operation whose response carried nothing else: all pynetdicom's
    service class reads of what ``send_c_store`` returns (``.Status``).  pynetdicom's own check
    (``Association._check_received_status``) builds a pydicom ``Dataset`` for it, which costs more
    than the rest of handling the response."""

    __slots__ = ("Status",)

    def __init__(self, status: int) -> None:
        self.Status = status


def _status_of(assoc: Association, rsp: Any) -> Dataset | StoreStatus:
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    if isinstance(rsp, StoreResponse):  # message ID and status present: a valid response
        return StoreStatus(rsp.status)
    return assoc._check_received_status(rsp)


def enable_raw_store(assoc: Association) -> None:
    """Make ``assoc.send_c_store`` send :class:`RawInstance` placeholders as stored bytes, send final
    retrieve responses whole, and keep the association from timing out while it serves a request."""
    original: Callable[..., Dataset] = assoc.send_c_store

    def send_c_store(
        dataset: Any,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset | StoreStatus:
        if not isinstance(dataset, RawInstance):
            return original(dataset, msg_id, priority, originator_aet, originator_id)
        try:
            return _send_raw(assoc, dataset, msg_id, priority, originator_aet, originator_id)
        except SafePacsError as exc:
            log.warning("C-STORE sub-operation failed: %s", exc)
            raise

    assoc.send_c_store = send_c_store  # type: ignore[method-assign,assignment]
    _send_final_responses_whole(assoc)
    _busy_is_not_idle(assoc)


def _busy_is_not_idle(assoc: Association) -> None:
    """Restart the association's network timer once a request has been served (see the module
    docstring): a peer waiting for its C-MOVE, C-GET or C-FIND to finish is not idle."""
    serve: Callable[[Any, int], None] = assoc._serve_request

    def _serve_request(msg: Any, context_id: int) -> None:
        try:
            serve(msg, context_id)
        finally:
            assoc.dul._idle_timer.restart()

    assoc._serve_request = _serve_request  # type: ignore[method-assign]


def _send_final_responses_whole(assoc: Association) -> None:
    """Send a C-GET or C-MOVE response that carries an Identifier (the final one of a retrieve with
    failures) as one P-DATA-TF PDU when it fits the peer's maximum PDU length (see the module
    docstring); every other message as pynetdicom sends it."""
    dimse = assoc.dimse
    original: Callable[[Any, int], None] = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if send_encoded_response(assoc, primitive, context_id):
            return
        if not (
            isinstance(primitive, C_GET | C_MOVE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Identifier is not None
        ):
            original(primitive, context_id)
            return
        message = _RSP_TO_MESSAGE[type(primitive)]()
        message.primitive_to_message(primitive)
        message.context_id = context_id
        pdus = list(message.encode_msg(context_id, dimse.maximum_pdu_size))
        items = [item for pdu in pdus for item in pdu.presentation_data_value_list]
        limit = dimse.maximum_pdu_size
        # A PDV item: 4 bytes of length, the context ID, then the data (its control header first).
        if len(pdus) > 1 and (not limit or sum(5 + len(data) for _, data in items) <= limit):
            whole = P_DATA()
            whole.presentation_data_value_list.extend(items)
            pdus = [whole]
        evt.trigger(assoc, evt.EVT_DIMSE_SENT, {"message": message})
        for pdu in pdus:
            dimse.dul.send_pdu(pdu)

    dimse.send_msg = send_msg  # type: ignore[method-assign]


def set_nodelay(sock: socket.socket | None) -> None:
    """TCP_NODELAY: DIMSE sends a small command PDU before the data PDUs; Nagle would stall each one."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
