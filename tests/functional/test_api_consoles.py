"""The console WebSockets against a real appliance VM: serial (shared) and VNC (RFB)."""

from __future__ import annotations

import base64
import struct
import warnings
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from starlette.exceptions import StarletteDeprecationWarning
from starlette.websockets import WebSocketDisconnect

from thinvisor.api.app import create_app
from thinvisor.auth import Role
from thinvisor.console.serial import SerialConsole
from thinvisor.host.agent import HostAgent
from thinvisor.host.inventory import Inventory

from .hostenv import TestHost

with warnings.catch_warnings():
    # Starlette prefers httpx2 to the httpx we pin; the test client works with either.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient, WebSocketDenialResponse, WebSocketTestSession

pytestmark = pytest.mark.functional

SERIAL = "/api/v1/vms/{vm}/console/serial"
VNC = "/api/v1/vms/{vm}/console/vnc"
RFB_VERSION = b"RFB 003.008\n"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def admin() -> dict[str, str]:
    return basic("admin", "password123")


@pytest.fixture
def app(host: TestHost) -> Iterator[FastAPI]:
    # The agent's state (users, events) goes with the throwaway host, not /var/lib.
    config = host.config.model_copy(update={"state_dir": host.root / "state"})
    agent = HostAgent(config)
    agent.users.add_user("admin", "password123", Role.ADMIN)
    agent.users.add_user("viewer", "password123", Role.READ_ONLY)
    try:
        yield create_app(agent, start_agent=False)
    finally:
        agent.events.close()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def read_until(ws: WebSocketTestSession, wanted: bytes, seen: bytes = b"") -> bytes:
    while wanted not in seen:
        seen += ws.receive_bytes()
    return seen


def refusal(client: TestClient, url: str, headers: dict[str, str]) -> tuple[int, str]:
    """How the server refuses a socket: an HTTP status and message where the test client
    takes an HTTP answer to the handshake, else a close code and reason."""
    with (
        pytest.raises(WebSocketDisconnect) as info,
        client.websocket_connect(url, headers=headers) as ws,
    ):
        ws.receive_bytes()
    if isinstance(info.value, WebSocketDenialResponse):
        return info.value.status_code, str(info.value.json()["message"])
    return info.value.code, info.value.reason


def test_serial_console_history_live_and_shared(
    host: TestHost, app: FastAPI, client: TestClient
) -> None:
    host.create("vm1")
    host.wait_ready("vm1")
    url = SERIAL.format(vm="vm1")
    with (
        client.websocket_connect(url, headers=admin()) as one,
        client.websocket_connect(f"{url}?port=serial0", headers=admin()) as two,
    ):
        assert b"THINVISOR-APPLIANCE-READY" in one.receive_bytes()
        assert b"THINVISOR-APPLIANCE-READY" in two.receive_bytes()
        one.send_text("echo ws-$((6*7))\n")
        assert b"ws-42" in read_until(one, b"ws-42")
        assert b"ws-42" in read_until(two, b"ws-42")
        two.send_bytes(b"echo bin-$((6*9))\n")
        assert b"bin-54" in read_until(one, b"bin-54")
        assert b"bin-54" in read_until(two, b"bin-54")
    # The last viewer left, so the agent let go of QEMU's one serial connection.
    assert not app.state.console_hub.is_connected("vm1", "serial0")
    sock = Inventory(host.config).get("vm1").paths.serial_socket("serial0")

    async def run_in_guest() -> tuple[int, str]:
        async with SerialConsole(sock) as console:
            return await console.run("echo free", timeout=30)

    assert host.run(run_in_guest()) == (0, "free\n")


def recv_exact(ws: WebSocketTestSession, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        buffer += ws.receive_bytes()
    data = bytes(buffer[:n])
    del buffer[:n]
    return data


def test_vnc_console_speaks_rfb(host: TestHost, client: TestClient) -> None:
    host.create("vm1")
    host.wait_ready("vm1")
    url = VNC.format(vm="vm1")
    with client.websocket_connect(url, subprotocols=["binary"], headers=admin()) as ws:
        assert ws.accepted_subprotocol == "binary"
        buffer = bytearray()
        assert recv_exact(ws, buffer, 12) == RFB_VERSION
        ws.send_bytes(RFB_VERSION)
        (count,) = recv_exact(ws, buffer, 1)
        assert count > 0, "the server refused the connection"
        assert 1 in recv_exact(ws, buffer, count)  # None: the socket is private
        ws.send_bytes(b"\x01")
        assert recv_exact(ws, buffer, 4) == b"\x00\x00\x00\x00"  # SecurityResult: OK
        ws.send_bytes(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", recv_exact(ws, buffer, 4))
        recv_exact(ws, buffer, 16)  # the pixel format
        (name_length,) = struct.unpack(">I", recv_exact(ws, buffer, 4))
        name = recv_exact(ws, buffer, name_length)
        assert width > 0 and height > 0, (width, height, name)


def test_consoles_end_when_the_vm_stops(host: TestHost, client: TestClient) -> None:
    host.create("vm1")
    host.wait_ready("vm1")
    with (
        client.websocket_connect(SERIAL.format(vm="vm1"), headers=admin()) as serial,
        client.websocket_connect(VNC.format(vm="vm1"), headers=admin()) as vnc,
    ):
        assert b"THINVISOR-APPLIANCE-READY" in serial.receive_bytes()
        assert vnc.receive_bytes().startswith(b"RFB ")
        host.run(host.service.stop("vm1"))
        for ws in (serial, vnc):
            with pytest.raises(WebSocketDisconnect) as closed:
                while True:
                    ws.receive_bytes()
            assert closed.value.code == 1000
            assert "closed" in closed.value.reason


def test_consoles_of_stopped_and_unknown_vms_are_refused(
    host: TestHost, client: TestClient
) -> None:
    host.create("vm2", start=False)
    for template in (SERIAL, VNC):
        code, reason = refusal(client, template.format(vm="vm2"), admin())
        assert (code, reason) == (1011, "vm 'vm2' is not running")
        code, reason = refusal(client, template.format(vm="nosuchvm"), admin())
        assert code == 1008
        assert "nosuchvm" in reason


def test_consoles_need_credentials_and_the_console_permission(client: TestClient) -> None:
    for template in (SERIAL, VNC):
        url = template.format(vm="vm1")
        assert refusal(client, url, {})[0] in (1008, 401)
        assert refusal(client, url, basic("admin", "wrong"))[0] in (1008, 401)
        code, reason = refusal(client, url, basic("viewer", "password123"))
        assert code in (1008, 403)
        assert "may not console" in reason


def test_unknown_serial_port_is_refused(host: TestHost, client: TestClient) -> None:
    host.create("vm1")
    code, reason = refusal(client, SERIAL.format(vm="vm1") + "?port=../qmp", admin())
    assert code == 1008
    assert "no serial port" in reason
