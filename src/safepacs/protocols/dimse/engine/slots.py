"""Values SafePACS keeps on a pynetdicom ``Association`` (its principal, its batch of stores).

pynetdicom gives an association no place for an application's own state; the handlers of its events
receive the association itself.  So values are set as attributes of the ``Association`` object (which
has no ``__slots__``), each under a ``_safepacs_`` name no pynetdicom attribute has.
"""

from __future__ import annotations

from typing import Generic, TypeVar, cast

__all__ = ["AssociationSlot"]

T = TypeVar("T")


class AssociationSlot(Generic[T]):
    """One named value kept on each association (None until it is set)."""

    def __init__(self, attribute: str) -> None:
        if not attribute.startswith("_safepacs_"):
            raise ValueError("an association slot's attribute starts with _safepacs_")
        self.attribute = attribute

    def get(self, assoc: object) -> T | None:
        return cast("T | None", getattr(assoc, self.attribute, None))

    def set(self, assoc: object, value: T | None) -> None:
        setattr(assoc, self.attribute, value)
