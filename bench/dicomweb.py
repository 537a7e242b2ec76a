"""DICOMweb benchmark: QIDO-RS study search latency on a large index and WADO-RS series retrieval
throughput, SafePACS beside Orthanc with its DICOMweb plugin, in the same run.

    .venv/bin/python bench/dicomweb.py --quick                          # 2,000 studies, 100-slice series
    .venv/bin/python bench/dicomweb.py --workdir /tmp/spbench-dicomweb  # 100,000 studies, 500 slices

Both archives get the same data: ``--studies`` single-instance studies (small 16x16 images of eight
modalities, dates spread over ten years, 1.7 studies per patient on average) and one series of ``--instances``
512x512x16-bit CT slices. SafePACS is filled with ``safepacs import`` (the C-STORE ingest path, one
process per core), Orthanc with DCMTK ``storescu`` over 4 associations; neither fill is timed as a
benchmark. ``--workdir`` keeps the corpora and the filled archives and reuses them next time.

QIDO-RS: the same seeded list of searches is sent to both, one at a time over one keep-alive
connection, after a warm-up; every answer is checked (result count, and that each result matches).
WADO-RS: GET .../studies/{study}/series/{series} as stored (``transfer-syntax=*``) with each client of
``--clients`` (curl, a lean C client, and httpx), the same client for every server; every part of the
answer is counted and, on each client's first (untimed) retrieval, parsed and compared with what was
stored.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import resource
import shlex
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
from _common import (
    CALLING_AET,
    HOST,
    ORTHANC,
    SAFEPACS,
    Corpus,
    Orthanc,
    Receiver,
    dcmtk,
    free_port,
    git_revision,
    make_corpus,
    nodelay_env,
    remove_tree,
    running,
    version_line,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from rich.console import Console
from rich.table import Table

from safepacs.auth.pki import create_ca, issue_certificate, write_private

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
BENCH_USER = "bench"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
QIDO_ACCEPT = "application/dicom+json"
CHUNK = 1000  # studies per corpus folder (and per generation task)
LABELS = {"safepacs": "SafePACS", "orthanc": "Orthanc", "orthanc-https": "Orthanc via nginx HTTPS"}
NGINX = Path("/usr/sbin/nginx")

# ------------------------------------------------------------------------------------ study corpus

SYLLABLES = ("BA", "DE", "FI", "GO", "HU", "KA", "LE", "MO", "NI", "PU",
             "RA", "SE", "TI", "VO", "ZU", "MA", "NE", "RO", "SU", "TA")  # fmt: skip
GIVEN = ("ANN", "BEN", "CARL", "DORA", "EVA", "FRED", "GINA", "HUGO",
         "IDA", "JON", "KIM", "LEA", "MAX", "NORA", "OLE", "PIA")  # fmt: skip
# modality, SOP Class UID, share of the studies
MODALITIES = (
    ("CT", "1.2.840.10008.5.1.4.1.1.2", 0.30),
    ("MR", "1.2.840.10008.5.1.4.1.1.4", 0.20),
    ("CR", "1.2.840.10008.5.1.4.1.1.1", 0.18),
    ("US", "1.2.840.10008.5.1.4.1.1.6.1", 0.12),
    ("DX", "1.2.840.10008.5.1.4.1.1.1.1", 0.10),
    ("MG", "1.2.840.10008.5.1.4.1.1.1.2", 0.05),
    ("PT", "1.2.840.10008.5.1.4.1.1.128", 0.03),
    ("NM", "1.2.840.10008.5.1.4.1.1.20", 0.02),
)
FIRST_DAY = dt.date(2015, 1, 1)
DAYS = 3653  # 2015-01-01 .. 2024-12-31
NEW_PATIENT = 0.6  # chance that a study starts a new patient (else: the previous study's patient)
CORPUS_VERSION = 1


@dataclass
class Studies:
    """The study corpus: files under ``root`` in folders of CHUNK, and what each study holds."""

    root: Path
    uids: list[str]
    patient_ids: list[str]
    names: list[str]
    dates: list[int]  # YYYYMMDD
    modalities: list[str]
    total_bytes: int

    @property
    def count(self) -> int:
        return len(self.uids)

    def folders(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir())


def _study_chunk(root: str, seed: int, chunk: int, size: int) -> list[tuple[str, str, str, int, str, int]]:
    """Write ``size`` single-instance studies into ``root/<chunk>``; their (uid, pid, name, date, modality,
    bytes). Patients never span two chunks, so chunks can be generated (and imported) independently."""
    rng = np.random.default_rng([seed, chunk])
    folder = Path(root) / f"{chunk:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([m[2] for m in MODALITIES])
    pixels = (np.arange(256, dtype=np.uint16) * 16).tobytes()
    out = []
    patient: tuple[str, str, str, str] = ("", "", "", "")
    for k in range(size):
        i = chunk * CHUNK + k
        if k == 0 or rng.random() < NEW_PATIENT:
            surname = "".join(SYLLABLES[j] for j in rng.integers(0, len(SYLLABLES), 3))
            birth = FIRST_DAY - dt.timedelta(days=int(rng.integers(365 * 5, 365 * 90)))
            patient = (
                f"SP{i:08d}",
                f"{surname}^{GIVEN[rng.integers(0, len(GIVEN))]}",
                birth.strftime("%Y%m%d"),
                "FMO"[rng.integers(0, 3)],
            )
        modality, sop_class, _ = MODALITIES[rng.choice(len(MODALITIES), p=weights / weights.sum())]
        date = (FIRST_DAY + dt.timedelta(days=int(rng.integers(0, DAYS)))).strftime("%Y%m%d")
        sop_uid, study_uid = generate_uid(), generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = date
        ds.StudyTime = ds.SeriesTime = f"{rng.integers(7, 20):02d}{rng.integers(0, 60):02d}00"
        ds.AccessionNumber = f"A{i:09d}"
        ds.Modality = modality
        ds.Manufacturer = "BENCH"
        ds.ReferringPhysicianName = "REFERRER^BENCH"
        ds.StudyDescription = f"{modality} BENCHMARK STUDY"
        ds.SeriesDescription = "SERIES 1"
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.StudyID = str(i)
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 16
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = pixels
        path = folder / f"{i:07d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((study_uid, patient[0], patient[1], int(date), modality, path.stat().st_size))
    return out


def make_studies(root: Path, count: int, seed: int, processes: int) -> Studies:
    """``count`` single-instance studies in ``root`` (reused when generated before with the same spec)."""
    marker = root / "studies.json"
    spec = {"version": CORPUS_VERSION, "count": count, "seed": seed}
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved["spec"] == spec:
            return Studies(root, *saved["columns"], total_bytes=saved["total_bytes"])
    remove_tree(root)
    root.mkdir(parents=True)
    chunks = [(c, min(CHUNK, count - c * CHUNK)) for c in range((count + CHUNK - 1) // CHUNK)]
    rows: list[tuple[str, str, str, int, str, int]] = []
    with ProcessPoolExecutor(max_workers=processes) as pool:
        futures = [pool.submit(_study_chunk, str(root), seed, c, n) for c, n in chunks]
        for fut in futures:
            rows.extend(fut.result())
    columns = [list(col) for col in zip(*rows, strict=True)][:5]
    total = sum(r[5] for r in rows)
    marker.write_text(json.dumps({"spec": spec, "columns": columns, "total_bytes": total}))
    return Studies(root, *columns, total_bytes=total)


@dataclass
class SeriesInfo:
    corpus: Corpus
    study_uid: str
    series_uid: str
    sop_uids: set[str]
    pixel_bytes: int
    patient_id: str
    name: str
    date: int
    modality: str

    def folders(self) -> list[Path]:
        return sorted({(self.corpus.root / rel).parent for rel in self.corpus.files})


def make_series(root: Path, count: int) -> SeriesInfo:
    corpus = make_corpus(root, "CT 512", count=count, rows=512, cols=512, per_series=count)
    sops = set()
    first: Dataset | None = None
    for rel in corpus.files:
        ds = pydicom.dcmread(corpus.root / rel, stop_before_pixels=True)
        sops.add(str(ds.SOPInstanceUID))
        first = first or ds
    assert first is not None
    return SeriesInfo(
        corpus,
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
        sops,
        int(first.Rows) * int(first.Columns) * 2,
        str(first.PatientID),
        str(first.PatientName),
        int(first.StudyDate),
        str(first.Modality),
    )


# ------------------------------------------------------------------------------------------ archives


class SafePacsWeb(Receiver):
    """``safepacs serve`` on a data directory filled beforehand; DICOMweb over HTTPS with the data
    directory's own CA."""

    http_port: int = 0

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self.http_port}/dicomweb"

    def start(self) -> None:
        self.port, self.http_port = free_port(), free_port()
        argv = [
            str(SAFEPACS), "serve", "--data", str(self.data),
            "--dicom-port", str(self.port), "--http-port", str(self.http_port),
            "--dicom-tls-port", str(free_port()),
        ]  # fmt: skip
        self._spawn(argv, env={**os.environ, **self.env})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc is not None and self.log_path is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "listening for HTTPS" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after 120 s:\n{self.log_tail()}")

    def stored(self) -> int:
        return sum(len(files) for _d, _s, files in os.walk(self.data / "objects"))

    def client(self, token: str) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.data / "keys" / "ca.pem"))
        return _client(self.base_url, context, {"Authorization": f"Bearer {token}"})

    def curl(self, token: str, scratch: Path) -> Curl:
        ca = self.data / "keys" / "ca.pem"
        return Curl(self.base_url, ca, {"Authorization": f"Bearer {token}"}, scratch)


