"""Sequence nesting (docs/conformance.md): items at level 32 are stored, at level 33 refused, on every
ingest path (C-STORE, STOW-RS, ``safepacs import``) and in every encoding; an object stored deeper
before the limit was enforced still reads back on every read path.

Level: the top-level data set is level 0, the items of a sequence in a level-n data set are level n+1.
Data sets down to level 40 are built with pydicom; deeper ones byte by byte, since pydicom's writer
recurses per level and gives up (or takes minutes) a few hundred levels down.
"""

from __future__ import annotations

import hashlib
import io
import struct
import sys
import zlib
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import build_context

from safepacs.app import initialize, open_archive, open_repositories
from safepacs.audit import EventID, Outcome
from safepacs.config import load_settings
from safepacs.dicom import nesting
from safepacs.dicom.header import read_indexed_elements
from safepacs.dicom.transcode import dataset_bytes
from safepacs.errors import InvalidObjectError
from safepacs.services.ingest import file_meta
from safepacs.storage import EnvelopeCipher, FileBlobStore, FileKeyProvider
from safepacs.types import IngestOutcome, Principal, PrincipalKind, Service, StoredBlob
from tests.support.audit_capture import AuditCapture
from tests.support.corpus import make_ct, part10_bytes, storable_files
from tests.support.dicom_client import associate, c_get
from tests.support.server import Server, run_cli, start_server
from tests.support.web import _client, _multipart_body, _parts

TOO_DEEP = "the data set is nested deeper than 32 sequence levels"
CONTENT = 0x0040A730  # Content Sequence
_UNDEFINED = 0xFFFFFFFF
STORE = Principal(kind=PrincipalKind.PEER, name="CT1", allow=frozenset({Service.STORE}))


# Building nested data sets ---------------------------------------------------------------------------


def nested_dataset(levels: int, **overrides: Any) -> Dataset:
    """A small CT whose Content Sequence nests ``levels`` deep: its innermost item, at level ``levels``,
    holds a Code Value (built with pydicom)."""
    ds = make_ct(8, 8, seed=levels, **overrides)
    inner = Dataset()
    inner.CodeValue = "LEVEL"
    for _ in range(levels):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    return ds


@dataclass(frozen=True)
class Encoding:
    name: str
    ts: str
    undefined: bool = False  # sequences and items of undefined length, with delimiters
    un: bool = False  # the outermost sequence written as UN of undefined length (PS3.5 6.2.2)

    @property
    def implicit(self) -> bool:
        return self.ts == ImplicitVRLittleEndian

    @property
    def little(self) -> bool:
        return self.ts != ExplicitVRBigEndian


ENCODINGS = [
    Encoding("explicit LE, defined lengths", ExplicitVRLittleEndian),
    Encoding("explicit LE, undefined lengths", ExplicitVRLittleEndian, undefined=True),
    Encoding("implicit LE, defined lengths", ImplicitVRLittleEndian),
    Encoding("implicit LE, undefined lengths", ImplicitVRLittleEndian, undefined=True),
    Encoding("explicit BE, undefined lengths", ExplicitVRBigEndian, undefined=True),
    Encoding("explicit BE, defined lengths", ExplicitVRBigEndian),
    Encoding("deflated", DeflatedExplicitVRLittleEndian, undefined=True),
    Encoding("UN holding implicit VR", ExplicitVRLittleEndian, undefined=True, un=True),
]


