"""High availability, the center's side (the role vSphere HA plays): when a host of a
cluster with HA dies, its VMs are restarted on the cluster's other hosts from their
shared datastores, in priority order, and no VM ever runs twice.

``HaMonitor`` runs in the center (``CenterAgent`` starts and stops it). Every
``[ha] check_interval_s`` (1 s), for each cluster with HA on (``Inventory.cluster_ha``):

- Every connected host whose provider has ``Capability.HA`` gets the center's heartbeat,
  each from a task of its own, so that a host that hangs holds up no other. A host that
  hears it arms its watchdog: once cut off from the center *and* from its datastores for
  longer than the cluster's timeout, it powers its VMs off (it fences itself).
- A host not heard for longer than the timeout (disconnected, or its heartbeat not
  answered) is judged by its datastore heartbeat, as a host that answers and shares a
  datastore with it reads it there:

  - written lately (within ``WRITING_S``): it is alive and cut off from the center only
    (*isolated*). Nothing is restarted: its VMs run on there.
  - older than the timeout (or no file at all once it has been silent for twice the
    timeout): it is dead or has fenced itself (*failed*). Each of its VMs that was
    running, whose priority is not ``disabled`` and whose datastores another host of the
    cluster that answers has too, is restarted on one of those (``Provider.recover``),
    ``high`` before ``medium`` before ``low``, then by name; placement chooses the host
    (``placement.choose_host``, the cluster's rules kept, each restart counted before
    the next). A VM that cannot be restarted is tried again the next round.
  - in between: it stopped writing lately; the next rounds tell.

- Never twice: a VM restarted for one failure is never restarted again for it, whatever
  the inventory says meanwhile, and the recovering host takes the VM's directory over in
  one step (its old host kills a QEMU whose directory another host owns). A host heard
  again starts afresh: the VMs taken from it are no longer its, and its sync shows that.

Each of ``ha.host_failed``, ``ha.host_isolated`` and ``ha.restart_failed`` is said once
per failure; ``ha.vm_restarted`` once per VM restarted; ``ha.host_fenced`` when a host
says it powered its VMs off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, ParamSpec, TypeVar

from thinvisor.center.config import HaConfig
from thinvisor.center.inventory import ClusterHa, HostRow, Inventory, VmRow, path_segment
from thinvisor.center.models import HaPriority, utcnow
from thinvisor.center.placement import HostLoad, NoPlacement, Rule, VmDemand, choose_host
from thinvisor.center.rules import Rules
from thinvisor.center.sync import SyncManager, within
from thinvisor.errors import Disconnected, InvalidArgument, NotFound, ThinvisorError
from thinvisor.host.events import EventLog
from thinvisor.providers import provider_class
from thinvisor.providers.base import Capability, HeartbeatRecord, PowerState, Provider, VmRecord

log = logging.getLogger(__name__)

Clock = Callable[[], float]
P = ParamSpec("P")
T = TypeVar("T")

#: A heartbeat file younger than this is still being written (hosts write every second).
WRITING_S = 5.0
#: How long reading a datastore's heartbeats through one host may take.
READ_TIMEOUT_S = 15.0
#: How long a host may take to take a VM over and start it.
RECOVER_TIMEOUT_S = 120.0
#: The restarts each cluster's status keeps, the newest last.
RESTARTS_KEPT = 100
#: The order VMs are restarted in: the lower first.
PRIORITY_RANK = {HaPriority.HIGH: 0, HaPriority.MEDIUM: 1, HaPriority.LOW: 2}


class HostHaState(StrEnum):
    """How the monitor sees one host of a cluster with HA."""

    HEARD = "heard"
    """Connected, and it answers the center's heartbeat."""
    CONNECTED = "connected"
    """Connected, but its heartbeat is not answered (yet)."""
    UNHEARD = "unheard"
    """Not heard, for less than the timeout or without a verdict yet."""
    ISOLATED = "isolated"
    """Not heard, but it still writes its datastore heartbeat: its VMs run on there."""
    FAILED = "failed"
    """Dead or fenced: its VMs are restarted elsewhere."""
    UNSUPPORTED = "unsupported"
    """Its provider has no HA: it is not protected."""


