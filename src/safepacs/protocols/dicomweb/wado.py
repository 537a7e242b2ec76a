"""WADO-RS (PS3.18 10.4): studies, series and instances as ``multipart/related; type="application/dicom"``
and their metadata as DICOM JSON; the router also carries the frames and bulk data resources
(:mod:`safepacs.protocols.dicomweb.pixels`) and the rendered and thumbnail resources
(:mod:`safepacs.protocols.dicomweb.rendered`).

Instances come from the same retrieve service as C-GET and C-MOVE (policy, then the index, then
the decrypted bytes checked against what the index recorded).  A stored object that fails that check
is never sent, and is recorded as a Security Alert and a failed transfer: when it is the first
instance of the answer (always so for an instance), the answer is a 500 problem, before anything
else; further on in a series or study the other instances are sent and the answer then ends cut short
(:class:`~safepacs.protocols.dicomweb.retrieval.MultipartResponse`: no closing delimiter, no end of
the body), which every HTTP client reports as an error.  Metadata is built whole before it is
answered, so a damaged instance makes it a 500 problem.  ``transfer-syntax=*`` sends each instance as
stored; without it, or with Explicit/Implicit VR Little Endian, compressed instances are decoded
as for a C-GET peer that accepts only those (PS3.18 8.7.3.5.2: Explicit VR Little Endian is the
default).  The multipart body is streamed, made in the thread pool about 1 MB at a time, never the
whole series in memory; sent as stored, its ``Content-Length`` is known beforehand from the sizes the
index records (h11 then passes each instance through as it is, where the chunked coding cost a copy
of each), converted it is chunked.  In metadata, Pixel Data and every binary value over 1 KiB is a
``BulkDataURI`` (PS3.18 F.2) that the bulkdata resource answers; metadata is written straight from
the stored bytes (:mod:`safepacs.dicom.fastjson`), through pydicom only for an instance that path
declines.  An instance stored before ingest refused sequences nested deeper than 32 levels is sent
with its deeper items left out (those sequences empty) and a ``Warning: 299`` header saying so; an
instance whose data set cannot be read is left out with a ``Warning: 299``, and when none of them can
be, the answer is a 500 problem.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydicom.uid import ExplicitVRLittleEndian

from safepacs.audit.events import EventID
from safepacs.dicom import fastjson
from safepacs.dicom.nesting import MAX_SEQUENCE_DEPTH
from safepacs.dicom.transcode import can_convert
from safepacs.errors import AuditError, IntegrityError, SafePacsError
from safepacs.protocols.dicomweb import pixels, rendered
from safepacs.protocols.dicomweb.problems import Problem
from safepacs.protocols.dicomweb.requests import DICOM_JSON, media_ranges
from safepacs.protocols.dicomweb.retrieval import (
    AS_STORED,
    UNCOMPRESSED,
    IncompleteAnswer,
    MultipartResponse,
    Part,
    boundary,
    locate,
    multipart_length,
    multipart_media,
    multipart_stream,
    part10_as,
)
from safepacs.services.retrieve import RetrieveService
from safepacs.types import InstanceRef, Principal

__all__ = ["wado_router"]

log = logging.getLogger(__name__)

#: Said when an instance's sequence items deeper than the ingest limit were left out of its metadata.
_PRUNED = (
    f'299 SafePACS "sequence items nested deeper than {MAX_SEQUENCE_DEPTH} levels were left out; '
    'their sequences are sent empty"'
)


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


def _content_type(ts: str) -> str:
    return f"application/dicom; transfer-syntax={ts}"


def _part(ts: str, body: bytes) -> Part:
    return _content_type(ts), body


def _instances(
    refs: list[InstanceRef],
    read: Callable[[InstanceRef], bytes],
    target: str,
    *,
    first: Part,
    sized: bool = False,
) -> Iterator[Part]:
    """``first``, then the parts of ``refs``; one that cannot be sent (its object failed its check, it
    cannot be converted) is left out, and once the others are sent :class:`IncompleteAnswer` ends the
    answer cut short: the headers are gone already, and a body that looked complete would hide the
    loss.  ``sized``: the answer announced its length from the sizes the index records
    (:func:`_sized_length`), so an instance of another size is left out too (it would not fit)."""
    yield first
    missing = 0
    for ref in refs:
        try:
            ts, body = part10_as(ref, read(ref), target)
            if sized and len(body) != ref.blob.size:
                raise SafePacsError("a stored instance is not of the size its index record names")
        except AuditError:
            raise
        except SafePacsError as exc:
            log.warning("WADO-RS left an instance out: %s", exc)
            missing += 1
            continue
        yield _part(ts, body)
    if missing:
        raise IncompleteAnswer(missing)


def _sized_length(refs: list[InstanceRef], first: Part, target: str, mark: str) -> int | None:
    """The exact length of the answer when every instance goes as stored (no conversion: then each
    part is the stored Part 10 bytes, whose size the index records at ingest), else None (the answer
    is sent chunked)."""
    if target != AS_STORED and any(ref.transfer_syntax_uid != target for ref in refs):
        return None
    content = first[1]
    if not isinstance(content, bytes) or len(content) != refs[0].blob.size:
        return None
    rest = [(_content_type(ref.transfer_syntax_uid), ref.blob.size) for ref in refs[1:]]
    return multipart_length([(first[0], len(content)), *rest], mark)


def _bulk_uri(base: str, ref: InstanceRef) -> Callable[[str], str]:
    """The bulkdata URI of an element path of ``ref`` (see :func:`safepacs.dicom.bulkdata.metadata`)."""
    prefix = (
        f"{base}/dicomweb/studies/{ref.study_uid}/series/{ref.series_uid}"
        f"/instances/{ref.sop_instance_uid}/bulkdata/"
    )
    return lambda path: prefix + path


def wado_router(principal_of: Callable[[Request], Principal], retrieve: RetrieveService) -> APIRouter:
    router = APIRouter()

    def instances(request: Request, *uids: str) -> MultipartResponse:
        principal = principal_of(request)
        target = _requested_syntax(request)
        refs = locate(retrieve, principal, uids, record=False)
        if target != AS_STORED and target not in UNCOMPRESSED:
            if any(ref.transfer_syntax_uid != target for ref in refs):
                raise Problem(
                    406,
                    "Not Acceptable",
                    "SafePACS converts only to Explicit or Implicit VR Little Endian; ask for those or for "
                    "transfer-syntax=* (as stored)",
                )
        elif target != AS_STORED:
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
        retrieval = retrieve.begin(principal, refs, EventID.INSTANCES_TRANSFERRED)
        if retrieval.first_error is not None:  # nothing sent yet: the answer is an error (500)
            raise retrieval.first_error
        # The first part is converted before the answer begins too: an instance that cannot be sent in
        # the syntax asked for is then a 500 problem (RetrieveError), not a 200 with nothing in it.
        first = _part(*part10_as(refs[0], retrieval.read(refs[0]), target))
        retrieval.record()
        mark = boundary()
        length = _sized_length(refs, first, target, mark)
        parts = _instances(refs[1:], retrieval.read, target, first=first, sized=length is not None)
        return MultipartResponse(
            multipart_stream(parts, mark),
            media_type=multipart_media("application/dicom", mark),
            content_length=length,
        )

    def metadata(request: Request, *uids: str) -> JSONResponse:
        principal = principal_of(request)
        refs = locate(retrieve, principal, uids, event=EventID.INSTANCES_ACCESSED, record=False)
        base = str(request.base_url).rstrip("/")
        out: list[dict[str, Any]] = []
        pruned = False
        failures: list[SafePacsError] = []
        for ref in refs:
            try:
                part10 = retrieve.fetch(principal, ref, EventID.INSTANCES_ACCESSED)
                json_model, deep = fastjson.instance_metadata(part10, _bulk_uri(base, ref))
                out.append(json_model)
                pruned |= deep
            except (IntegrityError, AuditError):
                raise  # a damaged object (recorded): 500, the answer is not sent incomplete
            except SafePacsError as exc:
                log.warning("WADO-RS metadata left an instance out: %s", exc)
                failures.append(exc)
        retrieve.record(principal, refs, EventID.INSTANCES_ACCESSED)
        if failures and not out:
            raise Problem(500, "Internal Server Error", f"the metadata cannot be sent: {failures[0]}")
        warnings = []
        if pruned:
            warnings.append(_PRUNED)
        if failures:
            left_out = f"{len(failures)} instance(s) left out: their data sets cannot be read"
            warnings.append(f'299 SafePACS "{left_out}"')
        headers = {"Warning": ", ".join(warnings)} if warnings else None
        return JSONResponse(out, media_type=DICOM_JSON, headers=headers)

    @router.get("/studies/{study}", summary="Retrieve a study's instances")
    def study(request: Request, study: str) -> MultipartResponse:
        return instances(request, study)

    @router.get("/studies/{study}/series/{series}", summary="Retrieve a series' instances")
    def series(request: Request, study: str, series: str) -> MultipartResponse:
        return instances(request, study, series)

    @router.get("/studies/{study}/series/{series}/instances/{instance}", summary="Retrieve an instance")
    def instance(request: Request, study: str, series: str, instance: str) -> MultipartResponse:
        return instances(request, study, series, instance)

    @router.get("/studies/{study}/metadata", summary="Retrieve a study's metadata")
    def study_metadata(request: Request, study: str) -> JSONResponse:
        return metadata(request, study)

    @router.get("/studies/{study}/series/{series}/metadata", summary="Retrieve a series' metadata")
    def series_metadata(request: Request, study: str, series: str) -> JSONResponse:
        return metadata(request, study, series)

    @router.get(
        "/studies/{study}/series/{series}/instances/{instance}/metadata",
        summary="Retrieve an instance's metadata",
    )
    def instance_metadata(request: Request, study: str, series: str, instance: str) -> JSONResponse:
        return metadata(request, study, series, instance)

    router.include_router(pixels.pixel_data_router(principal_of, retrieve))
    router.include_router(rendered.rendered_router(principal_of, retrieve))
    return router
