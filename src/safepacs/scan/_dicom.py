"""DICOM checks of one endpoint: who may associate, and what a stranger may then do (pynetdicom as the SCU).

In order, each bounded by the per-probe timeout and the global rate limit:

1. Verification associations from a random calling AE to the commonly used called AE titles; the
   A-ASSOCIATE-RJ result/source/reason (PS3.8 9.3.4) tells "called AE enforced" (reason 7) from
   "calling AE enforced" (reason 3) from "rejected for another reason".
2. When one is accepted: C-ECHO; C-FIND Study Root at STUDY level and Patient Root at PATIENT level with
   universal matching, asking only for NumberOfStudyRelatedInstances (PS3.4 C.3.4), C-CANCEL after the
   cap; Modality Worklist; C-GET and C-MOVE of a study UID that does not exist (so that nothing is ever
   retrieved), C-MOVE to an unknown destination; Storage contexts; a C-STORE of a synthetic test object
   only with ``intrusive``.
3. When every attempt was rejected for something else than the called AE: the same association with a
   bogus User Identity (PS3.7 D.3.3.7); accepted means the identity is not checked, and the checks of 2.
   then run through associations carrying that identity.

Responses are counted and dropped at once: no value of an identifier outlives the loop that counts it.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_context
from pynetdicom.pdu_primitives import UserIdentityNegotiation

from safepacs.scan._wire import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    DicomAnswer,
    ProbeTimeout,
    RateLimiter,
    sniff_dicom,
)

__all__ = ["COMMON_CALLED_AES", "GUESS_AES", "DicomProbe", "DicomResult", "probe_dicom", "random_calling_ae"]

log = logging.getLogger(__name__)

# SOP Class UIDs (PS3.4; pynetdicom's sop_class module is not typed).
Verification = "1.2.840.10008.1.1"
PatientRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.1.1"
PatientRootQueryRetrieveInformationModelMove = "1.2.840.10008.5.1.4.1.2.1.2"
PatientRootQueryRetrieveInformationModelGet = "1.2.840.10008.5.1.4.1.2.1.3"
StudyRootQueryRetrieveInformationModelFind = "1.2.840.10008.5.1.4.1.2.2.1"
StudyRootQueryRetrieveInformationModelMove = "1.2.840.10008.5.1.4.1.2.2.2"
StudyRootQueryRetrieveInformationModelGet = "1.2.840.10008.5.1.4.1.2.2.3"
ModalityWorklistInformationFind = "1.2.840.10008.5.1.4.31"
CTImageStorage = "1.2.840.10008.5.1.4.1.1.2"
MRImageStorage = "1.2.840.10008.5.1.4.1.1.4"
SecondaryCaptureImageStorage = "1.2.840.10008.5.1.4.1.1.7"
UltrasoundImageStorage = "1.2.840.10008.5.1.4.1.1.6.1"
DigitalXRayImageStorageForPresentation = "1.2.840.10008.5.1.4.1.1.1.1"

#: Called AE titles tried on every DICOM port (the defaults of common archives and toolkits).
COMMON_CALLED_AES = ("ANY-SCP", "ORTHANC", "DCM4CHEE", "PACS", "STORESCP")
#: Tried as well with ``--guess-ae``: a short list of titles seen in default configurations.
GUESS_AES = (
    "ANY",
    "ARCHIVE",
    "CONQUESTSRV1",
    "DCMQRSCP",
    "DICOM",
    "DICOOGLE",
    "HOROS",
    "OSIRIX",
    "PACS1",
    "PACS_SCP",
    "QRSCP",
    "SAFEPACS",
    "SCP",
    "SERVER",
    "STORESCU",
    "CLEARCANVAS",
    "IMPAX",
    "RADIANT",
)

STORAGE_CLASSES = (
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    DigitalXRayImageStorageForPresentation,
)
_PENDING = (0xFF00, 0xFF01)
_REFUSED = {0x0122, 0x0124, 0xA700, 0xA701, 0xA702, 0xA801}
_MAX_ASSOCIATIONS = 8  # reconnections after aborts, per endpoint


def random_calling_ae() -> str:
    """A calling AE title no archive has registered: ``SCAN`` and eight random characters."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "SCAN" + "".join(secrets.choice(alphabet) for _ in range(8))


