"""WADO-RS rendered and thumbnail resources (PS3.18 10.4.1, 8.3.5): consumer images of studies,
series, instances and frames as ``image/jpeg`` (the default) or ``image/png``.

An instance or a frame is one image; a study, a series or a list of frames is
``multipart/related; type="image/jpeg"`` (or png) with one rendered image per instance (its first
frame) or frame, and plain ``image/jpeg`` for those is 406.  The media type comes from Accept or the
``accept`` query parameter (PS3.18 8.3.3.1).  Query parameters (PS3.18 Table 8.3.5-1): ``window``
(center,width[,linear|linear-exact|sigmoid]), ``viewport`` (vw,vh[,sx,sy,sw,sh]; at most 4096 a side),
``quality`` (1-100, JPEG); ``annotation`` and ``iccprofile`` other than ``no`` are refused (400);
``charset`` and unknown parameters are ignored.  A thumbnail fits in 128 x 128
pixels or in ``viewport=vw,vh``; a study's or series' thumbnail is its first series' middle image.

Rendering runs in at most a few threads at once, whatever the number of requests.

A stored object that fails its integrity check is never rendered; it is recorded as a Security Alert
and a failed access.  Found before the answer has begun, it makes the answer a 500 problem; found
later in a study's or series' multipart, the answer ends cut short once the other images are sent
(:class:`~safepacs.protocols.dicomweb.retrieval.MultipartResponse`).  A thumbnail falls back to another image.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

from fastapi import APIRouter, Request, Response
from pydicom.dataset import Dataset
from pydicom.uid import UID

from safepacs.audit.events import EventID
from safepacs.dicom import bulkdata
from safepacs.dicom.render import (
    JPEG,
    MAX_SIDE,
    PNG,
    Region,
    RenderOptions,
    Window,
    WindowFunction,
    render,
)
from safepacs.errors import AuditError, IntegrityError, RenderRequestError, RetrieveError, SafePacsError
from safepacs.protocols.dicomweb.pixels import check_frames, pixel_geometry
from safepacs.protocols.dicomweb.problems import Problem
from safepacs.protocols.dicomweb.requests import acceptable, frame_numbers, media_ranges
from safepacs.protocols.dicomweb.retrieval import (
    IncompleteAnswer,
    MultipartResponse,
    Part,
    boundary,
    locate,
    multipart_media,
    multipart_stream,
)
from safepacs.services.retrieve import RetrieveService
from safepacs.types import InstanceRef, Principal

__all__ = [
    "Renderer",
    "parse_quality",
    "parse_viewport",
    "parse_window",
    "problem",
    "refuse_unsupported",
    "rendered_router",
]

log = logging.getLogger(__name__)

#: Rendered media types by Accept media range (``image/gif`` and the others: 406).
_MEDIA = {"image/jpeg": JPEG, "image/png": PNG, "image/*": JPEG, "*/*": JPEG}
THUMBNAIL_SIDE = 128
#: Most images (instances of a study or series, frames of a list) rendered in one response.
MAX_RENDERED_INSTANCES = 500
#: Most candidates tried for a thumbnail before giving up.
_THUMBNAIL_TRIES = 5


def _bad(detail: str) -> Problem:
    return Problem(400, "Bad Request", detail)


def parse_window(text: str) -> Window:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.4; function linear when left out)."""
    parts = [p.strip() for p in text.split(",")]
    usage = "window must be center,width,function with function linear, linear-exact or sigmoid"
    if len(parts) not in (2, 3):
        raise _bad(usage)
    try:
        center, width = float(parts[0]), float(parts[1])
        function = WindowFunction(parts[2].lower() if len(parts) == 3 else "linear")
    except ValueError:
        raise _bad(usage) from None
    try:
        return Window(center, width, function)
    except ValueError as exc:
        raise _bad(str(exc)) from None


