"""Retrieve sub-operations in the transfer syntax the requestor can take, whatever the instances are
stored in, and long retrievals that end in a clean release - against real servers and DCMTK peers.

C-GET: per proposed storage context SafePACS accepts Explicit, then Implicit VR Little Endian when the
requestor proposed them, else a compressed syntax it can produce; at send time each instance goes in
its stored syntax when that was accepted, else decoded, else decoded and encoded losslessly into the
accepted compressed syntax; an instance that fits none fails alone (PS3.4 C.4.3.3.1).  C-MOVE: the
sub-association proposes the stored syntaxes and the uncompressed ones in separate contexts per SOP
class and each instance takes the one that fits.
"""

from __future__ import annotations

import socket
import subprocess
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filereader import read_dataset
from pydicom.uid import (
    MPEG2MPML,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage

from safepacs.dicom.transcode import dataset_bytes
from tests.support.corpus import make_ct
from tests.support.dicom_client import c_get, store_files
from tests.support.server import Server, dcmtk, start_server

pytestmark = pytest.mark.dcmtk

TEST_FILES = Path(pydicom.data.__file__).resolve().parent / "test_files"
#: One instance per stored transfer syntax: compressed (lossless and lossy) and uncompressed.
MIXED = (
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian (retired)
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_RLE.dcm",  # RLE Lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline (lossy, YCbCr)
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, first-order prediction
)


def _mixed_study(tmp_path: Path, names: tuple[str, ...] = MIXED) -> tuple[str, dict[str, Path]]:
    """A study of pydicom's test files, each kept in its own transfer syntax, under one study and patient;
    {SOP Instance UID: the file as stored}."""
    study = generate_uid()
    written: dict[str, Path] = {}
    for i, name in enumerate(names):
        ds = pydicom.dcmread(TEST_FILES / name)
        ds.PatientID = "MIX-1"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"in-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)  # the pixel data as it was: same transfer syntax
        written[str(ds.SOPInstanceUID)] = path
    return study, written


def _store(srv: Server, paths: list[Path]) -> None:
    srv.add_peer("MOD1", "echo,store")
    assert set(store_files(srv.port, paths, calling="MOD1").values()) == {0x0000}


def _syntax(path: Path) -> UID:
    return UID(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def _same_image(path: Path, received: Dataset) -> None:
    """The received instance is the stored one: the same header values and the same decoded pixels."""
    original = pydicom.dcmread(path)
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert received.PatientID == original.PatientID and received.Rows == original.Rows
    assert np.array_equal(received.pixel_array, original.pixel_array), original.file_meta.TransferSyntaxUID


def _read(syntax: str, body: bytes) -> Dataset:
    """A data set received in ``syntax`` (no file meta), readable by pydicom."""
    ds = read_dataset(BytesIO(body), is_implicit_VR=syntax == ImplicitVRLittleEndian, is_little_endian=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return ds


def _received(out: Path) -> dict[str, Path]:
    files = sorted(out.iterdir())
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}


def _clean(stderr: str) -> None:
    """DCMTK's log of the association: no abort, no failed release, no PDU arriving unexpectedly."""
    for sign in ("Release Failed", "DUL", "Abort", "ABORT"):
        assert sign not in stderr, stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _study_identifier(study: str) -> Dataset:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    return ident


# C-GET ----------------------------------------------------------------------------------------------


def test_getscu_preferring_jpeg2000_retrieves_every_instance_of_a_mixed_syntax_study(
    srv: Server, tmp_path: Path
) -> None:
    """``getscu +xv`` proposes JPEG 2000 lossless, then the uncompressed syntaxes, in one context per
    storage class: SafePACS accepts Explicit VR Little Endian and delivers every instance, whatever it
    is stored in (decoded where needed)."""
    study, stored = _mixed_study(tmp_path)
    _store(srv, list(stored.values()))
    srv.add_peer("VIEWER", "echo,find,get")
    out = tmp_path / "get"
    out.mkdir()
    got = dcmtk(
        "getscu", "-v", "+xv", "-S", "-aet", "VIEWER", "-aec", "SAFEPACS",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "-od", str(out), srv.host, str(srv.port),
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    _clean(got.stderr)
    assert f"Number of Completed Suboperations : {len(MIXED)}" in got.stderr, got.stderr
    received = _received(out)
    assert set(received) == set(stored)
    for uid, path in received.items():
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        _same_image(stored[uid], ds)
        if _syntax(stored[uid]) == JPEGBaseline8Bit:
            assert ds.LossyImageCompression == "01"  # PS3.3 C.7.6.1.1.5: once lossy, always flagged


def test_c_get_encodes_into_the_only_compressed_syntax_the_requestor_proposes(
    srv: Server, tmp_path: Path
) -> None:
    """A requestor that proposes one lossless compressed syntax per class gets every instance in it:
    as stored when it is stored so, else decoded and encoded losslessly (pixel for pixel the same)."""
    study, stored = _mixed_study(tmp_path)
    _store(srv, list(stored.values()))
    srv.add_peer("VIEWER", "echo,find,get")
    classes = (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage)
    for target in (JPEG2000Lossless, RLELossless, JPEGLSLossless):
        received, final = c_get(srv.port, _study_identifier(study), [(sop, [target]) for sop in classes])
        assert final.Status == 0x0000, (target.name, final)
        assert set(received) == set(stored), target.name
        for uid, (syntax, body) in received.items():
            assert syntax == target
            if _syntax(stored[uid]) == target:
                assert body == dataset_bytes(stored[uid].read_bytes())[1]  # sent as stored
            ds = _read(syntax, body)
            assert ds["PixelData"].is_undefined_length  # encapsulated (PS3.5 A.4)
            _same_image(stored[uid], ds)


def test_c_get_fails_only_the_instances_no_accepted_syntax_can_carry(srv: Server, tmp_path: Path) -> None:
    """Offered nothing but JPEG baseline (lossy), SafePACS sends what is stored so and fails the rest:
    it never encodes lossy (PS3.4 C.4.3.3.1: 0xB000 with the Failed SOP Instance UID List)."""
    study, stored = _mixed_study(tmp_path, ("CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm"))
    _store(srv, list(stored.values()))
    srv.add_peer("VIEWER", "echo,find,get")
    ct, sc = stored
    storage = [(CTImageStorage, [JPEGBaseline8Bit]), (SecondaryCaptureImageStorage, [JPEGBaseline8Bit])]
    received, final = c_get(srv.port, _study_identifier(study), storage)
    assert final.Status == 0xB000 and final.NumberOfFailedSuboperations == 1
    assert final.FailedSOPInstanceUIDList == ct
    assert set(received) == {sc}
    assert received[sc] == (JPEGBaseline8Bit, dataset_bytes(stored[sc].read_bytes())[1])


def _unreadable_video(tmp_path: Path, study: str) -> Path:
    """An instance stored in MPEG-2, which SafePACS has no decoder for."""
    ds = make_ct(16, 16, study_uid=study, patient_id="MIX-1")
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    path = tmp_path / "video.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("prefer", ["+x=", "+xv"])
def test_getscu_with_a_failed_sub_operation_releases_cleanly(
    srv: Server, tmp_path: Path, prefer: str
) -> None:
    """A C-GET whose sub-operation fails (a syntax SafePACS cannot produce) ends in a clean release: the
    final response and its Identifier go out as one PDU that ``getscu`` reads whole."""
    study, stored = _mixed_study(tmp_path, ("CT_small.dcm",))
    (ct,) = stored
    video = _unreadable_video(tmp_path, study)
    _store(srv, [*stored.values(), video])
    srv.add_peer("VIEWER", "echo,find,get")
    out = tmp_path / "get"
    out.mkdir()
    got = dcmtk(
        "getscu", "-v", prefer, "-S", "-aet", "VIEWER", "-aec", "SAFEPACS",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "-od", str(out), srv.host, str(srv.port),
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    _clean(got.stderr)
    assert "Warning: SubOperationsCompleteOneOrMoreFailures" in got.stderr, got.stderr
    assert "Number of Failed Suboperations    : 1" in got.stderr
    assert set(_received(out)) == {ct}
    deadline = time.monotonic() + 10  # the server's log is read by a thread of its own
    while "C-STORE sub-operation failed" not in srv.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = srv.stderr_text()
    assert "C-STORE sub-operation failed" in log and "Traceback" not in log


# C-MOVE ---------------------------------------------------------------------------------------------


def _move(srv: Server, study: str, scp_args: list[str], moved: Path) -> subprocess.CompletedProcess[str]:
    """C-MOVE the study with ``movescu`` to a ``storescp`` started with ``scp_args``."""
    port = _free_port()
    srv.add_peer("ARCHIVE2", "echo", port=port)
    srv.add_peer("VIEWER", "echo,find,move")
    scp = subprocess.Popen(
        ["storescp", *scp_args, "-aet", "ARCHIVE2", "-od", str(moved), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # storescp listening
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        return dcmtk(
            "movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "SAFEPACS", "-aem", "ARCHIVE2",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
            srv.host, str(srv.port),
        )  # fmt: skip
    finally:
        scp.terminate()
        scp.wait(10)


def test_c_move_sends_each_instance_in_the_context_that_fits(srv: Server, tmp_path: Path) -> None:
    """The sub-association proposes, per SOP class, the stored syntaxes and the uncompressed ones in
    separate contexts; a destination that prefers JPEG 2000 gets the JPEG 2000 instance as stored and
    every other instance uncompressed."""
    study, stored = _mixed_study(tmp_path)
    _store(srv, list(stored.values()))
    moved = tmp_path / "moved"
    moved.mkdir()
    mv = _move(srv, study, ["+xv", "+B"], moved)  # +B: the files as received
    assert mv.returncode == 0, mv.stderr
    _clean(mv.stderr)
    received = _received(moved)
    assert set(received) == set(stored)
    for uid, path in received.items():
        ds = pydicom.dcmread(path)
        was = _syntax(stored[uid])
        if was in (JPEG2000Lossless, ExplicitVRBigEndian, ImplicitVRLittleEndian):
            # accepted as stored: the stored data set, byte for byte
            assert ds.file_meta.TransferSyntaxUID == was
            assert dataset_bytes(path.read_bytes())[1] == dataset_bytes(stored[uid].read_bytes())[1]
        else:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, was.name
        _same_image(stored[uid], ds)


def test_c_move_that_outlasts_the_network_timeout_ends_in_a_release(data_dir: Path, tmp_path: Path) -> None:
    """An association waiting for its own C-MOVE is not idle: a move that takes longer than
    ``server.network_timeout`` ends with the final response and a clean release, not an A-ABORT."""
    srv = start_server(
        data_dir, env={"SAFEPACS_SERVER__WORKERS": "1", "SAFEPACS_SERVER__NETWORK_TIMEOUT": "1"}
    )
    try:
        study = generate_uid()
        paths = []
        for i in range(3):
            path = tmp_path / f"ct-{i}.dcm"
            make_ct(16, 16, study_uid=study, instance_number=i + 1).save_as(path, enforce_file_format=True)
            paths.append(path)
        _store(srv, paths)
        moved = tmp_path / "moved"
        moved.mkdir()
        started = time.monotonic()
        mv = _move(srv, study, ["--sleep-after", "1"], moved)  # about 3 s: three network timeouts
        assert time.monotonic() - started > 2
        assert mv.returncode == 0, mv.stderr
        _clean(mv.stderr)
        assert len(list(moved.iterdir())) == 3
        assert "Network timeout" not in srv.stderr_text()
    finally:
        srv.stop()


def test_c_move_sub_association_outlasts_a_slow_conversion(data_dir: Path, tmp_path: Path) -> None:
    """A large JPEG 2000 image moved to a destination that takes only Explicit VR Little Endian is
    decoded for it; decoding takes longer than ``server.network_timeout``, and the sub-association waits
    for it instead of timing out."""
    srv = start_server(
        data_dir,
        env={
            "SAFEPACS_SERVER__WORKERS": "1",
            "SAFEPACS_SERVER__NETWORK_TIMEOUT": "0.5",
            "SAFEPACS_SERVER__DIMSE_TIMEOUT": "10",  # bounds the wait for an answer that never comes
        },
    )
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            event.request.DataSet.getvalue(),
        )
        return 0x0000

    port = _free_port()
    destination = AE(ae_title="ARCHIVE2")
    destination.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    destination.network_timeout = destination.dimse_timeout = 30
    scp = destination.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        ds = make_ct(1024, 1024, seed=9)
        # Four frames of noise: slow to decode, a frame at a time (the codec holds the GIL for one)
        pixels = np.random.default_rng(9).integers(0, 4096, size=(4, 1024, 1024), dtype=np.uint16)
        ds.NumberOfFrames = 4
        ds.PixelData = pixels.tobytes()
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        path = tmp_path / "large.dcm"
        ds.save_as(path, enforce_file_format=True)
        _store(srv, [path])
        srv.add_peer("ARCHIVE2", "echo", port=port)
        srv.add_peer("VIEWER", "echo,find,move")
        mv = dcmtk(
            "movescu", "-v", "-S", "-aet", "VIEWER", "-aec", "SAFEPACS", "-aem", "ARCHIVE2",
            "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
            "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}", "-k", f"SOPInstanceUID={ds.SOPInstanceUID}",
            srv.host, str(srv.port),
        )  # fmt: skip
        assert mv.returncode == 0, mv.stderr
        _clean(mv.stderr)
        assert set(received) == {ds.SOPInstanceUID}
        syntax, body = received[ds.SOPInstanceUID]
        assert syntax == ExplicitVRLittleEndian
        assert np.array_equal(_read(syntax, body).pixel_array, pixels)
        assert "Network timeout" not in srv.stderr_text()
    finally:
        scp.shutdown()
        srv.stop()
