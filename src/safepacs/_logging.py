"""How a failure is written to the log: the exception's type and where it happened, nothing it held.

A traceback with local variables (structlog's console renderer does that through rich when rich is
installed) prints what every frame held: request headers with bearer tokens, user names, query keys,
decrypted object bytes - thousands of lines for one failing request.  An exception's message can
carry patient data as well (a value that failed to parse, a file name).  So a logged exception is
rendered here, for the console and the JSON log alike, as

* its type (with the ``errno`` name of an ``OSError``), and its message only when it is a
  :class:`~safepacs.errors.SafePacsError`, whose messages are written to be shown to a user (no PHI);
* its frames as ``file:line in function``, never a value or a line of source: the outermost
  :data:`OUTER_FRAMES` and the innermost :data:`INNER_FRAMES`, the rest counted;
* of a chain (``raise ... from``, an exception while handling another) the last :data:`CHAIN` exceptions,
  the earlier ones with their innermost :data:`CAUSE_FRAMES` frames only.

One failure therefore adds at most about 50 lines.  A record of a library that logs an exception
*as its message* (``log.exception(exc)``) gets the message replaced by the exception's type; uncaught
exceptions of threads and of the process are logged through the same rendering instead of printed.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading
import traceback
from types import TracebackType
from typing import TextIO

from structlog.typing import EventDict, WrappedLogger

from safepacs.errors import SafePacsError

__all__ = [
    "CHAIN",
    "RedactExceptionText",
    "exception_processor",
    "format_exception",
    "install_hooks",
    "render_exception",
]

CHAIN = 3
OUTER_FRAMES = 4
INNER_FRAMES = 16
CAUSE_FRAMES = 6

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

_crash_log = logging.getLogger("safepacs.crash")


def describe(exc: BaseException) -> str:
    """The exception's type (qualified outside builtins), an OSError's errno name, a SafePACS message."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(exc, OSError) and exc.errno is not None:
        name += f" [{errno.errorcode.get(exc.errno, exc.errno)}]"
    if isinstance(exc, SafePacsError) and str(exc):
        return f"{name}: {exc}"
    return name


def _frames(tb: TracebackType | None, outer: int, inner: int) -> list[str]:
    # Code objects and line numbers only: no frame's locals are looked at, no source line is read.
    frames = [
        f"  {frame.f_code.co_filename}:{line} in {frame.f_code.co_name}"
        for frame, line in traceback.walk_tb(tb)
    ]
    if len(frames) <= outer + inner:
        return frames
    hidden = len(frames) - outer - inner
    return [*frames[:outer], f"  ... {hidden} frames not shown ...", *frames[len(frames) - inner :]]


def _chain(exc: BaseException) -> list[tuple[BaseException, str]]:
    """``exc`` and what it was raised from or while handling, newest first (at most :data:`CHAIN`), each
    with the sentence that links it to the newer one before it."""
    out: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen and len(out) < CHAIN:
        seen.add(id(current))
        out.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    return out


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def format_exception(exc_info: ExcInfo) -> str:
    """The bounded, value-free rendering of ``exc_info`` described in the module docstring, oldest
    exception of the chain first (as Python prints it)."""
    chain = _chain(exc_info[1])
    lines: list[str] = []
    for k in range(len(chain) - 1, -1, -1):
        item = chain[k][0]
        if k < len(chain) - 1:
            lines.append(chain[k + 1][1])
        outer, inner = (OUTER_FRAMES, INNER_FRAMES) if k == 0 else (0, CAUSE_FRAMES)
        lines.append("Traceback (frames only; values and messages are not logged):")
        lines += _frames(item.__traceback__, outer, inner)
        lines.append(describe(item))
    return "\n".join(lines)


def render_exception(sio: TextIO, exc_info: ExcInfo) -> None:
    """structlog's ``ConsoleRenderer`` ``exception_formatter``: :func:`format_exception`."""
    sio.write("\n" + format_exception(exc_info))


def _exc_info(value: object) -> ExcInfo | None:
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return (type(value[1]), value[1], value[2])
    if value is True:
        kind, exc, tb = sys.exc_info()
        if kind is not None and exc is not None:
            return (kind, exc, tb)
    return None


def exception_processor(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """A structlog processor: ``exc_info`` becomes ``exception``, rendered by :func:`format_exception`."""
    info = _exc_info(event_dict.pop("exc_info", None))
    if info is not None:
        event_dict["exception"] = format_exception(info)
    return event_dict


class RedactExceptionText(logging.Filter):
    """A record that carries an exception and repeats its text in the message (``log.exception(exc)``)
    gets the text replaced by the exception's type; SafePACS's own errors keep theirs (no PHI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        exc = record.exc_info[1]
        text = str(exc)
        if isinstance(exc, SafePacsError) or not text:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format: logging reports that itself
            return True
        if text in message:
            record.msg = message.replace(text, f"<{describe(exc)}>")
            record.args = None
        return True


def install_hooks() -> None:
    """Uncaught exceptions of the process and its threads go to the log, rendered as above, instead
    of Python's full traceback (with the exception's message) on standard error."""

    def process_hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        _crash_log.critical("uncaught exception; the process stops", exc_info=(kind, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or issubclass(args.exc_type, SystemExit):
            return
        name = args.thread.name if args.thread is not None else "?"
        _crash_log.error(
            "uncaught exception in a thread; the thread stopped",
            extra={"stopped_thread": name},
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    sys.excepthook = process_hook
    threading.excepthook = thread_hook
