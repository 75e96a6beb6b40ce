"""HA and maintenance mode on the host, without QEMU: datastore heartbeats, the
watchdog's decision, fencing, taking a VM over, maintenance mode and its refusals, and
their REST routes through FastAPI's TestClient."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from starlette.exceptions import StarletteDeprecationWarning

from thinvisor.api.app import create_app
from thinvisor.auth import Role, UserStore
from thinvisor.config import DatastoreConfig, HaConfig, HostConfig
from thinvisor.errors import Busy, InvalidConfig
from thinvisor.host.agent import HostAgent
from thinvisor.host.engine.accel import AccelChoice
from thinvisor.host.ha import (
    HEARTBEAT_DIR,
    HeartbeatWriter,
    HighAvailability,
    read_heartbeats,
    should_fence,
)
from thinvisor.host.hostinfo import HostFacts
from thinvisor.host.incoming import IncomingMigrations, IncomingRequest
from thinvisor.host.inventory import host_id, owner_of, set_owner
from thinvisor.host.maintenance import in_maintenance
from thinvisor.host.service import HostService
from thinvisor.model import VmSpec

with warnings.catch_warnings():
    # Starlette prefers httpx2 to the httpx we pin; the test client works with either.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ADMIN = ("admin", "password123")
READER = ("reader", "password123")
FACTS = HostFacts(cpus=4, memory_total_mib=8192, memory_available_mib=4096, cpu_model="test")
OTHER = "0123456789abcdef0123456789abcdef"  # another host's id


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def host_config(root: Path, shared: Path, interval_s: float = 1.0) -> HostConfig:
    """A host of its own (state, run dir, datastore ``local``) that also sees ``shared``."""
    return HostConfig(
        qemu_binary=str(root / "no-qemu-in-unit-tests"),
        state_dir=root / "state",
        run_dir=root / "run",
        cache_dir=root / "cache",
        datastores=[
            DatastoreConfig(name="local", path=root / "local"),
            DatastoreConfig(name="shared", path=shared),
        ],
        ha=HaConfig(heartbeat_interval_s=interval_s),
    )


def make_service(config: HostConfig) -> HostService:
    for ds in config.datastores:
        ds.path.mkdir(parents=True, exist_ok=True)
    return HostService(config, accel=lambda: AccelChoice("tcg", "test"), facts=lambda: FACTS)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    path = tmp_path / "shared"
    path.mkdir()
    return path


@pytest.fixture
def service(tmp_path: Path, shared: Path) -> HostService:
    return make_service(host_config(tmp_path / "a", shared))


@pytest.fixture
def agent(service: HostService) -> Iterator[HostAgent]:
    agent = HostAgent(service.config, service=service)
    agent.users = UserStore(service.config.state_dir / "users.json", hasher=FAST)
    agent.users.add_user(*ADMIN, Role.ADMIN)
    agent.users.add_user(*READER, Role.READ_ONLY)
    yield agent
    agent.events.close()


@pytest.fixture
def client(agent: HostAgent) -> Iterator[TestClient]:
    with TestClient(create_app(agent, start_agent=False)) as client:
        client.auth = ADMIN
        yield client


def beat(writer: HeartbeatWriter) -> None:
    for thread in writer.beat():
        thread.join(10)


def kinds(agent: HostAgent) -> list[str]:
    return [e.kind for e in agent.events.list(limit=1000)]


def other_hosts_vm(datastore: Path, name: str = "vm1", owner: str = OTHER) -> Path:
    """A VM directory on ``datastore`` that belongs to the host ``owner``."""
    vm_dir = datastore / name
    vm_dir.mkdir()
    (vm_dir / "vm.toml").write_text(f'name = "{name}"\nmemory_mib = 64\n')
    set_owner(vm_dir, owner)
    return vm_dir


class FakeQemu:
    """A process holding the POSIX lock on a VM's pidfile, as QEMU does while it runs."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        holder = (
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", holder, str(run_dir / "qemu.pid")], stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        with self.proc.stdout:
            assert self.proc.stdout.readline() == b"locked\n"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def fake_qemus() -> Iterator[list[FakeQemu]]:
    made: list[FakeQemu] = []
    yield made
    for qemu in made:
        qemu.close()


# --- datastore heartbeats --------------------------------------------------------------