@dataclass
class DicomResult:
    """What the DICOM checks saw.  Counts only; ``None`` means not asked or not answered."""

    attempts: list[tuple[str, DicomAnswer]] = field(default_factory=list)
    accepted_called: str | None = None
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    echoed_called: str = ""
    echo: bool | None = None
    contexts: dict[str, bool] = field(default_factory=dict)
    studies: int | None = None
    images: int | None = None
    images_complete: bool = False
    studies_capped: bool = False  # "at least": the cap was reached or the answer stopped partway
    patients: int | None = None
    patients_capped: bool = False
    worklist: int | None = None
    worklist_capped: bool = False
    find_incomplete: bool = False  # a C-FIND stopped partway (timeout, abort): its counts are minimums
    find_refused: str = ""
    get: str = ""  # "processed", "refused", "unknown" (no answer), "" (no context accepted)
    move: str = ""  # "processed", "destination-refused", "refused", "unknown", ""
    store: str = ""  # "stored", "refused", ""
    storage_contexts: int = 0
    bogus_identity_accepted: bool | None = None
    identity_called: str | None = None  # the called AE title the checks of 2. ran with, bogus identity
    error: str = ""


@dataclass(frozen=True)
class DicomProbe:
    """How to probe: timeouts, titles, limits."""

    timeout: float
    calling: str
    called_aes: tuple[str, ...]
    find_cap: int
    intrusive: bool
    limiter: RateLimiter
    tls: ssl.SSLContext | None = None
    server_name: str | None = None
    count_budget: int = 100  # extra C-FINDs allowed to count images when studies do not say