@dataclass(frozen=True)
class Restart:
    """A VM restarted on another host after its host failed."""

    cluster_id: int
    vm_id: int
    vm: str
    source: str
    """The failed host's name."""
    target: str
    """The name of the host it runs on now."""
    path: str
    """Its path now."""
    priority: HaPriority
    time: datetime


@dataclass(frozen=True)
class HostStatus:
    """One host as the monitor sees it now."""

    host_id: int
    state: HostHaState
    heard: bool
    silent_s: float | None
    """How long it has not been heard (None: it is)."""
    error: str | None
    """Why its last heartbeat failed, or why a restart of its VMs did."""


@dataclass
class _Watch:
    """What the monitor knows of one host, and of its current failure."""

    host_id: int
    heard_at: float
    heard: bool = False
    connected: bool = False
    """Whether its sync had a provider in the last round."""
    beat_failed: bool = False
    state: HostHaState = HostHaState.UNHEARD
    error: str | None = None
    beat: asyncio.Task[None] | None = None
    judging: asyncio.Task[None] | None = None
    # The current failure: said once, and its VMs restarted once.
    isolated_said: bool = False
    failed_said: bool = False
    restarted: set[int] = field(default_factory=set)
    unrestarted_said: set[int] = field(default_factory=set)

    def tasks(self) -> list[asyncio.Task[None]]:
        return [t for t in (self.beat, self.judging) if t is not None]

    def forget_failure(self) -> None:
        self.isolated_said = self.failed_said = False
        self.restarted.clear()
        self.unrestarted_said.clear()


@dataclass(frozen=True)
class _Cluster:
    """A cluster with HA as one judgement reads it from the inventory."""

    settings: ClusterHa
    hosts: dict[int, HostRow]
    vms: list[VmRow]
    datastores: dict[int, frozenset[str]]
    """The names of each host's datastores."""

    def vms_of(self, host_id: int) -> list[VmRow]:
        return [vm for vm in self.vms if vm.host_id == host_id]


@dataclass(frozen=True)
class _Verdict:
    state: HostHaState
    why: str


def runs(vm: VmRow) -> bool:
    """Whether the VM was running when its host was last heard."""
    if vm.template:
        return False
    last = vm.last_power_state if vm.power_state == PowerState.UNKNOWN else vm.power_state
    return last == PowerState.RUNNING


def protected(vms: Iterable[VmRow]) -> list[VmRow]:
    """The VMs to restart when their host fails, in the order to restart them: those
    that were running and whose priority is not ``disabled``, ``high`` first, by name."""
    chosen = [vm for vm in vms if runs(vm) and vm.ha_priority != HaPriority.DISABLED]
    return sorted(chosen, key=lambda vm: (PRIORITY_RANK[vm.ha_priority], vm.name, vm.id))


def has_ha(provider: str) -> bool:
    """Whether hosts of the provider kind ``provider`` can be protected."""
    try:
        return Capability.HA in provider_class(provider).capabilities
    except (InvalidArgument, ImportError):
        return False


def host_load(host: HostRow, cluster_id: int, vms: Iterable[VmRow]) -> HostLoad:
    """``host`` as placement sees it: the memory of its running and paused VMs used."""
    active = (PowerState.RUNNING, PowerState.PAUSED)
    used = sum(vm.memory_mib for vm in vms if vm.power_state in active and not vm.template)
    return HostLoad(
        host_id=host.id,
        name=host.name,
        cluster_id=cluster_id,
        connected=True,
        maintenance=host.maintenance,
        cpus=max(0, host.cpus or 0),
        core_mhz=0,
        memory_mib=max(0, host.memory_mib or 0),
        used_memory_mib=used,
        cpu_load=0.0,
    )


def demand(vm: VmRow) -> VmDemand:
    return VmDemand(vm.id, vm.name, max(1, vm.memory_mib), max(1, vm.cpus), host_id=vm.host_id)


