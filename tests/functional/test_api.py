"""The REST API of a real ``thinvisor host serve``, driven by httpx and a WebSocket
client, with the appliance guest on real QEMU."""

from __future__ import annotations

import base64
import json
import signal
import ssl
import struct
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .agentenv import PASSWORD, TestAgent
from .hostenv import TestHost

pytestmark = pytest.mark.functional


def basic(user: str = "admin") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def ws(agent: TestAgent, path: str, user: str = "admin", **kwargs: Any) -> ClientConnection:
    context = ssl.create_default_context(cafile=str(agent.cert))
    return connect(agent.ws_url(path), ssl=context, additional_headers=basic(user),
                   open_timeout=30, **kwargs)  # fmt: skip


def read_until(conn: ClientConnection, marker: bytes, timeout: float = 60) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{marker!r} not seen; got {seen[-500:]!r}")
        try:
            msg = conn.recv(timeout=remaining)
        except TimeoutError:
            continue
        seen += msg if isinstance(msg, bytes) else msg.encode()
    return seen


def create_appliance_vm(agent: TestAgent, c: httpx.Client, name: str, **fields: Any) -> None:
    body = {"name": name, "memory_mib": 128, "appliance": True, "cdrom": {},
            "nics": [{}], **fields}  # fmt: skip
    task = agent.wait_task(c, c.post("/vms", json=body))
    assert task["state"] == "success", task
    assert task["result"]["name"] == name


def test_vm_lifecycle_over_the_api(agent: TestAgent) -> None:
    with agent.client() as c:
        create_appliance_vm(agent, c, "web1")
        vm = c.get("/vms/web1").json()
        assert vm["state"] == "stopped"
        assert vm["spec"]["nics"][0]["mac"].startswith("02:74:76:")
        assert c.get(f"/vms/{vm['uuid']}").json()["name"] == "web1"  # by UUID too
        started = c.post("/vms/web1/start")
        assert started.status_code == 200, started.text
        assert started.json()["state"] == "running"
        agent.host.wait_ready("web1")
        with ws(agent, "/vms/web1/console/serial") as conn:
            read_until(conn, b"THINVISOR-APPLIANCE-READY")  # the history comes first
            conn.send(b"echo api-$((6*7))\n")
            read_until(conn, b"api-42")
        stopped = c.post("/vms/web1/stop").json()
        assert (stopped["state"], stopped["stop_reason"]) == ("stopped", "powered off by user")
        assert c.delete("/vms/web1").status_code == 204
        assert c.get("/vms/web1").status_code == 404
        kinds = [e["kind"] for e in c.get("/events", params={"object": "vm/web1"}).json()]
        assert kinds == ["vm.created", "vm.powered_on", "vm.powered_off", "vm.deleted"]
        users = {e["user"] for e in c.get("/events", params={"object": "vm/web1"}).json()}
        assert users == {"admin"}


def test_vnc_console_over_websocket(agent: TestAgent) -> None:
    with agent.client() as c:
        create_appliance_vm(agent, c, "gfx")
        assert c.post("/vms/gfx/start").status_code == 200
    with ws(agent, "/vms/gfx/console/vnc", subprotocols=["binary"]) as conn:  # type: ignore[list-item]
        buf = b""

        def take(n: int) -> bytes:
            nonlocal buf
            while len(buf) < n:
                msg = conn.recv(timeout=30)
                buf += msg if isinstance(msg, bytes) else msg.encode()
            out, buf = buf[:n], buf[n:]
            return out

        version = take(12)
        assert version.startswith(b"RFB 003.")
        conn.send(b"RFB 003.008\n")
        count = take(1)[0]
        types = take(count)
        assert 1 in types  # None: the socket is private to the agent
        conn.send(bytes([1]))
        assert struct.unpack(">I", take(4))[0] == 0  # SecurityResult: OK
        conn.send(bytes([1]))  # ClientInit, shared
        width, height = struct.unpack(">HH", take(4))
        assert width > 0 and height > 0


