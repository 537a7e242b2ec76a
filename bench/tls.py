"""DICOM TLS benchmark: ingest over DICOM TLS, SafePACS against Orthanc with DICOM TLS, same corpus, same run.

    .venv/bin/python bench/tls.py --quick            # 100 CT slices + 500 small instances, 1 run
    .venv/bin/python bench/tls.py --runs 3           # 500 + 2,000, median of 3 runs

Four receivers, each started fresh on an empty store for every single measurement:

* ``safepacs-tls``: ``safepacs init``, peer BENCHTLS ``--tls required`` with a client certificate from
  ``safepacs peer cert``, ``safepacs serve`` with its defaults (auditing on); the corpus goes to the DICOM
  TLS port;
* ``safepacs-plain``: the same server, peer BENCH ``--tls off``, the corpus to the plain DICOM port;
* ``orthanc-tls``: Debian's Orthanc 1.10.1 with ``DicomTlsEnabled`` and ``DicomTlsRemoteCertificateRequired``
  (mutual TLS), a CA, server and client certificate (ECDSA P-256, as SafePACS's) made for the run in the
  temp dir; ``DicomTlsTrustedCertificates`` is that CA;
* ``orthanc-plain``: the same Orthanc without TLS.

Both Orthancs run with TCP_NODELAY=1 in their environment (bench/README.md, "Ingest benchmark").  The
sender is DCMTK ``storescu`` (TCP_NODELAY=1), with ``+tls key cert +cf ca`` for the TLS targets (DCMTK's
default BCP 195 non-downgrading profile: TLS 1.3 here).  Before every measurement, as root, the page
cache is dropped and the corpus read back; after a receiver answers, the measurement waits until it is
idle.  Every TLS receiver proves it speaks TLS before it is measured: ``echoscu -d`` over TLS must report
the negotiated protocol and cipher suite, and (Orthanc) a plain C-ECHO to that port must fail.  A
measurement counts only if every storescu exited 0, every C-STORE was acknowledged with Success or
Warning and the store holds exactly the instances sent.  The receivers alternate within each run (the
order reversed every other run), so drift of the machine hits all alike.  All traffic is on 127.0.0.1.

Targets: TLS costs SafePACS under 15% of its plain throughput; SafePACS over TLS (bench/README.md)
ingests >= 1.5x Orthanc over TLS on CT slices over 4 associations and >= 1.2x on 10 KB instances.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _common import (
    GOOD_RESPONSE,
    HOST,
    ORTHANC,
    SAFEPACS,
    Corpus,
    Measurement,
    Orthanc,
    Receiver,
    count_files,
    ct_corpus,
    dcmtk,
    free_port,
    git_revision,
    markdown_table,
    nodelay_env,
    remove_tree,
    rich_table,
    running,
    settle_page_cache,
    small_corpus,
    split,
    version_line,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console

PLAIN_AET, TLS_AET = "BENCH", "BENCHTLS"
TARGET_COST = 0.15  # target: TLS costs under 15% of the plain throughput
#: Target (bench/README.md, first table): SafePACS over TLS against Orthanc over TLS, per (corpus,
#: associations); None: no target
TARGET_RATIO: dict[tuple[str, int], float] = {("CT 512", 4): 1.5, ("small 64", 1): 1.2, ("small 64", 4): 1.2}

console = Console(highlight=False, width=None if sys.stdout.isatty() else 170)


# ------------------------------------------------------------------------------------------------ PKI


@dataclass(frozen=True)
class Pki:
    """A CA, a server and a client certificate (PEM files) made for one benchmark run."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path) -> Pki:
    """ECDSA P-256 keys (what ``safepacs peer cert`` issues), valid for a day, unencrypted keys mode 0600."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("SafePACS bench CA", name("SafePACS bench CA"), ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    files = {"ca": folder / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for stem, cn, usage in (
        ("server", "ORTHANC", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", TLS_AET, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(cn, ca.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        files[f"{stem}_cert"] = folder / f"{stem}.pem"
        files[f"{stem}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{stem}_key"] = folder / f"{stem}.key"
        files[f"{stem}_key"].touch(mode=0o600)
        files[f"{stem}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return Pki(**files)


def tls_client_args(key: Path, cert: Path, ca: Path) -> list[str]:
    """DCMTK's options for mutual TLS with ``key``/``cert``, trusting ``ca`` (default BCP 195 profile)."""
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


