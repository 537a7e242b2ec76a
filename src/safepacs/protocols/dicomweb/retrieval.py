"""What every retrieve route shares (WADO-RS, its frames, bulk data and rendered resources, WADO-URI):
finding the instances a path names through the retrieve service, re-encoding a stored instance,
and writing ``multipart/related`` bodies (PS3.18 8.6.1, RFC 2387).

:func:`locate` is the one place a retrieve route reaches the archive: the retrieve service asks the
policy for :attr:`~safepacs.types.Service.GET` and the index for what the principal may see; "not
there" and "not for you" both answer ``404 no such resource``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse
from starlette.types import Send

from safepacs.audit.events import EventID
from safepacs.dicom.transcode import transcode
from safepacs.errors import AccessDenied, QueryError
from safepacs.protocols.dicomweb.problems import not_found
from safepacs.protocols.dicomweb.requests import checked_uid
from safepacs.services.ingest import file_meta
from safepacs.services.retrieve import RetrieveService
from safepacs.types import InstanceRef, Principal, QueryLevel, QueryModel, Service

__all__ = [
    "AS_STORED",
    "UNCOMPRESSED",
    "IncompleteAnswer",
    "MultipartResponse",
    "Part",
    "boundary",
    "locate",
    "multipart",
    "multipart_length",
    "multipart_media",
    "multipart_stream",
    "part10_as",
    "read_one",
]

log = logging.getLogger(__name__)

#: ``transfer-syntax=*``: as stored (PS3.18 8.7.3.5.2).
AS_STORED = "*"
UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
_PREAMBLE = b"\x00" * 128 + b"DICM"
_LEVEL_KEYS = {
    QueryLevel.STUDY: ("StudyInstanceUID",),
    QueryLevel.SERIES: ("StudyInstanceUID", "SeriesInstanceUID"),
    QueryLevel.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}

#: One part of a multipart body: its Content-Type and its content (bytes, or chunks streamed in turn).
Part = tuple[str, bytes | Iterable[bytes]]


def locate(
    retrieve: RetrieveService,
    principal: Principal,
    uids: Iterable[str],
    *,
    event: EventID = EventID.INSTANCES_TRANSFERRED,
    record: bool = True,
) -> list[InstanceRef]:
    """The instances under a study, series or instance (the UIDs of the path, in that order) that
    ``principal`` may retrieve; 400 for a malformed UID, 404 when there are none.  Recorded as
    ``event``: 110104 when the instances themselves go out, 110103 for what is derived from them
    (metadata, frames, bulk data, rendered images).  ``record=False``: the route records with
    :meth:`RetrieveService.record` once its own checks pass (a 406 is not a transfer)."""
    values = [checked_uid(uid) for uid in uids]
    level = {1: QueryLevel.STUDY, 2: QueryLevel.SERIES, 3: QueryLevel.IMAGE}[len(values)]
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level.value
    for keyword, uid in zip(_LEVEL_KEYS[level], values, strict=True):
        setattr(identifier, keyword, uid)
    try:
        refs = retrieve.locate(
            principal, Service.GET, QueryModel.STUDY_ROOT, level, identifier, event=event, record=record
        )
    except (AccessDenied, QueryError):
        refs = []
    if not refs:  # nothing there, or nothing this principal may see: the same answer
        raise not_found()
    return refs


def read_one(
    retrieve: RetrieveService, principal: Principal, uids: Iterable[str], *, event: EventID
) -> tuple[InstanceRef, bytes]:
    """The one instance an instance path names (404 as :func:`locate`) and its stored bytes, read and
    checked before its retrieval is recorded as ``event``: a damaged object raises its
    :class:`~safepacs.errors.IntegrityError` (a 500 problem), recorded as a Security Alert and a failed
    retrieval, and nothing is recorded as handed out."""
    ref = locate(retrieve, principal, uids, event=event, record=False)[0]
    stored = retrieve.fetch(principal, ref, event)
    retrieve.record(principal, [ref], event)
    return ref, stored


def part10_as(ref: InstanceRef, stored: bytes, target: str) -> tuple[str, bytes]:
    """(transfer syntax, Part 10 bytes) of a stored instance in ``target`` (``*``: as stored).

    Raises :class:`~safepacs.errors.RetrieveError` when the conversion is impossible.
    """
    if target in (AS_STORED, ref.transfer_syntax_uid):
        return ref.transfer_syntax_uid, stored
    encoded = transcode(stored, target)
    return target, b"".join((_PREAMBLE, file_meta(ref.sop_class_uid, ref.sop_instance_uid, target), encoded))


def boundary() -> str:
    return secrets.token_hex(16)


def multipart_media(part_type: str, mark: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={mark}'


def _head(mark: str, content_type: str, length: int | None) -> bytes:
    """The delimiter and headers of one part (its Content-Length when it is known)."""
    size = "" if length is None else f"Content-Length: {length}\r\n"
    return f"--{mark}\r\nContent-Type: {content_type}\r\n{size}\r\n".encode("ascii")


def _close(mark: str) -> bytes:
    return f"--{mark}--\r\n".encode("ascii")


def multipart(parts: Iterable[Part], mark: str) -> Iterator[bytes]:
    """A ``multipart/related`` body, streamed part by part (RFC 2046 5.1.1).

    A part given as bytes gets a Content-Length; a part given as chunks is streamed without one.
    """
    for content_type, content in parts:
        if isinstance(content, bytes):
            yield _head(mark, content_type, len(content))
            yield content
        else:
            yield _head(mark, content_type, None)
            yield from content
        yield b"\r\n"
    yield _close(mark)


def multipart_length(parts: Iterable[tuple[str, int]], mark: str) -> int:
    """The exact length of the :func:`multipart` body of parts given as bytes, from their Content-Types
    and lengths alone: an answer whose length is known before its parts are read is sent with a
    Content-Length instead of the chunked coding, whose framing costs the server a copy of every
    chunk (h11 joins the chunk header, the chunk and its CRLF into one buffer)."""
    return sum(len(_head(mark, ctype, size)) + size + 2 for ctype, size in parts) + len(_close(mark))


class IncompleteAnswer(Exception):
    """Raised by the parts of a :class:`MultipartResponse` once the others are sent, when some could not
    be (a stored object that failed its integrity check): the answer must not look complete."""

    def __init__(self, missing: int) -> None:
        super().__init__(f"{missing} part(s) left out")
        self.missing = missing


class MultipartResponse(StreamingResponse):
    """A streamed ``multipart/related`` answer that ends *incomplete* when its parts raise
    :class:`IncompleteAnswer`: without the closing delimiter, and without the end of the HTTP body (the
    last chunk of the chunked transfer coding, RFC 9112 7.1, or the rest of the ``content_length``
    announced), so the server closes the connection and every HTTP client reports the answer as cut
    short instead of taking the parts it got for all of them.  The status (200) and the headers went
    out before the failure was known; PS3.18 has no way to say it later.

    ``content_length``: the exact length of the body when it is known beforehand
    (:func:`multipart_length`); its parts must then come to exactly that, or end it cut short.
    """

    def __init__(
        self, content: AsyncIterator[bytes], *, media_type: str, content_length: int | None = None
    ) -> None:
        headers = None if content_length is None else {"Content-Length": str(content_length)}
        super().__init__(content, media_type=media_type, headers=headers)

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                data = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(self.charset)
                await send({"type": "http.response.body", "body": data, "more_body": True})
        except IncompleteAnswer as exc:
            log.warning("a multipart answer was cut short: %s", exc)
            return  # the response is not completed: the server closes the connection
        await send({"type": "http.response.body", "body": b"", "more_body": False})


#: About how many bytes of a multipart body :func:`multipart_stream` makes per trip to the thread pool.
BATCH_BYTES = 1024 * 1024
#: Pieces smaller than this (boundaries, part headers, small parts) are joined into one chunk.
_SMALL = 64 * 1024


def _next_batch(chunks: Iterator[bytes], limit: int) -> tuple[list[bytes], bool, Exception | None]:
    """The next chunks of ``chunks``, about ``limit`` bytes, with runs of small ones joined (a large
    one is passed on as it is, not copied); whether ``chunks`` is exhausted; the exception it raised,
    if it did, after the chunks it gave before."""
    out: list[bytes] = []
    small: list[bytes] = []
    size = 0

    def join_small() -> None:
        if small:
            out.append(small[0] if len(small) == 1 else b"".join(small))
            small.clear()

    try:
        for chunk in chunks:
            if len(chunk) < _SMALL:
                small.append(chunk)
            else:
                join_small()
                out.append(chunk)
            size += len(chunk)
            if size >= limit:
                join_small()
                return out, False, None
    except Exception as exc:  # noqa: BLE001 - raised again by multipart_stream, after what came before
        join_small()
        return out, False, exc
    join_small()
    return out, True, None


async def multipart_stream(
    parts: Iterable[Part], mark: str, batch: int = BATCH_BYTES
) -> AsyncIterator[bytes]:
    """:func:`multipart` for a :class:`~starlette.responses.StreamingResponse`, which would otherwise
    pull each boundary, part header and content through the thread pool on its own: here ``parts``
    are made (read, decrypted, checked) in the thread pool about ``batch`` bytes at a time, and the
    small pieces between contents go out joined.  At most about ``batch`` bytes plus one part are
    held at a time; a failure of ``parts`` ends the body where it happened, as with :func:`multipart`.
    """
    chunks = multipart(parts, mark)
    done = False
    while not done:
        block, done, failure = await run_in_threadpool(_next_batch, chunks, batch)
        for chunk in block:
            yield chunk
        if failure is not None:
            raise failure
