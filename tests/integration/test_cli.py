"""The command line as an administrator uses it: init, peer, user, token, import."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from safepacs.app import open_repositories
from safepacs.config import load_settings
from tests.support.corpus import make_ct
from tests.support.server import run_cli


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_a_private_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d"
    assert run_cli("init", "--data", str(data)) == 0
    out = capsys.readouterr()
    password = out.out.strip()
    assert len(password) >= 16
    assert _mode(data) == 0o700
    for private in ("safepacs.toml", "admin-password.txt", "keys/ca.key", "keys/server.key"):
        assert _mode(data / private) == 0o600, private
    keks = list((data / "keys").glob("kek-*.key"))
    assert len(keks) == 1 and _mode(keks[0]) == 0o600
    assert (data / "admin-password.txt").read_text().strip() == password
    toml = (data / "safepacs.toml").read_text()
    for key in ("ae_title", "dicom_port", "max_results", "overwrite"):
        assert f"\n{key} = " in toml
    assert '\n# url = "postgresql' in toml  # left out: the SQLite index in the data directory
    repos = open_repositories(load_settings(data).index_url)
    try:
        admin = repos.directory.get_user("admin")
        assert admin is not None and "admin" in admin.roles and password not in admin.password_hash
    finally:
        repos.close()


def test_init_refuses_an_existing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "keep").write_text("x")
    assert run_cli("init", "--data", str(data)) == 2
    assert "exists already" in capsys.readouterr().err
    assert [p.name for p in data.iterdir()] == ["keep"]


def test_init_uses_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEPACS_DATA", str(tmp_path / "env-data"))
    assert run_cli("init") == 0
    assert (tmp_path / "env-data" / "safepacs.toml").is_file()


def test_peer_add_list_remove(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(data_dir)
    assert run_cli("peer", "add", "CT1", "--host", "10.1.2.3", "--allow", "echo,store", "--data", d) == 0
    assert (
        run_cli(
            "peer",
            "add",
            "VIEWER",
            "--host",
            "192.168.0.0/24",
            "--port",
            "104",
            "--allow",
            "find,get,move",
            "--data",
            d,
        )
        == 0
    )
    capsys.readouterr()
    assert run_cli("peer", "list", "--data", d) == 0
    listing = capsys.readouterr().out
    assert "CT1" in listing and "10.1.2.3/32" in listing and "echo,store" in listing
    assert "VIEWER" in listing and "192.168.0.0/24" in listing and "104" in listing
    assert run_cli("peer", "remove", "CT1", "--data", d) == 0
    capsys.readouterr()
    run_cli("peer", "list", "--data", d)
    assert "CT1" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["BAD\\AE", "--host", "127.0.0.1", "--allow", "echo"], "not a valid AE title"),
        (["THIS_AE_IS_TOO_LONG", "--host", "127.0.0.1", "--allow", "echo"], "not a valid AE title"),
        (["CT", "--host", "127.0.0.1", "--allow", "echo,delete"], "unknown service 'delete'"),
        (["CT", "--host", "not a host!", "--allow", "echo"], "neither an IP address"),
        (["CT", "--host", "127.0.0.1", "--allow", "echo", "--port", "70000"], "--port must be"),
    ],
)
def test_peer_add_refuses_bad_input(
    data_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert run_cli("peer", "add", *args, "--data", str(data_dir)) == 2
    assert message in capsys.readouterr().err


def test_peer_add_twice_and_remove_unknown_are_errors(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(data_dir)
    assert run_cli("peer", "add", "CT1", "--host", "127.0.0.1", "--allow", "echo", "--data", d) == 0
    assert run_cli("peer", "add", "CT1", "--host", "127.0.0.1", "--allow", "echo", "--data", d) == 2
    assert run_cli("peer", "remove", "NOPE", "--data", d) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("safepacs: ") == 2


def test_commands_on_a_missing_data_directory_explain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("peer", "list", "--data", str(tmp_path / "nope")) == 2
    assert "safepacs init" in capsys.readouterr().err
    assert run_cli("import", str(tmp_path), "--data", str(tmp_path / "nope")) == 2
    assert "safepacs init" in capsys.readouterr().err


def test_import_stores_files_and_reports_rejections(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in" / "nested"
    src.mkdir(parents=True)
    good = [make_ct(patient_id=f"P{i}") for i in range(3)]
    for i, ds in enumerate(good):
        ds.save_as(src / f"{i}.dcm", enforce_file_format=True)
    (src / "garbage.dcm").write_bytes(b"\x00" * 200 + b"not dicom")
    truncated = (src / "0.dcm").read_bytes()[:300]
    (src.parent / "truncated.dcm").write_bytes(truncated)
    assert run_cli("import", str(tmp_path / "in"), "--data", str(data_dir)) == 1
    err = capsys.readouterr().err
    assert "3 stored" in err and "2 rejected" in err
    assert "garbage.dcm" in err and "truncated.dcm" in err
    # Importing the same files again: already present, nothing changes.
    assert run_cli("import", str(src / "0.dcm"), str(src / "1.dcm"), "--data", str(data_dir)) == 0
    assert "2 already present" in capsys.readouterr().err
    repos = open_repositories(load_settings(data_dir).index_url)
    try:
        assert repos.instances.count_instances() == 3
    finally:
        repos.close()


def test_stored_objects_are_encrypted_and_named_randomly(data_dir: Path, tmp_path: Path) -> None:
    ds = make_ct(patient_id="PLAINTEXT-ID-4711")
    ds.PatientName = "Sentinel^Plaintext"
    ds.preamble = b"MZ" + b"\x90" * 126  # a polyglot preamble (CVE-2019-11687)
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert run_cli("import", str(path), "--data", str(data_dir)) == 0
    objects = [p for p in (data_dir / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 1
    blob = objects[0].read_bytes()
    assert b"Sentinel" not in blob and b"PLAINTEXT-ID-4711" not in blob
    assert str(ds.SOPInstanceUID) not in str(objects[0])
    assert _mode(objects[0]) == 0o600
    from safepacs.app import open_archive

    archive = open_archive(load_settings(data_dir))
    try:
        ref = archive.instances.get_instance(str(ds.SOPInstanceUID))
        assert ref is not None
        part10 = archive.retrieve.read(ref)
    finally:
        archive.close()
    assert part10[:128] == b"\x00" * 128 and part10[128:132] == b"DICM"
    back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(part10))
    assert back.PatientName == "Sentinel^Plaintext"


def test_an_index_that_cannot_be_synced_refuses_the_file_but_loses_nothing(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fails the index's sync: the file is reported not stored (so it is sent again), and
    the object its committed row refers to stays, so sending it again finds it complete."""
    import errno

    import safepacs.db.database as index_module
    from safepacs.app import open_archive

    ds = make_ct(patient_id="SYNC-1")
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)

    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(index_module, "_sync_data", failing_sync)
    assert run_cli("import", str(tmp_path / "a.dcm"), "--data", str(data_dir)) == 1
    assert "could not be synced to disk" in capsys.readouterr().err
    monkeypatch.undo()
    assert run_cli("import", str(tmp_path / "a.dcm"), "--data", str(data_dir)) == 0
    assert "1 already present" in capsys.readouterr().err
    archive = open_archive(load_settings(data_dir))
    try:
        ref = archive.instances.get_instance(str(ds.SOPInstanceUID))
        assert ref is not None
        back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(archive.retrieve.read(ref)))
    finally:
        archive.close()
    assert back.PatientID == "SYNC-1"


