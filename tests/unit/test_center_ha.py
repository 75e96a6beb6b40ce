"""High availability in the center, with the fake provider's hosts, on SQLite and on
PostgreSQL: a failed host's VMs are restarted on the cluster's other hosts in priority
order where placement puts them, once; an isolated host's are left alone; the settings
go through the REST API and the CLI. The monitor and the fake hosts share a clock that
the tests move on by hand, so that a 15 s timeout passes at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from alembic import command
from argon2 import PasswordHasher
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from thinvisor.auth import Role, UserStore
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api import ha as ha_api
from thinvisor.center.api.app import create_center_app
from thinvisor.center.config import (
    CenterApiConfig,
    CenterConfig,
    DatabaseConfig,
    HaConfig,
    SyncConfig,
)
from thinvisor.center.db import alembic_config, open_database
from thinvisor.center.ha import HostHaState, protected
from thinvisor.center.inventory import HostRow, Inventory, VmRow
from thinvisor.center.models import HaPriority, NodeKind
from thinvisor.center.rules import Rules
from thinvisor.center.secrets import SecretBox
from thinvisor.cli import center_ha
from thinvisor.cli.remote import Login, save_login
from thinvisor.errors import InvalidArgument, NotFound
from thinvisor.host.events import Event
from thinvisor.providers.base import DatastoreRecord, HostRecord, InventorySnapshot, VmRecord
from thinvisor.providers.base import PowerState as S
from thinvisor.providers.fake import FakeHost, fake_host, remove_fake_host

WAIT_S = 15.0
TIMEOUT_S = 15.0  # the clusters' default
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "password123"


class Clock:
    """A monotonic clock that only the test moves on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def center_config(tmp_path: Path, database_url: str | None = None) -> CenterConfig:
    return CenterConfig(
        state_dir=tmp_path / "state",
        api=CenterApiConfig(tls=False),
        database=DatabaseConfig(url=database_url),
        sync=SyncConfig(ping_interval_s=0.1, ping_timeout_s=0.5, reconnect_max_s=0.5),
        ha=HaConfig(check_interval_s=0.05),
    )


# --- a running center with a cluster of fake hosts --------------------------------------


@dataclass
class Site:
    """A running center with /dc1/c1, a cluster with HA on, and fake hosts added to it."""

    agent: CenterAgent
    clock: Clock
    cluster_id: int
    fakes: dict[str, FakeHost] = field(default_factory=dict)
    hosts: dict[str, HostRow] = field(default_factory=dict)

    @property
    def inventory(self) -> Inventory:
        return self.agent.inventory

    async def add(self, name: str, **vms: tuple[S, int]) -> FakeHost:
        """A fake host of 8 CPUs and 8 GiB in the cluster, with ``vms`` (name: state and
        memory), all on the datastore every fake host shares."""
        fake = fake_host(f"fake://{name}-{uuid.uuid4().hex[:8]}", name=name, memory_mib=8192)
        fake.clock = self.clock
        self.fakes[name] = fake
        for vm, (state, memory) in vms.items():
            fake.add_vm(vm, power_state=state, memory_mib=memory)
        self.hosts[name] = await self.agent.service.add_host(
            parent_id=self.cluster_id,
            provider="fake",
            address=fake.address,
            username="admin",
            password="secret",
        )
        return fake

    def vm(self, name: str) -> VmRow:
        found = self.inventory.find_vms(name)
        assert len(found) == 1, found
        return found[0]

    def where(self, name: str) -> str:
        """The fake host that holds the VM ``name`` now."""
        [holder] = [h for h, f in self.fakes.items() if name in {v.name for v in f.vms.values()}]
        return holder

    def events(self, kind: str) -> list[Event]:
        return self.agent.events.list(kind_prefix=kind, limit=1000)

    def state(self, host: str) -> HostHaState | None:
        status = self.agent.ha.host_status(self.hosts[host].id)
        return None if status is None else status.state

    async def until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            assert time.monotonic() < deadline, f"waited in vain for {what}"
            await asyncio.sleep(0.02)

    async def all_heard(self) -> None:
        await self.until(
            lambda: all(self.state(h) == HostHaState.HEARD for h in self.hosts), "every host heard"
        )

    async def silent(self, host: str) -> None:
        """Wait until the monitor no longer hears ``host``."""
        await self.until(lambda: self.state(host) != HostHaState.HEARD, f"{host} unheard")

    async def quiet(self) -> None:
        """Every host back and connected: no sync is then trying again (reading the
        database in a worker thread) when the center stops."""
        for fake in self.fakes.values():
            fake.restore()
        syncs = self.agent.service.syncs
        for host in self.hosts.values():
            await syncs.get(host.id).wait_connected(WAIT_S)

    async def rounds(self, count: int = 5) -> None:
        """Let the monitor go round a few times."""
        await asyncio.sleep(count * self.agent.config.ha.check_interval_s + 0.1)