def test_two_hosts_write_and_read_their_heartbeats_on_a_shared_datastore(
    tmp_path: Path, shared: Path
) -> None:
    a, b = (host_config(tmp_path / n, shared) for n in ("a", "b"))
    for config in (a, b):
        make_service(config)
    id_a, id_b = host_id(a.state_dir), host_id(b.state_dir)
    assert id_a != id_b
    writer_a, writer_b = HeartbeatWriter(a, id_a), HeartbeatWriter(b, id_b)
    beat(writer_a)
    beat(writer_b)
    beats = {h.host: h for h in read_heartbeats(shared)}
    assert set(beats) == {id_a, id_b}
    assert beats[id_a].seq == beats[id_b].seq == 1
    assert abs(beats[id_a].time - time.time()) < 5
    assert 0 <= beats[id_a].age_s < 5
    data = json.loads((shared / HEARTBEAT_DIR / id_a).read_text())
    assert set(data) == {"host", "seq", "time"} and data["host"] == id_a
    # Each local datastore holds its own host's heartbeat only.
    assert [h.host for h in read_heartbeats(a.datastores[0].path)] == [id_a]
    # B saw A's heartbeat on the shared datastore only; A sees B's once it writes again.
    assert writer_b.shared == {"shared"}
    assert writer_a.shared == set()
    beat(writer_a)
    assert writer_a.shared == {"shared"}
    assert {h.host: h.seq for h in read_heartbeats(shared)} == {id_a: 2, id_b: 1}


def test_a_heartbeat_ages_by_its_file(tmp_path: Path, shared: Path) -> None:
    config = host_config(tmp_path / "a", shared)
    make_service(config)
    writer = HeartbeatWriter(config, host_id(config.state_dir))
    beat(writer)
    path = shared / HEARTBEAT_DIR / writer.host_id
    old = time.time() - 42
    os.utime(path, (old, old))
    [heartbeat] = read_heartbeats(shared)
    assert 41 < heartbeat.age_s < 50
    # Not heartbeats: hidden files (a write under way) and what is not one.
    (shared / HEARTBEAT_DIR / ".x.tmp").write_text("{}")
    (shared / HEARTBEAT_DIR / "junk").write_text("not json")
    assert [h.host for h in read_heartbeats(shared)] == [writer.host_id]
    assert read_heartbeats(tmp_path / "nothing-written-here") == []


def test_a_datastore_that_cannot_be_written_is_not_counted_as_written(
    tmp_path: Path, shared: Path
) -> None:
    config = host_config(tmp_path / "a", shared)
    make_service(config)
    writer = HeartbeatWriter(config, host_id(config.state_dir))
    # Where the heartbeat directory should be lies a file: every write fails.
    (shared / HEARTBEAT_DIR).write_text("in the way")
    beat(writer)
    written = writer.written(["local", "shared"])
    assert written["shared"] == writer.started
    assert written["local"] > writer.started


class SteppingClock:
    """A clock that moves on by ``step`` seconds at every look."""

    def __init__(self, step: float) -> None:
        self.now = 100.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize(("took", "counts"), [(1.5, False), (0.4, True)])
def test_a_write_slower_than_the_interval_counts_as_failed(
    tmp_path: Path, shared: Path, took: float, counts: bool
) -> None:
    config = host_config(tmp_path / "a", shared, interval_s=1.0)
    make_service(config)
    # One datastore, so that one write alone looks at the clock (before and after).
    config = config.model_copy(update={"datastores": [config.datastores[1]]})
    writer = HeartbeatWriter(config, host_id(config.state_dir), clock=SteppingClock(took))
    beat(writer)
    assert (shared / HEARTBEAT_DIR / writer.host_id).exists()  # written, but late or not
    assert (writer.written(["shared"])["shared"] > writer.started) is counts


# --- the watchdog's decision -----------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "center_seen", "written", "shared", "fence"),
    [
        # Not armed: no center heartbeat yet.
        (1000.0, None, {"a": 0.0}, set(), False),
        # The center heard recently: never, whatever the datastores.
        (1000.0, 990.0, {"a": 0.0}, set(), False),
        # The center silent, but a datastore still written.
        (1000.0, 900.0, {"a": 995.0}, set(), False),
        # The center silent, every datastore failing for longer than the timeout.
        (1000.0, 900.0, {"a": 980.0, "b": 900.0}, set(), True),
        # Exactly at the timeout: not yet.
        (1000.0, 985.0, {"a": 0.0}, set(), False),
        (1000.0, 900.0, {"a": 985.0}, set(), False),
        # Only the shared datastores count: a private one still written does not help.
        (1000.0, 900.0, {"local": 999.0, "shared": 900.0}, {"shared"}, True),
        (1000.0, 900.0, {"local": 900.0, "shared": 999.0}, {"shared"}, False),
        # Two shared datastores: one still written keeps the VMs running.
        (1000.0, 900.0, {"s1": 900.0, "s2": 999.0}, {"s1", "s2"}, False),
        # A shared datastore no longer configured does not count.
        (1000.0, 900.0, {"local": 900.0}, {"gone"}, True),
    ],
)
def test_should_fence(
    now: float,
    center_seen: float | None,
    written: dict[str, float],
    shared: set[str],
    fence: bool,
) -> None:
    assert should_fence(now, center_seen, 15.0, written, shared) is fence


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_watchdog_fences_once_center_and_datastores_are_lost(
    service: HostService, agent: HostAgent, shared: Path
) -> None:
    clock = Clock()
    ha = HighAvailability(service, agent.events, clock=clock)
    beat(ha.writer)
    assert not ha.cut_off()  # not armed
    assert ha.center_heartbeat(5.0) is False
    clock.now += 10
    assert ha.cut_off()  # silent center, and no write since 10 s
    beat(ha.writer)
    assert not ha.cut_off()  # the datastores are written again
    clock.now += 10
    assert ha.cut_off()
    assert run(ha.fence()) == []  # nothing runs here
    assert "host.fenced" in kinds(agent)
    fenced = agent.events.list(kind_prefix="host.fenced")[-1]
    assert fenced.message == "fenced: lost the center and its datastores for 20 s"
    assert not ha.cut_off()  # disarmed until the center's next heartbeat
    assert ha.center_heartbeat(5.0) is True  # it says so once
    assert ha.center_heartbeat(5.0) is False


def test_fencing_powers_off_what_runs_here(
    service: HostService, agent: HostAgent, fake_qemus: list[FakeQemu]
) -> None:
    run(service.create_vm(VmSpec.model_validate({"name": "vm1", "memory_mib": 64})))
    qemu = FakeQemu(service.config.run_dir / "vms" / "vm1")
    fake_qemus.append(qemu)
    ha = HighAvailability(service, agent.events)
    ha.center_heartbeat(1.0)
    assert run(ha.fence()) == ["vm1"]
    # No QMP answers this QEMU: the orderly stop fails and the process is killed.
    assert qemu.proc.wait(10) == -9
    record = json.loads((service.config.run_dir / "vms" / "vm1" / "stop.json").read_text())
    assert record["reason"].startswith("fenced: lost the center and its datastores for")


# --- a VM must never run twice ---------------------------------------------------------


def test_the_watcher_kills_a_vm_another_host_took_over(
    service: HostService, agent: HostAgent, shared: Path, fake_qemus: list[FakeQemu]
) -> None:
    vm_dir = other_hosts_vm(shared, owner=service.inventory.host_id)
    qemu = FakeQemu(service.config.run_dir / "vms" / "vm1")
    fake_qemus.append(qemu)
    assert run(agent.ha.fence_foreign()) == []  # still this host's
    set_owner(vm_dir, OTHER)
    assert run(agent.ha.fence_foreign({"other-vm"})) == ["vm1"]
    assert qemu.proc.wait(10) == -9
    [event] = agent.events.list(kind_prefix="vm.fenced")
    assert event.object == "vm/vm1" and OTHER in event.message
    assert event.data == {"owner": OTHER}


def test_the_watcher_spares_vms_arriving_and_vms_in_an_operation(
    service: HostService, agent: HostAgent, shared: Path, fake_qemus: list[FakeQemu]
) -> None:
    other_hosts_vm(shared)
    qemu = FakeQemu(service.config.run_dir / "vms" / "vm1")
    fake_qemus.append(qemu)
    # On its way here by live migration: its directory names the source until it arrives.
    records = service.config.state_dir / "migrations"
    records.mkdir(parents=True)
    (records / "abc.json").write_text(json.dumps({"id": "abc", "vm": "vm1"}))
    assert run(agent.ha.fence_foreign()) == []
    (records / "abc.json").unlink()

    async def while_locked() -> list[str]:
        async with service.inventory.lock("vm1"):  # a migration leaving holds it
            return await agent.ha.fence_foreign()

    assert run(while_locked()) == []
    assert qemu.proc.poll() is None
    assert run(agent.ha.fence_foreign()) == ["vm1"]


# --- taking a VM over ------------------------------------------------------------------


def test_recover_takes_a_vm_of_another_host_over(
    service: HostService, agent: HostAgent, shared: Path
) -> None:
    vm_dir = other_hosts_vm(shared)
    assert run(service.list_vms()) == []
    info = run(agent.ha.recover("vm1", "shared", start=False))
    assert (info.name, info.state, info.datastore) == ("vm1", "stopped", "shared")
    assert owner_of(vm_dir) == service.inventory.host_id
    assert [v.name for v in run(service.list_vms())] == ["vm1"]
    [event] = agent.events.list(kind_prefix="vm.recovered")
    assert event.data == {"previous_owner": OTHER}


def test_recover_is_refused_in_maintenance(
    service: HostService, agent: HostAgent, shared: Path
) -> None:
    vm_dir = other_hosts_vm(shared)
    run(agent.maintenance.set(True))
    with pytest.raises(Busy, match="maintenance mode"):
        run(agent.ha.recover("vm1", "shared", start=False))
    assert owner_of(vm_dir) == OTHER


# --- maintenance mode ------------------------------------------------------------------


def test_maintenance_is_kept_in_the_state_dir(service: HostService, agent: HostAgent) -> None:
    assert agent.maintenance.active is False
    assert run(agent.maintenance.set(True)) is True
    assert in_maintenance(service.config.state_dir)
    # A new agent on the same state directory (a restart) is in maintenance too.
    again = HostAgent(service.config)
    assert again.maintenance.active is True
    again.events.close()
    assert run(agent.maintenance.set(True)) is True  # twice: harmless, one event
    assert run(agent.maintenance.set(False)) is False
    assert not in_maintenance(service.config.state_dir)
    assert [k for k in kinds(agent) if k.startswith("host.")] == [
        "host.maintenance_entered",
        "host.maintenance_exited",
    ]


def test_a_corrupt_maintenance_file_is_an_error_not_a_guess(service: HostService) -> None:
    service.config.state_dir.mkdir(parents=True, exist_ok=True)
    (service.config.state_dir / "maintenance.json").write_text("{")
    with pytest.raises(InvalidConfig, match=r"maintenance\.json"):
        in_maintenance(service.config.state_dir)


def test_power_on_resume_and_arrivals_are_refused_in_maintenance(
    service: HostService, agent: HostAgent
) -> None:
    spec = VmSpec.model_validate({"name": "vm1", "memory_mib": 64})
    info = run(service.create_vm(spec))
    run(agent.maintenance.set(True))
    with pytest.raises(Busy) as refused:
        run(service.start("vm1"))
    assert str(refused.value) == "vm 'vm1': cannot power on: the host is in maintenance mode"
    info.paths.suspend_state.write_bytes(b"saved")  # suspended
    with pytest.raises(Busy, match="maintenance mode"):
        run(service.resume("vm1"))
    incoming = IncomingMigrations(service, 8000, "AB:CD")
    request = IncomingRequest(vm={"name": "vm2", "memory_mib": 64})
    with pytest.raises(Busy, match="vm 'vm2': cannot migrate here: the host is in maintenance"):
        run(_prepare(incoming, request))
    # Out of maintenance the same arrival gets its ticket.
    run(agent.maintenance.set(False))
    assert run(_prepare(incoming, request, close=True)).mode == "mirror"


async def _prepare(
    incoming: IncomingMigrations, request: IncomingRequest, *, close: bool = False
) -> Any:
    try:
        return await incoming.prepare(request)
    finally:
        if close:
            await incoming.close()


def test_entering_is_refused_while_a_vm_runs(
    service: HostService, agent: HostAgent, fake_qemus: list[FakeQemu]
) -> None:
    for name in ("vm1", "vm2", "vm3"):
        run(service.create_vm(VmSpec.model_validate({"name": name, "memory_mib": 64})))
    for name in ("vm1", "vm3"):
        fake_qemus.append(FakeQemu(service.config.run_dir / "vms" / name))
    with pytest.raises(Busy) as refused:
        run(agent.maintenance.set(True))
    assert str(refused.value) == "vm1, vm3 still run: move or stop them first"
    assert agent.maintenance.active is False
    assert not any(k.startswith("host.maintenance") for k in kinds(agent))


def test_entering_is_refused_while_a_vm_arrives(service: HostService, agent: HostAgent) -> None:
    records = service.config.state_dir / "migrations"
    records.mkdir(parents=True)
    (records / "abc.json").write_text(json.dumps({"id": "abc", "vm": "web"}))
    with pytest.raises(Busy, match="web still on the way here"):
        run(agent.maintenance.set(True))
    assert agent.maintenance.active is False


def test_autostart_starts_nothing_in_maintenance(service: HostService, agent: HostAgent) -> None:
    spec = VmSpec.model_validate({"name": "vm1", "memory_mib": 64, "autostart": True})
    run(service.create_vm(spec))
    run(agent.maintenance.set(True))
    assert run(agent.autostart()) == []
    assert "vm.autostart_failed" not in kinds(agent)


# --- the REST routes -------------------------------------------------------------------


