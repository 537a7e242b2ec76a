"""A real ``safepacs serve`` on 127.0.0.1 (ephemeral ports), the CLI run in-process, and DCMTK tools."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from safepacs.cli import main as safepacs_main


def run_cli(*args: str) -> int:
    """Run the ``safepacs`` CLI in-process, as a user would type it."""
    return safepacs_main(list(args))


@dataclass
class Server:
    """A running ``safepacs serve`` subprocess."""

    data: Path
    host: str
    port: int
    proc: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    https_port: int = 0
    tls_port: int = 0  # DICOM TLS

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.https_port}"

    @property
    def ca_file(self) -> Path:
        return self.data / "keys" / "ca.pem"

    def add_peer(
        self,
        ae: str,
        allow: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        tls: str = "off",
        extra: tuple[str, ...] = (),
    ) -> None:
        """Register a peer: plain DICOM (``--tls off``) unless ``tls="required"``; ``extra`` options."""
        args = ["peer", "add", ae, "--host", host, "--allow", allow, "--tls", tls, "--data", str(self.data)]
        if port is not None:
            args += ["--port", str(port)]
        assert run_cli(*args, *extra) == 0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.reader is not None:
            self.reader.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode

    def stderr_text(self) -> str:
        return "\n".join(self.log)


def start_server(data: Path, *extra: str, env: dict[str, str] | None = None) -> Server:
    """Start ``safepacs serve`` on 127.0.0.1 port 0 and wait until it listens."""
    ports = ["--dicom-port", "0", "--http-port", "0", "--dicom-tls-port", "0"]
    cmd = [sys.executable, "-m", "safepacs", "serve", "--data", str(data), *ports, *extra]
    # 1 MiB of disk reserved for the audit trail, not the default 64 MiB per server the suite starts.
    defaults = {"SAFEPACS_SERVER__SHUTDOWN_GRACE": "5", "SAFEPACS_STORAGE__AUDIT_RESERVE_BYTES": "1048576"}
    full_env = {**os.environ, **defaults, **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    assert proc.stdout is not None and proc.stderr is not None
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    line = proc.stdout.readline()
    if "listening for DICOM on" not in line:
        proc.kill()
        proc.wait()
        reader.join(10)
        proc.stdout.close()
        proc.stderr.close()
        raise AssertionError(f"server did not start: {line!r} {''.join(log)}")
    address = line.split(" on ", 1)[1].split(" ")[0]
    host, port = address.rsplit(":", 1)
    https_line = proc.stdout.readline()
    assert "listening for HTTPS" in https_line, https_line
    https_port = int(https_line.strip().rsplit(":", 1)[1])
    tls_line = proc.stdout.readline()
    assert "listening for DICOM TLS on" in tls_line, tls_line
    tls_port = int(tls_line.strip().rsplit(":", 1)[1])
    return Server(data, host, int(port), proc, log, reader, https_port, tls_port)


def dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool; never raises on a non-zero exit (tests assert on it)."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
