"""The posture page in-process: administrators only; the doctor's configuration review run afresh on
each view (a weakened setting and a file opened to others show up), and the latest report of a real
``safepacs scan --save-to-data`` against a real ``safepacs serve`` on 127.0.0.1."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from markupsafe import escape

from safepacs.app import open_archive
from safepacs.config import load_settings
from tests.support.corpus import make_ct
from tests.support.server import run_cli, start_server
from tests.support.ui import add_admin, sign_in
from tests.support.webapp import add_user, inprocess, store

PATIENT, PATIENT_ID = "Quokkafield^Zebediah", "PHIPID7731X"


def test_posture_is_for_administrators(data_dir: Path) -> None:
    with inprocess(data_dir) as (client, archive):
        add_user(archive, "rita", "radiologist")
        r = client.get("/posture", headers=sign_in(client, "rita"))
        assert r.status_code == 403 and "for administrators" in r.text
        assert "index holds patient data" not in r.text
        r = client.get("/posture")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/posture"


def test_posture_shows_the_doctors_findings_as_they_are_now(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = data_dir / "safepacs.toml"
    text = toml.read_text()
    assert "max_results = 500" in text
    toml.write_text(text.replace("max_results = 500", "max_results = 0"))  # a setting the doctor flags
    with inprocess(data_dir) as (client, archive):
        admin = add_admin(client, archive, data_dir, capsys)
        r = client.get("/posture", headers=admin)
        assert r.status_code == 200
        page = r.text
        assert "No limit on query results" in page and "Set query.max_results (default 500)." in page
        assert "The index holds patient data in plain text" in page
        assert '<span class="severity severity-medium">medium</span>' in page
        assert "The listeners are not running" not in page  # no network probe from the server itself
        assert "safepacs.toml readable by others" not in page
        # No scan saved yet: the page says how to make one.
        assert "No scan report has been saved yet." in page
        assert f"--save-to-data {data_dir}" in page

        # Reviewed on every view: a file opened to others shows up at once.
        toml.chmod(0o644)
        page = client.get("/posture", headers=admin).text
        assert "safepacs.toml readable by others" in page and f"chmod 600 {toml}" in page

        # A saved report that is not one is said to be unreadable, not shown.
        report = load_settings(data_dir).scan_report_file
        report.parent.mkdir(mode=0o700)
        report.write_text("{not json")
        page = client.get("/posture", headers=admin).text
        assert f"The saved scan report {report} cannot be shown: it is not JSON." in page


def test_posture_shows_the_latest_scan_of_the_site(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = open_archive(load_settings(data_dir))
    try:  # patient data a stranger's scan must not carry away
        store(archive, make_ct(patient_name=PATIENT, patient_id=PATIENT_ID))
    finally:
        archive.close()
    out = tmp_path / "scan.json"
    server = start_server(data_dir, env={"SAFEPACS_SERVER__SHUTDOWN_GRACE": "0.5"})
    try:
        targets = [
            f"127.0.0.1:{server.port}",
            f"127.0.0.1:{server.https_port}",
            f"127.0.0.1:{server.tls_port}",
        ]
        args = ["--save-to-data", str(data_dir), "--fail-on", "none", "--no-progress", "--timeout", "3"]
        code = run_cli("scan", *targets, *args, "--format", "json", "--out", str(out))
    finally:
        server.stop()
    assert code == 0
    saved = load_settings(data_dir).scan_report_file
    assert f"Report saved to {saved}" in capsys.readouterr().err
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600 and stat.S_IMODE(saved.parent.stat().st_mode) == 0o700
    report = json.loads(saved.read_text())
    assert report["findings"] == json.loads(out.read_text())["findings"]
    assert report["summary"]["endpoints"] == 3
    assert PATIENT.split("^")[0] not in saved.read_text() and PATIENT_ID not in saved.read_text()

    with inprocess(data_dir) as (client, archive):
        admin = add_admin(client, archive, data_dir, capsys)
        page = client.get("/posture", headers=admin).text
    started = report["started_at"][:16].replace("T", " ")
    assert f"safepacs scan ran {started} UTC" in page and "3 open endpoint(s)" in page
    assert report["findings"], "a scan of SafePACS reports at least its facts"
    for finding in report["findings"]:
        for key in ("target", "title", "remediation"):
            assert str(escape(finding[key])) in page
    assert PATIENT.split("^")[0] not in page and PATIENT_ID not in page
    assert "No scan report has been saved yet." not in page


def test_save_to_data_needs_a_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before anything is scanned: a long scan does not fail at its end.
    assert run_cli("scan", "127.0.0.1:9", "--save-to-data", str(tmp_path), "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not a SafePACS data directory" in err and "Traceback" not in err
    assert not (tmp_path / "reports").exists()
