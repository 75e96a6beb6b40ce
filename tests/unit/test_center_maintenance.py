"""Maintenance mode through the center, on hosts of the fake provider, on SQLite and on
PostgreSQL: entering moves a host's running VMs to the other hosts of its cluster (spread,
two at a time) and leaves its stopped VMs; VMs that cannot move are named at once, or
waited for; nothing is placed on a host in maintenance mode. Then the same through the
REST API and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from thinvisor.auth import Role, UserStore
from thinvisor.center import service as service_module
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api.app import create_center_app
from thinvisor.errors import Busy, InsufficientResources, ProviderError, ThinvisorError
from thinvisor.host.tasks import Task
from thinvisor.providers import KINDS
from thinvisor.providers.base import CreateVm, MigrationOptions, PowerState
from thinvisor.providers.fake import FakeHost, fake_host, remove_fake_host

from .clienv import tv
from .test_center_migration import Site, center_config
from .test_cli_center import ThreadCenter

S = PowerState
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "password123"
ADMIN = ("admin", PASSWORD)
ALICE = ("alice", PASSWORD)  # read-only

Scenario = Callable[[Site], Coroutine[Any, Any, None]]


@contextlib.asynccontextmanager
async def running_lab(tmp_path: Path, database_url: str) -> AsyncIterator[Site]:
    """A running center with /dc1 and the empty cluster /dc1/c1; users admin and alice."""
    agent = CenterAgent(center_config(tmp_path, database_url))
    agent.users = agent.gate.users = UserStore(tmp_path / "state" / "users.json", hasher=FAST)
    agent.users.add_user("admin", PASSWORD, Role.ADMIN)
    agent.users.add_user("alice", PASSWORD, Role.READ_ONLY)
    await agent.start()
    site = Site(agent, {}, {})
    try:
        dc = agent.inventory.create_datacenter("dc1")
        agent.inventory.create_cluster(dc.id, "c1")
        yield site
        # The hosts' last changes applied before the database closes (a sync stopped
        # while it writes leaves its connection behind).
        with contextlib.suppress(ThinvisorError):
            await site.settled()
    finally:
        await agent.stop()
        agent.events.close()
        for fake in site.fakes.values():
            remove_fake_host(fake.address)


@pytest.fixture
def run(tmp_path: Path, database_url: str) -> Iterator[Callable[[Scenario], None]]:
    """Runs a scenario on a lab of its own."""

    def go(scenario: Scenario) -> None:
        async def main() -> None:
            async with running_lab(tmp_path, database_url) as site:
                await scenario(site)

        asyncio.run(main())

    yield go


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "EVACUATION_RETRY_S", 0.05)


VmSpec = S | tuple[S, int]


async def hosts(site: Site, *specs: tuple[str, int, dict[str, VmSpec]]) -> None:
    """Hosts in /dc1/c1: (name, memory in MiB, {VM: state, or (state, memory in MiB)}),
    VMs of 1 GiB unless said."""
    for name, memory, vms in specs:
        fake = await site.add(name, parent="/dc1/c1", memory_mib=memory)
        for vm, spec in vms.items():
            state, vm_memory = spec if isinstance(spec, tuple) else (spec, 1024)
            fake.add_vm(vm, power_state=state, memory_mib=vm_memory)
    await site.settled()


async def maintenance(site: Site, host: str, on: bool = True, *, wait: bool = False) -> Task:
    service = site.agent.service
    return await service.set_maintenance(site.hosts[host].id, on, wait=wait, user="ann")


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


def on(site: Site, host: str) -> set[str]:
    """The names of the VMs the fake host holds."""
    return {vm.name for vm in site.fakes[host].vms.values()}


R = S.RUNNING


def test_entering_spreads_the_running_vms_two_at_a_time_and_leaves_the_stopped_ones(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(site: Site) -> None:
        vms = {"a1": R, "a2": R, "a3": R, "a4": R, "idle": S.STOPPED}
        await hosts(site, ("m1", 8192, vms), ("m2", 8192, {}), ("m3", 8192, {}))
        site.fakes["m1"].add_vm("tpl", template=True)
        site.fakes["m1"].slow_migrations(0.3)
        await site.settled()
        task = await maintenance(site, "m1")
        assert (task.kind, task.object, task.user, task.cancellable) == (
            "host.maintenance", "/dc1/c1/m1", "ann", True)  # fmt: skip
        most = 0
        while not task.done:
            moving = [t for t in site.agent.tasks.list() if t.kind == "vm.migrate" and not t.done]
            most = max(most, len(moving))
            await asyncio.sleep(0.02)
        assert most == 2
        done = await site.finished(task)
        assert done.state == "success", done.error
        result = done.result
        assert (result["host"], result["maintenance"], result["stayed"]) == (
            "/dc1/c1/m1", True, ["/dc1/c1/m1/idle"])  # fmt: skip
        where = {m["vm"]: m["to"] for m in result["moved"]}
        assert sorted(where) == ["a1", "a2", "a3", "a4"]
        assert sorted(where.values()) == ["/dc1/c1/m2"] * 2 + ["/dc1/c1/m3"] * 2
        assert done.message == "m1 is in maintenance mode (4 VMs moved, 1 stay)"
        assert on(site, "m1") == {"idle", "tpl"} and site.fakes["m1"].maintenance
        assert on(site, "m2") | on(site, "m3") == {"a1", "a2", "a3", "a4"}
        assert site.inventory.host(site.hosts["m1"].id).maintenance
        migrations = [t for t in site.agent.tasks.list() if t.kind == "vm.migrate"]
        assert len(migrations) == 4 and {t.user for t in migrations} == {"ann"}
        assert {m["task"] for m in result["moved"]} == {t.id for t in migrations}
        found = site.agent.events.list(kind_prefix="host.maintenance", object="host/m1")
        [event] = [e for e in found if e.user == "ann"]
        assert (event.message, event.data["maintenance"]) == (
            "host m1 is in maintenance mode (4 VMs moved, 1 stay)", True)  # fmt: skip
        # Leaving.
        left = await site.finished(await maintenance(site, "m1", False))
        assert left.state == "success" and left.result["maintenance"] is False
        assert not site.fakes["m1"].maintenance
        assert not site.inventory.host(site.hosts["m1"].id).maintenance

    run(scenario)


def test_vms_that_cannot_move_are_named_at_once_and_nothing_moves(
    run: Callable[[Scenario], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(KINDS, "immobile", "tests.unit.test_center_migration")

    async def scenario(site: Site) -> None:
        m1: dict[str, VmSpec] = {"big": (R, 4096), "p1": R, "p2": R, "zz": S.PAUSED, "ok": R}
        await hosts(site, ("m1", 32768, m1), ("m2", 4096, {"p3": R}))
        cluster = site.inventory.resolve("/dc1/c1").id
        ids = [site.vm(name).id for name in ("p1", "p2", "p3")]
        site.agent.service.rules.create(cluster, "spread", "anti-affinity", ids)
        with pytest.raises(InsufficientResources) as caught:
            await maintenance(site, "m1")
        apart = "m2: holds another VM of anti-affinity rule 'spread'"
        assert str(caught.value) == (
            "cannot enter maintenance mode on /dc1/c1/m1: zz (paused: only a running VM moves "
            f"live), big (m2: 3072 MiB free, the VM needs 4096 MiB), p1 ({apart}), p2 ({apart})"
        )
        # A provider that cannot migrate, and a host in no cluster.
        immobile = await site.add("i1", "immobile", parent="/dc1/c1")
        immobile.add_vm("fixed", power_state=R)
        lone = await site.add("lone", parent="/dc1")
        lone.add_vm("alone", power_state=R)
        await site.settled()
        for host, why in (
            ("i1", "fixed (the immobile provider cannot migrate VMs)"),
            ("lone", "alone (its host is in no cluster)"),
        ):
            with pytest.raises(InsufficientResources) as caught:
                await maintenance(site, host)
            path = site.hosts[host].path
            assert str(caught.value) == f"cannot enter maintenance mode on {path}: {why}"
        assert site.agent.tasks.list() == []
        assert on(site, "m1") == {"big", "p1", "p2", "zz", "ok"} and on(site, "m2") == {"p3"}
        assert not any(fake.maintenance for fake in site.fakes.values())
        assert not any(host.maintenance for host in site.inventory.hosts())

    run(scenario)


def test_with_wait_the_task_waits_until_its_vms_can_move_or_are_stopped(
    run: Callable[[Scenario], None], quick_retries: None
) -> None:
    async def scenario(site: Site) -> None:
        await hosts(site, ("m1", 8192, {"small": R, "big": (R, 3072), "zz": S.PAUSED}),
                    ("m2", 4096, {"hog": (R, 2048)}))  # fmt: skip
        fake1 = site.fakes["m1"]
        task = await maintenance(site, "m1", wait=True)
        await until(lambda: (task.message or "").startswith("cannot move yet"), "waiting")
        assert task.message == (
            "cannot move yet, trying again in 0.05 s: zz (paused: only a running VM moves live),"
            " big (m2: 1024 MiB free, the VM needs 3072 MiB)"
        )
        assert on(site, "m2") == {"hog", "small"}
        # Meanwhile nothing goes to it, and it is not entered twice.
        service = site.agent.service
        with pytest.raises(InsufficientResources, match=r"^host /dc1/c1/m1 is entering maint"):
            await service.migrate_vm(site.vm("small").id, site.hosts["m1"].id, MigrationOptions())
        with pytest.raises(InsufficientResources, match=r"^host /dc1/c1/m1 is entering maint"):
            await service.create_vm(site.hosts["m1"].id, CreateVm("new"))
        with pytest.raises(Busy, match=r"^host /dc1/c1/m1 is already entering maintenance mode"):
            await maintenance(site, "m1")
        # Room is made for big, and zz is stopped: the host empties.
        site.fakes["m2"].set_power(site.fakes["m2"].vm_named("hog").id, S.STOPPED)
        fake1.set_power(fake1.vm_named("zz").id, S.STOPPED)
        done = await site.finished(task)
        assert done.state == "success", done.error
        assert sorted(m["vm"] for m in done.result["moved"]) == ["big", "small"]
        assert done.result["stayed"] == ["/dc1/c1/m1/zz"]
        assert on(site, "m1") == {"zz"} and fake1.maintenance

    run(scenario)


def test_a_cancelled_evacuation_leaves_the_host_out_of_maintenance(
    run: Callable[[Scenario], None], quick_retries: None
) -> None:
    async def scenario(site: Site) -> None:
        await hosts(site, ("m1", 8192, {"small": R, "zz": S.PAUSED}), ("m2", 8192, {}))
        task = await maintenance(site, "m1", wait=True)
        await until(lambda: (task.message or "").startswith("cannot move yet"), "waiting")
        site.agent.tasks.cancel(task.id)
        done = await site.finished(task)
        assert done.error == {"error": "cancelled", "message": "task cancelled"}
        assert not site.fakes["m1"].maintenance
        assert not site.inventory.host(site.hosts["m1"].id).maintenance
        assert on(site, "m2") == {"small"}  # what moved stays moved
        back = await site.migrate("small", "m1")  # it takes VMs again
        assert (await site.finished(back)).state == "success"

    run(scenario)


def test_a_migration_that_fails_fails_the_evacuation(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        await hosts(site, ("m1", 8192, {"a1": R}), ("m2", 8192, {}))
        site.fakes["m1"].fail_migrations(ProviderError("m1: the switch-over failed"))
        done = await site.finished(await maintenance(site, "m1"))
        assert done.error == {
            "error": "insufficient_resources",
            "message": "cannot enter maintenance mode on /dc1/c1/m1: a1 (m1: the switch-over "
            "failed)",
        }
        assert on(site, "m1") == {"a1"} and not site.fakes["m1"].maintenance

    run(scenario)


def test_nothing_is_placed_on_a_host_in_maintenance(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        await hosts(site, ("m1", 65536, {}), ("m2", 4096, {"a1": R}))
        done = await site.finished(await maintenance(site, "m1"))
        assert done.state == "success" and done.result["moved"] == []
        service = site.agent.service
        m1 = site.hosts["m1"]
        with pytest.raises(
            InsufficientResources, match=r"^host /dc1/c1/m1 is in maintenance mode$"
        ):
            await service.create_vm(m1.id, CreateVm("new"))
        with pytest.raises(
            InsufficientResources, match=r"^host /dc1/c1/m1 is in maintenance mode$"
        ):
            await service.migrate_vm(site.vm("a1").id, m1.id, MigrationOptions(), force=True)
        # Placement passes it over, though it has the most room.
        cluster = site.inventory.resolve("/dc1/c1").id
        created = await site.finished(await service.create_vm_in_cluster(cluster, CreateVm("new")))
        assert created.result["placed"] == {"cluster": "/dc1/c1", "host": "/dc1/c1/m2"}

    run(scenario)


# --- the REST API ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def api(site: Site) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_center_app(site.agent, start_agent=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://center/api/v1") as c:
        yield c


async def call(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    status: int,
    auth: tuple[str, str] = ADMIN,
    **kwargs: Any,
) -> Any:
    response = await client.request(method, path, auth=auth, **kwargs)
    assert response.status_code == status, response.text
    return response.json() if response.content else None


async def finished(client: httpx.AsyncClient, task: dict[str, Any]) -> dict[str, Any]:
    for _ in range(400):
        if task["state"] in ("success", "error"):
            return task
        await asyncio.sleep(0.02)
        task = await call(client, "GET", f"/tasks/{task['id']}", 200)
    raise AssertionError(f"task {task} did not finish")


def test_maintenance_through_the_api(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        await hosts(site, ("m1", 8192, {"a1": R, "big": R}), ("m2", 1536, {}))
        m1 = site.hosts["m1"].id
        path = f"/hosts/{m1}/maintenance"
        async with api(site) as c:
            denied = await call(c, "POST", path, 403, ALICE, json={"maintenance": True})
            assert denied["message"] == (
                "user 'alice' may not configure /dc1/c1/m1 (role there: read-only)"
            )
            refused = await call(c, "POST", path, 409, json={"maintenance": True})
            assert refused == {
                "error": "insufficient_resources",
                "message": "cannot enter maintenance mode on /dc1/c1/m1: big (m2: 512 MiB free, "
                "the VM needs 1024 MiB)",
            }
            await call(c, "POST", path, 400, json={"maintenance": True, "later": True})
            await call(c, "POST", "/hosts/999999/maintenance", 404, json={"maintenance": True})
            site.fakes["m1"].set_power(site.fakes["m1"].vm_named("big").id, S.STOPPED)
            await site.settled()
            task = await call(c, "POST", path, 202, json={"maintenance": True, "wait": False})
            assert (task["kind"], task["object"]) == ("host.maintenance", "/dc1/c1/m1")
            done = await finished(c, task)
            assert done["result"]["moved"] == [
                {"vm": "a1", "vm_id": site.vm("a1").id, "from": "/dc1/c1/m1",
                 "to": "/dc1/c1/m2", "task": done["result"]["moved"][0]["task"]}
            ]  # fmt: skip
            listed = await call(c, "GET", "/hosts", 200)
            assert {h["name"]: h["maintenance"] for h in listed} == {"m1": True, "m2": False}
            off = await finished(c, await call(c, "POST", path, 202, json={"maintenance": False}))
            assert off["result"]["maintenance"] is False

    run(scenario)


# --- the CLI --------------------------------------------------------------------------


@pytest.fixture
def center(tmp_path: Path) -> Iterator[ThreadCenter]:
    with ThreadCenter(tmp_path) as running:
        yield running


@pytest.fixture
def lab_hosts() -> Iterator[list[FakeHost]]:
    tag = uuid.uuid4().hex[:6]
    made = [
        fake_host(f"fake://m1-{tag}", name="m1", vms=["idle"]),
        fake_host(f"fake://m2-{tag}", name="m2"),
    ]
    made[0].add_vm("web", power_state=R, memory_mib=512)
    made[1].cpu_load = 0.375
    yield made
    for host in made:
        remove_fake_host(host.address)


def test_maintenance_through_the_cli(
    center: ThreadCenter, lab_hosts: list[FakeHost], tmp_path: Path
) -> None:
    admin = center.env(tmp_path, "admin")
    tv(admin, "center", "datacenter", "create", "dc1")
    tv(admin, "center", "cluster", "create", "/dc1", "c1")
    for host in lab_hosts:
        tv(admin, "center", "host", "add", host.address, "--provider", "fake", "--parent",
           "/dc1/c1", "--user", "admin", "--password-file", "-", stdin="secret\n")  # fmt: skip
    result = json.loads(tv(admin, "center", "host", "maintenance", "m1", "on", "--json"))
    assert (result["host"], result["maintenance"], result["stayed"]) == (
        "/dc1/c1/m1", True, ["/dc1/c1/m1/idle"])  # fmt: skip
    [moved] = result["moved"]
    assert (moved["vm"], moved["from"], moved["to"]) == ("web", "/dc1/c1/m1", "/dc1/c1/m2")
    assert set(moved) == {"vm", "vm_id", "from", "to", "task"}
    listed = tv(admin, "center", "host", "list")
    assert "MAINTENANCE" in listed.splitlines()[0]
    assert [line.split()[4:6] for line in listed.splitlines()[1:]] == [["yes", "-"], ["no", "38%"]]
    assert tv(admin, "center", "host", "maintenance", "m1", "off") == (
        "host /dc1/c1/m1 is out of maintenance mode\n"
    )
    tv(admin, "center", "vm", "migrate", "web", "m1")
    assert tv(admin, "center", "host", "maintenance", "/dc1/c1/m1", "on") == (
        "host /dc1/c1/m1 is in maintenance mode\n"
        "moved web to /dc1/c1/m2\n"
        "stayed there: /dc1/c1/m1/idle\n"
    )
    refused = tv(admin, "center", "host", "maintenance", "m2", "on", code=1)
    assert refused == (
        "error: cannot enter maintenance mode on /dc1/c1/m2: web (m1: in maintenance mode)\n"
    )
    assert "Invalid value" in tv(admin, "center", "host", "maintenance", "m2", "maybe", code=2)