class OrthancWeb(Orthanc):
    """Orthanc (Debian) with only the DICOMweb plugin; its SQLite index and storage in ``workdir``."""

    start_timeout = 300.0  # opening an index of 100,000 studies

    def config(self) -> dict[str, object]:
        return {
            **super().config(),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}/dicom-web"

    def client(self) -> httpx.Client:
        return _client(self.base_url, False, {})

    def curl(self, scratch: Path) -> Curl:
        return Curl(self.base_url, None, {}, scratch)

    def counts(self) -> tuple[int, int]:
        with httpx.Client(base_url=f"http://{HOST}:{self.http_port}", timeout=60) as client:
            stats = client.get("/statistics").raise_for_status().json()
        return int(stats["CountStudies"]), int(stats["CountInstances"])


class NginxTls(Receiver):
    """nginx terminating TLS in front of a running Orthanc: how Orthanc's documentation has a site serve
    it over HTTPS (Debian's Orthanc 1.10.1 resets its own HTTPS connections after the handshake).

    TLS 1.2+ with a P-256 certificate like SafePACS's, over a keep-alive connection to Orthanc.
    nginx buffers the answer in memory, 256 KiB at a time (with its defaults, 4-8 KiB buffers, the
    same retrieval took 3x as long: the client then gets many small TLS records).  Its CPU time
    counts the nginx and the Orthanc processes."""

    backend: Orthanc | None = None

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self.port}/dicom-web"

    def start(self) -> None:
        if not NGINX.exists():
            raise RuntimeError(f"{NGINX} not found: apt-get install -y nginx-light")
        assert self.backend is not None
        root = self.workdir / "nginx"
        remove_tree(root)
        (root / "tmp").mkdir(parents=True)
        _certificates(root)
        self.port = free_port()
        (root / "nginx.conf").write_text(
            f"""
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    upstream orthanc {{ server {HOST}:{self.backend.http_port}; keepalive 4; }}
    server {{
        listen {HOST}:{self.port} ssl;
        ssl_certificate {root}/cert.pem;
        ssl_certificate_key {root}/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        tcp_nodelay on;
        location / {{
            proxy_pass http://orthanc;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            proxy_buffer_size 256k;
            proxy_buffers 64 256k;
            proxy_busy_buffers_size 1m;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""
        )
        user = ["-g", "user root;"] if os.geteuid() == 0 else []  # workers read nothing outside root/
        conf, errors = root / "nginx.conf", root / "error.log"
        self._spawn([str(NGINX), "-p", str(root), "-e", str(errors), "-c", str(conf), *user])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1):
                return
            time.sleep(0.1)
        raise RuntimeError(f"nginx not ready after 20 s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        assert self.backend is not None
        return super().cpu_seconds() + self.backend.cpu_seconds()

    def stored(self) -> int:
        assert self.backend is not None
        return self.backend.stored()

    def client(self) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.workdir / "nginx" / "ca.pem"))
        return _client(self.base_url, context, {})

    def curl(self, scratch: Path) -> Curl:
        return Curl(self.base_url, self.workdir / "nginx" / "ca.pem", {}, scratch)


def _certificates(root: Path) -> None:
    """A CA and a P-256 server certificate for 127.0.0.1 made the way ``safepacs init`` makes its own
    (``ca.pem``, which the client trusts; ``cert.pem`` and ``key.pem`` for nginx)."""
    ca_cert, ca_key = create_ca("bench nginx CA")
    cert, key = issue_certificate(ca_cert, ca_key, "bench nginx", server_names=[HOST], days=1)
    (root / "ca.pem").write_bytes(ca_cert)
    (root / "cert.pem").write_bytes(cert)
    write_private(root / "key.pem", key)


def _client(base_url: str, verify: ssl.SSLContext | bool, headers: dict[str, str]) -> httpx.Client:
    """One keep-alive HTTP/1.1 connection; no compression (Orthanc would gzip on request, we do not)."""
    return httpx.Client(
        base_url=base_url,
        verify=verify,
        http1=True,
        http2=False,
        timeout=httpx.Timeout(300.0),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        headers={**headers, "Accept": QIDO_ACCEPT, "Accept-Encoding": "identity"},
    )


def _tls_of(client: httpx.Client) -> str:
    """The protocol and cipher suite of the client's connection (the same for every HTTPS target?)."""
    with client.stream("GET", "/studies", params={"PatientID": "NOBODY"}) as response:
        tls = response.extensions["network_stream"].get_extra_info("ssl_object")
        return f"{tls.version()} {tls.cipher()[0]}" if tls else "plain"


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done


def _split(items: list[Path], groups: int) -> list[list[Path]]:
    return [g for g in (items[k::groups] for k in range(groups)) if g]


def _fresh(store: Path, spec: dict[str, object], reload: bool) -> bool:
    """True when ``store`` holds a complete fill with ``spec``; otherwise empties it for a new one."""
    marker = store / "filled.json"
    if not reload and marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        return True
    remove_tree(store)
    store.mkdir(parents=True)
    return False


def fill_safepacs(
    store: Path, studies: Studies, series: SeriesInfo, spec: dict[str, object], args: Any
) -> None:
    if _fresh(store, spec, args.reload):
        console.print(f"SafePACS: reusing the filled data directory {store / 'data'}")
        return
    data = store / "data"
    _run([str(SAFEPACS), "init", "--data", str(data)])
    _run([str(SAFEPACS), "user", "add", BENCH_USER, "--role", "radiologist", "--data", str(data)])
    t0 = time.perf_counter()
    folders = [*studies.folders(), *series.folders()]
    procs = []
    for k, group in enumerate(_split(folders, args.processes)):
        log = (store / f"import-{k}.log").open("wb")
        argv = [str(SAFEPACS), "import", "--data", str(data), *map(str, group)]
        procs.append((subprocess.Popen(argv, stdout=log, stderr=log), log))
    failed = []
    for proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode != 0:
            failed.append(Path(log.name).read_text(errors="replace")[-1500:])
    expected = studies.count + series.corpus.count
    stored = SafePacsWeb(name="safepacs", aet="SAFEPACS", workdir=store).stored()
    if failed or stored != expected:
        raise RuntimeError(f"safepacs import: {stored:,} of {expected:,} stored\n" + "\n".join(failed))
    elapsed = time.perf_counter() - t0
    (store / "filled.json").write_text(json.dumps({"spec": spec, "seconds": elapsed}))
    console.print(
        f"SafePACS: imported {expected:,} instances in {elapsed:.0f} s ({expected / elapsed:,.0f}/s)"
    )


def fill_orthanc(
    store: Path, studies: Studies, series: SeriesInfo, spec: dict[str, object], args: Any
) -> None:
    if _fresh(store, spec, args.reload):
        console.print(f"Orthanc: reusing the filled storage in {store}")
        return
    orthanc = OrthancWeb(name="orthanc", aet="ORTHANC", workdir=store)
    with running(orthanc):
        t0 = time.perf_counter()
        storescu = dcmtk("storescu")
        procs = []
        for k, group in enumerate(_split([*studies.folders(), *series.folders()], 4)):
            log = (store / f"storescu-{k}.log").open("wb")
            argv = [
                storescu, "-nh", "-R", "+sd", "-aet", CALLING_AET, "-aec", orthanc.aet,
                HOST, str(orthanc.port), *map(str, group),
            ]  # fmt: skip
            procs.append((subprocess.Popen(argv, env=nodelay_env(), stdout=log, stderr=log), log))
        for proc, log in procs:
            proc.wait()
            log.close()
        elapsed = time.perf_counter() - t0
        n_studies, n_instances = orthanc.counts()
    expected = (studies.count + 1, studies.count + series.corpus.count)
    if (n_studies, n_instances) != expected or any(p.returncode for p, _ in procs):
        raise RuntimeError(
            f"Orthanc holds {n_studies:,} studies / {n_instances:,} instances, expected {expected};"
            f" see {store}/storescu-*.log"
        )
    (store / "filled.json").write_text(json.dumps({"spec": spec, "seconds": elapsed}))
    console.print(
        f"Orthanc: stored {n_instances:,} instances in {elapsed:.0f} s ({n_instances / elapsed:,.0f}/s)"
    )


# --------------------------------------------------------------------------------------------- QIDO


@dataclass
class Query:
    params: dict[str, str]
    check: Callable[[list[dict[str, Any]]], str | None]  # None when the answer is right


@dataclass
class Expect:
    """What the index holds, to compute each query's right answer (the WADO series' study included)."""

    uids: np.ndarray
    patient_ids: np.ndarray
    names: np.ndarray  # upper case
    dates: np.ndarray
    modalities: np.ndarray

    @classmethod
    def of(cls, studies: Studies, series: SeriesInfo) -> Expect:
        return cls(
            np.array([*studies.uids, series.study_uid]),
            np.array([*studies.patient_ids, series.patient_id]),
            np.char.upper(np.array([*studies.names, series.name])),
            np.array([*studies.dates, series.date]),
            np.array([*studies.modalities, series.modality]),
        )


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []))