def test_import_of_other_content_keeps_or_replaces_per_setting(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_ct(patient_id="KEEP-1")
    first.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    second = pydicom.dcmread(tmp_path / "a.dcm")
    second.PatientName = "Changed^Name"
    second.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    assert run_cli("import", str(tmp_path / "a.dcm"), "--data", str(data_dir)) == 0
    assert run_cli("import", str(tmp_path / "b.dcm"), "--data", str(data_dir)) == 1
    assert "1 not stored (other content under the same UID)" in capsys.readouterr().err

    from safepacs.app import open_archive

    def stored_name() -> str:
        archive = open_archive(load_settings(data_dir))
        try:
            ref = archive.instances.get_instance(str(first.SOPInstanceUID))
            assert ref is not None
            return str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(archive.retrieve.read(ref))).PatientName)
        finally:
            archive.close()

    assert stored_name() != "Changed^Name"
    monkeypatch.setenv("SAFEPACS_STORAGE__OVERWRITE", "true")
    assert run_cli("import", str(tmp_path / "b.dcm"), "--data", str(data_dir)) == 0
    assert "1 replaced" in capsys.readouterr().err
    assert stored_name() == "Changed^Name"
    assert len([p for p in (data_dir / "objects").rglob("*") if p.is_file()]) == 1


