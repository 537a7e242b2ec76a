"""STOW-RS (PS3.18 10.5): store instances sent as ``multipart/related; type="application/dicom"``.

Every part goes through the same ingest service as C-STORE and ``safepacs import`` (validation,
encryption, durable write, index).  The answer lists what was stored (ReferencedSOPSequence) and
what was not with a Failure Reason (FailedSOPSequence): 200 when everything was stored, 202 when
some parts failed, 409 when none was stored (PS3.18 10.5.3.1).  A part whose SOP Instance UID is
stored with other content is not stored: FailureReason 0xC111, as C-STORE answers it (it is recorded
on its own, as for C-STORE).  While free disk space is below
``storage.min_free_bytes`` the request is answered 507 Insufficient Storage before its body is read
(and when no part could be stored for lack of space).

A request is bounded before any part is looked at: at most ``server.max_request_bytes`` bytes and
``server.max_stow_parts`` parts (the split stops at the first part too many), else 413 and nothing
is stored.  A part that is not ``application/dicom`` or not a DICOM Part 10 file ("DICM" after the
preamble, PS3.10 7.1) is refused without being parsed.  Refused parts are not recorded one by one:
the request's summary (110104, with the counts per reason) records them, so a request of many bad
parts costs one audit record, as does a request refused as a whole.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from io import BytesIO
from typing import Any, NamedTuple

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from starlette.concurrency import run_in_threadpool

from safepacs.dicom.dicomjson import dataset_json
from safepacs.dicom.transcode import dataset_bytes
from safepacs.errors import AccessDenied, AuditError, InvalidObjectError, SafePacsError, StorageFullError
from safepacs.protocols.dicomweb.problems import Problem, not_found
from safepacs.protocols.dicomweb.requests import DICOM_JSON, checked_uid
from safepacs.services.audit import StoreBatch
from safepacs.services.ingest import IngestService, SopClassMismatch, SopInstanceMismatch
from safepacs.types import IngestOutcome, Principal

__all__ = ["TooManyParts", "split_multipart", "stow_router"]

log = logging.getLogger(__name__)

_BOUNDARY_RE = re.compile(r'boundary\s*=\s*("([^"]+)"|[^;\s]+)', re.IGNORECASE)
_TYPE_RE = re.compile(r'type\s*=\s*"?([^";\s]+)"?', re.IGNORECASE)

# PS3.18 Table 10.5.3-2 and PS3.4 B.2.3 status codes used as Failure/Warning Reason
_PROCESSING_FAILURE = 0x0110
_OUT_OF_RESOURCES = 0xA700
_SOP_CLASS_MISMATCH = 0xA900  # also for a mismatched SOP Instance UID
_CANNOT_UNDERSTAND = 0xC000
#: Its SOP Instance UID is stored with other content; not stored (as C-STORE answers, docs/conformance.md)
_DIFFERENT_INSTANCE_STORED = 0xC111


class TooManyParts(Exception):
    """A multipart body has more parts than a request may carry."""


def split_multipart(
    body: bytes, boundary: bytes, max_parts: int | None = None
) -> list[tuple[dict[str, str], bytes]]:
    """The (headers, content) of each part of a multipart body (RFC 2046 5.1.1); ValueError if malformed,
    :class:`TooManyParts` as soon as a part past the first ``max_parts`` begins."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise ValueError("the body does not contain the boundary of its Content-Type")
        body = body[start + 2 :]
    parts: list[tuple[dict[str, str], bytes]] = []
    position = len(delimiter)
    while True:
        if body[position : position + 2] == b"--":
            return parts
        if body[position : position + 2] != b"\r\n":
            raise ValueError("a multipart delimiter is not followed by a line break")
        if max_parts is not None and len(parts) >= max_parts:
            raise TooManyParts(max_parts)
        header_end = body.find(b"\r\n\r\n", position + 2)
        if header_end < 0:
            raise ValueError("a part has no end of headers")
        headers: dict[str, str] = {}
        for line in body[position + 2 : header_end].split(b"\r\n"):
            if line:
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        next_delimiter = body.find(b"\r\n" + delimiter, header_end + 4)
        if next_delimiter < 0:
            raise ValueError("the last part is not closed by the boundary")
        parts.append((headers, body[header_end + 4 : next_delimiter]))
        position = next_delimiter + 2 + len(delimiter)