@contextlib.asynccontextmanager
async def running_site(tmp_path: Path, database_url: str) -> AsyncIterator[Site]:
    agent = CenterAgent(center_config(tmp_path, database_url))
    clock = Clock()
    agent.ha.clock = clock
    dc = agent.inventory.create_datacenter("dc1")
    cluster = agent.inventory.create_cluster(dc.id, "c1")
    agent.inventory.set_cluster_ha(cluster.id, True)
    await agent.start()
    site = Site(agent, clock, cluster.id)
    try:
        yield site
        await site.quiet()
    finally:
        await agent.stop()
        agent.events.close()
        for fake in site.fakes.values():
            remove_fake_host(fake.address)


Scenario = Callable[[Site], Awaitable[None]]


@pytest.fixture
def run(tmp_path: Path, database_url: str) -> Callable[[Scenario], None]:
    """Runs a scenario on a site of its own."""

    def go(scenario: Scenario) -> None:
        async def main() -> None:
            async with running_site(tmp_path, database_url) as site:
                await scenario(site)

        asyncio.run(main())

    return go


async def three_hosts(site: Site) -> None:
    """host1 (a 2 GiB VM running), host2 (web, 256 MiB, running), host3 with four
    running VMs of 1 GiB (one of each priority) and a stopped one."""
    await site.add("host1", big=(S.RUNNING, 2048))
    await site.add("host2", web=(S.RUNNING, 256))
    await site.add(
        "host3",
        v_high=(S.RUNNING, 1024),
        v_med=(S.RUNNING, 1024),
        v_low=(S.RUNNING, 1024),
        v_off=(S.RUNNING, 1024),
        v_stopped=(S.STOPPED, 1024),
    )
    inv = site.inventory
    for name, priority in (("v_high", "high"), ("v_low", "low"), ("v_off", "disabled")):
        inv.set_vm_ha_priority(site.vm(name).id, priority)
    await site.all_heard()


# --- a host that fails ----------------------------------------------------------------------