_PROTOCOL = re.compile(r"Protocol\s*:\s*([^\s,]+)")
_CIPHER = re.compile(r"Ciphersuite\s*:\s*([^\s,]+)")


def tls_details(port: int, aec: str, aet: str, args: list[str]) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384``: what a C-ECHO over TLS to ``port`` negotiated (``echoscu -d``).
    Raises when the echo fails or DCMTK reports no TLS connection."""
    argv = [dcmtk("echoscu"), "-d", "-to", "5", "-ta", "5", *args, "-aet", aet, "-aec", aec, HOST, str(port)]
    done = subprocess.run(argv, capture_output=True, text=True, env=nodelay_env(), timeout=30, check=False)
    out = done.stdout + done.stderr
    protocol, cipher = _PROTOCOL.search(out), _CIPHER.search(out)
    if done.returncode != 0 or protocol is None or cipher is None:
        tail = "\n".join(line for line in out.splitlines() if line.startswith(("E:", "F:")))
        raise RuntimeError(f"C-ECHO over TLS to port {port} failed or negotiated no TLS:\n{tail}")
    return f"{protocol[1]} {cipher[1]}"


def plain_echo_refused(port: int, aec: str) -> bool:
    """Whether a plain C-ECHO to ``port`` fails (a TLS-only port must refuse it)."""
    argv = [dcmtk("echoscu"), "-to", "3", "-ta", "3", "-aet", PLAIN_AET, "-aec", aec, HOST, str(port)]
    done = subprocess.run(argv, capture_output=True, env=nodelay_env(), timeout=30, check=False)
    return done.returncode != 0


# ------------------------------------------------------------------------------------------ receivers


class SafePacsTls(Receiver):
    """``safepacs init`` + a plain and a TLS peer + ``safepacs serve`` in ``workdir/data``."""

    tls_port: int = 0
    negotiated: str = ""

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def certs(self) -> Path:
        return self.workdir / "bench-cert"

    def start(self) -> None:
        env = {**os.environ, **self.env}
        d = str(self.data)
        for argv in (
            [str(SAFEPACS), "init", "--data", d],
            [str(SAFEPACS), "peer", "add", PLAIN_AET, "--host", HOST, "--allow", "echo,store",
             "--tls", "off", "--data", d],
            [str(SAFEPACS), "peer", "add", TLS_AET, "--host", HOST, "--allow", "echo,store",
             "--tls", "required", "--data", d],
            [str(SAFEPACS), "peer", "cert", TLS_AET, "--out", str(self.certs), "--data", d],
        ):  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(argv[1:3])} failed ({done.returncode}):\n{done.stderr[-2000:]}"
                )
        self.port, self.tls_port = free_port(), free_port()
        argv = [
            str(SAFEPACS), "serve", "--data", d, "--dicom-port", str(self.port),
            "--dicom-tls-port", str(self.tls_port), "--http-port", str(free_port()),
        ]  # fmt: skip
        self._spawn(argv, env=env)
        self._wait_ready(120, ready="SafePACS listening for DICOM TLS on")
        self.negotiated = tls_details(self.tls_port, self.aet, TLS_AET, self.tls_args())

    def tls_args(self) -> list[str]:
        c = self.certs
        return tls_client_args(c / "key.pem", c / "cert.pem", c / "ca.pem")

    def stored(self) -> int:
        return count_files(self.data / "objects")


class OrthancTls(Orthanc):
    """Orthanc (``_common.Orthanc``, TCP_NODELAY=1) with DICOM TLS on its DICOM port, client certificates
    required; ``pki`` is the run's CA and certificates."""

    pki: Pki | None = None
    negotiated: str = ""

    def config(self) -> dict[str, object]:
        assert self.pki is not None
        return {
            **super().config(),
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(self.pki.server_cert),
            "DicomTlsPrivateKey": str(self.pki.server_key),
            "DicomTlsTrustedCertificates": str(self.pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        }

    def tls_args(self) -> list[str]:
        assert self.pki is not None
        return tls_client_args(self.pki.client_key, self.pki.client_cert, self.pki.ca)

    def _wait_ready(self, timeout: float, ready: str | None = None) -> None:
        """Ready once a C-ECHO over TLS succeeds; then the port must refuse a plain one."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.negotiated = tls_details(self.port, self.aet, TLS_AET, self.tls_args())
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if not plain_echo_refused(self.port, self.aet):
            raise RuntimeError("Orthanc answered a plain C-ECHO on its DICOM TLS port: TLS is not on")


@dataclass(frozen=True)
class Target:
    """One benchmarked receiver: how to make it, and which port and options storescu uses for it."""

    label: str
    make: Callable[[Path, dict[str, str], Pki], Receiver]
    tls: bool


def _safepacs(workdir: Path, env: dict[str, str], _pki: Pki) -> Receiver:
    return SafePacsTls(name="safepacs", aet="SAFEPACS", workdir=workdir, env=env)


def _orthanc(workdir: Path, _env: dict[str, str], _pki: Pki) -> Receiver:
    return Orthanc(name="orthanc", aet="ORTHANC", workdir=workdir)


def _orthanc_tls(workdir: Path, _env: dict[str, str], pki: Pki) -> Receiver:
    receiver = OrthancTls(name="orthanc", aet="ORTHANC", workdir=workdir)
    receiver.pki = pki
    return receiver


TARGETS: dict[str, Target] = {
    "safepacs-tls": Target("SafePACS TLS", _safepacs, tls=True),
    "orthanc-tls": Target("Orthanc TLS", _orthanc_tls, tls=True),
    "safepacs-plain": Target("SafePACS plain", _safepacs, tls=False),
    "orthanc-plain": Target("Orthanc plain", _orthanc, tls=False),
}


# ------------------------------------------------------------------------------------------ measuring


def send(corpus: Corpus, receiver: Receiver, tls: bool, associations: int, timeout: float) -> Measurement:
    storescu = dcmtk("storescu")
    if tls:
        assert isinstance(receiver, SafePacsTls | OrthancTls)
        port = receiver.tls_port if isinstance(receiver, SafePacsTls) else receiver.port
        target = [*receiver.tls_args(), "-aet", TLS_AET]
    else:
        target, port = ["-aet", PLAIN_AET], receiver.port
    logs = [receiver.workdir / f"storescu-{k}.log" for k in range(associations)]
    groups = split(corpus.files, associations)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    cpu_before = receiver.cpu_seconds()
    start = time.perf_counter()
    for group, log_path in zip(groups, logs, strict=False):
        argv = [storescu, "-v", "-nh", "-R", *target, "-aec", receiver.aet, HOST, str(port), *group]
        with log_path.open("wb") as log:
            procs.append(
                (subprocess.Popen(argv, cwd=corpus.root, env=nodelay_env(), stdout=log, stderr=log), log_path)
            )
    errors: list[str] = []
    deadline = start + timeout
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            errors.append(f"storescu timed out after {timeout:.0f} s")
    elapsed = time.perf_counter() - start
    cpu = receiver.cpu_seconds() - cpu_before
    acked = 0
    for (proc, log_path), group in zip(procs, groups, strict=True):
        if proc.returncode != 0:
            errors.append(f"storescu exit status {proc.returncode}")
        lines = log_path.read_text(errors="replace").splitlines()
        errors.extend(line for line in lines if line.startswith(("E:", "F:")))
        responses = [line for line in lines if line.startswith("I: Received Store Response (")]
        good = [line for line in responses if line.startswith(GOOD_RESPONSE)]
        acked += len(good)
        failed = Counter(line for line in responses if line not in good)
        errors.extend(f"{n} x {status}" for status, n in failed.items())
        if len(responses) < len(group):
            errors.append(f"{len(group) - len(responses)} of {len(group)} instances got no response")
    stored = receiver.stored()
    if stored != corpus.count:
        errors.append(f"the store holds {stored} instances, {corpus.count} were sent")
    return Measurement(elapsed, corpus.count, stored, errors, cpu, acked)


def measure(
    name: str,
    corpus: Corpus,
    associations: int,
    workdir: Path,
    env: dict[str, str],
    pki: Pki,
    timeout: float,
    negotiated: dict[str, str],
) -> Measurement:
    """One measurement of ``name`` on a fresh receiver; what its TLS negotiated goes to ``negotiated``."""
    target = TARGETS[name]
    settle_page_cache(corpus)
    rundir = Path(tempfile.mkdtemp(prefix=f"tls-{name}-{corpus.name[:2]}-x{associations}-", dir=workdir))
    receiver = target.make(rundir, env, pki)
    try:
        with running(receiver):
            if target.tls:
                negotiated[name] = getattr(receiver, "negotiated", "")
            result = send(corpus, receiver, target.tls, associations, timeout)
        if not result.ok and receiver.log_tail(8):
            result.errors.append(f"{name} log tail:\n{receiver.log_tail(8)}")
        return result
    except Exception as exc:  # a failed measurement is reported, not raised
        return Measurement(0.0, corpus.count, 0, [f"{type(exc).__name__}: {exc}"])
    finally:
        remove_tree(rundir)


# ------------------------------------------------------------------------------------------ reporting


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


HEADERS = [
    "corpus", "assoc", "receiver", "inst/s", "MB/s", "srv CPU ms/inst", "TLS cost", "x Orthanc TLS",
    "target", "runs inst/s",
]  # fmt: skip


def build_rows(
    results: dict[tuple[str, str, int], list[Measurement]],
    corpora: list[Corpus],
    associations: list[int],
    targets: list[str],
) -> list[list[str]]:
    """One row per receiver and (corpus, associations): its median run, its TLS cost against its own
    plain run, its ratio to Orthanc over TLS, and the verdict for the targets."""
    rows = []
    for corpus in corpora:
        for assoc in associations:
            medians: dict[str, float] = {}
            for name in targets:
                runs = results.get((name, corpus.name, assoc), [])
                if runs and all(m.ok for m in runs):
                    medians[name] = corpus.count / statistics.median(m.elapsed for m in runs)
            for name in targets:
                runs = results.get((name, corpus.name, assoc), [])
                label = [corpus.name, str(assoc), TARGETS[name].label]
                if name not in medians:
                    failed = sum(not m.ok for m in runs)
                    note = f"{failed}/{len(runs)} runs failed"
                    rows.append([*label, "FAILED", "-", "-", "-", "-", "-", note])
                    continue
                rate = medians[name]
                mbps = rate * corpus.total_bytes / corpus.count / 1e6
                cpu = statistics.median(m.server_cpu for m in runs) / corpus.count * 1000
                cost, verdicts = "-", []
                plain = name.replace("-tls", "-plain")
                if TARGETS[name].tls and plain in medians:
                    value = 1 - rate / medians[plain]
                    cost = f"{value:+.1%}"
                    if name == "safepacs-tls":
                        verdicts.append(f"cost <15%: {'yes' if value < TARGET_COST else 'NO'}")
                ratio = "-"
                if "orthanc-tls" in medians:
                    ratio = f"{rate / medians['orthanc-tls']:.2f}"
                    goal = TARGET_RATIO.get((corpus.name, assoc))
                    if name == "safepacs-tls" and goal is not None:
                        met = rate / medians["orthanc-tls"] >= goal
                        verdicts.append(f">={goal}x: {'yes' if met else 'NO'}")
                spread = "-"
                if len(runs) > 1:
                    rates = sorted(corpus.count / m.elapsed for m in runs)
                    spread = f"{fmt_rate(rates[0])}-{fmt_rate(rates[-1])}"
                rows.append([
                    *label, fmt_rate(rate), f"{mbps:,.1f}", f"{cpu:.2f}", cost, ratio,
                    ", ".join(verdicts) or "-", spread,
                ])  # fmt: skip
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct", type=int, default=500, help="CT slices of 512x512x16 bit (default 500)")
    p.add_argument("--small", type=int, default=2000, help="small 64x64x16 bit instances (default 2000)")
    p.add_argument("--quick", action="store_true", help="100 CT slices and 500 small instances")
    p.add_argument("--runs", type=int, default=1, help="runs per measurement; the median is reported")
    p.add_argument("--associations", default="1,4", help="comma-separated association counts (default 1,4)")
    p.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated of {', '.join(TARGETS)} (default all)"
    )
    p.add_argument("--workdir", type=Path, help="where corpora and servers live (default: a temp dir)")
    p.add_argument("--safepacs-workers", type=int, help="sets SAFEPACS_SERVER__WORKERS (default: CPU count)")
    p.add_argument(
        "--safepacs-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for SafePACS"
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per send (default 1800)")
    p.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    p.add_argument("--verbose", action="store_true", help="print every error line of failed runs")
    args = p.parse_args(argv)
    if args.quick:
        args.ct, args.small = 100, 500
    args.associations = [int(a) for a in args.associations.split(",") if a]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.runs < 1 or any(a < 1 for a in args.associations):
        p.error("--runs and --associations must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="safepacs-tls-bench-")) if owned else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"SAFEPACS_SERVER__WORKERS": str(args.safepacs_workers)} if args.safepacs_workers else {}
    for item in args.safepacs_env:
        key, _, value = item.partition("=")
        env[key] = value
    started = time.perf_counter()
    try:
        pki = make_pki(workdir / "pki")
        corpora = []
        if args.ct:
            corpora.append(ct_corpus(workdir, args.ct))
        if args.small:
            corpora.append(small_corpus(workdir, args.small))
        load_before = os.getloadavg()[0]
        results: dict[tuple[str, str, int], list[Measurement]] = {}
        negotiated: dict[str, str] = {}
        for run in range(args.runs):
            for corpus in corpora:
                for assoc in args.associations:
                    order = args.targets if run % 2 == 0 else args.targets[::-1]
                    for name in order:
                        m = measure(name, corpus, assoc, workdir, env, pki, args.timeout, negotiated)
                        results.setdefault((name, corpus.name, assoc), []).append(m)
                        head = f"run {run + 1}/{args.runs} {corpus.name:>8} x{assoc} {name:>14}:"
                        if m.ok:
                            console.print(
                                f"{head} {corpus.count / m.elapsed:7.1f} inst/s, server CPU"
                                f" {m.server_cpu / corpus.count * 1000:.2f} ms/inst"
                            )
                        else:
                            console.print(f"{head} FAILED ({len(m.errors)} error(s))")
                            for error in m.errors if args.verbose else m.errors[:3]:
                                console.print(f"    {error}", markup=False)
        command = shlex.join(["python", "bench/tls.py", *(sys.argv[1:] if argv is None else argv)])
        versions = ", ".join([
            version_line([str(SAFEPACS), "--version"]) + git_revision(),
            version_line([str(ORTHANC), "--version"]).replace(str(ORTHANC), "Orthanc"),
            version_line([dcmtk("storescu"), "--version"]).strip("$ ").replace("dcmtk: ", "DCMTK "),
        ])  # fmt: skip
        tls = "; ".join(f"{TARGETS[n].label}: {v}" for n, v in sorted(negotiated.items())) or "no TLS run"
        context = (
            f"{dt.date.today().isoformat()}, {os.cpu_count()} CPUs ({platform.machine()}), load average"
            f" {load_before:.1f} before / {os.getloadavg()[0]:.1f} after, {versions}; negotiated {tls};"
            " corpora: "
            + ", ".join(f"{c.count:,} x {c.name} ({c.total_bytes / 1e6:,.1f} MB)" for c in corpora)
            + f"; `{command}`, {(time.perf_counter() - started) / 60:.0f} min"
        )
        title = f"Ingest over DICOM TLS, storescu -> receiver, median of {args.runs} run(s)"
        rows = build_rows(results, corpora, args.associations, args.targets)
        console.print()
        console.print(context, markup=False)
        console.print(rich_table(rows, title, HEADERS))
        if args.markdown:
            args.markdown.write_text(markdown_table(rows, f"{title}. {context}", HEADERS))
        failed = any(not m.ok for runs in results.values() for m in runs)
        return 1 if failed else 0
    finally:
        if owned:
            remove_tree(workdir)


if __name__ == "__main__":
    sys.exit(main())
