"""WADO-RS frames, bulk data, rendered and thumbnail resources and WADO-URI, against one running
``safepacs serve`` over real TLS: what a viewer sees, decoded with Pillow and pydicom."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000Lossless, generate_uid

from safepacs.app import initialize
from tests.support.corpus import make_ct, part10_bytes
from tests.support.server import Server, run_cli, start_server
from tests.support.web import _client, _multipart_body, _parts

DICOMWEB = "/dicomweb"
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ROWS, COLS = 32, 48


def _cli_out(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli(*args) == 0
    return out.getvalue().strip()


def _halves(low: int, high: int, **overrides: object) -> Dataset:
    """A CT whose left half stores ``low`` and right half ``high`` (Rescale Intercept -1024)."""
    pixels = np.full((ROWS, COLS), low, dtype="<u2")
    pixels[:, COLS // 2 :] = high
    return make_ct(ROWS, COLS, PixelData=pixels.tobytes(), **overrides)


def _icon() -> Dataset:
    icon = Dataset()
    icon.SamplesPerPixel = 1
    icon.PhotometricInterpretation = "MONOCHROME2"
    icon.Rows = icon.Columns = 64
    icon.BitsAllocated = icon.BitsStored = 8
    icon.HighBit = 7
    icon.PixelRepresentation = 0
    icon.PixelData = bytes(range(256)) * 16
    return icon


class Archive:
    """What the module stores once, and the tokens of the people who look at it."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        data = str(srv.data)
        for name, role in (("rad", "radiologist"), ("tech", "technologist"), ("aud", "auditor")):
            _cli_out("user", "add", name, "--role", role, "--data", data)
        self.rad, self.tech, self.aud = (
            _cli_out("token", "create", "--user", name, "--data", data) for name in ("rad", "tech", "aud")
        )
        # CT: left half -1024 HU, right half +1024 HU; window 40/400 makes them black and white.
        self.ct = _halves(0, 2048, WindowCenter="40", WindowWidth="400")
        self.mono1 = _halves(
            0, 2048, PhotometricInterpretation="MONOCHROME1", WindowCenter=None, WindowWidth=None
        )
        self.ct.ICCProfile = bytes(range(256)) * 8  # 2 KiB: bulk data in metadata
        self.ct.IconImageSequence = [_icon()]
        # A series of three whose middle image is the only bright one.
        study, series = generate_uid(), generate_uid()
        dark, bright = bytes(ROWS * COLS * 2), np.full(ROWS * COLS, 2048, "<u2").tobytes()
        self.series = [
            make_ct(ROWS, COLS, study_uid=study, series_uid=series, instance_number=n, PixelData=pixels)
            for n, pixels in ((1, dark), (2, bright), (3, dark))
        ]
        self.files = {
            name: Path(str(get_testdata_file(name)))
            for name in ("emri_small.dcm", "examples_ybr_color.dcm", "SC_rgb.dcm")
        }
        self.originals = {name: pydicom.dcmread(path) for name, path in self.files.items()}
        bodies = [part10_bytes(ds) for ds in (self.ct, self.mono1, *self.series)]
        bodies += [path.read_bytes() for path in self.files.values()]
        with self.client(self.tech) as client:
            body, ctype = _multipart_body(bodies)
            r = client.post(f"{DICOMWEB}/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text

    def client(self, token: str | None = None) -> httpx.Client:
        return _client(self.srv, token)

    def dicomweb_client(self) -> DICOMwebClient:
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would replace our CA
        session.verify = str(self.srv.ca_file)
        return DICOMwebClient(
            url=f"{self.srv.base_url}{DICOMWEB}",
            session=session,
            headers={"Authorization": f"Bearer {self.rad}"},
        )


def _url(ds: Dataset, tail: str = "") -> str:
    return (
        f"{DICOMWEB}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}{tail}"
    )


def _image(response: httpx.Response, media: str = "image/jpeg") -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media
    assert response.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.format == {"image/jpeg": "JPEG", "image/png": "PNG"}[media]
    return image


def _problem(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["detail"]
    assert "Traceback" not in response.text and "Doe" not in response.text
    return str(body["detail"])


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    data = tmp_path_factory.mktemp("render") / "data"
    initialize(data)
    srv = start_server(data, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        yield Archive(srv)
    finally:
        srv.stop()


PNG = {"Accept": "image/png"}


def test_an_instance_renders_as_jpeg_or_png_in_the_size_asked(archive: Archive) -> None:
    with archive.client(archive.rad) as client:
        assert _image(client.get(_url(archive.ct, "/rendered"))).size == (COLS, ROWS)
        png = _image(client.get(_url(archive.ct, "/rendered"), headers=PNG), "image/png")
        assert png.size == (COLS, ROWS) and png.mode == "L"
        # The viewport is a box the image fits in, the aspect ratio kept; smaller or larger.
        r = client.get(_url(archive.ct, "/rendered"), params={"viewport": "24,24"})
        assert _image(r).size == (24, 16)
        r = client.get(_url(archive.ct, "/rendered"), params={"viewport": "96,200"})
        assert _image(r).size == (96, 64)
        # A source region (sx,sy,sw,sh) is cut out first; a negative width flips it.
        r = client.get(_url(archive.ct, "/rendered"), params={"viewport": "16,16,16,0,16,8"}, headers=PNG)
        region = np.asarray(_image(r, "image/png"))
        assert region.shape == (8, 16)
        assert region[:, :7].max() == 0 and region[:, 9:].min() == 255  # black | white across the middle
        r = client.get(_url(archive.ct, "/rendered"), params={"viewport": "16,16,16,0,-16,8"}, headers=PNG)
        flipped = np.asarray(_image(r, "image/png"))
        assert flipped[:, :7].min() == 255 and flipped[:, 9:].max() == 0
        # The accept query parameter, quality, and the colour and multi-frame files of pydicom.
        assert _image(client.get(_url(archive.ct, "/rendered"), params={"accept": "image/png"}), "image/png")
        small = client.get(_url(archive.ct, "/rendered"), params={"quality": "5"})
        large = client.get(_url(archive.ct, "/rendered"), params={"quality": "100"})
        assert len(small.content) < len(large.content)
        ybr = archive.originals["examples_ybr_color.dcm"]
        colour = _image(client.get(_url(ybr, "/frames/3/rendered"), headers=PNG), "image/png")
        assert colour.size == (ybr.Columns, ybr.Rows) and colour.mode == "RGB"
        expected = pixel_array(archive.files["examples_ybr_color.dcm"], index=2)
        assert np.abs(np.asarray(colour).astype(int) - expected.astype(int)).max() <= 1
        rgb = archive.originals["SC_rgb.dcm"]
        shown = np.asarray(_image(client.get(_url(rgb, "/rendered"), headers=PNG), "image/png"))
        assert (shown == rgb.pixel_array).all()
        # GIF and anything else: 406.
        r = client.get(_url(archive.ct, "/rendered"), headers={"Accept": "image/gif"})
        assert "image/jpeg" in _problem(r, 406)


def test_windows_monochrome1_and_the_default_window(archive: Archive) -> None:
    with archive.client(archive.rad) as client:

        def shown(ds: Dataset, **params: str) -> np.ndarray:
            return np.asarray(
                _image(client.get(_url(ds, "/rendered"), params=params, headers=PNG), "image/png")
            )

        half = COLS // 2
        default = shown(archive.ct)  # the data set's window 40/400: -1024 HU black, +1024 HU white
        assert default[:, :half].max() == 0 and default[:, half:].min() == 255
        assert (shown(archive.ct, window="-3000,10,linear") == 255).all()  # everything above the window
        assert (shown(archive.ct, window="3000,10,linear-exact") == 0).all()  # everything below it
        sigmoid = shown(archive.ct, window="0,2048,sigmoid")
        assert 0 < sigmoid[0, 0] < 40 and 215 < sigmoid[0, -1] < 255  # soft, not clipped
        # MONOCHROME1: low values are white; without a window, the full range is used.
        inverted = shown(archive.mono1)
        assert inverted[:, :half].min() == 255 and inverted[:, half:].max() == 0
        assert (shown(archive.mono1, window="-3000,10") == 0).all()


def test_bad_rendering_parameters_are_400_problems(archive: Archive) -> None:
    with archive.client(archive.rad) as client:
        url = _url(archive.ct, "/rendered")
        for params, words in (
            ({"window": "abc"}, "window"),
            ({"window": "40,0,linear"}, "width"),
            ({"window": "40,400,cubic"}, "window"),
            ({"viewport": "5000,10"}, "between 1 and 4096"),
            ({"viewport": "0,10"}, "between 1 and 4096"),
            ({"viewport": "10"}, "viewport"),
            ({"viewport": "10,10,0,0,0,5"}, "sw and sh"),
            ({"viewport": "10,10,1000,1000,5,5"}, "outside the image"),
            ({"quality": "0"}, "quality"),
            ({"annotation": "patient"}, "not supported"),
        ):
            assert words in _problem(client.get(url, params=params), 400), params
        assert "frame" in _problem(client.get(_url(archive.ct, "/frames/2/rendered")), 400)


def test_frames_are_the_stored_frames_native_or_as_stored(archive: Archive) -> None:
    emri, ybr = archive.originals["emri_small.dcm"], archive.originals["examples_ybr_color.dcm"]
    size = emri.Rows * emri.Columns * 2
    with archive.client(archive.rad) as client:
        parts = _parts(client.get(_url(emri, "/frames/2,5")))
        assert [ctype.split(";")[0] for ctype, _ in parts] == ["application/octet-stream"] * 2
        assert parts[0][1] == emri.PixelData[size : 2 * size]
        assert parts[1][1] == emri.PixelData[4 * size : 5 * size]
        # Compressed frames: as stored with their media type, or decoded by default.
        jpeg = 'multipart/related; type="image/jpeg"'
        for accept in (jpeg, 'multipart/related; type="application/octet-stream"; transfer-syntax=*'):
            stored = _parts(client.get(_url(ybr, "/frames/3,1"), headers={"Accept": accept}))
            assert stored[0][0] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
            assert stored[0][1] == get_frame(ybr.PixelData, 2, number_of_frames=ybr.NumberOfFrames)
            assert stored[1][1] == get_frame(ybr.PixelData, 0, number_of_frames=ybr.NumberOfFrames)
        (decoded,) = _parts(client.get(_url(ybr, "/frames/3")))
        expected = pixel_array(archive.files["examples_ybr_color.dcm"], index=2)
        assert decoded[1] == expected.tobytes()
        # Refusals: a syntax SafePACS would have to compress to, frames that are not there.
        r = client.get(_url(ybr, "/frames/1"), headers={"Accept": 'multipart/related; type="image/jp2"'})
        assert "does not compress" in _problem(r, 406)
        r = client.get(_url(emri, "/frames/1"), headers={"Accept": jpeg})
        _problem(r, 406)
        assert "does not exist" in _problem(client.get(_url(emri, f"/frames/{emri.NumberOfFrames + 1}")), 400)
        for bad in ("0", "1,1", "a", "1;2", "-1"):
            _problem(client.get(_url(emri, f"/frames/{bad}")), 400)


def test_dicomweb_client_retrieves_frames_and_rendered_images(archive: Archive) -> None:
    client = archive.dicomweb_client()
    ybr = archive.originals["examples_ybr_color.dcm"]
    uids = (ybr.StudyInstanceUID, ybr.SeriesInstanceUID, ybr.SOPInstanceUID)
    native = client.retrieve_instance_frames(*uids, frame_numbers=[2])
    assert native[0] == pixel_array(archive.files["examples_ybr_color.dcm"], index=1).tobytes()
    stored = client.retrieve_instance_frames(
        *uids, frame_numbers=[1, 2], media_types=(("image/jpeg", "1.2.840.10008.1.2.4.50"),)
    )
    assert stored == [get_frame(ybr.PixelData, i, number_of_frames=ybr.NumberOfFrames) for i in (0, 1)]
    jpeg = client.retrieve_instance_rendered(*uids)
    assert Image.open(io.BytesIO(jpeg)).size == (ybr.Columns, ybr.Rows)
    ct = archive.ct
    png = client.retrieve_instance_rendered(
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID, media_types=("image/png",)
    )
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_metadata_bulk_data_uris_answer_with_the_values(archive: Archive) -> None:
    ct, ybr = archive.ct, archive.originals["examples_ybr_color.dcm"]
    with archive.client(archive.rad) as client:
        (meta,) = client.get(_url(ct, "/metadata")).json()
        assert set(meta["00282000"]) == {"vr", "BulkDataURI"}
        assert _parts(client.get(meta["00282000"]["BulkDataURI"]))[0][1] == ct.ICCProfile
        icon = meta["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
        assert icon.endswith("/bulkdata/00880200/0/7FE00010")
        assert _parts(client.get(icon))[0][1] == ct.IconImageSequence[0].PixelData
        assert _parts(client.get(meta["7FE00010"]["BulkDataURI"]))[0][1] == ct.PixelData
        # Compressed pixel data: decoded by default, as stored one frame a part with transfer-syntax=*.
        (meta,) = client.get(_url(ybr, "/metadata")).json()
        uri = meta["7FE00010"]["BulkDataURI"]
        (decoded,) = _parts(client.get(uri))
        assert len(decoded[1]) == ybr.NumberOfFrames * ybr.Rows * ybr.Columns * 3
        as_stored = _parts(
            client.get(
                uri,
                headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
            )
        )
        assert len(as_stored) == ybr.NumberOfFrames
        assert as_stored[-1][1] == get_frame(
            ybr.PixelData, ybr.NumberOfFrames - 1, number_of_frames=ybr.NumberOfFrames
        )
        for missing in ("00100010", "00880200/1/7FE00010", "7FE00010/0/00100010", "nonsense"):
            _problem(client.get(_url(ct, f"/bulkdata/{missing}")), 404)


def test_thumbnails_are_small_and_show_the_middle_image(archive: Archive) -> None:
    first = archive.series[0]
    with archive.client(archive.rad) as client:
        series = f"{DICOMWEB}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
        for url in (f"{DICOMWEB}/studies/{first.StudyInstanceUID}/thumbnail", f"{series}/thumbnail"):
            thumb = _image(client.get(url, headers=PNG), "image/png")
            assert max(thumb.size) <= 128
            assert np.asarray(thumb).min() == 255  # instance 2, the bright one, not 1 or 3
        assert _image(client.get(_url(first, "/thumbnail"), params={"viewport": "20,20"})).size == (20, 13)
        emri = archive.originals["emri_small.dcm"]
        assert max(_image(client.get(_url(emri, "/frames/4/thumbnail"))).size) <= 128
        _problem(client.get(_url(emri, "/frames/1,2/thumbnail")), 400)


def test_series_and_study_rendered_are_multipart_images(archive: Archive) -> None:
    first = archive.series[0]
    with archive.client(archive.rad) as client:
        series = f"{DICOMWEB}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/rendered"
        parts = _parts(client.get(series, headers={"Accept": 'multipart/related; type="image/png"'}))
        assert [ctype for ctype, _ in parts] == ["image/png"] * 3
        means = [np.asarray(Image.open(io.BytesIO(body))).mean() for _, body in parts]
        assert means == [0.0, 255.0, 0.0]  # in instance order
        assert len(_parts(client.get(f"{DICOMWEB}/studies/{first.StudyInstanceUID}/rendered"))) == 3
        assert "multipart/related" in _problem(client.get(series, headers={"Accept": "image/jpeg"}), 406)
        emri = archive.originals["emri_small.dcm"]
        frames = _parts(client.get(_url(emri, "/frames/1,3/rendered")))
        assert [ctype for ctype, _ in frames] == ["image/jpeg"] * 2


def test_wado_uri_sends_what_wado_rs_sends(archive: Archive) -> None:
    ybr, emri = archive.originals["examples_ybr_color.dcm"], archive.originals["emri_small.dcm"]

    def wado(ds: Dataset, **params: str) -> dict[str, str]:
        keys = {
            "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID,
            "objectUID": ds.SOPInstanceUID,
        }
        return {"requestType": "WADO", **keys, **params}

    with archive.client(archive.rad) as client:
        uri = f"{DICOMWEB}/wado"
        # application/dicom: Explicit VR Little Endian by default, the stored syntax on request.
        r = client.get(uri, params=wado(ybr, contentType="application/dicom"))
        assert r.headers["content-type"] == "application/dicom"
        assert r.content == _parts(client.get(_url(ybr)))[0][1]
        assert pydicom.dcmread(io.BytesIO(r.content)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        stored = ybr.file_meta.TransferSyntaxUID
        r = client.get(uri, params=wado(ybr, contentType="application/dicom", transferSyntax=stored))
        assert r.content == _parts(client.get(_url(ybr), headers={"Accept": AS_STORED}))[0][1]
        # No contentType: a multi-frame image is application/dicom, a single frame image/jpeg.
        assert client.get(uri, params=wado(emri)).headers["content-type"] == "application/dicom"
        assert _image(client.get(uri, params=wado(archive.ct))).size == (COLS, ROWS)
        # Images: the same pixels as WADO-RS rendered, rows/columns as maxima, regions, windows.
        png = np.asarray(
            _image(client.get(uri, params=wado(emri, contentType="image/png", frameNumber="3")), "image/png")
        )
        rs = np.asarray(_image(client.get(_url(emri, "/frames/3/rendered"), headers=PNG), "image/png"))
        assert (png == rs).all()
        assert _image(client.get(uri, params=wado(archive.ct, rows="16"))).size == (24, 16)
        assert _image(client.get(uri, params=wado(archive.ct, columns="24", rows="100"))).size == (24, 16)
        region = wado(archive.ct, contentType="image/png", region="0.5,0,1,0.5")
        shown = np.asarray(_image(client.get(uri, params=region), "image/png"))
        assert shown.shape == (ROWS // 2, COLS // 2) and shown.min() == 255  # the white right half
        dark = wado(archive.ct, contentType="image/png", windowCenter="5000", windowWidth="10")
        assert (np.asarray(_image(client.get(uri, params=dark), "image/png")) == 0).all()
        # Refusals.
        for params, status in (
            ({"requestType": "WADO"}, 400),
            (wado(ybr, requestType="WADO-RS"), 400),
            (wado(ybr, objectUID="1.2.abc"), 400),
            (wado(ybr, objectUID="1.2.3.4.5"), 404),
            (wado(ybr, contentType="image/gif"), 406),
            (wado(ybr, contentType="application/dicom", transferSyntax=JPEG2000Lossless), 406),
            (wado(ybr, contentType="application/dicom", transferSyntax="not-a-uid"), 400),
            (wado(ybr, contentType="application/dicom", rows="10"), 400),
            (wado(ybr, contentType="image/jpeg", transferSyntax=stored), 400),
            (wado(ybr, anonymize="yes"), 400),
            (wado(ybr, contentType="image/jpeg", frameNumber="99"), 400),
            (wado(ybr, contentType="image/jpeg", rows="0"), 400),
            (wado(ybr, contentType="image/jpeg", windowCenter="40"), 400),
        ):
            _problem(client.get(uri, params=params), status)


def test_no_get_right_or_no_such_instance_is_404_and_no_token_401(archive: Archive) -> None:
    ct = archive.ct
    params = {"requestType": "WADO", "studyUID": ct.StudyInstanceUID, "seriesUID": ct.SeriesInstanceUID}
    urls = [
        _url(ct, "/rendered"),
        _url(ct, "/frames/1"),
        _url(ct, "/thumbnail"),
        _url(ct, "/bulkdata/7FE00010"),
        f"{DICOMWEB}/studies/{ct.StudyInstanceUID}/rendered",
        f"{DICOMWEB}/studies/{ct.StudyInstanceUID}/thumbnail",
        f"{DICOMWEB}/wado?"
        + "&".join(f"{k}={v}" for k, v in {**params, "objectUID": ct.SOPInstanceUID}.items()),
    ]
    for token in (
        archive.tech,
        archive.aud,
    ):  # a technologist may store, an auditor nothing: neither may retrieve
        with archive.client(token) as client:
            for url in urls:
                assert _problem(client.get(url), 404) == "no such resource", url
    with archive.client(archive.rad) as client:
        unknown = _url(ct).replace(ct.SOPInstanceUID, "1.2.3.4.5")
        for tail in ("/rendered", "/frames/1", "/thumbnail", "/bulkdata/7FE00010"):
            assert _problem(client.get(unknown + tail), 404) == "no such resource"
        assert _problem(client.get(_url(ct, "/rendered").replace(ct.SOPInstanceUID, "1..2")), 400)
    with archive.client() as client:
        for url in urls:
            assert client.get(url).status_code == 401, url
