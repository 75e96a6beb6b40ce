"""A stopped VM moved by the center between hosts of two provider kinds (fake hosts, one
of them under a second kind): its disks travel through files on the center's machine,
the source keeps it until the destination has it, a failure leaves it where it was, and
the staging files are gone in every case."""

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
from thinvisor.center.transfer import staging_root
from thinvisor.errors import (
    AlreadyExists,
    InvalidArgument,
    ProviderError,
    ThinvisorError,
    Unsupported,
)
from thinvisor.host.tasks import Task, error_code
from thinvisor.providers import KINDS
from thinvisor.providers.base import Capability, MigrationOptions, PowerState
from thinvisor.providers.fake import FakeHost, FakeProvider, fake_host, remove_fake_host

S = PowerState
WAIT_S = 10.0


class OtherKindProvider(FakeProvider):
    """Fake hosts under a second provider kind, as a libvirt host is to a thinvisor one."""

    kind = "otherkind"


#: This module is the provider module of the kind ``otherkind``.
PROVIDER = OtherKindProvider


@dataclass
class Site:
    """A center with ``tv1`` (fake: ``idle`` stopped with two disks, ``app1`` running)
    and ``lv1`` (otherkind, empty)."""

    agent: CenterAgent
    fakes: dict[str, FakeHost]
    hosts: dict[str, HostRow]

    async def add(self, name: str, provider: str) -> FakeHost:
        fake = fake_host(f"fake://{name}-{uuid.uuid4().hex[:8]}", name=name)
        self.fakes[name] = fake
        dc = self.agent.inventory.resolve("/dc1")
        self.hosts[name] = await self.agent.service.add_host(
            parent_id=dc.id,
            provider=provider,
            address=fake.address,
            username="admin",
            password="secret",
        )
        return fake

    def vms(self, name: str) -> list[VmRow]:
        found: list[VmRow] = self.agent.inventory.find_vms(name)
        return found

    async def move(self, name: str, host: str, **options: Any) -> Task:
        (row,) = self.vms(name)
        service = self.agent.service
        return await service.migrate_vm(row.id, self.hosts[host].id, MigrationOptions(**options))

    async def finished(self, task: Task) -> Task:
        done = await self.agent.tasks.wait(task.id, WAIT_S)
        assert done.done, done
        return done

    async def settled(self) -> None:
        await asyncio.sleep(0.05)
        for host in self.hosts.values():
            await self.agent.service.syncs.get(host.id).refresh()

    def staged(self) -> list[Path]:
        root = staging_root(self.agent.service)
        return list(root.iterdir()) if root.exists() else []


@contextlib.asynccontextmanager
async def running_site(tmp_path: Path) -> AsyncIterator[Site]:
    config = CenterConfig(
        state_dir=tmp_path / "state",
        api=CenterApiConfig(tls=False),
        database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'inventory.db'}"),
        sync=SyncConfig(ping_interval_s=0.1, ping_timeout_s=0.5, reconnect_max_s=0.5),
    )
    agent = CenterAgent(config)
    await agent.start()
    site = Site(agent, {}, {})
    try:
        agent.inventory.create_datacenter("dc1")
        tv1 = await site.add("tv1", "fake")
        idle = tv1.add_vm("idle", cpus=2, memory_mib=128)
        idle.disks = ("system of idle", "data of idle")
        tv1.add_vm("app1", power_state=S.RUNNING)
        await site.add("lv1", "otherkind")
        await site.settled()
        yield site
        await site.settled()
    finally:
        await agent.stop()
        agent.events.close()
        for fake in site.fakes.values():
            remove_fake_host(fake.address)


Scenario = Callable[[Site], Coroutine[Any, Any, None]]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Scenario], None]]:
    monkeypatch.setitem(KINDS, "otherkind", __name__)

    def go(scenario: Scenario) -> None:
        async def main() -> None:
            async with running_site(tmp_path) as site:
                await scenario(site)

        asyncio.run(main())

    yield go


