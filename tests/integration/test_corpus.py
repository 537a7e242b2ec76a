"""Every file of pydicom's test corpus and pydicom-data: in by C-STORE, out by C-GET, byte for byte.

Files pydicom cannot read (or that no sender could C-STORE) are refused cleanly by ``safepacs import``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from safepacs.dicom.transcode import dataset_bytes
from tests.support.corpus import storable_files, unreadable_files
from tests.support.dicom_client import c_get, file_context, store_files
from tests.support.server import Server, run_cli, start_server


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from safepacs.app import initialize

    data = tmp_path_factory.mktemp("corpus") / "data"
    initialize(data)
    srv = start_server(data, env={"SAFEPACS_SERVER__WORKERS": "2"})
    srv.add_peer("MODALITY", "store")
    srv.add_peer("VIEWER", "get")
    try:
        yield srv
    finally:
        srv.stop()


def _header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def test_every_readable_file_round_trips_byte_for_byte(corpus_server: Server) -> None:
    files = storable_files()
    assert len(files) > 100
    statuses = store_files(corpus_server.port, files)
    first_by_uid: dict[str, Path] = {}
    unexpected: dict[str, int] = {}
    for path in files:
        uid = str(_header(path).SOPInstanceUID)
        status = statuses[path]
        if uid not in first_by_uid:
            first_by_uid[uid] = path
            if status != 0x0000:
                unexpected[path.name] = status
        else:
            # The same SOP Instance UID again: identical data set -> success, other content -> 0xC111,
            # not stored (the first one kept).
            same = dataset_bytes(path.read_bytes())[1] == dataset_bytes(first_by_uid[uid].read_bytes())[1]
            if status != (0x0000 if same else 0xC111):
                unexpected[path.name] = status
    assert not unexpected, f"unexpected C-STORE statuses: { {k: hex(v) for k, v in unexpected.items()} }"

    mismatched: list[str] = []
    for uid, path in first_by_uid.items():
        header = _header(path)
        sop_class, ts = file_context(path)
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = header.StudyInstanceUID
        q.SeriesInstanceUID = header.SeriesInstanceUID
        q.SOPInstanceUID = uid
        received, final = c_get(corpus_server.port, q, [(sop_class, [ts])])
        if final.get("Status") != 0x0000 or uid not in received:
            mismatched.append(f"{path.name}: C-GET status {final.get('Status')}")
            continue
        got_ts, data = received[uid]
        if got_ts != ts or data != dataset_bytes(path.read_bytes())[1]:
            mismatched.append(f"{path.name}: bytes differ")
    assert not mismatched, mismatched


def test_unreadable_files_are_refused_cleanly(
    corpus_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    files = unreadable_files()
    assert files
    for path in files:
        assert run_cli("import", str(path), "--data", str(corpus_server.data)) == 1, path.name
        err = capsys.readouterr().err
        assert "1 rejected" in err and "Traceback" not in err, path.name
