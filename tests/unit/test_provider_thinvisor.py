"""The thinvisor provider's translations, without an agent: credentials, where a VM's
disks live, a VM the agent cannot read, the event ids a resumed stream relies on, and
the requests of a live migration (against routes served by a plain function)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

from thinvisor.errors import InvalidArgument, InvalidState, NotFound
from thinvisor.providers.base import (
    ChangeKind,
    Connection,
    MigrationOptions,
    MigrationTicket,
    PowerState,
)
from thinvisor.providers.thinvisor import (
    AgentApi,
    EventStream,
    ThinvisorProvider,
    auth_header,
    disk_datastore,
    host_record,
    vm_record,
)

STORES = {"local": "/var/lib/ds", "fast": "/var/lib/ds/fast", "nfs": "/mnt/nfs"}


def test_password_goes_as_basic_and_a_token_as_bearer() -> None:
    basic = auth_header("admin", "pa:ss")["Authorization"]
    assert basic == "Basic " + base64.b64encode(b"admin:pa:ss").decode()
    assert auth_header(None, "tv_abc") == {"Authorization": "Bearer tv_abc"}
    assert auth_header("admin", None) == {}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("disk0.qcow2", "local"),  # relative: in the VM's own directory
        ("/mnt/nfs/images/base.qcow2", "nfs"),
        ("/var/lib/ds/fast/web/disk1.qcow2", "fast"),  # the innermost datastore
        ("/srv/elsewhere.raw", "local"),
    ],
)
def test_disk_datastore(path: str, expected: str) -> None:
    assert disk_datastore(path, "local", STORES) == expected


def test_vm_record_of_a_vm_and_of_an_invalid_one() -> None:
    spec = {
        "vcpus": 2,
        "memory_mib": 96,
        "template": False,
        "disks": [{"path": "disk0.qcow2"}, {"path": "/mnt/nfs/x/d.qcow2"}],
        "nics": [{"network": "user"}, {"network": "lan"}, {"network": "lan"}],
        "resources": {"cpu_reservation_mhz": 500, "memory_reservation_mib": 64},
    }
    vm = {"name": "web", "datastore": "local", "state": "paused", "uuid": "u", "spec": spec}
    record = vm_record(vm, STORES)
    assert (record.id, record.power_state, record.cpus, record.memory_mib) == (
        "web", PowerState.PAUSED, 2, 96)  # fmt: skip
    assert (record.datastores, record.networks) == (("local", "nfs"), ("user", "lan"))
    assert (record.reserved_cpu_mhz, record.reserved_memory_mib) == (500, 64)
    broken = vm_record({"name": "b", "datastore": "local", "state": "invalid", "spec": None}, {})
    assert (broken.power_state, broken.cpus, broken.datastores) == (
        PowerState.UNKNOWN, 0, ("local",))  # fmt: skip
    assert (broken.reserved_cpu_mhz, broken.reserved_memory_mib) == (0, 0)


def event(event_id: int, kind: str = "auth.login") -> dict[str, Any]:
    return {"id": event_id, "kind": kind, "object": None, "user": "u", "message": "m"}


def test_resumed_stream_skips_repeats_and_says_when_events_were_lost() -> None:
    provider = ThinvisorProvider(Connection("https://127.0.0.1:9", "u", "p", "AA"))
    provider.last_event_id = 10
    stream = EventStream(provider)

    async def kinds(e: dict[str, Any]) -> list[ChangeKind]:
        return [c.kind for c in await stream.changes(e)]

    assert asyncio.run(kinds(event(9))) == []  # seen before the reconnect
    assert asyncio.run(kinds(event(11))) == []  # the next one, of nothing the center lists
    assert asyncio.run(kinds(event(15, "datastore.added"))) == [ChangeKind.RESYNC] * 2
    assert provider.last_event_id == 15


# --- live migration, against an agent's routes served by httpx's mock transport -------------

SPEC = {"name": "app1", "vcpus": 1, "memory_mib": 64, "disks": [], "nics": []}
RESULT = {
    "vm": "app1",
    "mode": "shared",
    "downtime_ms": 84.0,
    "total_ms": 2100.0,
    "transferred_bytes": 48 << 20,
    "destination": "agent-b.example",
}


class Agent:
    """The migration routes of one agent: what it was asked, in order, and a migration
    task that runs until ``finish`` (or a cancel) ends it."""

    def __init__(self, *, cancel_too_late: bool = False) -> None:
        self.asked: list[tuple[str, str, Any]] = []
        self.task: dict[str, Any] = {"id": "t-1", "kind": "vm.migrate", "state": "queued",
                                     "progress": 0, "message": None, "result": None,
                                     "error": None}  # fmt: skip
        self.polls = 0
        self.running = asyncio.Event()  # set once the task was asked about twice
        self.cancel_too_late = cancel_too_late

    def finish(self, error: dict[str, str] | None = None) -> None:
        if error is None:
            self.task |= {"state": "success", "progress": 100, "result": RESULT}
        else:
            self.task |= {"state": "error", "error": error}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        route = (request.method, request.url.path.removeprefix("/api/v1"))
        self.asked.append((*route, body))
        if route == ("GET", "/vms/app1"):
            return httpx.Response(200, json={"name": "app1", "state": "running", "spec": SPEC})
        if route == ("GET", "/vms/broken"):
            return httpx.Response(200, json={"name": "broken", "state": "invalid", "spec": None})
        if route == ("POST", "/migrations/incoming"):
            ticket = {"id": "m-1", "token": "secret", "port": 49152, "fingerprint": "AB:CD",
                      "mode": "shared"}  # fmt: skip
            return httpx.Response(201, json=ticket)
        if route == ("POST", "/vms/app1/migrate"):
            return httpx.Response(202, json=dict(self.task))
        if route == ("GET", "/tasks/t-1"):
            return self.poll()
        if route == ("POST", "/tasks/t-1/cancel"):
            return self.cancel()
        return httpx.Response(404, json={"error": "not_found", "message": f"no route {route}"})

    def poll(self) -> httpx.Response:
        self.polls += 1
        if self.polls >= 2:
            self.running.set()
        if self.task["state"] in ("queued", "running"):
            self.task |= {"state": "running", "progress": min(self.polls * 30, 90),
                          "message": f"copied {self.polls}"}  # fmt: skip
        return httpx.Response(200, json=dict(self.task))

    def cancel(self) -> httpx.Response:
        if self.cancel_too_late:
            self.finish()
            return httpx.Response(409, json={"error": "busy", "message": "already finished"})
        self.finish({"error": "cancelled", "message": "task cancelled"})
        return httpx.Response(202, json=dict(self.task))


def on_agent(address: str, agent: Callable[[httpx.Request], httpx.Response]) -> ThinvisorProvider:
    """A provider whose requests ``agent`` answers (plain HTTP: nothing to pin)."""
    provider = ThinvisorProvider(Connection(address, "admin", "pw"))
    api = provider.api
    provider.api = AgentApi(
        api.address, api.base, api.headers, None, transport=httpx.MockTransport(agent)
    )
    return provider


def test_a_migration_asks_both_agents_as_their_api_says() -> None:
    source, destination = Agent(), Agent()
    sender = on_agent("http://agent-a.example:8443", source)
    receiver = on_agent("http://agent-b.example:8443", destination)
    options = MigrationOptions(downtime_ms=50, auto_converge=False, bandwidth_mib_s=100)
    steps: list[tuple[int, str]] = []

    def report(percent: int, message: str) -> None:
        steps.append((percent, message))
        if len(steps) == 3:
            source.finish()

    async def go() -> dict[str, Any]:
        spec = await sender.migration_spec("app1")
        ticket = await receiver.prepare_incoming(spec, replace(options, datastore="fast"))
        assert (ticket.address, ticket.port, ticket.mode) == ("agent-b.example", 49152, "shared")
        return await sender.migrate("app1", ticket, options, report)

    assert asyncio.run(go()) == RESULT
    assert destination.asked == [
        (
            "POST",
            "/migrations/incoming",
            {"vm": SPEC, "mode": "auto", "datastore": "fast", "live": True},
        )
    ]
    assert source.asked[:2] == [
        ("GET", "/vms/app1", None),
        ("POST", "/vms/app1/migrate", {
            "address": "agent-b.example", "port": 49152, "fingerprint": "AB:CD",
            "token": "secret", "mode": "shared", "downtime_ms": 50, "auto_converge": False,
            "bandwidth_mib_s": 100, "memory_copy": "auto",
        }),
    ]  # fmt: skip
    assert steps[:3] == [(0, ""), (30, "copied 1"), (60, "copied 2")]
    assert steps[-1][0] == 100


def test_a_vm_without_a_spec_is_not_sent_and_a_failed_task_raises_its_error() -> None:
    agent = Agent()
    provider = on_agent("http://agent-a.example:8443", agent)
    ticket = MigrationTicket("m-1", "secret", "agent-b.example", 49152, "AB:CD", "shared")
    with pytest.raises(InvalidState, match="vm 'broken': cannot migrate while invalid"):
        asyncio.run(provider.migration_spec("broken"))
    agent.finish({"error": "invalid_argument", "message": "token: refused by the destination"})
    with pytest.raises(InvalidArgument, match="token: refused by the destination"):
        asyncio.run(provider.migrate("app1", ticket, MigrationOptions()))


@pytest.mark.parametrize("too_late", [False, True])
def test_cancelling_a_migration_cancels_the_agents_task(too_late: bool) -> None:
    agent = Agent(cancel_too_late=too_late)
    provider = on_agent("http://agent-a.example:8443", agent)
    ticket = MigrationTicket("m-1", "secret", "agent-b.example", 49152, "AB:CD", "shared")

    async def go() -> dict[str, Any]:
        moving = asyncio.ensure_future(provider.migrate("app1", ticket, MigrationOptions()))
        await asyncio.wait_for(agent.running.wait(), 5)
        moving.cancel()
        return await moving

    if too_late:  # it had switched over: the VM runs there, and that is what is said
        assert asyncio.run(go()) == RESULT
    else:
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(go())
    assert ("POST", "/tasks/t-1/cancel", None) in agent.asked


# --- high availability, against an agent's /ha routes ---------------------------------------

HOST = {"hostname": "node-b", "thinvisor_version": "1.0", "cpus": 4, "memory_total_mib": 8192,
        "host_id": "b7c1", "maintenance": False}  # fmt: skip
BEATS = [
    {"host": "a3f0", "seq": 812, "time": 1_700_000_000.5, "age_s": 0.4},
    {"host": "b7c1", "seq": 640, "time": 1_699_999_980.0, "age_s": 21.3},
]
RECOVERED = {"name": "app1", "datastore": "nfs", "state": "running", "uuid": "u1",
             "spec": {"vcpus": 1, "memory_mib": 64, "disks": [{"path": "disk0.qcow2"}],
                      "nics": []}}  # fmt: skip


class HaAgent:
    """The ``/ha`` routes of one agent, and what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, Any, dict[str, str]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        route = (request.method, request.url.path.removeprefix("/api/v1"))
        self.asked.append((*route, body, dict(request.url.params)))
        if route == ("GET", "/host"):
            return httpx.Response(200, json=HOST)
        if route == ("GET", "/events"):
            return httpx.Response(200, json=[])
        if route == ("POST", "/ha/heartbeat"):
            fenced = body is not None and body["timeout_s"] > 60
            return httpx.Response(200, json={"host_id": "b7c1", "fenced": fenced})
        if route == ("GET", "/ha/heartbeats"):
            if request.url.params["datastore"] != "nfs":
                message = f"datastore {request.url.params['datastore']!r} does not exist"
                return httpx.Response(404, json={"error": "not_found", "message": message})
            return httpx.Response(200, json=BEATS)
        if route == ("POST", "/ha/recover"):
            return httpx.Response(200, json=RECOVERED)
        if route == ("GET", "/datastores"):
            return httpx.Response(200, json=[{"name": "nfs", "path": "/mnt/nfs"}])
        return httpx.Response(404, json={"error": "not_found", "message": f"no route {route}"})


