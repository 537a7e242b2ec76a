"""The one retrieve path (C-GET, C-MOVE now; WADO later): locate, authorize, read and verify."""

from __future__ import annotations

import hashlib

from pydicom.dataset import Dataset

from safepacs.auth.policy import require
from safepacs.errors import IntegrityError
from safepacs.index import SqlIndex
from safepacs.storage import BlobStore, EnvelopeCipher
from safepacs.types import InstanceRef, Principal, QueryLevel, QueryModel, Service

__all__ = ["RetrieveService"]


class RetrieveService:
    """Find the instances a retrieve names and hand out their verified bytes."""

    def __init__(self, index: SqlIndex, blobs: BlobStore, cipher: EnvelopeCipher) -> None:
        self._index = index
        self._blobs = blobs
        self._cipher = cipher

    def locate(
        self, principal: Principal, action: Service, model: QueryModel, level: QueryLevel, identifier: Dataset
    ) -> list[InstanceRef]:
        """The instances under the identifier's unique keys (PS3.4 C.4.2.2.1, C.4.3.2.1) that the
        principal may see: others are treated as if they did not exist."""
        require(principal, action)
        return self._index.instances_for(model, level, identifier, principal.scope)

    def read(self, ref: InstanceRef) -> bytes:
        """The stored Part 10 bytes, decrypted and checked against the SHA-256 kept in the index."""
        part10 = self._cipher.open(self._blobs.get(ref.blob.blob_id))
        if hashlib.sha256(part10).hexdigest() != ref.blob.sha256:
            raise IntegrityError(
                "a stored object does not match its recorded SHA-256; restore it from backup"
            )
        return part10
