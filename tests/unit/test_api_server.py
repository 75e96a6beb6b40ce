"""The agent's listening sockets."""

from __future__ import annotations

import socket

import uvicorn

from thinvisor.api.server import _listening


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("not called")


def test_connections_are_accepted_without_nagle() -> None:
    # Without TCP_NODELAY every answer waits for the client's delayed ACK (~40 ms).
    server = uvicorn.Server(uvicorn.Config(_app, host="127.0.0.1", port=0))
    listener = _listening(server)
    try:
        listener.listen()  # as asyncio's create_server does with it
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.close()