def content_sequence(levels: int, enc: Encoding, *, implicit: bool | None = None) -> bytes:
    """The Content Sequence element of :func:`nested_dataset`, written byte by byte (PS3.5 7.1, 7.5)."""
    implicit = enc.implicit if implicit is None else implicit
    order = "<" if enc.little else ">"

    def header(tag: int, vr: bytes, length: int) -> bytes:
        if implicit:
            return struct.pack(order + "HHL", tag >> 16, tag & 0xFFFF, length)
        if vr == b"SQ":
            return struct.pack(order + "HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, length)
        return struct.pack(order + "HH2sH", tag >> 16, tag & 0xFFFF, vr, length)

    def delimiter(element: int) -> bytes:
        return struct.pack(order + "HHL", 0xFFFE, element, 0)

    content = header(0x00080100, b"SH", 6) + b"LEVEL "
    for _ in range(levels):
        length = _UNDEFINED if enc.undefined else len(content)
        item = struct.pack(order + "HHL", 0xFFFE, 0xE000, length) + content
        value = item + delimiter(0xE00D) + delimiter(0xE0DD) if enc.undefined else item
        content = header(CONTENT, b"SQ", _UNDEFINED if enc.undefined else len(value)) + value
    if enc.un:  # the same sequence in implicit VR, behind an explicit UN header of undefined length
        inner = content_sequence(levels, replace(enc, un=False), implicit=True)[8:]
        content = struct.pack("<HH2sHL", CONTENT >> 16, CONTENT & 0xFFFF, b"UN", 0, _UNDEFINED) + inner
    return content


def encoded_dataset(
    levels: int, enc: Encoding, *, sequence: bytes | None = None, **overrides: Any
) -> tuple[Dataset, str, bytes]:
    """(the CT, its transfer syntax, its data set bytes with the Content Sequence of ``levels`` levels,
    or ``sequence``, put in before the Pixel Data); deflated when the encoding says so."""
    ds = make_ct(8, 8, seed=1, **overrides)
    syntax = ExplicitVRLittleEndian if enc.ts == DeflatedExplicitVRLittleEndian else enc.ts
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    whole = dataset_bytes(part10_bytes(ds))[1]
    pixels = ds.PixelData
    del ds.PixelData
    head = dataset_bytes(part10_bytes(ds))[1]
    ds.PixelData = pixels
    body = head + (sequence or content_sequence(levels, enc)) + whole[len(head) :]
    if enc.ts == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = deflater.compress(body) + deflater.flush()
    return ds, enc.ts, body


def unreadable_sequence() -> bytes:
    """A Content Sequence 400 levels deep whose first item also holds an element longer than the item:
    not well formed above the level where the walk would leave items out, so it cannot; pydicom reads
    it (lazily) and recurses when it converts it (explicit VR little endian, defined lengths)."""
    inner = content_sequence(399, ENCODINGS[0])
    junk = struct.pack("<HH2sH", 0x0008, 0x1030, b"LO", 200) + b"AB"  # says 200 bytes, has 2
    item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner) + len(junk)) + inner + junk
    return struct.pack("<HH2sHL", CONTENT >> 16, CONTENT & 0xFFFF, b"SQ", 0, len(item)) + item


def part10_of(ds: Dataset, ts: str, body: bytes) -> bytes:
    """A Part 10 file as ingest writes it: zeroed preamble, SafePACS's file meta, the data set bytes."""
    return b"\x00" * 128 + b"DICM" + file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts) + body


def pydicom_depth(ds: Dataset) -> int:
    """The deepest level of an item in ``ds`` as pydicom reads it (iterative: no recursion limit)."""
    deepest = 0
    todo = [(ds, 0)]
    while todo:
        item, level = todo.pop()
        deepest = max(deepest, level)
        for elem in item:
            if elem.VR == "SQ":
                todo.extend((child, level + 1) for child in elem.value)
    return deepest


def _objects(data: Path) -> list[Path]:
    return [p for p in (data / "objects").rglob("*") if p.is_file()]