def _integer(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise _bad(f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise _bad(f"{name} must be between {low} and {high}")
    return value


def parse_viewport(text: str, *, region: bool = True) -> tuple[int, int, Region | None]:
    """``viewport=vw,vh[,sx,sy,sw,sh]`` (PS3.18 8.3.5.1.3): the box and the source region, if any."""
    parts = text.split(",")
    if len(parts) not in ((2, 6) if region else (2,)):
        raise _bad("viewport must be vw,vh or vw,vh,sx,sy,sw,sh" if region else "viewport must be vw,vh")
    width = _integer(parts[0], "the viewport width", 1, MAX_SIDE)
    height = _integer(parts[1], "the viewport height", 1, MAX_SIDE)
    if len(parts) == 2:
        return width, height, None
    sx, sy = (_integer(p, "sx and sy", 0, 2**31) if p.strip() else 0 for p in parts[2:4])
    sw, sh = (_integer(p, "sw and sh", -(2**31), 2**31) if p.strip() else None for p in parts[4:6])
    if sw == 0 or sh == 0:
        raise _bad("sw and sh must not be 0 (a negative value flips the image)")
    return width, height, Region(sx, sy, sw, sh)


def parse_quality(text: str) -> int:
    return _integer(text, "quality", 1, 100)


def refuse_unsupported(params: dict[str, str], names: Sequence[str] = ("annotation",)) -> None:
    """400 for rendering parameters SafePACS does not support (burned-in annotation, ICC profiles)."""
    for name in names:
        if name in params:
            raise _bad(f"{name} is not supported; leave the parameter out")
    if params.get("iccprofile", "no").strip().lower() != "no":
        raise _bad("iccprofile is not supported; leave it out or use iccprofile=no")


#: How a route reads a stored instance: :meth:`RetrieveService.fetch` for its principal and event.
Reader = Callable[[InstanceRef], bytes]


class Renderer:
    """Renders through :func:`~safepacs.dicom.render.render`, in at most ``slots`` threads at once
    (reading, decrypting and parsing the instance included, through the route's ``read``)."""

    def __init__(self, slots: int | None = None) -> None:
        self._slots = threading.BoundedSemaphore(slots or max(1, min(4, os.cpu_count() or 1)))

    def load(self, ref: InstanceRef, read: Reader) -> Dataset:
        with self._slots:
            return bulkdata.load(read(ref))

    def image(self, ds: Dataset, frame: int, options: RenderOptions) -> bytes:
        """One rendered image; :class:`RenderError` (or :class:`RetrieveError`) when it cannot be made."""
        with self._slots:
            return render(ds, frame, options)

    def instance(self, ref: InstanceRef, frame: int, options: RenderOptions, read: Reader) -> bytes:
        with self._slots:
            return render(bulkdata.load(read(ref)), frame, options)


def problem(exc: RetrieveError) -> Problem:
    """The answer when an image cannot be rendered: 400 when the request does not fit the image (a
    frame it does not have, a region outside it), else 406 (no pixel data, no decoder, too large)."""
    if isinstance(exc, RenderRequestError):
        return _bad(str(exc))
    return Problem(406, "Not Acceptable", str(exc))


def _rendered(
    jobs: Iterable[Callable[[], bytes]],
    media: str,
    errors: list[RetrieveError],
    damaged: list[IntegrityError],
) -> Iterator[Part]:
    """The images the jobs render; those that cannot be rendered are left out, their errors kept.  An
    instance whose object failed its check (recorded already) is left out too, and the parts then end
    with :class:`IncompleteAnswer`: an image missing for that reason must not go unnoticed."""
    for job in jobs:
        try:
            image = job()
        except AuditError:
            raise
        except IntegrityError as exc:
            log.warning("a rendered multipart left an image out: %s", exc)
            damaged.append(exc)
            continue
        except SafePacsError as exc:  # headers may be gone already: leave the image out, say why in the log
            log.info("a rendered multipart left an image out: %s", exc)
            if isinstance(exc, RetrieveError):
                errors.append(exc)
            continue
        yield media, image
    if damaged:
        raise IncompleteAnswer(len(damaged))


def _respond_many(
    jobs: Iterable[Callable[[], bytes]], media: str, record: Callable[[], None] | None = None
) -> MultipartResponse:
    """``multipart/related`` of rendered images; the first is made before answering, so that nothing
    renderable is an error answer rather than an empty body, and a damaged object found on the way
    there is a 500 problem.  ``record`` records the access once that first image is made."""
    errors: list[RetrieveError] = []
    damaged: list[IntegrityError] = []
    parts = _rendered(jobs, media, errors, damaged)
    try:
        first = next(parts, None)
    except IncompleteAnswer:
        first = None
    if damaged:
        raise damaged[0]
    if first is None:
        if errors:
            raise problem(errors[-1])
        raise Problem(406, "Not Acceptable", "nothing here can be rendered as an image")
    if record is not None:
        record()
    mark = boundary()
    return MultipartResponse(
        multipart_stream(itertools.chain([first], parts), mark), media_type=multipart_media(media, mark)
    )


def _media(request: Request, *, many: bool, parts_allowed: bool = True) -> tuple[str, bool]:
    """(image media type, as multipart) from the accept parameter or the Accept header."""
    accept = request.query_params.get("accept") or request.headers.get("accept", "")
    for media, params in media_ranges(accept) if accept.strip() else [("*/*", {})]:
        if not acceptable(params):
            continue
        if media == "multipart/related" and parts_allowed:
            part = params.get("type", "image/jpeg").strip().lower()
            if part in _MEDIA:
                return _MEDIA[part], True
        elif media == "multipart/*" and parts_allowed:
            return JPEG, True
        elif media == "*/*" or (not many and media in _MEDIA):
            return _MEDIA[media], many
    if many:
        detail = 'rendered studies, series and frame lists are sent as multipart/related; type="image/jpeg"'
    else:
        detail = "rendered images are sent as image/jpeg or image/png"
    raise Problem(406, "Not Acceptable", f"{detail} (or image/png); ask for one of those")


def _options(request: Request, media: str) -> RenderOptions:
    params = dict(request.query_params)
    refuse_unsupported(params)
    window = parse_window(params["window"]) if "window" in params else None
    width = height = None
    region = None
    if "viewport" in params:
        width, height, region = parse_viewport(params["viewport"])
    quality = parse_quality(params["quality"]) if "quality" in params else 90
    return RenderOptions(media, window, region, width, height, quality)


def _image_classes_first(refs: list[InstanceRef]) -> list[InstanceRef]:
    images = [r for r in refs if "Image Storage" in UID(r.sop_class_uid).name]
    return images or refs


def _representatives(refs: list[InstanceRef]) -> list[InstanceRef]:
    """Thumbnail candidates: the middle image of each series (in series order), then the others."""
    series: dict[str, list[InstanceRef]] = {}
    for ref in refs:
        series.setdefault(ref.series_uid, []).append(ref)
    middles: list[InstanceRef] = []
    others: list[InstanceRef] = []
    for group in series.values():
        images = _image_classes_first(group)
        middle = len(images) // 2
        middles.append(images[middle])
        others += images[:middle] + images[middle + 1 :]
    return (middles + others)[:_THUMBNAIL_TRIES]


def rendered_router(principal_of: Callable[[Request], Principal], retrieve: RetrieveService) -> APIRouter:
    router = APIRouter()
    renderer = Renderer()
    instance_path = "/studies/{study}/series/{series}/instances/{instance}"

    def reader(principal: Principal) -> Reader:
        return partial(retrieve.fetch, principal, event=EventID.INSTANCES_ACCESSED)

    def many(request: Request, *uids: str) -> MultipartResponse:
        principal = principal_of(request)
        media, _ = _media(request, many=True)
        options = _options(request, media)
        refs = locate(retrieve, principal, uids, event=EventID.INSTANCES_ACCESSED, record=False)
        if len(refs) > MAX_RENDERED_INSTANCES:
            raise _bad(
                f"more than {MAX_RENDERED_INSTANCES} instances to render in one answer; "
                "ask for a series or for the instances one by one"
            )
        read = reader(principal)
        return _respond_many(
            (partial(renderer.instance, ref, 0, options, read) for ref in refs),
            media,
            partial(retrieve.record, principal, refs, EventID.INSTANCES_ACCESSED),
        )

    def frames(request: Request, uids: tuple[str, str, str], frame_list: str) -> Response:
        principal = principal_of(request)
        numbers = frame_numbers(frame_list)
        if len(numbers) > MAX_RENDERED_INSTANCES:
            raise _bad(f"more than {MAX_RENDERED_INSTANCES} frames to render in one answer; ask for fewer")
        media, as_parts = _media(request, many=len(numbers) > 1)
        options = _options(request, media)
        ref = locate(retrieve, principal, uids, event=EventID.INSTANCES_ACCESSED, record=False)[0]
        ds = renderer.load(ref, reader(principal))  # damaged: 500, recorded as such
        retrieve.record(principal, [ref], EventID.INSTANCES_ACCESSED)
        if not bulkdata.has_pixels(ds):
            raise Problem(
                406, "Not Acceptable", "this instance has no pixel data, so it has no rendered image"
            )
        check_frames(numbers, pixel_geometry(ds))
        if as_parts:
            return _respond_many((partial(renderer.image, ds, n - 1, options) for n in numbers), media)
        try:
            return Response(renderer.image(ds, numbers[0] - 1, options), media_type=media)
        except RetrieveError as exc:
            raise problem(exc) from exc

    def thumbnail(request: Request, uids: Sequence[str], frame_list: str | None = None) -> Response:
        principal = principal_of(request)
        media, _ = _media(request, many=False, parts_allowed=False)
        side = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
        if "viewport" in request.query_params:
            side = parse_viewport(request.query_params["viewport"], region=False)[:2]
        options = RenderOptions(media, max_width=side[0], max_height=side[1], quality=80)
        if frame_list is not None:
            numbers = frame_numbers(frame_list)
            if len(numbers) != 1:
                raise _bad("a thumbnail is of one frame; name a single frame number")
            try:
                ref = locate(retrieve, principal, uids, event=EventID.INSTANCES_ACCESSED, record=False)[0]
                image = renderer.instance(ref, numbers[0] - 1, options, reader(principal))
                retrieve.record(principal, [ref], EventID.INSTANCES_ACCESSED)
            except RetrieveError as exc:
                raise problem(exc) from exc
            return Response(image, media_type=media)
        for ref in _representatives(locate(retrieve, principal, uids, event=EventID.INSTANCES_ACCESSED)):
            try:
                return Response(renderer.instance(ref, 0, options, reader(principal)), media_type=media)
            except AuditError:
                raise
            except SafePacsError as exc:  # a damaged object is recorded already: try another image
                log.info("a thumbnail candidate could not be rendered: %s", exc)
        raise Problem(406, "Not Acceptable", "nothing here can be rendered as a thumbnail")

    @router.get("/studies/{study}/rendered", summary="Retrieve a study rendered")
    def study_rendered(request: Request, study: str) -> MultipartResponse:
        return many(request, study)

    @router.get("/studies/{study}/series/{series}/rendered", summary="Retrieve a series rendered")
    def series_rendered(request: Request, study: str, series: str) -> MultipartResponse:
        return many(request, study, series)

    @router.get(instance_path + "/rendered", summary="Retrieve an instance rendered")
    def instance_rendered(request: Request, study: str, series: str, instance: str) -> Response:
        return frames(request, (study, series, instance), "1")

    @router.get(instance_path + "/frames/{frame_list}/rendered", summary="Retrieve frames rendered")
    def frames_rendered(
        request: Request, study: str, series: str, instance: str, frame_list: str
    ) -> Response:
        return frames(request, (study, series, instance), frame_list)

    @router.get("/studies/{study}/thumbnail", summary="Retrieve a study thumbnail")
    def study_thumbnail(request: Request, study: str) -> Response:
        return thumbnail(request, (study,))

    @router.get("/studies/{study}/series/{series}/thumbnail", summary="Retrieve a series thumbnail")
    def series_thumbnail(request: Request, study: str, series: str) -> Response:
        return thumbnail(request, (study, series))

    @router.get(instance_path + "/thumbnail", summary="Retrieve an instance thumbnail")
    def instance_thumbnail(request: Request, study: str, series: str, instance: str) -> Response:
        return thumbnail(request, (study, series, instance))

    @router.get(instance_path + "/frames/{frame_list}/thumbnail", summary="Retrieve a frame thumbnail")
    def frame_thumbnail(
        request: Request, study: str, series: str, instance: str, frame_list: str
    ) -> Response:
        return thumbnail(request, (study, series, instance), frame_list)

    return router
