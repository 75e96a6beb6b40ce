"""Live migration driven by the center's service, between hosts of the fake provider, on
SQLite and on PostgreSQL: the VM moves and keeps its inventory object, every bad request
is refused before a task starts, and a failed or cancelled migration leaves the VM
running where it was, in the inventory as on its host."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from thinvisor.center.agent import CenterAgent
from thinvisor.center.config import CenterApiConfig, CenterConfig, DatabaseConfig, SyncConfig
from thinvisor.center.inventory import HostRow, VmRow
from thinvisor.center.service import PREPARED
from thinvisor.errors import (
    Busy,
    Disconnected,
    InvalidArgument,
    InvalidState,
    NotFound,
    ProviderError,
    ThinvisorError,
    Unsupported,
)
from thinvisor.host.tasks import Task
from thinvisor.providers import KINDS, open_provider
from thinvisor.providers.base import (
    Capability,
    Connection,
    MigrationOptions,
    PowerAction,
    PowerState,
)
from thinvisor.providers.fake import FakeHost, FakeProvider, fake_host, remove_fake_host

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

    async def add(self, name: str, provider: str = "fake", **kwargs: Any) -> FakeHost:
        fake = fake_host(f"fake://{name}-{uuid.uuid4().hex[:8]}", name=name, **kwargs)
        self.fakes[name] = fake
        parent = self.inventory.resolve("/dc1/f1" if name == "host1" else "/dc1")
        self.hosts[name] = await self.agent.service.add_host(
            parent_id=parent.id,
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
        await site.settled()
        before = (site.inventory.tree(), site.inventory.vms())
        dc = site.inventory.resolve("/dc1")
        app = site.vm("app1")

        async def refused(error: type[ThinvisorError], message: str, call: Any) -> None:
            with pytest.raises(error) as caught:
                await call
            assert str(caught.value) == message

        host2 = site.hosts["host2"]
        await refused(InvalidState, "vm 'idle': cannot migrate while stopped",
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
        await refused(InvalidArgument, "host: /dc1/host2 is in maintenance mode",
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