def test_maintenance_routes(client: TestClient, agent: HostAgent) -> None:
    assert client.get("/api/v1/host/maintenance").json() == {"maintenance": False}
    host = client.get("/api/v1/host").json()
    assert host["maintenance"] is False
    assert host["host_id"] == agent.service.inventory.host_id
    response = client.post("/api/v1/host/maintenance", json={"maintenance": True})
    assert response.status_code == 200, response.text
    assert response.json() == {"maintenance": True}
    assert client.get("/api/v1/host/maintenance", auth=READER).json() == {"maintenance": True}
    assert client.get("/api/v1/host").json()["maintenance"] is True
    refused = client.post("/api/v1/host/maintenance", json={"maintenance": False}, auth=READER)
    assert refused.status_code == 403
    assert client.post("/api/v1/host/maintenance", json={}).status_code == 400
    assert client.post("/api/v1/host/maintenance", json={"maintenance": False}).json() == {
        "maintenance": False
    }


def test_maintenance_refusal_over_rest(
    client: TestClient, service: HostService, fake_qemus: list[FakeQemu]
) -> None:
    run(service.create_vm(VmSpec.model_validate({"name": "vm1", "memory_mib": 64})))
    fake_qemus.append(FakeQemu(service.config.run_dir / "vms" / "vm1"))
    response = client.post("/api/v1/host/maintenance", json={"maintenance": True})
    assert response.status_code == 409
    assert response.json() == {
        "error": "busy",
        "message": "vm1 still run: move or stop them first",
    }


def test_heartbeat_routes(client: TestClient, agent: HostAgent, shared: Path) -> None:
    assert client.get("/api/v1/ha/heartbeats", params={"datastore": "shared"}).json() == []
    beat(agent.ha.writer)
    beats = client.get("/api/v1/ha/heartbeats", params={"datastore": "shared"}, auth=READER)
    assert beats.status_code == 200
    [heartbeat] = beats.json()
    assert heartbeat["host"] == agent.service.inventory.host_id
    assert heartbeat["seq"] == 1 and heartbeat["age_s"] >= 0
    assert set(heartbeat) == {"host", "seq", "time", "age_s"}
    unknown = client.get("/api/v1/ha/heartbeats", params={"datastore": "nope"})
    assert unknown.status_code == 404
    assert client.get("/api/v1/ha/heartbeats").status_code == 400


def test_center_heartbeat_route(client: TestClient, agent: HostAgent) -> None:
    response = client.post("/api/v1/ha/heartbeat", json={"timeout_s": 30})
    assert response.status_code == 200, response.text
    assert response.json() == {"host_id": agent.service.inventory.host_id, "fenced": False}
    assert agent.ha.center_timeout_s == 30 and agent.ha.center_seen is not None
    assert client.post("/api/v1/ha/heartbeat").status_code == 200  # the default timeout
    assert agent.ha.center_timeout_s == 15
    assert client.post("/api/v1/ha/heartbeat", json={"timeout_s": 0.5}).status_code == 400
    assert client.post("/api/v1/ha/heartbeat", json={"timeout_s": 3601}).status_code == 400
    assert client.post("/api/v1/ha/heartbeat", json={}, auth=READER).status_code == 403


def test_recover_route(client: TestClient, agent: HostAgent, shared: Path) -> None:
    other_hosts_vm(shared)
    body = {"vm": "vm1", "datastore": "shared", "start": False}
    response = client.post("/api/v1/ha/recover", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "vm1" and response.json()["state"] == "stopped"
    again = client.post("/api/v1/ha/recover", json=body)
    assert again.status_code == 409 and "this host's already" in again.json()["message"]
    missing = client.post("/api/v1/ha/recover", json={**body, "vm": "vm2"})
    assert missing.status_code == 404
    nowhere = client.post("/api/v1/ha/recover", json={**body, "datastore": "nope"})
    assert nowhere.status_code == 404
    bad = client.post("/api/v1/ha/recover", json={**body, "vm": "../etc"})
    assert bad.status_code == 400
    assert client.post("/api/v1/ha/recover", json=body, auth=READER).status_code == 403


def test_recover_route_refuses_a_name_taken_here(
    client: TestClient, service: HostService, shared: Path
) -> None:
    run(service.create_vm(VmSpec.model_validate({"name": "vm1", "memory_mib": 64})))
    vm_dir = other_hosts_vm(shared)
    response = client.post("/api/v1/ha/recover", json={"vm": "vm1", "datastore": "shared"})
    assert response.status_code == 409
    assert response.json()["message"] == "vm 'vm1' already exists on this host"
    assert owner_of(vm_dir) == OTHER
