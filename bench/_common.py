"""Shared pieces of the SafePACS benchmarks: synthetic corpora, DCMTK tools, and the receivers under test.

Every receiver is started by us in a directory we own, listens on 127.0.0.1 only, and is stopped by its
own process id (each one runs in its own session, so its process group is exactly what we started).
Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

HOST = "127.0.0.1"
CALLING_AET = "BENCH"
REPO = Path(__file__).resolve().parent.parent
SAFEPACS = REPO / ".venv" / "bin" / "safepacs"
ORTHANC = Path("/usr/sbin/Orthanc")


# --------------------------------------------------------------------------------------------- tools


def dcmtk(tool: str) -> str:
    """The DCMTK binary ``tool``; the venv also has pynetdicom scripts named storescu/storescp, skip those."""
    venv_bin = (REPO / ".venv" / "bin").resolve()
    for entry in ["/usr/bin", "/usr/local/bin", *os.environ.get("PATH", "").split(os.pathsep)]:
        if not entry or Path(entry).resolve() == venv_bin:
            continue
        candidate = Path(entry) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            with candidate.open("rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    return str(candidate)
    raise SystemExit(f"DCMTK {tool} not found (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def nodelay_env() -> dict[str, str]:
    """Environment for DCMTK tools: DCMTK sets TCP_NODELAY on its sockets when this variable is 1."""
    return {**os.environ, "TCP_NODELAY": "1"}


def echo(port: int, aec: str, timeout: float = 5.0) -> bool:
    """C-ECHO from CALLING_AET; True when the receiver answers."""
    try:
        argv = [dcmtk("echoscu"), "-q", "-to", "2", "-ta", "5", "-aet", CALLING_AET, "-aec", aec]
        proc = subprocess.run(
            [*argv, HOST, str(port)],
            env=nodelay_env(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def count_files(root: Path, skip: Sequence[str] = ()) -> int:
    total = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        total += len(filenames)
    return total


# -------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    name: str
    root: Path
    files: list[str]  # relative to root, in series order
    total_bytes: int

    @property
    def count(self) -> int:
        return len(self.files)


def ct_dataset(
    rng: np.random.Generator,
    *,
    rows: int,
    cols: int,
    patient: int,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    number: int,
) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240315"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"ACC{patient:06d}"
    ds.Modality = "CT"
    ds.Manufacturer = "BENCH"
    ds.InstitutionName = "SafePACS benchmark"
    ds.ReferringPhysicianName = "Referrer^Bench"
    ds.StudyDescription = "CT CHEST W/O CONTRAST"
    ds.SeriesDescription = "AXIAL 1.0"
    ds.PatientName = f"Bench^Patient{patient:05d}"
    ds.PatientID = f"BENCH{patient:06d}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(patient)
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = ["-250.0", "-250.0", f"{-number * 1.0:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.SliceLocation = f"{-number * 1.0:.1f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = ["0.9765625", "0.9765625"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    return ds


def make_corpus(root: Path, name: str, *, count: int, rows: int, cols: int, per_series: int) -> Corpus:
    """``count`` CT instances of rows x cols x 16 bit, explicit VR little endian, in series of ``per_series``.

    Each series is its own study of its own patient. Files are named by position, so a corpus generated
    earlier in the same directory with the same parameters is reused.
    """
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "corpus.json"
    spec = {"name": name, "count": count, "rows": rows, "cols": cols, "per_series": per_series}
    files = [f"{i // per_series:04d}/{i:07d}.dcm" for i in range(count)]
    if marker.exists() and json.loads(marker.read_text())["spec"] == spec:
        return Corpus(name, root, files, json.loads(marker.read_text())["total_bytes"])
    rng = np.random.default_rng()
    total = 0
    study_uid = series_uid = frame_uid = ""
    for i, rel in enumerate(files):
        if i % per_series == 0:
            study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
            (root / rel).parent.mkdir(exist_ok=True)
        ds = ct_dataset(
            rng,
            rows=rows,
            cols=cols,
            patient=i // per_series,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            number=i % per_series + 1,
        )
        ds.save_as(root / rel, enforce_file_format=True)
        total += (root / rel).stat().st_size
    marker.write_text(json.dumps({"spec": spec, "total_bytes": total}))
    return Corpus(name, root, files, total)


def ct_corpus(workdir: Path, count: int, *, per_series: int = 250) -> Corpus:
    """The benchmarks' "CT 512": 512x512x16-bit slices (526 KB files) in ``workdir/corpus-ct``."""
    return make_corpus(
        workdir / "corpus-ct", "CT 512", count=count, rows=512, cols=512, per_series=per_series
    )


def small_corpus(workdir: Path, count: int) -> Corpus:
    """The benchmarks' "small 64": 64x64x16-bit images (9.5 KB files) in ``workdir/corpus-small``."""
    return make_corpus(workdir / "corpus-small", "small 64", count=count, rows=64, cols=64, per_series=100)


# ----------------------------------------------------------------------------------------- receivers


def _process_group_cpu(pgid: int) -> float:
    """CPU seconds (user+system) of the live processes in group ``pgid`` plus the children they reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        # fields[0] is field 3 (state) of proc(5): pgrp is field 5, utime..cstime are fields 14..17
        if int(fields[2]) == pgid:
            total += sum(int(v) for v in fields[11:15])
    return total / tick


@dataclass
class Receiver:
    """A store SCP we start in ``workdir``; subclasses know how to start, check and count it."""

    name: str
    aet: str
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        raise NotImplementedError

    def stored(self) -> int:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        return _process_group_cpu(self.proc.pid) if self.proc else 0.0

    def wait_idle(self, timeout: float = 60.0, window: float = 0.5, busy: float = 0.025) -> None:
        """Wait until the receiver's processes used less than ``busy`` CPU seconds in ``window`` (5% of a
        core): it answers before all its start-up work is done (SafePACS's HTTPS process, a second
        worker), and that work must neither compete with a measurement nor be counted in it."""
        deadline = time.monotonic() + timeout
        before = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(window)
            now = self.cpu_seconds()
            if now - before < busy:
                return
            before = now

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path = self.workdir / f"{self.name}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self, timeout: float, ready: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if ready is None or (self.log_path and ready in self.log_path.read_text(errors="replace")):
                if echo(self.port, self.aet):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Leftovers of the group we started (forked storescp children, pool workers): ask, then insist.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            time.sleep(0.5)


class StoreScp(Receiver):
    """DCMTK storescp, one forked process per association, writing files (no fsync), TCP_NODELAY."""

    def start(self) -> None:
        self.port = free_port()
        out = self.workdir / "received"
        out.mkdir()
        argv = [dcmtk("storescp"), "--fork", "-dhl", "-aet", self.aet, "-od", str(out), str(self.port)]
        self._spawn(argv, env=nodelay_env())
        self._wait_ready(20)

    def stored(self) -> int:
        return count_files(self.workdir / "received")


class Orthanc(Receiver):
    """Orthanc as packaged by Debian, its own SQLite index, plugins off, everything in ``workdir``.

    Orthanc does its DICOM networking with the system's DCMTK, which leaves Nagle's algorithm on unless
    the environment says TCP_NODELAY=1; without it every C-STORE response waits for a delayed ACK
    (bench/README.md, "Baseline measurements": 19 instead of 203 CT slices/s). We compare against the
    fast configuration; ``OrthancNagle`` is Orthanc exactly as packaged.
    """

    http_port: int = 0
    nodelay: bool = True
    start_timeout: float = 60.0

    def start(self) -> None:
        self.port, self.http_port = free_port(), free_port()
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        env = nodelay_env() if self.nodelay else {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        self._spawn([str(ORTHANC), str(cfg)], env=env)
        self._wait_ready(self.start_timeout)

    def config(self) -> dict[str, object]:
        """The configuration file's content; subclasses add to it (e.g. plugins)."""
        return {
            "Name": "SafePACS-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
        }

    def _get(self, path: str) -> object:
        url = f"http://{HOST}:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=30) as resp:  # our own Orthanc on loopback
            return json.loads(resp.read())

    def stored(self) -> int:
        stats = self._get("/statistics")
        assert isinstance(stats, dict)
        return int(stats["CountInstances"])


class OrthancNagle(Orthanc):
    """Orthanc as packaged: Nagle's algorithm on its sockets (storescu still sets TCP_NODELAY on its own)."""

    nodelay = False


