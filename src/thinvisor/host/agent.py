"""The host agent: what ``thinvisor host serve`` runs, the role hostd played on ESX 3i.

It owns the service, the event log, the tasks and the users; it starts the autostart
VMs, and it watches running VMs so that a guest that powers itself off or a QEMU that
dies becomes an event. It keeps the host's HA side running (``thinvisor.host.ha``: the
datastore heartbeats, the watchdog) and its maintenance mode. VMs are separate
processes: the agent stopping or restarting touches none of them, and a new agent finds
them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from thinvisor.auth import User, UserStore
from thinvisor.auth.gate import PasswordGate
from thinvisor.config import HostConfig
from thinvisor.errors import ThinvisorError
from thinvisor.host import memory, ovf_io, snapshots
from thinvisor.host.engine import process
from thinvisor.host.events import EventLog
from thinvisor.host.ha import HighAvailability
from thinvisor.host.maintenance import Maintenance
from thinvisor.host.migration import MigrationService
from thinvisor.host.service import HostService
from thinvisor.host.stats import StatsSampler
from thinvisor.host.tasks import TaskManager
from thinvisor.model.vm import VmSpec

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
SUPERVISE_EVERY = 5  # watch rounds between checks that every NAT switch's dnsmasq runs


class HostAgent:
    def __init__(self, config: HostConfig, *, service: HostService | None = None):
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.events = EventLog(config.state_dir / "events.jsonl")
        self.service = service or HostService(config, events=self.events)
        self.service.events = self.events
        self.tasks = TaskManager(self.events)
        self.gate = PasswordGate(UserStore(config.state_dir / "users.json"), self.events)
        self.stats = StatsSampler(
            self.service.inventory, config.state_dir / "stats", interval_s=config.stats.interval_s
        )
        self._background: list[asyncio.Task[object]] = []
        self._running: dict[str, bool] = {}
        self._ksm_before: memory.KsmSettings | None = None
        self.tls_fingerprint: str | None = None  # set by the server once TLS is set up
        # Live migration: the server binds the migration port and sets these.
        self.migration: MigrationService | None = None
        self.migration_listener: tuple[socket.socket, Path, Path] | None = None
        self.maintenance = Maintenance(self.service, self.events)
        self.ha = HighAvailability(self.service, self.events)

    @property
    def users(self) -> UserStore:
        """The users every edge checks passwords and tokens against (the gate's)."""
        return self.gate.users

    @users.setter
    def users(self, store: UserStore) -> None:
        self.gate.users = store

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    async def authenticate(self, name: str, password: str) -> User | None:
        return await self.gate.authenticate(name, password)

    async def check_password(self, address: str, name: str, password: str, via: str) -> User:
        """A user by password, for any edge (REST, CIM): failed logins from one address
        are slowed down, and each is refused and recorded."""
        return await self.gate.check_password(address, name, password, via)

    async def start(self, *, autostart: bool = True) -> None:
        """Reattach to what runs, begin watching, and start the autostart VMs."""
        vms = await self.service.list_vms()
        running = [v.name for v in vms if v.state in ("running", "paused")]
        self._running = {v.name: v.state in ("running", "paused") for v in vms}
        self.events.emit(
            "agent.started",
            f"host agent started; {len(running)} of {len(vms)} VMs running",
            data={"running": running},
        )
        try:
            await self.service.network.reconcile()
        except ThinvisorError as exc:
            self.events.emit("network.reconcile_failed", f"network reconciliation failed: {exc}")
        # What a crash interrupted is settled before anyone asks: OVA imports and
        # exports half done, snapshot operations.
        roots = [d.path for d in self.config.all_datastores()]
        await asyncio.to_thread(ovf_io.sweep_imports, roots)
        for name in await snapshots.repair_all(self.service):
            self.events.emit(
                "vm.snapshot_repair_failed", "snapshot repair failed", object=f"vm/{name}"
            )
        await self._take_memory_and_cgroups()
        if self.migration is not None and self.migration_listener is not None:
            await self.migration.start(*self.migration_listener)
        self._background.append(asyncio.create_task(self.ha.writer.run(), name="heartbeats"))
        self._background.append(asyncio.create_task(self.ha.watch(), name="ha-watchdog"))
        self._background.append(asyncio.create_task(self._watch(), name="vm-watcher"))
        self._background.append(asyncio.create_task(self._rebalance(), name="balloons"))
        self._background.append(asyncio.create_task(self.stats.run(), name="stats-sampler"))
        if autostart:
            self._background.append(asyncio.create_task(self.autostart(), name="autostart"))

    async def stop(self) -> None:
        """Stop the agent; the VMs keep running."""
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
        if self.migration is not None:
            await self.migration.close()
        await self.stats.close()
        if self._ksm_before is not None:
            await asyncio.to_thread(memory.restore_ksm, self._ksm_before)
            self._ksm_before = None
        await self.tasks.close()
        self.events.emit("agent.stopped", "host agent stopped; VMs keep running")

    async def autostart(self) -> list[str]:
        """Start the autostart VMs in their order, ``autostart_delay_s`` apart (none
        in maintenance mode, as on ESXi)."""
        started: list[str] = []
        if self.maintenance.active:
            log.info("in maintenance mode: no VM is started automatically")
            return started
        for name in self.autostart_order():
            vm = await self.service.get_vm(name)
            if vm.state not in ("stopped", "suspended"):
                continue
            if started and self.config.autostart_delay_s:
                await asyncio.sleep(self.config.autostart_delay_s)
            try:
                await self.service.start(name)
                started.append(name)
            except ThinvisorError as exc:
                self.events.emit(
                    "vm.autostart_failed", f"autostart failed: {exc}", object=f"vm/{name}"
                )
        return started

    def autostart_order(self) -> list[str]:
        entries = [
            e
            for e in self.service.inventory.entries()
            if e.spec and e.spec.autostart and not e.spec.template
        ]
        entries.sort(key=lambda e: (e.spec.autostart_order if e.spec else 0, e.name))
        return [e.name for e in entries]

    async def shutdown_autostart_vms(self, timeout: float | None = None) -> list[str]:
        """Shut the autostart VMs down in reverse order (as ESXi's host shutdown)."""
        stopped: list[str] = []
        for name in reversed(self.autostart_order()):
            vm = await self.service.get_vm(name)
            if vm.state == "running":
                await self.service.shutdown(name, timeout)
                stopped.append(name)
            elif vm.state == "paused":
                await self.service.stop(name)
                stopped.append(name)
        return stopped

    async def _take_memory_and_cgroups(self) -> None:
        """KSM on as configured; the cgroups of VMs that no longer run removed."""
        self._ksm_before = await asyncio.to_thread(memory.start_ksm, self.config.memory)
        running = [
            e.spec.uuid
            for e in self.service.inventory.entries()
            if e.spec is not None and process.running_pid(e.paths) is not None
        ]
        try:
            removed = await asyncio.to_thread(self.service.controls.sweep, running)
        except ThinvisorError as exc:
            log.warning("cannot remove stale cgroups: %s", exc)
        else:
            if removed:
                log.info("removed the cgroups of %d VMs no longer running", len(removed))

    async def _rebalance(self) -> None:
        """Balloon targets by shares, every ``rebalance_interval_s`` (host memory pressure)."""
        while True:
            await asyncio.sleep(self.config.memory.rebalance_interval_s)
            try:
                await memory.rebalance(self.service.inventory, self.config.memory)
            except Exception:
                log.exception("balloon rebalancing failed")

    async def _watch(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            rounds += 1
            try:
                for spec in self._check_vms():
                    await self.service.vm_gone(spec)
                # Another host took a VM over that still runs here: it must not run twice.
                await self.ha.fence_foreign(self._running)
                if rounds % SUPERVISE_EVERY == 0:
                    await self.service.network.supervise()
            except Exception:
                log.exception("watching VMs failed")

    def _check_vms(self) -> list[VmSpec]:
        """Turn VMs that stopped on their own (guest poweroff, QEMU death) into events;
        the specs of the VMs that stopped since the last look."""
        seen: dict[str, bool] = {}
        stopped: list[VmSpec] = []
        # Only pidfiles each round: a vm.toml is read for the few VMs that stopped.
        for name, paths in self.service.inventory.registered():
            alive = process.running_pid(paths) is not None
            seen[name] = alive
            if alive or not self._running.get(name):
                continue
            entry = self.service.inventory.find(name)
            if entry is not None and entry.spec is not None:
                stopped.append(entry.spec)
            if process.read_stop_record(paths) is not None:
                continue  # thinvisor stopped it, and said so when it did
            reason = process.exit_reason(paths) or "QEMU exited"
            kind = "vm.crashed" if "abruptly" in reason else "vm.powered_off"
            self.events.emit(kind, reason, object=f"vm/{name}")
        self._running = seen
        return stopped
