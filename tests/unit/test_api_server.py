"""The agent's listening sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from thinvisor.api.server import GRACEFUL_SHUTDOWN_S, _listening, _server


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


def test_a_client_holding_a_request_open_does_not_keep_the_server_from_stopping() -> None:
    # A stopping agent waited for ever on a connection whose answer never ended.
    started = threading.Event()

    async def endless(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        started.set()
        await asyncio.Event().wait()  # the answer never ends

    server = _server(endless, "127.0.0.1", 0, {}, lifespan="off")
    assert server.config.timeout_graceful_shutdown == GRACEFUL_SHUTDOWN_S
    server.config.timeout_graceful_shutdown = 0.2  # the same bound, made quick
    listener = _listening(server)
    port = listener.getsockname()[1]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[listener])))
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert started.wait(10)
            server.should_exit = True
            thread.join(30)
            assert not thread.is_alive()
    finally:
        server.should_exit = server.force_exit = True
        thread.join(10)
        listener.close()