class SafePacs(Receiver):
    """``safepacs init`` + ``peer add BENCH`` + ``safepacs serve`` in ``workdir/data`` (encrypted at rest)."""

    allow: str = "echo,store"  # the services peer BENCH may use

    def start(self) -> None:
        data = self.workdir / "data"
        env = {**os.environ, **self.env}
        for argv in (
            [str(SAFEPACS), "init", "--data", str(data)],
            [
                str(SAFEPACS), "peer", "add", CALLING_AET, "--host", HOST,
                "--allow", self.allow, "--tls", "off", "--data", str(data),
            ],
        ):  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(argv[1:3])} failed ({done.returncode}):\n{done.stderr[-2000:]}"
                )
        self.port = free_port()
        argv = [
            str(SAFEPACS), "serve", "--data", str(data), "--dicom-port", str(self.port),
            "--http-port", str(free_port()), "--dicom-tls-port", str(free_port()),
        ]  # fmt: skip
        self._spawn(argv, env=env)
        self._wait_ready(120, ready="SafePACS listening for DICOM on")

    def stored(self) -> int:
        return count_files(self.workdir / "data" / "objects")

    def worker_pids(self) -> list[int]:
        """The pool workers (processes of the server's group other than the leader), e.g. for py-spy."""
        if not self.proc:
            return []
        pids = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and entry.name != str(self.proc.pid):
                with contextlib.suppress(OSError):
                    raw = Path(entry.path, "stat").read_text()
                    if int(raw[raw.rfind(")") + 2 :].split()[2]) == self.proc.pid:
                        pids.append(int(entry.name))
        return pids


@contextlib.contextmanager
def running(receiver: Receiver) -> Iterator[Receiver]:
    try:
        receiver.start()
        receiver.wait_idle()
        yield receiver
    finally:
        receiver.stop()


_DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def settle_page_cache(corpus: Corpus) -> bool:
    """Start a measurement from the same memory state as every other: write back and drop the page
    cache (root only), then read ``corpus`` back into it, so storescu reads from memory.

    Without this, whichever receiver ran at a moment when the kernel had to hand out pages this VM
    had not touched yet paid for them: on a 2-core VM, a 0.5 MB object written into such pages cost
    1.5-2 ms of extra kernel time (perf: ``copy_folio_from_iter_atomic``), doubling a receiver's CPU
    per CT slice, and which receiver that was depended on the order of the measurements.  Whether
    the cache could be dropped is returned (False when not root: results then depend on order).
    """
    dropped = False
    if os.geteuid() == 0:
        os.sync()
        with contextlib.suppress(OSError):
            _DROP_CACHES.write_text("1\n")
            dropped = True
    for name in corpus.files:
        with open(corpus.root / name, "rb") as handle:
            while handle.read(1 << 20):
                pass
    return dropped


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------- reporting


def version_line(argv: list[str]) -> str:
    """The first line a tool prints for ``argv`` (e.g. ``--version``), ``?`` when it cannot be run."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def git_revision() -> str:
    """`` (git abc1234)``, ``+changes`` when src/ differs from it; read-only (no index refresh)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src"],
            cwd=REPO, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" (git {rev}{'+changes' if changes else ''})"


#: storescu -v lines that acknowledge an instance as stored.
GOOD_RESPONSE = ("I: Received Store Response (Success", "I: Received Store Response (Warning")


@dataclass
class Measurement:
    elapsed: float
    sent: int
    stored: int
    errors: list[str] = field(default_factory=list)
    server_cpu: float = 0.0
    acked: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors and self.stored == self.sent == self.acked


def split(files: list[str], groups: int) -> list[list[str]]:
    """Contiguous groups of nearly equal size (each association sends whole runs of a series)."""
    size, extra = divmod(len(files), groups)
    out, start = [], 0
    for k in range(groups):
        end = start + size + (1 if k < extra else 0)
        out.append(files[start:end])
        start = end
    return [g for g in out if g]


def markdown_table(rows: list[list[str]], title: str, headers: Sequence[str]) -> str:
    """``rows`` under ``headers`` as a Markdown table after ``title``."""
    lines = [title, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def rich_table(rows: list[list[str]], title: str, headers: Sequence[str]) -> Any:
    """``rows`` as a rich Table: the first column left-aligned, the others right."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table
