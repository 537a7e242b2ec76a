"""pynetdicom's AE, connection handler and association server, adapted to SafePACS's worker processes.

* :class:`EngineAE`: an association the AE requests (a C-MOVE sub-association) gets the send path's
  DUL (``sendpath.SendDUL``) before its socket is made, when ``send_path`` is on.
* :class:`EngineRequestHandler`: pynetdicom's handler of one accepted connection makes the association
  and starts it at once; here a subclass's ``handle`` runs admission first (``pending.py``), then
  :meth:`~EngineRequestHandler.start_association` makes the association as pynetdicom would, after
  :meth:`~EngineRequestHandler.prepare` has set it up (gate, receive path).
* :class:`SharedSocketServer`: pynetdicom's threaded association server on a socket bound and listening
  already (the parent process's, shared by the workers), without pynetdicom's housekeeping between
  requests, its connections accepted through hooks (:meth:`~SharedSocketServer.may_accept`).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from safepacs.protocols.dimse.engine.raw import set_nodelay
from safepacs.protocols.dimse.engine.sendpath import install_send_path

if TYPE_CHECKING:
    from pynetdicom.association import Association

__all__ = ["EngineAE", "EngineRequestHandler", "SharedSocketServer", "socket_of"]


def socket_of(assoc: Association) -> socket.socket | None:
    """The socket an association runs on (an ``ssl.SSLSocket`` over DICOM TLS; None before it has one)."""
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)


class EngineAE(AE):
    """pynetdicom's AE; associations it requests are served by a ``SendDUL`` when ``send_path`` is on."""

    #: C-GET/C-MOVE sub-operations in the stored syntax go out through ``sendpath`` (server.dimse_send_path)
    send_path: bool = True

    def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> Any:
        if self.send_path:  # before the socket is set: the association requested gets a SendDUL
            install_send_path(assoc)
        return super()._create_socket(assoc, address, tls_args)

    def serve_on(self, servers: Iterable[ThreadedAssociationServer]) -> None:
        """Count ``servers`` as this AE's, as its own ``start_server`` would: their associations are in
        ``active_associations`` and ``shutdown`` stops them."""
        self._servers.extend(servers)


class EngineRequestHandler(RequestHandler):
    """pynetdicom's handler of one accepted connection; the association is made by
    :meth:`start_association` (see the module docstring)."""

    def prepare(self, assoc: Association) -> None:
        """Set up the association made for this connection before it starts (a subclass's hook)."""
        return None

    def start_association(self) -> Association:
        """Make the connection's association, :meth:`prepare` it and start it, as pynetdicom's
        ``handle`` does."""
        assoc: Association = self._create_association()
        self.prepare(assoc)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        return assoc


class SharedSocketServer(ThreadedAssociationServer):
    """pynetdicom's server on a socket bound and listening already (inherited from the parent)."""

    daemon_threads = True

    def __init__(
        self,
        ae: AE,
        listener: socket.socket,
        ae_title: str,
        handlers: list[Any],
        request_handler: type[EngineRequestHandler],
    ) -> None:
        self._listener = listener
        super().__init__(
            ae,
            listener.getsockname()[:2],
            ae_title,
            [],
            evt_handlers=handlers,
            request_handler=request_handler,
        )

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = self._listener
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:  # listening already
        return None

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        if not self.may_accept(self.socket):
            raise BlockingIOError  # left to another worker: socketserver skips it
        # BlockingIOError when another worker won the race: socketserver skips it.
        client, address = self.socket.accept()
        client.setblocking(True)
        set_nodelay(client)
        self.accepted()
        return client, address

    def may_accept(self, listener: socket.socket) -> bool:
        """Whether to accept the connection waiting on ``listener`` (False: another worker takes it)."""
        return True

    def accepted(self) -> None:
        """A connection was accepted."""
        return None

    def server_close(self) -> None:  # the parent owns the listening socket
        return None

    def service_actions(self) -> None:
        """Nothing of pynetdicom's between requests: it runs a full ``gc.collect()`` every 60 turns of the
        accept loop (every few seconds, and after requests), which holds the GIL for tens of
        milliseconds in the middle of other associations' stores; Python's own collector suffices.
        Then :meth:`between_requests`."""
        self.between_requests()

    def between_requests(self) -> None:
        """Called at every turn of the accept loop (at least every ``poll_interval``)."""
        return None