ROUTES_WITHOUT_AUTH = {"/api/v1/health", "/api/v1/auth/login"}


def test_every_route_but_health_needs_credentials(agent: TestAgent) -> None:
    with agent.client(None) as anonymous:
        schema = anonymous.get("/openapi.json")
        assert schema.status_code == 200
        paths: dict[str, dict[str, Any]] = schema.json()["paths"]
        assert len(paths) > 10
        for path, methods in paths.items():
            url = path.removeprefix("/api/v1").replace("{", "").replace("}", "")
            for method in methods:
                response = anonymous.request(method.upper(), url)
                if path in ROUTES_WITHOUT_AUTH:
                    continue
                assert response.status_code == 401, (method, path, response.text)
                assert response.json()["error"] == "unauthorized"
        assert anonymous.get("/health").json()["status"] == "ok"
        for path in ("/events/stream", "/vms/x/console/serial", "/vms/x/console/vnc"):
            with pytest.raises(InvalidStatus) as refused:
                connect(agent.ws_url(path), ssl=agent.ssl_context(), open_timeout=10)
            assert refused.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as forbidden:
            ws(agent, "/vms/x/console/serial", user="viewer")
        assert forbidden.value.response.status_code == 403


def test_roles(agent: TestAgent) -> None:
    with agent.client() as admin:
        create_appliance_vm(agent, admin, "r1")
    with agent.client("viewer") as viewer:
        assert viewer.get("/vms/r1").status_code == 200
        refused = viewer.post("/vms/r1/start")
        assert refused.status_code == 403
        assert refused.json() == {"error": "forbidden", "message": "role read-only may not power"}
    with agent.client("oper") as oper:
        assert oper.delete("/vms/r1").status_code == 403
        assert oper.post("/vms/r1/start").status_code == 200
        assert oper.post("/vms/r1/stop").status_code == 200
    with agent.client() as admin:
        assert admin.get("/vms/r1").json()["state"] == "stopped"


def test_wrong_password_is_refused_and_logged(agent: TestAgent) -> None:
    with httpx.Client(base_url=agent.base, verify=agent.ssl_context()) as c:
        bad = c.post("/auth/login", json={"user": "admin", "password": "nope"})
        assert bad.status_code == 401
        assert bad.json()["error"] == "unauthorized"
        assert c.get("/vms", auth=("admin", "nope")).status_code == 401
        good = c.post("/auth/login", json={"user": "admin", "password": PASSWORD})
        assert good.status_code == 200
        token = good.json()["token"]
        events = c.get("/events", headers={"Authorization": f"Bearer {token}"},
                       params={"kind": "auth."}).json()  # fmt: skip
    kinds = [e["kind"] for e in events]
    assert kinds.count("auth.login_failed") == 2
    assert kinds[-1] == "auth.login"
    assert "admin" in events[0]["message"]


def test_failed_logins_are_slowed_down(agent: TestAgent) -> None:
    with httpx.Client(base_url=agent.base, verify=agent.ssl_context()) as c:
        codes = [c.get("/vms", auth=("admin", "wrong")).status_code for _ in range(5)]
        assert codes[:3] == [401, 401, 401]
        assert 429 in codes[3:]
        slowed = c.get("/vms", auth=("admin", "wrong"))
        assert slowed.status_code == 429 and "Retry-After" in slowed.headers


def test_bad_input_is_a_4xx_with_an_error_body(agent: TestAgent) -> None:
    with agent.client() as c:
        cases = [
            c.post("/vms", content=b"{not json", headers={"content-type": "application/json"}),
            c.post("/vms", json={"name": "x", "memory_mib": "lots"}),
            c.post("/vms", json={"name": "x", "colour": "blue"}),
            c.post("/vms", json={"name": "../etc"}),
            c.get("/vms/nope"),
            c.post("/vms/nope/start"),
        ]
        for response in cases:
            assert 400 <= response.status_code < 500, response.text
            body = response.json()
            assert set(body) == {"error", "message"}
        assert cases[2].json()["message"] == "colour: unknown field"
        create_appliance_vm(agent, c, "s1")
        wrong = c.post("/vms/s1/pause")
        assert wrong.status_code == 409
        assert wrong.json() == {"error": "invalid_state",
                                "message": "vm 's1': cannot pause while stopped"}  # fmt: skip
        assert c.get("/vms").json()[0]["state"] == "stopped"


