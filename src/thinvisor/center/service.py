"""The center's actions: registering hosts, and operations on any provider's VMs.

Operations are tasks (``TaskManager``): checked at once (the VM exists, its host is
connected, its provider has the capability: else the error, and no task), then run in the
background with progress. Each one's result is written to the inventory as soon as the
host answers, so that the center shows it without waiting for the host's event.

Registering a host connects to it first: an unreachable address, a certificate that is
not the pinned one and refused credentials are refused before anything is written.

A live migration (``migrate_vm``) is driven from here, the hosts doing the moving: the
destination's provider prepares to receive the VM and hands out a ticket, the source's
sends the VM with it. The VM keeps its inventory row (``Inventory.move_vm``), which the
hosts' syncs leave alone while it moves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from thinvisor.center.config import SyncConfig
from thinvisor.center.inventory import HostRow, Inventory, VmRow
from thinvisor.center.sync import HostSync, SyncManager, within
from thinvisor.errors import (
    AlreadyExists,
    CertificateMismatch,
    CredentialsRefused,
    InvalidArgument,
    InvalidState,
    NotFound,
    ThinvisorError,
    Unreachable,
)
from thinvisor.host.events import EventLog
from thinvisor.host.tasks import Progress, Task, TaskManager
from thinvisor.providers import canonical_address, open_provider
from thinvisor.providers.base import (
    SUSPEND_ACTIONS,
    Capability,
    Connection,
    ConsoleEndpoint,
    ConsoleKind,
    CreateVm,
    MigrationOptions,
    PowerAction,
    PowerState,
    Provider,
    Reconfigure,
    SnapshotRecord,
    VmRecord,
)

log = logging.getLogger(__name__)

#: How long registering a host waits for it to connect and answer.
CONNECT_TIMEOUT_S = 30.0
#: The shortest and longest switch-over pause a migration may be asked to keep to.
DOWNTIME_MS = (10, 10_000)
#: The least and the most bandwidth a migration may be given, in MiB/s.
BANDWIDTH_MIB_S = (1, 100_000)
#: Where a migration's progress is at each step: prepared, sent (the host's own progress
#: runs in between), in the inventory.
PREPARED, SENT = 5, 90


class CenterService:
    """Every action the center's API and CLI offer, on top of the inventory."""

    def __init__(
        self,
        inventory: Inventory,
        tasks: TaskManager,
        events: EventLog,
        sync_config: SyncConfig,
    ) -> None:
        self.inventory = inventory
        self.tasks = tasks
        self.events = events
        self.sync_config = sync_config
        self.syncs = SyncManager()

    # --- hosts ---------------------------------------------------------------------

    async def start(self) -> int:
        """Follow every registered host; how many there are."""
        hosts = await asyncio.to_thread(self.inventory.hosts)
        for host in hosts:
            self._follow(host)
        return len(hosts)

    async def close(self) -> None:
        await self.syncs.close()

    async def add_host(
        self,
        *,
        parent_id: int,
        provider: str,
        address: str,
        username: str | None = None,
        password: str | None = None,
        fingerprint: str | None = None,
        name: str | None = None,
        user: str | None = None,
    ) -> HostRow:
        """Connect to a host, then register it under ``parent_id`` and follow it.

        ``address`` is stored in its canonical spelling (``canonical_address``): a host
        already registered under another spelling of it is refused (``AlreadyExists``)
        before anything is tried."""
        address = canonical_address(provider, address)
        existing = await asyncio.to_thread(self.inventory.host_at, provider, address)
        if existing is not None:
            raise AlreadyExists(
                f"a {provider} host at {address} is already registered as {existing.path}"
            )
        connection = Connection(address, username, password, fingerprint)
        record = await _check_connection(open_provider(provider, connection))
        row = await asyncio.to_thread(
            self.inventory.add_host,
            parent_id,
            name or record.name,
            provider,
            address,
            username,
            password,
            fingerprint,
        )
        sync = self._follow(row)
        self.events.emit(
            "host.added",
            f"host {row.name!r} ({provider}, {address}) added to {row.path}",
            object=f"host/{row.name}",
            user=user,
        )
        try:
            await sync.wait_connected(CONNECT_TIMEOUT_S)
        except ThinvisorError as exc:
            log.warning("host %s added but not yet connected: %s", row.name, exc)
        return await asyncio.to_thread(self.inventory.host, row.id)

    async def remove_host(self, host_id: int, *, user: str | None = None) -> None:
        """Stop following a host and forget it and its VMs (nothing on the host changes)."""
        row = await asyncio.to_thread(self.inventory.host, host_id)
        await self.syncs.remove(host_id)
        await asyncio.to_thread(self.inventory.remove_host, host_id)
        self.events.emit(
            "host.removed", f"host {row.name!r} removed", object=f"host/{row.name}", user=user
        )

    async def reconnect_host(self, host_id: int) -> HostRow:
        """Drop the host's connection and connect again now (a full resync)."""
        row = await asyncio.to_thread(self.inventory.host, host_id)
        await self.syncs.remove(host_id)
        sync = self._follow(row)
        try:
            await sync.wait_connected(CONNECT_TIMEOUT_S)
        except ThinvisorError as exc:
            log.info("host %s not connected again yet: %s", row.name, exc)
        return await asyncio.to_thread(self.inventory.host, host_id)

    def _follow(self, host: HostRow) -> HostSync:
        def opener() -> Provider:
            password = self.inventory.host_password(host.id)
            connection = Connection(host.address, host.username, password, host.fingerprint)
            return open_provider(host.provider, connection)

        sync = HostSync(host.id, host.name, opener, self.inventory, self.events, self.sync_config)
        self.syncs.add(sync)
        return sync

    # --- operations ----------------------------------------------------------------

    async def power(self, vm_id: int, action: PowerAction, *, user: str | None = None) -> Task:
        vm, provider = await self._target(vm_id)
        needed = Capability.SUSPEND if action in SUSPEND_ACTIONS else Capability.POWER
        provider.require(needed, action.value)

        async def work(progress: Progress) -> dict[str, Any]:
            progress.update(10, f"{action.value} on {vm.host_name}")
            record = await provider.power(vm.ext_id, action)
            return await self._record(vm.host_id, record)

        return self.tasks.submit(f"vm.{action.value}", vm.path, user, work)

    async def create_vm(
        self,
        host_id: int,
        spec: CreateVm,
        *,
        template_id: int | None = None,
        user: str | None = None,
    ) -> Task:
        """A new VM on ``host_id``: from scratch, or from the template ``template_id``."""
        host = await asyncio.to_thread(self.inventory.host, host_id)
        provider = self.syncs.get(host_id).provider()
        if template_id is not None:
            template = await asyncio.to_thread(self.inventory.vm, template_id)
            if not template.template:
                raise InvalidArgument("template", f"{template.path} is not a template")
            if template.host_id != host_id:
                raise InvalidArgument("template", f"{template.path} is not on {host.path}")
            spec = CreateVm(**{**spec.__dict__, "template": template.ext_id})
        provider.require(Capability.TEMPLATES if spec.template else Capability.CREATE)

        async def work(progress: Progress) -> dict[str, Any]:
            progress.update(10, f"creating {spec.name} on {host.name}")
            return await self._record(host_id, await provider.create(spec))

        return self.tasks.submit("vm.create", f"{host.path}/{spec.name}", user, work)

    async def clone_vm(self, vm_id: int, name: str, *, user: str | None = None) -> Task:
        vm, provider = await self._target(vm_id)
        provider.require(Capability.CLONE)

        async def work(progress: Progress) -> dict[str, Any]:
            progress.update(10, f"cloning {vm.name} to {name}")
            return await self._record(vm.host_id, await provider.clone(vm.ext_id, name))

        return self.tasks.submit("vm.clone", vm.path, user, work)

    async def reconfigure_vm(
        self, vm_id: int, change: Reconfigure, *, user: str | None = None
    ) -> Task:
        vm, provider = await self._target(vm_id)
        provider.require(Capability.RECONFIGURE)

        async def work(progress: Progress) -> dict[str, Any]:
            progress.update(10, f"reconfiguring {vm.name}")
            return await self._record(vm.host_id, await provider.reconfigure(vm.ext_id, change))

        return self.tasks.submit("vm.reconfigure", vm.path, user, work)

    async def delete_vm(self, vm_id: int, *, user: str | None = None) -> Task:
        vm, provider = await self._target(vm_id)
        provider.require(Capability.DELETE)

        async def work(progress: Progress) -> dict[str, Any]:
            progress.update(10, f"deleting {vm.name} on {vm.host_name}")
            await provider.delete(vm.ext_id)
            await asyncio.to_thread(self.inventory.remove_vm, vm.host_id, vm.ext_id)
            return {"deleted": vm.path}

        return self.tasks.submit("vm.delete", vm.path, user, work)

    async def migrate_vm(
        self,
        vm_id: int,
        host_id: int,
        options: MigrationOptions,
        *,
        user: str | None = None,
    ) -> Task:
        """Live-migrate a running VM to the host ``host_id``, as a task that may be
        cancelled until the VM has switched over (the VM then keeps running where it was).

        Checked first, each refusal naming what is wrong: the VM runs, the destination
        is another host, both are connected, of the same provider kind, both can migrate,
        the destination is not in maintenance, the options are in range."""
        plan = await self._migration(vm_id, host_id, options)
        await asyncio.to_thread(self.inventory.begin_move, vm_id, host_id)
        task: Task | None = None

        async def work(progress: Progress) -> dict[str, Any]:
            def switched() -> None:
                if task is not None:
                    task.cancellable = False  # the VM runs there now: nothing to undo

            return await self._migrate(plan, options, progress, switched, user)

        try:
            task = self.tasks.submit("vm.migrate", plan.vm.path, user, work, cancellable=True)
        except BaseException:
            self.inventory.end_move(vm_id)
            raise
        return task

    async def _migration(self, vm_id: int, host_id: int, options: MigrationOptions) -> _Migration:
        """What a migration of the VM to ``host_id`` needs, once every check passed."""
        vm = await asyncio.to_thread(self.inventory.vm, vm_id)
        if vm.template or vm.power_state != PowerState.RUNNING:
            state = "a template" if vm.template else vm.power_state.value
            raise InvalidState(vm.name, state, "migrate")
        try:
            destination = await asyncio.to_thread(self.inventory.host, host_id)
        except NotFound as exc:
            raise InvalidArgument("host", str(exc)) from None
        if destination.id == vm.host_id:
            raise InvalidArgument("host", f"{vm.path} is on {destination.path} already")
        source = await asyncio.to_thread(self.inventory.host, vm.host_id)
        source_provider = self.syncs.get(source.id).provider()
        target = self.syncs.get(destination.id).provider()
        if destination.provider != source.provider:
            raise InvalidArgument(
                "host",
                f"{destination.path} is a {destination.provider} host and {vm.path} is on a "
                f"{source.provider} host: a VM migrates between hosts of one provider kind",
            )
        source_provider.require(Capability.MIGRATE)
        target.require(Capability.MIGRATE)
        if destination.maintenance:
            raise InvalidArgument("host", f"{destination.path} is in maintenance mode")
        await self._check_options(destination, options)
        return _Migration(vm, source, destination, source_provider, target)

    async def _check_options(self, destination: HostRow, options: MigrationOptions) -> None:
        low, high = DOWNTIME_MS
        if not low <= options.downtime_ms <= high:
            raise InvalidArgument(
                "downtime_ms", f"must be from {low} to {high}, not {options.downtime_ms}"
            )
        least, most = BANDWIDTH_MIB_S
        bandwidth = options.bandwidth_mib_s
        if bandwidth is not None and not least <= bandwidth <= most:
            raise InvalidArgument(
                "bandwidth_mib_s", f"must be from {least} to {most}, not {bandwidth}"
            )
        if options.datastore is not None:
            stores = await asyncio.to_thread(self.inventory.datastores, destination.id)
            if options.datastore not in {d.name for d in stores}:
                raise InvalidArgument(
                    "datastore", f"{destination.path} has no datastore {options.datastore!r}"
                )

    async def _migrate(
        self,
        plan: _Migration,
        options: MigrationOptions,
        progress: Progress,
        switched: Callable[[], None],
        user: str | None,
    ) -> dict[str, Any]:
        """The migration's work: the hosts move the VM, then the inventory follows."""
        vm, destination = plan.vm, plan.destination
        try:
            progress.update(1, f"preparing {destination.name} to receive {vm.name}")
            spec = await plan.source_provider.migration_spec(vm.ext_id)
            ticket = await plan.target.prepare_incoming(spec, options)

            moving = f"moving {vm.name} to {destination.name} ({ticket.mode})"

            def report(percent: int, message: str) -> None:
                share = (SENT - PREPARED) * max(0, min(100, percent)) // 100
                progress.update(PREPARED + share, message or moving)

            report(0, moving)
            result = await plan.source_provider.migrate(vm.ext_id, ticket, options, report)
            switched()
            progress.update(SENT, f"{vm.name} runs on {destination.name}")
            moved = await self._moved(vm.id, destination.id)
        finally:
            self.inventory.end_move(vm.id)
            await self._resync(plan.source.id, destination.id)
        if moved is None:
            moved = await asyncio.to_thread(self.inventory.vm_by_ext_id, destination.id, vm.ext_id)
        self._emit_migrated(plan, moved, result, user)
        return {**result, "vm": vm_dict(moved), "source": vm.path}

    async def _moved(self, vm_id: int, host_id: int) -> VmRow | None:
        """The VM's row, moved to the host; None if the center forgot it meanwhile (its
        host was removed, say): the destination's sync adds it anew."""
        try:
            return await asyncio.to_thread(self.inventory.move_vm, vm_id, host_id)
        except NotFound:
            return None

    async def _resync(self, *host_ids: int) -> None:
        """Take the hosts' snapshots again now (what their syncs skipped while a VM moved),
        as far as they answer."""
        for host_id in host_ids:
            try:
                await self.syncs.get(host_id).refresh()
            except (ThinvisorError, TimeoutError) as exc:
                log.info("host %s not refreshed after a migration: %s", host_id, exc)

    def _emit_migrated(
        self, plan: _Migration, row: VmRow, result: dict[str, Any], user: str | None
    ) -> None:
        downtime = result.get("downtime_ms")
        said = f", downtime {downtime:.0f} ms" if isinstance(downtime, int | float) else ""
        self.events.emit(
            "vm.migrated",
            f"vm {plan.vm.name} moved from {plan.source.name} to {plan.destination.name}"
            f" ({result.get('mode', 'live')}{said})",
            object=f"host/{plan.destination.name}/vm/{row.name}",
            user=user,
            data={"from": plan.vm.path, "to": row.path, "vm_id": row.id, **result},
        )

    async def snapshots(self, vm_id: int) -> list[SnapshotRecord]:
        vm, provider = await self._target(vm_id)
        provider.require(Capability.SNAPSHOT)
        return await provider.snapshots(vm.ext_id)

    async def create_snapshot(self, vm_id: int, name: str, *, user: str | None = None) -> Task:
        return await self._snapshot_task(
            vm_id, "vm.snapshot.create", user, lambda p, vm: p.create_snapshot(vm.ext_id, name)
        )

    async def revert_snapshot(
        self, vm_id: int, snapshot_id: str, *, user: str | None = None
    ) -> Task:
        return await self._snapshot_task(
            vm_id,
            "vm.snapshot.revert",
            user,
            lambda p, vm: p.revert_snapshot(vm.ext_id, snapshot_id),
        )

    async def delete_snapshot(
        self, vm_id: int, snapshot_id: str, *, user: str | None = None
    ) -> Task:
        return await self._snapshot_task(
            vm_id,
            "vm.snapshot.delete",
            user,
            lambda p, vm: p.delete_snapshot(vm.ext_id, snapshot_id),
        )

    async def console(self, vm_id: int, kind: ConsoleKind) -> ConsoleEndpoint:
        """Where the VM's console is, for the center's broker."""
        vm, provider = await self._target(vm_id)
        provider.require(Capability.CONSOLE)
        return await provider.console(vm.ext_id, kind)

    async def _snapshot_task(
        self,
        vm_id: int,
        kind: str,
        user: str | None,
        call: Callable[[Provider, VmRow], Awaitable[SnapshotRecord | None]],
    ) -> Task:
        vm, provider = await self._target(vm_id)
        provider.require(Capability.SNAPSHOT)

        async def work(progress: Progress) -> Any:
            progress.update(10, f"{kind.rsplit('.', 1)[-1]} snapshot of {vm.name}")
            snapshot = await call(provider, vm)
            await self.syncs.get(vm.host_id).refresh()
            return None if snapshot is None else snapshot.__dict__

        return self.tasks.submit(kind, vm.path, user, work)

    async def _target(self, vm_id: int) -> tuple[VmRow, Provider]:
        """The VM and its host's provider (``Disconnected`` if the host is away)."""
        vm = await asyncio.to_thread(self.inventory.vm, vm_id)
        return vm, self.syncs.get(vm.host_id).provider()

    async def _record(self, host_id: int, record: VmRecord) -> dict[str, Any]:
        row = await asyncio.to_thread(self.inventory.apply_vm, host_id, record)
        return vm_dict(row)