def _name(item: dict[str, Any]) -> str:
    values = _values(item, "00100010")
    return str(values[0].get("Alphabetic", "")).upper() if values else ""


def _date(item: dict[str, Any]) -> int:
    values = _values(item, "00080020")
    return int(values[0]) if values else 0


def _page_check(
    expected: int, ok: Callable[[dict[str, Any]], bool]
) -> Callable[[list[dict[str, Any]]], str | None]:
    def check(results: list[dict[str, Any]]) -> str | None:
        if len(results) != expected:
            return f"{len(results)} results, expected {expected}"
        bad = sum(not ok(r) for r in results)
        return f"{bad} results do not match the query" if bad else None

    return check


def _day(index: int) -> int:
    return int((FIRST_DAY + dt.timedelta(days=index)).strftime("%Y%m%d"))


def make_queries(kind: str, n: int, ex: Expect, rng: np.random.Generator) -> list[Query]:
    """``n`` searches of one kind with their right answers (limit=100 unless the answer is exact)."""
    out = []
    total = len(ex.uids)
    for _ in range(n):
        pick = int(rng.integers(0, total - 1))  # any study of the corpus (not the series' study)
        if kind == "PatientID":
            pid = str(ex.patient_ids[pick])
            want = set(ex.uids[ex.patient_ids == pid].tolist())

            def exact(results: list[dict[str, Any]], want: set[str] = want) -> str | None:
                got = [str(_values(r, "0020000D")[0]) for r in results if _values(r, "0020000D")]
                return None if sorted(got) == sorted(want) else f"{len(got)} studies, expected {len(want)}"

            out.append(Query({"PatientID": pid}, exact))
        elif kind == "PatientName":
            surname = str(ex.names[pick]).split("^")[0]
            prefix = surname[: 4 if rng.random() < 0.5 else 6]  # 2 syllables: ~1/400 of all; 3: ~1/8000
            matches = int(np.char.startswith(ex.names, prefix).sum())
            out.append(
                Query(
                    {"PatientName": prefix + "*", "limit": "100"},
                    _page_check(min(100, matches), lambda r, p=prefix: _name(r).startswith(p)),
                )
            )
        else:
            if kind == "paging":
                start = int(rng.integers(0, DAYS - 365))
                low, high = _day(start), _day(start + 364)
                selected = (ex.dates >= low) & (ex.dates <= high)
                offset = 100 * int(rng.integers(0, 50))
            else:
                start = int(rng.integers(0, DAYS))
                low, high = _day(start), _day(start + int(rng.integers(0, 31)))
                selected = (ex.dates >= low) & (ex.dates <= high)
                offset = 0
            params = {"StudyDate": f"{low}-{high}", "limit": "100"}
            modality = ""
            if kind == "ModalitiesInStudy":
                modality = str(ex.modalities[pick])
                params["ModalitiesInStudy"] = modality
                selected &= ex.modalities == modality
            if offset:
                params["offset"] = str(offset)
            expected = max(0, min(100, int(selected.sum()) - offset))

            def in_range(
                r: dict[str, Any], low: int = low, high: int = high, modality: str = modality
            ) -> bool:
                return low <= _date(r) <= high and (not modality or modality in _values(r, "00080061"))

            out.append(Query(params, _page_check(expected, in_range)))
    return out


