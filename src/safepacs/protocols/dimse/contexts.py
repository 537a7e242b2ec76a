"""Presentation contexts an association may be granted, per allowed service (PS3.4 Annexes A, B, C)."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from typing import Any

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    build_context,
    register_uid,
    sop_class,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass

from safepacs.dicom.transcode import can_produce
from safepacs.types import QueryModel, Service

__all__ = [
    "FIND_MODELS",
    "GET_MODELS",
    "MOVE_MODELS",
    "Verification",
    "contexts_for",
    "negotiable_contexts",
    "storage_sop_classes",
]

# PS3.4 Annex A (Verification) and C.6 (Query/Retrieve information models).
Verification = "1.2.840.10008.1.1"
PatientRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.1.1"
PatientRootQueryRetrieveInformationModelMove = "1.2.840.10008.5.1.4.1.2.1.2"
PatientRootQueryRetrieveInformationModelGet = "1.2.840.10008.5.1.4.1.2.1.3"
StudyRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.2.1"
StudyRootQueryRetrieveInformationModelMove = "1.2.840.10008.5.1.4.1.2.2.2"
StudyRootQueryRetrieveInformationModelGet = "1.2.840.10008.5.1.4.1.2.2.3"

FIND_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): QueryModel.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelFind): QueryModel.STUDY_ROOT,
}
GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): QueryModel.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelGet): QueryModel.STUDY_ROOT,
}
MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): QueryModel.PATIENT_ROOT,
    str(StudyRootQueryRetrieveInformationModelMove): QueryModel.STUDY_ROOT,
}
_IMAGE_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."


@functools.cache
def storage_sop_classes() -> tuple[str, ...]:
    """Every Storage SOP class pynetdicom knows, plus the retired and newer ones of PS3.4 Annex B it lacks.

    Archives hold old studies: retired classes such as the original Ultrasound Image Storage
    (1.2.840.10008.5.1.4.1.1.6) must still be accepted.  Missing ones are registered with
    pynetdicom's Storage service class so their C-STORE requests reach our handler.
    """
    known = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    have = set(known)
    for uid, (name, kind, _, _, keyword) in UID_dictionary.items():
        if (
            kind == "SOP Class"
            and uid.startswith(_IMAGE_STORAGE_ROOT)
            and "Storage" in name
            and uid not in have
        ):
            if keyword.isidentifier() and not hasattr(sop_class, keyword):
                register_uid(uid, keyword, StorageServiceClass)
            known.append(uid)
            have.add(uid)
    return tuple(known)


_UNCOMPRESSED = [str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian)]


def _cx(
    uid: str, syntaxes: list[str], *, scu_role: bool | None = None, scp_role: bool | None = None
) -> PresentationContext:
    cx = build_context(uid, syntaxes)
    cx.scu_role = scu_role
    cx.scp_role = scp_role
    return cx


@functools.cache
def contexts_for(allow: frozenset[Service]) -> tuple[PresentationContext, ...]:
    """The contexts an acceptor supports for a peer allowed ``allow``; nothing else is negotiated.

    C-GET needs the Storage contexts with the requestor as Storage SCP (SCP/SCU Role Selection,
    PS3.7 D.3.3.4); a peer allowed GET but not STORE still gets them, and its C-STORE requests on
    them are answered 0x0124 (refused: not authorized).
    """
    out: list[PresentationContext] = []
    if Service.ECHO in allow:
        out.append(_cx(str(Verification), _UNCOMPRESSED))
    if Service.FIND in allow:
        out += [_cx(uid, _UNCOMPRESSED) for uid in FIND_MODELS]
    if Service.MOVE in allow:
        out += [_cx(uid, _UNCOMPRESSED) for uid in MOVE_MODELS]
    if Service.GET in allow:
        out += [_cx(uid, _UNCOMPRESSED) for uid in GET_MODELS]
    if Service.STORE in allow or Service.GET in allow:
        roles = {"scu_role": True, "scp_role": True} if Service.GET in allow else {}
        out += [_cx(uid, [str(ts) for ts in ALL_TRANSFER_SYNTAXES], **roles) for uid in storage_sop_classes()]
    return tuple(out)


def negotiable_contexts(
    allow: frozenset[Service], requested: Iterable[Any], retrieving: Collection[str] = ()
) -> list[PresentationContext]:
    """The contexts to support for this request, each listing its transfer syntaxes in order of preference.

    pynetdicom's acceptor picks, per proposed context, the first of *its own* syntaxes that the
    requestor proposed in it.  Ordering them as the requestor did honours its preference (PS3.8
    9.3.2.2: a requestor lists what it prefers first): a modality that proposes its images' own
    compressed syntax first stores them as they are.

    ``retrieving``: the SOP classes the requestor proposed to take the SCP role for (SCP/SCU Role
    Selection, PS3.7 D.3.3.4), i.e. the storage contexts of C-GET sub-operations, where SafePACS sends.
    Which instances will be asked for is not known yet, so the syntax chosen must carry whatever is
    stored: Explicit, then Implicit VR Little Endian when proposed (every instance SafePACS can decode
    goes in them), else a compressed syntax SafePACS can encode into losslessly, else the requestor's
    first (instances stored in it are sent as stored, the others' sub-operations fail).  An instance is
    sent as stored whenever the accepted syntax is its own (PS3.4 C.4.3.3.1).
    """
    supported = {str(cx.abstract_syntax): cx for cx in contexts_for(allow)}
    order: dict[str, list[str]] = {}
    for rq in requested:
        ab = str(rq.abstract_syntax)
        base = supported.get(ab)
        if base is None:
            continue
        syntaxes = order.setdefault(ab, [])
        for ts in rq.transfer_syntax:
            if ts in base.transfer_syntax and str(ts) not in syntaxes:
                syntaxes.append(str(ts))
    out = []
    for ab, syntaxes in order.items():
        base = supported[ab]
        if ab in retrieving and base.scp_role:
            syntaxes = _sendable_first(syntaxes)
        out.append(
            _cx(ab, syntaxes or list(base.transfer_syntax), scu_role=base.scu_role, scp_role=base.scp_role)
        )
    return out


def _sendable_first(proposed: list[str]) -> list[str]:
    """``proposed`` reordered for sending whatever is stored (see :func:`negotiable_contexts`)."""
    uncompressed = [ts for ts in (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)) if ts in proposed]
    producible = [ts for ts in proposed if ts not in uncompressed and can_produce(ts)]
    return uncompressed + producible + [ts for ts in proposed if ts not in uncompressed + producible]
