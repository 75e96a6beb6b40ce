"""Consoles over WebSocket: a VM's serial ports and its VNC display.

``/vms/{vm}/console/serial`` shares each serial port between any number of viewers (see
``thinvisor.console.hub``); ``/vms/{vm}/console/vnc`` carries the raw RFB stream to and
from QEMU's VNC socket, one VNC connection per WebSocket, so that noVNC works unchanged.
Both need the console permission. Errors close the socket with a code and a reason:
1008 for what the client asked wrong, 1011 for what failed on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from thinvisor.api.auth import agent_of, require_ws
from thinvisor.auth import Permission
from thinvisor.console.hub import ENDED_TOO_SLOW, ConsoleHub
from thinvisor.errors import NotFound, ThinvisorError
from thinvisor.host.service import VmInfo

log = logging.getLogger(__name__)

router = APIRouter(tags=["consoles"])

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_ERROR = 1011
CLOSE_TRY_AGAIN = 1013
_REASON_MAX = 123  # bytes: a close frame carries at most 125, two of them the code
_READ_SIZE = 64 * 1024
_CONNECT_TIMEOUT_S = 5.0
_LIVE_STATES = ("running", "paused")
_EXPECTED_ENDS = (WebSocketDisconnect, ThinvisorError, OSError)

Reader = Callable[[], Awaitable[bytes]]
Writer = Callable[[bytes], Awaitable[None]]


def hub_of(websocket: WebSocket) -> ConsoleHub:
    """The app's console hub, made on first use."""
    state = websocket.app.state
    hub: ConsoleHub | None = getattr(state, "console_hub", None)
    if hub is None:
        hub = state.console_hub = ConsoleHub()
    return hub


@router.websocket("/vms/{vm}/console/serial")
async def serial_console(websocket: WebSocket, vm: str, port: str = "serial0") -> None:
    """A serial port: the history first, then the guest's output; frames sent go to it."""
    info = await _open(websocket, vm)
    if info is None:
        return
    if info.spec is None or port not in {s.name for s in info.spec.serials}:
        await close_websocket(
            websocket, CLOSE_POLICY, f"vm {info.name!r} has no serial port {port!r}"
        )
        return
    code, reason = CLOSE_NORMAL, f"vm {info.name!r}: the serial console closed"
    try:
        async with hub_of(websocket).attach(info.name, port, info.paths) as session:
            if session.history:
                await websocket.send_bytes(session.history)
            await _pump(websocket, lambda: anext(session, b""), session.send)
            if session.end_reason == ENDED_TOO_SLOW:
                code, reason = CLOSE_TRY_AGAIN, f"vm {info.name!r}: {ENDED_TOO_SLOW}"
    except WebSocketDisconnect:
        return
    except ThinvisorError as exc:
        code, reason = CLOSE_ERROR, str(exc)
    await close_websocket(websocket, code, reason)


@router.websocket("/vms/{vm}/console/vnc")
async def vnc_console(websocket: WebSocket, vm: str) -> None:
    """The VM's display: the raw RFB stream of QEMU's VNC server, in binary frames."""
    info = await _open(websocket, vm)
    if info is None:
        return
    if info.spec is not None and info.spec.graphics.kind != "vnc":
        await close_websocket(websocket, CLOSE_POLICY, f"vm {info.name!r} has no graphical console")
        return
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(info.paths.vnc_socket)), _CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        await close_websocket(websocket, CLOSE_ERROR, f"vm {info.name!r}: no VNC server: {exc}")
        return

    async def to_vnc(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    try:
        await _pump(websocket, lambda: reader.read(_READ_SIZE), to_vnc)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    await close_websocket(websocket, CLOSE_NORMAL, f"vm {info.name!r}: the VNC server closed")


async def _open(websocket: WebSocket, vm: str) -> VmInfo | None:
    """Authorise, accept, and find the running VM; None once the socket is closed."""
    if await require_ws(websocket, Permission.CONSOLE) is None:
        return None
    # Accepting before refusing lets browsers see the close reason (a refused
    # handshake reaches them as a bare 1006).
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol="binary" if "binary" in offered else None)
    service = agent_of(websocket).service
    try:
        info = await service.get_vm(service.resolve(vm))
    except NotFound as exc:
        await close_websocket(websocket, CLOSE_POLICY, str(exc))
        return None
    except ThinvisorError as exc:
        await close_websocket(websocket, CLOSE_ERROR, str(exc))
        return None
    if info.state not in _LIVE_STATES:
        await close_websocket(websocket, CLOSE_ERROR, f"vm {info.name!r} is not running")
        return None
    return info


async def _pump(websocket: WebSocket, read: Reader, write: Writer) -> None:
    """Copy ``read()`` to the client and the client's frames to ``write`` until either
    side ends (``read`` returns b"", or the client disconnects); then stop both."""

    async def to_client() -> None:
        while data := await read():
            await websocket.send_bytes(data)

    async def from_client() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                data = (message.get("text") or "").encode()
            if data:
                await write(data)

    await run_both(to_client(), from_client(), expected=_EXPECTED_ENDS, what="console pump")


async def run_both(
    to_client: Coroutine[Any, Any, None],
    from_client: Coroutine[Any, Any, None],
    *,
    expected: tuple[type[BaseException], ...],
    what: str,
) -> None:
    """Run the two directions of a console until either ends, then stop the other; a
    failure other than an ``expected`` end is logged as ``what`` failing."""
    tasks = [
        asyncio.create_task(to_client, name="console-to-client"),
        asyncio.create_task(from_client, name="console-from-client"),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # wait(), not gather(): if we are cancelled here, our own cancellation (which
        # the server's cancel scope recognises by its message) must propagate unchanged.
        await asyncio.wait(tasks)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, expected):
            log.error("%s failed", what, exc_info=error)


async def close_websocket(websocket: WebSocket, code: int, reason: str) -> None:
    """Close the socket unless either side already has."""
    if (
        websocket.client_state != WebSocketState.CONNECTED
        or websocket.application_state != WebSocketState.CONNECTED
    ):
        return
    reason = reason.encode()[:_REASON_MAX].decode(errors="ignore")
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.close(code=code, reason=reason)
