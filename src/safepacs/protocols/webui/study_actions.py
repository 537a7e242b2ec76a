"""What a person does to a study from its page: download it as a ZIP of DICOM files
(``GET /studies/{uid}/download``), and for administrators delete it with a reason
(``POST /studies/{uid}/delete``), list the trash (``/studies/trash``) and restore from it
(``POST /studies/{uid}/restore``).

Each goes through the service its protocol counterpart uses, as the signed-in person: the download is
a retrieval of the study by :class:`~safepacs.services.retrieve.RetrieveService` exactly as a WADO-RS
study retrieval (policy and scope, every object checked against what the index recorded, recorded as
110104 with the person, their address and user agent); a deletion is the DICOMweb DELETE's
:class:`~safepacs.services.delete.DeleteService` (soft delete into the trash, retention as configured),
a restore the CLI's :class:`~safepacs.services.restore.RestoreService`.  The reason a person gives
for a deletion or a restore is kept in its audit record.  Deleting and restoring need the ``delete``
service, which only administrators hold; a refusal is recorded by the gate.

The ZIP holds the stored Part 10 files as they are, named by UIDs only
(``STUDY/SERIES/SOP.dcm``), and is streamed as it is made: one instance in memory at a time.  Its
entries are stored, not deflated: compressed transfer syntaxes do not shrink, uncompressed pixel data
shrinks by a third at best, and deflating would cost the HTTPS process (which serves DICOMweb too) a
core for the length of every download.
"""

from __future__ import annotations

import functools
import logging
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydicom.dataset import Dataset
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from safepacs.audit.events import EventID
from safepacs.auth.login import LoginService
from safepacs.errors import AccessDenied, AuditError, IntegrityError, NotFoundError, QueryError, SafePacsError
from safepacs.protocols.dicomweb.retrieval import IncompleteAnswer, MultipartResponse
from safepacs.protocols.webui.render import PageError, page
from safepacs.protocols.webui.studies import _NOT_FOUND, _UID
from safepacs.protocols.webui.visitors import Visitor, checked_form, visitor_of
from safepacs.services.audit import actor
from safepacs.services.delete import DeleteService
from safepacs.services.gate import Gate
from safepacs.services.restore import RestoreService
from safepacs.services.retrieve import RetrieveService
from safepacs.types import InstanceRef, QueryLevel, QueryModel, Service

__all__ = ["MAX_REASON", "study_actions_router", "zip_stream"]

log = logging.getLogger(__name__)

MAX_REASON = 500
_NEED_REASON = "Say why: the reason is kept in the audit trail."


def _study_uid(text: str) -> str:
    if not _UID.match(text) or len(text) > 64:
        raise _NOT_FOUND
    return text


def _reason(fields: dict[str, str]) -> str:
    """The reason given in a form, on one line; a 400 page when there is none."""
    reason = " ".join(fields.get("reason", "").split())[:MAX_REASON]
    if not reason:
        raise PageError(400, "Reason required", _NEED_REASON)
    return reason


class _Chunks:
    """The file a :class:`zipfile.ZipFile` writes into: it keeps what it is given until taken.  It
    cannot seek, so zipfile writes each entry's sizes and CRC after its data (a data descriptor)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes, /) -> int:
        self._chunks.append(bytes(data) if not isinstance(data, bytes) else data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> list[bytes]:
        taken, self._chunks = self._chunks, []
        return taken


def zip_stream(refs: list[InstanceRef], read: Callable[[InstanceRef], bytes]) -> Iterator[bytes]:
    """A ZIP of the instances' Part 10 files as ``read`` gives them, made as it is sent (ZIP64 when it
    needs to be).  An instance that cannot be read (its object failed its check: recorded by ``read``)
    is left out and, once the others are sent, :class:`IncompleteAnswer` ends the answer cut short,
    without the ZIP's central directory: a download that looked whole would hide the loss."""
    sink = _Chunks()
    stamp = time.gmtime()[:6]
    missing = 0
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for ref in refs:
            try:
                data = read(ref)
            except AuditError:
                raise
            except SafePacsError as exc:
                log.warning("a study download left an instance out: %s", exc)
                missing += 1
                continue
            entry = zipfile.ZipInfo(f"{ref.study_uid}/{ref.series_uid}/{ref.sop_instance_uid}.dcm", stamp)
            entry.external_attr = 0o600 << 16
            archive.writestr(entry, data)
            del data
            yield from sink.take()
        if missing:
            raise IncompleteAnswer(missing)
    yield from sink.take()