QUERY_KINDS = {
    "PatientID": "PatientID exact",
    "PatientName": "PatientName prefix*, limit 100",
    "StudyDate": "StudyDate range 1-31 d, limit 100",
    "ModalitiesInStudy": "ModalitiesInStudy + StudyDate range, limit 100",
    "paging": "StudyDate 1 year, limit 100, offset 0-4900",
}


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    results: int = 0
    wrong: list[str] = field(default_factory=list)
    cpu: float = 0.0
    stopped_early: bool = False


def search_url(params: dict[str, str]) -> str:
    """``/studies?...`` with ``*`` left as is: Orthanc takes a percent-encoded ``%2A`` (as httpx would
    send it) literally, so ``PatientName=ABC%2A`` finds nothing there (RFC 3986 2.2 allows both)."""
    return "/studies?" + urllib.parse.urlencode(params, quote_via=urllib.parse.quote, safe="*")


def run_queries(
    client: httpx.Client, server: Receiver, queries: list[Query], warmup: int, budget: float
) -> Latencies:
    out = Latencies()
    for query in queries[:warmup]:
        client.get(search_url(query.params))
    cpu_before = server.cpu_seconds()
    deadline = time.perf_counter() + budget
    for query in queries[warmup:]:
        t0 = time.perf_counter()
        response = client.get(search_url(query.params))
        out.seconds.append(time.perf_counter() - t0)
        if response.status_code == 204:
            results: list[dict[str, Any]] = []
        elif response.status_code == 200:
            results = response.json()
        else:
            results = []
            out.wrong.append(f"HTTP {response.status_code} for {query.params}")
            continue
        out.results += len(results)
        problem = query.check(results)
        if problem:
            out.wrong.append(f"{problem} for {query.params}")
        if time.perf_counter() > deadline:
            out.stopped_early = True
            break
    out.cpu = server.cpu_seconds() - cpu_before
    return out


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p))


