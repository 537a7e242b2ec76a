"""DIMSE event handlers: thin translations between pynetdicom events and the services.

Each handler takes the association's principal, calls one service, and maps errors to status
codes through ``status.py``; nothing here decides access or matches queries itself.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context

from safepacs.audit.events import AuditObject, EventID, ObjectKind, Participant
from safepacs.errors import AccessDenied, AuditError, QueryError, SafePacsError, StorageFullError
from safepacs.protocols.dimse import status as st
from safepacs.protocols.dimse.contexts import FIND_MODELS, GET_MODELS, MOVE_MODELS, Verification
from safepacs.protocols.dimse.engine.findfast import FindResponder, sends_raw
from safepacs.protocols.dimse.engine.raw import RawInstance
from safepacs.protocols.dimse.engine.slots import AssociationSlot
from safepacs.protocols.dimse.gate import principal_of
from safepacs.services.audit import DESTINATION, StoreBatch
from safepacs.services.gate import Gate
from safepacs.services.ingest import IngestService
from safepacs.services.query import QueryService
from safepacs.services.retrieve import Retrieval, RetrieveService
from safepacs.types import IngestOutcome, Peer, Principal, QueryLevel, Service

__all__ = ["DimseHandlers"]

log = logging.getLogger(__name__)

_MAX_MOVE_CONTEXTS = 128
_BATCH: AssociationSlot[StoreBatch] = AssociationSlot("_safepacs_stores")


def _level(identifier: Dataset) -> QueryLevel:
    raw = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    try:
        return QueryLevel(raw)
    except ValueError:
        raise QueryError("Query/Retrieve Level (0008,0052) must be PATIENT, STUDY, SERIES or IMAGE") from None


class DimseHandlers:
    """The handlers bound to one worker's association server."""

    def __init__(
        self,
        ingest: IngestService,
        query: QueryService,
        retrieve: RetrieveService,
        gate: Gate,
    ) -> None:
        """``gate``: C-ECHO's decision, and the peer table C-MOVE destinations resolve from."""
        self.gate = gate
        self.ingest = ingest
        self.query = query
        self.retrieve = retrieve

    def on_echo(self, event: Any) -> int | Dataset:
        try:
            self.gate.require(principal_of(event.assoc), Service.ECHO)
        except AccessDenied:
            return st.status(st.REFUSED_NOT_AUTHORIZED, "refused: not authorized for verification")
        except AuditError:
            return st.status(st.OUT_OF_RESOURCES, st.AUDIT_DOWN)
        return st.SUCCESS

    def on_store(self, event: Any) -> int | Dataset:
        req = event.request
        return self.store(
            event.assoc,
            str(event.context.transfer_syntax),
            str(req.AffectedSOPClassUID or ""),
            str(req.AffectedSOPInstanceUID or ""),
            req.DataSet.getvalue(),
        )

    def store(
        self, assoc: Any, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str, data: bytes
    ) -> int | Dataset:
        """One C-STORE, from pynetdicom's event or from the fast receive path (``engine/fastpath.py``)."""
        try:
            result = self.ingest.ingest_dataset(
                principal_of(assoc),  # type: ignore[arg-type]
                sop_class_uid,
                sop_instance_uid,
                transfer_syntax,
                data,
                batch=_batch(assoc),
            )
        except SafePacsError as exc:
            if not isinstance(exc, StorageFullError):  # logged once when free space falls below the mark
                log.warning("C-STORE refused: %s", exc, extra={"error": type(exc).__name__})
            return st.store_failure(exc)
        except Exception as exc:  # noqa: BLE001 - never a traceback to the peer; status instead
            log.error("C-STORE failed unexpectedly", extra={"error": type(exc).__name__})
            return st.status(st.OUT_OF_RESOURCES, "the archive could not store the object; try again later")
        if result.outcome is IngestOutcome.CONFLICT:
            return st.store_conflict()
        return st.SUCCESS

    def on_close(self, event: Any) -> None:
        """The association ended: record what it stored (110104, per study, with the counts)."""
        batch = _BATCH.get(event.assoc)
        principal = principal_of(event.assoc)
        if batch is None or principal is None:
            return
        _BATCH.set(event.assoc, None)  # once, however many ways the association ends
        try:
            self.ingest.end_batch(principal, batch)
        except AuditError:
            log.error("the audit trail cannot be written; an association's summary of stores is missing")

    def on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        responder = _responder(event)
        try:
            model = FIND_MODELS[str(event.request.AffectedSOPClassUID)]
            identifier = event.identifier
            principal = principal_of(event.assoc)
            if responder is None:
                results = self.query.find(principal, model, _level(identifier), identifier)  # type: ignore[arg-type]
            else:
                encoded = self.query.find_encoded(
                    principal,  # type: ignore[arg-type]
                    model,
                    _level(identifier),
                    identifier,
                    implicit_vr=responder[1],
                )
        except SafePacsError as exc:
            log.info("C-FIND refused: %s", type(exc).__name__)
            yield st.find_failure(exc), None
            return
        except Exception as exc:  # noqa: BLE001 - undecodable identifier
            log.info("C-FIND identifier unreadable", extra={"error": type(exc).__name__})
            yield st.status(st.FIND_IDENTIFIER_MISMATCH, "the query identifier cannot be decoded"), None
            return
        if responder is not None:
            yield from _send_found(event, responder[0], encoded)
            return
        for ds in results:
            if event.is_cancelled:
                yield st.CANCEL, None
                return
            yield st.PENDING, ds
        yield st.SUCCESS, None

    def _locate(
        self, event: Any, action: Service, models: dict[str, Any], destination: Participant | None = None
    ) -> Retrieval:
        """The retrieval the request names, its first instance read and checked, then recorded (a
        damaged first instance is recorded as not sent; its sub-operation fails like any other's)."""
        model = models[str(event.request.AffectedSOPClassUID)]
        identifier = event.identifier
        principal: Principal = principal_of(event.assoc)  # type: ignore[assignment]
        kind = EventID.INSTANCES_TRANSFERRED if destination is None else EventID.BEGIN_TRANSFERRING
        refs = self.retrieve.locate(
            principal,
            action,
            model,
            _level(identifier),
            identifier,
            event=kind,
            destination=destination,
            record=False,
        )
        retrieval = self.retrieve.begin(principal, refs, kind, destination=destination)
        retrieval.record()
        return retrieval

    def _sub_operations(
        self, event: Any, retrieval: Retrieval
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        for ref in retrieval.refs:
            if event.is_cancelled:
                yield st.CANCEL, None
                return
            yield st.PENDING, RawInstance(ref, retrieval.read)

    def on_get(self, event: Any) -> Iterator[Any]:
        try:
            retrieval = self._locate(event, Service.GET, GET_MODELS)
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            yield 1
            yield _retrieve_error(exc), None
            return
        yield len(retrieval.refs)
        yield from self._sub_operations(event, retrieval)

    def on_move(self, event: Any) -> Iterator[Any]:
        raw = event.move_destination
        destination = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw or "")).strip()
        # Destinations resolve only from the registered peer table, never from the request (PS3.4 C.4.2.1.5).
        peer: Peer | None = self.gate.peer(destination) if destination else None
        address = _single_address(peer)
        if peer is None or peer.port is None or address is None:
            log.warning(
                "C-MOVE to an unregistered or unreachable destination refused",
                extra={"move_destination": destination[:16]},
            )
            principal = principal_of(event.assoc)
            try:
                if principal is not None:
                    self.gate.refused(
                        principal,
                        "C-MOVE destination is not a registered peer with one address and a port",
                        (AuditObject(ObjectKind.NODE, destination[:16] or "(none)"),),
                    )
            except AuditError:
                log.error("the audit trail cannot be written; C-MOVE refused")
            yield None, None  # -> 0xA801 Refused: Move Destination unknown
            return
        target = Participant(
            peer.ae_title, requestor=False, role=DESTINATION, address=address, ae_title=peer.ae_title
        )
        try:
            retrieval = self._locate(event, Service.MOVE, MOVE_MODELS, target)
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            yield address, peer.port, {"contexts": _move_contexts([])}
            yield 1
            yield _retrieve_error(exc), None
            return
        yield address, peer.port, {"contexts": _move_contexts(retrieval.refs)}
        yield len(retrieval.refs)
        yield from self._sub_operations(event, retrieval)