def test_a_failed_hosts_vms_restart_by_priority_where_placement_puts_them(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(site: Site) -> None:
        await three_hosts(site)
        # v_med may not share a host with web: it goes to host1, whatever the loads.
        apart = [site.vm("v_med").id, site.vm("web").id]
        Rules(site.agent.database).create(site.cluster_id, "apart", "anti-affinity", apart)
        before = {name: site.vm(name).id for name in ("v_high", "v_med", "v_low")}
        assert all(f.center_timeout_s == TIMEOUT_S for f in site.fakes.values())
        site.fakes["host3"].crash()
        await site.silent("host3")
        await site.rounds()
        assert site.events("ha.") == []  # silent for less than the timeout: nothing yet
        site.clock.advance(TIMEOUT_S + 1)
        await site.until(lambda: len(site.events("ha.vm_restarted")) == 3, "three restarts")
        # High first, onto the emptier host2; medium kept off web's host by the rule; low
        # onto host2 again, which has more memory free once the first two are counted.
        restarted = [e.message for e in site.events("ha.vm_restarted")]
        assert restarted == [
            "v_high restarted on host2 after host3 failed",
            "v_med restarted on host1 after host3 failed",
            "v_low restarted on host2 after host3 failed",
        ]
        assert [site.where(v) for v in ("v_high", "v_med", "v_low")] == ["host2", "host1", "host2"]
        for name, vm_id in before.items():  # each keeps its object, and runs
            row = site.vm(name)
            assert (row.id, row.power_state, row.host_name) == (vm_id, S.RUNNING, site.where(name))
        # Disabled, and stopped: left where they were.
        assert (site.where("v_off"), site.where("v_stopped")) == ("host3", "host3")
        assert site.vm("v_off").host_name == "host3"
        [failed] = site.events("ha.host_failed")
        assert failed.message == (
            "host3 failed: not heard for 16 s and its datastore heartbeat is 16 s old: "
            "restarting 3 of its VMs elsewhere"
        )
        assert failed.data["vms"] == ["v_high", "v_med", "v_low"]
        assert site.state("host3") == HostHaState.FAILED
        assert site.events("ha.host_isolated") == []
        assert [r.vm for r in site.agent.ha.restarts(site.cluster_id)] == [
            "v_high",
            "v_med",
            "v_low",
        ]

    run(scenario)


def test_a_vm_is_restarted_once_for_one_failure(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        await three_hosts(site)
        site.fakes["host3"].crash()
        await site.silent("host3")
        site.clock.advance(TIMEOUT_S + 1)
        await site.until(lambda: len(site.events("ha.vm_restarted")) == 3, "three restarts")
        where = {v: site.where(v) for v in ("v_high", "v_med", "v_low")}
        for _ in range(3):  # rounds after rounds, the clock going on
            site.clock.advance(TIMEOUT_S)
            await site.rounds()
        assert len(site.events("ha.vm_restarted")) == 3
        assert len(site.events("ha.host_failed")) == 1
        assert {v: site.where(v) for v in where} == where
        # Back: its state starts afresh, and it no longer holds the VMs taken from it.
        site.fakes["host3"].restore()
        await site.all_heard()
        await site.agent.service.syncs.get(site.hosts["host3"].id).refresh()
        assert {v.name for v in site.inventory.vms(site.hosts["host3"].id)} == {
            "v_off", "v_stopped"}  # fmt: skip
        assert len(site.inventory.find_vms("v_high")) == 1
        # A second failure is a new one: said again (nothing left to restart).
        site.fakes["host3"].crash()
        await site.silent("host3")
        site.clock.advance(TIMEOUT_S + 1)
        await site.until(lambda: len(site.events("ha.host_failed")) == 2, "a second failure")
        assert site.events("ha.host_failed")[-1].message.endswith(": no VM to restart")
        assert len(site.events("ha.vm_restarted")) == 3

    run(scenario)


def test_an_isolated_host_keeps_its_vms_until_it_stops_writing(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(site: Site) -> None:
        await three_hosts(site)
        site.fakes["host3"].isolate()  # no answer to the center; its heartbeat goes on
        await site.silent("host3")
        site.clock.advance(TIMEOUT_S + 1)
        await site.until(lambda: site.state("host3") == HostHaState.ISOLATED, "isolated")
        for _ in range(3):
            site.clock.advance(TIMEOUT_S)
            await site.rounds()
        [isolated] = site.events("ha.host_isolated")  # said once
        assert isolated.message == (
            "host3 does not answer the center but still writes its datastore heartbeat: "
            "its VMs are left running there"
        )
        assert site.events("ha.vm_restarted") == site.events("ha.host_failed") == []
        assert {site.where(v) for v in ("v_high", "v_med", "v_low")} == {"host3"}
        assert site.fakes["host3"].vm_named("v_high").power_state == S.RUNNING
        # Then it dies: once its heartbeat is older than the timeout, it has failed.
        site.fakes["host3"].crash()
        site.clock.advance(TIMEOUT_S / 2)
        await site.rounds()
        assert site.events("ha.host_failed") == []  # stopped writing lately: not yet
        site.clock.advance(TIMEOUT_S / 2 + 1)
        await site.until(lambda: len(site.events("ha.vm_restarted")) == 3, "three restarts")

    run(scenario)


def test_restarts_that_fail_are_said_once_and_tried_again(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(site: Site) -> None:
        await site.add("host1")
        host2 = await site.add("host2", small=(S.RUNNING, 512), huge=(S.RUNNING, 6144))
        host2.datastores.append(DatastoreRecord("local2", "local2", 1 << 40, 1 << 39))
        host2.add_vm("local", power_state=S.RUNNING, datastores=("local2",))
        await site.agent.service.syncs.get(site.hosts["host2"].id).refresh()
        site.fakes["host1"].add_vm("hog", power_state=S.RUNNING, memory_mib=4096)
        await site.all_heard()
        host2.crash()
        await site.silent("host2")
        site.clock.advance(TIMEOUT_S + 1)
        await site.until(lambda: site.events("ha.restart_failed") != [], "a failed restart")
        for _ in range(3):
            await site.rounds()
        [refused] = site.events("ha.restart_failed")  # said once, though tried each round
        assert refused.message.startswith(
            "huge could not be restarted after host2 failed: no host can take vm 'huge': "
            "host1: 4096 MiB free, the VM needs 6144 MiB"
        )
        assert [e.message for e in site.events("ha.vm_restarted")] == [
            "small restarted on host1 after host2 failed"
        ]
        # 'local' lies on a datastore no other host has: not even tried.
        assert [e.data["vms"] for e in site.events("ha.host_failed")] == [["huge", "small"]]
        site.fakes["host1"].remove_vm(site.fakes["host1"].vm_named("hog").id)
        await site.agent.service.syncs.get(site.hosts["host1"].id).refresh()
        await site.until(lambda: len(site.events("ha.vm_restarted")) == 2, "huge restarted")
        assert site.where("huge") == "host1" and site.where("local") == "host2"

    run(scenario)


def test_only_running_protected_vms_are_restarted() -> None:
    def row(name: str, state: S, priority: HaPriority, last: S | None = None) -> VmRow:
        return VmRow(
            id=len(name), kind=NodeKind.VM, name=name, parent_id=1, path=f"/h/{name}",
            host_id=1, host_name="h", ext_id=name, power_state=state, last_power_state=last,
            cpus=1, memory_mib=64, template=False, uuid=None, datastores=("ds",), networks=(),
            ha_priority=priority,
        )  # fmt: skip

    vms = [
        row("b-low", S.RUNNING, HaPriority.LOW),
        row("a-low", S.UNKNOWN, HaPriority.LOW, last=S.RUNNING),
        row("med", S.UNKNOWN, HaPriority.MEDIUM, last=S.STOPPED),
        row("paused", S.PAUSED, HaPriority.HIGH),
        row("high", S.UNKNOWN, HaPriority.HIGH, last=S.RUNNING),
        row("off", S.RUNNING, HaPriority.DISABLED),
    ]
    assert [vm.name for vm in protected(vms)] == ["high", "a-low", "b-low"]


# --- the settings in the inventory --------------------------------------------------------


@pytest.fixture
def inv(database_url: str, tmp_path: Path) -> Iterator[Inventory]:
    db = open_database(database_url)
    yield Inventory(db, SecretBox(tmp_path / "secret.key"))
    db.close()


def test_settings_and_their_defaults(inv: Inventory) -> None:
    dc = inv.create_datacenter("dc1")
    cluster = inv.create_cluster(dc.id, "c1")
    settings = inv.cluster_ha(cluster.id)
    assert (settings.path, settings.enabled, settings.timeout_s) == ("/dc1/c1", False, 15.0)
    assert inv.set_cluster_ha(cluster.id, True, 30).timeout_s == 30.0
    assert inv.set_cluster_ha(cluster.id, False).timeout_s == 30.0  # kept
    assert [c.enabled for c in inv.ha_clusters()] == [False]
    assert inv.ha_clusters(enabled=True) == []
    for bad in (4.9, 3601, True, "15"):
        with pytest.raises(InvalidArgument, match="timeout_s: must be from 5 to 3600 seconds"):
            inv.set_cluster_ha(cluster.id, True, bad)  # type: ignore[arg-type]
    with pytest.raises(NotFound, match=f"no cluster with id {dc.id}"):
        inv.set_cluster_ha(dc.id, True)
    host = inv.add_host(cluster.id, "h1", "fake", "fake://h1")
    record = HostRecord("h1", "fake", "1", 1, 1024, host_id="agent-1")
    vm = VmRecord("vm-1", "vm1", S.RUNNING, 1, 64)
    inv.apply_snapshot(host.id, InventorySnapshot(record, (vm,)))
    assert inv.host(host.id).agent_id == "agent-1"
    inv.set_host_connected(host.id, HostRecord("h1", "fake", "1", 1, 1024))
    assert inv.host(host.id).agent_id == "agent-1"  # a record without one keeps it
    row = inv.find_vms("vm1")[0]
    assert row.ha_priority == HaPriority.MEDIUM
    assert inv.set_vm_ha_priority(row.id, "high").ha_priority == HaPriority.HIGH
    inv.apply_snapshot(host.id, InventorySnapshot(record, (vm,)))  # a sync keeps it
    assert inv.vm(row.id).ha_priority == HaPriority.HIGH
    with pytest.raises(InvalidArgument, match="priority: 'urgent' is not one of high, medium"):
        inv.set_vm_ha_priority(row.id, "urgent")


def test_the_migration_gives_existing_clusters_and_vms_their_defaults(
    database_url: str, tmp_path: Path
) -> None:
    command.upgrade(alembic_config(database_url), "0002")
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO nodes (id, kind, name, parent_id, created) VALUES "
                "(1, 'datacenter', 'dc1', NULL, CURRENT_TIMESTAMP), "
                "(2, 'cluster', 'c1', 1, CURRENT_TIMESTAMP), "
                "(3, 'host', 'h1', 2, CURRENT_TIMESTAMP), "
                "(4, 'vm', 'vm1', 3, CURRENT_TIMESTAMP)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO hosts (node_id, provider, address, state, maintenance) "
                "VALUES (3, 'fake', 'fake://h1', 'connected', false)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO vms (node_id, host_id, ext_id, power_state, cpus, memory_mib, "
                "template, datastores, networks) "
                "VALUES (4, 3, 'vm-1', 'running', 1, 64, false, '[]', '[]')"
            )
        )
    engine.dispose()
    db = open_database(database_url)  # migrates to the newest
    try:
        inv = Inventory(db, SecretBox(tmp_path / "secret.key"))
        assert inv.cluster_ha(2).timeout_s == 15.0 and not inv.cluster_ha(2).enabled
        assert inv.vm(4).ha_priority == HaPriority.MEDIUM
        assert inv.host(3).agent_id is None
        # Revision 0004: placement's inputs, none known yet.
        assert (inv.host(3).core_mhz, inv.host(3).cpu_load, inv.vm(4).reserved_cpu_mhz) == (
            0, None, 0)  # fmt: skip
        inv.set_cluster_ha(2, True)
    finally:
        db.close()
    command.downgrade(alembic_config(database_url), "0002")
    command.upgrade(alembic_config(database_url), "head")


# --- the REST API -------------------------------------------------------------------------


@dataclass
class Center:
    agent: CenterAgent
    client: httpx.AsyncClient
    ids: dict[str, int]

    async def call(
        self, method: str, path: str, *, status: int, user: str = "admin", **kw: Any
    ) -> Any:
        response = await self.client.request(method, path, auth=(user, PASSWORD), **kw)
        assert response.status_code == status, response.text
        return response.json() if response.content else None


def _build(agent: CenterAgent) -> dict[str, int]:
    """/dc1/c1 with h1 (vm1); /dc1/c2 with h2 (vm2); /dc1/h3 (vm3) in no cluster."""
    inv = agent.inventory
    dc = inv.create_datacenter("dc1")
    ids = {"dc1": dc.id}
    for cluster, host, vm in (("c1", "h1", "vm1"), ("c2", "h2", "vm2"), (None, "h3", "vm3")):
        parent = dc.id if cluster is None else inv.create_cluster(dc.id, cluster).id
        if cluster is not None:
            ids[cluster] = parent
        ids[host] = inv.add_host(parent, host, "fake", f"fake://{host}").id
        record = HostRecord(host, "fake", "1.0", cpus=4, memory_mib=8192)
        vms = (VmRecord(vm, vm, S.RUNNING, 1, 256),)
        inv.apply_snapshot(ids[host], InventorySnapshot(host=record, vms=vms))
    ids |= {vm.name: vm.id for vm in inv.vms()}
    agent.permissions.grant(ids["c2"], "bob", Role.ADMIN)
    return ids


def _users(agent: CenterAgent, tmp_path: Path) -> None:
    agent.users = agent.gate.users = UserStore(tmp_path / "state" / "users.json", hasher=FAST)
    agent.users.add_user("admin", PASSWORD, Role.ADMIN)
    agent.users.add_user("alice", PASSWORD, Role.READ_ONLY)
    agent.users.add_user("bob", PASSWORD, Role.NO_ACCESS)


@contextlib.asynccontextmanager
async def api_center(tmp_path: Path, database_url: str) -> AsyncIterator[Center]:
    agent = CenterAgent(center_config(tmp_path, database_url))
    _users(agent, tmp_path)
    ids = _build(agent)
    app = create_center_app(agent, start_agent=False)
    app.include_router(ha_api.router, prefix="/api/v1")
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://center/api/v1") as c:
            yield Center(agent, c, ids)
    finally:
        agent.events.close()
        agent.database.close()


def api_run(
    tmp_path: Path, database_url: str, scenario: Callable[[Center], Awaitable[None]]
) -> None:
    async def go() -> None:
        async with api_center(tmp_path, database_url) as center:
            await scenario(center)

    asyncio.run(go())


def test_settings_through_the_api(tmp_path: Path, database_url: str) -> None:
    async def scenario(center: Center) -> None:
        c1, vm1 = center.ids["c1"], center.ids["vm1"]
        off = {"cluster_id": c1, "cluster": "/dc1/c1", "enabled": False, "timeout_s": 15.0}
        assert await center.call("GET", f"/clusters/{c1}/ha", status=200) == off
        vm = await center.call("GET", f"/vms/{vm1}/ha", status=200)
        assert vm == {"vm_id": vm1, "vm": "/dc1/c1/h1/vm1", "priority": "medium",
                      "cluster_id": c1, "cluster": "/dc1/c1", "protected": False}  # fmt: skip
        on = await center.call("PUT", f"/clusters/{c1}/ha", json={"enabled": True}, status=200)
        assert on == {**off, "enabled": True}
        assert (await center.call("GET", f"/vms/{vm1}/ha", status=200))["protected"]
        longer = {"enabled": True, "timeout_s": 30}
        changed = await center.call("PUT", f"/clusters/{c1}/ha", json=longer, status=200)
        assert changed["timeout_s"] == 30.0
        high = await center.call("PUT", f"/vms/{vm1}/ha", json={"priority": "high"}, status=200)
        assert (high["priority"], high["protected"]) == ("high", True)
        never = {"priority": "disabled"}
        assert not (await center.call("PUT", f"/vms/{vm1}/ha", json=never, status=200))["protected"]
        alone = await center.call("GET", f"/vms/{center.ids['vm3']}/ha", status=200)
        assert (alone["cluster"], alone["protected"]) == (None, False)
        said = [e["message"] for e in await center.call("GET", "/events", status=200)]
        assert "HA on for cluster /dc1/c1 (timeout 30 s)" in said
        assert "vm /dc1/c1/h1/vm1: HA priority disabled" in said

    api_run(tmp_path, database_url, scenario)


def test_bad_settings_name_the_field(tmp_path: Path, database_url: str) -> None:
    async def scenario(center: Center) -> None:
        c1, vm1 = center.ids["c1"], center.ids["vm1"]
        cases = [
            ({"enabled": True, "timeout_s": 1}, "timeout_s: must be from 5 to 3600 seconds, not 1"),
            ({"enabled": True, "timeout_s": 7200}, "timeout_s: must be from 5 to 3600 seconds"),
            ({"timeout_s": 20}, "enabled: Field required"),
            ({"enabled": True, "extra": 1}, "extra: unknown field"),
        ]
        for body, message in cases:
            answer = await center.call("PUT", f"/clusters/{c1}/ha", json=body, status=400)
            assert answer["message"].startswith(message), answer
        answer = await center.call("PUT", f"/vms/{vm1}/ha", json={"priority": "urgent"}, status=400)
        assert answer["message"].startswith("priority: Input should be 'high', 'medium', 'low'")
        host = center.ids["h1"]
        answer = await center.call("GET", f"/clusters/{host}/ha", status=404)
        assert answer["message"] == f"no cluster with id {host}"
        await center.call("GET", "/vms/999999/ha", status=404)
        assert not (await center.call("GET", f"/clusters/{c1}/ha", status=200))["enabled"]

    api_run(tmp_path, database_url, scenario)


def test_settings_need_configure_and_are_hidden_from_who_sees_nothing(
    tmp_path: Path, database_url: str
) -> None:
    async def scenario(center: Center) -> None:
        c1, c2 = center.ids["c1"], center.ids["c2"]
        on = {"enabled": True}
        await center.call("GET", f"/clusters/{c1}/ha", status=200, user="alice")
        refused = await center.call("PUT", f"/clusters/{c1}/ha", json=on, status=403, user="alice")
        assert refused["message"].startswith("user 'alice' may not configure /dc1/c1")
        body = {"priority": "low"}
        await center.call(
            "PUT", f"/vms/{center.ids['vm1']}/ha", json=body, status=403, user="alice"
        )
        hidden = await center.call("GET", f"/clusters/{c1}/ha", status=404, user="bob")
        assert hidden["message"] == f"no cluster with id {c1}"
        await center.call("PUT", f"/clusters/{c2}/ha", json=on, status=200, user="bob")
        await center.call("PUT", f"/vms/{center.ids['vm2']}/ha", json=body, status=200, user="bob")
        status = await center.call("GET", "/ha", status=200, user="bob")
        assert [(c["cluster"], c["enabled"]) for c in status] == [("/dc1/c2", True)]
        assert [h["name"] for h in status[0]["hosts"]] == ["h2"]

    api_run(tmp_path, database_url, scenario)


def test_status_lists_every_cluster_and_its_hosts(tmp_path: Path, database_url: str) -> None:
    async def scenario(center: Center) -> None:
        c1 = center.ids["c1"]
        await center.call("PUT", f"/clusters/{c1}/ha", json={"enabled": True}, status=200)
        status = await center.call("GET", "/ha", status=200)
        assert [(c["cluster"], c["enabled"]) for c in status] == [
            ("/dc1/c1", True), ("/dc1/c2", False)]  # fmt: skip
        [h1] = status[0]["hosts"]
        # Not watched yet (the monitor is not running here): as its sync has it.
        assert (h1["name"], h1["state"], h1["connected"], h1["heard"]) == (
            "h1", "connected", True, False)  # fmt: skip
        assert status[1]["hosts"][0]["state"] == "off"
        only = await center.call("GET", "/ha", params={"cluster": c1}, status=200)
        assert [c["cluster"] for c in only] == ["/dc1/c1"]

    api_run(tmp_path, database_url, scenario)


# --- the CLI, against a center served in a thread -------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThreadCenter:
    """A running center (HA monitor included, on ``clock``) served by uvicorn in a
    thread of this process, with the HA routes."""

    def __init__(self, tmp_path: Path, clock: Clock) -> None:
        self.agent = CenterAgent(center_config(tmp_path))
        self.agent.ha.clock = clock
        _users(self.agent, tmp_path)
        app = create_center_app(self.agent)
        app.include_router(ha_api.router, prefix="/api/v1")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, name="center", daemon=True)

    def __enter__(self) -> ThreadCenter:
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            assert time.monotonic() < deadline, "the center did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.agent.events.close()

    def env(self, tmp_path: Path) -> dict[str, str]:
        _, token = self.agent.users.create_token("admin", "test")
        xdg = tmp_path / "xdg"
        save_login(
            Login(url=self.url, token=token, user="admin"), xdg / "thinvisor" / "center-login.json"
        )
        return {"XDG_CONFIG_HOME": str(xdg), "THINVISOR_CENTER_CONFIG": str(tmp_path / "none")}


def ha(env: dict[str, str], *args: str, code: int = 0) -> str:
    """``thinvisor center ha *args``: its stdout, or its stderr when ``code`` is not 0."""
    result = CliRunner().invoke(center_ha.app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.stderr if code else result.stdout


def wait_for(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"waited in vain for {what}"
        time.sleep(0.02)


def test_the_cli_turns_ha_on_and_shows_a_failure(tmp_path: Path) -> None:
    clock = Clock()
    tag = uuid.uuid4().hex[:6]
    fakes = [fake_host(f"fake://{name}-{tag}", name=name) for name in ("hosta", "hostb")]
    for fake in fakes:
        fake.clock = clock
    fakes[1].add_vm("web", power_state=S.RUNNING)
    try:
        with ThreadCenter(tmp_path, clock) as center:
            env = center.env(tmp_path)
            inv = center.agent.inventory
            cluster = inv.create_cluster(inv.create_datacenter("dc1").id, "c1")
            api = center.url + "/api/v1"
            with httpx.Client(base_url=api, auth=("admin", PASSWORD), trust_env=False) as client:
                for fake in fakes:
                    body = {"parent": cluster.id, "provider": "fake", "address": fake.address,
                            "username": "admin", "password": "secret"}  # fmt: skip
                    assert client.post("/hosts", json=body).status_code == 201
            assert (
                ha(env, "cluster", "/dc1/c1", "on") == "HA on for cluster /dc1/c1 (timeout 15 s)\n"
            )
            assert ha(env, "cluster", str(cluster.id), "on", "--timeout", "20") == (
                "HA on for cluster /dc1/c1 (timeout 20 s)\n"
            )
            assert ha(env, "cluster", "/dc1", "on", code=1) == (
                "error: cluster: datacenter /dc1 is not a cluster\n"
            )
            assert ha(env, "cluster", "/dc1/c1", "on", "--timeout", "2", code=1) == (
                "error: timeout_s: must be from 5 to 3600 seconds, not 2.0\n"
            )
            assert ha(env, "vm", "web") == "vm /dc1/c1/hostb/web: HA priority medium\n"
            assert ha(env, "vm", "web", "--priority", "high") == (
                "vm /dc1/c1/hostb/web: HA priority high\n"
            )
            settings = json.loads(ha(env, "vm", "/dc1/c1/hostb/web", "--json"))
            assert (settings["priority"], settings["protected"]) == ("high", True)
            wait_for(lambda: _states(center, env) == ["heard", "heard"], "both hosts heard")
            assert lines(ha(env, "status"))[:4] == [
                "HA on for cluster /dc1/c1 (timeout 20 s)",
                "HOST   STATE  CONNECTED  HEARD  SILENT  ERROR",
                "hosta  heard  yes        yes",
                "hostb  heard  yes        yes",
            ]
            fakes[1].crash()
            wait_for(lambda: _states(center, env)[1] != "heard", "hostb unheard")
            clock.advance(21)
            wait_for(lambda: "web" in {v.name for v in fakes[0].vms.values()}, "web on hosta")
            wait_for(lambda: _states(center, env)[1] == "failed", "hostb failed")
            shown = lines(ha(env, "status"))
            assert shown[0] == "HA on for cluster /dc1/c1 (timeout 20 s)"
            assert shown[2].split()[:4] == ["hosta", "heard", "yes", "yes"]
            assert shown[3].split()[:4] == ["hostb", "failed", "no", "no"]
            at = shown.index("restarted:")  # after hostb's error, however it wraps
            assert shown[at + 1].split() == ["VM", "FROM", "TO", "PRIORITY", "TIME"]
            assert shown[at + 2].split()[:4] == ["web", "hostb", "hosta", "high"]
            assert ha(env, "vm", "web") == "vm /dc1/c1/hosta/web: HA priority high\n"
            assert ha(env, "cluster", "c1", "off", code=1).startswith("error: no host or VM named")
            assert ha(env, "cluster", "/dc1/c1", "off") == "HA off for cluster /dc1/c1\n"
            assert ha(env, "vm", "web") == (
                "vm /dc1/c1/hosta/web: HA priority high "
                "(not protected: cluster /dc1/c1 has HA off)\n"
            )
    finally:
        for fake in fakes:
            remove_fake_host(fake.address)


def lines(out: str) -> list[str]:
    """The lines of a command's output, without the spaces a table pads them with."""
    return [line.strip() for line in out.splitlines()]


def _states(center: ThreadCenter, env: dict[str, str]) -> list[str]:
    status = json.loads(ha(env, "status", "--json"))
    return [h["state"] for h in status[0]["hosts"]]