class HaMonitor:
    """Heartbeats the hosts of every cluster with HA, and restarts the VMs of those that
    fail (see the module). ``start()`` in the center's event loop; ``stop()``."""

    def __init__(
        self,
        inventory: Inventory,
        syncs: SyncManager,
        events: EventLog,
        rules: Rules,
        config: HaConfig,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.inventory = inventory
        self.syncs = syncs
        self.events = events
        self.rules = rules
        self.config = config
        self.clock = clock
        self._watches: dict[int, _Watch] = {}
        self._restarts: dict[int, deque[Restart]] = {}
        # One judgement restarts at a time: each one's placement counts the last one's.
        self._restarting = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # Database work in worker threads, which a cancel does not stop: ``stop`` waits.
        self._threads: set[asyncio.Future[Any]] = set()

    # --- running ----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="ha monitor")

    async def stop(self) -> None:
        tasks = [t for w in self._watches.values() for t in w.tasks()]
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*self._threads, return_exceptions=True)
        self._watches.clear()

    async def run(self) -> None:
        """A round every ``check_interval_s``, until cancelled."""
        while True:
            try:
                await self.check()
            except Exception:  # the next round may do better: never stop watching
                log.exception("the HA monitor's round failed")
            await asyncio.sleep(self.config.check_interval_s)

    async def check(self) -> None:
        """One round: heartbeat the hosts of every cluster with HA, judge the silent ones
        (in tasks of their own: this returns at once)."""
        clusters, hosts = await self._in_thread(self._read)
        watched: set[int] = set()
        for cluster in clusters:
            for host in hosts.get(cluster.cluster_id, []):
                watched.add(host.id)
                self._round(cluster, host)
        for host_id in set(self._watches) - watched:  # HA off, or the host moved or gone
            for task in self._watches.pop(host_id).tasks():
                task.cancel()

    def _read(self) -> tuple[list[ClusterHa], dict[int, list[HostRow]]]:
        """The clusters with HA on, and their hosts by cluster id (blocking)."""
        clusters = self.inventory.ha_clusters(enabled=True)
        if not clusters:
            return [], {}
        ids = {c.cluster_id for c in clusters}
        hosts: dict[int, list[HostRow]] = {}
        for host in self.inventory.hosts():
            if host.parent_id in ids:
                hosts.setdefault(host.parent_id, []).append(host)
        return clusters, hosts

    def _round(self, cluster: ClusterHa, host: HostRow) -> None:
        watch = self._watches.get(host.id)
        if watch is None:  # newly watched: silent from now on at the earliest
            watch = self._watches[host.id] = _Watch(host.id, heard_at=self.clock())
        if not has_ha(host.provider):
            watch.state = HostHaState.UNSUPPORTED
            return
        provider = self._provider(host.id)
        if provider is not None and not watch.connected:
            watch.beat_failed = False  # connected again: what its heartbeat says now counts
        watch.connected = provider is not None
        if provider is not None and (watch.beat is None or watch.beat.done()):
            beat = self._heartbeat(cluster, host, watch, provider)
            watch.beat = asyncio.create_task(beat, name=f"ha heartbeat {host.name}")
        if provider is None:
            watch.heard = False
            watch.error = self._away(host.id)
        if watch.heard:
            return
        silent = self.clock() - watch.heard_at
        if provider is not None and not watch.beat_failed:
            watch.state = HostHaState.CONNECTED  # connected again: its heartbeat tells
        elif silent <= cluster.timeout_s:
            watch.state = HostHaState.UNHEARD
        elif watch.judging is None or watch.judging.done():
            judging = self._judge(cluster.cluster_id, host.id, watch)
            watch.judging = asyncio.create_task(judging, name=f"ha judging {host.name}")

    def _away(self, host_id: int) -> str:
        """Why the center has no connection to the host."""
        try:
            return f"disconnected: {self.syncs.get(host_id).error or 'not connected yet'}"
        except Disconnected as exc:
            return str(exc)

    async def _in_thread(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn`` in a worker thread, which ``stop`` waits for even when the caller is
        cancelled (so that the database is not closed under it)."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        self._threads.add(future)
        future.add_done_callback(self._thread_done)
        return await asyncio.shield(future)

    def _thread_done(self, future: asyncio.Future[Any]) -> None:
        self._threads.discard(future)
        if not future.cancelled():
            future.exception()  # retrieved: its caller may have been cancelled meanwhile

    def _provider(self, host_id: int) -> Provider | None:
        """The host's connected provider; None while its sync has none."""
        try:
            return self.syncs.get(host_id).provider()
        except Disconnected:
            return None

    # --- heartbeats -------------------------------------------------------------------

    async def _heartbeat(
        self, cluster: ClusterHa, host: HostRow, watch: _Watch, provider: Provider
    ) -> None:
        try:
            call = provider.ha_heartbeat(cluster.timeout_s)
            fenced = await within(self.config.heartbeat_timeout_s, call)
        except (ThinvisorError, TimeoutError, OSError) as exc:
            watch.heard, watch.beat_failed = False, True
            watch.error = f"heartbeat: {_reason(exc)}"
            return
        if watch.state in (HostHaState.ISOLATED, HostHaState.FAILED):
            log.warning("host %s is heard again (it was %s)", host.name, watch.state)
        watch.heard_at = self.clock()
        watch.heard, watch.beat_failed, watch.error = True, False, None
        watch.state = HostHaState.HEARD
        watch.forget_failure()
        if fenced:
            self._emit(
                "ha.host_fenced",
                f"{host.name} powered its VMs off: it had lost the center and its datastores",
                host,
            )

    # --- judging a silent host ----------------------------------------------------------

    async def _judge(self, cluster_id: int, host_id: int, watch: _Watch) -> None:
        async with self._restarting:
            if watch.heard:
                return
            try:
                cluster = await self._in_thread(self._cluster, cluster_id)
            except ThinvisorError as exc:  # the cluster or the host went meanwhile
                log.info("ha: cluster %s not judged: %s", cluster_id, exc)
                return
            host = cluster.hosts.get(host_id)
            if host is None:
                return
            live = self._live(cluster, host_id)
            silent = self.clock() - watch.heard_at
            verdict = await self._verdict(cluster, host, live, silent)
            if watch.heard:
                return  # it answered meanwhile: the verdict is stale
            watch.state = verdict.state
            if verdict.state == HostHaState.ISOLATED and not watch.isolated_said:
                watch.isolated_said = True
                self._emit("ha.host_isolated", verdict.why, host)
            elif verdict.state == HostHaState.FAILED:
                await self._failed(cluster, host, watch, live, verdict)

    def _cluster(self, cluster_id: int) -> _Cluster:
        """The cluster's settings, hosts, their VMs and datastores (blocking)."""
        settings = self.inventory.cluster_ha(cluster_id)
        hosts = {h.id: h for h in self.inventory.hosts() if h.parent_id == cluster_id}
        vms = [vm for host_id in hosts for vm in self.inventory.vms(host_id)]
        datastores: dict[int, set[str]] = {host_id: set() for host_id in hosts}
        for ds in self.inventory.datastores():
            if ds.host_id in datastores:
                datastores[ds.host_id].add(ds.name)
        stores = {host_id: frozenset(names) for host_id, names in datastores.items()}
        return _Cluster(settings, hosts, vms, stores)

    def _live(self, cluster: _Cluster, failed: int) -> list[HostRow]:
        """The cluster's other hosts that are heard and can take VMs over, by name."""
        found = []
        for host in cluster.hosts.values():
            watch = self._watches.get(host.id)
            heard = watch is not None and watch.heard and self._provider(host.id) is not None
            if host.id != failed and heard and has_ha(host.provider):
                found.append(host)
        return sorted(found, key=lambda h: (h.name, h.id))

    async def _verdict(
        self, cluster: _Cluster, host: HostRow, live: list[HostRow], silent: float
    ) -> _Verdict:
        """Isolated, failed, or not known yet (``UNHEARD``): by the host's heartbeat on
        the datastores it shares with hosts that answer."""
        timeout = cluster.settings.timeout_s
        mine = cluster.datastores.get(host.id, frozenset())
        readings: list[HeartbeatRecord | None] = []  # None: no file of it there
        for name in sorted(mine):
            readers = [h for h in live if name in cluster.datastores.get(h.id, ())]
            beats = await self._heartbeats(name, readers)
            if beats is not None:
                readings.append(next((b for b in beats if b.host_id == host.agent_id), None))
        found = [r for r in readings if r is not None]
        if any(r.age_s <= min(WRITING_S, timeout) for r in found):
            return _Verdict(
                HostHaState.ISOLATED,
                f"{host.name} does not answer the center but still writes its datastore "
                "heartbeat: its VMs are left running there",
            )
        if any(r.age_s <= timeout for r in found):
            return _Verdict(HostHaState.UNHEARD, "it stopped writing its heartbeat lately")
        if found:
            age = min(r.age_s for r in found)
            return _Verdict(HostHaState.FAILED, f"its datastore heartbeat is {age:.0f} s old")
        if readings and silent >= 2 * timeout:
            return _Verdict(HostHaState.FAILED, "it writes no datastore heartbeat")
        return _Verdict(HostHaState.UNHEARD, "no heartbeat of it could be read yet")

    async def _heartbeats(
        self, datastore: str, readers: list[HostRow]
    ) -> list[HeartbeatRecord] | None:
        """Every heartbeat on ``datastore``, read through the first of ``readers`` that
        answers; None if none does."""
        for reader in readers:
            provider = self._provider(reader.id)
            if provider is None:
                continue
            try:
                return await within(READ_TIMEOUT_S, provider.datastore_heartbeats(datastore))
            except (ThinvisorError, TimeoutError, OSError) as exc:
                log.info("ha: %s cannot read the heartbeats on %s: %s", reader.name, datastore, exc)
        return None

    # --- restarting a failed host's VMs -----------------------------------------------

    async def _failed(
        self,
        cluster: _Cluster,
        host: HostRow,
        watch: _Watch,
        live: list[HostRow],
        verdict: _Verdict,
    ) -> None:
        # Only VMs whose disks another host that answers sees can be restarted at all.
        reach = [cluster.datastores.get(h.id, frozenset()) for h in live]
        vms = [
            vm
            for vm in protected(cluster.vms_of(host.id))
            if vm.id not in watch.restarted
            and vm.datastores
            and any(set(vm.datastores) <= names for names in reach)
        ]
        if not watch.failed_said:
            watch.failed_said = True
            silent = self.clock() - watch.heard_at
            todo = f"restarting {len(vms)} of its VMs elsewhere" if vms else "no VM to restart"
            self._emit(
                "ha.host_failed",
                f"{host.name} failed: not heard for {silent:.0f} s and {verdict.why}: {todo}",
                host,
                vms=[vm.name for vm in vms],
            )
        if not vms:
            return
        targets = [h for h in live if not h.maintenance]
        cluster_id = cluster.settings.cluster_id
        loads = {h.id: host_load(h, cluster_id, cluster.vms_of(h.id)) for h in targets}
        placement = {vm.id: vm.host_id for vm in cluster.vms if runs(vm)}
        rules = await self._in_thread(self.rules.rules_for, [vm.id for vm in vms])
        used: set[int] = set()
        for vm in vms:
            if watch.heard:
                return  # it is back: what it still holds is its own again
            chosen = await self._restart(cluster, host, watch, vm, loads, placement, rules)
            if chosen is not None:
                loads[chosen] = replace(
                    loads[chosen], used_memory_mib=loads[chosen].used_memory_mib + vm.memory_mib
                )
                placement[vm.id] = chosen
                used.add(chosen)
        await self._refresh(used)

    async def _restart(
        self,
        cluster: _Cluster,
        host: HostRow,
        watch: _Watch,
        vm: VmRow,
        loads: dict[int, HostLoad],
        placement: dict[int, int],
        rules: list[Rule],
    ) -> int | None:
        """Restart ``vm`` on the host placement chooses; that host's id, or None if it
        could not be (said once, tried again the next round)."""
        try:
            target = self._place(cluster, vm, loads, placement, rules)
            path = await self._recover(watch, vm, cluster.hosts[target])
        except (ThinvisorError, TimeoutError, OSError) as exc:
            why = _reason(exc)
            watch.error = f"{vm.name}: {why}"
            if vm.id not in watch.unrestarted_said:
                watch.unrestarted_said.add(vm.id)
                self._emit(
                    "ha.restart_failed",
                    f"{vm.name} could not be restarted after {host.name} failed: {why}; "
                    "trying again",
                    host,
                    vm=vm.name,
                )
            return None
        name = cluster.hosts[target].name
        self._restarted(cluster.settings.cluster_id, vm, host.name, name, path)
        return target

    def _restarted(self, cluster_id: int, vm: VmRow, source: str, target: str, path: str) -> None:
        """Keep and say that ``vm`` runs on ``target`` now, at ``path``."""
        restart = Restart(
            cluster_id=cluster_id,
            vm_id=vm.id,
            vm=vm.name,
            source=source,
            target=target,
            path=path,
            priority=vm.ha_priority,
            time=utcnow(),
        )
        self._restarts.setdefault(cluster_id, deque(maxlen=RESTARTS_KEPT)).append(restart)
        self.events.emit(
            "ha.vm_restarted",
            f"{vm.name} restarted on {target} after {source} failed",
            object=f"host/{target}/vm/{vm.name}",
            data={"vm_id": vm.id, "from": vm.path, "to": path, "priority": vm.ha_priority.value},
        )

    def _place(
        self,
        cluster: _Cluster,
        vm: VmRow,
        loads: dict[int, HostLoad],
        placement: dict[int, int],
        rules: list[Rule],
    ) -> int:
        """The id of the host to restart ``vm`` on: one that has all its datastores."""
        if not vm.datastores:
            raise InvalidArgument("datastore", "its disks are on no datastore")
        needed = set(vm.datastores)
        fitting = [load for i, load in loads.items() if needed <= cluster.datastores.get(i, set())]
        if not fitting:
            names = ", ".join(vm.datastores)
            raise NoPlacement(
                demand(vm), [(load, f"has not all of {names}") for load in loads.values()]
            )
        return choose_host(demand(vm), fitting, rules, placement).host_id

    async def _recover(self, watch: _Watch, vm: VmRow, target: HostRow) -> str:
        """Have ``target`` take ``vm`` over and start it; the VM's path there. Its row
        moves there: its old host's sync keeps it and the target's does not add it
        meanwhile."""
        provider = self.syncs.get(target.id).provider()
        await self._in_thread(self.inventory.begin_move, vm.id, target.id)
        try:
            record = await within(RECOVER_TIMEOUT_S, provider.recover(vm.name, vm.datastores[0]))
            watch.restarted.add(vm.id)  # whatever the inventory says next: never again
            return await self._in_thread(self._moved, vm, target, record)
        finally:
            self.inventory.end_move(vm.id)

    def _moved(self, vm: VmRow, target: HostRow, record: VmRecord) -> str:
        """Move the VM's row to ``target``, as the host's record says it is; its path
        (blocking)."""
        try:
            row = self.inventory.move_vm(vm.id, target.id)
        except NotFound:  # forgotten meanwhile: the target's sync adds it anew
            return f"{target.path}/{path_segment(record.name)}"
        if record.id == row.ext_id:
            row = self.inventory.apply_vm(target.id, record)
        return row.path

    async def _refresh(self, host_ids: Iterable[int]) -> None:
        """The hosts' snapshots again (what their syncs skipped while VMs arrived)."""
        for host_id in sorted(host_ids):
            try:
                await self.syncs.get(host_id).refresh()
            except (ThinvisorError, TimeoutError) as exc:
                log.info("ha: host %s not refreshed after restarts: %s", host_id, exc)

    # --- what the API shows -------------------------------------------------------------

    def host_status(self, host_id: int) -> HostStatus | None:
        """How the monitor sees the host now; None if it watches it not (no cluster of
        it has HA on, or the monitor has not come round to it yet)."""
        watch = self._watches.get(host_id)
        if watch is None:
            return None
        silent = None if watch.heard else max(0.0, self.clock() - watch.heard_at)
        return HostStatus(host_id, watch.state, watch.heard, silent, watch.error)

    def restarts(self, cluster_id: int) -> list[Restart]:
        """The cluster's latest restarts (``RESTARTS_KEPT`` at most), the oldest first."""
        return list(self._restarts.get(cluster_id, ()))

    def _emit(self, kind: str, message: str, host: HostRow, **data: object) -> None:
        vm = data.get("vm")
        obj = f"host/{host.name}" + (f"/vm/{vm}" if isinstance(vm, str) else "")
        log.warning("%s", message)
        self.events.emit(kind, message, object=obj, data={"host": host.name, **data})


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