def _responder(event: Any) -> tuple[FindResponder, bool] | None:
    """The writer of the request's pending responses and whether its context is Implicit VR Little
    Endian; None when pynetdicom sends them (``server.dimse_send_path`` off, another transfer syntax)."""
    if not sends_raw(event.assoc):
        return None  # no engine.sendpath.SendDUL: server.dimse_send_path is off
    context = event.context
    syntax = str(context.transfer_syntax)
    if syntax not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        return None
    responder = FindResponder.for_association(
        event.assoc,
        int(context.context_id),
        int(event.request.MessageID),
        str(event.request.AffectedSOPClassUID),
    )
    return None if responder is None else (responder, syntax == ImplicitVRLittleEndian)


def _send_found(
    event: Any, responder: FindResponder, encoded: list[bytes | None]
) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """The pending responses, written by ``responder``; then the final status, which pynetdicom sends
    after whatever was written.  A C-CANCEL is looked for before each response, as before."""
    for identifier in encoded:
        if event.is_cancelled:
            responder.flush()
            yield st.CANCEL, None
            return
        if identifier is None:  # pydicom could not encode it either: pynetdicom's answer to that
            responder.flush()
            log.error("a C-FIND response identifier could not be encoded")
            yield st.FIND_UNENCODABLE, None
            return
        if not responder.pending(identifier):
            return  # the connection is gone
    responder.flush()
    if responder.alive:
        yield st.SUCCESS, None


