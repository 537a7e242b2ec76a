"""Web UI benchmark (issue 19): the study list at 100,000 studies, and the OHIF viewer on a 500-slice CT.

    python bench/ui.py --workdir /tmp/spbench-ui                 # fill once (~10 min), then measure
    python bench/ui.py --workdir /tmp/spbench-ui --requests 100 --runs 5

What it measures, on one ``safepacs serve`` with the default settings (SQLite index):

* the first page of ``/studies`` (25 rows) over HTTPS with a session cookie, no filter, a patient-name
  prefix, and a page deep in the list (page 40): p50 / p95 of ``--requests`` requests (httpx, one
  keep-alive connection), and the same first page loaded by Chromium (navigation to the load event);
* OHIF: from navigating to ``/viewer/viewer?StudyInstanceUIDs=...`` until the viewport's canvas shows
  the image (a screenshot of it that is not blank), then scrolling through the whole series with the
  arrow key until every slice has been fetched (every instance's frame request answered 200);
* the built-in viewer: time to the first image, and scrolling through every slice.

Corpus: ``--studies`` studies written into the index through its own write path (bench/scale.py's
fill: 10 instances each, ten years of dates, eight modalities), plus one study of ``--slices`` real
512 x 512 CT slices sent through ``safepacs import`` (the ingest path), which the viewers open.
The browser is Debian's Chromium driven by Playwright (tests/support/browser.py has the flags).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from _common import HOST, free_port, git_revision, make_corpus, markdown_table, rich_table
from rich.console import Console
from scale import Corpus, fill

from safepacs.app import open_repositories
from safepacs.auth.passwords import hash_password
from safepacs.config import load_settings
from safepacs.protocols.webui.ohif import viewer_installed

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
SAFEPACS = [sys.executable, "-m", "safepacs"]
CHROMIUM = "/usr/lib/chromium/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
USER, PASSWORD = "bench-ui", "benchmark passphrase"
SEED = 19


def run(argv: list[str]) -> str:
    done = subprocess.run([*SAFEPACS, *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"safepacs {' '.join(argv[:2])} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    return done.stdout


def prepare(workdir: Path, studies: int, slices: int, reload: bool) -> tuple[Path, str, float]:
    """The data directory (filled, with the CT study imported); its CT study UID and the fill seconds."""
    data = workdir / "data"
    marker = workdir / "filled.json"
    spec = {"studies": studies, "slices": slices, "seed": SEED, "version": 1}
    if not reload and marker.exists() and json.loads(marker.read_text())["spec"] == spec:
        saved = json.loads(marker.read_text())
        console.print(f"reusing {data} (filled in {saved['seconds']:.0f} s)")
        return data, saved["study"], saved["seconds"]
    if data.exists():
        subprocess.run(["rm", "-rf", str(data)], check=True)
    workdir.mkdir(parents=True, exist_ok=True)
    run(["init", "--data", str(data)])
    console.print(f"filling the index with {studies:,} studies ...")
    seconds = fill(f"sqlite:///{data / 'index.sqlite3'}", Corpus.make(studies, SEED))
    console.print(f"filled in {seconds:.0f} s; importing a {slices}-slice CT series ...")
    ct = make_corpus(workdir / "corpus", "ui-ct", count=slices, rows=512, cols=512, per_series=slices)
    run(["import", *sorted({str(ct.root / f.split("/")[0]) for f in ct.files}), "--data", str(data)])
    repos = open_repositories(f"sqlite:///{data / 'index.sqlite3'}")
    try:
        repos.directory.add_user(
            USER, hash_password(PASSWORD), frozenset({"radiologist"}), must_change_password=False
        )
    finally:
        repos.close()
    study = _ct_study(data)
    marker.write_text(json.dumps({"spec": spec, "seconds": seconds, "study": study}))
    return data, study, seconds


def _ct_study(data: Path) -> str:
    import sqlite3

    with contextlib.closing(sqlite3.connect(data / "index.sqlite3")) as db:
        row = db.execute(
            "SELECT st.study_instance_uid FROM studies st JOIN series se ON se.study_pk = st.pk "
            "GROUP BY st.pk ORDER BY (SELECT COUNT(*) FROM instances i WHERE i.study_pk = st.pk) DESC LIMIT 1"
        ).fetchone()
    return str(row[0])


class Server:
    def __init__(self, data: Path) -> None:
        self.port = free_port()
        argv = [
            *SAFEPACS,
            "serve",
            "--data",
            str(data),
            "--dicom-port",
            str(free_port()),
            "--http-port",
            str(self.port),
            "--dicom-tls-port",
            str(free_port()),
        ]
        self.log = open(data.parent / "serve.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"https://{HOST}:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                time.sleep(1.0)  # the HTTPS process finishes its start-up
                return
            time.sleep(0.2)
        raise RuntimeError("safepacs serve did not start")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def sign_in(client: httpx.Client, base: str) -> None:
    answer = client.post(
        base + "/login", data={"username": USER, "password": PASSWORD}, headers={"Origin": base}
    )
    if answer.status_code != 303:
        raise RuntimeError(f"sign-in failed: {answer.status_code}")


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def time_pages(server: Server, data: Path, requests: int) -> list[list[str]]:
    context = ssl.create_default_context(cafile=str(data / "keys" / "ca.pem"))
    rows = []
    with httpx.Client(verify=context, timeout=60, follow_redirects=False) as client:
        sign_in(client, server.base)
        first = client.get(server.base + "/studies")
        token = re.search(r'name="form_token" value="([0-9a-f]+)"', first.text)
        if token is None:
            raise RuntimeError("the study list has no search form")
        origin = {"Origin": server.base}
        for label, fields, rows_expected in (  # the page (GET), and the search form's posts
            ("first page, no filter", None, 25),
            ("first page, name prefix", {"name": "Ka"}, None),
            ("page 40, no filter", {"page": "40"}, 25),
        ):
            samples = []
            for _ in range(requests):
                t0 = time.perf_counter()
                if fields is None:
                    answer = client.get(server.base + "/studies")
                else:
                    data = {**fields, "form_token": token.group(1)}
                    answer = client.post(server.base + "/studies", data=data, headers=origin)
                samples.append(time.perf_counter() - t0)
                shown = len(re.findall(r'<a href="/studies/[0-9.]+">', answer.text))
                if answer.status_code != 200 or (rows_expected and shown != rows_expected) or not shown:
                    raise RuntimeError(f"{label}: {answer.status_code}, {shown} rows")
            rows.append(
                [
                    f"study list over HTTPS, {label}",
                    f"{_pct(samples, 50) * 1000:.0f} ms",
                    f"{_pct(samples, 95) * 1000:.0f} ms",
                    f"{requests} requests, {shown} rows",
                ]
            )
    return rows


#: The standard deviation of a canvas's grey levels (0: blank), read from the canvas itself.
CANVAS_SPREAD = """c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0, sum = 0, squares = 0;
  for (let i = 0; i < d.length; i += 4) {
    const g = (d[i] + d[i + 1] + d[i + 2]) / 3;
    n++; sum += g; squares += g * g;
  }
  const mean = sum / n;
  return Math.sqrt(Math.max(squares / n - mean * mean, 0));
}"""


def _browser_page(browser: Any, base: str) -> Any:
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(base + "/login")
    page.get_by_label("User name").fill(USER)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base + "/studies")
    return page


def time_browser(server: Server, study: str, slices: int, runs: int, ohif: bool) -> list[list[str]]:
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            loads = []
            for _ in range(runs):
                page = _browser_page(browser, server.base)
                t0 = time.perf_counter()
                page.goto(server.base + "/studies")
                loads.append(time.perf_counter() - t0)
                page.context.close()
            rows.append(
                [
                    "study list in Chromium (navigation to load)",
                    f"{statistics.median(loads) * 1000:.0f} ms",
                    f"{max(loads) * 1000:.0f} ms (max)",
                    f"{runs} runs",
                ]
            )
            rows += _builtin(browser, server, study, slices, runs)
            if ohif:
                rows += _ohif(browser, server, study, slices, runs)
        finally:
            browser.close()
    return rows


def _builtin(browser: Any, server: Server, study: str, slices: int, runs: int) -> list[list[str]]:
    firsts, scrolls = [], []
    for _ in range(runs):
        page = _browser_page(browser, server.base)
        page.goto(f"{server.base}/studies/{study}")
        link = page.locator("ul.series a").first.get_attribute("href")
        t0 = time.perf_counter()
        page.goto(server.base + str(link))
        page.wait_for_function(
            "() => document.getElementById('frame').complete && "
            "document.getElementById('frame').naturalWidth > 0"
        )
        firsts.append(time.perf_counter() - t0)
        box = page.locator("#viewer")
        box.focus()
        for _ in range(slices):
            box.press("ArrowUp")
        shown = (
            "n => document.getElementById('viewer-status').textContent.startsWith('Image ' + n + ' ')"
            " && document.getElementById('frame').complete"
        )
        page.wait_for_function(shown, arg=1)
        t0 = time.perf_counter()
        for n in range(2, slices + 1):  # each slice shown (its image loaded) before the next key
            box.press("ArrowDown")
            page.wait_for_function(shown, arg=n)
        scrolls.append(time.perf_counter() - t0)
        page.context.close()
    return [
        [
            "built-in viewer: first image",
            f"{statistics.median(firsts) * 1000:.0f} ms",
            f"{max(firsts) * 1000:.0f} ms (max)",
            f"{runs} runs",
        ],
        [
            f"built-in viewer: scroll through {slices} slices, each shown",
            f"{statistics.median(scrolls):.1f} s",
            f"{max(scrolls):.1f} s (max)",
            f"{slices / statistics.median(scrolls):.0f} slices/s",
        ],
    ]


class _Fetched:
    """Which instances' images a viewer fetched (answered 200), and the requests that failed."""

    def __init__(self, answered: set[str], failed: list[str]) -> None:
        self.answered, self.failed = answered, failed

    def __call__(self, response: Any) -> None:
        found = re.search(r"/instances/([0-9.]+)(/frames|/rendered|$)", response.url)
        if found and "/dicomweb/" in response.url:
            if response.status == 200:
                self.answered.add(found.group(1))
            else:
                self.failed.append(f"{response.status} {response.url[-80:]}")


