"""Migration driven by the center's service, between hosts of the fake provider, on
SQLite and on PostgreSQL: the VM moves (live if it runs, cold if it is stopped) and keeps
its inventory object, every bad request is refused before a task starts (a rule or too
little room on the destination too, unless forced), and a failed or cancelled migration
leaves the VM running where it was, in the inventory as on its host."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from thinvisor.center.agent import CenterAgent
from thinvisor.center.config import CenterApiConfig, CenterConfig, DatabaseConfig, SyncConfig
from thinvisor.center.inventory import HostRow, VmRow
from thinvisor.center.service import PREPARED
from thinvisor.errors import (
    Busy,
    Disconnected,
    InsufficientResources,
    InvalidArgument,
    InvalidState,
    NotFound,
    ProviderError,
    ThinvisorError,
    Unsupported,
)
from thinvisor.host.tasks import Task
from thinvisor.providers import KINDS, open_provider
from thinvisor.providers import fake as fake_module
from thinvisor.providers.base import (
    Capability,
    ChangeEvent,
    ChangeKind,
    Connection,
    MigrationOptions,
    MigrationProgress,
    MigrationTicket,
    PowerAction,
    PowerState,
)
from thinvisor.providers.fake import (
    FakeHost,
    FakeProvider,
    fake_host,
    get_fake_host,
    remove_fake_host,
)
from thinvisor.providers.thinvisor import AgentApi, ThinvisorProvider

S = PowerState
WAIT_S = 10.0


class ImmobileProvider(FakeProvider):
    """A fake host's provider that cannot migrate (as libvirt's and vSphere's, for now)."""

    kind = "immobile"
    capabilities = FakeProvider.capabilities - {Capability.MIGRATE}


#: This module is the provider module of the kind ``immobile``.
PROVIDER = ImmobileProvider


@dataclass
class Site:
    """A running center: /dc1/f1/host1 (``app1`` running, ``idle`` stopped, template
    ``tpl``) and /dc1/host2 (``taken`` running), both fake; hosts added with ``add``."""

    agent: CenterAgent
    fakes: dict[str, FakeHost]
    hosts: dict[str, HostRow]

    @property
    def inventory(self) -> Any:
        return self.agent.inventory

    async def add(
        self, name: str, provider: str = "fake", *, parent: str | None = None, **kwargs: Any
    ) -> FakeHost:
        """A fake host registered under ``parent`` (default: /dc1/f1 for host1, else /dc1)."""
        fake = fake_host(f"fake://{name}-{uuid.uuid4().hex[:8]}", name=name, **kwargs)
        self.fakes[name] = fake
        parent = parent or ("/dc1/f1" if name == "host1" else "/dc1")
        parent_node = self.inventory.resolve(parent)
        self.hosts[name] = await self.agent.service.add_host(
            parent_id=parent_node.id,
            provider=provider,
            address=fake.address,
            username="admin",
            password="secret",
        )
        return fake

    def vm(self, name: str) -> VmRow:
        found: list[VmRow] = self.inventory.find_vms(name)
        assert len(found) == 1, found
        return found[0]

    async def migrate(self, vm: str | VmRow, host: str, **options: Any) -> Task:
        """Migrate a VM (by its unique name, or its row) to the host of that name."""
        row = self.vm(vm) if isinstance(vm, str) else vm
        chosen = MigrationOptions(**options)
        service = self.agent.service
        return await service.migrate_vm(row.id, self.hosts[host].id, chosen, user="ann")

    async def finished(self, task: Task) -> Task:
        done = await self.agent.tasks.wait(task.id, WAIT_S)
        assert done.done, done
        return done

    async def settled(self) -> None:
        """Every host's changes so far applied (a full snapshot of each, after them)."""
        await asyncio.sleep(0.05)
        for host in self.hosts.values():
            await self.agent.service.syncs.get(host.id).refresh()


def center_config(tmp_path: Path, database_url: str) -> CenterConfig:
    return CenterConfig(
        state_dir=tmp_path / "state",
        api=CenterApiConfig(tls=False),
        database=DatabaseConfig(url=database_url),
        sync=SyncConfig(ping_interval_s=0.1, ping_timeout_s=0.5, reconnect_max_s=0.5),
    )


