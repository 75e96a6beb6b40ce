"""Placement in the center's operations, on hosts of the fake provider, on SQLite and on
PostgreSQL: the hosts' loads read from the inventory, a new VM created in a cluster, a
stopped VM moved (cold) before it is powered on where its host cannot take it, and the
balancer. Then the same through the REST API and the CLI."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from thinvisor.center import drs
from thinvisor.center import service as service_module
from thinvisor.center.placement import HostLoad, NoPlacement, Rule, RuleKind
from thinvisor.errors import InsufficientResources, InvalidArgument
from thinvisor.providers.base import CreateVm, NetworkRecord, PowerAction, PowerState
from thinvisor.providers.fake import FakeHost, fake_host, remove_fake_host

from .clienv import tv
from .test_center_maintenance import (
    ALICE,
    Scenario,
    VmSpec,
    api,
    call,
    finished,
    hosts,
    maintenance,
    on,
    running_lab,
)
from .test_center_migration import Site, cold_fakes
from .test_cli_center import ThreadCenter

S = PowerState
R = S.RUNNING


@pytest.fixture
def run(tmp_path: Path, database_url: str) -> Iterator[Callable[[Scenario], None]]:
    """Runs a scenario on a lab of its own: /dc1 and the empty cluster /dc1/c1."""

    def go(scenario: Scenario) -> None:
        async def main() -> None:
            async with running_lab(tmp_path, database_url) as site:
                await scenario(site)

        asyncio.run(main())

    yield go


@pytest.fixture
def cold(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    return cold_fakes(monkeypatch)


def cluster_id(site: Site, path: str = "/dc1/c1") -> int:
    node_id: int = site.inventory.resolve(path).id
    return node_id


# --- the loads ------------------------------------------------------------------------


def test_the_loads_are_read_from_the_inventory(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        inventory = site.inventory
        folder = inventory.create_folder(inventory.resolve("/dc1").id, "f1")
        c2 = inventory.create_cluster(folder.id, "c2").id
        h1 = await site.add("h1", parent="/dc1/f1/c2", cpus=4, memory_mib=16384)
        h2 = await site.add("h2", parent="/dc1/f1/c2", cpus=2, memory_mib=4096)
        h3 = await site.add("h3", parent="/dc1")
        h1.core_mhz, h1.cpu_load, h2.core_mhz = 2500, 0.25, 0  # as the next sync reads them
        # A powered-on VM's CPU reservation counts on its host; a stopped one's does not.
        h1.add_vm("r1", power_state=R, memory_mib=1024).reserved_cpu_mhz = 1000
        h1.add_vm("p1", power_state=S.PAUSED, memory_mib=512).reserved_cpu_mhz = 500
        s1 = h1.add_vm("s1", memory_mib=2048, cpus=2)
        s1.reserved_cpu_mhz, s1.reserved_memory_mib = 300, 512
        h1.add_vm("t1", template=True, memory_mib=4096)
        h2.add_vm("r2", power_state=R, memory_mib=256)
        h3.add_vm("r3", power_state=R)
        await site.settled()
        ids = {name: site.vm(name).id for name in ("r1", "p1", "s1", "r2", "r3")}
        site.agent.service.rules.create(c2, "apart", "anti-affinity", [ids["r1"], ids["r2"]])
        h2.set_reachable(False)  # its VMs: unknown, last known running
        row2 = site.hosts["h2"]
        await until_state(site, row2.id, "disconnected")
        loads = drs.cluster_loads(inventory, site.agent.service.rules, c2, entering={row2.id})
        row1 = site.hosts["h1"]
        assert loads.hosts == {
            row1.id: HostLoad(
                row1.id, "h1", c2, True, False, 4, 2500, 16384, 1536, 0.25, reserved_cpu_mhz=1500
            ),
            row2.id: HostLoad(row2.id, "h2", c2, False, True, 2, 0, 4096, 256, 0.0),
        }
        assert set(loads.rows) == {row1.id, row2.id}
        assert loads.placement == {ids["r1"]: row1.id, ids["p1"]: row1.id,
                                   ids["r2"]: row2.id, ids["r3"]: site.hosts["h3"].id}  # fmt: skip
        assert set(loads.vms) == set(ids.values())  # templates are not VMs
        assert loads.rules == [Rule("apart", RuleKind.ANTI_AFFINITY, {ids["r1"], ids["r2"]})]
        assert [vm.name for vm in loads.on(row1.id)] == ["p1", "r1"]
        assert drs.demand(loads.vms[ids["s1"]]).__dict__ == {
            "vm_id": ids["s1"], "name": "s1", "memory_mib": 2048, "cpus": 2,
            "reserved_memory_mib": 512, "reserved_cpu_mhz": 300, "host_id": row1.id}  # fmt: skip
        assert drs.cluster_of(inventory, row1.id) == c2
        assert drs.cluster_of(inventory, ids["r1"]) == c2
        assert drs.cluster_of(inventory, site.hosts["h3"].id) is None
        outside = drs.cluster_loads(inventory, site.agent.service.rules, None)
        assert set(outside.hosts) == {site.hosts["h3"].id} and outside.rules == []
        # Why each host may not take a VM, as the center's operations ask it.
        assert drs.refusal(loads, ids["s1"], row2.id) == "disconnected"
        big = inventory.vm(ids["s1"])
        assert drs.refusal(loads, big.id, row1.id) is None
        assert drs.refusal(loads, ids["r2"], row1.id) == (
            "r1 runs there and anti-affinity rule 'apart' parts them"
        )
        # Reserving more CPU than the host has left unreserved (4 x 2500 - 1500 MHz).
        s1.reserved_cpu_mhz = 9000
        await site.agent.service.syncs.get(row1.id).refresh()
        loads = drs.cluster_loads(inventory, site.agent.service.rules, c2)
        assert drs.refusal(loads, ids["s1"], row1.id) == (
            "8500 MHz of CPU unreserved, the VM reserves 9000 MHz"
        )

    run(scenario)


async def until_state(site: Site, host_id: int, state: str) -> None:
    for _ in range(200):
        if site.inventory.host(host_id).state == state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"host {host_id} never {state}")


# --- creating in a cluster ------------------------------------------------------------


def test_a_vm_created_in_a_cluster_goes_where_placement_says(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(site: Site) -> None:
        await hosts(site, ("h1", 8192, {"busy": (R, 4096)}), ("h2", 8192, {"app": R}),
                    ("h3", 2048, {}))  # fmt: skip
        site.fakes["h1"].add_vm("tpl", template=True)
        site.fakes["h1"].networks.append(NetworkRecord("lab", "lab"))
        site.inventory.create_cluster(site.inventory.resolve("/dc1").id, "c9")
        other = await site.add("x1", parent="/dc1/c9")
        other.add_vm("far", template=True)
        await site.settled()
        service, c1 = site.agent.service, cluster_id(site)
        task = await service.create_vm_in_cluster(c1, CreateVm("new", memory_mib=1024), user="ann")
        assert (task.kind, task.object) == ("vm.create", "/dc1/c1/h2/new")
        done = await site.finished(task)
        assert done.result["placed"] == {"cluster": "/dc1/c1", "host": "/dc1/c1/h2"}
        assert (done.result["path"], done.message) == (
            "/dc1/c1/h2/new", "creating new on h2 (chosen in /dc1/c1)")  # fmt: skip
        assert "new" in on(site, "h2")
        # From a template: on its host, though another has more room.
        tpl = site.vm("tpl").id
        made = await site.finished(
            await service.create_vm_in_cluster(c1, CreateVm("copy"), template_id=tpl)
        )
        assert made.result["placed"]["host"] == "/dc1/c1/h1"
        lab = await site.finished(
            await service.create_vm_in_cluster(c1, CreateVm("wired", network="lab"))
        )
        assert lab.result["placed"]["host"] == "/dc1/c1/h1"
        with pytest.raises(NoPlacement) as caught:
            await service.create_vm_in_cluster(c1, CreateVm("huge", memory_mib=9000))
        assert str(caught.value) == (
            "no host can take vm 'huge': h1: 4096 MiB free, the VM needs 9000 MiB; h2: 7168 MiB "
            "free, the VM needs 9000 MiB; h3: 2048 MiB free, the VM needs 9000 MiB"
        )
        with pytest.raises(InvalidArgument, match=r"^template: /dc1/c9/x1/far is not in /dc1/c1"):
            await service.create_vm_in_cluster(c1, CreateVm("y"), template_id=site.vm("far").id)
        with pytest.raises(InvalidArgument, match=r"^network: no host of /dc1/c1 has 'nope'$"):
            await service.create_vm_in_cluster(c1, CreateVm("y", network="nope"))
        with pytest.raises(InvalidArgument, match=r"^cluster: host /dc1/c1/h1 is not a cluster$"):
            await service.create_vm_in_cluster(site.hosts["h1"].id, CreateVm("y"))
        assert not {"huge", "y"} & (on(site, "h1") | on(site, "h2") | on(site, "h3"))

    run(scenario)


# --- powering on ----------------------------------------------------------------------


async def start(site: Site, vm: str) -> Any:
    service = site.agent.service
    return await site.finished(await service.power(site.vm(vm).id, PowerAction.START, user="ann"))


def test_a_vm_is_moved_before_it_powers_on_where_its_host_cannot_take_it(
    run: Callable[[Scenario], None], cold: list[tuple[str, bool]]
) -> None:
    async def scenario(site: Site) -> None:
        h1: dict[str, VmSpec] = {"s1": S.STOPPED, "fine": S.STOPPED}
        h2: dict[str, VmSpec] = {"s2": (S.STOPPED, 2048), "r2": R}
        h3: dict[str, VmSpec] = {"fat": (S.STOPPED, 1536), "hog": R}
        await hosts(site, ("h1", 8192, h1), ("h2", 8192, h2), ("h3", 2048, h3))
        ids = [site.vm("s2").id, site.vm("r2").id]
        site.agent.service.rules.create(cluster_id(site), "apart", "anti-affinity", ids)
        # Its host is fine: started there.
        fine = await start(site, "fine")
        assert (fine.result["path"], fine.result["power_state"]) == ("/dc1/c1/h1/fine", "running")
        assert "moved" not in fine.result and cold == []
        # Its host is in maintenance mode (fine moves away, live).
        assert (await site.finished(await maintenance(site, "h1"))).state == "success"
        done = await start(site, "s1")
        assert done.state == "success", done.error
        assert (done.kind, done.object, done.message) == (
            "vm.start",
            "/dc1/c1/h1/s1",
            "moved s1 to h2 (h1: in maintenance mode), then started",
        )
        assert (done.result["path"], done.result["power_state"], done.result["moved"]) == (
            "/dc1/c1/h2/s1", "running",
            {"from": "/dc1/c1/h1/s1", "to": "/dc1/c1/h2/s1", "reason": "in maintenance mode"},
        )  # fmt: skip
        assert cold == [("fine", True), ("s1", False)]
        assert site.fakes["h2"].vm_named("s1").power_state is R
        # A VM it must stay apart from runs there; the other host is in maintenance.
        with pytest.raises(InsufficientResources) as caught:
            await start(site, "s2")
        assert str(caught.value) == (
            "vm 's2' cannot power on on h2 (r2 runs there and anti-affinity rule 'apart' parts "
            "them), and no host can take vm 's2': h1: in maintenance mode; h3: 1024 MiB free, "
            "the VM needs 2048 MiB"
        )
        assert (await site.finished(await maintenance(site, "h1", False))).state == "success"
        apart = await start(site, "s2")
        assert apart.result["moved"]["to"] == "/dc1/c1/h1/s2"
        # Too little memory left on its host.
        fat = await start(site, "fat")
        assert fat.result["moved"] == {
            "from": "/dc1/c1/h3/fat",
            "to": "/dc1/c1/h1/fat",
            "reason": "1024 MiB free, the VM needs 1536 MiB",
        }
        assert [name for name, _ in cold] == ["fine", "s1", "s2", "fat"]

    run(scenario)


def test_a_vm_outside_a_cluster_powers_on_where_it_is(
    run: Callable[[Scenario], None], cold: list[tuple[str, bool]]
) -> None:
    async def scenario(site: Site) -> None:
        lone = await site.add("lone", parent="/dc1", memory_mib=1024)
        lone.add_vm("hog", power_state=R, memory_mib=1024)
        lone.add_vm("s1")
        await site.settled()
        done = await start(site, "s1")
        assert done.result["path"] == "/dc1/lone/s1" and cold == []

    run(scenario)


# --- balancing ------------------------------------------------------------------------


def test_the_balancer_evens_memory_out_and_leaves_what_it_moved_alone(
    run: Callable[[Scenario], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(site: Site) -> None:
        vms: dict[str, VmSpec] = {f"r{i}": R for i in range(1, 5)}
        await hosts(site, ("h1", 8192, vms), ("h2", 8192, {}))
        service, c1 = site.agent.service, cluster_id(site)
        moves = await service.balance_once(c1, user="ann")
        assert [(m["from"], m["to"], m["error"]) for m in moves] == [
            ("/dc1/c1/h1", "/dc1/c1/h2", None)] * 2  # fmt: skip
        assert moves[0]["reason"] == "memory use 50% on h1, 0% on h2"
        assert set(moves[0]) == {"vm", "vm_id", "from", "to", "reason", "task", "error"}
        moved = {m["vm"] for m in moves}
        assert on(site, "h2") == moved and len(on(site, "h1")) == 2
        assert await service.balance_once(c1) == []  # even now
        # A load that moving one back would even out: what moved stays where it went.
        site.fakes["h2"].add_vm("hog", power_state=R, memory_mib=4096)
        await site.settled()
        assert await service.balance_once(c1) == []
        monkeypatch.setattr(service_module, "BALANCE_GUARD_S", 0.0)  # ... for a while
        [back] = await service.balance_once(c1, max_moves=1)
        assert (back["vm"] in moved, back["to"]) == (True, "/dc1/c1/h1")

    run(scenario)


def test_the_balancer_repairs_a_broken_anti_affinity_rule_first(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(site: Site) -> None:
        await hosts(site, ("h1", 8192, {"a1": R, "a2": R}), ("h2", 8192, {"b1": R, "b2": R}))
        ids = [site.vm("a1").id, site.vm("a2").id]
        site.agent.service.rules.create(cluster_id(site), "apart", "anti-affinity", ids)
        [move] = await site.agent.service.balance_once(cluster_id(site), max_moves=1)
        assert move["reason"] == "anti-affinity rule 'apart': another of its VMs is on h1"
        assert (move["from"], move["to"], move["error"]) == ("/dc1/c1/h1", "/dc1/c1/h2", None)
        assert len(on(site, "h1") & {"a1", "a2"}) == 1

    run(scenario)


# --- the REST API ---------------------------------------------------------------------


def test_placement_through_the_api(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        await hosts(site, ("h1", 8192, {"r1": R}), ("h2", 8192, {"web": (R, 2048)}))
        ids = [site.vm("r1").id, site.vm("web").id]
        c1 = cluster_id(site)
        site.agent.service.rules.create(c1, "apart", "anti-affinity", ids)
        async with api(site) as c:
            body = {"host": "/dc1/c1", "name": "new", "memory_mib": 512}
            created = await finished(c, await call(c, "POST", "/vms", 202, json=body))
            assert created["result"]["placed"] == {"cluster": "/dc1/c1", "host": "/dc1/c1/h1"}
            refused = await call(c, "POST", "/vms", 400, json={"host": "/dc1", "name": "x"})
            assert refused["message"] == "host: datacenter /dc1 is not a host or a cluster"
            path, host = f"/vms/{ids[0]}/migrate", {"host": "/dc1/c1/h2"}
            refused = await call(c, "POST", path, 409, json=host)
            assert refused == {
                "error": "insufficient_resources",
                "message": "vm 'r1' cannot move to /dc1/c1/h2: web runs there and anti-affinity "
                "rule 'apart' parts them (force moves it anyway)",
            }
            forced = await call(c, "POST", path, 202, json=host | {"force": True})
            assert (await finished(c, forced))["state"] == "success"
            # Balancing: r1 and web share h2 now.
            balance = f"/clusters/{c1}/balance"
            await call(c, "POST", balance, 403, ALICE)
            node = site.hosts["h1"].id
            missing = await call(c, "POST", f"/clusters/{node}/balance", 404)
            assert missing["message"] == f"no cluster with id {node}"
            task = await call(c, "POST", balance, 202)
            assert (task["kind"], task["object"]) == ("cluster.balance", "/dc1/c1")
            done = await finished(c, task)
            assert done["result"]["cluster"] == "/dc1/c1"
            [repair] = done["result"]["moves"]
            assert repair["reason"] == "anti-affinity rule 'apart': another of its VMs is on h2"

    run(scenario)


# --- the CLI --------------------------------------------------------------------------


@pytest.fixture
def center(tmp_path: Path) -> Iterator[ThreadCenter]:
    with ThreadCenter(tmp_path) as running:
        yield running


@pytest.fixture
def lab_hosts() -> Iterator[list[FakeHost]]:
    tag = uuid.uuid4().hex[:6]
    made = [fake_host(f"fake://p1-{tag}", name="p1"), fake_host(f"fake://p2-{tag}", name="p2")]
    for name in ("r1", "r2"):
        made[0].add_vm(name, power_state=R, memory_mib=4096)
    made[1].add_vm("other", power_state=R, memory_mib=1024)
    yield made
    for host in made:
        remove_fake_host(host.address)


def test_placement_through_the_cli(
    center: ThreadCenter,
    lab_hosts: list[FakeHost],
    tmp_path: Path,
    cold: list[tuple[str, bool]],
) -> None:
    admin = center.env(tmp_path, "admin")
    tv(admin, "center", "datacenter", "create", "dc1")
    tv(admin, "center", "cluster", "create", "/dc1", "c1")
    for host in lab_hosts:
        tv(admin, "center", "host", "add", host.address, "--provider", "fake", "--parent",
           "/dc1/c1", "--user", "admin", "--password-file", "-", stdin="secret\n")  # fmt: skip
    created = tv(admin, "center", "vm", "create", "/dc1/c1", "web", "--memory", "512")
    assert created == "created vm /dc1/c1/p2/web (stopped)\n"
    made = json.loads(tv(admin, "center", "vm", "create", "/dc1/c1", "db", "--json"))
    assert (made["path"], made["placed"]) == (
        "/dc1/c1/p2/db", {"cluster": "/dc1/c1", "host": "/dc1/c1/p2"})  # fmt: skip
    result: dict[str, Any] = json.loads(tv(admin, "center", "cluster", "balance", "/dc1/c1",
                                           "--json"))  # fmt: skip
    assert result["cluster"] == "/dc1/c1"
    [move] = result["moves"]
    assert (move["from"], move["to"], move["error"]) == ("/dc1/c1/p1", "/dc1/c1/p2", None)
    assert move["reason"].startswith("memory use ")
    assert tv(admin, "center", "cluster", "balance", "/dc1/c1") == (
        "cluster /dc1/c1 is balanced: nothing to move\n"
    )
    assert tv(admin, "center", "cluster", "balance", "/dc1", code=1) == (
        "error: cluster: datacenter /dc1 is not a cluster\n"
    )
    # A VM whose host is in maintenance mode starts elsewhere.
    tv(admin, "center", "host", "maintenance", "p2", "on")
    started = json.loads(tv(admin, "center", "vm", "start", "web", "--json"))
    assert (started["path"], started["power_state"], started["moved"]) == (
        "/dc1/c1/p1/web", "running",
        {"from": "/dc1/c1/p2/web", "to": "/dc1/c1/p1/web", "reason": "in maintenance mode"},
    )  # fmt: skip
    assert tv(admin, "center", "vm", "start", "db") == (
        "vm /dc1/c1/p1/db: running (moved from /dc1/c1/p2/db: in maintenance mode)\n"
    )
    assert ("web", False) in cold