def test_a_stopped_vm_moves_to_another_kind_and_back(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        (before,) = site.vms("idle")
        inventory = site.agent.inventory
        inventory.create_tag("prod")
        inventory.tag(before.id, "prod")
        inventory.set_vm_ha_priority(before.id, "high")
        task = await site.move("idle", "lv1")
        assert (task.kind, task.object) == ("vm.migrate", "/dc1/tv1/idle")
        done = await site.finished(task)
        assert done.state == "success", done.error
        result = done.result
        assert (result["mode"], result["live"], result["disks"], result["kernel"]) == (
            "transfer", False, 2, False)  # fmt: skip
        assert (result["source"], result["destination"]) == ("/dc1/tv1/idle", "/dc1/lv1")
        assert done.progress == 100
        moved = site.fakes["lv1"].vm_named("idle")
        assert (moved.cpus, moved.memory_mib, moved.disks) == (
            2, 128, ("system of idle", "data of idle"))  # fmt: skip
        assert moved.power_state == S.STOPPED
        assert "idle" not in {v.name for v in site.fakes["tv1"].vms.values()}
        assert site.staged() == []
        await site.settled()
        # One row, its own: under the destination, by the id the destination has for it.
        (row,) = site.vms("idle")
        assert (row.id, row.host_id, row.ext_id, result["vm"]["id"]) == (
            before.id, site.hosts["lv1"].id, moved.id, before.id)  # fmt: skip
        assert [t.name for t in inventory.tags_of(row.id)] == ["prod"]
        assert row.ha_priority == "high"
        kinds = [e.kind for e in site.agent.events.list(object="host/lv1/vm/idle")]
        assert "vm.migrated" in kinds

        back = await site.finished(await site.move("idle", "tv1"))
        assert back.state == "success", back.error
        returned = site.fakes["tv1"].vm_named("idle")
        assert returned.disks == ("system of idle", "data of idle")
        assert site.fakes["lv1"].vms == {}
        await site.settled()
        (row,) = site.vms("idle")
        assert (row.id, row.host_id, row.ext_id) == (before.id, site.hosts["tv1"].id, returned.id)

    run(scenario)


def test_a_failed_import_leaves_the_vm_where_it_was(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        (before,) = site.vms("idle")
        site.fakes["lv1"].fail_imports(ProviderError("lv1: the pool is full"))
        done = await site.finished(await site.move("idle", "lv1"))
        assert done.state == "error"
        assert done.error is not None and "the pool is full" in str(done.error)
        assert site.fakes["tv1"].vm_named("idle").disks == ("system of idle", "data of idle")
        assert site.fakes["lv1"].vms == {}
        assert site.staged() == []
        await site.settled()
        (row,) = site.vms("idle")
        assert (row.id, row.host_id) == (before.id, site.hosts["tv1"].id)
        # It moves once the destination takes it again: nothing was left held.
        site.fakes["lv1"].fail_imports(None)
        again = await site.finished(await site.move("idle", "lv1"))
        assert again.state == "success", again.error

    run(scenario)


def test_a_name_taken_on_the_destination_fails_the_task(
    run: Callable[[Scenario], None],
) -> None:
    async def scenario(site: Site) -> None:
        site.fakes["lv1"].add_vm("idle2")
        site.fakes["tv1"].add_vm("idle2")
        await site.settled()
        (row,) = [v for v in site.vms("idle2") if v.host_id == site.hosts["tv1"].id]
        task = await site.agent.service.migrate_vm(row.id, site.hosts["lv1"].id, MigrationOptions())
        done = await site.finished(task)
        assert done.state == "error" and done.error is not None
        assert done.error["error"] == error_code(AlreadyExists("x"))
        assert site.fakes["tv1"].vm_named("idle2").id == row.ext_id
        assert site.staged() == []

    run(scenario)


def test_what_cannot_be_transferred_is_refused(run: Callable[[Scenario], None]) -> None:
    async def scenario(site: Site) -> None:
        async def refused(error: type[ThinvisorError], message: str, call: Any) -> None:
            with pytest.raises(error) as caught:
                await call
            assert str(caught.value) == message

        await refused(
            InvalidArgument,
            "host: /dc1/lv1 is a otherkind host and /dc1/tv1/app1 is on a fake host:"
            " a VM migrates between hosts of one provider kind",
            site.move("app1", "lv1"),
        )
        await refused(
            InvalidArgument,
            "datastore: /dc1/lv1 has no datastore 'nope'",
            site.move("idle", "lv1", datastore="nope"),
        )
        # Snapshots do not travel: the export refuses, in the task.
        tv1 = site.fakes["tv1"]
        source = site.agent.service.syncs.get(site.hosts["tv1"].id).provider()
        await source.create_snapshot(tv1.vm_named("idle").id, "before")
        done = await site.finished(await site.move("idle", "lv1"))
        assert done.state == "error" and done.error is not None
        assert done.error["error"] == error_code(Unsupported("x"))
        assert "has snapshots" in done.error["message"]
        assert "idle" in {v.name for v in tv1.vms.values()} and site.staged() == []

    run(scenario)


def test_a_provider_without_transfer_is_refused_before_a_task(
    run: Callable[[Scenario], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    less = FakeProvider.capabilities - {Capability.TRANSFER}
    monkeypatch.setattr(OtherKindProvider, "capabilities", less)

    async def scenario(site: Site) -> None:
        with pytest.raises(Unsupported) as caught:
            await site.move("idle", "lv1")
        address = site.fakes["lv1"].address
        assert str(caught.value) == (
            f"{address} (otherkind): cannot transfer"
            " (the otherkind provider has no transfer capability)"
        )
        assert all(t.kind != "vm.migrate" for t in site.agent.tasks.list())
        (row,) = site.vms("idle")
        assert row.host_id == site.hosts["tv1"].id

    run(scenario)
