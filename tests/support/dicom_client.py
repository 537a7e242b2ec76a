"""pynetdicom SCU helpers for the tests (the requesting side, as a viewer or modality would be)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

# Send files as they are on disk (no decode/re-encode), so what comes back can be compared byte for byte.
_config.STORE_SEND_CHUNKED_DATASET = True

FIND_CONTEXTS = [
    build_context(PatientRootQueryRetrieveInformationModelFind),
    build_context(StudyRootQueryRetrieveInformationModelFind),
]


def file_context(path: Path) -> tuple[str, str]:
    meta = read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


@contextmanager
def associate(
    port: int,
    contexts: Iterable[Any],
    *,
    calling: str = "VIEWER",
    called: str = "SAFEPACS",
    host: str = "127.0.0.1",
    bind_address: tuple[str, int] | None = None,
    ext_neg: list[Any] | None = None,
    handlers: list[Any] | None = None,
    tls_args: tuple[Any, str | None] | None = None,
) -> Iterator[Any]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.requested_contexts = list(contexts)
    kwargs: dict[str, Any] = {
        "ae_title": called,
        "ext_neg": ext_neg,
        "evt_handlers": handlers,
        "tls_args": tls_args,
    }
    if bind_address is not None:
        kwargs["bind_address"] = bind_address
    assoc = ae.associate(host, port, **kwargs)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def rejection(assoc: Any) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ."""
    rsp = assoc.acceptor.primitive
    return (rsp.result, rsp.result_source, rsp.diagnostic)


def store_files(port: int, paths: list[Path], *, calling: str = "MODALITY") -> dict[Path, int]:
    """C-STORE each file as it is on disk; the status per file."""
    pairs = sorted({file_context(p) for p in paths})
    statuses: dict[Path, int] = {}
    for start in range(0, len(pairs), 120):
        chunk = pairs[start : start + 120]
        by_class: dict[str, list[str]] = {}
        for sop, ts in chunk:
            by_class.setdefault(sop, []).append(ts)
        contexts = [build_context(sop, [ts]) for sop, ts in chunk]
        wanted = set(chunk)
        with associate(port, contexts, calling=calling) as assoc:
            assert assoc.is_established, "association for C-STORE was not accepted"
            for path in paths:
                if file_context(path) in wanted:
                    rsp = assoc.send_c_store(path)
                    statuses[path] = int(rsp.Status) if "Status" in rsp else -1
    return statuses


def c_find(
    port: int,
    identifier: Dataset,
    *,
    model: Any = StudyRootQueryRetrieveInformationModelFind,
    calling: str = "VIEWER",
) -> tuple[list[Dataset], Dataset]:
    """All pending identifiers and the final status data set."""
    results: list[Dataset] = []
    final = Dataset()
    with associate(port, FIND_CONTEXTS, calling=calling) as assoc:
        assert assoc.is_established
        for status, ds in assoc.send_c_find(identifier, model):
            if status is None or "Status" not in status:
                raise AssertionError("no C-FIND response")
            if status.Status in (0xFF00, 0xFF01):
                results.append(ds)
            else:
                final = status
    return results, final


def c_get(
    port: int,
    identifier: Dataset,
    storage: list[tuple[str, list[str]]],
    *,
    calling: str = "VIEWER",
    model: Any = StudyRootQueryRetrieveInformationModelGet,
) -> tuple[dict[str, tuple[str, bytes]], Dataset]:
    """C-GET; returns {SOP Instance UID: (transfer syntax, received data set bytes)} and the final status."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            event.request.DataSet.getvalue(),
        )
        return 0x0000

    contexts = [build_context(model)] + [build_context(sop, ts) for sop, ts in storage]
    roles = [build_role(sop, scp_role=True) for sop, _ in storage]
    final = Dataset()
    with associate(
        port, contexts, calling=calling, ext_neg=roles, handlers=[(evt.EVT_C_STORE, on_store)]
    ) as assoc:
        assert assoc.is_established
        for status, ident in assoc.send_c_get(identifier, model):
            if status is not None and "Status" in status and status.Status != 0xFF00:
                final = status
                if ident is not None and "FailedSOPInstanceUIDList" in ident:
                    final.FailedSOPInstanceUIDList = ident.FailedSOPInstanceUIDList
    return received, final


def c_move(port: int, identifier: Dataset, destination: str, *, calling: str = "VIEWER") -> Dataset:
    final = Dataset()
    model = StudyRootQueryRetrieveInformationModelMove
    with associate(port, [build_context(model)], calling=calling) as assoc:
        assert assoc.is_established
        for status, _ in assoc.send_c_move(identifier, destination, model):
            if status is not None and "Status" in status and status.Status != 0xFF00:
                final = status
    return final


def echo(port: int, **kwargs: Any) -> Any:
    with associate(port, [build_context(Verification)], **kwargs) as assoc:
        if not assoc.is_established:
            return assoc
        return assoc.send_c_echo()
