"""Consoles through the center: the center brokers a VM's serial and VNC consoles.

``/vms/{id}/console/serial`` and ``/vms/{id}/console/vnc`` speak as a thinvisor host's
own console WebSockets do (``thinvisor.api.consoles``): the ``binary`` subprotocol when
offered, the serial port's output and the raw RFB stream in binary frames, errors as a
close code and reason (1008 for what the client asked wrong, 1011 for what failed). The
center opens the console where the VM's provider says it is: a host's WebSocket
(``wss://``, its certificate pinned as registered, its credentials added by the
provider) or a plain VNC server (``vnc://host:port``, as libvirt gives), and copies
frames both ways, text as text and binary as binary, until either side closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, HTTPException, WebSocket
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from thinvisor.api.auth import authenticate_ws, refuse_ws
from thinvisor.api.consoles import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    close_websocket,
    run_both,
)
from thinvisor.auth import Permission
from thinvisor.center.api.access import authorize, center_of
from thinvisor.cli.remote import pinned_context
from thinvisor.errors import NotFound, ThinvisorError
from thinvisor.providers.base import ConsoleEndpoint, ConsoleKind

log = logging.getLogger(__name__)

router = APIRouter(tags=["consoles"])

_CONNECT_TIMEOUT_S = 15.0
_READ_SIZE = 64 * 1024
_EXPECTED_ENDS = (WebSocketDisconnect, ConnectionClosed, ThinvisorError, OSError)

Message = bytes | str
Receive = Callable[[], Awaitable[Message | None]]
Send = Callable[[Message], Awaitable[None]]


@router.websocket("/vms/{vm_id}/console/serial")
async def serial_console(websocket: WebSocket, vm_id: int, port: str | None = None) -> None:
    """A VM's serial port (``port``: which one, where it has several)."""
    await _broker(websocket, vm_id, ConsoleKind.SERIAL, port)


@router.websocket("/vms/{vm_id}/console/vnc")
async def vnc_console(websocket: WebSocket, vm_id: int) -> None:
    """A VM's display: the raw RFB stream, in binary frames."""
    await _broker(websocket, vm_id, ConsoleKind.VNC, None)


async def _broker(websocket: WebSocket, vm_id: int, kind: ConsoleKind, port: str | None) -> None:
    if not await _admit(websocket, vm_id):
        return
    offered = websocket.scope.get("subprotocols") or []
    binary = "binary" in offered
    # Accepting before refusing lets browsers see the close reason.
    await websocket.accept(subprotocol="binary" if binary else None)
    try:
        endpoint = await center_of(websocket).service.console(vm_id, kind)
    except NotFound as exc:
        await close_websocket(websocket, CLOSE_POLICY, str(exc))
        return
    except ThinvisorError as exc:
        await close_websocket(websocket, CLOSE_ERROR, str(exc))
        return
    scheme = urlsplit(endpoint.url).scheme
    if scheme in ("ws", "wss"):
        await _to_websocket(websocket, endpoint, port, binary)
    elif scheme == "vnc" and kind is ConsoleKind.VNC:
        await _to_vnc_server(websocket, endpoint)
    else:
        where = f"{scheme}://" if scheme else endpoint.url
        await close_websocket(websocket, CLOSE_ERROR, f"the center cannot broker {where} consoles")


async def _admit(websocket: WebSocket, vm_id: int) -> bool:
    """Authenticate and check the console permission on the VM; refuse the handshake
    (401, 403, 404) otherwise."""
    user = await authenticate_ws(websocket)
    if user is None:
        return False
    try:
        await authorize(websocket, user, vm_id, Permission.CONSOLE)
    except HTTPException as exc:
        await refuse_ws(websocket, exc.status_code, str(exc.detail))
        return False
    except NotFound as exc:
        await refuse_ws(websocket, 404, str(exc))
        return False
    return True


async def _to_websocket(
    websocket: WebSocket, endpoint: ConsoleEndpoint, port: str | None, binary: bool
) -> None:
    """Broker a host's console WebSocket."""
    url = endpoint.url if port is None else _with_port(endpoint.url, port)
    tls = pinned_context(endpoint.fingerprint) if url.startswith("wss:") else None
    try:
        upstream = await connect(
            url,
            ssl=tls,
            additional_headers=endpoint.headers,
            subprotocols=[Subprotocol("binary")] if binary else None,
            proxy=None,
            open_timeout=_CONNECT_TIMEOUT_S,
            max_size=None,
            compression=None,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        await close_websocket(
            websocket, CLOSE_ERROR, f"the host refused the console (HTTP {status})"
        )
        return
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        reason = "its certificate is not the pinned one" if tls and tls.mismatch else str(exc)
        await close_websocket(websocket, CLOSE_ERROR, f"cannot reach the host's console: {reason}")
        return
    async with upstream:
        await _pump(websocket, _upstream_receive(upstream), upstream.send)
    code = upstream.close_code
    reason = upstream.close_reason or "the host closed the console"
    if code is None or code in (1005, 1006):
        code = CLOSE_NORMAL
    await close_websocket(websocket, code, reason)


def _with_port(url: str, port: str) -> str:
    """``url`` asking for the serial port ``port`` (instead of the one it names)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "port"] + [("port", port)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _upstream_receive(upstream: ClientConnection) -> Receive:
    async def receive() -> Message | None:
        try:
            return await upstream.recv()
        except ConnectionClosed:
            return None

    return receive


async def _to_vnc_server(websocket: WebSocket, endpoint: ConsoleEndpoint) -> None:
    """Broker a plain VNC server (RFB over TCP)."""
    parts = urlsplit(endpoint.url)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 5900), _CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError, ValueError) as exc:
        await close_websocket(websocket, CLOSE_ERROR, f"cannot reach the VNC server: {exc}")
        return

    async def receive() -> Message | None:
        return await reader.read(_READ_SIZE) or None

    async def send(data: Message) -> None:
        writer.write(data.encode() if isinstance(data, str) else data)
        await writer.drain()

    try:
        await _pump(websocket, receive, send)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    await close_websocket(websocket, CLOSE_NORMAL, "the VNC server closed")


async def _pump(websocket: WebSocket, receive: Receive, send: Send) -> None:
    """Copy ``receive()`` to the client and the client's frames to ``send`` until either
    side ends (``receive`` returns None, or the client disconnects); then stop both."""

    async def to_client() -> None:
        while (message := await receive()) is not None:
            if isinstance(message, str):
                await websocket.send_text(message)
            else:
                await websocket.send_bytes(message)

    async def from_client() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await send(message["bytes"])
            elif message.get("text") is not None:
                await send(message["text"])

    await run_both(to_client(), from_client(), expected=_EXPECTED_ENDS, what="console broker")
