"""Memory benchmark: SafePACS's resident memory at rest and over a query and retrieval workload, as
proportional set size (PSS) summed over its processes, beside Orthanc in the same run.

    .venv/bin/python bench/memory.py --quick     # 5 series of 20 CT slices, 1,000 queries (~1 min)
    .venv/bin/python bench/memory.py             # 5 series of 100 CT slices, 10,000 queries (~6-13 min)

Both servers start on empty stores and run side by side: ``safepacs serve`` with its defaults
(``server.workers`` = CPU count, the HTTPS process) and Orthanc with its DICOMweb plugin.  Each gets
the same series over DICOM (DCMTK ``storescu``), then the same queries, half C-FIND (pynetdicom, one
association, Nagle off) and half QIDO-RS (one keep-alive HTTP connection; HTTPS for SafePACS), in
interleaved blocks, then each series retrieved once by C-GET and once by WADO-RS.  After each block
the servers are left to go idle and the PSS of every process of each server's process group is
read from ``/proc/PID/smaps_rollup`` (PSS divides a page shared by n processes by n, so the sum is
what the server costs the machine; RSS would count shared pages once per process).  ``--studies N``
fills both stores with N more single-instance studies first.  All traffic is on 127.0.0.1.

Flat means: the summed PSS grows less than 5% over the queries after the first block (the warm-up:
first use of each code path, SQLite's page cache), and less than 5% over the retrievals after the
first series was retrieved by both protocols (their own warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import (
    CALLING_AET,
    HOST,
    ORTHANC,
    REPO,
    Corpus,
    Receiver,
    dcmtk,
    free_port,
    git_revision,
    make_corpus,
    markdown_table,
    nodelay_env,
    remove_tree,
    rich_table,
    version_line,
)
from dicomweb import DICOMWEB_PLUGIN, QIDO_ACCEPT, WADO_ACCEPT, OrthancWeb
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from rich.console import Console

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

BENCH_USER = "bench"
FLAT = 0.05  # growth after warm-up under which the curve counts as flat
TARGET_MB = 200.0  # target (bench/README.md, first table): SafePACS at rest, summed PSS
LABELS = {"safepacs": "SafePACS", "orthanc": "Orthanc"}


# ------------------------------------------------------------------------------------------ memory


@dataclass
class ProcessMemory:
    pid: int
    role: str
    pss: float  # MB (2^20 bytes), as smem shows them
    uss: float
    rss: float


def _rollup(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (each server runs in a session of its own)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                raw = Path(entry.path, "stat").read_text()
                if int(raw[raw.rfind(")") + 2 :].split()[2]) == pgid:
                    pids.append(int(entry.name))
    return sorted(pids)


def memory_of(server: Receiver, roles: dict[int, str]) -> list[ProcessMemory]:
    assert server.proc is not None
    out = []
    for pid in group_pids(server.proc.pid):
        with contextlib.suppress(OSError, KeyError):
            r = _rollup(pid)
            role = roles.get(pid) or ("parent" if pid == server.proc.pid else "child")
            private = r["Private_Clean"] + r["Private_Dirty"]
            out.append(ProcessMemory(pid, role, r["Pss"] / 1024, private / 1024, r["Rss"] / 1024))
    return out


# ----------------------------------------------------------------------------------------- servers


def _safepacs_argv(*args: str) -> list[str]:
    """This checkout's ``safepacs`` (``python -m safepacs`` with REPO/src first on the path)."""
    return [sys.executable, "-m", "safepacs", *args]


def _safepacs_env(extra: dict[str, str]) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