# --------------------------------------------------------------------------------------------- WADO


@dataclass
class Retrieval:
    elapsed: float
    parts: int
    payload: int
    error: str | None = None


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip().strip('"').encode("ascii")
    raise ValueError(f"no boundary in {content_type!r}")


def split_parts(body: bytes, boundary: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """The (headers, content) of each part of a multipart body (RFC 2046 5.1.1)."""
    view = memoryview(body)
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    if pos < 0:
        raise ValueError("no boundary in the body")
    while True:
        pos += len(delimiter)
        if body[pos : pos + 2] == b"--":
            return
        start = body.index(b"\r\n", pos) + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise ValueError("the last part is not closed")
        if body[start : start + 2] == b"\r\n":
            headers, content = b"", view[start + 2 : end]
        else:
            split = body.index(b"\r\n\r\n", start)
            headers, content = body[start:split], view[split + 4 : end]
        yield headers, content
        pos = end + 2


@dataclass
class Answer:
    """One retrieval as a client saw it."""

    elapsed: float  # seconds from sending the request to the last byte
    cpu: float  # the client's CPU seconds
    content_type: str
    size: int  # bytes of the body
    body: bytes | None  # None: not kept (curl's timed runs)


#: A client: ``fetch(url, keep)`` retrieves ``url``; ``keep=False`` lets it throw the body away.
Fetch = Callable[[str, bool], Answer]
#: The WADO-RS clients, each used for every server alike.
CLIENTS = ("curl", "httpx")


def retrieve(client: httpx.Client, url: str, keep: bool = True) -> Answer:
    """httpx: one keep-alive connection, the body gathered as it comes (at most one TLS record per
    read); the body is always kept (its CPU is the client's either way)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    with client.stream("GET", url, headers={"Accept": WADO_ACCEPT}) as response:
        chunks = list(response.iter_raw())
        status = response.status_code
        content_type = response.headers.get("content-type", "")
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    body = b"".join(chunks)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
    return Answer(elapsed, cpu, content_type, len(body), body)


@dataclass
class Curl:
    """curl (libcurl and OpenSSL, in C): a client as lean as a viewer's.  httpx over TLS needs ~1.4 ms
    of CPU per 0.5 MB instance, twice the HTTPS server's, and client and server share the two cores,
    so with httpx alone the TLS targets were measured mostly on the client.  One process (and
    connection) per retrieval; the time is curl's own, from sending the request to the last byte
    (``time_total - time_pretransfer``: the handshake is left out, as httpx's kept-alive connection
    leaves it out), the CPU that of the curl process (start-up included).  A kept body is written to
    a file on tmpfs and read back after the timed region; a timed run's body goes to /dev/null
    (writing it to tmpfs or to a pipe doubled curl's CPU, ~0.45 -> ~0.85 ms per instance) and only
    its size is kept, which must then be exactly the size of the first, fully checked, answer."""

    base_url: str
    cafile: Path | None
    headers: dict[str, str]
    scratch: Path  # on tmpfs when there is one

    def __call__(self, url: str, keep: bool = True) -> Answer:
        body_path, header_path = self.scratch / "body", self.scratch / "headers"
        header_path.touch(mode=0o600)  # the bearer token stays off the command line
        header_path.write_text(
            "".join(f"{k}: {v}\n" for k, v in {**self.headers, "Accept": WADO_ACCEPT}.items())
            + "Accept-Encoding: identity\n"
        )
        report = r"%{http_code}\n%{content_type}\n%{time_pretransfer}\n%{time_total}\n%{size_download}"
        argv = ["curl", "--silent", "--show-error", "--http1.1", "--max-time", "300", "-H", f"@{header_path}",
                "-o", str(body_path) if keep else os.devnull, "-w", report]  # fmt: skip
        if self.cafile is not None:
            argv += ["--cacert", str(self.cafile)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([*argv, self.base_url + url], capture_output=True, text=True, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        try:
            if done.returncode != 0:
                raise RuntimeError(f"curl exited with {done.returncode}: {done.stderr.strip()[:300]}")
            status, content_type, pretransfer, total, size = done.stdout.split("\n")
            body = body_path.read_bytes() if keep else None
        finally:
            body_path.unlink(missing_ok=True)
        if status != "200":
            raise RuntimeError(f"HTTP {status}: {(body or b'')[:300]!r}")
        return Answer(float(total) - float(pretransfer), cpu, content_type, int(size), body)


def check_series(
    body: bytes, content_type: str, series: SeriesInfo, full: bool
) -> tuple[int, int, str | None]:
    """(parts, payload bytes, problem); ``full`` parses every part and compares it with the corpus."""
    if not content_type.lower().startswith("multipart/related"):
        return 0, 0, f"answer is {content_type!r}"
    parts = payload = 0
    seen: set[str] = set()
    for headers, content in split_parts(body, _boundary(content_type)):
        parts += 1
        payload += len(content)
        if b"application/dicom" not in headers.lower():
            return parts, payload, f"part {parts} is not application/dicom: {headers[:200]!r}"
        if full:
            ds = pydicom.dcmread(BytesIO(content))
            if str(ds.SeriesInstanceUID) != series.series_uid or len(ds.PixelData) != series.pixel_bytes:
                return parts, payload, f"part {parts} is not an instance of the series as stored"
            seen.add(str(ds.SOPInstanceUID))
    if full and seen != series.sop_uids:
        return parts, payload, f"{len(seen & series.sop_uids)} of {len(series.sop_uids)} instances returned"
    if parts != len(series.sop_uids):
        return parts, payload, f"{parts} parts, expected {len(series.sop_uids)}"
    return parts, payload, None


@dataclass
class WadoResult:
    runs: list[Retrieval] = field(default_factory=list)
    error: str | None = None
    cpu: float = 0.0  # the server's, during the timed runs
    client_cpu: float = 0.0  # the client's, while receiving (TLS and HTTP parsing)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.runs)


def run_wado(
    fetchers: dict[tuple[str, str], Fetch], servers: dict[str, Receiver], series: SeriesInfo, runs: int
) -> dict[tuple[str, str], WadoResult]:
    """Each (client, server)'s first retrieval checked instance by instance, then ``runs`` timed rounds,
    one retrieval per client and server in each round: a machine whose speed drifts affects every
    server alike.  Every timed answer must have as many parts (when its body is kept) and exactly as
    many bytes as the first (checked after the timed region)."""
    url = f"/studies/{series.study_uid}/series/{series.series_uid}"
    out = {key: WadoResult() for key in fetchers}
    expected: dict[tuple[str, str], tuple[int, int, int]] = {}  # parts, their bytes, the body's bytes
    for key, fetch in fetchers.items():
        try:
            first = fetch(url, True)
            assert first.body is not None
            parts, payload, out[key].error = check_series(first.body, first.content_type, series, full=True)
            expected[key] = (parts, payload, first.size)
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            out[key].error = f"{type(exc).__name__}: {exc}"
    for _ in range(runs):
        for key, fetch in fetchers.items():
            res = out[key]
            if res.error is not None:
                continue
            parts, payload, size = expected[key]
            try:
                cpu_before = servers[key[1]].cpu_seconds()
                got = fetch(url, False)
                res.cpu += servers[key[1]].cpu_seconds() - cpu_before
                res.client_cpu += got.cpu
                problem: str | None = None
                if got.body is not None:
                    checked = check_series(got.body, got.content_type, series, full=False)
                    if checked != (parts, payload, None):
                        problem = (
                            checked[2] or f"{checked[1]:,} bytes in the parts, {payload:,} the first time"
                        )
                elif not got.content_type.lower().startswith("multipart/related"):
                    problem = f"answer is {got.content_type!r}"
                if problem is None and got.size != size:
                    problem = f"{got.size:,} bytes in the body, {size:,} the first time"
                elapsed = got.elapsed
                del got
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                res.error = f"{type(exc).__name__}: {exc}"
                continue
            if problem is not None:
                res.error = problem
                continue
            res.runs.append(Retrieval(elapsed, parts, payload))
    return out


# -------------------------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


def qido_rows(results: dict[tuple[str, str], Latencies], targets: list[str]) -> list[list[str]]:
    rows = []
    for kind in [*QUERY_KINDS, "all"]:
        for target in targets:
            if kind == "all":
                parts = [results[(k, target)] for k in QUERY_KINDS if (k, target) in results]
                lat = Latencies(
                    [s for p in parts for s in p.seconds],
                    sum(p.results for p in parts),
                    [w for p in parts for w in p.wrong],
                    sum(p.cpu for p in parts),
                    any(p.stopped_early for p in parts),
                )
                label = "all of the above"
            elif (kind, target) in results:
                lat, label = results[(kind, target)], QUERY_KINDS[kind]
            else:
                continue
            n = len(lat.seconds)
            if not n:
                continue
            check = "ok" if not lat.wrong else f"FAILED: {len(lat.wrong)}/{n} wrong"
            if lat.stopped_early:
                check += " (time budget hit)"
            timing = [_ms(statistics.median(lat.seconds)), _ms(percentile(lat.seconds, 95)),
                      _ms(percentile(lat.seconds, 99))]  # fmt: skip
            if lat.wrong:
                timing = ["-", "-", "-"]
            rows.append(
                [label, LABELS[target], f"{n:,}", *timing, f"{lat.results / n:,.1f}", _ms(lat.cpu / n), check]
            )
    return rows


QIDO_HEADERS = "query,server,n,median ms,p95 ms,p99 ms,results/query,srv CPU ms/q,check".split(",")


def wado_rows(
    results: dict[tuple[str, str], WadoResult], targets: list[str], clients: list[str]
) -> list[list[str]]:
    rows = []
    for client in clients:
        base = results.get((client, "orthanc"))
        base_rate = statistics.median(r.elapsed for r in base.runs) if base and base.ok else None
        for target in targets:
            res = results.get((client, target))
            if res is None:
                continue
            if not res.ok:
                rows.append([LABELS[target], client, *["-"] * 8, f"FAILED: {res.error}"])
                continue
            elapsed = statistics.median(r.elapsed for r in res.runs)
            parts, payload = res.runs[0].parts, res.runs[0].payload
            rates = sorted(r.payload / r.elapsed / 1e6 for r in res.runs)
            rows.append(
                [
                    LABELS[target],
                    client,
                    f"{parts:,}",
                    f"{payload / 1e6:,.1f}",
                    f"{elapsed:.2f}",
                    f"{parts / elapsed:,.0f}",
                    f"{payload / elapsed / 1e6:,.0f}",
                    f"{base_rate / elapsed:.2f}" if base_rate else "-",
                    f"{res.cpu / len(res.runs) / parts * 1000:.2f}",
                    f"{res.client_cpu / len(res.runs) / parts * 1000:.2f}",
                    f"ok, {len(res.runs)} runs {rates[0]:,.0f}-{rates[-1]:,.0f} MB/s",
                ]
            )
    return rows


WADO_HEADERS = (
    "server,client,instances,MB,median s,inst/s,MB/s,x Orthanc,srv CPU ms/inst,client CPU ms/inst,check"
).split(",")


def print_table(title: str, headers: list[str], rows: list[list[str]], group: int) -> None:
    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < group or header == "check" else "right")
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            table.add_section()
        previous = row[0]
        table.add_row(*row)
    console.print(table)


def markdown(title: str, headers: list[str], rows: list[list[str]]) -> str:
    lines = [title, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def verdicts(
    qido: dict[tuple[str, str], Latencies], wado: dict[tuple[str, str], WadoResult], studies: int
) -> list[str]:
    out = []
    mine = [s for (k, t), lat in qido.items() if t == "safepacs" and not lat.wrong for s in lat.seconds]
    wrong = sum(len(lat.wrong) for (k, t), lat in qido.items() if t == "safepacs")
    if mine and not wrong:
        median, p99 = statistics.median(mine), percentile(mine, 99)
        met = median < 0.020 and p99 < 0.100
        out.append(
            f"QIDO-RS target (median < 20 ms, p99 < 100 ms at 100,000 studies; measured at {studies:,}):"
            f" median {_ms(median)} ms, p99 {_ms(p99)} ms -> {'MET' if met else 'NOT MET'}"
        )
    elif wrong:
        out.append(f"QIDO-RS: SafePACS gave {wrong} wrong answers -> FAILED")
    # target (bench/README.md, first table): >= 1.2x Orthanc behind nginx TLS (the same transport),
    # >= 0.8x Orthanc's plain HTTP
    goals = (("orthanc-https", "HTTPS through nginx", 1.2), ("orthanc", "plain HTTP", 0.8))
    for client in dict.fromkeys(c for c, _ in wado):
        sp = wado.get((client, "safepacs"))
        for target, how, goal in goals:
            orth = wado.get((client, target))
            if sp and orth and sp.ok and orth.ok:
                ratio = statistics.median(r.elapsed for r in orth.runs) / statistics.median(
                    r.elapsed for r in sp.runs
                )
                out.append(
                    f"WADO-RS with {client}, against Orthanc over {how} (target >= {goal}x):"
                    f" {ratio:.2f}x -> {'MET' if ratio >= goal else 'NOT MET'}"
                )
        if sp and not sp.ok:
            out.append(f"WADO-RS with {client}: SafePACS FAILED")
    return out


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=100_000, help="single-instance studies (default 100,000)")
    p.add_argument("--instances", type=int, default=500, help="512x512 CT slices in the WADO series (500)")
    p.add_argument("--queries", type=int, default=200, help="timed searches per query kind and server (200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed searches first, per kind and server (20)")
    p.add_argument("--runs", type=int, default=5, help="timed series retrievals per server (5)")
    p.add_argument("--quick", action="store_true", help="2,000 studies, 100 slices, 60 queries, 3 runs")
    p.add_argument(
        "--targets",
        default="safepacs,orthanc",
        help="comma-separated: safepacs,orthanc,orthanc-https (Orthanc behind nginx terminating TLS)",
    )
    p.add_argument("--kinds", default=",".join(QUERY_KINDS), help="query kinds (default: all)")
    p.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help="WADO-RS clients, each used for every server: curl,httpx (default both)",
    )
    p.add_argument("--budget", type=float, default=180, help="seconds at most per query kind and server")
    p.add_argument("--seed", type=int, default=1, help="seed of the corpus and of the queries (1)")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 2, help="generation/import processes")
    p.add_argument(
        "--workdir",
        type=Path,
        help="keep corpora and filled archives here and reuse them (default: temp dir)",
    )
    p.add_argument("--reload", action="store_true", help="fill the archives again even if --workdir has them")
    p.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    p.add_argument("--verbose", action="store_true", help="print every wrong answer")
    args = p.parse_args(argv)
    if args.quick:
        args.studies, args.instances, args.queries, args.runs = 2000, 100, 60, 3
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    known = ((args.targets, LABELS), (args.kinds, QUERY_KINDS), (args.clients, CLIENTS))
    if any(set(given) - set(allowed) for given, allowed in known):
        p.error(
            f"targets are {', '.join(LABELS)}; kinds are {', '.join(QUERY_KINDS)};"
            f" clients are {', '.join(CLIENTS)}"
        )
    if min(args.studies, args.instances, args.queries, args.runs) < 1:
        p.error("--studies, --instances, --queries and --runs must be positive")
    return args


def versions(targets: list[str]) -> str:
    parts = []
    if "safepacs" in targets:
        parts.append(version_line([str(SAFEPACS), "--version"]) + git_revision())
    if "orthanc-https" in targets and NGINX.exists():
        parts.append(version_line([str(NGINX), "-v"]).replace(str(NGINX), "nginx"))
    if any(t.startswith("orthanc") for t in targets):
        orthanc = version_line([str(ORTHANC), "--version"]).replace(str(ORTHANC), "Orthanc")
        plugin = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "orthanc-dicomweb"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        parts.append(f"{orthanc} + DICOMweb plugin {plugin or '?'}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safepacs-dicomweb-")) if own_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        t0 = time.perf_counter()
        studies = make_studies(workdir / f"studies-{args.studies}-seed{args.seed}", args.studies, args.seed,
                               args.processes)  # fmt: skip
        series = make_series(workdir / f"series-512-{args.instances}", args.instances)
        console.print(
            f"corpora ready in {time.perf_counter() - t0:.0f} s: {studies.count:,} studies"
            f" ({studies.total_bytes / 1e6:,.0f} MB), a series of {series.corpus.count:,} CT slices"
            f" ({series.corpus.total_bytes / 1e6:,.0f} MB)"
        )
        spec = {"studies": studies.root.name, "series": series.corpus.root.name, "uid": series.series_uid}
        # orthanc-https is the same Orthanc (and the same filled store) behind nginx
        archives = sorted({"orthanc" if t.startswith("orthanc") else t for t in args.targets})
        stores = {t: workdir / f"{t}-{args.studies}-seed{args.seed}-{args.instances}" for t in archives}
        if "safepacs" in stores:
            fill_safepacs(stores["safepacs"], studies, series, spec, args)
        if "orthanc" in stores:
            fill_orthanc(stores["orthanc"], studies, series, spec, args)

        tested = versions(args.targets)  # before the servers start: the code they run
        servers: dict[str, Receiver] = {}
        clients: dict[str, httpx.Client] = {}
        load_before = os.getloadavg()[0]
        qido: dict[tuple[str, str], Latencies] = {}
        wado: dict[tuple[str, str], WadoResult] = {}
        curls: dict[str, Curl] = {}
        with contextlib.ExitStack() as stack:
            # curl's answers go to tmpfs (when there is one), not to the disk the servers read from
            shm = Path("/dev/shm")
            scratch = Path(tempfile.mkdtemp(prefix="safepacs-wado-", dir=shm if shm.is_dir() else None))
            stack.callback(remove_tree, scratch)
            if "safepacs" in stores:
                sp = SafePacsWeb(name="safepacs", aet="SAFEPACS", workdir=stores["safepacs"])
                token = _run(
                    [
                        str(SAFEPACS),
                        "token",
                        "create",
                        "--user",
                        BENCH_USER,
                        "--expires",
                        "1d",
                        "--data",
                        str(sp.data),
                    ]
                ).stdout.strip()
                stack.enter_context(running(sp))
                servers["safepacs"] = sp
                clients["safepacs"] = stack.enter_context(sp.client(token))
                curls["safepacs"] = sp.curl(token, scratch)
            if "orthanc" in stores:
                orthanc = OrthancWeb(name="orthanc", aet="ORTHANC", workdir=stores["orthanc"])
                stack.enter_context(running(orthanc))
                if "orthanc" in args.targets:
                    servers["orthanc"] = orthanc
                    clients["orthanc"] = stack.enter_context(orthanc.client())
                    curls["orthanc"] = orthanc.curl(scratch)
                if "orthanc-https" in args.targets:
                    proxy = NginxTls(name="nginx", aet="-", workdir=stores["orthanc"])
                    proxy.backend = orthanc
                    stack.enter_context(running(proxy))
                    servers["orthanc-https"] = proxy
                    clients["orthanc-https"] = stack.enter_context(proxy.client())
                    curls["orthanc-https"] = proxy.curl(scratch)
            ready = time.monotonic() + 60
            for target, client in clients.items():
                while True:  # the first answer (the HTTPS process may still be starting)
                    with contextlib.suppress(httpx.TransportError):
                        if client.get("/studies", params={"PatientID": "NOBODY"}).status_code == 200:
                            break
                    if time.monotonic() > ready:
                        raise RuntimeError(f"{target} does not answer QIDO-RS:\n{servers[target].log_tail()}")
                    time.sleep(0.2)
            for target in ("safepacs", "orthanc-https"):
                if target in clients:
                    console.print(f"{target} TLS: {_tls_of(clients[target])}")

            expect = Expect.of(studies, series)
            for kind in args.kinds:
                rng = np.random.default_rng([args.seed, list(QUERY_KINDS).index(kind)])
                queries = make_queries(kind, args.warmup + args.queries, expect, rng)
                for target in args.targets:
                    lat = run_queries(clients[target], servers[target], queries, args.warmup, args.budget)
                    qido[(kind, target)] = lat
                    note = f", [red]{len(lat.wrong)} wrong[/red]" if lat.wrong else ""
                    median, p99 = statistics.median(lat.seconds), percentile(lat.seconds, 99)
                    console.print(
                        f"QIDO {kind:>17} {target:>8}: {len(lat.seconds)} queries,"
                        f" median {_ms(median)} ms, p99 {_ms(p99)} ms{note}"
                    )
                    for line in lat.wrong if args.verbose else lat.wrong[:3]:
                        console.print(f"    {line}", markup=False)
            fetchers: dict[tuple[str, str], Fetch] = {}
            for client_name in args.clients:
                for target in args.targets:
                    if client_name == "curl":
                        fetchers[(client_name, target)] = curls[target]
                    else:
                        fetchers[(client_name, target)] = functools.partial(retrieve, clients[target])
            wado = run_wado(fetchers, servers, series, args.runs)
            for (client_name, target), res in wado.items():
                if res.ok:
                    med = statistics.median(r.elapsed for r in res.runs)
                    console.print(
                        f"WADO {target:>13} ({client_name}): {res.runs[0].parts} instances,"
                        f" median {med:.2f} s"
                        f" = {res.runs[0].payload / med / 1e6:,.0f} MB/s"
                    )
                else:
                    console.print(f"WADO {target:>13} ({client_name}): [red]FAILED[/red] {res.error}")

        command = shlex.join(["python", "bench/dicomweb.py", *(sys.argv[1:] if argv is None else argv)])
        context = (
            f"{dt.date.today().isoformat()}, {os.cpu_count()} CPUs ({platform.machine()}),"
            f" load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after,"
            f" {tested};"
            f" `{command}`, {(time.perf_counter() - started) / 60:.0f} min in all"
        )
        qido_title = (
            f"QIDO-RS /studies on {studies.count + 1:,} studies, one request at a time, "
            f"{args.queries} per kind after {args.warmup} untimed"
        )
        wado_title = (
            f"WADO-RS series retrieval, {series.corpus.count} x 512x512 CT as stored,"
            f" median of {args.runs} runs"
        )
        q_rows, w_rows = qido_rows(qido, args.targets), wado_rows(wado, args.targets, args.clients)
        console.print()
        console.print(context, markup=False)
        print_table(qido_title, QIDO_HEADERS, q_rows, 2)
        print_table(wado_title, WADO_HEADERS, w_rows, 1)
        for line in verdicts(qido, wado, studies.count + 1):
            console.print(line, markup=False)
        if args.markdown:
            args.markdown.write_text(
                f"{context}\n\n"
                + markdown(qido_title, QIDO_HEADERS, q_rows)
                + "\n"
                + markdown(wado_title, WADO_HEADERS, w_rows)
            )
        return 0
    finally:
        if own_workdir:
            remove_tree(workdir)


if __name__ == "__main__":
    sys.exit(main())
