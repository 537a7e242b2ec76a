"""The C-FIND handler stops at a C-CANCEL, deterministically (the network test can only race for it)."""

from __future__ import annotations

import struct
import threading
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import decode, encode

from safepacs.app import open_archive
from safepacs.config import load_settings
from safepacs.protocols.dimse.contexts import StudyRootQueryRetrieveInformationModelFind
from safepacs.protocols.dimse.gate import _PRINCIPAL_ATTR
from safepacs.protocols.dimse.handlers import DimseHandlers
from safepacs.types import Principal, PrincipalKind, QueryLevel, QueryModel, Service
from tests.support.corpus import make_ct
from tests.support.server import run_cli


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
        handlers = DimseHandlers(archive.ingest, archive.query, archive.retrieve, archive.gate)
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study
        q.SeriesInstanceUID = series
        q.SOPInstanceUID = ""
        viewer = Principal(kind=PrincipalKind.PEER, name="VIEWER", allow=frozenset({Service.FIND}))
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


class _Dul:
    """What the fast C-FIND responses need of sendpath.SendDUL: ``send_raw`` (written at once here)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def send_raw(self, buffers: list[bytes]) -> SimpleNamespace:
        self.written.append(b"".join(buffers))
        sent = threading.Event()
        sent.set()
        return SimpleNamespace(sent=sent)

    def is_alive(self) -> bool:
        return True


class _FastEvent(_Event):
    """An event on an association served by a StoreDUL, on an Implicit VR Little Endian context."""

    def __init__(self, identifier: Dataset, viewer: Principal, after: int, max_pdu: int = 16382) -> None:
        super().__init__(identifier, viewer, after)
        self.request.MessageID = 7
        self.context = SimpleNamespace(context_id=3, transfer_syntax=ImplicitVRLittleEndian)
        self.dul = _Dul()
        self.assoc.dul = self.dul
        self.assoc.is_established = True
        self.assoc.dimse = SimpleNamespace(maximum_pdu_size=max_pdu)

    @property
    def is_cancelled(self) -> bool:
        """Asked once before each response: cancelled from the ``after``-th on."""
        self.answers += 1
        return self.answers > self.after

    def responses(self) -> list[tuple[int, Dataset | None]]:
        """The pending responses written so far, decoded as a peer reads them."""
        data = b"".join(self.dul.written)
        out, command, chunks, offset = [], None, [], 0
        while offset < len(data):
            pdu_type, length = struct.unpack(">BxL", data[offset : offset + 6])
            assert pdu_type == 0x04
            item = data[offset + 6 : offset + 6 + length]
            offset += 6 + length
            item_length, context_id, control = struct.unpack(">LBB", item[:6])
            assert context_id == 3 and item_length == len(item) - 4
            chunks.append(item[6:])
            if control & 0x02:  # the last fragment of a command or data set
                value, chunks = b"".join(chunks), []
                if control & 0x01:
                    command = decode(BytesIO(value), True, True)
                else:
                    assert command is not None and command.CommandDataSetType != 0x0101
                    out.append((command, decode(BytesIO(value), True, True)))
                    command = None
        assert command is None
        return [(int(c.Status), ds) for c, ds in out]


def test_fast_find_responses_stop_at_cancel_and_decode_as_before(data_dir: Path, tmp_path: Path) -> None:
    """Written straight to the socket, the pending responses are what pynetdicom sent before (the
    data sets of QueryService.find, its command set), a C-CANCEL still stops them between two, and a
    peer with a small maximum PDU gets them fragmented."""
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(10):
        make_ct(rows=4, cols=4, study_uid=study, series_uid=series, instance_number=i).save_as(
            folder / f"{i}.dcm", enforce_file_format=True
        )
    assert run_cli("import", str(folder), "--data", str(data_dir)) == 0
    archive = open_archive(load_settings(data_dir))
    try:
        handlers = DimseHandlers(archive.ingest, archive.query, archive.retrieve, archive.gate)
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study
        q.SeriesInstanceUID = series
        q.SOPInstanceUID = ""
        q.InstanceNumber = ""
        q.PatientName = ""
        viewer = Principal(kind=PrincipalKind.PEER, name="VIEWER", allow=frozenset({Service.FIND}))
        found = archive.query.find(viewer, QueryModel.STUDY_ROOT, QueryLevel.IMAGE, q)
        expected = [decode(BytesIO(encode(ds, True, True)), True, True) for ds in found]
        assert len(expected) == 10
        for max_pdu in (16382, 64, 0):
            event = _FastEvent(q, viewer, after=100, max_pdu=max_pdu)
            assert [s for s, _ in handlers.on_find(event)] == [0x0000]  # the rest went to the socket
            assert event.responses() == [(0xFF00, ds) for ds in expected]
            if max_pdu == 64:
                assert max(len(w) for w in event.dul.written) > 64  # many responses per write
        # Cancelled after three: three pending responses, then Cancel.
        event = _FastEvent(q, viewer, after=3)
        statuses = []
        for status, _ in handlers.on_find(event):
            statuses.append(status)
        assert statuses == [0xFE00]
        assert event.responses() == [(0xFF00, ds) for ds in expected[:3]]
    finally:
        archive.close()