class SafePacsServer(Receiver):
    """``safepacs init``, peer BENCH (echo, store, find, get), user ``bench`` and a token, ``serve``
    with its defaults on the fresh data directory."""

    http_port: int = 0
    token: str = ""

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    def start(self) -> None:
        env = _safepacs_env(self.env)
        data = str(self.data)
        for argv in (
            ["init", "--data", data],
            ["peer", "add", CALLING_AET, "--host", HOST, "--allow", "echo,store,find,get", "--tls", "off",
             "--data", data],
            ["user", "add", BENCH_USER, "--role", "radiologist", "--data", data],
            ["token", "create", "--user", BENCH_USER, "--expires", "1d", "--data", data],
        ):  # fmt: skip
            done = subprocess.run(_safepacs_argv(*argv), capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"safepacs {' '.join(argv[:2])} failed:\n{done.stderr[-2000:]}")
        self.token = done.stdout.strip()
        self.port, self.http_port = free_port(), free_port()
        argv = _safepacs_argv(
            "serve", "--data", data, "--dicom-port", str(self.port), "--http-port", str(self.http_port),
            "--dicom-tls-port", str(free_port()),
        )  # fmt: skip
        self._spawn(argv, env=env)
        self._wait_ready(120, ready="SafePACS listening for DICOM on")

    def stored(self) -> int:
        return sum(len(files) for _d, _s, files in os.walk(self.data / "objects"))

    def roles(self) -> dict[int, str]:
        """Which process is which, from the log: the workers and the audit export process log their pid,
        uvicorn the HTTPS process's.  Any other child is a purge child (forked at the start and hourly,
        it exits once it has purged), caught while it runs."""
        assert self.proc is not None and self.log_path is not None
        text = self.log_path.read_text(errors="replace")
        logged = {
            "DIMSE worker": r"DIMSE worker accepting.*pid=(\d+)",
            "HTTPS": r"Started server process \[(\d+)\]",
            "audit export": r"audit export running.*pid=(\d+)",
        }
        known = {int(pid): role for role, pattern in logged.items() for pid in re.findall(pattern, text)}
        roles = {self.proc.pid: "parent"}
        for pid in group_pids(self.proc.pid):
            if pid != self.proc.pid:
                roles[pid] = known.get(pid, "purge")
        return roles

    def base_url(self) -> str:
        return f"https://{HOST}:{self.http_port}/dicomweb"

    def client(self) -> httpx.Client:
        import ssl

        context = ssl.create_default_context(cafile=str(self.data / "keys" / "ca.pem"))
        return _client(self.base_url(), context, {"Authorization": f"Bearer {self.token}"})


class OrthancServer(OrthancWeb):
    """Orthanc (Debian) with its DICOMweb plugin; BENCH registered so that it may C-FIND and C-GET."""

    start_timeout = 60.0

    def config(self) -> dict[str, object]:
        return {**super().config(), "DicomModalities": {"bench": [CALLING_AET, HOST, 104]}}

    def roles(self) -> dict[int, str]:
        assert self.proc is not None
        return {self.proc.pid: "Orthanc"}

    def client(self) -> httpx.Client:
        return _client(f"http://{HOST}:{self.http_port}/dicom-web", False, {})


def _client(base_url: str, verify: Any, headers: dict[str, str]) -> httpx.Client:
    return httpx.Client(
        base_url=base_url,
        verify=verify,
        http1=True,
        http2=False,
        timeout=httpx.Timeout(300.0),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        headers={**headers, "Accept": QIDO_ACCEPT, "Accept-Encoding": "identity"},
    )


@contextlib.contextmanager
def started(server: Receiver) -> Iterator[Receiver]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


def store(corpus: Corpus, server: Receiver, timeout: float = 600) -> str | None:
    """Send ``corpus`` with one storescu; an error, or None when every instance was acknowledged."""
    log = server.workdir / f"storescu-{corpus.root.name}.log"
    argv = [dcmtk("storescu"), "-v", "-nh", "-R", "-aet", CALLING_AET, "-aec", server.aet,
            HOST, str(server.port), *corpus.files]  # fmt: skip
    with log.open("wb") as out:
        done = subprocess.run(argv, cwd=corpus.root, env=nodelay_env(), stdout=out, stderr=out,
                              timeout=timeout, check=False)  # fmt: skip
    lines = log.read_text(errors="replace").splitlines()
    good = sum(line.startswith("I: Received Store Response (Success") for line in lines)
    if done.returncode != 0 or good != corpus.count:
        return f"storescu exit {done.returncode}, {good} of {corpus.count} acknowledged"
    return None


# ---------------------------------------------------------------------------------------- workload


@dataclass
class SeriesRef:
    patient_id: str
    study_uid: str
    series_uid: str
    count: int
    nbytes: int


