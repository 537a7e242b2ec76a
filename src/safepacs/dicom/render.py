"""Rendering a frame of a stored image as JPEG or PNG (PS3.18 8.3.5, 9.4, 10.4.1.1.3).

Pure functions of a parsed data set, no HTTP.  The pipeline is the grayscale or colour pipeline of
PS3.4 N.2, applied as if the query parameters were a presentation state (PS3.18 8.3.5.1):

1. one frame is decoded with pydicom (YCbCr turned into RGB; Palette Color through its lookup table);
2. grayscale: the Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence, PS3.3 C.11.1), then
   the VOI transformation: the requested window, else the data set's first Window Center/Width with
   its VOI LUT Function, else its VOI LUT Sequence, else the full range of the modality values
   (PS3.3 C.11.2.1.2); MONOCHROME1 is inverted so that the picture looks as it should (PS3.3
   C.7.6.3.1.2).  Enhanced multi-frame images take these from their functional groups (PS3.3 C.7.6.16).
   Windows do not apply to colour images;
3. the source region (PS3.18 viewport sx, sy, sw, sh, negative sw/sh flipping the image, or the
   WADO-URI region as fractions of the image), then scaling to fit the viewport with the aspect ratio
   kept (PS3.18 8.3.5.1.3; WADO-URI rows/columns, PS3.18 9.5);
4. encoding with Pillow: baseline JPEG (``quality``, PS3.18 8.3.5.1.2) or PNG.

Work is bounded: a frame of more than :data:`MAX_RENDER_SAMPLES` samples is refused before decoding
(with the decompression-bomb checks of :mod:`safepacs.dicom.bulkdata`) and no output side exceeds
:data:`MAX_SIDE` pixels.  Failures are :class:`~safepacs.errors.RenderError` (the image cannot be
rendered) or :class:`~safepacs.errors.RenderRequestError` (the request does not fit the image).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from io import BytesIO
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    convert_color_space,
)
from pydicom.uid import UID

from safepacs.dicom import bulkdata
from safepacs.dicom.transcode import can_convert
from safepacs.errors import RenderError, RenderRequestError, RetrieveError

__all__ = [
    "JPEG",
    "MAX_RENDER_SAMPLES",
    "MAX_SIDE",
    "PNG",
    "Region",
    "RenderOptions",
    "Window",
    "WindowFunction",
    "render",
]

JPEG = "image/jpeg"
PNG = "image/png"
#: Largest output width or height, and largest viewport a request may ask for.
MAX_SIDE = 4096
#: Largest frame rendered (Rows x Columns x Samples per Pixel): a 5120 x 6144 mammogram fits.
MAX_RENDER_SAMPLES = 2**25

_Y_MAX = 255.0
_U8 = np.ndarray[Any, np.dtype[np.uint8]]
_VIEW_KEYWORDS = (
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
#: Functional group macros holding the attributes above in enhanced multi-frame images (PS3.3 C.7.6.16).
_GROUP_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


class WindowFunction(enum.StrEnum):
    """VOI LUT Function (PS3.3 C.11.2.1.3), spelled as in the PS3.18 ``window`` parameter."""

    LINEAR = "linear"
    LINEAR_EXACT = "linear-exact"
    SIGMOID = "sigmoid"


#: VOI LUT Function (0028,1056) values (PS3.3 C.11.2.1.3).
_STORED_FUNCTIONS = {
    "LINEAR": WindowFunction.LINEAR,
    "LINEAR_EXACT": WindowFunction.LINEAR_EXACT,
    "SIGMOID": WindowFunction.SIGMOID,
}


@dataclass(frozen=True)
class Window:
    """A window (PS3.3 C.11.2.1.2): LINEAR needs a width of at least 1, the others more than 0."""

    center: float
    width: float
    function: WindowFunction = WindowFunction.LINEAR

    def __post_init__(self) -> None:
        least = 1.0 if self.function is WindowFunction.LINEAR else 0.0
        valid = math.isfinite(self.center) and math.isfinite(self.width)
        if not valid or self.width < least or (least == 0.0 and self.width <= 0.0):
            raise ValueError(
                "the window width must be at least 1 for linear and more than 0 for the other functions"
            )


@dataclass(frozen=True)
class Region:
    """A source rectangle: pixels (PS3.18 viewport ``sx, sy, sw, sh``, a negative width or height
    flipping the image, None reaching the image's edge) or, with ``fractional``, fractions of the
    image's width and height (WADO-URI ``region``, PS3.18 9.5)."""

    left: float = 0.0
    top: float = 0.0
    width: float | None = None
    height: float | None = None
    fractional: bool = False


@dataclass(frozen=True)
class RenderOptions:
    """What to render: media type, window, source region, the box to fit into, JPEG quality."""

    media_type: str = JPEG
    window: Window | None = None
    region: Region | None = None
    max_width: int | None = None
    max_height: int | None = None
    quality: int = 90


def render(ds: Dataset, frame: int, options: RenderOptions) -> bytes:
    """Frame ``frame`` (0-based) of ``ds`` rendered as ``options`` say, encoded as JPEG or PNG."""
    if not bulkdata.has_pixels(ds):
        raise RenderError("this instance has no pixel data, so it has no rendered image")
    try:
        shape = bulkdata.geometry(ds)
    except RetrieveError as exc:
        raise RenderError(str(exc)) from exc
    if not 0 <= frame < shape.frames:
        raise RenderRequestError(
            f"frame {frame + 1} does not exist: this image has {shape.frames} frame(s), numbered from 1"
        )
    if shape.rows * shape.columns * shape.samples > MAX_RENDER_SAMPLES:
        raise RenderError(
            f"the image has more than {MAX_RENDER_SAMPLES} samples per frame, too many to render; "
            "retrieve its frames instead"
        )
    ts = bulkdata.transfer_syntax(ds)
    if bulkdata.is_video(ts) or not can_convert(ts):
        raise RenderError("no decoder is installed for this instance's transfer syntax to render it")
    try:
        arr, properties = get_decoder(UID(ts)).as_array(ds, index=frame)  # YCbCr becomes RGB
    except Exception as exc:  # the codec plugins raise many types on corrupt data
        name = type(exc).__name__
        raise RenderError(f"the pixel data cannot be decoded ({name}); it may be corrupt") from exc
    photometric = str(properties.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    left, top, right, bottom, flip_x, flip_y = _box(options.region, shape.columns, shape.rows)
    if arr.ndim == 2 and photometric != "PALETTE COLOR":
        pixels = _grayscale(arr, ds, frame, options.window, (left, top, right, bottom))
        if photometric == "MONOCHROME1":
            pixels = 255 - pixels
    else:
        pixels = _colour(arr[top:bottom, left:right], ds, photometric)
    if flip_x:
        pixels = pixels[:, ::-1]
    if flip_y:
        pixels = pixels[::-1]
    image = Image.fromarray(np.ascontiguousarray(pixels))
    size = _fit(image.width, image.height, options.max_width, options.max_height)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = BytesIO()
    if options.media_type == PNG:
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=options.quality)
    return out.getvalue()


# Geometry ---------------------------------------------------------------------------------------------


class _Box(NamedTuple):
    """The source region of a rendering, clipped to the image, and whether to mirror it."""

    left: int
    top: int
    right: int
    bottom: int
    flip_x: bool
    flip_y: bool


def _box(region: Region | None, cols: int, rows: int) -> _Box:
    """The source region, clipped to the image (all of it without ``region``)."""
    if region is None:
        return _Box(0, 0, cols, rows, False, False)
    sx, sy = (cols, rows) if region.fractional else (1, 1)
    left = math.floor(region.left * sx)
    top = math.floor(region.top * sy)
    right = cols if region.width is None else min(cols, math.ceil((region.left + abs(region.width)) * sx))
    bottom = rows if region.height is None else min(rows, math.ceil((region.top + abs(region.height)) * sy))
    if not (0 <= left < right and 0 <= top < bottom):
        raise RenderRequestError(
            f"the source region lies outside the image, which is {cols} pixels wide and {rows} high"
        )
    return _Box(
        left,
        top,
        right,
        bottom,
        flip_x=region.width is not None and region.width < 0,
        flip_y=region.height is not None and region.height < 0,
    )


def _fit(width: int, height: int, max_width: int | None, max_height: int | None) -> tuple[int, int]:
    """The output size: scaled to fit the box with the aspect ratio kept, no side over MAX_SIDE."""
    scale = 1.0
    if max_width is not None or max_height is not None:
        scale = min(
            max_width / width if max_width is not None else math.inf,
            max_height / height if max_height is not None else math.inf,
        )
    scale = min(scale, MAX_SIDE / width, MAX_SIDE / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# Grayscale ----------------------------------------------------------------------------------------------


def _grayscale(
    arr: np.ndarray[Any, Any], ds: Dataset, frame: int, window: Window | None, box: tuple[int, int, int, int]
) -> _U8:
    """Modality LUT, VOI and output to 8 bits of a grayscale frame, cropped to ``box``."""
    view = _frame_view(ds, frame)
    left, top, right, bottom = box
    slope, intercept = 1.0, 0.0
    if view.get("ModalityLUTSequence"):
        try:
            arr = apply_modality_lut(arr, view)
        except Exception as exc:  # a malformed lookup table
            raise RenderError("the image's Modality LUT cannot be applied; it may be malformed") from exc
    else:
        slope = _number(view.get("RescaleSlope"), 1.0) or 1.0
        intercept = _number(view.get("RescaleIntercept"), 0.0)
    values = arr[top:bottom, left:right].astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if window is None:
        window = _stored_window(view)
    if window is None and view.get("VOILUTSequence"):
        lut = _voi_lut(values, view)
        if lut is not None:
            return lut
    if window is None:  # the full range of the modality values over the whole frame
        low, high = sorted((float(arr.min()) * slope + intercept, float(arr.max()) * slope + intercept))
        window = Window((low + high) / 2, max(high - low, 1e-6), WindowFunction.LINEAR_EXACT)
    return _apply_window(values, window)


def _apply_window(x: np.ndarray[Any, Any], window: Window) -> _U8:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID) onto 0..255."""
    c, w = np.float32(window.center), np.float32(window.width)
    if window.function is WindowFunction.SIGMOID:
        with np.errstate(over="ignore"):
            y = _Y_MAX / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function is WindowFunction.LINEAR_EXACT:
        y = ((x - c) / w + 0.5) * _Y_MAX
    elif w > 1:
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * _Y_MAX
    else:  # width 1: a threshold at c - 0.5
        y = np.where(x <= c - 0.5, 0.0, _Y_MAX)
    out: _U8 = np.rint(np.clip(y, 0.0, _Y_MAX)).astype(np.uint8)
    return out


def _voi_lut(values: np.ndarray[Any, Any], view: Dataset) -> _U8 | None:
    """The first VOI LUT of the VOI LUT Sequence (PS3.3 C.11.2.1.1), scaled to 0..255; None if unusable."""
    try:
        out = apply_voi(np.rint(values).astype(np.int64), view, index=0)
        top = max(int(max(view.VOILUTSequence[0].LUTData)), 1)
    except Exception:  # noqa: BLE001 - a malformed table: fall back to the full range
        return None
    scaled: _U8 = np.rint(np.clip(out.astype(np.float32) * (_Y_MAX / top), 0.0, _Y_MAX)).astype(np.uint8)
    return scaled


def _stored_window(view: Dataset) -> Window | None:
    """The data set's first Window Center/Width and its VOI LUT Function, or None (or if invalid)."""
    center, width = _first(view.get("WindowCenter")), _first(view.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(view.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    try:
        return Window(center, width, _STORED_FUNCTIONS.get(function, WindowFunction.LINEAR))
    except ValueError:
        return None


def _frame_view(ds: Dataset, frame: int) -> Dataset:
    """The attributes of the grayscale pipeline for one frame: top level, else the frame's functional
    groups, else the shared ones (PS3.3 C.7.6.16.2.9, C.7.6.16.2.10)."""
    view = Dataset()
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta  # apply_voi reads the byte order of OW LUT Data from it
    for keyword in ("PixelRepresentation", "BitsStored", "BitsAllocated"):
        if keyword in ds:
            view[keyword] = ds[keyword]
    groups: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for keyword in _VIEW_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
            continue
        for group in groups:
            item = next(
                (g[0] for g in (group.get(s) for s in _GROUP_SEQUENCES) if g and keyword in g[0]), None
            )
            if item is not None:
                view[keyword] = item[keyword]
                break
    return view


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str | bytes) and hasattr(value, "__len__"):
        value = value[0] if len(value) else None
    number: float | None = _number(value, None)
    return number


def _number(value: Any, default: float | None) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


# Colour -----------------------------------------------------------------------------------------------


def _colour(arr: np.ndarray[Any, Any], ds: Dataset, photometric: str) -> _U8:
    """An RGB frame, 8 bits per sample."""
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
            depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception as exc:  # a missing or malformed palette
            raise RenderError("the image's palette cannot be applied; it is missing or malformed") from exc
        return _to_8bit(rgb, 16 if depth > 8 else 8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise RenderError(f"images with photometric interpretation '{photometric}' cannot be rendered")
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, "YBR_FULL", "RGB")
    elif photometric != "RGB":
        raise RenderError(f"images with photometric interpretation '{photometric}' cannot be rendered")
    bits = int(_number(ds.get("BitsStored"), 8) or 8)
    return _to_8bit(arr, bits)


def _to_8bit(arr: np.ndarray[Any, Any], bits: int) -> _U8:
    out: _U8
    if arr.dtype == np.uint8 or bits <= 8:
        out = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        top = (1 << min(bits, 32)) - 1
        out = (np.clip(arr, 0, top).astype(np.uint64) >> np.uint64(bits - 8)).astype(np.uint8)
    return out
