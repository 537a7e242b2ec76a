"""Scan benchmark: ``safepacs scan`` over a /24 of loopback addresses x the default ports, with a few live
targets among them, and nmap's ``dicom-ping`` over the same targets in the same run.

    .venv/bin/python bench/scan.py                 # 127.0.1.0/24, 1 run
    .venv/bin/python bench/scan.py --runs 3        # median of 3

Live targets, each bound to one address of 127.0.1.0/24 only (nothing else is scanned, nothing leaves
loopback): an open pynetdicom Verification SCP (any AE), a pynetdicom SCP over TLS with a self-signed
certificate, and ``safepacs serve`` (init'ed in a temp dir) with its DICOM and HTTPS listeners.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from _common import REPO, SAFEPACS, git_revision, version_line
from pynetdicom import AE
from pynetdicom.sop_class import Verification

NETWORK = "127.0.1.0/24"
OPEN_SCP = ("127.0.1.10", 11112)
TLS_SCP = ("127.0.1.30", 2762)
SAFEPACS_HOST = "127.0.1.20"
DEFAULT_PORTS = "80,104,443,2761,2762,4242,8042,8080,8443,11112"


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as safepacs serve binds
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@contextmanager
def pynetdicom_scp(host: str, port: int, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    ae = AE(ae_title="BENCHSCP")
    ae.acse_timeout = 5
    ae.add_supported_context(Verification)
    server = ae.start_server((host, port), block=False, ssl_context=tls)
    try:
        yield f"{host}:{port} pynetdicom{' TLS' if tls else ''} (any AE)"
    finally:
        server.shutdown()


def _self_signed(workdir: Path) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256())
    )  # fmt: skip
    (workdir / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (workdir / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(workdir / "cert.pem", workdir / "key.pem")
    return ctx


@contextmanager
def safepacs_server(workdir: Path) -> Iterator[str]:
    data = workdir / "safepacs-data"
    subprocess.run([str(SAFEPACS), "init", "--data", str(data)], capture_output=True, check=True)
    dicom = 11112 if _bindable(SAFEPACS_HOST, 11112) else 0
    https = 8443 if _bindable(SAFEPACS_HOST, 8443) else 0
    argv = [str(SAFEPACS), "serve", "--data", str(data), "--bind", SAFEPACS_HOST,
            "--dicom-port", str(dicom), "--http-port", str(https)]  # fmt: skip
    env = {**os.environ, "SAFEPACS_SERVER__SHUTDOWN_GRACE": "1"}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        if "listening for DICOM" not in first:
            raise RuntimeError(f"safepacs serve did not start: {first!r}")
        ports = [line.strip().rsplit(":", 1)[1].split(" ")[0] for line in (first, second)]
        yield f"{SAFEPACS_HOST}:{ports[0]},{ports[1]} SafePACS (defaults)"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def run_safepacs_scan(workdir: Path, *extra: str) -> tuple[float, dict[str, Any]]:
    out = workdir / f"scan-{time.monotonic_ns()}.json"
    argv = [
        str(SAFEPACS),
        "scan",
        NETWORK,
        "--format",
        "json",
        "--out",
        str(out),
        "--fail-on",
        "none",
        *extra,
    ]
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"safepacs scan failed ({done.returncode}): {done.stderr[-500:]}")
    return elapsed, json.loads(out.read_text())


def run_nmap() -> tuple[float, int, int] | None:
    """(wall seconds, open ports, dicom-ping successes) of nmap's connect scan + dicom-ping, or None."""
    nmap = shutil.which("nmap")
    if nmap is None:
        return None
    argv = [nmap, "-n", "-Pn", "-sT", "-p", DEFAULT_PORTS, "--script", "dicom-ping", "-oX", "-", NETWORK]
    start = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - start
    xml = done.stdout
    return elapsed, xml.count('state="open"'), xml.count('id="dicom-ping"')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--markdown", metavar="FILE", help="also write the results table here")
    args = parser.parse_args()
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="spbench-scan-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        live = [
            stack.enter_context(pynetdicom_scp(*OPEN_SCP)),
            stack.enter_context(pynetdicom_scp(*TLS_SCP, tls=_self_signed(workdir))),
            stack.enter_context(safepacs_server(workdir)),
        ]
        print("live targets: " + "; ".join(live), file=sys.stderr)
        ours: list[float] = []
        unlimited: list[float] = []
        theirs: list[float] = []
        report: dict[str, Any] = {}
        nmap_counts = (0, 0)
        for run in range(args.runs):
            elapsed, report = run_safepacs_scan(workdir)
            ours.append(elapsed)
            unlimited.append(run_safepacs_scan(workdir, "--rate", "0")[0])
            result = run_nmap()
            if result is not None:
                theirs.append(result[0])
                nmap_counts = result[1:]
            nmap_text = f", nmap {result[0]:.1f} s" if result else ", nmap not installed"
            print(f"run {run + 1}: safepacs scan {elapsed:.1f} s, --rate 0 {unlimited[-1]:.1f} s{nmap_text}",
                  file=sys.stderr)  # fmt: skip
        summary = report["summary"]
        dicom = sum(1 for e in report["endpoints"] if e["service"].startswith("dicom"))
        rows.append(
            f"| safepacs scan | {statistics.median(ours):.1f} | {summary['endpoints']} | {dicom} | "
            f"{sum(summary['findings'].values())} findings, worst {summary['worst']}; default --rate 500/s |"
        )
        fast = statistics.median(unlimited)
        rows.append(
            f"| safepacs scan --rate 0 | {fast:.1f} | {summary['endpoints']} | {dicom} | no rate limit |"
        )
        if theirs:
            rows.append(
                f"| nmap -sT + dicom-ping | {statistics.median(theirs):.1f} | {nmap_counts[0]} | "
                f"{nmap_counts[1]} | ports dicom-ping ran on (104, 11112 and 'dicom' services) |"
            )
    header = [
        f"{dt.date.today()} {platform.node()} ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), "
        f"SafePACS{git_revision()}, {version_line(['nmap', '--version'])}, "
        f"{NETWORK} x {DEFAULT_PORTS.count(',') + 1} ports, median of {args.runs}:",
        "",
        "| tool | wall s | open endpoints | DICOM services | notes |",
        "|---|---|---|---|---|",
    ]
    table = "\n".join(header + rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