def _trash_rows(restore: RestoreService) -> list[dict[str, Any]]:
    """The trash by study: UID, instances, when and by whom deleted, until when it can be restored."""
    studies: dict[str, dict[str, Any]] = {}
    for r in restore.trash():
        row = studies.setdefault(
            r.study_instance_uid,
            {
                "uid": r.study_instance_uid,
                "instances": 0,
                "deleted_at": r.deleted_at,
                "by": set(),
                "purge_after": r.purge_after,
            },
        )
        row["instances"] += 1
        row["deleted_at"] = max(row["deleted_at"], r.deleted_at)
        row["purge_after"] = min(row["purge_after"], r.purge_after)
        row["by"].add(r.deleted_by)
    rows = sorted(studies.values(), key=lambda row: row["deleted_at"], reverse=True)
    for row in rows:
        row["by"] = ", ".join(sorted(row["by"]))
    return rows


def study_actions_router(
    logins: LoginService,
    retrieve: RetrieveService,
    deleter: DeleteService,
    restore: RestoreService,
    gate: Gate,
) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def may_delete(visitor: Visitor) -> None:
        """The gate's decision on the ``delete`` service (a refusal recorded): a 403 page for others."""
        try:
            gate.require(visitor.principal, Service.DELETE)
        except AccessDenied:
            raise PageError(403, "Refused", "Only administrators delete and restore studies.") from None

    @router.get("/studies/trash")
    def trash(request: Request) -> HTMLResponse:
        visitor = visitor_of(request, logins)
        may_delete(visitor)
        notice = ""
        params = request.query_params
        if _UID.match(uid := params.get("deleted", "")):
            notice = f"Study {uid} was moved to the trash."
        elif _UID.match(uid := params.get("restored", "")):
            notice = f"Study {uid} was restored."
        return page(request, "trash.html", visitor=visitor, rows=_trash_rows(restore), notice=notice)

    @router.get("/studies/{study}/download")
    def download(request: Request, study: str) -> Response:
        visitor = visitor_of(request, logins)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = QueryLevel.STUDY.value
        identifier.StudyInstanceUID = _study_uid(study)
        event = EventID.INSTANCES_TRANSFERRED
        try:
            refs = retrieve.locate(visitor.principal, Service.GET, QueryModel.STUDY_ROOT, QueryLevel.STUDY,
                                   identifier, event=event, record=False)  # fmt: skip
        except AccessDenied:
            raise PageError(403, "Refused", "Your role does not allow downloading studies.") from None
        except QueryError:
            raise _NOT_FOUND from None
        if not refs:
            raise _NOT_FOUND
        retrieval = retrieve.begin(visitor.principal, refs, event)
        if isinstance(retrieval.first_error, IntegrityError):  # recorded already; nothing sent yet
            raise PageError(500, "Download failed", f"{retrieval.first_error} (recorded in the audit trail).")
        if retrieval.first_error is not None:
            raise PageError(500, "Download failed", str(retrieval.first_error))
        retrieval.record()
        response = MultipartResponse(
            iterate_in_threadpool(zip_stream(refs, retrieval.read)), media_type="application/zip"
        )
        response.headers["Content-Disposition"] = f'attachment; filename="{study}.zip"'
        response.headers["Cache-Control"] = "no-store"
        return response

    @router.post("/studies/{study}/delete")
    async def delete(request: Request, study: str) -> Response:
        visitor: Visitor = await run_in_threadpool(visitor_of, request, logins)
        fields = await checked_form(request, visitor)
        uid = _study_uid(study)
        await run_in_threadpool(may_delete, visitor)
        reason = _reason(fields)
        try:
            await run_in_threadpool(functools.partial(deleter.delete, visitor.principal, uid, reason=reason))
        except (NotFoundError, QueryError, AccessDenied):
            raise _NOT_FOUND from None
        return RedirectResponse(f"/studies/trash?deleted={uid}", status_code=303)

    @router.post("/studies/{study}/restore")
    async def restore_study(request: Request, study: str) -> Response:
        visitor: Visitor = await run_in_threadpool(visitor_of, request, logins)
        fields = await checked_form(request, visitor)
        uid = _study_uid(study)
        await run_in_threadpool(may_delete, visitor)
        reason = _reason(fields)
        try:
            await run_in_threadpool(
                functools.partial(restore.restore, uid, actor(visitor.principal), reason=reason)
            )
        except NotFoundError:
            raise PageError(404, "Not in the trash", f"No deleted instance of study {uid} is kept.") from None
        except IntegrityError as exc:
            raise PageError(500, "Not restored", str(exc)) from None
        return RedirectResponse(f"/studies/trash?restored={uid}", status_code=303)

    return router