def _ohif_first_image(page: Any, url: str) -> float:
    """Seconds from navigating to ``url`` until OHIF's viewport canvas holds an image."""
    t0 = time.perf_counter()
    page.goto(url)
    canvas = page.locator("canvas.cornerstone-canvas").first
    canvas.wait_for()
    while canvas.evaluate(CANVAS_SPREAD) < 5:
        if time.perf_counter() - t0 > 60:
            raise RuntimeError("OHIF showed no image within 60 s")
        time.sleep(0.02)
    return time.perf_counter() - t0


def _ohif(browser: Any, server: Server, study: str, slices: int, runs: int) -> list[list[str]]:
    """Per run, a new browser profile: OHIF opened cold (nothing cached), scrolled through, then
    opened again as a returning radiologist would (its hashed bundles cached, the series not)."""
    cold, warm, scrolls, fetched = [], [], [], []
    url = f"{server.base}/viewer/viewer?StudyInstanceUIDs={study}"
    for _ in range(runs):
        page = _browser_page(browser, server.base)
        answered: set[str] = set()
        failed: list[str] = []
        page.on("response", _Fetched(answered, failed))
        cold.append(_ohif_first_image(page, url))
        for dismiss in ("Skip all", "Confirm and hide"):  # OHIF's first-visit tour and banner
            button = page.get_by_text(dismiss, exact=True)
            if button.count() and button.first.is_visible():
                button.first.click()
        page.locator("canvas.cornerstone-canvas").first.click()
        t0 = time.perf_counter()
        for _ in range(slices):
            page.keyboard.press("ArrowDown")
        deadline = time.perf_counter() + 120
        while len(answered) < slices and time.perf_counter() < deadline:
            page.wait_for_timeout(100)
        scrolls.append(time.perf_counter() - t0)
        fetched.append(len(answered))
        if failed:
            raise RuntimeError(f"OHIF requests failed: {failed[:5]}")
        page.goto(server.base + "/studies")
        warm.append(_ohif_first_image(page, url))
        page.context.close()

    def row(label: str, values: list[float]) -> list[str]:
        return [
            label,
            f"{statistics.median(values) * 1000:.0f} ms",
            f"{max(values) * 1000:.0f} ms (max)",
            f"{runs} runs",
        ]

    return [
        row("OHIF: first image after 'Open in viewer', first visit (nothing cached)", cold),
        row("OHIF: first image after 'Open in viewer', viewer's files cached", warm),
        [
            f"OHIF: scroll through {slices} slices until every one is fetched",
            f"{statistics.median(scrolls):.1f} s",
            f"{max(scrolls):.1f} s (max)",
            f"slices fetched: {min(fetched)}-{max(fetched)} of {slices}",
        ],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/spbench-ui"))
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reload", action="store_true", help="fill again even if the workdir has the corpus")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    data, study, fill_seconds = prepare(args.workdir, args.studies, args.slices, args.reload)
    load_before = os.getloadavg()[0]
    server = Server(data)
    try:
        ohif = viewer_installed(load_settings(data).viewer_dir)
        rows = time_pages(server, data, args.requests)
        rows += time_browser(server, study, args.slices, args.runs, ohif)
        if not ohif:
            rows.append(["OHIF", "-", "-", "not installed (safepacs viewer install)"])
    finally:
        server.stop()
    header = (
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs ({platform.machine()}), load average "
        f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after, SafePACS{git_revision()}, "
        f"{args.studies:,} studies (index filled in {fill_seconds:.0f} s) + one {args.slices}-slice CT "
        "study; "
        f"`python bench/ui.py {shlex.join(argv if argv is not None else sys.argv[1:])}`"
    )
    headers = ["measure", "p50 / median", "p95 / max", "notes"]
    console.print(header)
    console.print(rich_table(rows, "Web UI", headers))
    if args.markdown:
        args.markdown.write_text(header + "\n\n" + markdown_table(rows, "Web UI", headers) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