def _quiet_pynetdicom() -> None:
    """pynetdicom logs identifiers (names, IDs) at INFO and DEBUG: never let it."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"


def _contexts() -> dict[str, list[Any]]:
    return {
        "verification": [Verification],
        "find_study": [StudyRootQueryRetrieveInformationModelFind],
        "find_patient": [PatientRootQueryRetrieveInformationModelFind],
        "worklist": [ModalityWorklistInformationFind],
        "get": [StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet],
        "move": [StudyRootQueryRetrieveInformationModelMove, PatientRootQueryRetrieveInformationModelMove],
        "store": list(STORAGE_CLASSES),
    }


class _Session:
    """One association with every context proposed; re-established after the peer aborts it."""

    def __init__(
        self,
        address: str,
        port: int,
        called: str,
        probe: DicomProbe,
        identity: UserIdentityNegotiation | None = None,
    ) -> None:
        self.address, self.port, self.called, self.probe = address, port, called, probe
        self.identity = identity  # sent with every association (re-established ones too)
        self.ae = AE(ae_title=probe.calling)
        self.ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = probe.timeout
        self.ae.connection_timeout = probe.timeout
        self.contexts = [
            build_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            for uids in _contexts().values()
            for uid in uids
        ]
        self.assoc: Any = None
        self.opened = 0

    def get(self) -> Any:
        if self.assoc is not None and self.assoc.is_established:
            return self.assoc
        if self.opened >= _MAX_ASSOCIATIONS:
            return None
        self.opened += 1
        self.probe.limiter.wait()
        # No SNI for an address (None): pynetdicom passes it to wrap_socket, which accepts None.
        tls_args: Any = (self.probe.tls, self.probe.server_name) if self.probe.tls else None
        self.assoc = self.ae.associate(
            self.address,
            self.port,
            self.contexts,
            ae_title=self.called,
            ext_neg=[self.identity] if self.identity is not None else None,
            tls_args=tls_args,
        )
        return self.assoc if self.assoc.is_established else None

    def drop(self) -> None:
        """Forget an association whose peer stopped answering (aborted it): abort our side too."""
        if self.assoc is not None and not self.assoc.is_aborted and not self.assoc.is_released:
            self.assoc.abort()
        self.assoc = None

    def accepted(self, uid: str) -> bool:
        assoc = self.get()
        return assoc is not None and any(cx.abstract_syntax == uid for cx in assoc.accepted_contexts)

    def close(self) -> None:
        try:
            if self.assoc is not None and self.assoc.is_established:
                self.assoc.release()
                if self.assoc.is_established:
                    self.assoc.abort()
        finally:
            self.ae.shutdown()


def _status(rsp: Any) -> int | None:
    if rsp is None or "Status" not in rsp:
        return None
    return int(rsp.Status)


class _FindCount(NamedTuple):
    """What one counting C-FIND found."""

    matches: int | None  # None when refused
    total: int  # the sum of the ``count_key`` values
    with_key: int  # matches that carried ``count_key``
    refused: str  # why the peer refused ("" when it answered)
    complete: bool  # whether the matches are all there were


def _count_find(
    session: _Session,
    model: str,
    identifier: Dataset,
    cap: int,
    count_key: str | None = None,
    collect: Callable[[Dataset], None] | None = None,
) -> _FindCount:
    """The matches of ``identifier`` counted (None when refused), the sum of ``count_key`` and how many
    matches carried it, the refusal text, and whether the matches are all there were.

    C-CANCEL (PS3.7 9.3.2.3) once ``cap`` matches arrived; matches after it are not counted, and a peer
    that ignores the cancel has its association aborted after another ``cap`` responses.  A peer that
    stops answering partway (DIMSE timeout, abort) after some matches: those matches count, marked
    incomplete (at least that many), for they are already a stranger listing patient data.  ``collect``
    sees each counted identifier (to take one key out of it); nothing else keeps them.
    """
    assoc = session.get()
    if assoc is None:
        return _FindCount(None, 0, 0, "association refused", False)
    matches = total = with_key = extra = 0
    cancelled = False
    final: int | None = None
    msg_id = 1 + secrets.randbelow(0xFFF0)
    for rsp, ident in assoc.send_c_find(identifier, model, msg_id=msg_id):
        code = _status(rsp)
        if code is None:
            session.drop()
            break
        if code not in _PENDING:
            final = code
            continue
        if cancelled:
            extra += 1
            if extra > cap:
                session.drop()
                break
            continue
        matches += 1
        if ident is not None:
            if count_key and count_key in ident:
                with contextlib.suppress(TypeError, ValueError):
                    total += int(ident[count_key].value)
                    with_key += 1
            if collect is not None:
                collect(ident)
        if matches >= cap:
            cancelled = True
            assoc.send_c_cancel(msg_id, query_model=model)
    if final is None and not cancelled:
        if matches:
            return _FindCount(matches, total, with_key, "", False)
        return _FindCount(None, 0, 0, "association aborted by the peer", False)
    if final is not None and final not in (0x0000, 0xFE00) and final & 0xF000 != 0xB000 and not matches:
        return _FindCount(None, 0, 0, f"status 0x{final:04X}", False)
    return _FindCount(matches, total, with_key, "", not cancelled)


def _count_images(session: _Session, probe: DicomProbe) -> int | None:
    """Images of every study, one C-FIND per study and series, for peers whose study-level answers lack
    NumberOfStudyRelatedInstances; ``None`` past the budget of queries.  The UIDs live in here only."""
    model = StudyRootQueryRetrieveInformationModelFind
    cap = probe.find_cap
    budget = probe.count_budget

    def ask(level: str, keys: dict[str, str], collect: Callable[[Dataset], None] | None) -> int | None:
        nonlocal budget
        budget -= 1
        if budget < 0:
            return None
        q = Dataset()
        q.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(q, keyword, value)
        probe.limiter.wait()  # one request each: the global rate limit holds for these too
        found = _count_find(session, model, q, cap, collect=collect)
        return None if found.refused or not found.complete else found.matches

    studies: list[str] = []
    series: list[str] = []
    try:
        listed = ask(
            "STUDY", {"StudyInstanceUID": ""}, lambda ds: studies.append(str(ds.get("StudyInstanceUID")))
        )
        if listed is None:
            return None
        images = 0
        for study in studies:
            series.clear()
            keys = {"StudyInstanceUID": study, "SeriesInstanceUID": ""}
            if ask("SERIES", keys, lambda ds: series.append(str(ds.get("SeriesInstanceUID")))) is None:
                return None
            for one in series:
                counted = ask("IMAGE", {**keys, "SeriesInstanceUID": one, "SOPInstanceUID": ""}, None)
                if counted is None:
                    return None
                images += counted
        return images
    finally:
        studies.clear()
        series.clear()


#: How telling a retrieval answer is: the most permissive one of the two information models counts.
_RETRIEVE_RANK = {"": 0, "unknown": 1, "refused": 2, "destination-refused": 3, "processed": 4}


def _bogus_retrieve(session: _Session, kind: str) -> str:
    """C-GET or C-MOVE of something that exists nowhere, in the Study Root and the Patient Root models
    (a server may restrict one only): processed, destination-refused, refused, unknown (no answer), or
    "" when neither context was accepted."""
    models = (
        (StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet)
        if kind == "get"
        else (StudyRootQueryRetrieveInformationModelMove, PatientRootQueryRetrieveInformationModelMove)
    )
    best = ""
    for model in models:
        outcome = _bogus_retrieve_one(session, kind, model)
        if _RETRIEVE_RANK[outcome] > _RETRIEVE_RANK[best]:
            best = outcome
        if best == "processed":
            break
    return best


def _bogus_retrieve_one(session: _Session, kind: str, model: str) -> str:
    if not session.accepted(model):
        return ""
    assoc = session.get()
    q = Dataset()
    if model in (StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove):
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = f"2.25.{uuid.uuid4().int}"
    else:
        q.QueryRetrieveLevel = "PATIENT"
        q.PatientID = f"SAFEPACS-SCAN-{secrets.token_hex(8).upper()}"  # an ID nobody was given
    session.probe.limiter.wait()
    if kind == "get":
        responses = assoc.send_c_get(q, model)
    else:
        responses = assoc.send_c_move(q, random_calling_ae(), model)
    final: int | None = None
    for rsp, _ in responses:
        code = _status(rsp)
        if code is None:
            session.drop()
            break
        if code not in _PENDING:
            final = code
    if final is None:
        return "unknown"  # no final answer (timeout, abort): neither processed nor refused
    if final in _REFUSED - {0xA801}:
        return "refused"
    if final == 0xA801:
        return "destination-refused"
    return "processed"


def _test_object() -> Dataset:
    """A synthetic Secondary Capture image that says what it is (PatientIdentityRemoved YES, no PHI)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(SecondaryCaptureImageStorage)
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "SAFEPACS^SCAN TEST OBJECT"
    ds.PatientID = "SAFEPACS-SCAN-TEST"
    ds.PatientIdentityRemoved = "YES"
    ds.StudyDescription = "safepacs scan --intrusive test object: safe to delete"
    ds.SeriesDescription = "safepacs scan test"
    ds.Modality = "OT"
    ds.ConversionType = "SYN"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(64)
    return ds


