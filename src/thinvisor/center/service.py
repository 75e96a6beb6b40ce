"""The center's actions: registering hosts, and operations on any provider's VMs.

Operations are tasks (``TaskManager``): checked at once (the VM exists, its host is
connected, its provider has the capability: else the error, and no task), then run in the
background with progress. Each one's result is written to the inventory as soon as the
host answers, so that the center shows it without waiting for the host's event.

Registering a host connects to it first: an unreachable address, a certificate that is
not the pinned one and refused credentials are refused before anything is written.

A migration (``migrate_vm``) is driven from here, the hosts doing the moving: the
destination's provider prepares to receive the VM and hands out a ticket, the source's
sends the VM with it, live if it runs, its files if it is stopped (cold). The VM keeps
its inventory row (``Inventory.move_vm``), which the hosts' syncs leave alone while it
moves.

Placement (``thinvisor.center.drs`` over ``thinvisor.center.placement``) decides where
VMs go: a new VM created in a cluster, a stopped VM powered on where its host cannot
take it (it is moved first), the VMs of a host entering maintenance mode
(``set_maintenance``), and the moves that even a cluster out (``balance_once``). A
migration onto a host that breaks a rule or lacks room is refused unless forced; no VM
goes to a host in maintenance mode, or entering it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, replace
from typing import Any

from thinvisor.center import drs, transfer
from thinvisor.center.config import SyncConfig
from thinvisor.center.inventory import HostRow, Inventory, Node, VmRow
from thinvisor.center.models import NodeKind
from thinvisor.center.placement import BalanceMove, NoPlacement, VmDemand
from thinvisor.center.rules import Rules
from thinvisor.center.sync import HostSync, SyncManager, within
from thinvisor.errors import (
    AlreadyExists,
    Busy,
    CertificateMismatch,
    CredentialsRefused,
    InsufficientResources,
    InvalidArgument,
    InvalidState,
    NotFound,
    ThinvisorError,
    Unreachable,
)
from thinvisor.host.events import EventLog
from thinvisor.host.tasks import Progress, Task, TaskManager
from thinvisor.providers import canonical_address, open_provider, provider_class
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
#: How many VMs a host entering maintenance mode sends away at once.
EVACUATION_PARALLEL = 2
#: How long a host entering maintenance mode waits before it tries again to move the VMs
#: that could not move.
EVACUATION_RETRY_S = 5.0
#: Balancing: the most moves of one pass, the spread of memory use it tolerates, and
#: how long a VM it moved is left alone (and never sent back).
BALANCE_MOVES = 2
BALANCE_THRESHOLD = 0.2
BALANCE_GUARD_S = 600.0


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
        self.rules = Rules(inventory.db)
        # Hosts being evacuated for maintenance mode: placement counts them as in it.
        self._entering: set[int] = set()
        # The balancer's moves, by VM id: (from host, to host, time.monotonic()).
        self._balanced: dict[int, tuple[int, int, float]] = {}
        # Per host: a snapshot the center takes after a migration is applied before or
        # after another migration to or from that host ends, never across its end (a
        # snapshot taken before would bring the moved VM back, or drop it).
        self._host_locks: dict[int, asyncio.Lock] = {}

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
        """A power action on the VM, as a task.

        Starting a stopped VM whose host placement refuses it (in maintenance mode, short
        of memory, running a VM that a rule keeps apart from it) first moves it, cold, to
        the host placement chooses in its cluster, where its provider can migrate; the
        task's message says so. ``InsufficientResources`` if no host of the cluster can
        take it."""
        vm, provider = await self._target(vm_id)
        needed = Capability.SUSPEND if action in SUSPEND_ACTIONS else Capability.POWER
        provider.require(needed, action.value)
        if action == PowerAction.START and vm.power_state == PowerState.STOPPED:
            elsewhere = await self._power_on_elsewhere(vm)
            if elsewhere is not None:
                return await self._start_elsewhere(vm, *elsewhere, user=user)

        async def work(progress: Progress) -> dict[str, Any]:
            progress.update(10, f"{action.value} on {vm.host_name}")
            record = await provider.power(vm.ext_id, action)
            return await self._record(vm.host_id, record)

        return self.tasks.submit(f"vm.{action.value}", vm.path, user, work)

    async def _power_on_elsewhere(self, vm: VmRow) -> tuple[HostRow, str] | None:
        """The host the stopped VM must move to before it is powered on, and why its own
        host cannot take it; None if its host can (or the VM cannot move: its provider
        cannot migrate, or its host is in no cluster)."""
        host = await asyncio.to_thread(self.inventory.host, vm.host_id)
        if vm.template or not _can_migrate(host):
            return None
        cluster_id = await asyncio.to_thread(drs.cluster_of, self.inventory, host.id)
        if cluster_id is None:
            return None
        loads = await self._loads(cluster_id, [vm.id])
        why = drs.refusal(loads, vm.id, host.id)
        if why is None:
            return None
        others = _migratable(loads, host)
        cannot = f"vm {vm.name!r} cannot power on on {host.name} ({why})"
        if not others:
            raise InsufficientResources(
                f"{cannot}, and its cluster has no other host to move it to"
            )
        try:
            target = drs.choose(loads, drs.demand(vm), others, loads.rules)
        except NoPlacement as exc:
            raise InsufficientResources(f"{cannot}, and {exc.message}") from None
        return loads.rows[target.host_id], why

    async def _start_elsewhere(
        self, vm: VmRow, destination: HostRow, why: str, *, user: str | None
    ) -> Task:
        """Move the stopped VM to ``destination`` (cold), then start it there."""
        plan = await self._migration(vm.id, destination.id, MigrationOptions(), force=False)
        reason = f"{vm.host_name}: {why}"

        async def work(progress: Progress) -> dict[str, Any]:
            moved = await self._migrate(plan, progress, lambda: None, user)
            progress.update(SENT + 5, f"moved {vm.name} to {destination.name} ({reason}), starting")
            provider = self.syncs.get(destination.id).provider()
            started = await self._record(
                destination.id, await provider.power(vm.ext_id, PowerAction.START)
            )
            progress.update(100, f"moved {vm.name} to {destination.name} ({reason}), then started")
            return {**started, "moved": {"from": vm.path, "to": moved["vm"]["path"], "reason": why}}

        return await self._submit_move(plan, "vm.start", work, user)

    async def create_vm(
        self,
        host_id: int,
        spec: CreateVm,
        *,
        template_id: int | None = None,
        user: str | None = None,
    ) -> Task:
        """A new VM on ``host_id``: from scratch, or from the template ``template_id``;
        ``InsufficientResources`` if the host is in maintenance mode."""
        host = await asyncio.to_thread(self.inventory.host, host_id)
        return await self._create(host, spec, template_id, user)

    async def create_vm_in_cluster(
        self,
        cluster_id: int,
        spec: CreateVm,
        *,
        template_id: int | None = None,
        user: str | None = None,
    ) -> Task:
        """A new VM on the host of the cluster ``cluster_id`` that placement chooses
        (``choose_host``), among those whose provider can create it, that hold the
        template ``template_id`` and the network ``spec.network`` where given.
        ``NoPlacement`` (409) saying why of each host if none may take it; the task's
        result says where it went (``placed``)."""
        cluster = await self._cluster(cluster_id)
        loads = await self._loads(cluster.id)
        candidates = await self._creators(loads, cluster.path, spec, template_id)
        new = VmDemand(vm_id=0, name=spec.name, memory_mib=spec.memory_mib, cpus=spec.cpus)
        chosen = drs.choose(loads, new, candidates)
        return await self._create(loads.rows[chosen.host_id], spec, template_id, user, cluster.path)

    async def _creators(
        self, loads: drs.Loads, cluster: str, spec: CreateVm, template_id: int | None
    ) -> set[int]:
        """The hosts of ``loads`` that may hold the new VM ``spec``, room aside."""
        candidates = set(loads.rows)
        if template_id is not None:
            template = await asyncio.to_thread(self.inventory.vm, template_id)
            if template.host_id not in loads.rows:
                raise InvalidArgument("template", f"{template.path} is not in {cluster}")
            candidates = {template.host_id}
        needed = Capability.TEMPLATES if template_id is not None else Capability.CREATE
        candidates = {i for i in candidates if _has(loads.rows[i], needed)}
        if spec.network is not None:
            networks = await asyncio.to_thread(self.inventory.networks)
            candidates &= {n.host_id for n in networks if n.name == spec.network}
            if not candidates:
                raise InvalidArgument("network", f"no host of {cluster} has {spec.network!r}")
        if not candidates:
            raise InsufficientResources(f"no host of cluster {cluster} can create VMs")
        return candidates

    async def _create(
        self,
        host: HostRow,
        spec: CreateVm,
        template_id: int | None,
        user: str | None,
        cluster: str | None = None,
    ) -> Task:
        """The new VM ``spec`` on ``host`` (chosen in ``cluster``, where given)."""
        self._check_takes_vms(host)
        provider = self.syncs.get(host.id).provider()
        if template_id is not None:
            template = await asyncio.to_thread(self.inventory.vm, template_id)
            if not template.template:
                raise InvalidArgument("template", f"{template.path} is not a template")
            if template.host_id != host.id:
                raise InvalidArgument("template", f"{template.path} is not on {host.path}")
            spec = CreateVm(**{**spec.__dict__, "template": template.ext_id})
        provider.require(Capability.TEMPLATES if spec.template else Capability.CREATE)
        where = host.name if cluster is None else f"{host.name} (chosen in {cluster})"

        async def work(progress: Progress) -> dict[str, Any]:
            progress.update(10, f"creating {spec.name} on {where}")
            created = await self._record(host.id, await provider.create(spec))
            if cluster is None:
                return created
            return {**created, "placed": {"cluster": cluster, "host": host.path}}

        return self.tasks.submit("vm.create", f"{host.path}/{spec.name}", user, work)

    def _check_takes_vms(self, host: HostRow) -> None:
        """``InsufficientResources`` if the host is in maintenance mode, or entering it."""
        if host.maintenance:
            raise InsufficientResources(f"host {host.path} is in maintenance mode")
        if host.id in self._entering:
            raise InsufficientResources(f"host {host.path} is entering maintenance mode")

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
        force: bool = False,
        user: str | None = None,
    ) -> Task:
        """Migrate the VM to the host ``host_id``: live if it runs, cold (its files moved)
        if it is stopped; as a task that may be cancelled until the VM has switched over
        (the VM then stays where it was, as it was). ``options.live`` is set here.

        Checked first, each refusal naming what is wrong: the VM runs or is stopped, the
        destination is another host, both are connected, of the same provider kind, both
        can migrate, the destination is not in maintenance mode (nor entering it), the
        options are in range; and unless ``force``, placement lets the destination take
        the VM: it breaks no rule of the VM's there, and has room for it if it runs
        (``InsufficientResources`` naming the rule or the room).

        A stopped VM going to a host of another provider kind is transferred instead
        (``thinvisor.center.transfer``), where both providers can ``TRANSFER``."""
        if await transfer.crosses_kinds(self, vm_id, host_id):
            moving = await transfer.plan(self, vm_id, host_id, options, force=force)
            return await transfer.submit(self, moving, user)
        plan = await self._migration(vm_id, host_id, options, force=force)
        return await self._submit_migration(plan, user)

    async def _submit_migration(self, plan: _Migration, user: str | None) -> Task:
        """The cancellable task ``vm.migrate`` that carries ``plan`` out."""
        task: Task | None = None

        async def work(progress: Progress) -> dict[str, Any]:
            def switched() -> None:
                if task is not None:
                    task.cancellable = False  # the VM is there now: nothing to undo

            return await self._migrate(plan, progress, switched, user)

        task = await self._submit_move(plan, "vm.migrate", work, user, cancellable=True)
        return task

    async def _submit_move(
        self,
        plan: _Migration,
        kind: str,
        work: Callable[[Progress], Awaitable[Any]],
        user: str | None,
        *,
        cancellable: bool = False,
    ) -> Task:
        """The task ``work`` that moves the VM of ``plan``, the VM held as moving."""
        vm = plan.vm
        await asyncio.to_thread(self.inventory.begin_move, vm.id, plan.destination.id)
        try:
            return self.tasks.submit(kind, vm.path, user, work, cancellable=cancellable)
        except BaseException:
            self.inventory.end_move(vm.id)
            raise

    async def _migration(
        self,
        vm_id: int,
        host_id: int,
        options: MigrationOptions,
        *,
        force: bool,
        live_only: bool = False,
    ) -> _Migration:
        """What a migration of the VM to ``host_id`` needs, once every check passed
        (``live_only``: a VM that does not run is refused)."""
        vm = await asyncio.to_thread(self.inventory.vm, vm_id)
        movable = {PowerState.RUNNING} if live_only else {PowerState.RUNNING, PowerState.STOPPED}
        if vm.template or vm.power_state not in movable:
            state = "a template" if vm.template else vm.power_state.value
            raise InvalidState(vm.name, state, "migrate")
        options = replace(options, live=vm.power_state == PowerState.RUNNING)
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
        self._check_takes_vms(destination)
        await self._check_options(destination, options)
        if not force:
            await self._check_placement(vm, destination, live=options.live)
        return _Migration(vm, source, destination, source_provider, target, options)

    async def _check_placement(self, vm: VmRow, destination: HostRow, *, live: bool) -> None:
        """``InsufficientResources`` if placement keeps the VM off ``destination``: a rule
        of the VM's, or (the VM running) too little room there."""
        cluster_id = await asyncio.to_thread(drs.cluster_of, self.inventory, destination.id)
        loads = await self._loads(cluster_id, [vm.id])
        why = drs.refusal(loads, vm.id, destination.id, room=live)
        if why is not None:
            raise InsufficientResources(
                f"vm {vm.name!r} cannot move to {destination.path}: {why} (force moves it anyway)"
            )

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
        progress: Progress,
        switched: Callable[[], None],
        user: str | None,
    ) -> dict[str, Any]:
        """The migration's work: the hosts move the VM, then the inventory follows."""
        vm, destination, options = plan.vm, plan.destination, plan.options
        try:
            progress.update(1, f"preparing {destination.name} to receive {vm.name}")
            spec = await plan.source_provider.migration_spec(vm.ext_id)
            ticket = await plan.target.prepare_incoming(spec, options)
            how = ticket.mode if options.live else f"cold, {ticket.mode}"
            moving = f"moving {vm.name} to {destination.name} ({how})"

            def report(percent: int, message: str) -> None:
                share = (SENT - PREPARED) * max(0, min(100, percent)) // 100
                progress.update(PREPARED + share, message or moving)

            report(0, moving)
            result = await plan.source_provider.migrate(vm.ext_id, ticket, options, report)
            switched()
            verb = "runs" if options.live else "is"
            progress.update(SENT, f"{vm.name} {verb} on {destination.name}")
            async with self._hosts_held(plan.source.id, destination.id):
                moved = await self._moved(vm.id, destination.id)
        finally:
            self.inventory.end_move(vm.id)
            await self._resync(plan.source.id, destination.id)
        if moved is None:
            moved = await asyncio.to_thread(self.inventory.vm_by_ext_id, destination.id, vm.ext_id)
        self._emit_migrated(plan, moved, result, user)
        return {**result, "live": options.live, "vm": vm_dict(moved), "source": vm.path}

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
                async with self._hosts_held(host_id):
                    await self.syncs.get(host_id).refresh()
            except (ThinvisorError, TimeoutError) as exc:
                log.info("host %s not refreshed after a migration: %s", host_id, exc)

    @contextlib.asynccontextmanager
    async def _hosts_held(self, *host_ids: int) -> AsyncIterator[None]:
        """The hosts' locks (``_host_locks``), taken in one order."""
        async with contextlib.AsyncExitStack() as stack:
            for host_id in sorted(set(host_ids)):
                await stack.enter_async_context(
                    self._host_locks.setdefault(host_id, asyncio.Lock())
                )
            yield

    def _emit_migrated(
        self, plan: _Migration, row: VmRow, result: dict[str, Any], user: str | None
    ) -> None:
        downtime = result.get("downtime_ms")
        live = plan.options.live
        said = f", downtime {downtime:.0f} ms" if live and isinstance(downtime, int | float) else ""
        how = result.get("mode", "live") if live else f"cold, {result.get('mode', 'files')}"
        self.events.emit(
            "vm.migrated",
            f"vm {plan.vm.name} moved from {plan.source.name} to {plan.destination.name}"
            f" ({how}{said})",
            object=f"host/{plan.destination.name}/vm/{row.name}",
            user=user,
            data={"from": plan.vm.path, "to": row.path, "vm_id": row.id, **result, "live": live},
        )

    # --- maintenance mode ----------------------------------------------------------

    async def set_maintenance(
        self, host_id: int, on: bool, *, wait: bool = False, user: str | None = None
    ) -> Task:
        """Put the host in maintenance mode (``on``) or take it out of it, as a task
        (kind ``host.maintenance``) whose result says what moved where.

        Entering first moves the host's running VMs away, live, to the other hosts of its
        cluster as placement spreads them (``evacuation_plan``), two at a time; its
        stopped VMs stay registered where they are. Meanwhile no VM is placed, created or
        migrated there. VMs that cannot move (no host has room, a rule, a provider that
        cannot migrate, paused, a host in no cluster) are refused at once, each named
        with why (``InsufficientResources``, nothing moved); with ``wait``, the task tries
        again every ``EVACUATION_RETRY_S`` until they can move or have been stopped,
        saying which wait in its message. Cancelling it stops the evacuation (what moved
        stays moved, a migration under way is cancelled) and the host stays out of
        maintenance mode."""
        host = await asyncio.to_thread(self.inventory.host, host_id)
        self.syncs.get(host_id).provider().require(Capability.MAINTENANCE)
        if host_id in self._entering:
            raise Busy(f"host {host.path} is already entering maintenance mode")
        if not on:

            async def leave(progress: Progress) -> dict[str, Any]:
                return await self._switch_maintenance(host, False, [], progress, user)

            return self.tasks.submit("host.maintenance", host.path, user, leave)
        if not wait:
            stuck = (await self._evacuation(host)).stuck
            if stuck:
                raise InsufficientResources(_cannot_enter(host, stuck))

        async def enter(progress: Progress) -> dict[str, Any]:
            try:
                moved = await self._evacuate(host, wait, progress, user)
                return await self._switch_maintenance(host, True, moved, progress, user)
            finally:
                self._entering.discard(host.id)

        self._entering.add(host_id)
        try:
            return self.tasks.submit("host.maintenance", host.path, user, enter, cancellable=True)
        except BaseException:
            self._entering.discard(host_id)
            raise

    async def _switch_maintenance(
        self,
        host: HostRow,
        on: bool,
        moved: list[dict[str, Any]],
        progress: Progress,
        user: str | None,
    ) -> dict[str, Any]:
        """The host's provider puts it in maintenance mode or takes it out; the inventory
        shows it at once (as the host's own event would)."""
        verb = "entering" if on else "leaving"
        progress.update(95 if on else 10, f"{verb} maintenance mode on {host.name}")
        record = await self.syncs.get(host.id).provider().set_maintenance(on)
        await asyncio.to_thread(self.inventory.set_host_connected, host.id, record)
        stayed = await asyncio.to_thread(self.inventory.vms, host.id, False)
        said = f"{host.name} is {'in' if on else 'out of'} maintenance mode"
        if on:
            said += f" ({len(moved)} VMs moved, {len(stayed)} stay)"
        progress.update(100, said)
        self.events.emit(
            "host.maintenance",
            f"host {said}",
            object=f"host/{host.name}",
            user=user,
            data={"maintenance": on, "moved": moved},
        )
        return {
            "host": host.path,
            "maintenance": on,
            "moved": moved,
            "stayed": [vm.path for vm in stayed],
        }

    async def _evacuate(
        self, host: HostRow, wait: bool, progress: Progress, user: str | None
    ) -> list[dict[str, Any]]:
        """Move the host's powered-on VMs away; what moved where. Without ``wait``,
        ``InsufficientResources`` naming the VMs that cannot move; with it, they are tried
        again every ``EVACUATION_RETRY_S`` until none is left to move."""
        moved: list[dict[str, Any]] = []
        while True:
            evacuation = await self._evacuation(host)
            if not evacuation.moves and not evacuation.stuck:
                return moved
            if evacuation.stuck and not wait:
                raise InsufficientResources(_cannot_enter(host, evacuation.stuck))
            total = len(moved) + len(evacuation.moves) + len(evacuation.stuck)
            done, failed = await self._send_away(host, evacuation.moves, progress, user, total)
            moved += done
            if failed and not wait:
                raise InsufficientResources(_cannot_enter(host, failed))
            if not done:
                waiting = ", ".join(f"{name} ({why})" for name, why in evacuation.stuck + failed)
                progress.update(
                    _share(len(moved), total),
                    f"cannot move yet, trying again in {EVACUATION_RETRY_S:g} s: {waiting}",
                )
                await asyncio.sleep(EVACUATION_RETRY_S)

    async def _evacuation(self, host: HostRow) -> _Evacuation:
        """Where each powered-on VM of the host would go now, and which cannot go."""
        cluster_id = await asyncio.to_thread(drs.cluster_of, self.inventory, host.id)
        loads = await self._loads(cluster_id)
        targets = _migratable(loads, host)
        stuck: list[tuple[str, str]] = []
        movable: list[int] = []
        for vm in loads.on(host.id):
            why = _immovable(vm, host, cluster_id, targets)
            if why is None:
                movable.append(vm.id)
            else:
                stuck.append((vm.name, why))
        plan = drs.evacuation(loads, host.id, movable, targets)
        moves = [(loads.vms[m.vm.vm_id], loads.rows[m.host.host_id]) for m in plan.moves]
        stuck += [(s.vm.name, drs.stuck_reason(s)) for s in plan.stuck]
        return _Evacuation(moves, stuck)

    async def _send_away(
        self,
        host: HostRow,
        moves: list[tuple[VmRow, HostRow]],
        progress: Progress,
        user: str | None,
        total: int,
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Migrate each VM where ``moves`` says, ``EVACUATION_PARALLEL`` at a time: what
        moved where, and the VMs that did not move, with why."""
        limit = asyncio.Semaphore(EVACUATION_PARALLEL)
        done: list[dict[str, Any]] = []
        failed: list[tuple[str, str]] = []

        async def send(vm: VmRow, target: HostRow) -> None:
            async with limit:
                progress.update(_share(len(done), total), f"moving {vm.name} to {target.name}")
                task, error = await self._move(vm, target, user)
            if error is not None:
                failed.append((vm.name, error))
                return
            move = {"vm": vm.name, "vm_id": vm.id, "from": host.path, "to": target.path}
            done.append(move | {"task": task.id if task else None})

        await asyncio.gather(*(send(vm, target) for vm, target in moves))
        return done, failed

    async def _move(
        self, vm: VmRow, target: HostRow, user: str | None
    ) -> tuple[Task | None, str | None]:
        """Live-migrate the VM to ``target`` as its own task, and wait for it: the task,
        and the error that stopped the VM moving (None: it moved). Cancelled meanwhile,
        it cancels the migration too."""
        try:
            options = MigrationOptions()
            plan = await self._migration(vm.id, target.id, options, force=False, live_only=True)
            task = await self._submit_migration(plan, user)
        except ThinvisorError as exc:
            return None, str(exc)
        try:
            finished = await self.tasks.wait(task.id)
        except asyncio.CancelledError:
            with contextlib.suppress(ThinvisorError):
                self.tasks.cancel(task.id)
            raise
        return finished, None if finished.error is None else finished.error["message"]

    # --- balancing -----------------------------------------------------------------

    async def balance_cluster(self, cluster_id: int, *, user: str | None = None) -> Task:
        """``balance_once`` on the cluster, as a task (kind ``cluster.balance``) whose
        result lists the moves."""
        cluster = await self._cluster(cluster_id)

        async def work(progress: Progress) -> dict[str, Any]:
            progress.update(5, f"balancing {cluster.name}")
            moves = await self.balance_once(cluster.id, user=user)
            made = sum(1 for move in moves if move["error"] is None)
            progress.update(100, f"{made} of {len(moves)} moves made in {cluster.name}")
            return {"cluster": cluster.path, "moves": moves}

        return self.tasks.submit("cluster.balance", cluster.path, user, work)

    async def balance_once(
        self,
        cluster_id: int,
        *,
        max_moves: int = BALANCE_MOVES,
        threshold: float = BALANCE_THRESHOLD,
        user: str | None = None,
    ) -> list[dict[str, Any]]:
        """One pass of the balancer over a cluster: the moves ``placement.balance``
        proposes (repairs of broken anti-affinity rules first, then the moves that even
        out memory use while it differs by more than ``threshold``), made one after the
        other as live migrations. Each move tried, with the error that stopped it (None:
        made). A VM it moved is not moved again to balance for ``BALANCE_GUARD_S``, nor
        sent back meanwhile (this history is kept in memory)."""
        cluster = await self._cluster(cluster_id)
        loads = await self._loads(cluster.id)
        now = time.monotonic()
        self._balanced = drs.recent_moves(self._balanced, now, BALANCE_GUARD_S)
        proposed = drs.balance_moves(
            loads,
            {i for i, row in loads.rows.items() if _can_migrate(row)},
            recent=self._balanced,
            now=now,
            guard_s=BALANCE_GUARD_S,
            threshold=threshold,
            max_moves=max_moves,
        )
        return [await self._balance(loads, move, user) for move in proposed]

    async def _balance(
        self, loads: drs.Loads, move: BalanceMove, user: str | None
    ) -> dict[str, Any]:
        vm, target = loads.vms[move.vm.vm_id], loads.rows[move.target.host_id]
        task, error = await self._move(vm, target, user)
        if error is None:
            self._balanced[vm.id] = (move.source.host_id, target.id, time.monotonic())
        return {
            "vm": vm.name,
            "vm_id": vm.id,
            "from": loads.rows[move.source.host_id].path,
            "to": target.path,
            "reason": move.reason,
            "task": task.id if task else None,
            "error": error,
        }

    # --- placement's view ----------------------------------------------------------

    async def _loads(self, cluster_id: int | None, vm_ids: Iterable[int] = ()) -> drs.Loads:
        """The cluster's hosts and every VM as placement sees them now."""
        entering = frozenset(self._entering)
        return await asyncio.to_thread(
            drs.cluster_loads,
            self.inventory,
            self.rules,
            cluster_id,
            vm_ids=list(vm_ids),
            entering=entering,
        )

    async def _cluster(self, cluster_id: int) -> Node:
        """The cluster ``cluster_id``: ``NotFound`` if there is none, ``InvalidArgument``
        naming ``cluster`` if that is no cluster."""
        node = await asyncio.to_thread(self.inventory.get, cluster_id)
        if node.kind != NodeKind.CLUSTER:
            raise InvalidArgument("cluster", f"{node.kind} {node.path} is not a cluster")
        return node

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
    options: MigrationOptions
    """As asked, ``live`` as the VM's state says."""


@dataclass(frozen=True)
class _Evacuation:
    """Where each powered-on VM of a host entering maintenance mode goes, and the VMs
    that cannot go, by name, with why."""

    moves: list[tuple[VmRow, HostRow]]
    stuck: list[tuple[str, str]]


def _has(host: HostRow, capability: Capability) -> bool:
    """Whether the host's kind of provider has ``capability``."""
    return capability in provider_class(host.provider).capabilities


def _can_migrate(host: HostRow) -> bool:
    return _has(host, Capability.MIGRATE)


def _migratable(loads: drs.Loads, source: HostRow) -> set[int]:
    """The other hosts of ``loads`` that a VM of ``source`` may migrate to, room and rules
    aside: of its provider kind, one that can migrate."""
    if not _can_migrate(source):
        return set()
    return {i for i, row in loads.rows.items() if row.provider == source.provider} - {source.id}


def _immovable(
    vm: VmRow, host: HostRow, cluster_id: int | None, targets: Collection[int]
) -> str | None:
    """Why the powered-on VM cannot leave the host whatever placement says; None if it
    may."""
    if not _can_migrate(host):
        return f"the {host.provider} provider cannot migrate VMs"
    if vm.power_state != PowerState.RUNNING:
        return f"{vm.power_state.value}: only a running VM moves live"
    if cluster_id is None:
        return "its host is in no cluster"
    if not targets:
        return f"no other {host.provider} host in its cluster"
    return None


def _cannot_enter(host: HostRow, stuck: Iterable[tuple[str, str]]) -> str:
    """One line: the VMs that keep the host from entering maintenance mode, and why."""
    vms = ", ".join(f"{name} ({why})" for name, why in stuck)
    return f"cannot enter maintenance mode on {host.path}: {vms}"


def _share(done: int, total: int) -> int:
    """An evacuation's progress: its moves take it from 1 to 90 percent."""
    return 1 + 89 * done // max(1, total)


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