def series_of(corpus: Corpus) -> list[SeriesRef]:
    """Each series of ``corpus`` (one study and patient per series, see _common.make_corpus)."""
    from pydicom import dcmread

    out = []
    folders: dict[str, list[str]] = {}
    for name in corpus.files:
        folders.setdefault(str(Path(name).parent), []).append(name)
    for names in folders.values():
        ds = dcmread(corpus.root / names[0], stop_before_pixels=True)
        nbytes = sum((corpus.root / n).stat().st_size for n in names)
        out.append(
            SeriesRef(str(ds.PatientID), ds.StudyInstanceUID, ds.SeriesInstanceUID, len(names), nbytes)
        )
    return out


class Dimse:
    """One association from BENCH for C-FIND and C-GET (the CT storage context in the SCP role)."""

    def __init__(self, server: Receiver) -> None:
        self.received = 0
        self.ae = AE(ae_title=CALLING_AET)
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        self.ae.add_requested_context(CTImageStorage)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 120
        self.ae.maximum_pdu_size = 0
        handlers = [(evt.EVT_C_STORE, self._on_store)]
        self.assoc = self.ae.associate(
            HOST, server.port, ae_title=server.aet, ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=handlers,
        )  # fmt: skip
        if not self.assoc.is_established:
            raise RuntimeError(f"{server.name}: the association was not accepted")
        sock = getattr(self.assoc.dul.socket, "socket", None)
        if sock is not None:  # else each query waits for a delayed ACK on loopback
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_store(self, event: Any) -> int:
        self.received += 1
        return 0x0000

    def find(self, ident: Dataset) -> tuple[int, int]:
        """(matches, final status) of a STUDY-level C-FIND."""
        matches, final = 0, -1
        for status, _ in self.assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind):
            if status is None or "Status" not in status:
                return matches, -2
            if status.Status in (0xFF00, 0xFF01):
                matches += 1
            else:
                final = int(status.Status)
        return matches, final

    def get(self, ref: SeriesRef) -> str | None:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = ref.study_uid
        ident.SeriesInstanceUID = ref.series_uid
        self.received = 0
        final = -1
        for status, _ in self.assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet):
            if status is None or "Status" not in status:
                return "C-GET: no response"
            if status.Status != 0xFF00:
                final = int(status.Status)
        if final != 0 or self.received != ref.count:
            return f"C-GET: status {final:#06x}, {self.received} of {ref.count} instances"
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.assoc.release()
        self.ae.shutdown()


@dataclass
class Query:
    dimse: Dataset | None  # a C-FIND identifier, or
    url: str = ""  # a QIDO-RS path with its query string
    expect: int | None = None  # matches, when known


