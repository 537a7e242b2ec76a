"""How deeply the sequences of a data set nest, read from its bytes without recursion (PS3.5 7.5).

**Level.** The top-level data set is at level 0; the items of a sequence element of a data set at
level *n* are at level *n* + 1.  SafePACS stores a data set whose items are at most at level
:data:`MAX_SEQUENCE_DEPTH` (32): 32 sequences nested one in another's item are stored, a 33rd inside
the innermost item is refused.  A sequence without items adds no level.

pydicom reads and writes sequences recursively, a few Python frames per level, so a data set nested a
few hundred levels deep fails (``RecursionError``) when it is read, converted to DICOM JSON or copied.
The walk here keeps an explicit stack instead and looks at element headers only:

* an element is a sequence when its VR is SQ; when its length is undefined and it is not encapsulated
  pixel data (an undefined length UN is a sequence in implicit VR, PS3.5 6.2.2); or when its VR is
  unknown (implicit VR) or UN and its value starts with an Item (PS3.5 7.5.1), which is how pydicom
  may read it;
* items of undefined length end at their Item Delimitation Item, sequences at their Sequence
  Delimitation Item; items in an explicit VR data set may be written in implicit VR, which is told,
  as pydicom tells it, from the first element's VR bytes;
* a sequence of defined length too short to hold items down to the limit is stepped over unread
  (each level needs at least an item header and an element header, 16 bytes), so a CT slice's small
  sequences cost nothing;
* anything not well formed (a tag other than an Item in a sequence, a value running past its item or
  sequence) makes the innermost enclosing value of defined length opaque: it is stepped over by its
  length, as pydicom steps over what it does not read.  With no such value around it, the walk
  cannot tell where the data set goes on (:class:`Unwalkable`) and pydicom's reader judges.

:func:`check` is ingest's test (also done in the same pass as the fast header read,
:func:`element_end`); :func:`prune` gives the bytes of an object stored before the limit was enforced
with the items deeper than the limit left out, so that it can still be read.
"""

from __future__ import annotations

import struct

from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from safepacs.errors import InvalidObjectError

__all__ = [
    "MAX_SEQUENCE_DEPTH",
    "TOO_DEEP",
    "Unwalkable",
    "check",
    "element_end",
    "exceeds",
    "min_nesting_bytes",
    "prune",
]

#: The deepest level an item may be at (see the module).
MAX_SEQUENCE_DEPTH = 32
TOO_DEEP = f"the data set is nested deeper than {MAX_SEQUENCE_DEPTH} sequence levels"

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = frozenset(str(v).encode("ascii") for v in EXPLICIT_VR_LENGTH_32)
_SQ, _UN = b"SQ", b"UN"


#: Per byte order (little endian: True): tag and 4-byte length, explicit VR header, 4-byte length, Item tag.
_ENCODINGS = {
    little: (
        struct.Struct(order + "HHL"),
        struct.Struct(order + "HH2sH"),
        struct.Struct(order + "L"),
        struct.pack(order + "HH", 0xFFFE, 0xE000),
    )
    for little, order in ((True, "<"), (False, ">"))
}
_ITEM_LE = _ENCODINGS[True][3]


class Unwalkable(Exception):
    """The bytes are not well formed where no enclosing value of defined length bounds them; ``truncated``
    when a header or value runs past the end of the data."""

    def __init__(self, truncated: bool) -> None:
        super().__init__("truncated" if truncated else "not well formed")
        self.truncated = truncated


class _Odd(Exception):
    def __init__(self, truncated: bool = False) -> None:
        super().__init__()
        self.truncated = truncated


class _TooDeep(Exception):
    pass


class _Frame:
    """An open value: a sequence's items (``item`` False) or an item's data set (``item`` True)."""

    __slots__ = ("end", "implicit", "item", "length_at", "start", "top")

    def __init__(
        self, item: bool, start: int, end: int, length_at: int, implicit: bool, top: bool = False
    ) -> None:
        self.item = item
        self.start = start  # where the value begins
        self.end = end  # where it ends; -1: undefined length, ends at its delimiter
        self.length_at = length_at  # where its 4-byte length is; -1: undefined length or none
        self.implicit = implicit
        self.top = top  # the top-level data set


def min_nesting_bytes(level: int, limit: int = MAX_SEQUENCE_DEPTH) -> int:
    """The shortest value of a sequence at ``level`` (its items at ``level`` + 1) that can hold an item
    deeper than ``limit``: an item header per level down to limit + 1, an element header between."""
    return 16 * (limit - level) + 8