def test_ha_calls_are_the_agents_ha_routes() -> None:
    agent = HaAgent()
    provider = on_agent("http://agent-b.example:8443", agent)

    async def go() -> None:
        assert (await provider.connect()).host_id == "b7c1"
        assert await provider.ha_heartbeat(15.0) is False
        assert await provider.ha_heartbeat(90.0) is True
        beats = await provider.datastore_heartbeats("nfs")
        assert [(b.host_id, b.seq, b.age_s) for b in beats] == [
            ("a3f0", 812, 0.4), ("b7c1", 640, 21.3)]  # fmt: skip
        with pytest.raises(NotFound, match="datastore 'local' does not exist"):
            await provider.datastore_heartbeats("local")
        vm = await provider.recover("app1", "nfs")
        assert (vm.id, vm.power_state, vm.datastores) == ("app1", PowerState.RUNNING, ("nfs",))

    asyncio.run(go())
    asked = [(method, path, body, params) for method, path, body, params in agent.asked]
    assert ("POST", "/ha/heartbeat", {"timeout_s": 15.0}, {}) in asked
    assert ("GET", "/ha/heartbeats", None, {"datastore": "nfs"}) in asked
    assert ("POST", "/ha/recover", {"vm": "app1", "datastore": "nfs", "start": True}, {}) in asked


