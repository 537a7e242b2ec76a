"""The DIMSE engine (``protocols/dimse/engine``) relies on pynetdicom's internals: it declares the
pynetdicom releases it was checked with, the package pins that minor release, and ``safepacs serve``
refuses any other unless the operator overrides it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pynetdicom
import pytest

from safepacs.errors import ConfigError
from safepacs.protocols.dimse import engine
from safepacs.protocols.dimse.engine import CHECKED, check_pynetdicom, installed_pynetdicom, is_checked
from tests.support.paths import REPO

ROOT = REPO
UNCHECKED = "3.1.0"

#: ``safepacs serve`` with the pynetdicom imported claiming to be another version (the argv follows).
_LAUNCH = (
    "import sys, pynetdicom; pynetdicom.__version__ = sys.argv.pop(1); "
    "from safepacs.cli import main; raise SystemExit(main(sys.argv[1:]))"
)
_PORTS = ["--dicom-port", "0", "--http-port", "0", "--dicom-tls-port", "0"]


def test_the_installed_pynetdicom_is_one_the_engine_was_checked_with() -> None:
    """Fails on a pynetdicom upgrade, on purpose: read the engine's docstring (the private parts it uses),
    check each against the new release, run the DIMSE and differential tests, then add it to CHECKED."""
    assert is_checked(), (
        f"pynetdicom {installed_pynetdicom()} is installed, but safepacs.protocols.dimse.engine was checked "
        f"only with {', '.join(CHECKED)}: re-check its private parts (see its docstring) and extend CHECKED"
    )


def test_the_package_pins_the_minor_release_checked() -> None:
    """pyproject.toml keeps pip to the minor release the engine was checked with, from the first
    version checked on."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in dependencies if re.match(r"pynetdicom\b", d)]
    bounds = dict(re.findall(r"(>=|<)\s*([0-9.]+)", pin))
    assert set(bounds) == {">=", "<"}, pin

    def key(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split("."))

    assert bounds[">="] == min(CHECKED, key=key)
    for version in CHECKED:
        assert key(bounds[">="]) <= key(version) < key(bounds["<"]), (version, pin)
        assert bounds["<"] == f"{key(version)[0]}.{key(version)[1] + 1}", "the pin allows one minor release"


def test_an_unchecked_version_is_refused_or_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", UNCHECKED)
    assert not is_checked()
    with pytest.raises(ConfigError, match=rf"pynetdicom {UNCHECKED} is installed.*unchecked_pynetdicom"):
        check_pynetdicom()
    with caplog.at_level("WARNING", logger=engine.__name__):
        check_pynetdicom(allow_unchecked=True)
    assert f"pynetdicom {UNCHECKED} is not a version" in caplog.text
    monkeypatch.setattr(pynetdicom, "__version__", CHECKED[0])
    caplog.clear()
    check_pynetdicom()
    assert caplog.text == ""


def _snapshot(data: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(data)): (p.stat().st_size, p.stat().st_mtime_ns) for p in data.rglob("*")}


def test_serve_refuses_an_unchecked_pynetdicom(data_dir: Path) -> None:
    """A clear message and exit status 2, no traceback; nothing is started, migrated or recorded."""
    before = _snapshot(data_dir)
    cmd = [sys.executable, "-c", _LAUNCH, UNCHECKED, "serve", "--data", str(data_dir), *_PORTS]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("serve started with an unchecked pynetdicom") from exc
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"safepacs: pynetdicom {UNCHECKED} is installed, but SafePACS's DICOM"), line
    assert "server.unchecked_pynetdicom = true" in line
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert _snapshot(data_dir) == before


def test_serve_runs_an_unchecked_pynetdicom_when_told_to(data_dir: Path) -> None:
    """``server.unchecked_pynetdicom = true``: served, with a warning in the log."""
    cmd = [sys.executable, "-c", _LAUNCH, UNCHECKED, "serve", "--data", str(data_dir), *_PORTS]
    env = {
        **os.environ,
        "SAFEPACS_SERVER__UNCHECKED_PYNETDICOM": "true",
        "SAFEPACS_SERVER__WORKERS": "1",
        "SAFEPACS_SERVER__SHUTDOWN_GRACE": "1",
        "SAFEPACS_STORAGE__AUDIT_RESERVE_BYTES": "1048576",
    }
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        line = proc.stdout.readline()
        assert "listening for DICOM on" in line, "".join(log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.stdout.read()
        proc.wait(timeout=60)
        reader.join(10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0, "".join(log)
    assert any(f"pynetdicom {UNCHECKED} is not a version" in entry for entry in log), "".join(log)


#: What SafePACS imports of pynetdicom outside the engine: its public API, and ``_config``, the module its
#: documentation names for its configuration options (logging of identifiers).
_PUBLIC_MODULES = {
    "pynetdicom",
    "pynetdicom.association",
    "pynetdicom.pdu_primitives",
    "pynetdicom.presentation",
    "pynetdicom.service_class",
    "pynetdicom.sop_class",
}
_PUBLIC_PRIVATE_NAMES = {"_config"}


def test_only_the_engine_imports_pynetdicom_internals() -> None:
    """Every module of pynetdicom's that is not its public API is imported in protocols/dimse/engine
    only, so that the engine's docstring lists everything an upgrade must re-check."""
    import ast

    src = ROOT / "src" / "safepacs"
    engine_dir = src / "protocols" / "dimse" / "engine"
    found = []
    for path in sorted(src.rglob("*.py")):
        if engine_dir in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [(node.module, [alias.name for alias in node.names])]
            else:
                continue
            for module, names in modules:
                if module.split(".")[0] != "pynetdicom":
                    continue
                private = [n for n in names if n.startswith("_") and n not in _PUBLIC_PRIVATE_NAMES]
                if module not in _PUBLIC_MODULES or private:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module} {private or ''}")
    assert found == [], "pynetdicom internals outside protocols/dimse/engine:\n" + "\n".join(found)
