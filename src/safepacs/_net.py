"""Listening sockets, bound once in the parent process and shared with the workers it forks."""

from __future__ import annotations

import socket

__all__ = ["bind_listener"]


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free port), non-blocking so that
    workers racing to accept on it never hang.

    Created with protocol ``IPPROTO_TCP`` explicitly: asyncio (uvicorn) turns TCP_NODELAY on for
    accepted sockets only when their protocol says TCP, and without it every HTTPS answer written in
    two parts waits ~40 ms for the client's delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock
