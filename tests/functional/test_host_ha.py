"""HA and maintenance mode on real agents with real guests (the appliance under TCG).

Two agents on loopback share a datastore directory: host A's VM on it is lost with A's
agent and QEMU (both SIGKILLed), host B takes it over through ``POST /ha/recover`` and
boots it, and A's agent, restarted, no longer lists it. A VM whose owner file comes to
name another host is killed by its agent's watcher. A host that loses the center and
its datastores powers its VMs off, and maintenance mode refuses what it must.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from thinvisor.appliance import Appliance
from thinvisor.host.engine.process import kill
from thinvisor.host.ha import HEARTBEAT_DIR
from thinvisor.host.inventory import host_id, set_owner

from .agentenv import TestAgent
from .hostenv import TestHost

pytestmark = pytest.mark.functional


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not seen within {timeout:.0f} s: {what}")


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def kill_agent(agent: TestAgent) -> None:
    """SIGKILL: the agent dies without a word, as with a host that fails."""
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)
    agent.proc = None


def events(client: httpx.Client, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.get("/events", params={"kind": kind}).json()
    return found


def vm_names(client: httpx.Client) -> list[str]:
    return [v["name"] for v in client.get("/vms").json()]


@pytest.fixture
def pair(appliance: Appliance) -> Iterator[tuple[TestAgent, TestAgent, Path]]:
    """Agents A and B (not started), each with its own datastore and the one they share."""
    with ExitStack() as stack:
        shared = Path(tempfile.mkdtemp(prefix="tvha", dir="/tmp"))
        stack.callback(shutil.rmtree, shared, True)
        agents = []
        for _ in range(2):
            host = TestHost(appliance)
            stack.callback(host.close)
            agent = TestAgent(host)
            stack.callback(agent.close)
            host.add_datastore("shared", shared)
            agents.append(agent)
        yield agents[0], agents[1], shared


def test_a_vm_of_a_dead_host_restarts_on_another_and_never_runs_twice(
    pair: tuple[TestAgent, TestAgent, Path],
) -> None:
    a, b, shared = pair
    a.host.create("ha1", datastore="shared")
    a.host.wait_ready("ha1")
    a.start()
    b.start()
    id_a, id_b = host_id(a.state_dir), host_id(b.state_dir)
    with a.client() as ca, b.client() as cb:
        assert ca.get("/host").json()["host_id"] == id_a
        assert vm_names(ca) == ["ha1"] and vm_names(cb) == []

        def beats() -> dict[str, dict[str, Any]]:
            response = cb.get("/ha/heartbeats", params={"datastore": "shared"})
            assert response.status_code == 200, response.text
            return {h["host"]: h for h in response.json()}

        wait_until("both hosts' heartbeats on the shared datastore", lambda: len(beats()) == 2)
        assert cb.get("/ha/heartbeats", params={"datastore": "nope"}).status_code == 404

        # Host A fails: its agent and its QEMU die at once.
        pid = a.host.pid("ha1")
        assert pid is not None
        kill_agent(a)
        kill(pid)
        wait_until("A's QEMU gone", lambda: gone(pid))
        # What the center sees: A's heartbeat ages, B's does not.
        wait_until(
            "A's heartbeat ageing while B's stays fresh",
            lambda: (h := beats())[id_a]["age_s"] > 3 and h[id_b]["age_s"] < 2,
        )

        # B takes the VM over and boots it.
        body = {"vm": "ha1", "datastore": "shared"}
        response = cb.post("/ha/recover", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "running"
        b.host.wait_ready("ha1", count=2)  # the second boot in the VM's serial log: B's
        assert vm_names(cb) == ["ha1"]
        again = cb.post("/ha/recover", json=body)
        assert again.status_code == 409
        recovered = events(cb, "vm.recovered")
        assert recovered[-1]["data"] == {"previous_owner": id_a}

        # A comes back: the VM is B's.
        a.start()
        assert vm_names(ca) == []
        assert b.host.pid("ha1") is not None

        # Another host takes it from B (the center decided so): B's watcher kills it.
        pid_b = b.host.pid("ha1")
        assert pid_b is not None
        set_owner(shared / "ha1", uuid.uuid4().hex)
        wait_until("B's QEMU killed by its watcher", lambda: gone(pid_b), timeout=15)
        fenced = events(cb, "vm.fenced")
        assert [e["object"] for e in fenced] == ["vm/ha1"]
        assert vm_names(cb) == []


def break_heartbeats(datastore: Path) -> None:
    """Make every heartbeat write on ``datastore`` fail: a file where its directory goes."""
    path = datastore / HEARTBEAT_DIR
    while True:
        shutil.rmtree(path, ignore_errors=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # the agent made the directory again meanwhile
            continue
        os.close(fd)
        return


def test_a_host_cut_off_fences_itself_and_maintenance_mode_refuses(
    host: TestHost, agent: TestAgent
) -> None:
    host.create("m1")
    host.wait_ready("m1")
    with agent.client() as c:
        assert c.get("/host/maintenance").json() == {"maintenance": False}
        # A running VM keeps the host out of maintenance mode.
        refused = c.post("/host/maintenance", json={"maintenance": True})
        assert refused.status_code == 409
        assert refused.json()["message"] == "m1 still run: move or stop them first"
        assert c.get("/host").json()["maintenance"] is False

        # The center's heartbeat arms the watchdog; then the center and the datastore
        # are both lost: the host powers its VM off.
        beat = c.post("/ha/heartbeat", json={"timeout_s": 1})
        assert beat.json() == {"host_id": host_id(agent.state_dir), "fenced": False}
        break_heartbeats(host.datastore)

        def fenced_vm() -> dict[str, Any] | None:
            vm: dict[str, Any] = c.get("/vms/m1").json()
            return vm if vm["state"] == "stopped" else None

        vm = wait_until("the VM fenced", fenced_vm, timeout=30)
        assert vm["stop_reason"].startswith("fenced: lost the center and its datastores for")
        assert len(events(c, "host.fenced")) == 1
        (host.datastore / HEARTBEAT_DIR).unlink()
        assert c.post("/ha/heartbeat", json={"timeout_s": 60}).json()["fenced"] is True

        # Stopped, the host may enter maintenance mode; then nothing starts or arrives.
        entered = c.post("/host/maintenance", json={"maintenance": True})
        assert entered.status_code == 200 and entered.json() == {"maintenance": True}
        start = c.post("/vms/m1/start")
        assert start.status_code == 409
        assert (
            start.json()["message"] == "vm 'm1': cannot power on: the host is in maintenance mode"
        )
        arrival = c.post("/migrations/incoming", json={"vm": {"name": "m2", "memory_mib": 64}})
        assert arrival.status_code == 409
        assert "maintenance mode" in arrival.json()["message"]

    # It survives a restart of the agent.
    agent.stop()
    agent.start()
    with agent.client() as c:
        assert c.get("/host/maintenance").json() == {"maintenance": True}
        left = c.post("/host/maintenance", json={"maintenance": False})
        assert left.json() == {"maintenance": False}
        assert c.post("/vms/m1/start").json()["state"] == "running"
        kinds = [e["kind"] for e in events(c, "host.maintenance")]
        assert kinds == ["host.maintenance_entered", "host.maintenance_exited"]