def _bogus_identity() -> UserIdentityNegotiation:
    """A made-up username and passcode (PS3.7 D.3.3.7, type 2) that no server should accept."""
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"safepacs-scan"
    identity.secondary_field = secrets.token_urlsafe(12).encode()
    identity.positive_response_requested = False
    return identity


def _try_identity(
    address: str, port: int, called: str, probe: DicomProbe, identity: UserIdentityNegotiation
) -> bool | None:
    """Whether an association carrying ``identity`` (a bogus username and passcode) is accepted."""
    ae = AE(ae_title=probe.calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = probe.timeout
    probe.limiter.wait()
    tls_args: Any = (probe.tls, probe.server_name) if probe.tls else None
    try:
        assoc = ae.associate(
            address,
            port,
            [build_context(Verification)],
            ae_title=called,
            ext_neg=[identity],
            tls_args=tls_args,
        )
        accepted = bool(assoc.is_established)
        if accepted:
            assoc.release()
        return accepted
    finally:
        ae.shutdown()


def _associate(
    address: str, port: int, probe: DicomProbe, result: DicomResult, known: tuple[str, DicomAnswer] | None
) -> None:
    for called in probe.called_aes:
        if known is not None and known[0] == called:
            answer = known[1]
        else:
            probe.limiter.wait()
            answer = sniff_dicom(
                address,
                port,
                probe.timeout,
                calling=probe.calling,
                called=called,
                ctx=probe.tls,
                server_name=probe.server_name,
            )
        result.attempts.append((called, answer))
        if answer.pdu == 2:
            result.accepted_called = called
            result.implementation_class_uid = answer.implementation_class_uid
            result.implementation_version_name = answer.implementation_version_name
            result.echoed_called = answer.called_echo
            return
        if answer.pdu == 3 and answer.source == 1 and answer.reason == 3:
            return  # this called AE is right: the calling AE is what is checked; other titles add nothing
        if answer.pdu != 3:
            return  # aborted or silent: more titles will not change it


def _probe_accepted(
    address: str,
    port: int,
    probe: DicomProbe,
    result: DicomResult,
    called: str,
    identity: UserIdentityNegotiation | None = None,
) -> None:
    """What a stranger may do on an association to ``called`` (carrying ``identity`` when given)."""
    session = _Session(address, port, called, probe, identity)
    try:
        assoc = session.get()
        if assoc is None:
            result.error = "the association was accepted once, then refused"
            return
        for name, uids in _contexts().items():
            result.contexts[name] = any(session.accepted(uid) for uid in uids)
        result.storage_contexts = sum(session.accepted(uid) for uid in STORAGE_CLASSES)
        if session.accepted(Verification):
            result.echo = _status(session.get().send_c_echo()) == 0x0000
        if session.accepted(StudyRootQueryRetrieveInformationModelFind):
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = ""
            q.NumberOfStudyRelatedInstances = ""
            studies, images, with_key, refused, complete = _count_find(
                session,
                StudyRootQueryRetrieveInformationModelFind,
                q,
                probe.find_cap,
                "NumberOfStudyRelatedInstances",
            )
            result.find_refused = refused
            result.studies = studies
            stalled = studies is not None and 0 < studies < probe.find_cap and not complete
            result.find_incomplete = stalled
            if studies:
                result.studies_capped = studies >= probe.find_cap or stalled
                if with_key == studies or stalled:
                    # A peer that stalled would stall the counting queries as well: take what came.
                    result.images = images if with_key == studies else None
                    result.images_complete = not result.studies_capped
                else:
                    result.images = _count_images(session, probe)
                    result.images_complete = result.images is not None and not result.studies_capped
            elif studies == 0:
                result.images, result.images_complete = 0, True
        if session.accepted(PatientRootQueryRetrieveInformationModelFind):
            q = Dataset()
            q.QueryRetrieveLevel = "PATIENT"
            q.PatientID = ""
            q.NumberOfPatientRelatedStudies = ""
            found = _count_find(session, PatientRootQueryRetrieveInformationModelFind, q, probe.find_cap)
            patients, refused, complete = found.matches, found.refused, found.complete
            result.patients = patients
            result.patients_capped = bool(patients) and not complete
            result.find_incomplete = result.find_incomplete or (
                bool(patients) and not complete and (patients or 0) < probe.find_cap
            )
            result.find_refused = result.find_refused or refused
        if session.accepted(ModalityWorklistInformationFind):
            q = Dataset()
            step = Dataset()
            step.Modality = ""
            q.ScheduledProcedureStepSequence = [step]
            found = _count_find(session, ModalityWorklistInformationFind, q, probe.find_cap)
            result.worklist, complete = found.matches, found.complete
            result.worklist_capped = bool(result.worklist) and not complete
            result.find_incomplete = result.find_incomplete or (
                bool(result.worklist) and not complete and (result.worklist or 0) < probe.find_cap
            )
        result.get = _bogus_retrieve(session, "get")
        result.move = _bogus_retrieve(session, "move")
        if probe.intrusive and session.accepted(SecondaryCaptureImageStorage):
            assoc = session.get()
            code = _status(assoc.send_c_store(_test_object())) if assoc is not None else None
            ok = code is not None and (code == 0 or code & 0xF000 == 0xB000)
            result.store = "stored" if ok else "refused"
    finally:
        session.close()


def probe_dicom(
    address: str, port: int, probe: DicomProbe, known: tuple[str, DicomAnswer] | None = None
) -> DicomResult:
    """Run the DICOM checks against ``address:port`` (plain or over ``probe.tls``); ``known`` is the
    answer the first called AE title got already (while telling the protocol)."""
    _quiet_pynetdicom()
    result = DicomResult()
    try:
        _associate(address, port, probe, result, known)
    except ProbeTimeout as exc:
        result.error = f"probe timed out ({exc})"
        return result
    if result.accepted_called is not None:
        _probe_accepted(address, port, probe, result, result.accepted_called)
    elif result.attempts and any(
        a.pdu == 3 and not (a.source == 1 and a.reason == 7) for _, a in result.attempts
    ):
        called = next(c for c, a in result.attempts if a.pdu == 3 and not (a.source == 1 and a.reason == 7))
        identity = _bogus_identity()
        result.bogus_identity_accepted = _try_identity(address, port, called, probe, identity)
        if result.bogus_identity_accepted:
            # The made-up credentials open the door: look at what a stranger may do through it.
            result.identity_called = called
            _probe_accepted(address, port, probe, result, called, identity)
    return result
