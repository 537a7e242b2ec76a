"""The OHIF Viewer: installed from npm, checked, rewritten for ``/viewer``, and served from the same origin.

OHIF (``@ohif/app``, MIT) ships a built single-page app in its npm package (``package/dist``, about
200 MB with the wasm decoders).  :func:`install` gets the package with ``npm pack`` (or takes a tarball
fetched elsewhere), refuses it unless its SHA-512 equals the registry's integrity pinned here, and
unpacks ``dist`` with tarfile's ``data`` filter.  The build assumes it is served at ``/``, so the
install rewrites it for :data:`MOUNT`: the absolute links of ``index.html``, webpack's public path in
every script, ``url(/`` in every stylesheet.  ``index.html``'s two inline scripts become files, so that
the Content-Security-Policy needs no ``'unsafe-inline'`` for scripts.  ``app-config.js`` is replaced by
one that knows a single data source, this server's ``/dicomweb``: the default one points at a public
demo server the browser must never contact.  A marker file records what was installed, so a second
install of the same version does nothing.

:func:`viewer_app` serves the directory: every file with the viewer's CSP (workers and wasm from the
same origin, ``blob:`` workers, nothing from elsewhere), hashed bundles cacheable for a year (they hold
no PHI), ``index.html`` never cached (it answers OHIF's client-side routes, whose URLs name studies),
everything else revalidated.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from safepacs.errors import SafePacsError

if TYPE_CHECKING:
    from starlette.responses import Response
    from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "CSP",
    "INSTALL_HINT",
    "MOUNT",
    "OHIF_INTEGRITY",
    "OHIF_PACKAGE",
    "OHIF_VERSION",
    "WORKER_CSP",
    "Installed",
    "ViewerInstallError",
    "app_config",
    "install",
    "installed_version",
    "rewrite_css",
    "rewrite_icon_paths",
    "rewrite_index_html",
    "rewrite_script",
    "verify_integrity",
    "viewer_app",
    "viewer_installed",
]

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
#: ``npm view @ohif/app@3.13.2 dist.integrity``: the tarball is refused unless its SHA-512 is this.
OHIF_INTEGRITY = (
    "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
)
MOUNT = "/viewer"
#: Where the DICOMweb service is, on the viewer's own origin.
DICOMWEB_ROOT = "/dicomweb"

INSTALL_HINT = (
    "the OHIF viewer is not installed: run 'safepacs viewer install' (needs npm, e.g. "
    "'apt-get install npm'); the built-in viewer works without it"
)

_POLICY = (
    "default-src 'self'; script-src 'self' {eval}; worker-src 'self' blob:; "
    "img-src 'self' data: blob:; connect-src 'self'; style-src 'self' 'unsafe-inline'; "
    "font-src 'self' data:; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
#: The page's policy, what OHIF needs and nothing more: its scripts, workers (some from ``blob:`` URLs)
#: and wasm from this origin, images and fonts it makes itself (``data:``, ``blob:``), DICOMweb on this
#: origin.  Found in Chromium: with it OHIF reports no violation, and the page evaluates no string.
CSP = _POLICY.format(eval="'wasm-unsafe-eval'")
#: The policy of a script answer, which is the policy of a worker started from that script (a
#: ``<script src>`` in the page is governed by the page's policy alone).  The image decoders of the
#: DICOM image loader's worker are Emscripten builds whose embind glue makes functions with
#: ``new Function``: without ``'unsafe-eval'`` every compressed image (JPEG, JPEG-LS, JPEG 2000, RLE)
#: fails to decode.  Workers have no DOM, cookies or page to act on, so this is kept to them.
WORKER_CSP = _POLICY.format(eval="'unsafe-eval' 'wasm-unsafe-eval'")
_IMMUTABLE = "max-age=31536000, immutable"
_REVALIDATE = "no-cache"
#: index.html answers OHIF's routes, whose URLs name studies: none of them goes into a cache.
_UNCACHED = "no-store"
#: webpack names its chunks, workers, wasm and fonts after a 16-hex-digit content hash.
_HASHED = re.compile(r"(?:^|[.])[0-9a-f]{16}\.(?:js|wasm|woff2?)$")
#: Types ``mimetypes`` may not know on every system; wasm must be ``application/wasm`` to stream.
_SCRIPTS = frozenset({".js", ".mjs"})
_MEDIA_TYPES = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript"}

_MARKER = ".safepacs-viewer.json"
_DIST = "package/dist/"
#: Netlify's files and the demo's config: of no use here (the config is replaced).
_DROPPED = ("_headers", "_redirects", "serve.json")
_NPM_TIMEOUT = 900.0


class ViewerInstallError(SafePacsError):
    """The viewer could not be installed (no npm, a tarball that is not the pinned one, a bad build)."""


@dataclass(frozen=True, slots=True)
class Installed:
    """What :func:`install` did: the version now in ``directory``, and whether it was there already."""

    version: str
    directory: Path
    already: bool


def installed_version(viewer_dir: Path) -> str | None:
    """The OHIF version installed in ``viewer_dir`` by :func:`install`, or None."""
    try:
        marker = json.loads((viewer_dir / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    version = marker.get("version") if isinstance(marker, dict) else None
    if not isinstance(version, str) or not (viewer_dir / "index.html").is_file():
        return None
    return version


def viewer_installed(viewer_dir: Path) -> bool:
    return installed_version(viewer_dir) is not None


# The rewrites ------------------------------------------------------------------------------------

_INDEX_LINK = re.compile(rb'\b(href|src|content)="/(?!/)')
_INDEX_PUBLIC_URL = re.compile(rb'(window\.PUBLIC_URL\s*=\s*)"/"')
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)
_WEBPACK_PATH = re.compile(rb'(__webpack_require__\.p\s*=\s*|\b[A-Za-z_$][\w$]*\.p=)"/"')
_CSS_URL = re.compile(rb"""url\((['"]?)/(?!/)""")
_ICON_PATH = re.compile(rb'"/assets/')
#: The web app manifest and the tile and browser manifests it names: icon paths under ``/assets``.
_ICON_MANIFESTS = ("manifest.json", "assets/browserconfig.xml", "assets/yandex-browser-manifest.json")


def rewrite_index_html(html: bytes, mount: str = MOUNT) -> tuple[bytes, dict[str, bytes]]:
    """``index.html`` for ``mount``, and the scripts that were inline in it (file name -> content).

    Every root-relative ``href``/``src``/``content`` gets the mount as prefix, ``window.PUBLIC_URL`` becomes
    ``mount/``; each inline ``<script>`` becomes ``<script src="mount/safepacs-inline-N.js">``.
    """
    prefix = mount.encode()
    if not _INDEX_PUBLIC_URL.search(html):
        raise ViewerInstallError("index.html does not set window.PUBLIC_URL: not the OHIF build expected")
    html = _INDEX_PUBLIC_URL.sub(rb'\1"' + prefix + rb'/"', html)
    html = _INDEX_LINK.sub(rb'\1="' + prefix + rb"/", html)
    scripts: dict[str, bytes] = {}

    def external(match: re.Match[bytes]) -> bytes:
        name = f"safepacs-inline-{len(scripts) + 1}.js"
        scripts[name] = match.group(1).strip() + b"\n"
        return b'<script src="' + prefix + b"/" + name.encode() + b'"></script>'

    return _INLINE_SCRIPT.sub(external, html), scripts


def rewrite_script(script: bytes, mount: str = MOUNT) -> tuple[bytes, int]:
    """A script with webpack's public path ``"/"`` set to ``mount/``; how many were changed."""
    return _WEBPACK_PATH.subn(rb'\1"' + mount.encode() + rb'/"', script)


def rewrite_css(css: bytes, mount: str = MOUNT) -> bytes:
    """A stylesheet whose root-relative ``url(/...)`` point under ``mount``."""
    return _CSS_URL.sub(rb"url(\1" + mount.encode() + b"/", css)


def rewrite_icon_paths(manifest: bytes, mount: str = MOUNT) -> bytes:
    """A manifest (JSON or the tiles' XML) whose ``"/assets/...`` icons are under ``mount``."""
    return _ICON_PATH.sub(b'"' + mount.encode() + b"/assets/", manifest)


def app_config(mount: str = MOUNT, dicomweb: str = DICOMWEB_ROOT) -> str:
    """OHIF's ``app-config.js``: routes under ``mount``, one DICOMweb data source, this origin's ``dicomweb``.

    The roots are absolute URLs made in the browser from its own origin, so the session cookie goes
    with every request (same origin: no CORS, no second login) and no other host is ever named.
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "safepacs",
        "configuration": {
            "friendlyName": "SafePACS",
            "name": "safepacs",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
            "dicomUploadEnabled": False,
        },
    }
    settings = {
        "name": "safepacs",
        "routerBasename": mount,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "dev",
        "defaultDataSourceName": "safepacs",
        "dataSources": [source],
    }
    root = json.dumps(dicomweb)
    return (
        "// Written by 'safepacs viewer install': one data source, this server's DICOMweb service.\n"
        "(function () {\n"
        f"  var config = {json.dumps(settings, indent=2)};\n"
        f"  var root = window.location.origin + {root};\n"
        "  var source = config.dataSources[0].configuration;\n"
        "  source.qidoRoot = root;\n"
        "  source.wadoRoot = root;\n"
        "  source.wadoUriRoot = root;\n"
        "  window.config = config;\n"
        "})();\n"
    )


# Installing -----------------------------------------------------------------------------------


def verify_integrity(tarball: Path, integrity: str = OHIF_INTEGRITY) -> None:
    """Refuse ``tarball`` unless its digest is the npm ``integrity`` (``sha512-<base64>``)."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512" or not expected:
        raise ViewerInstallError(f"integrity {integrity!r} is not an npm sha512 integrity")
    digest = hashlib.sha512()
    try:
        with tarball.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ViewerInstallError(f"cannot read {tarball}: {exc.strerror or exc}") from exc
    actual = base64.b64encode(digest.digest()).decode()
    if not hmac.compare_digest(actual, expected):
        raise ViewerInstallError(
            f"{tarball} is not {OHIF_PACKAGE}@{OHIF_VERSION}: its sha512 is {actual}, the registry's "
            f"integrity is {expected}; refusing to install it"
        )


def npm_pack(into: Path, spec: str = f"{OHIF_PACKAGE}@{OHIF_VERSION}") -> Path:
    """``npm pack spec`` in ``into``: the tarball's path.  npm checks it against the registry too."""
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerInstallError(
            "npm is not installed, so the OHIF viewer cannot be downloaded: install it (e.g. "
            f"'apt-get install npm') and run 'safepacs viewer install' again, or run 'npm pack {spec}' "
            "on a machine that has npm and pass the file with --tarball"
        )
    try:
        done = subprocess.run(
            [npm, "pack", spec, "--json", "--ignore-scripts", "--pack-destination", str(into)],
            cwd=into,
            capture_output=True,
            text=True,
            timeout=_NPM_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ViewerInstallError(f"'npm pack {spec}' took more than {_NPM_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise ViewerInstallError(f"'npm pack {spec}' failed: {reason}")
    tarballs = sorted(into.glob("*.tgz"))
    if len(tarballs) != 1:
        raise ViewerInstallError(f"'npm pack {spec}' left no tarball in {into}")
    return tarballs[0]


def _unpack_dist(tarball: Path, into: Path) -> Path:
    """``package/dist`` of ``tarball`` unpacked under ``into`` (the data filter: no links out, no devices)."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(_DIST)]
            if not members:
                raise ViewerInstallError(f"{tarball} holds no {_DIST}: not a built OHIF viewer")
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ViewerInstallError(f"cannot unpack {tarball}: {exc}") from exc
    return into / _DIST


def _rewrite_tree(dist: Path, mount: str) -> None:
    index = dist / "index.html"
    if not index.is_file():
        raise ViewerInstallError("the OHIF build has no index.html")
    html, scripts = rewrite_index_html(index.read_bytes(), mount)
    index.write_bytes(html)
    for name, content in scripts.items():
        (dist / name).write_bytes(content)
    public_paths = 0
    for path in sorted(dist.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix in (".js", ".mjs"):
            script, count = rewrite_script(path.read_bytes(), mount)
            if count:
                path.write_bytes(script)
                public_paths += count
        elif path.suffix == ".css":
            path.write_bytes(rewrite_css(path.read_bytes(), mount))
    if not public_paths:
        raise ViewerInstallError(
            "no script of the OHIF build sets webpack's public path: not the build expected"
        )
    for name in _ICON_MANIFESTS:
        with contextlib.suppress(FileNotFoundError):
            (dist / name).write_bytes(rewrite_icon_paths((dist / name).read_bytes(), mount))
    for name in _DROPPED:
        with contextlib.suppress(FileNotFoundError):
            (dist / name).unlink()
    (dist / "app-config.js").write_text(app_config(mount), encoding="utf-8")


def _marker(mount: str, integrity: str) -> dict[str, str]:
    return {"package": OHIF_PACKAGE, "version": OHIF_VERSION, "integrity": integrity, "mount": mount}


def install(
    viewer_dir: Path,
    tarball: Path | None = None,
    *,
    mount: str = MOUNT,
    fetch: Callable[[Path], Path] = npm_pack,
    integrity: str = OHIF_INTEGRITY,
) -> Installed:
    """Install the pinned OHIF viewer into ``viewer_dir``, from ``tarball`` or else ``fetch`` (``npm pack``).

    Nothing is done when the same version is installed there for the same mount.  The new tree is
    built beside ``viewer_dir`` and swapped in at the end: an install that fails leaves the old one.
    A directory holding anything but a viewer installed here is refused, never replaced.
    ``integrity`` is for the tests of the install itself, on tarballs they make.
    """
    try:
        marker = json.loads((viewer_dir / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    if marker == _marker(mount, integrity) and viewer_installed(viewer_dir):
        return Installed(OHIF_VERSION, viewer_dir, already=True)
    if marker is None and viewer_dir.is_dir() and any(viewer_dir.iterdir()):
        raise ViewerInstallError(
            f"{viewer_dir} is not empty and holds no viewer installed by SafePACS; "
            "name a new or empty directory (it is replaced as a whole)"
        )
    try:
        viewer_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ViewerInstallError(f"cannot create {viewer_dir.parent}: {exc.strerror or exc}") from exc
    with tempfile.TemporaryDirectory(prefix=f".{viewer_dir.name}-", dir=viewer_dir.parent) as work:
        staging = Path(work)
        if tarball is None:
            download = staging / "npm"
            download.mkdir()
            tarball = fetch(download)
        verify_integrity(tarball, integrity)
        dist = _unpack_dist(tarball, staging / "unpacked")
        _rewrite_tree(dist, mount)
        (dist / _MARKER).write_text(json.dumps(_marker(mount, integrity)) + "\n", encoding="utf-8")
        old = staging / "old"
        if viewer_dir.exists():
            os.replace(viewer_dir, old)
        os.replace(dist, viewer_dir)
    return Installed(OHIF_VERSION, viewer_dir, already=False)


# Serving --------------------------------------------------------------------------------------


def viewer_app(viewer_dir: Path) -> ASGIApp:
    """The ASGI app serving ``viewer_dir`` (to be mounted at :data:`MOUNT`).

    A path naming no file and whose last segment has no dot is one of OHIF's client-side routes
    (``/viewer/viewer?StudyInstanceUIDs=...``): it gets ``index.html``.  A missing file that looks
    like one (``x.js``) is a 404, so that a broken rewrite shows.  Dot files (the marker) are never
    served.  Until the viewer is installed every request gets a 404 saying how to install it.
    """
    from starlette.exceptions import HTTPException
    from starlette.responses import PlainTextResponse
    from starlette.staticfiles import StaticFiles

    class ViewerFiles(StaticFiles):
        async def get_response(self, path: str, scope: Scope) -> Response:
            parts = PurePosixPath(path.replace(os.sep, "/")).parts
            if any(part.startswith(".") and part != "." for part in parts):
                raise HTTPException(status_code=404)
            try:
                response = await super().get_response(path, scope)
                name = parts[-1] if parts else "index.html"
            except HTTPException as exc:
                if exc.status_code != 404 or (parts and "." in parts[-1]):
                    raise
                response = await super().get_response("index.html", scope)
                name = "index.html"
            suffix = PurePosixPath(name).suffix
            if suffix in _MEDIA_TYPES and response.status_code == 200:
                response.headers["content-type"] = _MEDIA_TYPES[suffix]
            response.headers["content-security-policy"] = WORKER_CSP if suffix in _SCRIPTS else CSP
            if name == "index.html":
                response.headers["cache-control"] = _UNCACHED
            else:
                response.headers["cache-control"] = _IMMUTABLE if _HASHED.search(name) else _REVALIDATE
            return response

    files: list[StaticFiles] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if not files:
            if not viewer_installed(viewer_dir):
                response = PlainTextResponse(
                    INSTALL_HINT.capitalize() + ".\n", 404, headers={"content-security-policy": CSP}
                )
                await response(scope, receive, send)
                return
            files.append(ViewerFiles(directory=viewer_dir, html=True))
        await files[0](scope, receive, send)

    return app