def _batch(assoc: Any) -> StoreBatch:
    """The association's batch of stores (one association runs its C-STOREs one after another)."""
    batch = _BATCH.get(assoc)
    if batch is None:
        batch = StoreBatch()
        _BATCH.set(assoc, batch)
    return batch


def _retrieve_error(exc: BaseException) -> Dataset:
    if isinstance(exc, SafePacsError):
        log.info("retrieve refused: %s", type(exc).__name__)
        return st.retrieve_failure(exc)
    log.info("retrieve identifier unreadable", extra={"error": type(exc).__name__})
    return st.status(st.FIND_IDENTIFIER_MISMATCH, "the retrieve identifier cannot be decoded")


def _single_address(peer: Peer | None) -> str | None:
    """The one address a move destination is reached at (a host name, an IP, or a /32 or /128)."""
    if peer is None:
        return None
    try:
        net = ipaddress.ip_network(peer.host, strict=False)
    except ValueError:
        return peer.host  # a host name
    if net.num_addresses == 1:
        return str(net.network_address)
    return None


def _move_contexts(refs: list[Any]) -> list[Any]:
    """Contexts for the C-MOVE sub-association (SafePACS requests, the destination chooses, PS3.8 9.3.2.2).

    Per SOP class one context with Explicit and Implicit VR Little Endian, which carries every instance
    SafePACS can decode, and one context per other transfer syntax its instances are stored in, so that
    a destination that takes a stored syntax gets those instances as stored (a context accepts only one
    syntax, so listing them together would let a compressed one shut out the uncompressed ones).  Each
    instance is then sent on the accepted context that fits it best (``engine/raw.py``).  At most 128
    contexts (PS3.8 9.3.2.2): the uncompressed ones first, then the stored syntaxes of the most
    instances.
    """
    uncompressed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    stored: Counter[tuple[str, str]] = Counter(
        (ref.sop_class_uid, ref.transfer_syntax_uid)
        for ref in refs
        if ref.transfer_syntax_uid != ExplicitVRLittleEndian
    )
    classes = list(dict.fromkeys(ref.sop_class_uid for ref in refs)) or [Verification]
    out = [build_context(sop_class, list(uncompressed)) for sop_class in classes[:_MAX_MOVE_CONTEXTS]]
    for (sop_class, syntax), _ in stored.most_common(_MAX_MOVE_CONTEXTS - len(out)):
        out.append(build_context(sop_class, [syntax]))
    return out
