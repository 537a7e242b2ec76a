"""QIDO-RS (PS3.18 10.6): search for studies, series and instances, with C-FIND's matching.

A search becomes a C-FIND identifier (match keys from the query string, return keys from the
level's defaults and ``includefield``) answered by the same index query as C-FIND, so the same
principal gets the same records either way.  Paging is ``limit``/``offset``; when more records
match, the answer says so in a ``Warning: 299`` header (PS3.18 8.3.4.4).  Every record carries its
Retrieve URL (0008,1190), the WADO-RS resource of the study, series or instance (PS3.18 Tables
10.6.3-3 to 10.6.3-5).  A key value ``""`` is Empty Value Matching (PS3.4 C.2.2.2.7) whether or not
``emptyvaluematching=true`` is given (PS3.18 8.3.4.5).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from safepacs.dicom import attributes as A
from safepacs.errors import AccessDenied, QueryError
from safepacs.protocols.dicomweb.problems import Problem, not_found
from safepacs.protocols.dicomweb.requests import DICOM_JSON, checked_uid, media_ranges
from safepacs.types import Principal, QueryLevel

__all__ = ["build_identifier", "qido_router"]

_CONTROL = {"includefield", "limit", "offset", "fuzzymatching", "emptyvaluematching"}
_RETRIEVE_URL = "00081190"
_MAX_OFFSET = 1_000_000

# PS3.18 Tables 10.6.3-3 to 10.6.3-5: what a search returns without includefield (those we index)
_DEFAULTS: dict[QueryLevel, tuple[str, ...]] = {
    QueryLevel.STUDY: (
        "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
        "ReferringPhysicianName", "TimezoneOffsetFromUTC", "PatientName", "PatientID", "PatientBirthDate",
        "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    QueryLevel.SERIES: (
        "StudyInstanceUID", "Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "SeriesInstanceUID",
        "SeriesNumber", "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
    ),
    QueryLevel.IMAGE: (
        "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
        "TimezoneOffsetFromUTC", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
    ),
}  # fmt: skip


def _accepts_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    if not accept:
        return True
    types = {media for media, _ in media_ranges(accept)}
    return bool(types & {DICOM_JSON, "application/json", "application/*", "*/*"})


def _keyword(key: str) -> tuple[int, str]:
    """(tag, keyword) of a query key given as a keyword or eight hex digits (PS3.18 8.3.4.1)."""
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        number = int(key, 16)
        return number, keyword_for_tag(number) or key
    tag = tag_for_keyword(key)
    if tag is None:
        raise Problem(400, "Bad Request", f"unknown attribute {key[:64]!r} in the query")
    return int(tag), key


def _element(tag: int, value: str) -> DataElement | RawDataElement:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise Problem(
            400, "Bad Request", f"attribute ({tag >> 16:04X},{tag & 0xFFFF:04X}) cannot be searched"
        ) from None
    if vr in ("US", "UL", "SS", "SL"):
        try:
            return DataElement(tag, vr, int(value) if value else None)
        except ValueError:
            raise Problem(400, "Bad Request", f"{keyword_for_tag(tag)} must be a number") from None
    if vr == "UI":
        return DataElement(tag, vr, [v.strip() for v in value.split(",")] if "," in value else value)
    if vr in ("IS", "DS"):  # kept as received, like a C-FIND identifier: the parser judges '""' or "x"
        data = value.encode("ascii", "replace")
        return RawDataElement(BaseTag(tag), vr, len(data), data, 0, False, True)
    return DataElement(tag, vr, value)


def _add(identifier: Dataset, key: str, value: str) -> None:
    if "." in key:  # SequenceKeyword.ItemKeyword=value (sequence matching, PS3.4 C.2.2.2.6)
        outer, _, inner = key.partition(".")
        seq_tag, seq_kw = _keyword(outer)
        if seq_kw not in A.SEQUENCE_BY_KEYWORD or "." in inner:
            raise Problem(400, "Bad Request", f"{key[:64]!r} is not a sequence key SafePACS can match")
        if seq_tag not in identifier:
            identifier.add(DataElement(seq_tag, "SQ", Sequence([Dataset()])))
        item = identifier[seq_tag].value[0]
        tag, _ = _keyword(inner)
        item[tag] = _element(tag, value)
        return
    tag, _ = _keyword(key)
    identifier[tag] = _element(tag, value)


def _int(params: Any, name: str, default: int | None, top: int) -> int | None:
    raw = params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > top:
        raise Problem(400, "Bad Request", f"{name} must be a whole number from 0 to {top}")
    return int(raw)


def build_identifier(level: QueryLevel, params: Any, path: dict[str, str]) -> Dataset:
    """The C-FIND identifier of a QIDO-RS request."""
    identifier = Dataset()
    for key in set(params.keys()) - _CONTROL:
        values = params.getlist(key)
        if len(values) > 1:
            raise Problem(400, "Bad Request", f"{key[:64]!r} is given more than once; use a comma list")
        _add(identifier, key, values[0])
    for keyword, uid in path.items():
        uid_tag = int(tag_for_keyword(keyword) or 0)
        identifier[uid_tag] = _element(uid_tag, uid)
    fuzzy = params.get("fuzzymatching", "false").lower()
    if fuzzy not in ("true", "false"):
        raise Problem(400, "Bad Request", "fuzzymatching must be true or false")
    if fuzzy == "true":
        raise Problem(400, "Bad Request", "fuzzy matching is not supported; search with wildcards (*, ?)")
    if params.get("emptyvaluematching", "false").lower() not in ("true", "false"):
        raise Problem(400, "Bad Request", "emptyvaluematching must be true or false")
    include: list[str] = []
    for raw in params.getlist("includefield"):
        include += [part.strip() for part in raw.split(",") if part.strip()]
    if "all" in include:
        include = [
            a.keyword
            for a in A.ATTRIBUTES
            if A.usable_at(level, a.level) and (a.column is not None or a.derived is not None)
        ]
    else:
        include = [_keyword(key)[1] for key in include]
    for keyword in (*_DEFAULTS[level], *include):
        tag = tag_for_keyword(keyword)
        if tag is not None and tag not in identifier:
            identifier.add(DataElement(tag, dictionary_VR(tag), None))
    return identifier


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


#: The query parameters of every QIDO-RS route (PS3.18 8.3.4), declared for the OpenAPI document and
#: the capabilities (WADL); any other matching key (a keyword or tag, PS3.18 8.3.4.1) is accepted too.
_QIDO_PARAMETERS = [
    _query(
        "limit",
        "at most this many results (capped by query.max_results, within one study or series by "
        "query.max_scoped_results)",
        {"type": "integer", "minimum": 1},
    ),
    _query("offset", "skip this many results", {"type": "integer", "minimum": 0}),
    _query("includefield", "more attributes to return (keywords or tags, comma-separated), or 'all'"),
    _query(
        "fuzzymatching",
        "fuzzy matching of person names (not supported: true answers 400)",
        {"type": "boolean"},
    ),
    _query(
        "emptyvaluematching",
        'Empty Value Matching: a key value "" matches empty values (always performed)',
        {"type": "boolean"},
    ),
    _query("PatientName", "person name, wildcards * and ? allowed, case-insensitive"),
    _query("PatientID", "patient ID, wildcards * and ? allowed"),
    _query("StudyDate", "a date (YYYYMMDD) or a range (YYYYMMDD-YYYYMMDD)"),
    _query("AccessionNumber", "accession number, wildcards * and ? allowed"),
    _query("ModalitiesInStudy", "a modality among the study's (e.g. CT)"),
    _query("StudyInstanceUID", "one UID or a comma-separated list of UIDs"),
]


_EXTRA = {"parameters": _QIDO_PARAMETERS}


def _first(result: dict[str, Any], tag: str) -> str:
    values = result.get(tag, {}).get("Value") or [""]
    return str(values[0])


def with_retrieve_urls(results: list[dict[str, Any]], level: QueryLevel, base: str) -> list[dict[str, Any]]:
    """Each result with its Retrieve URL (0008,1190): the WADO-RS resource of the study, series or
    instance it describes (PS3.18 Tables 10.6.3-3 to 10.6.3-5), in place of an empty one."""
    out = []
    for result in results:
        url = f"{base}/studies/{_first(result, '0020000D')}"
        if level is not QueryLevel.STUDY:
            url += f"/series/{_first(result, '0020000E')}"
        if level is QueryLevel.IMAGE:
            url += f"/instances/{_first(result, '00080018')}"
        out.append(dict(sorted({**result, _RETRIEVE_URL: {"vr": "UR", "Value": [url]}}.items())))
    return out


def qido_router(principal_of: Any, search: Any) -> APIRouter:
    """The QIDO-RS routes; ``principal_of(request)`` authenticates, ``search(...)`` is QueryService.search."""
    router = APIRouter()

    def answer(request: Request, level: QueryLevel, path: dict[str, str]) -> JSONResponse:
        principal: Principal = principal_of(request)
        if not _accepts_json(request):
            raise Problem(406, "Not Acceptable", f"search results are {DICOM_JSON}")
        params = request.query_params
        limit = _int(params, "limit", None, 1_000_000)
        offset = _int(params, "offset", 0, _MAX_OFFSET) or 0
        identifier = build_identifier(level, params, path)
        try:
            results, more = search(principal, level, identifier, limit=limit, offset=offset, as_json=True)
        except AccessDenied:
            raise not_found() from None  # never confirm it exists
        except QueryError as exc:
            raise Problem(400, "Bad Request", str(exc)) from None
        headers = {}
        if more:
            headers["Warning"] = '299 SafePACS "There are additional results that can be requested"'
        base = str(request.base_url).rstrip("/") + "/dicomweb"
        return JSONResponse(with_retrieve_urls(results, level, base), media_type=DICOM_JSON, headers=headers)

    @router.get("/studies", summary="Search for studies (QIDO-RS)", openapi_extra=_EXTRA)
    def studies(request: Request) -> JSONResponse:
        return answer(request, QueryLevel.STUDY, {})

    @router.get("/series", summary="Search for series (QIDO-RS)", openapi_extra=_EXTRA)
    def all_series(request: Request) -> JSONResponse:
        return answer(request, QueryLevel.SERIES, {})

    @router.get(
        "/studies/{study}/series", summary="Search for the series of a study (QIDO-RS)", openapi_extra=_EXTRA
    )
    def study_series(request: Request, study: str) -> JSONResponse:
        return answer(request, QueryLevel.SERIES, {"StudyInstanceUID": checked_uid(study)})

    @router.get("/instances", summary="Search for instances (QIDO-RS)", openapi_extra=_EXTRA)
    def all_instances(request: Request) -> JSONResponse:
        return answer(request, QueryLevel.IMAGE, {})

    @router.get(
        "/studies/{study}/instances",
        summary="Search for the instances of a study (QIDO-RS)",
        openapi_extra=_EXTRA,
    )
    def study_instances(request: Request, study: str) -> JSONResponse:
        return answer(request, QueryLevel.IMAGE, {"StudyInstanceUID": checked_uid(study)})

    @router.get(
        "/studies/{study}/series/{series}/instances",
        summary="Search for the instances of a series (QIDO-RS)",
        openapi_extra=_EXTRA,
    )
    def series_instances(request: Request, study: str, series: str) -> JSONResponse:
        return answer(
            request,
            QueryLevel.IMAGE,
            {"StudyInstanceUID": checked_uid(study), "SeriesInstanceUID": checked_uid(series)},
        )

    return router
