"""The OHIF viewer's install and serving (protocols/webui/ohif.py) on a small build made here: a real
gzipped tarball shaped like ``npm pack @ohif/app`` (``package/dist``), checked against its own sha512,
rewritten for ``/viewer``, then served through the ASGI app in process.  The real 50 MB package is
tests/integration/test_ohif.py's."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from safepacs.config import load_settings, render_default_toml
from safepacs.protocols.webui import ohif
from safepacs.protocols.webui.ohif import (
    CSP,
    WORKER_CSP,
    ViewerInstallError,
    app_config,
    install,
    installed_version,
    npm_pack,
    rewrite_css,
    rewrite_index_html,
    rewrite_script,
    verify_integrity,
    viewer_app,
    viewer_installed,
)

INDEX = (
    b'<!doctype html><html><head><meta name="msapplication-TileImage" content="/assets/tile.png">'
    b'<script>console.time("scriptToView"),window.PUBLIC_URL="/"</script>'
    b'<link rel="manifest" href="/manifest.json"><link rel="icon" href="/assets/favicon.ico">'
    b'<link rel="preconnect" href="//cdn.example.org"><script src="/app-config.js"></script>'
    b'<script>function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/"</script>'
    b'<script defer src="/app.bundle.0123456789abcdef.js"></script><link href="/app.bundle.css" '
    b'rel="stylesheet"></head><body><div id="root"></div></body></html>'
)
BUILD = {
    "package/package.json": b'{"name": "@ohif/app"}',
    "package/dist/index.html": INDEX,
    "package/dist/app.bundle.0123456789abcdef.js": b'__webpack_require__.p = "/";\nvar home = "/";\n',
    "package/dist/histogram-worker.bundle.fedcba9876543210.js": b'n.p="/",n(n.s=1);x.p="";',
    "package/dist/app.bundle.css": b"@font-face{src:url(/a34f9d1faa5f3315.woff2)}a{b:url(//x.org/y)}",
    "package/dist/a34f9d1faa5f3315.woff2": b"font",
    "package/dist/0ddf166f7a343eda.wasm": b"\0asm\1\0\0\0",
    "package/dist/app-config.js": b"window.config = {qidoRoot: 'https://d14fa38qiwhyfd.cloudfront.net'};",
    "package/dist/manifest.json": b'{"icons": [{"src": "/assets/android-chrome-36x36.png"}]}',
    "package/dist/assets/favicon.ico": b"ico",
    "package/dist/_redirects": b"/* /index.html 200",
}


def integrity_of(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def make_tarball(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return path


@pytest.fixture
def tarball(tmp_path: Path) -> Path:
    return make_tarball(tmp_path / "ohif-app.tgz", BUILD)


@pytest.fixture
def installed(tmp_path: Path, tarball: Path) -> Path:
    target = tmp_path / "share" / "ohif"
    install(target, tarball, integrity=integrity_of(tarball))
    return target


def get(app: object, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as web:
            return await web.get(path, headers=headers)

    return asyncio.run(go())


def site(viewer_dir: Path) -> Starlette:
    return Starlette(routes=[Mount("/viewer", app=viewer_app(viewer_dir))])


# The rewrites -------------------------------------------------------------------------------------


def test_index_links_and_public_url_move_under_the_mount_and_inline_scripts_become_files() -> None:
    html, scripts = rewrite_index_html(INDEX)
    assert b'href="/viewer/manifest.json"' in html and b'href="/viewer/assets/favicon.ico"' in html
    assert b'src="/viewer/app.bundle.0123456789abcdef.js"' in html and b'content="/viewer/assets/tile' in html
    assert b'href="//cdn.example.org"' in html  # protocol-relative: not a path of this build
    assert b"<script>" not in html  # no inline script left for the CSP to allow
    assert html.count(b'<script src="/viewer/safepacs-inline-') == 2
    assert scripts == {
        "safepacs-inline-1.js": b'console.time("scriptToView"),window.PUBLIC_URL="/viewer/"\n',
        "safepacs-inline-2.js": (
            b'function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/viewer/"\n'
        ),
    }


def test_an_index_without_public_url_is_not_the_build_expected() -> None:
    with pytest.raises(ViewerInstallError, match="PUBLIC_URL"):
        rewrite_index_html(b"<html><script src='/x.js'></script></html>")


def test_webpack_public_path_plain_and_minified_and_nothing_else() -> None:
    assert rewrite_script(b'__webpack_require__.p = "/";\nvar home = "/";') == (
        b'__webpack_require__.p = "/viewer/";\nvar home = "/";',
        1,
    )
    assert rewrite_script(b'n.p="/",n(n.s=1);x.p="";y.q="/"') == (
        b'n.p="/viewer/",n(n.s=1);x.p="";y.q="/"',
        1,
    )


def test_css_urls_move_under_the_mount_but_not_other_hosts() -> None:
    css = (
        b"a{src:url(/f.woff2)}b{src:url('/g.png')}c{src:url(\"/h.png\")}"
        b"d{src:url(//x.org/y)}e{src:url(i.png)}"
    )
    assert rewrite_css(css) == (
        b"a{src:url(/viewer/f.woff2)}b{src:url('/viewer/g.png')}c{src:url(\"/viewer/h.png\")}"
        b"d{src:url(//x.org/y)}e{src:url(i.png)}"
    )


def test_app_config_names_only_this_origins_dicomweb() -> None:
    config = app_config()
    assert "routerBasename" in config and '"/viewer"' in config
    assert 'window.location.origin + "/dicomweb"' in config
    assert "http" not in config.replace("window.location", "")  # no host named: nothing to contact
    assert config.count('"sourceName"') == 1 and '"defaultDataSourceName": "safepacs"' in config


# Installing --------------------------------------------------------------------------------------


def test_install_unpacks_dist_rewritten_and_records_the_version(installed: Path) -> None:
    assert installed_version(installed) == ohif.OHIF_VERSION and viewer_installed(installed)
    assert not (installed / "package.json").exists()  # only package/dist is unpacked
    assert not (installed / "_redirects").exists()
    assert b'"/viewer/"' in (installed / "app.bundle.0123456789abcdef.js").read_bytes()
    assert b'n.p="/viewer/"' in (installed / "histogram-worker.bundle.fedcba9876543210.js").read_bytes()
    assert b"url(/viewer/a34f9d1faa5f3315.woff2)" in (installed / "app.bundle.css").read_bytes()
    assert b'"/viewer/assets/android-chrome' in (installed / "manifest.json").read_bytes()
    assert (installed / "safepacs-inline-2.js").is_file()
    config = (installed / "app-config.js").read_text()
    assert "cloudfront" not in config and config == app_config()
    marker = json.loads((installed / ".safepacs-viewer.json").read_text())
    assert marker["version"] == ohif.OHIF_VERSION and marker["mount"] == "/viewer"


def test_a_second_install_of_the_same_version_does_nothing(installed: Path, tarball: Path) -> None:
    (installed / "index.html").write_bytes(b"kept")
    again = install(installed, tarball, integrity=integrity_of(tarball))
    assert again.already and (installed / "index.html").read_bytes() == b"kept"


def test_a_tarball_that_is_not_the_pinned_one_is_refused_before_unpacking(
    tmp_path: Path, tarball: Path
) -> None:
    target = tmp_path / "ohif"
    with pytest.raises(ViewerInstallError, match=r"is not @ohif/app@.*refusing") as caught:
        install(target, tarball)  # the real pin: this tarball is not it
    assert integrity_of(tarball).removeprefix("sha512-") in str(caught.value)
    assert not target.exists() and list(tmp_path.iterdir()) == [tarball]  # nothing left behind


def test_one_changed_byte_fails_the_integrity(tmp_path: Path, tarball: Path) -> None:
    pinned = integrity_of(tarball)
    verify_integrity(tarball, pinned)
    data = bytearray(tarball.read_bytes())
    data[-1] ^= 1
    tarball.write_bytes(bytes(data))
    with pytest.raises(ViewerInstallError, match="refusing"):
        verify_integrity(tarball, pinned)
    with pytest.raises(ViewerInstallError, match="not an npm sha512"):
        verify_integrity(tarball, "sha1-abc")


def test_members_escaping_the_directory_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("package/dist/evil")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bad = make_tarball(tmp_path / "bad.tgz", BUILD, [link])
    with pytest.raises(ViewerInstallError, match="cannot unpack"):
        install(tmp_path / "ohif", bad, integrity=integrity_of(bad))
    assert not (tmp_path / "ohif").exists()


def test_a_tarball_without_a_build_is_refused(tmp_path: Path) -> None:
    bad = make_tarball(tmp_path / "src.tgz", {"package/package.json": b"{}"})
    with pytest.raises(ViewerInstallError, match="no package/dist"):
        install(tmp_path / "ohif", bad, integrity=integrity_of(bad))


def test_a_directory_that_is_not_a_viewer_is_never_replaced(tmp_path: Path, tarball: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(ViewerInstallError, match="not empty"):
        install(home, tarball, integrity=integrity_of(tarball))
    assert (home / "notes.txt").read_text() == "mine"


def test_without_npm_the_message_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ViewerInstallError, match=r"npm is not installed.*apt-get install npm.*--tarball"):
        npm_pack(tmp_path)


# Serving -----------------------------------------------------------------------------------------


def test_files_have_the_viewer_csp_and_hashed_ones_are_cached(installed: Path) -> None:
    app = site(installed)
    bundle = get(app, "/viewer/app.bundle.0123456789abcdef.js")
    assert bundle.status_code == 200 and bundle.headers["content-security-policy"] == WORKER_CSP
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert bundle.headers["cache-control"] == "max-age=31536000, immutable"
    wasm = get(app, "/viewer/0ddf166f7a343eda.wasm")
    assert wasm.headers["content-type"] == "application/wasm" and "immutable" in wasm.headers["cache-control"]
    assert get(app, "/viewer/").headers["cache-control"] == "no-store"
    for path in ("/viewer/", "/viewer/app-config.js", "/viewer/app.bundle.css"):
        answer = get(app, path)
        assert answer.status_code == 200, path
        assert answer.headers["cache-control"] == ("no-store" if path == "/viewer/" else "no-cache"), path
        assert answer.headers["content-security-policy"] == (WORKER_CSP if path.endswith(".js") else CSP)
    page_scripts = CSP.split("script-src")[1].split(";")[0]
    assert "'unsafe-eval'" not in page_scripts and "'unsafe-inline'" not in page_scripts
    etag = get(app, "/viewer/app.bundle.css").headers["etag"]
    again = get(app, "/viewer/app.bundle.css", {"if-none-match": etag})
    assert again.status_code == 304 and again.headers["content-security-policy"] == CSP


def test_client_side_routes_get_index_html_and_missing_files_a_404(installed: Path) -> None:
    app = site(installed)
    index = (installed / "index.html").read_bytes()
    route = get(app, "/viewer/viewer?StudyInstanceUIDs=1.2.3")
    assert (
        route.status_code == 200 and route.content == index and route.headers["cache-control"] == "no-store"
    )
    assert get(app, "/viewer/viewer/dicomweb").content == index
    assert get(app, "/viewer/missing.bundle.0123456789abcdef.js").status_code == 404  # a broken rewrite shows
    assert get(app, "/viewer/.safepacs-viewer.json").status_code == 404
    assert get(app, "/viewer/%2e%2e/%2e%2e/etc/passwd").status_code == 404


def test_before_install_every_path_says_how_to_install(tmp_path: Path, installed: Path) -> None:
    answer = get(site(tmp_path / "nothing"), "/viewer/")
    assert answer.status_code == 404 and "safepacs viewer install" in answer.text
    assert answer.headers["content-security-policy"] == CSP
    assert not viewer_installed(tmp_path / "nothing")


def test_the_setting_defaults_to_the_python_environment_and_can_be_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(tmp_path / "no-data").viewer_dir == Path(sys.prefix) / "share" / "safepacs" / "ohif"
    monkeypatch.setenv("SAFEPACS_UI__VIEWER_DIR", str(tmp_path / "elsewhere"))
    assert load_settings(tmp_path / "no-data").viewer_dir == tmp_path / "elsewhere"
    assert "[ui]\n" in render_default_toml() and '\nviewer_dir = ""\n' in render_default_toml()
