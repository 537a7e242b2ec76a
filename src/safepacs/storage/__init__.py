"""Encrypted object storage: where sealed DICOM objects live and the keys that seal them.

:class:`BlobStore` keeps opaque bytes under random ids (:class:`FileBlobStore` on disk,
:class:`MemoryBlobStore` for tests); :class:`EnvelopeCipher` seals objects with AES-256-GCM
under per-object data keys wrapped by a :class:`KeyProvider`'s key-encryption keys.
"""

from __future__ import annotations

from safepacs.storage.blobstore import (
    BlobStore,
    FileBlobStore,
    MemoryBlobStore,
    StagedBlob,
    is_valid_blob_id,
    new_blob_id,
)
from safepacs.storage.crypto import (
    EnvelopeCipher,
    FileKeyProvider,
    KeyProvider,
    MemoryKeyProvider,
    is_valid_key_id,
)

__all__ = [
    "BlobStore",
    "EnvelopeCipher",
    "FileBlobStore",
    "FileKeyProvider",
    "KeyProvider",
    "MemoryBlobStore",
    "MemoryKeyProvider",
    "StagedBlob",
    "is_valid_blob_id",
    "is_valid_key_id",
    "new_blob_id",
]