def _item(sop_class: str, sop_instance: str, **extra: Any) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    for keyword, value in extra.items():
        setattr(item, keyword, value)
    return item


class _PartUids(NamedTuple):
    """The UIDs of a STOW-RS part that its response item and Retrieve URL name ("" when unknown)."""

    sop_class: str
    sop_instance: str
    study: str
    series: str


def _uids(data: bytes) -> _PartUids:
    """The UIDs of a part, best effort, for the response: from
    the data set, else (a data set pydicom cannot read, e.g. nested too deeply) the SOP Class and
    Instance UID from the file meta, else none."""
    keys = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - unreadable: the file meta alone, if it can be read
        return _meta_uids(data)
    a, b, c, d = (str(ds.get(k, "")) for k in keys)
    return _PartUids(a, b, c, d)


def _meta_uids(data: bytes) -> _PartUids:
    try:
        _, encoded = dataset_bytes(data)
        meta = pydicom.dcmread(BytesIO(data[: len(data) - len(encoded)])).file_meta
    except Exception:  # noqa: BLE001 - unreadable: the failure item carries no UIDs
        return _PartUids("", "", "", "")
    keys = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")
    return _PartUids(str(meta.get(keys[0], "")), str(meta.get(keys[1], "")), "", "")


def _is_part10(data: bytes) -> bool:
    """Whether ``data`` can be a DICOM Part 10 file: a 128-byte preamble, then "DICM" (PS3.10 7.1)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


_NOT_DICOM = "not application/dicom"
_NOT_PART10 = "not a DICOM Part 10 file (no 'DICM' prefix after the preamble, PS3.10 7.1)"
_OTHER_STUDY = "not of the study named in the request's path"


def _reason(exc: SafePacsError) -> int:
    if isinstance(exc, (SopClassMismatch, SopInstanceMismatch)):
        return _SOP_CLASS_MISMATCH
    if isinstance(exc, InvalidObjectError):
        return _CANNOT_UNDERSTAND
    if isinstance(exc, AccessDenied):
        return _PROCESSING_FAILURE
    return _OUT_OF_RESOURCES


def _insufficient_storage() -> Problem:
    """507 Insufficient Storage (RFC 4918 11.5): free disk space is below ``storage.min_free_bytes``."""
    return Problem(
        507,
        "Insufficient Storage",
        "the archive is out of disk space (storage.min_free_bytes) and stores nothing until space is "
        "freed; retrieving and searching go on",
        {"Retry-After": "300"},
    )


def stow_router(
    principal_of: Callable[[Request], Principal],
    ingest: IngestService,
    max_request_bytes: int,
    max_parts: int,
) -> APIRouter:
    router = APIRouter()

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise Problem(413, "Content Too Large", f"a request may carry at most {max_request_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise Problem(
                    413, "Content Too Large", f"a request may carry at most {max_request_bytes} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def store(
        principal: Principal,
        parts: list[tuple[dict[str, str], bytes]],
        study: str | None,
        base: str,
        batch: StoreBatch,
    ) -> JSONResponse:
        stored = Sequence()
        failed = Sequence()
        stored_studies: set[str] = set()
        out_of_space = False
        for headers, data in parts:
            media = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
            if not _is_part10(data):  # refused unread: no parse, no record of its own
                failed.append(_item("", "", FailureReason=_CANNOT_UNDERSTAND))
                batch.refuse(_NOT_DICOM if media != "application/dicom" else _NOT_PART10)
                continue
            sop_class, sop_instance, study_uid, series_uid = _uids(data)
            if media != "application/dicom" or (study is not None and study_uid != study):
                failed.append(_item(sop_class, sop_instance, FailureReason=_CANNOT_UNDERSTAND))
                batch.refuse(_NOT_DICOM if media != "application/dicom" else _OTHER_STUDY)
                continue
            try:
                result = ingest.ingest_file(principal, data, imported=False, batch=batch)
            except AuditError:  # fail closed: the whole request is refused (503), not one part
                raise
            except StorageFullError:
                out_of_space = True
                failed.append(_item(sop_class, sop_instance, FailureReason=_OUT_OF_RESOURCES))
                continue
            except SafePacsError as exc:
                log.info("STOW-RS part refused: %s", exc)
                failed.append(_item(sop_class, sop_instance, FailureReason=_reason(exc)))
                continue
            if result.outcome is IngestOutcome.CONFLICT:  # not stored: a failure (409 Conflict if alone)
                failed.append(_item(sop_class, sop_instance, FailureReason=_DIFFERENT_INSTANCE_STORED))
                continue
            stored_studies.add(study_uid)
            url = f"{base}/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_instance}"
            stored.append(_item(sop_class, sop_instance, RetrieveURL=url))
        ingest.end_batch(principal, batch)
        if out_of_space and not stored:
            raise _insufficient_storage()
        answer = Dataset()
        # Type 2 (PS3.18 Table I.1-1): the study's URL, empty when the request stored none or several
        if study is None and len(stored_studies) == 1:
            (study,) = stored_studies
        answer.RetrieveURL = f"{base}/dicomweb/studies/{study}" if study is not None else ""
        if failed:
            answer.FailedSOPSequence = failed
        if stored:
            answer.ReferencedSOPSequence = stored
        status = 200 if not failed else 202 if stored else 409
        return JSONResponse(dataset_json(answer), status_code=status, media_type=DICOM_JSON)

    async def stow(request: Request, study: str | None) -> JSONResponse:
        principal = await run_in_threadpool(principal_of, request)
        try:
            await run_in_threadpool(ingest.require, principal)  # a refusal is recorded
        except AccessDenied:
            raise not_found() from None
        batch = StoreBatch(summarise_refusals=True)
        try:  # before the body is read: no room, no upload (the refusal is recorded at once)
            await run_in_threadpool(ingest.check_space, principal)
        except StorageFullError:
            raise _insufficient_storage() from None
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/related"):
            raise Problem(
                415, "Unsupported Media Type", 'send instances as multipart/related; type="application/dicom"'
            )
        kind = _TYPE_RE.search(content_type)
        if kind is None or kind.group(1).lower() != "application/dicom":
            raise Problem(
                415, "Unsupported Media Type", 'SafePACS stores type="application/dicom" parts only'
            )
        match = _BOUNDARY_RE.search(content_type)
        if match is None:
            raise Problem(400, "Bad Request", "the Content-Type has no boundary")
        boundary = (match.group(2) or match.group(1)).encode("latin-1")
        try:
            body = await read_body(request)
            try:
                parts = split_multipart(body, boundary, max_parts)
            except TooManyParts:
                raise Problem(
                    413,
                    "Content Too Large",
                    f"a request may carry at most {max_parts} instances; send them in several requests",
                ) from None
        except Problem as exc:
            if exc.status == 413:  # refused as a whole: one record, nothing looked at or stored
                why = f"STOW-RS request refused: {exc.detail}"
                await run_in_threadpool(ingest.refuse_request, principal, why)
            raise
        except ValueError as exc:
            raise Problem(400, "Bad Request", f"the multipart body is malformed: {exc}") from None
        if not parts:
            raise Problem(400, "Bad Request", "the request holds no instance")
        base = str(request.base_url).rstrip("/")
        return await run_in_threadpool(store, principal, parts, study, base, batch)

    @router.post("/studies")
    async def stow_any(request: Request) -> JSONResponse:
        return await stow(request, None)

    @router.post("/studies/{study}")
    async def stow_study(request: Request, study: str) -> JSONResponse:
        return await stow(request, checked_uid(study))

    return router