# Ingest, in every encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("enc", ENCODINGS, ids=[e.name for e in ENCODINGS])
def test_items_at_level_32_are_stored_and_at_level_33_refused(data_dir: Path, enc: Encoding) -> None:
    archive = open_archive(load_settings(data_dir))
    try:
        ds, ts, body = encoded_dataset(32, enc)
        result = archive.ingest.ingest_dataset(STORE, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, body)
        assert result.outcome is IngestOutcome.STORED
        for levels in (33, 400):
            ds, ts, body = encoded_dataset(levels, enc)
            with pytest.raises(InvalidObjectError) as refused:
                archive.ingest.ingest_dataset(STORE, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, body)
            assert str(refused.value) == TOO_DEEP, levels
            assert archive.instances.get_instance(str(ds.SOPInstanceUID)) is None
            # The same as a Part 10 file (import, STOW-RS).
            with pytest.raises(InvalidObjectError, match=TOO_DEEP):
                archive.ingest.ingest_file(STORE, part10_of(ds, ts, body))
    finally:
        archive.close()
    assert len(_objects(data_dir)) == 1
    assert not list((data_dir / "tmp").iterdir())


def test_nesting_far_past_the_recursion_limit_is_refused_as_too_deep(data_dir: Path) -> None:
    """The fast header read walks sequences with a stack of its own: 5000 levels (far past Python's
    recursion limit) are refused for their depth, not as data that cannot be parsed."""
    enc = ENCODINGS[1]
    ds, ts, body = encoded_dataset(5000, enc)
    assert 5000 > sys.getrecursionlimit()
    with pytest.raises(InvalidObjectError, match=TOO_DEEP):
        read_indexed_elements(body, implicit=False)
    back = read_indexed_elements(body, implicit=False, max_depth=10**6)
    assert back is not None and back.SOPInstanceUID == ds.SOPInstanceUID
    archive = open_archive(load_settings(data_dir))
    try:
        with pytest.raises(InvalidObjectError, match=TOO_DEEP):
            archive.ingest.ingest_dataset(STORE, str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, body)
    finally:
        archive.close()


def test_the_walk_finds_the_depth_pydicom_reads_in_every_corpus_file() -> None:
    """Over every storable file of the corpus, the byte walk sees exactly the nesting pydicom reads:
    within a limit at that depth, beyond a limit one less, and pruning to one less leaves a data set
    pydicom reads at that depth."""
    nested = 0
    for path in storable_files():
        data = path.read_bytes()
        ts, body = dataset_bytes(data)
        uid = UID(ts)
        if uid.is_deflated:
            body = zlib.decompress(body, -zlib.MAX_WBITS)
        ds = pydicom.dcmread(BytesIO(data))
        depth = pydicom_depth(ds)
        kwargs = {"implicit": uid.is_implicit_VR, "little_endian": uid.is_little_endian}
        assert not nesting.exceeds(body, limit=depth, **kwargs), path.name
        if depth:
            nested += 1
            assert nesting.exceeds(body, limit=depth - 1, **kwargs), path.name
            pruned = nesting.prune(body, limit=depth - 1, **kwargs)
            assert pruned is not None, path.name
            back = read_dataset(BytesIO(pruned), uid.is_implicit_VR, uid.is_little_endian)
            assert pydicom_depth(back) == depth - 1, path.name
            assert set(back.keys()) == set(ds.keys()), path.name
    assert nested > 20


def _inflated(body: bytes, enc: Encoding) -> bytes:
    return zlib.decompress(body, -zlib.MAX_WBITS) if enc.ts == DeflatedExplicitVRLittleEndian else body


@pytest.mark.parametrize("enc", ENCODINGS, ids=[e.name for e in ENCODINGS])
def test_pruning_leaves_out_the_items_below_the_limit_and_nothing_else(enc: Encoding) -> None:
    ds, _, body = encoded_dataset(400, enc)
    body = _inflated(body, enc)
    kwargs = {"implicit": enc.implicit, "little_endian": enc.little}
    pruned = nesting.prune(body, **kwargs)
    assert pruned is not None and not nesting.exceeds(pruned, **kwargs)
    back = read_dataset(BytesIO(pruned), enc.implicit, enc.little)
    assert pydicom_depth(back) == 32
    assert back.PixelData == ds.PixelData and back.PatientName == ds.PatientName
    item = back
    for _ in range(32):
        item = item[CONTENT].value[0]
    assert CONTENT in item and len(item[CONTENT].value) == 0  # kept, empty
    assert nesting.prune(_inflated(encoded_dataset(32, enc)[2], enc), **kwargs) is None


