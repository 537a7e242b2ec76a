"""WADO-RS (PS3.18 10.4): studies, series and instances as ``multipart/related; type="application/dicom"``,
their metadata as DICOM JSON, and the pixel data as bulk data.

Instances come from the same retrieve service as C-GET and C-MOVE (policy, then the index, then
the decrypted bytes checked against their SHA-256).  ``transfer-syntax=*`` sends each instance as
stored; without it, or with Explicit/Implicit VR Little Endian, compressed instances are decoded
as for a C-GET peer that accepts only those (PS3.18 8.7.3.5.2: Explicit VR Little Endian is the
default).  The multipart body is streamed, one instance in memory at a time.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import pydicom
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from safepacs.errors import AccessDenied, QueryError, SafePacsError
from safepacs.services.ingest import file_meta
from safepacs.services.retrieve import RetrieveService
from safepacs.services.transcode import can_convert, transcode
from safepacs.types import InstanceRef, Principal, QueryLevel, QueryModel, Service
from safepacs.web.problems import Problem, not_found
from safepacs.web.requests import DICOM_JSON, checked_uid, media_ranges

__all__ = ["make_router"]

log = logging.getLogger(__name__)

_PREAMBLE = b"\x00" * 128 + b"DICM"
_AS_STORED = "*"
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_PIXEL_DATA = 0x7FE00010


def _requested_syntax(request: Request) -> str:
    """The transfer syntax asked for with ``multipart/related; type="application/dicom"`` (or ``*/*``)."""
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return ExplicitVRLittleEndian
    for media, params in media_ranges(accept):
        if media == "*/*":
            return ExplicitVRLittleEndian
        if (
            media == "multipart/related"
            and params.get("type", "application/dicom").lower() == "application/dicom"
        ):
            return params.get("transfer-syntax", ExplicitVRLittleEndian).strip() or ExplicitVRLittleEndian
    raise Problem(
        406,
        "Not Acceptable",
        'instances are sent as multipart/related; type="application/dicom" (optionally with transfer-syntax)',
    )


def _part10(ref: InstanceRef, stored: bytes, target: str) -> tuple[str, bytes]:
    if target in (_AS_STORED, ref.transfer_syntax_uid):
        return ref.transfer_syntax_uid, stored
    encoded = transcode(stored, target)
    return target, b"".join((_PREAMBLE, file_meta(ref.sop_class_uid, ref.sop_instance_uid, target), encoded))


def _multipart(
    refs: list[InstanceRef], read: Callable[[InstanceRef], bytes], target: str, boundary: str
) -> Iterator[bytes]:
    sent = 0
    for ref in refs:
        try:
            ts, body = _part10(ref, read(ref), target)
        except SafePacsError as exc:  # headers are gone already: leave the instance out, say why in the log
            log.warning("WADO-RS left an instance out: %s", exc)
            continue
        sent += 1
        yield (
            f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={ts}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("ascii")
        yield body
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def make_router(principal_of: Callable[[Request], Principal], retrieve: RetrieveService) -> APIRouter:
    router = APIRouter()

    def locate(request: Request, path: dict[str, str], level: QueryLevel) -> list[InstanceRef]:
        principal = principal_of(request)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level.value
        for keyword, uid in path.items():
            setattr(identifier, keyword, checked_uid(uid))
        try:
            refs = retrieve.locate(principal, Service.GET, QueryModel.STUDY_ROOT, level, identifier)
        except (AccessDenied, QueryError):
            refs = []
        if not refs:  # nothing there, or nothing this principal may see: the same answer
            raise not_found()
        return refs

    def instances(request: Request, path: dict[str, str], level: QueryLevel) -> StreamingResponse:
        target = _requested_syntax(request)
        refs = locate(request, path, level)
        if target != _AS_STORED and target not in _UNCOMPRESSED:
            if any(ref.transfer_syntax_uid != target for ref in refs):
                raise Problem(
                    406,
                    "Not Acceptable",
                    "SafePACS converts only to Explicit or Implicit VR Little Endian; ask for those or for "
                    "transfer-syntax=* (as stored)",
                )
        elif target != _AS_STORED:
            blocked = [
                r for r in refs if r.transfer_syntax_uid != target and not can_convert(r.transfer_syntax_uid)
            ]
            if blocked:
                raise Problem(
                    406,
                    "Not Acceptable",
                    "some instances are stored in a transfer syntax SafePACS cannot decode; ask for "
                    "transfer-syntax=* to get them as stored",
                )
        boundary = secrets.token_hex(16)
        media = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return StreamingResponse(_multipart(refs, retrieve.read, target, boundary), media_type=media)

    def metadata(request: Request, path: dict[str, str], level: QueryLevel) -> JSONResponse:
        refs = locate(request, path, level)
        base = str(request.base_url).rstrip("/")
        out: list[dict[str, Any]] = []
        for ref in refs:
            try:
                ds = pydicom.dcmread(BytesIO(retrieve.read(ref)))
            except SafePacsError as exc:
                log.warning("WADO-RS metadata left an instance out: %s", exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a stored object pydicom cannot read
                log.warning(
                    "WADO-RS metadata could not read an instance", extra={"error": type(exc).__name__}
                )
                continue
            has_pixels = _PIXEL_DATA in ds
            if has_pixels:
                del ds[_PIXEL_DATA]
            item = ds.to_json_dict(bulk_data_threshold=2**31)
            if has_pixels:
                item["7FE00010"] = {
                    "vr": "OB" if _encapsulated(ref) else "OW",
                    "BulkDataURI": (
                        f"{base}/dicomweb/studies/{ref.study_uid}/series/{ref.series_uid}"
                        f"/instances/{ref.sop_instance_uid}/bulkdata/7FE00010"
                    ),
                }
            out.append(item)
        return JSONResponse(out, media_type=DICOM_JSON)

    @router.get("/studies/{study}")
    def study(request: Request, study: str) -> StreamingResponse:
        return instances(request, {"StudyInstanceUID": study}, QueryLevel.STUDY)

    @router.get("/studies/{study}/series/{series}")
    def series(request: Request, study: str, series: str) -> StreamingResponse:
        return instances(request, {"StudyInstanceUID": study, "SeriesInstanceUID": series}, QueryLevel.SERIES)

    @router.get("/studies/{study}/series/{series}/instances/{instance}")
    def instance(request: Request, study: str, series: str, instance: str) -> StreamingResponse:
        path = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
        return instances(request, path, QueryLevel.IMAGE)

    @router.get("/studies/{study}/metadata")
    def study_metadata(request: Request, study: str) -> JSONResponse:
        return metadata(request, {"StudyInstanceUID": study}, QueryLevel.STUDY)

    @router.get("/studies/{study}/series/{series}/metadata")
    def series_metadata(request: Request, study: str, series: str) -> JSONResponse:
        return metadata(request, {"StudyInstanceUID": study, "SeriesInstanceUID": series}, QueryLevel.SERIES)

    @router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
    def instance_metadata(request: Request, study: str, series: str, instance: str) -> JSONResponse:
        path = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
        return metadata(request, path, QueryLevel.IMAGE)

    @router.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}")
    def bulkdata(request: Request, study: str, series: str, instance: str, tag: str) -> StreamingResponse:
        if tag.upper() != "7FE00010":
            raise not_found()
        path = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": instance}
        refs = locate(request, path, QueryLevel.IMAGE)
        ref = refs[0]
        if _encapsulated(ref):
            raise Problem(
                406,
                "Not Acceptable",
                "this instance's pixel data is compressed; retrieve the instance with transfer-syntax=*",
            )
        value = pydicom.dcmread(BytesIO(retrieve.read(ref))).get(_PIXEL_DATA)
        if value is None:
            raise not_found()
        boundary = secrets.token_hex(16)
        body = [
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode("ascii"),
            bytes(value.value),
            f"\r\n--{boundary}--\r\n".encode("ascii"),
        ]
        media = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
        return StreamingResponse(iter(body), media_type=media)

    return router


def _encapsulated(ref: InstanceRef) -> bool:
    return ref.transfer_syntax_uid not in (*_UNCOMPRESSED, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")
