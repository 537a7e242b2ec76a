"""The shared listening sockets."""

from __future__ import annotations

import asyncio
import socket

from safepacs._net import bind_listener


def test_connections_accepted_by_asyncio_have_nagle_off() -> None:
    """uvicorn (asyncio) sets TCP_NODELAY only on sockets whose protocol says TCP; without it every
    two-part HTTPS answer waits for the client's delayed ACK (~40 ms)."""
    listener = bind_listener("127.0.0.1", 0)

    async def main() -> int:
        nodelay: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def accepted(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nodelay.set_result(
                writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            )
            writer.close()

        server = await asyncio.start_server(accepted, sock=listener)
        _, client = await asyncio.open_connection(*listener.getsockname()[:2])
        try:
            return await asyncio.wait_for(nodelay, 10)
        finally:
            client.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) != 0
