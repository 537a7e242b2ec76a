"""``safepacs scan`` against real archives on loopback: Orthanc (open, as packaged, hardened), DCMTK dcmqrscp
with an ANY peer, SafePACS itself, and a whole /24 of loopback addresses.

Network rule: every target here is in 127.0.0.0/8.  The servers are started by the tests in temporary
directories and stopped by their own process ids.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from safepacs.cli.commands import scan as cli_scan
from safepacs.scan import DEFAULT_PORTS, SEVERITIES, ScanError, parse_ports, parse_target, read_targets_file
from safepacs.scan.report import FORMATS
from safepacs.scan.targets import expand
from tests.support.server import run_cli, start_server

ORTHANC = Path("/usr/sbin/Orthanc")
needs_orthanc = pytest.mark.skipif(
    not ORTHANC.exists(), reason="Orthanc not installed (apt-get install orthanc)"
)
needs_dcmqrscp = pytest.mark.skipif(
    shutil.which("dcmqrscp") is None or shutil.which("dcmqridx") is None,
    reason="DCMTK dcmqrscp/dcmqridx not on PATH (apt-get install dcmtk)",
)

STUDY_SIZES = (2, 3, 4)  # instances per study; one patient per study
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian orthanc-dicomweb
WORKLIST_PLUGIN = Path("/usr/share/orthanc/plugins/libModalityWorklists.so")
PLUGINS = (DICOMWEB_PLUGIN, WORKLIST_PLUGIN)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------- test data


@dataclass
class Corpus:
    files: list[Path]
    phi: list[str]  # every identifying value in the data: none may appear in any output


def _make_corpus(root: Path) -> Corpus:
    root.mkdir()
    files: list[Path] = []
    phi: list[str] = ["19471103", "20190817", "1947-11-03", "2019-08-17"]
    for s, count in enumerate(STUDY_SIZES):
        name, pid, acc = f"Quokkafield^Zebediah{s}", f"PHIPID{s}X7731", f"ACCPHI{s}Q9"
        study, series = generate_uid(), generate_uid()
        phi += [name, "Quokkafield", f"Zebediah{s}", pid, acc, study, series]
        for i in range(count):
            uid = generate_uid()
            phi.append(uid)
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
            ds.PatientName, ds.PatientID, ds.AccessionNumber = name, pid, acc
            ds.PatientBirthDate, ds.StudyDate, ds.SeriesDate = "19471103", "20190817", "20190817"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.Modality, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "OT", "1", 1, i + 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows = ds.Columns = 8
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit, ds.PixelRepresentation, ds.PixelData = 7, 0, bytes(64)
            path = root / f"{s}-{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return Corpus(files, phi)


def _worklist(folder: Path, corpus: Corpus) -> Path:
    """One Modality Worklist item (Orthanc's worklist plugin reads ``*.wl`` files) for a patient whose
    name, ID and dates join the values no output may contain."""
    folder.mkdir()
    name, pid = "Wombatson^Ottoline", "WLPID5521"
    corpus.phi += [name, "Wombatson", "Ottoline", pid, "19530214", "20240302"]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, "19530214"
    ds.AccessionNumber = "WLACC5521"
    step = Dataset()
    step.Modality, step.ScheduledStationAETitle = "CT", "CT1"
    step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime = "20240302", "0900"
    ds.ScheduledProcedureStepSequence = [step]
    ds.save_as(folder / "item.wl", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return _make_corpus(tmp_path_factory.mktemp("corpus") / "files")


# ----------------------------------------------------------------------------------------- peers we run


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    dicom_port: int
    http_port: int = 0

    def stop(self) -> None:
        """SIGTERM, and SIGKILL after a second (Orthanc takes 3 s to stop; its data is thrown away)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group we started (with any forked children)
        self.proc.wait()


@contextlib.contextmanager
def orthanc(
    workdir: Path, corpus: Corpus | None = None, auth: tuple[str, str] | None = None, **config: Any
) -> Iterator[Running]:
    """Orthanc (Debian package) in ``workdir``: its own index and storage, plugins off, loopback ports."""
    workdir.mkdir()
    dicom_port, http_port = _free_port(), _free_port()
    cfg = {
        "Name": "scan-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "Plugins": [],
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        **config,
    }
    (workdir / "orthanc.json").write_text(json.dumps(cfg))
    with (workdir / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(ORTHANC), str(workdir / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    running = Running(proc, dicom_port, http_port)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{http_port}/system", timeout=2)
                break
            assert proc.poll() is None and time.monotonic() < deadline, (workdir / "orthanc.log").read_text()
            time.sleep(0.1)
        if corpus is not None:
            for path in corpus.files:
                rsp = httpx.post(
                    f"http://127.0.0.1:{http_port}/instances",
                    content=path.read_bytes(),
                    auth=auth,
                    timeout=10,
                )
                assert rsp.status_code == 200, rsp.text
        yield running
    finally:
        running.stop()


def scan_json(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / f"report-{time.monotonic_ns()}.json"
    code = run_cli("scan", *args, "--format", "json", "--out", str(out), "--timeout", "5")
    return code, json.loads(out.read_text())


def findings(report: dict[str, Any], check: str | None = None) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if check is None or f["check"] == check]


def worst(report: dict[str, Any]) -> str | None:
    return report["summary"]["worst"]


def _no_probe_errors(report: dict[str, Any]) -> None:
    assert [(e["service"], e["error"]) for e in report["endpoints"] if e["error"]] == []


# ------------------------------------------------------------------------------------- parsing (no I/O)


def test_targets_ports_and_their_errors(tmp_path: Path) -> None:
    assert parse_target("10.0.0.5").network is not None
    assert parse_target("10.0.0.5:104").port == 104
    assert parse_target("[::1]:11112").port == 11112
    assert str(parse_target("::1").network) == "::1/128"
    assert parse_target("fd00::/126").network is not None
    assert parse_target("pacs.example.org:4242").hostname == "pacs.example.org"
    assert len(list(parse_target("127.0.1.0/24").addresses())) == 254
    assert parse_ports("104, 11112,8000-8002") == (104, 8000, 8001, 8002, 11112)
    for bad in ("300.1.2.3", "10.0.0.0/33", "host:0", "host:99999", "[::1", "a b", ""):
        with pytest.raises(ScanError):
            parse_target(bad)
    for bad in ("", "0", "9-3", "x"):
        with pytest.raises(ScanError):
            parse_ports(bad)
    listed = tmp_path / "targets.txt"
    listed.write_text("# our archives\n127.0.0.1:104\n\n127.0.1.0/30  # lab\n")
    pairs = expand(read_targets_file(listed), (104, 4242))
    assert [(host, port) for _, host, port in pairs] == [
        ("127.0.0.1", 104), ("127.0.1.1", 104), ("127.0.1.1", 4242), ("127.0.1.2", 104), ("127.0.1.2", 4242)
    ]  # fmt: skip
    listed.write_text("127.0.0.1\nnot a target\n")
    with pytest.raises(ScanError, match=r"targets.txt:2: "):
        read_targets_file(listed)
    with pytest.raises(ScanError, match="max-addresses"):
        expand([parse_target("10.0.0.0/8")], (104,))
    # The CLI keeps copies so that building its parser does not import the scanner.
    assert (cli_scan.FORMATS, cli_scan.SEVERITIES, cli_scan.DEFAULT_PORTS) == (
        FORMATS,
        SEVERITIES,
        DEFAULT_PORTS,
    )


def test_usage_errors_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for args in (
        ("300.1.2.3",),
        ("127.0.0.1", "--ports", "0"),
        (),
        ("10.0.0.0/8",),
        ("127.0.0.1", "--called-ae", "A\\B"),
        ("--targets-file", str(tmp_path / "missing.txt")),
        (
            "127.0.0.1",
            "--ports",
            "9",
            "--out",
            str(tmp_path / "no" / "such" / "dir.json"),
            "--format",
            "json",
        ),
    ):
        assert run_cli("scan", *args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("safepacs: ") and "\n" not in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exc:
        run_cli("scan", "127.0.0.1", "--fail-on", "severe")
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------- Orthanc


@needs_orthanc
def test_orthanc_open_to_any_ae_is_critical_with_counts_and_leaks_no_phi(
    tmp_path: Path, corpus: Corpus, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    worklists = _worklist(tmp_path / "worklists", corpus)
    open_config: dict[str, Any] = {
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowFindWorklist": True,
        "Plugins": [str(p) for p in PLUGINS if p.exists()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "Worklists": {"Enable": True, "Database": str(worklists)},
    }
    with orthanc(tmp_path / "orthanc", corpus, **open_config) as o:
        ports = f"{o.dicom_port},{o.http_port}"
        code, report = scan_json(tmp_path, "127.0.0.1", "--ports", ports)
        outputs = [json.dumps(report)]
        for fmt in ("sarif", "html", "text"):
            out = tmp_path / f"report.{fmt}"
            assert run_cli("scan", "127.0.0.1", "--ports", ports, "--format", fmt, "--out", str(out)) == 1
            outputs.append(out.read_text())
        assert run_cli("scan", "127.0.0.1", "--ports", ports) == 1  # the table on stdout
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err, caplog.text]

    assert code == 1
    _no_probe_errors(report)
    assert worst(report) == "critical"
    products = {e["port"]: e["product"] for e in report["endpoints"]}
    assert products == {o.dicom_port: "Orthanc", o.http_port: "Orthanc"}
    (find,) = findings(report, "dicom.find-open")
    assert find["severity"] == "critical"
    assert find["evidence"]["studies"] == len(STUDY_SIZES)
    assert find["evidence"]["images"] == sum(STUDY_SIZES)
    assert find["evidence"]["patients"] == len(STUDY_SIZES)
    assert "DicomAlwaysAllowFind" in find["remediation"]
    (get,) = findings(report, "dicom.get-open")
    assert get["severity"] == "critical" and "DicomAlwaysAllowGet" in get["remediation"]
    (rest,) = findings(report, "http.orthanc-rest-open")
    assert rest["severity"] == "critical" and rest["evidence"]["instances"] == sum(STUDY_SIZES)
    assert "AuthenticationEnabled" in rest["remediation"]
    assert findings(report, "dicom.associate-open")[0]["severity"] == "high"
    if DICOMWEB_PLUGIN.exists():
        (qido,) = findings(report, "http.dicomweb-open")
        assert qido["severity"] == "critical" and qido["evidence"]["root"] == "/dicom-web"
        assert (qido["evidence"]["studies"], qido["evidence"]["images"]) == (
            len(STUDY_SIZES),
            sum(STUDY_SIZES),
        )
        assert qido["evidence"]["wado_rs"] == "open"
    if WORKLIST_PLUGIN.exists():
        (worklist,) = findings(report, "dicom.worklist-open")
        assert worklist["severity"] == "critical" and worklist["evidence"]["worklist_items"] == 1

    sarif = json.loads(outputs[1])
    assert sarif["version"] == "2.1.0" and sarif["runs"][0]["results"]
    assert {r["level"] for r in sarif["runs"][0]["results"]} >= {"error"}
    assert "<table>" in outputs[2] and "<script" not in outputs[2]
    assert "critical" in outputs[3] and "Orthanc" in outputs[3]
    for text in outputs:
        lowered = text.lower()
        leaked = [v for v in corpus.phi if v.lower() in lowered]
        assert not leaked, f"patient data in the output: {leaked[:3]}"


@needs_orthanc
def test_orthanc_as_packaged_lets_anyone_echo_and_store(tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc") as o:
        code, report = scan_json(tmp_path, f"127.0.0.1:{o.dicom_port}")
        stored_code, stored = scan_json(tmp_path, f"127.0.0.1:{o.dicom_port}", "--intrusive")
        instances = httpx.get(f"http://127.0.0.1:{o.http_port}/statistics", timeout=5).json()[
            "CountInstances"
        ]
    assert code == 1
    _no_probe_errors(report)
    assert worst(report) == "high"
    assert {f["check"] for f in findings(report) if f["severity"] == "high"} == {
        "dicom.associate-open",
        "dicom.store-open",
    }
    assert "DicomAlwaysAllowStore" in findings(report, "dicom.store-open")[0]["remediation"]
    assert findings(report, "dicom.find-open") == []  # refused: DicomAlwaysAllowFind is off by default
    assert stored_code == 1 and findings(stored, "dicom.store-open")[0]["evidence"] == {"stored": True}
    assert instances == 1  # the synthetic test object, and nothing else


@needs_orthanc
def test_orthanc_hardened_shows_nothing_above_low(tmp_path: Path) -> None:
    hardened = {
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomModalities": {"viewer": ["VIEWER", "127.0.0.1", 104]},
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"admin": "a-long-random-password"},
    }
    with orthanc(tmp_path / "hardened", **hardened) as o:
        code, report = scan_json(
            tmp_path, "127.0.0.1", "--ports", f"{o.dicom_port},{o.http_port}", "--try-default-credentials"
        )
    with orthanc(tmp_path / "default-login", **{**hardened, "RegisteredUsers": {"orthanc": "orthanc"}}) as o:
        weak_code, weak = scan_json(tmp_path, f"127.0.0.1:{o.http_port}", "--try-default-credentials")
    assert code == 0
    _no_probe_errors(report)
    assert worst(report) == "low"
    (access,) = findings(report, "dicom.access-control")
    assert "calling AE title is checked" in access["detail"]
    assert {e["product"] for e in report["endpoints"] if e["service"] == "http"} == {"Orthanc"}
    assert weak_code == 1
    (login,) = findings(weak, "http.default-credentials")
    assert login["severity"] == "high"  # no studies stored: the login works, nothing to list yet
    assert "RegisteredUsers" in login["remediation"]


# ----------------------------------------------------------------------------------------------- DCMTK


@needs_dcmqrscp
def test_dcmqrscp_with_an_any_peer_is_critical(tmp_path: Path, corpus: Corpus) -> None:
    db = tmp_path / "db"
    db.mkdir()
    subprocess.run(["dcmqridx", str(db), *map(str, corpus.files)], check=True, capture_output=True)
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(
        "NetworkTCPPort = 104\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nANY-SCP {db} RW (100, 1024mb) ANY\nAETable END\n"
    )
    port = _free_port()
    proc = subprocess.Popen(
        ["dcmqrscp", "-c", str(config), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    running = Running(proc, port)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        code, report = scan_json(tmp_path, f"127.0.0.1:{port}")
    finally:
        running.stop()
    assert code == 1
    _no_probe_errors(report)
    (endpoint,) = report["endpoints"]
    assert endpoint["product"] == "DCMTK" and endpoint["service"] == "dicom"
    (find,) = findings(report, "dicom.find-open")
    assert find["severity"] == "critical"
    assert (find["evidence"]["studies"], find["evidence"]["images"]) == (len(STUDY_SIZES), sum(STUDY_SIZES))
    assert "AETable" in find["remediation"]
    assert findings(report, "dicom.move-open")[0]["severity"] == "critical"  # retrieval by a stranger


# -------------------------------------------------------------------------------------------- SafePACS


def test_safepacs_default_has_no_high_finding(data_dir: Path, tmp_path: Path) -> None:
    # pynetdicom keeps a connection that closed without a PDU (our TCP connect) until its ARTIM timer
    # expires: a short shutdown grace only keeps the test from waiting for it.
    server = start_server(data_dir, env={"SAFEPACS_SERVER__SHUTDOWN_GRACE": "0.5"})
    try:
        code, report = scan_json(tmp_path, "127.0.0.1", "--ports", f"{server.port},{server.https_port}")
        guessed_code, guessed = scan_json(tmp_path, f"127.0.0.1:{server.port}", "--guess-ae")
    finally:
        server.stop()
    assert code == 0
    _no_probe_errors(report)
    assert worst(report) in ("low", "info")
    services = {e["port"]: (e["service"], e["product"]) for e in report["endpoints"]}
    assert services == {server.port: ("dicom", ""), server.https_port: ("https", "SafePACS")}
    (access,) = findings(report, "dicom.access-control")
    assert "called AE title is checked" in access["detail"]
    # With --guess-ae the built-in list finds SAFEPACS; the random calling AE title is still refused.
    assert guessed_code == 0
    (access,) = findings(guessed, "dicom.access-control")
    assert "'SAFEPACS' is right" in access["detail"] and "calling AE title is checked" in access["detail"]


@needs_orthanc
def test_the_ae_title_orthanc_gives_away_is_tried(tmp_path: Path) -> None:
    # No common called AE title works, but the open REST API names the right one (/system DicomAet).
    with orthanc(tmp_path / "orthanc", DicomAet="RADIOLOGY7", DicomCheckCalledAet=True) as o:
        code, report = scan_json(tmp_path, "127.0.0.1", "--ports", f"{o.dicom_port},{o.http_port}")
    assert code == 1
    (assoc,) = findings(report, "dicom.associate-open")
    assert assoc["evidence"]["called_ae"] == "RADIOLOGY7"
    (endpoint,) = [e for e in report["endpoints"] if e["port"] == o.dicom_port]
    assert endpoint["facts"]["called_ae_titles_tried"] == 6 and endpoint["product"] == "Orthanc"


def test_ipv6_loopback(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = _free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    ae = AE(ae_title="V6SCP")
    ae.acse_timeout = 2
    ae.add_supported_context(Verification)
    scp = ae.start_server(("::1", port), block=False)
    try:
        code, report = scan_json(tmp_path, f"[::1]:{port}")
    finally:
        scp.shutdown()
    assert code == 1
    (endpoint,) = report["endpoints"]
    assert (endpoint["address"], endpoint["service"], endpoint["product"]) == ("::1", "dicom", "pynetdicom")
    assert findings(report, "dicom.associate-open")[0]["target"] == f"[::1]:{port}"


# ------------------------------------------------------------------------------------------- DICOM TLS


def _expired_self_signed(directory: Path) -> tuple[Path, Path]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scan test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_dicom_tls_weaknesses_and_a_plain_port_beside_it(tmp_path: Path) -> None:
    import ssl
    import warnings

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*_expired_self_signed(tmp_path))
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # everything, anonymous suites included
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    host = "127.0.2.9"
    tls_port, plain_port = _free_port(host), _free_port(host)
    ae = AE(ae_title="TLSSCP")
    ae.acse_timeout = 2
    ae.add_supported_context(Verification)
    servers = [
        ae.start_server((host, tls_port), block=False, ssl_context=ctx),
        ae.start_server((host, plain_port), block=False),
    ]
    try:
        code, report = scan_json(tmp_path, host, "--ports", f"{tls_port},{plain_port}")
    finally:
        for server in servers:
            server.shutdown()
    assert code == 1
    _no_probe_errors(report)
    services = {e["port"]: (e["service"], e["product"]) for e in report["endpoints"]}
    assert services == {tls_port: ("dicom-tls", "pynetdicom"), plain_port: ("dicom", "pynetdicom")}
    by_target: dict[tuple[str, str], str] = {(f["target"].rsplit(":", 1)[1], f["check"]): f["severity"]
                                              for f in report["findings"]}  # fmt: skip
    tls, plain = str(tls_port), str(plain_port)
    assert by_target[(tls, "tls.certificate")] == "high"
    assert "expired" in findings(report, "tls.certificate")[0]["title"]
    assert by_target[(tls, "tls.old-version")] == "high"
    assert by_target[(tls, "tls.weak-cipher")] == "high"  # anonymous ECDH suites
    assert by_target[(tls, "tls.no-client-cert")] == "low"  # low: loopback
    assert (tls, "dicom.no-tls") not in by_target
    assert by_target[(plain, "tls.plain-beside-tls")] == "low"
    assert by_target[(plain, "dicom.no-tls")] == "low"


# --------------------------------------------------------------------------------------- a loopback /24


def test_a_loopback_slash_24_is_scanned_quickly_and_associations_are_released(tmp_path: Path) -> None:
    host = "127.0.1.77"
    port, other = _free_port(host), _free_port(host)
    events: dict[str, int] = {"accepted": 0, "released": 0, "aborted": 0}

    def count(name: str) -> Any:
        def handler(_event: Any) -> None:
            events[name] += 1

        return handler

    ae = AE(ae_title="LOOPBACK")
    ae.acse_timeout = 2  # frees the connections that never sent a PDU
    ae.add_supported_context(Verification)
    handlers = [
        (evt.EVT_ACCEPTED, count("accepted")),
        (evt.EVT_RELEASED, count("released")),
        (evt.EVT_ABORTED, count("aborted")),
    ]
    scp = ae.start_server((host, port), block=False, evt_handlers=handlers)
    try:
        started = time.monotonic()
        code, report = scan_json(tmp_path, "127.0.1.0/24", "--ports", f"{port},{other}")
        elapsed = time.monotonic() - started
        # Connections that sent no A-ASSOCIATE-RQ (the TCP connect, an HTTP request) wait for pynetdicom's
        # ARTIM timer; no association may still be established.
        deadline = time.monotonic() + 5
        while any(a.is_established for a in scp.active_associations) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(a.is_established for a in scp.active_associations)
    finally:
        scp.shutdown()
    assert elapsed < 20, elapsed
    assert report["summary"]["addresses"] == 254 and report["summary"]["probes"] == 508
    (endpoint,) = report["endpoints"]
    assert (endpoint["address"], endpoint["port"], endpoint["product"]) == (host, port, "pynetdicom")
    assert code == 1 and findings(report, "dicom.associate-open")[0]["target"] == f"{host}:{port}"
    assert events["accepted"] >= 2 and events["released"] == events["accepted"] and events["aborted"] == 0


# ------------------------------------------------------------------------ peers that stall or dribble


class _Dribbler:
    """A loopback server that starts an answer at once and then sends one byte every ``pace`` seconds
    for up to ``limit`` seconds: a DICOM one (an A-ASSOCIATE-AC header claiming 64 KB) or an HTTP one
    (a 200 claiming 32 MB).  Requests of the other protocol get the connection closed."""

    def __init__(self, kind: str, pace: float = 0.2, limit: float = 30.0) -> None:
        import threading

        self.kind, self.pace, self.limit = kind, pace, limit
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._one, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            try:
                first = conn.recv(4096)
            except OSError:
                return
            if self.kind == "dicom" and first[:1] == b"\x01":
                conn.sendall(b"\x02\x00\x00\x00\xff\xff")
            elif self.kind == "http" and first[:4] in (b"HEAD", b"GET "):
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 33554432\r\n\r\n"
                )
                if first.startswith(b"HEAD"):
                    return
            elif self.kind == "http-headers" and first[:4] in (b"HEAD", b"GET "):
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")  # then one byte of header after the other
                if first.startswith(b"HEAD"):
                    return
            else:
                return
            ends = time.monotonic() + self.limit
            while not self.stop.wait(self.pace) and time.monotonic() < ends:
                try:
                    conn.sendall(b"a" if self.kind == "http-headers" else b"\0")
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for thread in self.threads:
            thread.join(5)


def test_a_peer_that_dribbles_its_answer_is_a_probe_error_not_a_hang(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dicom, http, headers = _Dribbler("dicom"), _Dribbler("http"), _Dribbler("http-headers")
    ports = f"{dicom.port},{http.port},{headers.port}"
    try:
        started = time.monotonic()
        out = tmp_path / "dribble.json"
        code = run_cli(
            "scan", "127.0.0.1", "--ports", ports, "--timeout", "1", "--format", "json", "--out", str(out)
        )
        elapsed = time.monotonic() - started
        report = json.loads(out.read_text())
        sarif_out = tmp_path / "dribble.sarif"
        run_cli(
            "scan",
            "127.0.0.1",
            "--ports",
            ports,
            "--timeout",
            "1",
            "--format",
            "sarif",
            "--out",
            str(sarif_out),
        )
        assert "not scanned completely: 127.0.0.1:" in capsys.readouterr().err
        assert run_cli("scan", "127.0.0.1", "--ports", ports, "--timeout", "1", "--fail-on", "none") == 2
        table = capsys.readouterr().out
    finally:
        dicom.close()
        http.close()
        headers.close()
    # Without one deadline per step, each byte restarts the timeout: 30 s of dribbling per probe.
    assert elapsed < 15, elapsed
    assert code == 2  # nothing at or above high was found, but three probes failed
    errors = {e["port"]: e["error"] for e in report["endpoints"]}
    assert set(errors) == {dicom.port, http.port, headers.port}
    assert all("timed out" in text for text in errors.values()), errors
    assert report["summary"]["errors"] == 3
    assert "probe error" in table and f"127.0.0.1:{dicom.port}" in table
    (invocation,) = json.loads(sarif_out.read_text())["runs"][0]["invocations"]
    assert invocation["executionSuccessful"] is False
    assert len(invocation["toolExecutionNotifications"]) == 3


def test_a_closed_port_is_not_a_runtime_error(tmp_path: Path) -> None:
    code, report = scan_json(tmp_path, f"127.0.0.1:{_free_port()}")
    assert code == 0 and report["endpoints"] == [] and report["errors"] == []
    assert report["summary"]["errors"] == 0


def test_a_find_that_stalls_partway_is_still_critical_and_caps_read_at_least(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from pynetdicom.sop_class import (
        ModalityWorklistInformationFind,
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelMove,
    )

    phi = ["Stallwood^Persephone", "Stallwood", "Persephone", "STALLPID77", "19610405"]
    uids = [generate_uid() for _ in range(5)]

    def match(i: int) -> Dataset:
        ds = Dataset()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = phi[0], phi[3], phi[4]
        ds.StudyInstanceUID = uids[i]
        return ds

    stall = {"studies": 2, "patients": 1}  # matches sent before stopping partway (cleared: no stall)

    def on_find(event: Any) -> Any:
        model = event.request.AffectedSOPClassUID
        level = {
            StudyRootQueryRetrieveInformationModelFind: "studies",
            PatientRootQueryRetrieveInformationModelFind: "patients",
        }.get(model, "")
        if level in stall:
            for i in range(stall[level]):
                yield 0xFF00, match(i)
            time.sleep(2.5)  # past the scanner's DIMSE timeout: the answer stops partway
            return
        for i in range(5):  # more than --find-cap
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, match(i)
        yield 0x0000, None

    def on_get(event: Any) -> Any:
        yield 0  # no sub-operations: the patient asked for does not exist
        yield 0x0000, None

    def on_move(event: Any) -> Any:
        time.sleep(2.5)  # no answer within the scanner's timeout
        yield None, None

    port = _free_port()
    ae = AE(ae_title="STALLSCP")
    ae.acse_timeout = 2
    for uid in (
        Verification,
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelFind,
        ModalityWorklistInformationFind,
    ):
        ae.add_supported_context(uid)
    ae.add_supported_context(PatientRootQueryRetrieveInformationModelGet)  # Patient Root only
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    handlers = [(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get), (evt.EVT_C_MOVE, on_move)]
    scp = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        out = tmp_path / "stall.json"
        args = ("scan", f"127.0.0.1:{port}", "--timeout", "1", "--find-cap", "3")
        code = run_cli(*args, "--format", "json", "--out", str(out))
        assert run_cli(*args) == 1  # the table on stdout
        report = json.loads(out.read_text())
        outputs = [out.read_text()]
        stall.clear()
        capped_code, capped = scan_json(tmp_path, *args[1:])
        outputs.append(json.dumps(capped))
    finally:
        scp.shutdown()
    outputs += [*capsys.readouterr(), caplog.text]
    # Both C-FINDs stopped partway: what arrived before is a stranger listing patient data.
    assert code == 1
    (find,) = findings(report, "dicom.find-open")
    assert find["severity"] == "critical"
    assert find["evidence"]["studies"] == 2 and find["evidence"]["patients"] == 1
    assert find["evidence"]["incomplete"] is True
    assert "at least 2 studies" in find["detail"] and "at least 1 patients" in find["detail"]
    (worklist,) = findings(report, "dicom.worklist-open")
    assert "at least 3 scheduled steps" in worklist["detail"]  # capped by --find-cap 3
    (get,) = findings(report, "dicom.get-open")
    assert get["severity"] == "critical"  # through the Patient Root model, the only one offered
    (move,) = findings(report, "dicom.move-open")
    assert move["severity"] == "medium" and move["evidence"] == {"move": "unknown"}  # not "refused"
    # No stall, five of everything: counts that hit the cap read "at least".
    assert capped_code == 1
    (find,) = findings(capped, "dicom.find-open")
    assert find["evidence"]["incomplete"] is False and find["evidence"]["patients_capped"] is True
    assert "at least 3 studies" in find["detail"] and "at least 3 patients" in find["detail"]
    for text in outputs:
        leaked = [v for v in [*phi, *uids] if v.lower() in text.lower()]
        assert not leaked, f"patient data in the output: {leaked[:3]}"


def test_severities_of_retrieval_and_plain_dicom() -> None:
    from safepacs.scan._dicom import DicomResult
    from safepacs.scan._findings import dicom_findings, http_findings
    from safepacs.scan._http import HttpResult
    from safepacs.scan._model import Endpoint
    from safepacs.scan._wire import DicomAnswer

    def severity(found: list[Any], check: str) -> str:
        (only,) = [f for f in found if f.check == check]
        return str(only.severity.label)

    ep = Endpoint("192.0.2.10", 104, service="dicom")
    refused = DicomResult(attempts=[("ANY-SCP", DicomAnswer(3, 1, 1, 3))])
    # A port that refuses strangers still serves patient data to its peers: in clear, off loopback.
    assert severity(dicom_findings(ep, refused, loopback=False, intrusive=False), "dicom.no-tls") == "high"
    assert severity(dicom_findings(ep, refused, loopback=True, intrusive=False), "dicom.no-tls") == "info"
    # Retrieval a stranger may ask for is critical, whether anything was listed or not.
    retrieve = DicomResult(attempts=[], accepted_called="ANY-SCP", get="processed", move="processed")
    found = dicom_findings(ep, retrieve, loopback=True, intrusive=False)
    assert (
        severity(found, "dicom.get-open") == "critical" and severity(found, "dicom.move-open") == "critical"
    )
    web = Endpoint("192.0.2.10", 8080, service="http")
    wado = HttpResult("http", answered=True, wado_uri="open", wado_uri_path="/wado")
    assert severity(http_findings(web, wado, loopback=False), "http.wado-uri-open") == "critical"
    # A plain-HTTP service that asks for a login on every path: the credentials travel in clear.
    guarded = HttpResult("http", answered=True, login_everywhere=True)
    assert severity(http_findings(web, guarded, loopback=False), "http.plain") == "high"
    assert (
        severity(http_findings(web, HttpResult("http", answered=True), loopback=False), "http.plain") == "low"
    )


def test_a_plain_http_service_that_asks_everyone_to_log_in_is_recognised(tmp_path: Path) -> None:
    import http.server
    import threading

    class Guarded(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Guarded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _, report = scan_json(tmp_path, f"127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    (plain,) = findings(report, "http.plain")
    assert plain["title"] == "Login-protected service over plain HTTP"  # low here only: loopback


def test_the_ae_title_a_server_echoes_is_tried_on_its_other_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that puts its own title in the A-ASSOCIATE-AC (pynetdicom echoes the called AE title it
    # was asked for; some archives answer with their own): one of its ports accepts any called AE title,
    # the other only its own, which no common title matches.
    from pynetdicom.pdu import A_ASSOCIATE_AC

    original = A_ASSOCIATE_AC.from_primitive

    def own_title(self: Any, primitive: Any) -> None:
        original(self, primitive)
        self.reserved_aet = "HIDDEN7"

    monkeypatch.setattr(A_ASSOCIATE_AC, "from_primitive", own_title)
    host = "127.0.3.7"
    open_port, strict_port = _free_port(host), _free_port(host)
    servers = []
    for port, strict in ((open_port, False), (strict_port, True)):
        ae = AE(ae_title="HIDDEN7")
        ae.acse_timeout = 2
        ae.require_called_aet = strict
        ae.add_supported_context(Verification)
        servers.append(ae.start_server((host, port), block=False))
    try:
        code, report = scan_json(tmp_path, host, "--ports", f"{open_port},{strict_port}")
    finally:
        for server in servers:
            server.shutdown()
    assert code == 1
    _no_probe_errors(report)
    accepted = {f["target"]: f["evidence"]["called_ae"] for f in findings(report, "dicom.associate-open")}
    assert accepted == {f"{host}:{open_port}": "ANY-SCP", f"{host}:{strict_port}": "HIDDEN7"}


def test_a_bogus_user_identity_that_opens_the_door_is_followed_through(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An SCP that rejects (rejected-permanent) every association without User Identity but accepts any
    # username and passcode, and then answers C-FIND and C-GET for anyone: a stranger lists patient data.
    from pynetdicom.acse import ACSE
    from pynetdicom.sop_class import (
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    )

    caplog.set_level("INFO")
    phi = ["Idworth^Cornelius", "Idworth", "Cornelius", "IDPID4471", "19580922"]
    uids = [generate_uid() for _ in range(2)]
    users: list[bytes] = []
    ae = AE(ae_title="IDSCP")
    ae.acse_timeout = 2
    original = ACSE._negotiate_as_acceptor

    def identity_required(self: Any) -> None:
        if self.assoc.ae is ae and self.requestor.user_identity is None:
            self.send_reject(0x01, 0x01, 0x01)  # rejected-permanent, service-user, no reason given
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        original(self)

    monkeypatch.setattr(ACSE, "_negotiate_as_acceptor", identity_required)

    def on_user_id(event: Any) -> tuple[bool, None]:
        users.append(event.primary_field)
        return True, None  # any username and passcode will do

    def on_find(event: Any) -> Any:
        for uid in uids:
            ds = Dataset()
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = phi[0], phi[3], phi[4]
            ds.StudyInstanceUID, ds.NumberOfStudyRelatedInstances = uid, 3
            yield 0xFF00, ds
        yield 0x0000, None

    def on_get(event: Any) -> Any:
        yield 0  # nothing matches the study asked for
        yield 0x0000, None

    for uid in (
        Verification,
        StudyRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    ):
        ae.add_supported_context(uid)
    port = _free_port()
    handlers = [(evt.EVT_USER_ID, on_user_id), (evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)]
    scp = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        code, report = scan_json(tmp_path, f"127.0.0.1:{port}")
        assert run_cli("scan", f"127.0.0.1:{port}", "--timeout", "5") == 1  # the table on stdout
    finally:
        scp.shutdown()
    assert code == 1
    _no_probe_errors(report)
    assert users and set(users) == {b"safepacs-scan"}
    assert worst(report) == "critical"
    (identity,) = findings(report, "dicom.identity-not-enforced")
    assert identity["severity"] == "high"
    assert findings(report, "dicom.associate-open") == []  # without the identity nobody gets in
    (find,) = findings(report, "dicom.find-open")
    assert find["severity"] == "critical" and "made-up username" in find["detail"]
    assert (find["evidence"]["studies"], find["evidence"]["images"]) == (2, 6)
    assert find["evidence"]["patients"] == 2
    (get,) = findings(report, "dicom.get-open")
    assert get["severity"] == "critical"
    outputs = [json.dumps(report), *capsys.readouterr(), caplog.text]
    for text in outputs:
        leaked = [v for v in [*phi, *uids] if v.lower() in text.lower()]
        assert not leaked, f"patient data in the output: {leaked[:3]}"


def test_mutual_tls_servers_still_get_their_certificate_version_and_cipher_checks(tmp_path: Path) -> None:
    # DICOM TLS archives that require a client certificate (the scanner has none), TLS 1.2 at most: every
    # handshake fails after the server's ServerHello, Certificate and CertificateRequest.  One still
    # accepts TLS 1.0 and 1.1 (and weak suites), the other refuses them with a protocol_version alert.
    import ssl
    import warnings

    cert, key = _expired_self_signed(tmp_path)

    def mutual(minimum: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(cert))
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # certificate-authenticated suites only, SHA-1 CBC ones too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = minimum
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    host = "127.0.2.10"
    old_port, strict_port = _free_port(host), _free_port(host)
    accepted: list[Any] = []
    ae = AE(ae_title="MTLSSCP")
    ae.acse_timeout = 2
    ae.add_supported_context(Verification)
    handlers = [(evt.EVT_ACCEPTED, lambda event: accepted.append(event))]
    servers = [
        ae.start_server((host, port), block=False, ssl_context=mutual(minimum), evt_handlers=handlers)
        for port, minimum in ((old_port, ssl.TLSVersion.TLSv1), (strict_port, ssl.TLSVersion.TLSv1_2))
    ]
    try:
        code, report = scan_json(tmp_path, host, "--ports", f"{old_port},{strict_port}")
    finally:
        for server in servers:
            server.shutdown()
    assert accepted == []  # no association without a client certificate
    assert code == 1
    _no_probe_errors(report)
    endpoints = {e["port"]: e for e in report["endpoints"]}
    assert {port: e["service"] for port, e in endpoints.items()} == {old_port: "tls", strict_port: "tls"}
    for port in (old_port, strict_port):
        facts = endpoints[port]["facts"]
        assert facts["tls_version"] == "TLSv1.2" and facts["tls_client_certificate_required"] is True
        assert facts["certificate_days_left"] < 0
    by_target: dict[tuple[int, str], dict[str, Any]] = {
        (int(f["target"].rsplit(":", 1)[1]), f["check"]): f for f in report["findings"]
    }
    for port in (old_port, strict_port):
        certificate = by_target[(port, "tls.certificate")]
        assert certificate["severity"] == "high" and "expired" in certificate["title"]
        assert "requires a client certificate" in by_target[(port, "port.unknown")]["detail"]
    old = by_target[(old_port, "tls.old-version")]
    assert old["severity"] == "high" and old["evidence"]["versions"] == "TLS 1.0, TLS 1.1"
    assert by_target[(old_port, "tls.weak-cipher")]["severity"] == "medium"  # e.g. static RSA, SHA-1 CBC
    assert (strict_port, "tls.old-version") not in by_target  # refused: protocol_version alert
