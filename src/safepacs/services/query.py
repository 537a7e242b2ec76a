"""The one query path (C-FIND and QIDO-RS): policy, then the index's matching."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from safepacs.auth.policy import require
from safepacs.index import SqlIndex
from safepacs.types import Principal, QueryLevel, QueryModel, Service

__all__ = ["QueryService"]


class QueryService:
    """Answer hierarchical queries (PS3.4 C.4.1) within the per-query result limit."""

    def __init__(self, index: SqlIndex, *, max_results: int, ae_title: str) -> None:
        self._index = index
        self._max_results = max_results or None
        self._ae_title = ae_title

    def find(
        self, principal: Principal, model: QueryModel, level: QueryLevel, identifier: Dataset
    ) -> list[Dataset]:
        """The response identifiers; raises QueryError / QueryLimitError / AccessDenied."""
        require(principal, Service.FIND)
        results = self._index.find(model, level, identifier, self._max_results, principal.scope)
        if "RetrieveAETitle" in identifier:
            for ds in results:
                ds.RetrieveAETitle = self._ae_title
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
        """QIDO-RS: a page of at most ``limit`` (capped at ``query.max_results``) responses after
        ``offset``, and whether more follow; raises QueryError / AccessDenied."""
        require(principal, Service.FIND)
        cap = self._max_results or 10_000
        page = cap if limit is None else max(0, min(limit, cap))
        if page == 0:
            return [], False
        return self._index.search(level, identifier, page, offset, principal.scope, as_json=as_json)
