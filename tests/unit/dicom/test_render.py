"""Rendered frames (safepacs.dicom.render): windows, inversion, regions, scaling and refusals, on small
generated images decoded back with Pillow."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, generate_uid

from safepacs.dicom.render import (
    JPEG,
    MAX_RENDER_SAMPLES,
    PNG,
    Region,
    RenderOptions,
    Window,
    WindowFunction,
    render,
)
from safepacs.errors import RenderError, RenderRequestError


def gray(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    ts: str = ExplicitVRLittleEndian,
    **attrs: object,
) -> Dataset:
    """A grayscale image of unsigned 16-bit samples (``pixels``: rows x columns, or frames x rows x cols)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def rgb(pixels: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape[0], pixels.shape[1]
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    return ds


def png(ds: Dataset, frame: int = 0, **options: object) -> np.ndarray:
    data = render(ds, frame, RenderOptions(media_type=PNG, **options))  # type: ignore[arg-type]
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(BytesIO(data)))


RAMP = np.array([[0, 100], [200, 300]])


def test_without_a_window_the_full_range_of_the_frame_is_shown() -> None:
    out = png(gray(RAMP))
    assert out.tolist() == [[0, 85], [170, 255]]


def test_a_requested_window_clips_below_and_above() -> None:
    # PS3.3 C.11.2.1.2.1: below c - 0.5 - (w - 1) / 2 = 100.5 is black, above 198.5 white
    out = png(gray(RAMP), window=Window(center=150, width=99))
    assert out.tolist() == [[0, 0], [255, 255]]
    mid = png(gray(np.array([[150]])), window=Window(center=150, width=99))
    assert 127 <= int(mid[0, 0]) <= 130


def test_the_stored_window_is_used_when_none_is_asked_for() -> None:
    ds = gray(RAMP, WindowCenter=50, WindowWidth=2)
    assert png(ds).tolist() == [[0, 255], [255, 255]]


def test_a_requested_window_wins_over_the_stored_one() -> None:
    ds = gray(RAMP, WindowCenter=50, WindowWidth=2)
    assert png(ds, window=Window(250, 2)).tolist() == [[0, 0], [0, 255]]


def test_rescale_slope_and_intercept_apply_before_the_window() -> None:
    # stored 0..300 become -1000..-400 (as CT numbers): a window around -1000 shows the first pixel only
    ds = gray(RAMP, RescaleSlope=2, RescaleIntercept=-1000)
    assert png(ds, window=Window(-1000, 2)).tolist() == [[255, 255], [255, 255]]
    assert png(ds, window=Window(-900, 2)).tolist() == [[0, 255], [255, 255]]


def test_monochrome1_is_inverted() -> None:
    assert png(gray(RAMP, photometric="MONOCHROME1")).tolist() == [[255, 170], [85, 0]]


def test_sigmoid_window_is_half_grey_at_its_centre() -> None:
    out = png(gray(np.array([[0, 150, 300]])), window=Window(150, 100, WindowFunction.SIGMOID))
    assert out[0, 0] < 5 and out[0, 2] > 250 and 126 <= int(out[0, 1]) <= 129


def test_the_frame_asked_for_is_rendered() -> None:
    frames = np.stack([np.zeros((2, 2)), np.full((2, 2), 300), RAMP])
    ds = gray(frames, frames=3)
    assert png(ds, 2).tolist() == [[0, 85], [170, 255]]


def test_a_frame_that_does_not_exist_is_a_request_error_naming_the_count() -> None:
    with pytest.raises(RenderRequestError, match=r"frame 3 does not exist: this image has 2 frame\(s\)"):
        render(gray(np.zeros((2, 2, 2)), frames=2), 2, RenderOptions())


def test_an_instance_without_pixels_is_a_render_error() -> None:
    ds = gray(RAMP)
    del ds.PixelData
    with pytest.raises(RenderError, match="no pixel data"):
        render(ds, 0, RenderOptions())