# Over the network and the CLI ------------------------------------------------------------------------


def put_directly(data: Path, part10: bytes, header: Dataset, ts: str) -> None:
    """Store ``part10`` as an archive did before ingest enforced the limit: sealed and written by the
    storage layer, indexed from ``header`` by the index (no ingest check runs)."""
    settings = load_settings(data)
    cipher = EnvelopeCipher(FileKeyProvider(settings.keys_dir))
    blobs = FileBlobStore(settings.objects_dir, settings.data_dir / "tmp", fsync=False)
    repos = open_repositories(settings.index_url)
    try:
        sealed, key_id, tag = cipher.seal_noting(part10)
        blob = StoredBlob(blobs.put(sealed), key_id, hashlib.sha256(part10).hexdigest(), len(part10), tag)
        repos.instances.add_instance(header, blob, ts)
    finally:
        repos.close()


@dataclass
class Deep:
    """An object stored 400 levels deep before the limit, and what was stored."""

    ds: Dataset
    ts: str
    body: bytes
    part10: bytes


@dataclass
class Served:
    srv: Server
    token: str
    deep: dict[str, Deep]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("nesting") / "data"
    initialize(data)
    deep: dict[str, Deep] = {}
    for enc in (ENCODINGS[0], ENCODINGS[1], ENCODINGS[3]):
        ds, ts, body = encoded_dataset(400, enc, WindowCenter="40", WindowWidth="400")
        part10 = part10_of(ds, ts, body)
        put_directly(data, part10, ds, ts)
        deep[enc.name] = Deep(ds, ts, body, part10)
    # One pydicom cannot convert, in a study with one it can.
    ds, ts, body = encoded_dataset(0, ENCODINGS[0], sequence=unreadable_sequence())
    deep["unreadable"] = Deep(ds, ts, body, part10_of(ds, ts, body))
    put_directly(data, deep["unreadable"].part10, ds, ts)
    plain = make_ct(8, 8, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, instance_number=2)
    put_directly(data, part10_bytes(plain), plain, ExplicitVRLittleEndian)
    srv = start_server(data, env={"SAFEPACS_SERVER__WORKERS": "1"})
    try:
        srv.add_peer("CT1", "store,get")
        out = io.StringIO()
        assert run_cli("user", "add", "rad", "--role", "radiologist", "--data", str(data)) == 0
        with redirect_stdout(out):
            assert run_cli("token", "create", "--user", "rad", "--data", str(data)) == 0
        yield Served(srv, out.getvalue().strip().splitlines()[-1], deep)
    finally:
        srv.stop()


def _url(ds: Dataset, tail: str = "") -> str:
    return (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}{tail}"
    )


def test_c_store_answers_0xc000_for_items_below_level_32(served: Served, tmp_path: Path) -> None:
    srv = served.srv
    shallow, deeper = nested_dataset(32), nested_dataset(33)
    ds, ts, body = encoded_dataset(400, ENCODINGS[1])
    deepest = tmp_path / "deepest.dcm"
    deepest.write_bytes(part10_of(ds, ts, body))
    capture = AuditCapture(open_repositories(load_settings(srv.data).index_url).audit_log)
    with associate(
        srv.port, [build_context(CTImageStorage, [ExplicitVRLittleEndian])], calling="CT1"
    ) as assoc:
        assert assoc.is_established
        assert assoc.send_c_store(shallow).Status == 0x0000
        for sent in (deeper, deepest):
            rsp = assoc.send_c_store(sent)
            assert rsp.Status == 0xC000 and rsp.ErrorComment == TOO_DEEP
        assert assoc.send_c_store(make_ct()).Status == 0x0000  # the association goes on
    repos = open_repositories(load_settings(srv.data).index_url)
    try:
        assert repos.instances.get_instance(str(shallow.SOPInstanceUID)) is not None
        assert repos.instances.get_instance(str(deeper.SOPInstanceUID)) is None
        assert repos.instances.get_instance(str(ds.SOPInstanceUID)) is None
        refused = [
            e
            for e in capture.events(EventID.INSTANCES_ACCESSED)
            if e.outcome is not Outcome.SUCCESS and e.outcome_description == TOO_DEEP
        ]
        assert len(refused) == 2
    finally:
        repos.close()