def test_a_host_record_carries_the_agents_id() -> None:
    assert host_record(HOST).host_id == "b7c1"
    older = {k: v for k, v in HOST.items() if k != "host_id"}
    assert host_record(older).host_id is None


def test_a_host_record_carries_what_placement_weighs() -> None:
    busy = HOST | {"core_mhz": 2200, "cpu_load": 0.375,
                   "host_reservation": {"cpu_mhz": 400, "memory_mib": 1024}}  # fmt: skip
    record = host_record(busy)
    assert (record.core_mhz, record.cpu_load) == (2200, 0.375)
    assert (record.reserved_cpu_mhz, record.reserved_memory_mib) == (400, 1024)
    # An agent before these fields, or one that has not sampled its CPUs yet.
    older = host_record(HOST | {"cpu_load": None})
    assert (older.core_mhz, older.cpu_load, older.reserved_memory_mib) == (0, None, 0)


def _booting(name: str, kernel: str, initrd: str) -> dict[str, Any]:
    boot = {"kind": "kernel", "kernel": kernel, "initrd": initrd}
    return {"name": name, "datastore": "nfs", "state": "stopped", "spec": {"boot": boot}}


class BootFilesAgent(HaAgent):
    """An agent with a VM imported by a transfer (``imp``, booting from ``boot-files/``),
    a clone of it (``twin``: the same files) and an appliance VM (its own files)."""

    def __init__(self) -> None:
        super().__init__()
        files = "/mnt/nfs/boot-files/imp-1a2b"
        self.vms = {
            "imp": _booting("imp", f"{files}/vmlinuz", f"{files}/initrd.img"),
            "twin": _booting("twin", f"{files}/vmlinuz", f"{files}/initrd.img"),
            "app": _booting("app", "vmlinuz", "initrd.img"),
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1")
        self.asked.append((request.method, path, None, {}))
        name = path.removeprefix("/vms/")
        if request.method == "GET" and path == "/vms":
            return httpx.Response(200, json=list(self.vms.values()))
        if request.method == "GET" and name in self.vms:
            return httpx.Response(200, json=self.vms[name])
        if request.method == "DELETE" and name in self.vms:
            del self.vms[name]
            return httpx.Response(204)
        if request.method == "DELETE" and path.startswith("/datastores/nfs/files/"):
            return httpx.Response(204)
        return super().__call__(request)


def test_deleting_an_imported_vm_removes_the_boot_files_no_other_vm_uses() -> None:
    agent = BootFilesAgent()
    provider = on_agent("http://agent-b.example:8443", agent)

    def deleted_files() -> list[str]:
        prefix = "/datastores/nfs/files/"
        return [p.removeprefix(prefix) for m, p, _, _ in agent.asked
                if m == "DELETE" and p.startswith(prefix)]  # fmt: skip

    asyncio.run(provider.delete("app"))  # its own files went with its directory
    assert deleted_files() == []
    # Nothing imported: neither the other VMs nor the datastores were asked about.
    assert [(m, p) for m, p, _, _ in agent.asked if m == "GET"] == [("GET", "/vms/app")]
    asyncio.run(provider.delete("imp"))  # its clone still boots from them
    assert deleted_files() == []
    asyncio.run(provider.delete("twin"))
    folder = "boot-files/imp-1a2b"
    assert deleted_files() == [
        f"{folder}/vmlinuz", f"{folder}/initrd.img", folder, "boot-files"]  # fmt: skip