def test_agent_restart_keeps_vms_running_and_controllable(agent: TestAgent) -> None:
    with agent.client() as c:
        create_appliance_vm(agent, c, "keep")
        pid = c.post("/vms/keep/start").json()["pid"]
    agent.host.wait_ready("keep")
    # SIGTERM: the agent goes (uvicorn ends by the signal it caught), the VM stays.
    assert agent.stop() in (0, -signal.SIGTERM)
    assert agent.host.pid("keep") == pid
    agent.start()
    with agent.client() as c:
        vm = c.get("/vms/keep").json()
        assert (vm["state"], vm["pid"]) == ("running", pid)
        with ws(agent, "/vms/keep/console/serial") as conn:
            conn.send(b"echo still-$((40+2))\n")
            read_until(conn, b"still-42")
        task = agent.wait_task(c, c.post("/vms/keep/suspend"))
        assert task["state"] == "success" and task["result"]["state"] == "suspended"
        kinds = [e["kind"] for e in c.get("/events", params={"kind": "agent."}).json()]
        assert kinds == ["agent.started", "agent.stopped", "agent.started"]


def test_guest_poweroff_and_qemu_death_become_events(agent: TestAgent) -> None:
    with agent.client() as c:
        create_appliance_vm(agent, c, "w1")
        c.post("/vms/w1/start")
        agent.host.wait_ready("w1")
        with ws(agent, "/vms/w1/console/serial") as conn:
            read_until(conn, b"THINVISOR-APPLIANCE-READY")
            conn.send(b"sync; poweroff -f\n")
            read_until(conn, b"poweroff -f")  # the guest has the command
        deadline = time.monotonic() + 30
        while agent.host.pid("w1") is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.host.pid("w1") is None
        while time.monotonic() < deadline:
            kinds = [e["kind"] for e in c.get("/events", params={"object": "vm/w1"}).json()]
            if "vm.powered_off" in kinds:
                break
            time.sleep(0.2)
        assert kinds[-1] == "vm.powered_off"


def test_autostart_order_and_reverse_shutdown(host: TestHost) -> None:
    for name, order in (("c", 3), ("a", 1), ("b", 2)):
        host.create(name, start=False, autostart=True, autostart_order=order)
    host.create("manual", start=False)
    agent = TestAgent(host)
    try:
        agent.start()
        with agent.client() as c:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                listing = c.get("/vms")
                assert listing.status_code == 200, listing.text
                states = {v["name"]: v["state"] for v in listing.json()}
                if all(states[n] == "running" for n in "abc"):
                    break
                time.sleep(0.2)
            assert states == {"a": "running", "b": "running", "c": "running", "manual": "stopped"}
            on = [e["object"] for e in c.get("/events", params={"kind": "vm.powered_on"}).json()]
            assert on == ["vm/a", "vm/b", "vm/c"]
            for n in "abc":
                host.wait_ready(n)
            task = agent.wait_task(c, c.post("/host/shutdown"))
            assert task["state"] == "success", task
            assert task["result"] == {"stopped": ["c", "b", "a"]}
            off = [e["object"] for e in c.get("/events", params={"kind": "vm.powered_off"}).json()]
            assert off == ["vm/c", "vm/b", "vm/a"]
    finally:
        agent.close()


def test_event_stream(agent: TestAgent) -> None:
    with ws(agent, "/events/stream") as conn, agent.client() as c:
        create_appliance_vm(agent, c, "ev")
        seen: list[dict[str, Any]] = []
        while not any(e["kind"] == "vm.created" for e in seen):
            seen.append(json.loads(conn.recv(timeout=30)))
    created = next(e for e in seen if e["kind"] == "vm.created")
    assert (created["object"], created["user"]) == ("vm/ev", "admin")