@dataclass(frozen=True)
class _Migration:
    """A migration that passed its checks: the VM, its hosts and their providers."""

    vm: VmRow
    source: HostRow
    destination: HostRow
    source_provider: Provider
    target: Provider


async def _check_connection(provider: Provider) -> Any:
    """Connect once to check the host; its errors as the field an operator must fix."""
    try:
        return await within(CONNECT_TIMEOUT_S, provider.connect())
    except TimeoutError:
        address = provider.connection.address
        raise InvalidArgument("address", f"{address} did not answer in time") from None
    except Unreachable as exc:
        raise InvalidArgument("address", _saying(exc, "cannot connect")) from None
    except CertificateMismatch as exc:
        raise InvalidArgument("fingerprint", str(exc)) from None
    except CredentialsRefused as exc:
        raise InvalidArgument("password", _saying(exc, "refused", _REFUSED)) from None
    finally:
        await provider.close()


_REFUSED = "the host refused the credentials"


def _saying(exc: Exception, words: str, prefix: str | None = None) -> str:
    """The provider's message, which says ``words`` once: it is prefixed with ``prefix``
    (``words`` if None) only where the provider's own message does not say them."""
    message = str(exc)
    return message if words in message else f"{prefix or words}: {message}"


def vm_dict(vm: VmRow) -> dict[str, Any]:
    """A VM as tasks' results and the API show it."""
    return {
        "id": vm.id,
        "name": vm.name,
        "path": vm.path,
        "host_id": vm.host_id,
        "host": vm.host_name,
        "ext_id": vm.ext_id,
        "power_state": str(vm.power_state),
        "cpus": vm.cpus,
        "memory_mib": vm.memory_mib,
        "template": vm.template,
    }