def test_serve_on_a_port_in_use_explains(data_dir: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "safepacs", "serve", "--data", str(data_dir), "--dicom-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert "cannot listen on 127.0.0.1" in result.stderr and "Traceback" not in result.stderr


def test_user_and_token_commands(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli("user", "add", "alice", "--role", "radiologist,referrer", "--data", str(data_dir)) == 0
    out = capsys.readouterr()
    assert len(out.out.strip()) >= 16  # the one-time password, alone on stdout
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery staple\n"))
    assert (
        run_cli("user", "add", "bob", "--role", "technologist", "--password-stdin", "--data", str(data_dir))
        == 0
    )
    assert capsys.readouterr().out == ""
    assert run_cli("user", "list", "--data", str(data_dir)) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "radiologist,referrer" in listing and "bob" in listing

    assert run_cli("token", "create", "--user", "alice", "--expires", "12h", "--data", str(data_dir)) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert re.fullmatch(r"spat_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", token)  # the token alone on stdout
    assert "shown only now" in out.err
    token_id = token.split("_")[1]
    assert run_cli("token", "list", "--data", str(data_dir)) == 0
    listing = capsys.readouterr().out
    assert token_id in listing and token.split("_", 2)[2] not in listing  # never the secret
    assert run_cli("token", "revoke", token_id, "--data", str(data_dir)) == 0
    assert run_cli("token", "list", "--user", "alice", "--data", str(data_dir)) == 0
    assert "revoked" in capsys.readouterr().out

    assert run_cli("user", "reset-password", "alice", "--data", str(data_dir)) == 0
    assert len(capsys.readouterr().out.strip()) >= 16
    assert run_cli("user", "disable", "alice", "--data", str(data_dir)) == 0
    assert run_cli("user", "list", "--data", str(data_dir)) == 0
    assert "disabled" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["user", "add", "carol", "--role", "overlord"], "unknown role"),
        (["user", "add", "../etc", "--role", "referrer"], "user name"),
        (["user", "add", "admin", "--role", "referrer"], "exists already"),
        (["user", "disable", "nobody"], "no user named"),
        (["token", "create", "--user", "nobody"], "no user named"),
        (["token", "create", "--user", "admin", "--expires", "forever"], "--expires"),
        (["token", "create", "--user", "admin", "--expires", "400d"], "at most 366 days"),
        (["token", "create", "--user", "admin", "--scope", "root"], "unknown scope"),
        (["token", "revoke", "0123456789abcdef"], "no token"),
    ],
)
def test_user_and_token_commands_refuse_bad_input(
    data_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert run_cli(*args, "--data", str(data_dir)) == 2
    out = capsys.readouterr()
    assert message in out.err
    assert out.out == ""
    assert "Traceback" not in out.err


def _snapshot(data: Path) -> dict[str, tuple[int, int]]:
    """Every file of a data directory with its size and modification time."""
    return {str(p.relative_to(data)): (p.stat().st_size, p.stat().st_mtime_ns) for p in data.rglob("*")}


def _serve(data: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``safepacs serve`` that is expected to refuse to start; stopped (SIGTERM) if it starts anyway."""
    ports = ["--dicom-port", "0", "--http-port", "0", "--dicom-tls-port", "0"]
    cmd = [sys.executable, "-m", "safepacs", "serve", "--data", str(data), *ports]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"serve started: {out!r}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_index_url_is_a_configuration_error_and_creates_nothing(
    data_dir: Path, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(data_dir)
    result = _serve(data_dir, {"SAFEPACS_INDEX__URL": value})
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("safepacs: setting 'index.url' is invalid") and "is empty" in line, line
    monkeypatch.setenv("SAFEPACS_INDEX__URL", value)
    for command in (("audit", "verify"), ("peer", "list"), ("import", str(data_dir / "nothing"))):
        capsys.readouterr()
        assert run_cli(*command, "--data", str(data_dir)) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith("safepacs: setting 'index.url' is invalid") and "\n" not in err, err
    assert _snapshot(data_dir) == before
    # The same in safepacs.toml: said, never read as "the SQLite default".
    monkeypatch.delenv("SAFEPACS_INDEX__URL")
    toml = data_dir / "safepacs.toml"
    toml.write_text(toml.read_text().replace("[index]\n", f'[index]\nurl = "{value}"\n'))
    assert run_cli("audit", "verify", "--data", str(data_dir)) == 2
    assert "'index.url'" in capsys.readouterr().err


def test_an_index_url_of_another_kind_is_a_configuration_error(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for url in (
        "mysql://pacs@db/pacs",
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///:memory:?cache=shared",
        "sqlite:///file:x?mode=memory&uri=true",
        "index.sqlite3",
    ):
        monkeypatch.setenv("SAFEPACS_INDEX__URL", url)
        assert run_cli("peer", "list", "--data", str(data_dir)) == 2, url
        err = capsys.readouterr().err.strip()
        assert err.startswith("safepacs: setting 'index.url' is invalid") and "\n" not in err, err
    monkeypatch.setenv("SAFEPACS_INDEX__URL", "postgresql+psycopg://nobody@127.0.0.1:9/none")
    assert run_cli("peer", "list", "--data", str(data_dir)) == 2  # nothing listens on port 9
    err = capsys.readouterr().err.strip()
    assert "check index.url" in err and "\n" not in err and "Traceback" not in err


@pytest.mark.postgres
def test_a_data_directory_on_postgresql_never_opens_a_sqlite_index(
    data_dir: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite_index = data_dir / "index.sqlite3"  # the one init created
    monkeypatch.setenv("SAFEPACS_INDEX__URL", postgres_url)
    assert (
        run_cli("peer", "add", "CT1", "--host", "127.0.0.1", "--allow", "store", "--data", str(data_dir)) == 0
    )
    assert (data_dir / "index-backend").read_text() == "postgresql\n"
    # The setting goes away (or names SQLite): refused, the SQLite index left as it was.
    before = sqlite_index.stat().st_mtime_ns, sqlite_index.stat().st_size
    monkeypatch.delenv("SAFEPACS_INDEX__URL")
    capsys.readouterr()
    for command in (("peer", "list"), ("audit", "verify"), ("doctor", "--no-network")):
        assert run_cli(*command, "--data", str(data_dir)) == 2, command
        err = capsys.readouterr().err.strip()
        assert "'index.url' names SQLite" in err and "PostgreSQL" in err and "\n" not in err, err
    assert (sqlite_index.stat().st_mtime_ns, sqlite_index.stat().st_size) == before
    monkeypatch.setenv("SAFEPACS_INDEX__URL", postgres_url)
    assert run_cli("peer", "list", "--data", str(data_dir)) == 0
    assert "CT1" in capsys.readouterr().out
