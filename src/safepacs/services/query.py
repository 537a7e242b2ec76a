"""The one query path (C-FIND and QIDO-RS): policy, then the index's matching, then the audit record."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from safepacs.db.ports import Instances
from safepacs.errors import AuditError, SafePacsError
from safepacs.services.audit import Auditor, query_text
from safepacs.services.gate import Gate
from safepacs.types import Principal, QueryLevel, QueryModel, Service

__all__ = ["QIDO_RS", "QueryService"]

#: What the audit record of a QIDO-RS search names in place of a C-FIND SOP Class UID.
QIDO_RS = "QIDO-RS"

_FIND_CLASSES = {
    QueryModel.PATIENT_ROOT: "1.2.840.10008.5.1.4.1.2.1.1",
    QueryModel.STUDY_ROOT: "1.2.840.10008.5.1.4.1.2.2.1",
}


def _patient_key(identifier: Dataset) -> str | None:
    """The patient a query names by a single PatientID (no wildcard, no list), for the audit record."""
    raw = identifier.get("PatientID", "")
    if not isinstance(raw, str):  # a list of IDs (pydicom's MultiValue for "P1\\P2") names no one patient
        return None
    value = raw.strip()
    return value if value and not any(c in value for c in "*?\\") else None


#: (0008,0054) Retrieve AE Title: answered with the archive's own AE title when asked for.
_RETRIEVE_AE_TITLE = 0x00080054
_T = TypeVar("_T")

#: The largest QIDO-RS page when ``query.max_results`` is 0 (no limit for C-FIND).
_UNLIMITED_PAGE = 10_000


class QueryService:
    """Answer hierarchical queries (PS3.4 C.4.1) within the per-query result limit.

    The limit is there so that no principal can list the archive: a query gets at most
    ``max_results`` answers, except one within a single study or series (it names one Study or
    Series Instance UID, :attr:`~safepacs.dicom.matching.Query.scoped`), which may list all of it up
    to ``max_scoped_results``.  ``max_results`` 0 lifts both limits.

    Every query is recorded (110112, with its keys and how many answers it had) before any answer is
    returned; a refused or failed one too, with the reason.
    """

    def __init__(
        self,
        instances: Instances,
        audit: Auditor,
        gate: Gate,
        *,
        max_results: int,
        ae_title: str,
        max_scoped_results: int | None = None,
    ) -> None:
        self._instances = instances
        self._audit = audit
        self._gate = gate
        self._max_results = max_results or None
        scoped = max(max_results, max_scoped_results or 0)
        self._max_scoped = scoped if max_results else None
        self._ae_title = ae_title

    def _record(
        self, principal: Principal, model: str, identifier: Dataset, results: int | None, why: str | None
    ) -> None:
        self._audit.queried(
            principal,
            model,
            query_text(identifier),
            results=results,
            patient_id=_patient_key(identifier),
            why=why,
        )

    def find(
        self, principal: Principal, model: QueryModel, level: QueryLevel, identifier: Dataset
    ) -> list[Dataset]:
        """The response identifiers; raises QueryError / QueryLimitError / AccessDenied / AuditError."""
        results = self._find(
            principal,
            model,
            identifier,
            lambda limit, scoped: self._instances.find(
                model, level, identifier, limit, principal.scope, scoped_limit=scoped
            ),
        )
        if "RetrieveAETitle" in identifier:
            for ds in results:
                ds.RetrieveAETitle = self._ae_title
        return results

    def find_encoded(
        self,
        principal: Principal,
        model: QueryModel,
        level: QueryLevel,
        identifier: Dataset,
        *,
        implicit_vr: bool,
    ) -> list[bytes | None]:
        """:meth:`find` with each response identifier encoded as pynetdicom would encode :meth:`find`'s
        (Implicit or Explicit VR Little Endian; None for one it could not encode), for the C-FIND
        responses the DIMSE adapter writes itself; the same policy, limits and audit record."""
        fill = {_RETRIEVE_AE_TITLE: self._ae_title} if "RetrieveAETitle" in identifier else {}
        return self._find(
            principal,
            model,
            identifier,
            lambda limit, scoped: self._instances.find_encoded(
                model,
                level,
                identifier,
                limit,
                principal.scope,
                implicit_vr=implicit_vr,
                fill=fill,
                scoped_limit=scoped,
            ),
        )

    def _find(
        self,
        principal: Principal,
        model: QueryModel,
        identifier: Dataset,
        run: Callable[[int | None, int | None], list[_T]],
    ) -> list[_T]:
        self._gate.require(principal, Service.FIND)
        try:
            results = run(self._max_results, self._max_scoped)
        except AuditError:
            raise
        except SafePacsError as exc:
            self._record(principal, _FIND_CLASSES[model], identifier, None, str(exc))
            raise
        self._record(principal, _FIND_CLASSES[model], identifier, len(results), None)
        return results

    def search(
        self,
        principal: Principal,
        level: QueryLevel,
        identifier: Dataset,
        *,
        limit: int | None,
        offset: int,
        as_json: bool = False,
    ) -> tuple[list[Any], bool]:
        """QIDO-RS: a page of at most ``limit`` (capped at ``query.max_results``, or within one study or
        series at ``query.max_scoped_results``) responses after ``offset``, and whether more follow;
        raises QueryError / AccessDenied / AuditError."""
        self._gate.require(principal, Service.FIND)
        cap = self._max_results or _UNLIMITED_PAGE
        scoped_cap = max(cap, self._max_scoped or 0)
        page = cap if limit is None else max(0, min(limit, cap))
        scoped_page = scoped_cap if limit is None else max(0, min(limit, scoped_cap))
        if scoped_page == 0:
            self._record(principal, QIDO_RS, identifier, 0, None)
            return [], False
        try:
            found = self._instances.search(
                level, identifier, page, offset, principal.scope, as_json=as_json, scoped_limit=scoped_page
            )
        except AuditError:
            raise
        except SafePacsError as exc:
            self._record(principal, QIDO_RS, identifier, None, str(exc))
            raise
        self._record(principal, QIDO_RS, identifier, len(found[0]), None)
        return found
