"""WADO-RS frames and bulk data (PS3.18 10.4.1, 8.7.3.5): pixels frame by frame, and the binary values
that metadata references with ``BulkDataURI``.

What a frame or the pixel bulk data is sent as depends on the Accept header (PS3.18 Table 8.7.3-5):

* ``multipart/related; type="application/octet-stream"`` (no ``transfer-syntax``, or Explicit VR Little
  Endian), ``multipart/related; type="*/*"``, ``*/*`` or no Accept: native pixels, little endian;
  compressed frames are decoded (PS3.18 8.7.3.5.2: uncompressed is the default);
* ``transfer-syntax=*``, or the stored syntax's media type (``image/jpeg``, ``image/jls``,
  ``image/jp2``, ``image/jphc``, ``image/dicom-rle``...) with no syntax, ``*`` or the stored one:
  compressed frames as stored, each part labelled with its media type and transfer syntax.

SafePACS does not compress: a compressed media type or syntax other than the stored one is 406.
The pixel bulk data of a compressed image as stored is one part per frame (one part, the whole stream,
for video); decoded, it is one part with the frames one after another.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from safepacs.audit.events import EventID
from safepacs.dicom import bulkdata
from safepacs.dicom.bulkdata import NATIVE_MEDIA_TYPE
from safepacs.dicom.transcode import Geometry, can_convert
from safepacs.errors import RetrieveError
from safepacs.protocols.dicomweb.problems import Problem, not_found
from safepacs.protocols.dicomweb.requests import acceptable, frame_numbers, media_ranges
from safepacs.protocols.dicomweb.retrieval import (
    UNCOMPRESSED,
    Part,
    boundary,
    multipart_media,
    multipart_stream,
    read_one,
)
from safepacs.services.retrieve import RetrieveService
from safepacs.types import Principal

__all__ = ["check_frames", "load_instance", "pixel_data_router", "pixel_geometry"]

Choice = Literal["native", "stored"]
_T = TypeVar("_T")
_NATIVE_PART = f"{NATIVE_MEDIA_TYPE}; transfer-syntax={ExplicitVRLittleEndian}"
_OCTET_TYPES = ("application/octet-stream", "*/*", "application/*")


def _choose(accept: str, ts: str) -> Choice:
    """Native or as-stored pixels for data stored in ``ts``, the first Accept range that can be met."""
    compressed = bulkdata.is_encapsulated(ts)
    stored_type = bulkdata.stored_media_type(ts)
    stored_family = stored_type.split("/")[0] + "/*"
    decodable = not compressed or (can_convert(ts) and not bulkdata.is_video(ts))
    wanted_native = False
    for media, params in media_ranges(accept) if accept.strip() else [("*/*", {})]:
        if not acceptable(params):
            continue
        syntax = params.get("transfer-syntax", "").strip()
        part = params.get("type", "*/*").strip().lower() if media == "multipart/related" else ""
        if media in ("*/*", "multipart/*") or (part in _OCTET_TYPES and syntax in ("", *UNCOMPRESSED)):
            if decodable:
                return "native"
            wanted_native = True
        elif part in _OCTET_TYPES and syntax in ("*", ts):
            return "stored"
        elif compressed and part in (stored_type, stored_family) and syntax in ("", "*", ts):
            return "stored"
    if wanted_native:
        raise Problem(
            406,
            "Not Acceptable",
            "SafePACS cannot decode this instance's transfer syntax; ask with transfer-syntax=* to get the "
            "pixels as stored",
        )
    raise Problem(
        406,
        "Not Acceptable",
        'pixels are sent as multipart/related; type="application/octet-stream" (uncompressed), or as '
        "stored with transfer-syntax=* or the stored media type; SafePACS does not compress",
    )


def load_instance(retrieve: RetrieveService, principal: Principal, uids: tuple[str, str, str]) -> Dataset:
    """The data set of one instance the principal may retrieve (404 otherwise; a damaged object: 500,
    recorded as a Security Alert, see :func:`~safepacs.protocols.dicomweb.retrieval.read_one`)."""
    return bulkdata.load(read_one(retrieve, principal, uids, event=EventID.INSTANCES_ACCESSED)[1])


def pixel_geometry(ds: Dataset) -> Geometry:
    """The checked geometry of the instance's pixel data; 400 without pixels, 406 if it cannot be sent."""
    if not bulkdata.has_pixels(ds):
        raise Problem(400, "Bad Request", "this instance has no pixel data, so it has no frames")
    try:
        return bulkdata.geometry(ds)
    except RetrieveError as exc:
        raise Problem(406, "Not Acceptable", str(exc)) from exc


def check_frames(numbers: list[int], shape: Geometry) -> None:
    """400 when a frame number is past the last frame (PS3.18 9.5.2 answers so for WADO-URI too)."""
    beyond = [n for n in numbers if n > shape.frames]
    if beyond:
        raise Problem(
            400,
            "Bad Request",
            f"frame {beyond[0]} does not exist: this instance has {shape.frames} frame(s), numbered from 1",
        )


