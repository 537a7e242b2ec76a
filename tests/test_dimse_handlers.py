"""The C-FIND handler stops at a C-CANCEL, deterministically (the network test can only race for it)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from safepacs.app import open_archive
from safepacs.config import load_settings
from safepacs.dimse.contexts import StudyRootQueryRetrieveInformationModelFind
from safepacs.dimse.gate import _PRINCIPAL_ATTR
from safepacs.dimse.handlers import DimseHandlers
from safepacs.types import Principal, Service
from tests.conftest import run_cli
from tests.corpus import make_ct


class _Event:
    """The three things the handler reads from pynetdicom's event; cancelled after ``after`` answers."""

    def __init__(self, identifier: Dataset, viewer: Principal, after: int) -> None:
        self.request = SimpleNamespace(AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind)
        self.identifier = identifier
        self.assoc = SimpleNamespace(**{_PRINCIPAL_ATTR: viewer})
        self.answers = 0
        self.after = after

    @property
    def is_cancelled(self) -> bool:
        return self.answers >= self.after


def test_find_handler_stops_at_cancel(data_dir: Path, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(10):
        make_ct(rows=4, cols=4, study_uid=study, series_uid=series).save_as(
            folder / f"{i}.dcm", enforce_file_format=True
        )
    assert run_cli("import", str(folder), "--data", str(data_dir)) == 0
    archive = open_archive(load_settings(data_dir))
    try:
        handlers = DimseHandlers(
            archive.ingest, archive.query, archive.retrieve, archive.index.get_peer, archive.auditor
        )
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study
        q.SeriesInstanceUID = series
        q.SOPInstanceUID = ""
        viewer = Principal(kind="peer", name="VIEWER", allow=frozenset({Service.FIND}))
        event = _Event(q, viewer, after=3)
        statuses = []
        for status, _ in handlers.on_find(event):
            statuses.append(status)
            event.answers += 1
        assert statuses == [0xFF00, 0xFF00, 0xFF00, 0xFE00]
        # Not cancelled: all ten, then success.
        event = _Event(q, viewer, after=100)
        assert [s for s, _ in handlers.on_find(event)] == [0xFF00] * 10 + [0x0000]
    finally:
        archive.close()
