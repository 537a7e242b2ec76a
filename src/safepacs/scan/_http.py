"""HTTP(S) checks of one endpoint with httpx: Orthanc REST, DICOMweb (QIDO-RS, WADO-RS, WADO-URI),
web viewers, directory listings, CORS with credentials, security headers, plain HTTP.

Only GET requests; QIDO-RS answers are counted (studies, NumberOfStudyRelatedInstances) and dropped.
WADO-RS is asked for the metadata of a study UID that exists nowhere, so nothing is ever retrieved.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from safepacs import __version__
from safepacs.scan._model import safe_text
from safepacs.scan._wire import ProbeTimeout, RateLimiter, permissive_context
from safepacs.scan.fingerprint import match_http

__all__ = ["DICOMWEB_ROOTS", "HttpResult", "QidoRoot", "probe_http"]

#: Where archives usually serve DICOMweb (Orthanc, SafePACS, dcm4chee, many proxies).
DICOMWEB_ROOTS = (
    "/dicom-web",
    "/dicomweb",
    "/wado",
    "/rs",
    "/orthanc/dicom-web",
    "/dcm4chee-arc/aets/DCM4CHEE/rs",
)
WADO_URI_PATHS = ("/wado", "/dicomweb/wado", "/dicom-web/wado")
#: Web viewers and admin UIs that show studies once reachable.
VIEWERS = (
    ("/app/explorer.html", "Orthanc Explorer"),
    ("/ui/app/", "Orthanc Explorer 2"),
    ("/stone-webviewer/index.html", "Stone Web Viewer"),
    ("/osimis-viewer/app/index.html", "Osimis Web Viewer"),
    ("/ohif/", "OHIF Viewer"),
    ("/viewer/", "web viewer"),
    ("/dcm4chee-arc/ui2/", "dcm4chee archive UI"),
    ("/weasis-pacs-connector/", "Weasis PACS connector"),
)
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options")
ORIGIN = "https://safepacs-scan.invalid"
_READ_LIMIT = 32 * 1024 * 1024
_OPEN = frozenset({200, 204, 206})
_AUTH = frozenset({401, 403})
_RANDOM_UID = re.compile(r"2\.25\.\d+")


@dataclass
class QidoRoot:
    path: str
    state: str  # "open" or "auth"
    studies: int | None = None
    images: int | None = None
    capped: bool = False
    wado_rs: str = ""  # "open", "auth" or ""


@dataclass
class HttpResult:
    scheme: str
    answered: bool = False
    redirects_to_https: bool = False
    server: str = ""
    product: str = ""
    version: str = ""
    orthanc_rest: str = ""  # "open", "auth", "forbidden" or ""
    orthanc_dicom_aet: str = ""
    orthanc_dicom_port: int | None = None
    orthanc_studies: int | None = None
    orthanc_instances: int | None = None
    orthanc_patients: int | None = None
    default_credentials: bool | None = None
    qido: list[QidoRoot] = field(default_factory=list)
    wado_uri: str = ""  # "open", "auth" or ""
    wado_uri_path: str = ""
    viewers: list[str] = field(default_factory=list)
    dir_listing: bool = False
    dcm_listed: bool = False
    cors: str = ""  # "reflect-credentials", "wildcard" or ""
    missing_headers: list[str] = field(default_factory=list)
    login_everywhere: bool = False  # every path, one that exists nowhere too, asks for credentials
    error: str = ""  # why the checks stopped early (an answer that did not finish in time)

    @property
    def data_api(self) -> bool:
        """Whether this endpoint serves an API of patient data (open or behind a login)."""
        return bool(self.orthanc_rest in ("open", "auth") or self.qido or self.wado_uri)

    @property
    def lists_data(self) -> bool:
        return bool(self.orthanc_studies or any(q.state == "open" and q.studies for q in self.qido))


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def text(self) -> str:
        return self.body[:65536].decode("utf-8", "replace")


class _Client:
    def __init__(self, base: str, timeout: float, limiter: RateLimiter, verify: ssl.SSLContext) -> None:
        self.limiter = limiter
        self.timeout = timeout
        self._sock: socket.socket | None = None  # of the connection in use (requests are sequential)
        self.http = httpx.Client(
            base_url=base,
            verify=verify,
            timeout=timeout,
            follow_redirects=False,
            headers={"User-Agent": f"safepacs-scan/{__version__}"},
        )

    def get(
        self, path: str, *, headers: dict[str, str] | None = None, auth: tuple[str, str] | None = None
    ) -> _Answer | None:
        """One GET, its body read up to the limit; :class:`ProbeTimeout` when the whole answer takes
        longer than the timeout.  httpx's timeouts bound each read only (a body dribbled byte by byte up
        to the limit would take a year, headers a day): the body loop checks the deadline, and a timer
        shuts the connection's socket down at twice it, which ends a read blocked on dribbled headers
        (a silent server meets httpx's own connect and read timeouts before: no answer, not an error)."""
        self.limiter.wait()
        deadline = time.monotonic() + self.timeout
        expired = threading.Event()
        timer = threading.Timer(2 * self.timeout, self._expire, (expired,))
        timer.daemon = True
        timer.start()
        shown = _RANDOM_UID.sub("2.25.(random)", path.split("?", 1)[0])  # made up, kept out all the same
        late = f"GET {shown}: the answer did not finish in {self.timeout:g} s"
        try:
            extensions = {"trace": self._trace}
            with self.http.stream("GET", path, headers=headers, auth=auth, extensions=extensions) as rsp:
                body = bytearray()
                for chunk in rsp.iter_bytes():
                    body += chunk
                    if len(body) > _READ_LIMIT:
                        break
                    if expired.is_set() or time.monotonic() > deadline:
                        raise ProbeTimeout(late)
                return _Answer(rsp.status_code, {k.lower(): v for k, v in rsp.headers.items()}, bytes(body))
        except (httpx.HTTPError, OSError, ValueError):
            if expired.is_set():
                raise ProbeTimeout(late) from None
            return None
        finally:
            timer.cancel()

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace extension: remember the socket of each new connection (plain, then TLS)."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                self._sock = sock

    def _expire(self, expired: threading.Event) -> None:
        expired.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                # The plain socket's shutdown, also under TLS: the read blocked in the other thread
                # returns; SSLSocket.shutdown would first drop its SSL object under that read.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self.http.close()


def _orthanc(client: _Client, result: HttpResult, try_defaults: bool) -> None:
    rsp = client.get("/system")
    if rsp is None:
        return
    realm = rsp.headers.get("www-authenticate", "")
    system = rsp.json() if rsp.status == 200 else None
    if isinstance(system, dict) and "DicomAet" in system and "Version" in system:
        result.orthanc_rest = "open"
        _orthanc_system(client, result, system, None)
    elif rsp.status == 401 and "Orthanc" in realm:
        result.orthanc_rest = "auth"
        result.product = "Orthanc"
        if try_defaults:
            again = client.get("/system", auth=("orthanc", "orthanc"))
            system = again.json() if again is not None and again.status == 200 else None
            result.default_credentials = isinstance(system, dict)
            if isinstance(system, dict):
                _orthanc_system(client, result, system, ("orthanc", "orthanc"))
    elif rsp.status == 403 and "remote" in rsp.text().lower() and "orthanc" in rsp.text().lower():
        result.orthanc_rest = "forbidden"
        result.product = "Orthanc"


def _orthanc_system(
    client: _Client, result: HttpResult, system: dict[str, Any], auth: tuple[str, str] | None
) -> None:
    result.product = "Orthanc"
    result.version = safe_text(system.get("Version", ""), 24)
    result.orthanc_dicom_aet = safe_text(system.get("DicomAet", ""), 16)
    port = system.get("DicomPort")
    result.orthanc_dicom_port = port if isinstance(port, int) else None
    stats = client.get("/statistics", auth=auth)
    data = stats.json() if stats is not None and stats.status == 200 else None
    if isinstance(data, dict):
        for key, attr in (
            ("CountStudies", "orthanc_studies"),
            ("CountInstances", "orthanc_instances"),
            ("CountPatients", "orthanc_patients"),
        ):
            if isinstance(data.get(key), int):
                setattr(result, attr, data[key])


def _count_qido(body: Any) -> tuple[int, int | None]:
    images: int | None = 0
    for study in body:
        try:
            value = int(study["00201208"]["Value"][0])
        except (KeyError, IndexError, TypeError, ValueError):
            images = None
            continue
        if images is not None:
            images += value
    return len(body), images


def _dicomweb(client: _Client, result: HttpResult, cap: int, baseline: int | None) -> None:
    accept = {"Accept": "application/dicom+json", "Origin": ORIGIN}
    for root in DICOMWEB_ROOTS:
        rsp = client.get(f"{root}/studies?limit=1", headers=accept)
        if rsp is None:
            continue
        product = match_http(rsp.headers, "")
        if product and not result.product:
            result.product = product
        if rsp.status in _AUTH and rsp.status != baseline:
            entry = QidoRoot(root, "auth")
        elif rsp.status == 204 or (rsp.status == 200 and isinstance(rsp.json(), list)):
            entry = QidoRoot(root, "open", studies=0, images=0)
            if rsp.status == 200 and rsp.json():
                full = client.get(f"{root}/studies?limit={cap}&includefield=00201208", headers=accept)
                body = full.json() if full is not None and full.status == 200 else None
                if isinstance(body, list):
                    entry.studies, entry.images = _count_qido(body)
                    entry.capped = entry.studies >= cap
                else:
                    entry.studies, entry.images = 1, None
                del body
            _cors(rsp, result)
        else:
            continue
        meta = client.get(f"{root}/studies/2.25.{uuid.uuid4().int}/metadata", headers=accept)
        if meta is not None:
            entry.wado_rs = "auth" if meta.status in _AUTH else "open" if meta.status < 500 else ""
        result.qido.append(entry)


def _cors(rsp: _Answer, result: HttpResult) -> None:
    allow = rsp.headers.get("access-control-allow-origin", "")
    credentials = rsp.headers.get("access-control-allow-credentials", "").lower() == "true"
    if allow == ORIGIN and credentials:
        result.cors = "reflect-credentials"
    elif allow == "*" and not result.cors:
        result.cors = "wildcard"


def probe_http(
    address: str,
    port: int,
    *,
    tls: bool,
    timeout: float,
    limiter: RateLimiter,
    find_cap: int,
    try_default_credentials: bool,
    host: str = "",
) -> HttpResult:
    """Run the HTTP checks against ``address:port`` (``tls``: HTTPS, certificate not verified here)."""
    scheme = "https" if tls else "http"
    name = host or (f"[{address}]" if ":" in address else address)
    result = HttpResult(scheme)
    client = _Client(f"{scheme}://{name}:{port}", timeout, limiter, permissive_context())
    try:
        _http_checks(client, result, tls, find_cap, try_default_credentials)
    except ProbeTimeout as exc:
        result.error = f"probe timed out ({exc})"
    finally:
        client.close()
    return result


def _http_checks(
    client: _Client, result: HttpResult, tls: bool, find_cap: int, try_default_credentials: bool
) -> None:
    root = client.get("/", headers={"Origin": ORIGIN})
    if root is None:
        return
    result.answered = True
    result.server = safe_text(root.headers.get("server", ""), 48)
    location = root.headers.get("location", "")
    result.redirects_to_https = 300 <= root.status < 400 and location.lower().startswith("https://")
    body = root.text() if root.status == 200 else ""
    result.product = match_http(root.headers, body) or ""
    lowered = body.lower()
    if "<title>index of /" in lowered or "directory listing for" in lowered:
        result.dir_listing = True
        result.dcm_listed = ".dcm" in lowered
    _cors(root, result)
    wanted = SECURITY_HEADERS + (("strict-transport-security",) if tls else ())
    result.missing_headers = [h for h in wanted if h not in root.headers]
    if "x-frame-options" not in root.headers and "frame-ancestors" not in root.headers.get(
        "content-security-policy", ""
    ):
        result.missing_headers.append("x-frame-options")
    # What a path that exists nowhere gets: a server that asks for a login everywhere (or answers
    # 200 everywhere) tells nothing by asking for one on a DICOMweb root or a viewer.
    catch_all = client.get(f"/{secrets.token_hex(8)}")
    baseline = catch_all.status if catch_all is not None else None
    result.login_everywhere = baseline in _AUTH
    _orthanc(client, result, try_default_credentials)
    _dicomweb(client, result, find_cap, baseline)
    for path in WADO_URI_PATHS:
        rsp = client.get(f"{path}?requestType=WADO")
        if rsp is not None and rsp.status in _AUTH and rsp.status != baseline:
            result.wado_uri, result.wado_uri_path = "auth", path
            break
        if rsp is not None and rsp.status in (400, 406, 422) and "wado" in rsp.text().lower():
            result.wado_uri, result.wado_uri_path = "open", path
            break
    if baseline is not None and baseline != 200:
        for path, label in VIEWERS:
            rsp = client.get(path)
            if rsp is not None and rsp.status == 200:
                result.viewers.append(label)