def test_stow_rs_refuses_each_part_nested_too_deeply(served: Served) -> None:
    shallow, deeper = nested_dataset(32), nested_dataset(33)
    ds, ts, body = encoded_dataset(400, ENCODINGS[1])
    parts = [part10_bytes(shallow), part10_bytes(deeper), part10_of(ds, ts, body)]
    with _client(served.srv, served.token) as client:
        content, ctype = _multipart_body(parts)
        r = client.post("/dicomweb/studies", content=content, headers={"Content-Type": ctype})
        assert r.status_code == 202, r.text
        answer = r.json()
        (stored,) = answer["00081199"]["Value"]
        assert stored["00081155"]["Value"] == [shallow.SOPInstanceUID]
        failed = {i["00081155"]["Value"][0]: i["00081197"]["Value"] for i in answer["00081198"]["Value"]}
        assert failed == {deeper.SOPInstanceUID: [0xC000], ds.SOPInstanceUID: [0xC000]}
        content, ctype = _multipart_body(parts[1:])
        r = client.post("/dicomweb/studies", content=content, headers={"Content-Type": ctype})
        assert r.status_code == 409, r.text


def test_import_names_each_file_nested_too_deeply_and_stores_the_others(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    nested_dataset(32).save_as(src / "a-level32.dcm", enforce_file_format=True)
    nested_dataset(33).save_as(src / "b-level33.dcm", enforce_file_format=True)
    ds, ts, body = encoded_dataset(400, ENCODINGS[3])
    (src / "c-level400.dcm").write_bytes(part10_of(ds, ts, body))
    make_ct().save_as(src / "d-plain.dcm", enforce_file_format=True)
    assert run_cli("import", str(src), "--data", str(data_dir)) == 1
    err = capsys.readouterr().err
    assert "2 stored" in err and "2 rejected" in err
    assert f"b-level33.dcm: {TOO_DEEP}" in err and f"c-level400.dcm: {TOO_DEEP}" in err
    assert "Traceback" not in err
    assert len(_objects(data_dir)) == 2


# Reading what was stored before ------------------------------------------------------------------


def _deep_item(meta: dict[str, Any], levels: int) -> dict[str, Any]:
    item = meta
    for _ in range(levels):
        (item,) = item[f"{CONTENT:08X}"]["Value"]
    return item


@pytest.mark.parametrize("name", [ENCODINGS[0].name, ENCODINGS[1].name, ENCODINGS[3].name])
def test_an_object_stored_400_levels_deep_reads_back_on_every_path(served: Served, name: str) -> None:
    deep = served.deep[name]
    ds = deep.ds
    with _client(served.srv, served.token) as client:
        # Metadata: the items below level 32 left out (their sequence sent empty), and said so.
        r = client.get(_url(ds, "/metadata"))
        assert r.status_code == 200, r.text
        assert "nested deeper than 32 levels were left out" in r.headers["warning"]
        (meta,) = r.json()
        assert meta["00100020"]["Value"] == [ds.PatientID]
        assert "BulkDataURI" in meta["7FE00010"]
        assert not _deep_item(meta, 32)[f"{CONTENT:08X}"].get("Value")
        r = client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/metadata")
        assert r.status_code == 200 and len(r.json()) == 1
        # Rendered, thumbnail, frames, WADO-URI: the pixel data is fine.
        for tail in ("/rendered", "/thumbnail", "/frames/1/rendered"):
            r = client.get(_url(ds, tail))
            assert r.status_code == 200, (tail, r.text)
            assert Image.open(io.BytesIO(r.content)).size[0] > 0
        r = client.get(_url(ds, "/frames/1"))
        assert r.status_code == 200 and _parts(r)[0][1] == bytes(ds.PixelData)
        r = client.get(
            "/dicomweb/wado",
            params={
                "requestType": "WADO",
                "studyUID": ds.StudyInstanceUID,
                "seriesUID": ds.SeriesInstanceUID,
                "objectUID": ds.SOPInstanceUID,
                "contentType": "image/png",
            },
        )
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        # The instance itself, as stored: byte for byte.
        r = client.get(
            _url(ds), headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        )
        assert r.status_code == 200 and _parts(r)[0][1] == deep.part10
    # C-GET sends the stored bytes.  Converted (as far as pydicom's recursion goes) or refused for that
    # instance alone, cleanly.
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    identifier.SeriesInstanceUID = ds.SeriesInstanceUID
    identifier.SOPInstanceUID = ds.SOPInstanceUID
    received, final = c_get(served.srv.port, identifier, [(CTImageStorage, [deep.ts])], calling="CT1")
    assert final.Status == 0x0000
    assert received == {ds.SOPInstanceUID: (deep.ts, deep.body)}
    other = ImplicitVRLittleEndian if deep.ts != ImplicitVRLittleEndian else ExplicitVRLittleEndian
    received, final = c_get(served.srv.port, identifier, [(CTImageStorage, [other])], calling="CT1")
    if received:
        assert final.Status == 0x0000 and received[ds.SOPInstanceUID][0] == other
    else:
        assert final.Status == 0xA702 and final.FailedSOPInstanceUIDList == ds.SOPInstanceUID
    with _client(served.srv, served.token) as client:
        r = client.get(_url(ds), headers={"Accept": 'multipart/related; type="application/dicom"'})
        # The server still answers after all that: the instance converted, or (pydicom's recursion
        # cannot convert it) a problem before any part, never a 200 with nothing in it.
        if r.status_code == 200:
            assert len(_parts(r)) == 1
        else:
            assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json", r.text
    assert "Traceback" not in served.srv.stderr_text()


def test_an_object_stored_400_levels_deep_is_restored_after_deletion(data_dir: Path) -> None:
    enc = ENCODINGS[1]
    ds, ts, body = encoded_dataset(400, enc)
    put_directly(data_dir, part10_of(ds, ts, body), ds, ts)
    archive = open_archive(load_settings(data_dir))
    try:
        admin = Principal(kind=PrincipalKind.SYSTEM, name="test", allow=frozenset(Service))
        assert archive.delete.delete(admin, str(ds.StudyInstanceUID)) == 1
    finally:
        archive.close()
    assert run_cli("restore", str(ds.StudyInstanceUID), "--data", str(data_dir)) == 0
    repos = open_repositories(load_settings(data_dir).index_url)
    try:
        assert repos.instances.get_instance(str(ds.SOPInstanceUID)) is not None
    finally:
        repos.close()


def test_an_instance_pydicom_cannot_convert_is_a_clear_error_and_still_renders(served: Served) -> None:
    deep = served.deep["unreadable"]
    ds = deep.ds
    with _client(served.srv, served.token) as client:
        r = client.get(_url(ds, "/metadata"))
        assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json", r.text
        assert "cannot be represented as DICOM JSON" in r.json()["detail"]
        assert "Traceback" not in r.text and str(ds.PatientName) not in r.text
        r = client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/metadata")  # the other instance
        assert r.status_code == 200 and len(r.json()) == 1
        assert "1 instance(s) left out" in r.headers["warning"]
        r = client.get(_url(ds, "/rendered"))
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    identifier.SeriesInstanceUID = ds.SeriesInstanceUID
    identifier.SOPInstanceUID = ds.SOPInstanceUID
    received, final = c_get(served.srv.port, identifier, [(CTImageStorage, [deep.ts])], calling="CT1")
    assert final.Status == 0x0000 and received == {ds.SOPInstanceUID: (deep.ts, deep.body)}
    assert "Traceback" not in served.srv.stderr_text()