@contextlib.asynccontextmanager
async def running_site(tmp_path: Path, database_url: str) -> AsyncIterator[Site]:
    agent = CenterAgent(center_config(tmp_path, database_url))
    await agent.start()
    site = Site(agent, {}, {})
    try:
        dc = agent.inventory.create_datacenter("dc1")
        agent.inventory.create_folder(dc.id, "f1")
        host1 = await site.add("host1", vms=["idle"], templates=["tpl"])
        host1.add_vm("app1", power_state=S.RUNNING, memory_mib=64)
        host2 = await site.add("host2")
        host2.add_vm("taken", power_state=S.RUNNING)
        await site.settled()
        yield site
        # The hosts' last changes applied before the database closes (a sync stopped
        # while it writes leaves its connection behind).
        await site.settled()
    finally:
        await agent.stop()
        agent.events.close()
        for fake in site.fakes.values():
            remove_fake_host(fake.address)


Scenario = Callable[[Site], Coroutine[Any, Any, None]]


@pytest.fixture
def run(tmp_path: Path, database_url: str) -> Iterator[Callable[[Scenario], None]]:
    """Runs a scenario on a site of its own."""

    def go(scenario: Scenario) -> None:
        async def main() -> None:
            async with running_site(tmp_path, database_url) as site:
                await scenario(site)

        asyncio.run(main())

    yield go


