"""WADO-URI (PS3.18 9): ``GET /dicomweb/wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..``.

One instance, as a Part 10 file (``contentType=application/dicom``) or rendered as ``image/jpeg`` or
``image/png``.  Without ``contentType`` a single-frame image (or an image asked for with image
parameters such as ``frameNumber``) is sent as ``image/jpeg`` and anything else as
``application/dicom``, as PS3.18 has had it since WADO began.  ``contentType`` may list several
types (``image/png,application/dicom``): the first SafePACS supports wins; none supported is 406.

* ``application/dicom``: in Explicit VR Little Endian unless ``transferSyntax`` names another
  (PS3.18 9.4.2.4): the stored syntax sends the instance as stored, Implicit VR Little Endian is
  converted to, anything else is 406, and a value that is not a UID is 400.  The bytes are those
  WADO-RS sends for the same syntax.
* images: ``frameNumber`` (from 1; past the last frame is 400), ``windowCenter`` with
  ``windowWidth`` (a linear window), ``region=xmin,ymin,xmax,ymax`` (fractions of the image),
  ``rows`` and ``columns`` (each a maximum, the aspect ratio kept; at most 4096), ``imageQuality``
  (1-100), rendered as WADO-RS renders (:mod:`safepacs.dicom.render`).

``anonymize``, ``annotation``, ``presentationUID`` and ``presentationSeriesUID`` are refused with 400
(SafePACS does not de-identify or apply presentation states on the fly), as are image parameters
with ``application/dicom`` and ``transferSyntax`` with an image.  Access is that of WADO-RS: a
bearer token whose user may retrieve, and 404 "no such resource" for what is not there or not theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from fastapi import APIRouter, Request, Response
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from safepacs.audit.events import EventID
from safepacs.dicom import bulkdata
from safepacs.dicom.render import JPEG, MAX_SIDE, PNG, Region, RenderOptions, Window
from safepacs.dicom.transcode import can_convert
from safepacs.errors import RetrieveError
from safepacs.protocols.dicomweb.problems import Problem
from safepacs.protocols.dicomweb.rendered import Renderer, parse_quality, problem
from safepacs.protocols.dicomweb.requests import media_ranges
from safepacs.protocols.dicomweb.retrieval import UNCOMPRESSED, part10_as, read_one
from safepacs.services.ingest import valid_uid
from safepacs.services.retrieve import RetrieveService
from safepacs.types import InstanceRef, Principal

__all__ = ["wadouri_router"]

DICOM = "application/dicom"
_CONTENT_TYPES = {DICOM: DICOM, "image/jpeg": JPEG, "image/png": PNG, "image/*": JPEG, "*/*": JPEG}
_IMAGE_PARAMS = ("frameNumber", "windowCenter", "windowWidth", "region", "rows", "columns", "imageQuality")
_REFUSED = ("anonymize", "annotation", "presentationUID", "presentationSeriesUID")


def _bad(detail: str) -> Problem:
    return Problem(400, "Bad Request", detail)


def _content_type(value: str | None) -> str | None:
    """The first supported media type of ``contentType`` (None when absent); 406 when none is."""
    if value is None:
        return None
    for media, _ in media_ranges(value):
        if media in _CONTENT_TYPES:
            return _CONTENT_TYPES[media]
    raise Problem(406, "Not Acceptable", "contentType must be application/dicom, image/jpeg or image/png")


def _number(params: dict[str, str], name: str) -> float | None:
    if name not in params:
        return None
    try:
        value = float(params[name])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _bad(f"{name} must be a number")
    return value


def _whole(params: dict[str, str], name: str, low: int, high: int) -> int | None:
    if name not in params:
        return None
    try:
        value = int(params[name].strip())
    except ValueError:
        raise _bad(f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise _bad(f"{name} must be between {low} and {high}")
    return value


def _region(text: str) -> Region:
    """``region=xmin,ymin,xmax,ymax`` as fractions of the image (PS3.18 9.5)."""
    usage = "region must be xmin,ymin,xmax,ymax with 0 <= xmin < xmax <= 1 and 0 <= ymin < ymax <= 1"
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise _bad(usage) from None
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise _bad(usage)
    return Region(x0, y0, x1 - x0, y1 - y0, fractional=True)


def _image_options(params: dict[str, str]) -> tuple[int, RenderOptions]:
    """(frame index, rendering) of the image parameters (PS3.18 9.5)."""
    frame = _whole(params, "frameNumber", 1, 2**31 - 1)
    center, width = _number(params, "windowCenter"), _number(params, "windowWidth")
    window = None
    if (center is None) != (width is None):
        raise _bad("windowCenter and windowWidth go together; give both or neither")
    if center is not None and width is not None:
        try:
            window = Window(center, width)
        except ValueError as exc:
            raise _bad(str(exc)) from None
    region = _region(params["region"]) if "region" in params else None
    quality = parse_quality(params["imageQuality"]) if "imageQuality" in params else 90
    rows = _whole(params, "rows", 1, MAX_SIDE)
    columns = _whole(params, "columns", 1, MAX_SIDE)
    return (frame or 1) - 1, RenderOptions(JPEG, window, region, columns, rows, quality)


def _default_type(ds: Dataset, *, wants_image: bool) -> str:
    """image/jpeg for a single-frame image, or any image asked for with image parameters (a frame
    number, a window...); application/dicom for anything else."""
    if not bulkdata.has_pixels(ds):
        return DICOM
    try:
        frames = bulkdata.geometry(ds).frames
    except RetrieveError:
        return DICOM
    return JPEG if frames == 1 or wants_image else DICOM


def _parse(params: dict[str, str]) -> tuple[list[str], str | None, str]:
    """(UIDs, content type or None, transfer syntax or "") of a WADO-URI request; 400 or 406 if bad."""
    if params.get("requestType") != "WADO":
        raise _bad("requestType=WADO is required (PS3.18 9)")
    uids = [params.get(name, "") for name in ("studyUID", "seriesUID", "objectUID")]
    if not all(valid_uid(uid) for uid in uids):
        raise _bad("studyUID, seriesUID and objectUID are required, each a valid UID")
    for name in _REFUSED:
        if name in params:
            raise _bad(f"{name} is not supported; leave the parameter out")
    media = _content_type(params.get("contentType"))
    syntax = params.get("transferSyntax", "").strip()
    if syntax and not valid_uid(syntax):
        raise _bad("transferSyntax must be a transfer syntax UID")
    if media not in (None, DICOM) and syntax:
        raise _bad("transferSyntax applies to contentType=application/dicom only")
    return uids, media, syntax


def _part10(ref: InstanceRef, stored: bytes, syntax: str) -> Response:
    """The object in ``syntax`` (default Explicit VR Little Endian, PS3.18 9.4.2.4); 406 if impossible."""
    target = syntax or ExplicitVRLittleEndian
    convertible = target in UNCOMPRESSED and can_convert(ref.transfer_syntax_uid)
    if target != ref.transfer_syntax_uid and not convertible:
        raise Problem(
            406,
            "Not Acceptable",
            "SafePACS sends an object as stored or converted to Explicit or Implicit VR Little Endian; "
            "ask for one of those with transferSyntax",
        )
    try:
        return Response(part10_as(ref, stored, target)[1], media_type=DICOM)
    except RetrieveError as exc:
        raise Problem(406, "Not Acceptable", str(exc)) from exc


def _event(media: str | None) -> EventID:
    """The instance itself goes out (110104), or an image rendered from it (110103)."""
    return EventID.INSTANCES_TRANSFERRED if media == DICOM else EventID.INSTANCES_ACCESSED


def wadouri_router(principal_of: Callable[[Request], Principal], retrieve: RetrieveService) -> APIRouter:
    router = APIRouter()
    renderer = Renderer()

    @router.get("/wado", summary="WADO-URI: an instance as DICOM or rendered")
    def wado(request: Request) -> Response:
        principal = principal_of(request)
        params = dict(request.query_params)
        uids, media, syntax = _parse(params)
        image_params = [name for name in _IMAGE_PARAMS if name in params]
        if media == DICOM and image_params:
            raise _bad(f"{', '.join(image_params)} apply to image content types only")
        frame, options = _image_options(params)
        ref, stored = read_one(retrieve, principal, uids, event=_event(media))  # damaged: 500, recorded
        if media == DICOM:
            return _part10(ref, stored, syntax)
        try:
            ds = bulkdata.load(stored)
            if media is None:
                media = DICOM if syntax else _default_type(ds, wants_image=bool(image_params))
                if media == DICOM:
                    if image_params:
                        raise _bad("this object has no image, so image parameters do not apply")
                    return _part10(ref, stored, syntax)
            image = renderer.image(ds, frame, replace(options, media_type=media))
        except RetrieveError as exc:
            raise problem(exc) from exc
        return Response(image, media_type=media)

    return router