class _Walk:
    def __init__(self, data: bytes, little_endian: bool, limit: int, *, prune: bool = False) -> None:
        self.data = data
        self.size = len(data)
        self.limit = limit
        self.prune = prune
        self.tag_length, self.explicit, self.long, self.item_tag = _ENCODINGS[little_endian]
        #: Item runs to leave out: (first byte, end, where the lengths of the values around them are).
        self.cuts: list[tuple[int, int, tuple[int, ...]]] = []
        #: While the items of an undefined length sequence are being left out: (its place on the stack,
        #: where its first item begins).
        self.pruning: tuple[int, int] | None = None

    # The walk --------------------------------------------------------------------------------------
    def run(self, stack: list[_Frame], pos: int) -> int:
        """Walk until the frames in ``stack`` are closed; the offset after the outermost one."""
        level = sum(1 for f in stack if f.item and not f.top)
        while stack:
            frame = stack[-1]
            try:
                if frame.item:
                    pos, level = self._in_item(stack, frame, pos, level)
                else:
                    pos, level = self._in_sequence(stack, frame, pos, level)
            except _Odd as odd:
                for k in range(len(stack) - 1, -1, -1):
                    if stack[k].end >= 0 and not stack[k].top:
                        break
                else:
                    raise Unwalkable(odd.truncated) from None
                opaque = stack[k]
                pos = opaque.end
                del stack[k:]
                if self.pruning is not None and self.pruning[0] >= k:
                    self.pruning = None
                self.cuts = [c for c in self.cuts if c[0] < opaque.start]
                level = sum(1 for f in stack if f.item and not f.top)
        return pos

    def _in_sequence(self, stack: list[_Frame], frame: _Frame, pos: int, level: int) -> tuple[int, int]:
        end = frame.end
        if end >= 0 and pos >= end:
            if pos > end:
                raise _Odd
            stack.pop()
            return pos, level
        if self.size - pos < 8 or (end >= 0 and end - pos < 8):
            raise _Odd(self.size - pos < 8)
        group, element, length = self.tag_length.unpack_from(self.data, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END and end < 0:
            stack.pop()
            if self.pruning is not None and self.pruning[0] == len(stack):
                self._cut(stack, self.pruning[1], pos, frame)
                self.pruning = None
            return pos + 8, level
        if tag != _ITEM:
            raise _Odd
        content = pos + 8
        if length == _UNDEFINED:
            item_end = -1
        else:
            item_end = content + length
            if item_end > self.size:
                raise _Odd(True)
            if end >= 0 and item_end > end:
                raise _Odd
        if level + 1 > self.limit and self.pruning is None:
            if not self.prune:
                raise _TooDeep
            if end >= 0:  # every item of this sequence is that deep: leave them all out
                stack.pop()
                self._cut(stack, pos, end, frame)
                return end, level
            self.pruning = (len(stack) - 1, pos)
        implicit = frame.implicit or self._looks_implicit(content)
        stack.append(_Frame(True, content, item_end, -1 if item_end < 0 else pos + 4, implicit))
        return content, level + 1

    def _in_item(self, stack: list[_Frame], frame: _Frame, pos: int, level: int) -> tuple[int, int]:
        end = frame.end
        data = self.data
        if end >= 0 and (pos >= end or (frame.top and end - pos < 8)):
            if pos > end:
                raise _Odd
            stack.pop()
            return pos, level - (0 if frame.top else 1)
        if self.size - pos < 8 or (end >= 0 and end - pos < 8):
            raise _Odd(self.size - pos < 8)
        vr: bytes | None
        if frame.implicit:
            group, element, length = self.tag_length.unpack_from(data, pos)
            vr, value_at = None, pos + 8
        else:
            group, element, vr, length = self.explicit.unpack_from(data, pos)
            value_at = pos + 8
            if group == 0xFFFE or not b"AA" <= vr <= b"ZZ":  # no VR: pydicom reads it as implicit VR
                group, element, length = self.tag_length.unpack_from(data, pos)
                vr = None
            elif vr in _LONG_VRS:
                if self.size - pos < 12:
                    raise _Odd(True)
                length = self.long.unpack_from(data, pos + 8)[0]
                value_at = pos + 12
        tag = group << 16 | element
        if group == 0xFFFE:
            if tag == _ITEM_END and end < 0 and not frame.top:
                stack.pop()
                return value_at, level - 1
            raise _Odd
        if length == _UNDEFINED:
            if vr in (_SQ, _UN) or (vr is None and tag != _PIXEL_DATA):
                stack.append(_Frame(False, value_at, -1, -1, frame.implicit))
                return value_at, level
            return self.fragments(value_at), level
        value_end = value_at + length
        if value_end > self.size:
            raise _Odd(True)
        if end >= 0 and value_end > end:
            raise _Odd
        if (
            self.pruning is None
            and (vr == _SQ or ((vr is None or vr == _UN) and data[value_at : value_at + 4] == self.item_tag))
            and length >= min_nesting_bytes(level, self.limit)
        ):
            stack.append(_Frame(False, value_at, value_end, value_at - 4, frame.implicit))
            return value_at, level
        return value_end, level

    def fragments(self, pos: int) -> int:
        """Past the items of encapsulated pixel data (fragments, PS3.5 A.4) and its delimiter."""
        while True:
            if self.size - pos < 8:
                raise _Odd(True)
            group, element, length = self.tag_length.unpack_from(self.data, pos)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise _Odd
            pos += length
            if pos > self.size:
                raise _Odd(True)

    def _looks_implicit(self, content: int) -> bool:
        """Whether an item in an explicit VR data set is written in implicit VR, told as pydicom does: the
        first element's VR bytes are not two capital letters."""
        vr = self.data[content + 4 : content + 6]
        return len(vr) == 2 and not (0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B)

    def _cut(self, stack: list[_Frame], start: int, end: int, sequence: _Frame) -> None:
        around = [f.length_at for f in (*stack, sequence) if f.length_at >= 0]
        if end > start:
            self.cuts.append((start, end, tuple(around)))

    # The result ------------------------------------------------------------------------------------
    def pruned(self) -> bytes:
        """The data with the cuts left out and the lengths around them made shorter by as much."""
        removed: dict[int, int] = {}
        for start, end, around in self.cuts:
            for at in around:
                removed[at] = removed.get(at, 0) + end - start
        edits = sorted([(at, at + 4, -1) for at in removed] + [(s, e, 0) for s, e, _ in self.cuts])
        out: list[bytes] = []
        pos = 0
        for start, end, kind in edits:
            out.append(self.data[pos:start])
            if kind < 0:
                out.append(self.long.pack(self.long.unpack_from(self.data, start)[0] - removed[start]))
            pos = end
        out.append(self.data[pos:])
        return b"".join(out)


def _top(data: bytes, implicit: bool) -> _Frame:
    if len(data) >= 6:  # pydicom tells the top-level encoding from the first element too
        implicit = not (0x40 < data[4] < 0x5B and 0x40 < data[5] < 0x5B)
    return _Frame(True, 0, len(data), -1, implicit, top=True)


def check(data: bytes, *, implicit: bool, little_endian: bool, limit: int = MAX_SEQUENCE_DEPTH) -> None:
    """Refuse the data set ``data`` (:class:`InvalidObjectError`, :data:`TOO_DEEP`) when an item is
    deeper than ``limit``; nothing when it is not, or when its bytes are not well formed enough to tell
    (pydicom's reader judges those)."""
    if exceeds(data, implicit=implicit, little_endian=little_endian, limit=limit):
        raise InvalidObjectError(TOO_DEEP)


def exceeds(data: bytes, *, implicit: bool, little_endian: bool, limit: int = MAX_SEQUENCE_DEPTH) -> bool:
    """Whether an item of the data set ``data`` is deeper than ``limit`` (False when that cannot be told)."""
    try:
        _Walk(data, little_endian, limit).run([_top(data, implicit)], 0)
    except _TooDeep:
        return True
    except Unwalkable:
        return False
    return False


def element_end(
    data: bytes,
    tag: int,
    vr: bytes | None,
    length: int,
    value_at: int,
    *,
    implicit: bool,
    limit: int = MAX_SEQUENCE_DEPTH,
) -> int:
    """Where a top-level element of a little endian data set ends (its value at ``value_at``, VR ``vr``
    or None in implicit VR), once its items are known not to be deeper than ``limit``.

    For the fast header read (:mod:`safepacs.dicom.header`), which steps over every other element
    itself.  Raises :class:`InvalidObjectError` (:data:`TOO_DEEP`), or :class:`Unwalkable` when an
    element of undefined length is not well formed."""
    if length != _UNDEFINED:
        value_end = value_at + length
        if length < min_nesting_bytes(0, limit) or not (
            vr == _SQ or ((vr is None or vr == _UN) and data[value_at : value_at + 4] == _ITEM_LE)
        ):
            return value_end  # not a sequence, or too short to be too deep
    walk = _Walk(data, True, limit)
    try:
        if length != _UNDEFINED:
            walk.run([_Frame(False, value_at, value_end, value_at - 4, implicit)], value_at)
            return value_end
        if vr in (_SQ, _UN) or (vr is None and tag != _PIXEL_DATA):
            return walk.run([_Frame(False, value_at, -1, -1, implicit)], value_at)
        try:
            return walk.fragments(value_at)
        except _Odd as odd:
            raise Unwalkable(odd.truncated) from None
    except _TooDeep:
        raise InvalidObjectError(TOO_DEEP) from None


def prune(
    data: bytes, *, implicit: bool, little_endian: bool, limit: int = MAX_SEQUENCE_DEPTH
) -> bytes | None:
    """The data set ``data`` with every item deeper than ``limit`` left out (their sequences kept, empty,
    and the lengths of the values around them corrected); None when no item is that deep, or when the
    bytes are not well formed enough to tell."""
    walk = _Walk(data, little_endian, limit, prune=True)
    try:
        walk.run([_top(data, implicit)], 0)
    except Unwalkable:
        return None
    return walk.pruned() if walk.cuts else None