def test_a_region_crops_and_a_negative_width_flips() -> None:
    ds = gray(np.array([[0, 100, 200, 300]] * 2))
    window = Window(150, 300, WindowFunction.LINEAR_EXACT)
    whole = png(ds, window=window)
    cropped = png(ds, window=window, region=Region(left=1, top=0, width=2, height=1))
    assert cropped.tolist() == [whole[0, 1:3].tolist()]
    flipped = png(ds, window=window, region=Region(left=0, top=0, width=-4, height=None))
    assert flipped.tolist() == whole[:, ::-1].tolist()


def test_a_fractional_region_is_a_share_of_the_image() -> None:
    ds = gray(np.arange(16).reshape(4, 4) * 20)
    window = Window(150, 300, WindowFunction.LINEAR_EXACT)
    half = png(ds, window=window, region=Region(0.5, 0.5, 0.5, 0.5, fractional=True))
    assert half.shape == (2, 2)
    assert half.tolist() == png(ds, window=window)[2:, 2:].tolist()


def test_a_region_outside_the_image_is_refused() -> None:
    with pytest.raises(RenderRequestError, match="outside the image, which is 2 pixels wide and 2 high"):
        render(gray(RAMP), 0, RenderOptions(region=Region(left=5, top=0)))


def test_the_output_fits_the_box_keeping_the_aspect_ratio() -> None:
    ds = gray(np.zeros((10, 20)))
    assert png(ds, max_width=10).shape == (5, 10)
    assert png(ds, max_width=100, max_height=4).shape == (4, 8)
    assert png(ds).shape == (10, 20)


def test_jpeg_is_the_default_encoding() -> None:
    data = render(gray(np.zeros((8, 8))), 0, RenderOptions())
    assert RenderOptions().media_type == JPEG
    assert data.startswith(b"\xff\xd8") and Image.open(BytesIO(data)).format == "JPEG"


def test_rgb_images_keep_their_colours() -> None:
    pixels = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]])
    assert png(rgb(pixels)).tolist() == pixels.tolist()


def test_a_window_does_not_apply_to_colour_images() -> None:
    pixels = np.array([[[255, 0, 0], [0, 255, 0]]])
    assert png(rgb(pixels), window=Window(0, 1)).tolist() == pixels.tolist()


def test_a_frame_larger_than_the_limit_is_refused_before_decoding() -> None:
    ds = gray(np.zeros((1, 1)))
    ds.Rows, ds.Columns = 8192, 8192  # the pixel data is not even there: geometry alone refuses it
    assert 8192 * 8192 > MAX_RENDER_SAMPLES
    with pytest.raises(RenderError, match="too many to render; retrieve its frames instead"):
        render(ds, 0, RenderOptions())


def test_a_transfer_syntax_without_a_decoder_or_corrupt_data_is_a_render_error() -> None:
    ds = gray(RAMP, ts=JPEG2000)
    ds.PixelData = encapsulate([b"\x00\x01not a codestream"])
    ds["PixelData"].VR = "OB"
    with pytest.raises(RenderError, match=r"pixel data cannot be decoded .*; it may be corrupt"):
        render(ds, 0, RenderOptions())


def test_a_ct_slice_of_pydicoms_test_files_renders_at_its_size() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out = np.asarray(Image.open(BytesIO(render(ds, 0, RenderOptions(media_type=PNG)))))
    assert out.shape == (ds.Rows, ds.Columns)
    assert out.min() < 20 and out.max() > 235  # the stored window spreads it over the grey scale


@pytest.mark.parametrize(
    ("center", "width", "function"),
    [
        (0.0, 0.5, WindowFunction.LINEAR),
        (0.0, 0.0, WindowFunction.SIGMOID),
        (0.0, -1.0, WindowFunction.LINEAR_EXACT),
        (float("nan"), 10.0, WindowFunction.LINEAR),
        (0.0, float("inf"), WindowFunction.LINEAR),
    ],
)
def test_invalid_windows_are_refused(center: float, width: float, function: WindowFunction) -> None:
    with pytest.raises(ValueError, match="window width must be at least 1 for linear"):
        Window(center, width, function)


def test_a_linear_exact_window_may_be_narrower_than_one() -> None:
    assert Window(0.0, 0.5, WindowFunction.LINEAR_EXACT).width == 0.5
