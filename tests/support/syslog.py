"""A syslog-over-TLS collector on 127.0.0.1 (RFC 5425) that parses the octet-counted frames and the
RFC 5424 header itself, and can be stopped and started again on the same port."""

from __future__ import annotations

import re
import socket
import ssl
import threading
from dataclasses import dataclass

from lxml import etree

HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>(?P<version>1) (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app>\S+) (?P<procid>\S+) "
    rb"(?P<msgid>\S+) (?P<sd>-|\[.*?\]) (?P<msg>.*)\Z",
    re.DOTALL,
)
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Received:
    pri: int
    timestamp: str
    hostname: str
    app: str
    procid: str
    msgid: str
    sd: str
    xml: etree._Element

    @property
    def patient(self) -> str:
        return str(self.xml.find("ParticipantObjectIdentification").get("ParticipantObjectID"))  # type: ignore[union-attr]


def parse_frames(buffer: bytearray) -> list[bytes]:
    """Take the complete ``MSG-LEN SP SYSLOG-MSG`` frames (RFC 5425 4.3) off the front of ``buffer``."""
    out = []
    while True:
        space = buffer.find(b" ")
        if space < 0:
            return out
        digits = bytes(buffer[:space])
        assert re.fullmatch(rb"[1-9][0-9]{0,8}", digits), f"bad MSG-LEN {digits[:20]!r}"
        size = int(digits)
        if len(buffer) < space + 1 + size:
            return out
        out.append(bytes(buffer[space + 1 : space + 1 + size]))
        del buffer[: space + 1 + size]


def parse_message(raw: bytes) -> Received:
    m = HEADER.match(raw)
    assert m, raw[:200]
    msg = m["msg"]
    assert msg.startswith(BOM), "RFC 5424 6.4: MSG-UTF8 starts with a BOM"
    xml = etree.fromstring(msg[len(BOM) :], etree.XMLParser(resolve_entities=False, no_network=True))
    return Received(
        int(m["pri"]),
        m["timestamp"].decode(),
        m["hostname"].decode(),
        m["app"].decode(),
        m["procid"].decode(),
        m["msgid"].decode(),
        m["sd"].decode(),
        xml,
    )


class Receiver:
    """A syslog-over-TLS collector on 127.0.0.1 that can be stopped and started on the same port."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.messages: list[Received] = []
        self.connections = 0
        self.port = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, args=(listener, self._stop), daemon=True)]
        self._threads[0].start()

    def stop(self) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(5)
            assert not t.is_alive()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                t = threading.Thread(target=self._serve, args=(conn, stop), daemon=True)
                self._threads.append(t)
                t.start()

    def _serve(self, conn: socket.socket, stop: threading.Event) -> None:
        conn.settimeout(5)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            conn.close()
            return
        with self._cond:
            self.connections += 1
        buffer = bytearray()
        tls.settimeout(0.05)
        with tls:
            while not stop.is_set():
                try:
                    data = tls.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                frames = parse_frames(buffer)
                with self._cond:
                    self.messages.extend(parse_message(f) for f in frames)
                    self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.messages) >= count, timeout), (
                f"{len(self.messages)} of {count} messages arrived"
            )
            return list(self.messages)