def _eager(items: Iterator[_T]) -> Iterator[_T]:
    """The items, the first one made now so that a failure is still an error response, not a cut body."""
    try:
        first = next(items)
    except StopIteration:
        return iter(())
    except RetrieveError as exc:
        raise Problem(406, "Not Acceptable", str(exc)) from exc
    return itertools.chain([first], items)


def _frames(ds: Dataset, numbers: list[int], shape: Geometry, choice: Choice) -> Iterator[Part]:
    ts = bulkdata.transfer_syntax(ds)
    if choice == "stored" and bulkdata.is_encapsulated(ts):
        label = f"{bulkdata.stored_media_type(ts)}; transfer-syntax={ts}"
        return ((label, bulkdata.stored_frame(ds, n - 1, shape)) for n in numbers)
    return ((_NATIVE_PART, bulkdata.native_frame(ds, n - 1, shape)) for n in numbers)


def _pixel_bulk(ds: Dataset, accept: str) -> Iterator[Part]:
    ts = bulkdata.transfer_syntax(ds)
    choice = _choose(accept, ts)
    shape = pixel_geometry(ds)
    if choice == "stored" and bulkdata.is_video(ts):
        return iter([(f"{bulkdata.stored_media_type(ts)}; transfer-syntax={ts}", bulkdata.video_stream(ds))])
    if choice == "stored" and bulkdata.is_encapsulated(ts):
        return _eager(_frames(ds, list(range(1, shape.frames + 1)), shape, choice))
    if not bulkdata.is_encapsulated(ts) and ts != ExplicitVRBigEndian:
        return iter([(_NATIVE_PART, bytes(ds.PixelData))])  # native little endian: the value as stored
    decoded = _eager(bulkdata.native_frame(ds, i, shape) for i in range(shape.frames))
    return iter([(_NATIVE_PART, decoded)])  # one part, the frames one after another


def _element_bulk(ds: Dataset, path: str, accept: str) -> Iterator[Part]:
    elem = bulkdata.element_at(ds, path)
    if elem is None:
        raise not_found()
    if not elem.is_undefined_length:
        return iter([(NATIVE_MEDIA_TYPE, bulkdata.element_bytes(ds, elem))])
    ts = bulkdata.transfer_syntax(ds)  # nested encapsulated pixel data: an icon image, as stored only
    if _choose(accept, ts) != "stored" or not bulkdata.is_encapsulated(ts):
        raise Problem(406, "Not Acceptable", "this value is compressed; ask for it with transfer-syntax=*")
    try:
        stream = b"".join(generate_fragments(elem.value))
    except Exception as exc:  # pydicom raises several types on broken encapsulation
        raise Problem(406, "Not Acceptable", "this compressed value is not validly encapsulated") from exc
    return iter([(f"{bulkdata.stored_media_type(ts)}; transfer-syntax={ts}", stream)])


def _response(parts: Iterator[Part], part_type: str) -> StreamingResponse:
    mark = boundary()
    return StreamingResponse(multipart_stream(parts, mark), media_type=multipart_media(part_type, mark))


def pixel_data_router(principal_of: Callable[[Request], Principal], retrieve: RetrieveService) -> APIRouter:
    router = APIRouter()
    instance_path = "/studies/{study}/series/{series}/instances/{instance}"

    @router.get(instance_path + "/frames/{frames}", summary="Retrieve frames, native or as stored")
    def frames(request: Request, study: str, series: str, instance: str, frames: str) -> StreamingResponse:
        principal = principal_of(request)
        numbers = frame_numbers(frames)
        ds = load_instance(retrieve, principal, (study, series, instance))
        shape = pixel_geometry(ds)
        check_frames(numbers, shape)
        ts = bulkdata.transfer_syntax(ds)
        if bulkdata.is_video(ts):
            raise Problem(
                406, "Not Acceptable", "video has no separately encoded frames; retrieve the pixel bulk data"
            )
        choice = _choose(request.headers.get("accept", ""), ts)
        part_type = NATIVE_MEDIA_TYPE
        if choice == "stored" and bulkdata.is_encapsulated(ts):
            part_type = bulkdata.stored_media_type(ts)
        return _response(_eager(_frames(ds, numbers, shape, choice)), part_type)

    @router.get(instance_path + "/bulkdata/{path:path}", summary="Retrieve bulk data named in metadata")
    def bulk(request: Request, study: str, series: str, instance: str, path: str) -> StreamingResponse:
        principal = principal_of(request)
        path = path.upper()
        if not bulkdata.valid_path(path):
            raise not_found()
        ds = load_instance(retrieve, principal, (study, series, instance))
        accept = request.headers.get("accept", "")
        if path == "7FE00010":
            if not bulkdata.has_pixels(ds):
                raise not_found()
            parts = _pixel_bulk(ds, accept)
        else:
            parts = _element_bulk(ds, path, accept)
        first = next(parts)
        part_type = first[0].split(";")[0]
        return _response(itertools.chain([first], parts), part_type)

    return router