def test_a_running_vm_moves_and_keeps_its_object(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        app = site.vm("app1")
        site.inventory.create_tag("prod")
        site.inventory.tag(app.id, "prod")
        site.agent.permissions.grant(app.id, "ann", "admin")
        task = await site.migrate("app1", "host2", downtime_ms=100)
        assert (task.kind, task.object, task.user, task.cancellable) == (
            "vm.migrate", "/dc1/f1/host1/app1", "ann", True)  # fmt: skip
        done = await site.finished(task)
        assert done.state == "success", done.error
        result = done.result
        assert (result["source"], result["mode"], result["destination"]) == (
            "/dc1/f1/host1/app1", "shared", site.fakes["host2"].address)  # fmt: skip
        assert result["transferred_bytes"] == 64 << 20 and done.progress == 100
        assert (result["vm"]["id"], result["vm"]["path"], result["vm"]["host"]) == (
            app.id, "/dc1/host2/app1", "host2")  # fmt: skip
        assert "app1" in {v.name for v in site.fakes["host2"].vms.values()}
        assert "app1" not in {v.name for v in site.fakes["host1"].vms.values()}
        await site.settled()  # the hosts' own events and snapshots: still one VM, moved
        moved = site.vm("app1")
        assert (moved.id, moved.host_id, moved.power_state) == (
            app.id, site.hosts["host2"].id, S.RUNNING)  # fmt: skip
        assert [t.name for t in site.inventory.tags_of(app.id)] == ["prod"]
        assert [g.path for g in site.agent.permissions.grants(principal="ann")] == [
            "/dc1/host2/app1"
        ]
        # The center's own event (the hosts' are there too, as they said them).
        found = site.agent.events.list(kind_prefix="vm.migrated", object="host/host2/vm/app1")
        [event] = [e for e in found if e.user == "ann"]
        assert event.data["from"] == "/dc1/f1/host1/app1"
        assert event.message.startswith("vm app1 moved from host1 to host2 (shared, downtime ")
        # ... and back again, the same way.
        back = await site.finished(await site.migrate("app1", "host1"))
        assert back.state == "success" and site.vm("app1").path == "/dc1/f1/host1/app1"

    run(scenario)


def test_bad_migrations_are_refused_before_a_task_and_change_nothing(
    run: Callable[[Scenario], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(KINDS, "immobile", __name__)

    async def scenario(site: Site) -> None:
        await site.add("other-kind", provider="immobile")
        await site.add("immobile1", provider="immobile", vms=["fixed"])
        await site.add("immobile2", provider="immobile")
        site.fakes["immobile1"].set_power(site.fakes["immobile1"].vm_named("fixed").id, S.RUNNING)
        site.fakes["host1"].set_power(site.fakes["host1"].vm_named("idle").id, S.SUSPENDED)
        await site.settled()
        before = (site.inventory.tree(), site.inventory.vms())
        dc = site.inventory.resolve("/dc1")
        app = site.vm("app1")

        async def refused(error: type[ThinvisorError], message: str, call: Any) -> None:
            with pytest.raises(error) as caught:
                await call
            assert str(caught.value) == message

        host2 = site.hosts["host2"]
        await refused(InvalidState, "vm 'idle': cannot migrate while suspended",
                      site.migrate("idle", "host2"))  # fmt: skip
        await refused(InvalidState, "vm 'tpl': cannot migrate while a template",
                      site.migrate("tpl", "host2"))  # fmt: skip
        await refused(InvalidArgument, "host: /dc1/f1/host1/app1 is on /dc1/f1/host1 already",
                      site.migrate("app1", "host1"))  # fmt: skip
        service = site.agent.service
        await refused(InvalidArgument, f"host: no host with id {dc.id}",
                      service.migrate_vm(app.id, dc.id, MigrationOptions()))  # fmt: skip
        await refused(NotFound, "no vm with id 999999",
                      service.migrate_vm(999999, host2.id, MigrationOptions()))  # fmt: skip
        await refused(
            InvalidArgument,
            "host: /dc1/other-kind is a immobile host and /dc1/f1/host1/app1 is on a fake host:"
            " a VM migrates between hosts of one provider kind",
            site.migrate("app1", "other-kind"),
        )
        await refused(
            Unsupported,
            f"{site.fakes['immobile1'].address} (immobile): cannot migrate"
            " (the immobile provider has no migrate capability)",
            site.migrate("fixed", "immobile2"),
        )
        for field, options in (
            ("downtime_ms: must be from 10 to 10000, not 5", {"downtime_ms": 5}),
            ("downtime_ms: must be from 10 to 10000, not 10001", {"downtime_ms": 10_001}),
            ("bandwidth_mib_s: must be from 1 to 100000, not 0", {"bandwidth_mib_s": 0}),
            ("datastore: /dc1/host2 has no datastore 'nope'", {"datastore": "nope"}),
        ):
            await refused(InvalidArgument, field, site.migrate("app1", "host2", **options))
        # The destination in maintenance, then away.
        fake2 = site.fakes["host2"]
        connection = Connection(fake2.address, "admin", "secret")
        await open_provider("fake", connection).set_maintenance(True)
        await site.settled()
        await refused(InsufficientResources, "host /dc1/host2 is in maintenance mode",
                      site.migrate("app1", "host2"))  # fmt: skip
        await open_provider("fake", connection).set_maintenance(False)
        await site.settled()
        fake2.set_reachable(False)
        for _ in range(100):
            if site.inventory.host(host2.id).state == "disconnected":
                break
            await asyncio.sleep(0.05)
        with pytest.raises(Disconnected, match=r"^host 'host2' is disconnected: "):
            await site.migrate("app1", "host2")
        fake2.set_reachable(True)
        await site.agent.service.reconnect_host(host2.id)
        assert site.agent.tasks.list() == []
        assert "app1" in {v.name for v in site.fakes["host1"].vms.values()}
        await site.settled()
        assert (site.inventory.tree(), site.inventory.vms()) == before

    run(scenario)


def test_a_migration_the_destination_refuses_fails_in_its_task(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(site: Site) -> None:
        site.fakes["host2"].add_vm("app1")  # the name is taken there
        await site.settled()
        app = site.inventory.vm_by_ext_id(
            site.hosts["host1"].id, site.fakes["host1"].vm_named("app1").id
        )
        done = await site.finished(await site.migrate(app, "host2"))
        assert done.error is not None and done.error["error"] == "already_exists"
        assert site.inventory.vm(app.id).host_id == site.hosts["host1"].id

    run(scenario)


def test_a_failed_migration_leaves_the_vm_where_it_was(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        app = site.vm("app1")
        site.fakes["host1"].fail_migrations(ProviderError("host1: the switch-over failed"))
        done = await site.finished(await site.migrate("app1", "host2"))
        assert done.error == {"error": "provider_error", "message": "host1: the switch-over failed"}
        await site.settled()
        assert site.vm("app1") == app
        assert site.fakes["host1"].vm_named("app1").power_state == S.RUNNING
        assert "app1" not in {v.name for v in site.fakes["host2"].vms.values()}
        assert not [e for e in site.agent.events.list(kind_prefix="vm.migrated") if e.user]
        site.fakes["host1"].fail_migrations(None)  # nothing held: it may go now
        assert (await site.finished(await site.migrate("app1", "host2"))).state == "success"

    run(scenario)


def test_a_cancelled_migration_leaves_the_vm_where_it_was(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(site: Site) -> None:
        app = site.vm("app1")
        site.fakes["host1"].slow_migrations(30)
        task = await site.migrate("app1", "host2")
        with pytest.raises(Busy, match="vm /dc1/f1/host1/app1 is already being moved"):
            await site.migrate("app1", "host2")
        for _ in range(200):  # until the host copies its memory
            if (task.message or "").startswith("copying memory"):
                break
            await asyncio.sleep(0.01)
        assert (task.progress, task.message) == (PREPARED, "copying memory (0/4)")
        site.agent.tasks.cancel(task.id)
        done = await site.finished(task)
        assert done.error == {"error": "cancelled", "message": "task cancelled"}
        with pytest.raises(Busy, match="has already finished"):
            site.agent.tasks.cancel(task.id)
        await site.settled()
        assert site.vm("app1") == app
        assert site.fakes["host1"].vm_named("app1").power_state == S.RUNNING
        assert "app1" not in {v.name for v in site.fakes["host2"].vms.values()}
        # Other tasks cannot be cancelled; this VM may migrate again.
        power = await site.agent.service.power(site.vm("taken").id, PowerAction.STOP)
        with pytest.raises(Unsupported, match=r"\(vm.stop\) cannot be cancelled"):
            site.agent.tasks.cancel(power.id)
        site.fakes["host1"].slow_migrations(0)
        assert (await site.finished(await site.migrate("app1", "host2"))).state == "success"

    run(scenario)


# --- cold migration -------------------------------------------------------------------


class ColdFakeProvider(FakeProvider):
    """The fake provider, which also moves a stopped VM when asked with ``live`` False, as
    a thinvisor host agent does (a cold migration: its files move, it stays stopped).
    ``asked`` records the VM and ``live`` of each ``migrate`` call."""

    asked: ClassVar[list[tuple[str, bool]]] = []

    async def migrate(
        self,
        vm_id: str,
        ticket: MigrationTicket,
        options: MigrationOptions,
        progress: MigrationProgress | None = None,
    ) -> dict[str, Any]:
        source = self._host()
        with source.lock:
            vm = source.vm(vm_id)
        ColdFakeProvider.asked.append((vm.name, options.live))
        if options.live:
            return await super().migrate(vm_id, ticket, options, progress)
        if vm.power_state != S.STOPPED:
            raise InvalidState(vm.name, vm.power_state.value, "migrate cold")
        destination = get_fake_host(ticket.address)
        first, second = sorted((source, destination), key=lambda h: h.address)
        with first.lock, second.lock:
            del source.vms[vm_id]
            destination.vms[vm_id] = vm
            gone = f"{vm.name}: migrated to {destination.name}"
            source.emit(ChangeEvent(ChangeKind.VM_REMOVED, gone, vm_id, peer_kind="vm.migrated"))
            destination.emit_vm(vm, "vm.migrated", f"{vm.name}: arrived (cold migration)")
        if progress is not None:
            progress(100, "files moved")
        return {"vm": vm.name, "mode": ticket.mode, "total_ms": 1.0, "transferred_bytes": 0,
                "destination": ticket.address}  # fmt: skip


def cold_fakes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Make fake hosts move stopped VMs too (``ColdFakeProvider``); the migrations asked
    of them from now on."""
    monkeypatch.setattr(fake_module, "PROVIDER", ColdFakeProvider)
    monkeypatch.setattr(ColdFakeProvider, "asked", [])
    return ColdFakeProvider.asked


@pytest.fixture
def cold(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    return cold_fakes(monkeypatch)


def test_a_stopped_vm_moves_cold_and_keeps_its_object(
    run: Callable[[Scenario], None], cold: list[tuple[str, bool]]
) -> None:
    async def scenario(site: Site) -> None:
        idle = site.vm("idle")
        site.inventory.create_tag("cold")
        site.inventory.tag(idle.id, "cold")
        task = await site.migrate("idle", "host2", downtime_ms=100)
        assert (task.kind, task.cancellable) == ("vm.migrate", True)
        done = await site.finished(task)
        assert done.state == "success", done.error
        result = done.result
        assert (result["live"], result["mode"], result["source"]) == (
            False, "shared", "/dc1/f1/host1/idle")  # fmt: skip
        assert (result["vm"]["id"], result["vm"]["path"], result["vm"]["power_state"]) == (
            idle.id, "/dc1/host2/idle", "stopped")  # fmt: skip
        assert done.message == "idle is on host2"
        assert cold == [("idle", False)]
        assert site.fakes["host2"].vm_named("idle").power_state is S.STOPPED
        assert "idle" not in {v.name for v in site.fakes["host1"].vms.values()}
        await site.settled()
        moved = site.vm("idle")
        assert (moved.id, moved.host_id) == (idle.id, site.hosts["host2"].id)
        assert [t.name for t in site.inventory.tags_of(idle.id)] == ["cold"]
        [event] = [e for e in site.agent.events.list(kind_prefix="vm.migrated") if e.user == "ann"]
        assert event.message == "vm idle moved from host1 to host2 (cold, shared)"
        assert event.data["live"] is False
        # A running VM is still asked to move live.
        assert (await site.finished(await site.migrate("app1", "host2"))).state == "success"
        assert cold[-1] == ("app1", True)

    run(scenario)


async def rules_site(site: Site) -> None:
    """/dc1/c1 with hosts c1a (web1, db1, db2 running) and c1b (web2 running; 1 GiB),
    web1 and web2 kept apart, db1 and db2 together."""
    site.inventory.create_cluster(site.inventory.resolve("/dc1").id, "c1")
    a = await site.add("c1a", parent="/dc1/c1")
    b = await site.add("c1b", parent="/dc1/c1", memory_mib=1024)
    for name in ("web1", "db1", "db2"):
        a.add_vm(name, power_state=S.RUNNING, memory_mib=128)
    b.add_vm("web2", power_state=S.RUNNING, memory_mib=128)
    a.add_vm("big", power_state=S.RUNNING, memory_mib=2048)
    await site.settled()
    cluster = site.inventory.resolve("/dc1/c1").id
    rules = site.agent.service.rules
    rules.create(cluster, "apart", "anti-affinity", [site.vm("web1").id, site.vm("web2").id])
    rules.create(cluster, "together", "affinity", [site.vm("db1").id, site.vm("db2").id])


def test_placement_keeps_a_vm_off_a_host_unless_forced(
    run: Callable[[Scenario], None], cold: list[tuple[str, bool]]
) -> None:
    async def scenario(site: Site) -> None:
        await rules_site(site)

        async def refused(vm: str, message: str) -> None:
            with pytest.raises(InsufficientResources) as caught:
                await site.migrate(vm, "c1b")
            assert str(caught.value) == f"vm {vm!r} cannot move to /dc1/c1/c1b: {message}"

        await refused("web1", "web2 runs there and anti-affinity rule 'apart' parts them"
                              " (force moves it anyway)")  # fmt: skip
        await refused("db1", "affinity rule 'together' keeps it with db2 on c1a"
                             " (force moves it anyway)")  # fmt: skip
        await refused("big", "896 MiB free, the VM needs 2048 MiB (force moves it anyway)")
        assert site.agent.tasks.list() == [] and cold == []
        service = site.agent.service
        forced = await service.migrate_vm(
            site.vm("web1").id, site.hosts["c1b"].id, MigrationOptions(), force=True, user="ann"
        )
        assert (await site.finished(forced)).state == "success"
        assert site.vm("web1").host_name == "c1b"
        # Stopped, a VM takes no memory: it may go where it would not fit running.
        site.fakes["c1a"].set_power(site.fakes["c1a"].vm_named("big").id, S.STOPPED)
        await site.settled()
        done = await site.finished(await site.migrate("big", "c1b"))
        assert done.state == "success" and done.result["live"] is False

    run(scenario)


def test_the_thinvisor_provider_asks_its_agent_for_a_cold_migration() -> None:
    asked: list[Any] = []

    def agent(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content))
        ticket = {"id": "m-1", "token": "t", "port": 8000, "fingerprint": "AB", "mode": "shared"}
        return httpx.Response(201, json=ticket)

    provider = ThinvisorProvider(Connection("http://agent.example:8443", "admin", "pw"))
    api = provider.api
    provider.api = AgentApi(
        api.address, api.base, api.headers, None, transport=httpx.MockTransport(agent)
    )
    spec = {"name": "idle"}
    for live in (False, True):
        ticket = asyncio.run(provider.prepare_incoming(spec, MigrationOptions(live=live)))
        assert ticket.mode == "shared"
    assert asked == [
        {"vm": spec, "mode": "auto", "datastore": None, "live": False},
        {"vm": spec, "mode": "auto", "datastore": None, "live": True},
    ]