def make_queries(n: int, series: list[SeriesRef], rng: np.random.Generator, studies: int) -> list[Query]:
    """``n`` queries, C-FIND and QIDO-RS alternately: a stored patient's studies, a patient nobody
    has (a new ID every time: a cache keyed by the query would grow), names by prefix, a date range,
    and QIDO-RS's series and instance lists of a stored study.  ``studies``: the --studies fill, whose
    first patients have the IDs of the series' patients (a second study each)."""
    out: list[Query] = []
    for i in range(n):
        k = int(rng.integers(len(series)))
        ref, studies_of_patient = series[k], 1 + (k < studies)
        kind = (i // 2) % 4
        if i % 2 == 0:
            ident = Dataset()
            ident.QueryRetrieveLevel = "STUDY"
            ident.StudyInstanceUID = ""
            ident.PatientName = ""
            ident.PatientID = ""
            ident.StudyDate = ""
            expect: int | None = None
            if kind == 0:
                ident.PatientID, expect = ref.patient_id, studies_of_patient
            elif kind == 1:
                ident.PatientID, expect = f"NOBODY{rng.integers(1 << 40):012d}", 0
            elif kind == 2:
                ident.PatientName = "Bench^Patient0000*"  # at most ten patients of a --studies fill, too
            else:
                ident.StudyDate, ident.PatientID = "20240301-20240331", "BENCH00000*"
            out.append(Query(ident, expect=expect))
        else:
            if kind == 0:
                url, expect = f"/studies?PatientID={ref.patient_id}", studies_of_patient
            elif kind == 1:
                url, expect = f"/studies?PatientID=NOBODY{rng.integers(1 << 40):012d}", 0
            elif kind == 2:
                url, expect = f"/studies/{ref.study_uid}/series", 1
            else:
                url, expect = f"/studies/{ref.study_uid}/series/{ref.series_uid}/instances?limit=100", None
            out.append(Query(None, url=url, expect=expect))
    return out


@dataclass
class Session:
    """What the workload holds per server: its DIMSE association and HTTP client, and its errors."""

    server: Receiver
    http: httpx.Client
    dimse: Dimse | None = None  # once the series are stored
    errors: list[str] = field(default_factory=list)
    reopened: int = 0  # associations the server closed while idle

    def association(self) -> Dimse:
        """The DIMSE association, opened again when the server closed it while idle (Orthanc closes
        an association after 30 s without a message, while SafePACS's block of queries runs)."""
        if self.dimse is None or not self.dimse.assoc.is_established:
            if self.dimse is not None:
                self.dimse.close()
                self.reopened += 1
            self.dimse = Dimse(self.server)
        return self.dimse

    def close(self) -> None:
        if self.dimse is not None:
            self.dimse.close()

    def error(self, text: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(text)

    def run(self, query: Query) -> None:
        try:
            if query.dimse is not None:
                matches, final = self.association().find(query.dimse)
                if final != 0 or (query.expect is not None and matches != query.expect):
                    self.error(f"C-FIND: status {final:#06x}, {matches} matches (expected {query.expect})")
                return
            response = self.http.get(query.url)
            if response.status_code == 204 and query.expect == 0:  # Orthanc: no content for no match
                return
            if response.status_code != 200:
                self.error(f"QIDO-RS {urllib.parse.urlsplit(query.url).path}: HTTP {response.status_code}")
            elif query.expect is not None and len(response.json()) != query.expect:
                self.error(f"QIDO-RS {query.url}: {len(response.json())} results, expected {query.expect}")
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            self.error(f"{type(exc).__name__}: {exc}")

    def wado(self, ref: SeriesRef) -> None:
        url = f"/studies/{ref.study_uid}/series/{ref.series_uid}"
        received = 0
        try:
            with self.http.stream("GET", url, headers={"Accept": WADO_ACCEPT}) as response:
                for chunk in response.iter_raw():
                    received += len(chunk)
                status = response.status_code
        except httpx.HTTPError as exc:
            self.error(f"WADO-RS: {type(exc).__name__}: {exc}")
            return
        if status != 200 or received < ref.nbytes - 128 * ref.count:
            self.error(f"WADO-RS: HTTP {status}, {received:,} bytes for {ref.nbytes:,} stored")


# ------------------------------------------------------------------------------------------- run


@dataclass
class Curve:
    points: list[str] = field(default_factory=list)
    ops: list[int] = field(default_factory=list)
    pss: dict[str, list[float]] = field(default_factory=dict)
    snapshots: dict[tuple[str, str], list[ProcessMemory]] = field(default_factory=dict)


def settle(server: Receiver) -> None:
    """Let the server finish what the last block started (a WAL sync, a worker's audit summary)."""
    server.wait_idle(timeout=10, window=0.3, busy=0.015)


def sample(curve: Curve, sessions: dict[str, Session], point: str, ops: int, *, keep: bool = False) -> None:
    curve.points.append(point)
    curve.ops.append(ops)
    for target, sess in sessions.items():
        settle(sess.server)
        procs = memory_of(sess.server, sess.server.roles())  # type: ignore[attr-defined]
        curve.pss.setdefault(target, []).append(sum(p.pss for p in procs))
        if keep:
            curve.snapshots[(target, point)] = procs
    line = ", ".join(f"{LABELS[t]} {curve.pss[t][-1]:,.1f} MB" for t in sessions)
    console.print(f"{point:>28}: {line}")


def run(args: argparse.Namespace, workdir: Path) -> tuple[Curve, dict[str, list[str]]]:
    series_corpus = make_corpus(
        workdir / f"corpus-ct-{args.series}x{args.instances}", "CT 512",
        count=args.series * args.instances, rows=512, cols=512, per_series=args.instances,
    )  # fmt: skip
    extra = (
        make_corpus(
            workdir / f"corpus-studies-{args.studies}",
            "studies",
            count=args.studies,
            rows=16,
            cols=16,
            per_series=1,
        )
        if args.studies
        else None
    )
    refs = series_of(series_corpus)
    queries = make_queries(args.queries, refs, np.random.default_rng(args.seed), args.studies)
    curve = Curve()
    errors: dict[str, list[str]] = {}
    safepacs_env = dict(kv.split("=", 1) for kv in args.safepacs_env)
    with contextlib.ExitStack() as stack:
        servers: dict[str, Receiver] = {}
        for target in args.targets:
            home = workdir / f"{target}-{os.getpid()}"
            home.mkdir()
            stack.callback(remove_tree, home)
            server: Receiver = (
                SafePacsServer(name=target, aet="SAFEPACS", workdir=home, env=safepacs_env)
                if target == "safepacs"
                else OrthancServer(name=target, aet="ORTHANC", workdir=home)
            )
            servers[target] = stack.enter_context(started(server))
        for server in servers.values():
            server.wait_idle()
        sessions: dict[str, Session] = {}
        for target, server in servers.items():
            http = stack.enter_context(server.client())  # type: ignore[attr-defined]
            deadline = time.monotonic() + 60
            while True:  # SafePACS's HTTPS process may still be starting
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/studies", params={"PatientID": "NOBODY"}).status_code in (200, 204):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{target} does not answer QIDO-RS:\n{server.log_tail()}")
                time.sleep(0.2)
            sessions[target] = Session(server, http)
        sample(curve, sessions, "fresh, at rest", 0, keep=True)
        for sess in sessions.values():
            for corpus in (c for c in (extra, series_corpus) if c is not None):
                problem = store(corpus, sess.server)
                if problem:
                    sess.error(f"store {corpus.name}: {problem}")
            stack.callback(sess.close)
            sess.association()
        stored = series_corpus.count + (extra.count if extra else 0)
        sample(curve, sessions, f"stored {stored:,} instances", 0, keep=True)
        done = 0
        order = list(sessions)
        for start in range(0, len(queries), args.sample_every):
            block = queries[start : start + args.sample_every]
            for target in order:
                for query in block:
                    sessions[target].run(query)
            order.reverse()  # neither server always runs right after the other's block
            done += len(block)
            sample(curve, sessions, f"{done:,} queries", done)
        for k, ref in enumerate(refs):
            for target in order:
                problem = sessions[target].association().get(ref)
                if problem:
                    sessions[target].error(problem)
            sample(curve, sessions, f"C-GET series {k + 1}", done)
            for target in order:
                sessions[target].wado(ref)
            sample(curve, sessions, f"WADO-RS series {k + 1}", done)
            order.reverse()
        time.sleep(args.rest)
        sample(curve, sessions, f"at rest {args.rest:.0f} s later", done, keep=True)
        for target, sess in sessions.items():
            errors[target] = sess.errors
            console.print(
                f"{LABELS[target]}: {sess.reopened} association(s) closed by the server while idle, reopened"
            )
    return curve, errors


# ---------------------------------------------------------------------------------------- report


def curve_rows(curve: Curve, targets: list[str], warm: int) -> list[list[str]]:
    rows = []
    for i, point in enumerate(curve.points):
        row = [point]
        for t in targets:
            value = curve.pss[t][i]
            base = curve.pss[t][warm]
            row += [f"{value:,.1f}", f"{(value / base - 1) * 100:+.1f}%" if i > warm else ""]
        rows.append(row)
    return rows


def process_rows(curve: Curve, targets: list[str]) -> list[list[str]]:
    rows = []
    for (target, point), procs in curve.snapshots.items():
        if target not in targets:
            continue
        for p in sorted(procs, key=lambda p: (p.role != "parent", p.role, p.pid)):
            rows.append([LABELS[target], point, p.role, f"{p.pss:,.1f}", f"{p.uss:,.1f}", f"{p.rss:,.1f}"])
        total = [sum(getattr(p, a) for p in procs) for a in ("pss", "uss", "rss")]
        rows.append([LABELS[target], point, f"all {len(procs)}", *(f"**{v:,.1f}**" for v in total)])
    return rows


def verdicts(curve: Curve, targets: list[str], warm: int) -> list[str]:
    """Flat: over the queries after the first block (the warm-up), and over the retrievals after the
    first series by both protocols (their own warm-up: first use of the C-GET and WADO-RS paths)."""
    lines = []
    last_query = max(i for i, p in enumerate(curve.points) if p.endswith(" queries"))
    first_retrieval = next((i for i, p in enumerate(curve.points) if p.startswith("WADO-RS")), last_query)
    for t in targets:
        v = curve.pss[t]
        queries = v[last_query] / v[warm] - 1
        retrievals = v[-2] / v[first_retrieval] - 1
        flat = "flat" if queries < FLAT and retrievals < FLAT else "NOT flat"
        lines.append(
            f"{LABELS[t]}: {v[0]:,.1f} MB fresh at rest, {v[warm]:,.1f} MB after {curve.points[warm]}; "
            f"queries {queries * 100:+.1f}% to {v[last_query]:,.1f} MB, retrievals after the first series "
            f"{retrievals * 100:+.1f}% to {v[-2]:,.1f} MB ({flat}, threshold {FLAT * 100:.0f}%); "
            f"{v[-1]:,.1f} MB at rest after the workload ({(v[-1] / v[warm] - 1) * 100:+.1f}% from warm-up)"
        )
    if "safepacs" in targets:
        rest = curve.pss["safepacs"]
        met = "met" if rest[0] <= TARGET_MB and rest[-1] <= TARGET_MB else "NOT met"
        lines.append(f"Target (SafePACS at rest <= {TARGET_MB:.0f} MB summed PSS, before and after): {met}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 series of 20 slices, 1,000 queries")
    p.add_argument("--series", type=int, default=5, help="series stored and retrieved (default 5)")
    p.add_argument("--instances", type=int, default=100, help="512x512 CT slices per series (default 100)")
    p.add_argument("--studies", type=int, default=0, help="more single-instance studies stored first")
    p.add_argument("--queries", type=int, default=10_000, help="C-FIND + QIDO-RS, half each (default 10,000)")
    p.add_argument("--sample-every", type=int, default=1000, help="queries between samples (default 1,000)")
    p.add_argument("--rest", type=float, default=5.0, help="seconds of rest before the last sample")
    p.add_argument("--targets", default="safepacs,orthanc", help="comma-separated: safepacs,orthanc")
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--workdir", type=Path, help="keep the corpora here (servers always start fresh)")
    p.add_argument("--safepacs-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.instances, args.queries, args.sample_every = 20, 1000, 200
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(LABELS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if "orthanc" in args.targets and not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        p.error(
            "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path("/proc/self/smaps_rollup").exists():
        raise SystemExit("needs Linux's /proc/PID/smaps_rollup")
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safepacs-memory-")) if own else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    try:
        tested = f"SafePACS{git_revision()}, {sys.version.split()[0]}"
        if "orthanc" in args.targets:
            tested += ", " + version_line([str(ORTHANC), "--version"]).replace(str(ORTHANC), "Orthanc")
        curve, errors = run(args, workdir)
    finally:
        if own:
            remove_tree(workdir)
    warm = curve.points.index(next(p for p in curve.points if p.endswith(" queries")))
    command = shlex.join(["python", "bench/memory.py", *(sys.argv[1:] if argv is None else argv)])
    context = (
        f"{dt.date.today().isoformat()}, {os.cpu_count()} CPUs ({platform.machine()}), load average"
        f" {load_before:.1f} before / {os.getloadavg()[0]:.1f} after, {tested}; `{command}`,"
        f" {(time.perf_counter() - began) / 60:.1f} min"
    )
    headers = ["point", *(h for t in args.targets for h in (f"{LABELS[t]} PSS MB", "vs warm-up"))]
    curve_title = "Summed PSS (MB) of each server's processes, after each block, once idle"
    proc_headers = ["server", "when", "process", "PSS MB", "USS MB", "RSS MB"]
    proc_title = "Per process"
    c_rows, p_rows = curve_rows(curve, args.targets, warm), process_rows(curve, args.targets)
    console.print()
    console.print(context, markup=False)
    console.print(rich_table(c_rows, curve_title, headers))
    console.print(rich_table(p_rows, proc_title, proc_headers))
    lines = verdicts(curve, args.targets, warm)
    for target, errs in errors.items():
        lines += [f"{LABELS[target]} ERROR: {e}" for e in errs]
    for line in lines:
        console.print(line, markup=False)
    if args.markdown:
        args.markdown.write_text(
            f"{context}\n\n{markdown_table(c_rows, curve_title, headers)}\n"
            f"{markdown_table(p_rows, proc_title, proc_headers)}\n"
            + "\n".join(f"- {x}" for x in lines)
            + "\n"
        )
    return 1 if any(errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
