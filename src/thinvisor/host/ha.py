"""High availability, the host's side: heartbeats, self-fencing, and taking VMs over.

The center restarts the VMs of a host that died on the hosts that share its datastores.
Three things here make that safe:

- *Datastore heartbeats.* Every ``[ha] heartbeat_interval_s`` the agent replaces
  ``<datastore>/.thinvisor-heartbeat/<host-id>`` on every datastore, each datastore from
  a thread of its own, so that one that hangs holds up nothing else (a write that takes
  longer than the interval counts as failed). A host whose files stop ageing is alive
  and can write, whatever the network between it and the center says.
- *Self-fencing.* Once the center has sent its first heartbeat, a watchdog looks every
  second: when the center has been silent for longer than its timeout and the writes
  have failed for as long on every datastore that other hosts also use, this host is
  cut off, and the center will restart its VMs elsewhere. It powers them off first.
- *Never twice.* Taking a VM over (``recover``) is one atomic step, its ``owner`` file
  naming this host; the agent's watcher kills at once a QEMU of this host whose VM
  directory names another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import (
    AlreadyExists,
    BackendError,
    Busy,
    InvalidArgument,
    NotFound,
    ThinvisorError,
)
from thinvisor.fs import atomic_write
from thinvisor.host.engine import process
from thinvisor.host.engine.paths import CONFIG_NAME, VmPaths
from thinvisor.host.events import EventLog
from thinvisor.host.inventory import load_spec, owner_of, set_owner
from thinvisor.host.maintenance import arriving, check_not_in_maintenance
from thinvisor.model.vm import check_name

if TYPE_CHECKING:
    from thinvisor.host.service import HostService, VmInfo

log = logging.getLogger(__name__)

HEARTBEAT_DIR = ".thinvisor-heartbeat"
WATCHDOG_INTERVAL_S = 1.0
DEFAULT_CENTER_TIMEOUT_S = 15.0
# A heartbeat listing waits this long for a datastore before calling it unreachable.
READ_TIMEOUT_S = 10.0
# Fencing waits this long for a VM's orderly hard stop before killing its QEMU.
FENCE_STOP_TIMEOUT_S = 30.0

Clock = Callable[[], float]


@dataclass(frozen=True)
class Heartbeat:
    """One host's heartbeat file on a datastore; ``age_s`` by its mtime, as seen here."""

    host: str
    seq: int
    time: float
    age_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_heartbeat(datastore: Path, host_id: str, seq: int) -> None:
    """Replace ``host_id``'s heartbeat file on the datastore at ``datastore`` (blocking)."""
    directory = datastore / HEARTBEAT_DIR
    # Not ``parents``: a datastore that is not there (not mounted) is not made.
    directory.mkdir(exist_ok=True)
    beat = {"host": host_id, "seq": seq, "time": time.time()}
    atomic_write(directory / host_id, json.dumps(beat) + "\n")


def read_heartbeats(datastore: Path) -> list[Heartbeat]:
    """Every heartbeat file on the datastore at ``datastore``, by host (blocking); none
    when no host has written one yet. Raises ``OSError`` when it cannot be listed."""
    directory = datastore / HEARTBEAT_DIR
    try:
        paths = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return []
    beats = []
    for path in paths:
        try:
            mtime = path.stat().st_mtime
            data = json.loads(path.read_text())
            beat = Heartbeat(
                host=str(data["host"]),
                seq=int(data["seq"]),
                time=float(data["time"]),
                age_s=round(time.time() - mtime, 3),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # gone meanwhile, or not a heartbeat
        beats.append(beat)
    return beats


def others_there(datastore: Path, host_id: str) -> bool:
    """Whether another host's heartbeat file lies on the datastore (blocking)."""
    directory = datastore / HEARTBEAT_DIR
    return any(not p.name.startswith(".") and p.name != host_id for p in directory.iterdir())


def should_fence(
    now: float,
    center_seen: float | None,
    timeout_s: float,
    written: Mapping[str, float],
    shared: Collection[str],
) -> bool:
    """Whether a host is cut off and must power its VMs off.

    ``center_seen`` is when the center's last heartbeat came (None: none yet, the
    watchdog is not armed), ``written`` when each datastore's heartbeat was last written
    in time, ``shared`` the datastores where other hosts' heartbeats lie. Cut off: the
    center silent for longer than ``timeout_s``, and every shared datastore (every
    datastore when none is shared) not written for as long.
    """
    if center_seen is None or now - center_seen <= timeout_s:
        return False
    watched = [name for name in written if name in shared] or list(written)
    return all(now - written[name] > timeout_s for name in watched)


class HeartbeatWriter:
    """This host's heartbeat on every datastore, one writing thread per datastore.

    A datastore whose last write has not ended is skipped: a hung share keeps one
    thread, never more, and its heartbeat counts as failing until a write ends in time.
    """

    def __init__(self, config: HostConfig, host_id: str, *, clock: Clock = time.monotonic):
        self.config = config
        self.host_id = host_id
        self.clock = clock
        self.interval_s = config.ha.heartbeat_interval_s
        self.started = clock()
        self.seq = 0
        self._lock = threading.Lock()
        self._writing: set[str] = set()
        self._written: dict[str, float] = {}
        self._shared: set[str] = set()
        self._failing: set[str] = set()

    async def run(self) -> None:
        """Write a heartbeat every interval, for as long as the agent runs."""
        while True:
            try:
                self.beat()
            except Exception:
                log.exception("writing the datastore heartbeats failed")
            await asyncio.sleep(self.interval_s)

    def beat(self) -> list[threading.Thread]:
        """Begin one write on every datastore whose last write has ended; their threads."""
        self.seq += 1
        threads = []
        for ds in self.config.all_datastores():
            with self._lock:
                if ds.name in self._writing:
                    continue
                self._writing.add(ds.name)
            thread = threading.Thread(
                target=self._write, args=(ds, self.seq), name=f"heartbeat-{ds.name}", daemon=True
            )
            thread.start()
            threads.append(thread)
        return threads

    def _write(self, ds: DatastoreConfig, seq: int) -> None:
        began = self.clock()
        try:
            write_heartbeat(ds.path, self.host_id, seq)
            shared = others_there(ds.path, self.host_id)
            took = self.clock() - began
            if took > self.interval_s:
                self._failed(ds.name, f"the write took {took:.1f} s")
            else:
                self._succeeded(ds.name, began + took, shared)
        except OSError as exc:
            self._failed(ds.name, exc.strerror or str(exc))
        finally:
            with self._lock:
                self._writing.discard(ds.name)

    def _succeeded(self, name: str, at: float, shared: bool) -> None:
        with self._lock:
            self._written[name] = at
            if shared:
                self._shared.add(name)
            else:
                self._shared.discard(name)
            recovered = name in self._failing
            self._failing.discard(name)
        if recovered:
            log.info("datastore %s: heartbeat written again", name)

    def _failed(self, name: str, why: str) -> None:
        with self._lock:
            first = name not in self._failing
            self._failing.add(name)
        if first:
            log.warning("datastore %s: heartbeat not written: %s", name, why)

    def written(self, names: Iterable[str]) -> dict[str, float]:
        """When each datastore's heartbeat was last written in time (this writer's
        clock); when the writer started, for one never written."""
        with self._lock:
            return {name: self._written.get(name, self.started) for name in names}

    @property
    def shared(self) -> set[str]:
        """The datastores where the last write found another host's heartbeat."""
        with self._lock:
            return set(self._shared)


def _run_paths(run_dir: Path) -> VmPaths:
    """Paths good for a VM's run directory only (pidfile, stop record)."""
    return VmPaths(run_dir, run_dir)


class HighAvailability:
    """The agent's HA side: heartbeats, the center's heartbeat and the watchdog, fencing,
    taking VMs over."""

    def __init__(self, service: HostService, events: EventLog, *, clock: Clock = time.monotonic):
        self.service = service
        self.events = events
        self.clock = clock
        self.writer = HeartbeatWriter(service.config, service.inventory.host_id, clock=clock)
        self.center_seen: float | None = None
        self.center_timeout_s = DEFAULT_CENTER_TIMEOUT_S
        self.fenced = False  # since the center's last heartbeat

    @property
    def config(self) -> HostConfig:
        return self.service.config

    @property
    def host_id(self) -> str:
        return self.service.inventory.host_id

    # Heartbeats

    async def heartbeats(self, datastore: str) -> list[Heartbeat]:
        """Every host's heartbeat on the datastore named ``datastore``."""
        ds = self.config.datastore(datastore)
        try:
            reading = asyncio.to_thread(read_heartbeats, ds.path)
            return await asyncio.wait_for(reading, READ_TIMEOUT_S)
        except TimeoutError:
            raise BackendError(f"datastore {ds.name} does not answer") from None
        except OSError as exc:
            raise BackendError(f"datastore {ds.name}: heartbeats: {exc.strerror}") from exc

    def center_heartbeat(self, timeout_s: float = DEFAULT_CENTER_TIMEOUT_S) -> bool:
        """The center is alive: (re)arm the watchdog with ``timeout_s``; whether the host
        fenced itself since the center's previous heartbeat."""
        fenced, self.fenced = self.fenced, False
        self.center_seen = self.clock()
        self.center_timeout_s = timeout_s
        return fenced

    # The watchdog

    def cut_off(self) -> bool:
        """Whether the host has lost the center and its datastores (``should_fence`` now)."""
        names = [d.name for d in self.config.all_datastores()]
        return should_fence(
            self.clock(),
            self.center_seen,
            self.center_timeout_s,
            self.writer.written(names),
            self.writer.shared,
        )

    async def watch(self) -> None:
        """Every second: fence the host once it is cut off."""
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            try:
                if self.cut_off():
                    await self.fence()
            except Exception:
                log.exception("the HA watchdog failed")

    async def fence(self) -> list[str]:
        """Power every VM that runs here off; disarm until the center's next heartbeat.
        The VMs powered off."""
        now = self.clock()
        lost_s = now - (now if self.center_seen is None else self.center_seen)
        self.center_seen = None
        self.fenced = True
        reason = f"fenced: lost the center and its datastores for {lost_s:.0f} s"
        # From the run directories: the datastores may not answer.
        running = await asyncio.to_thread(self._qemus)
        log.error("%s; powering off %d VMs", reason, len(running))
        self.events.emit("host.fenced", reason, object="host", data={"vms": sorted(running)})
        await asyncio.gather(*(self._power_off(n, run, reason) for n, run in running.items()))
        return sorted(running)

    def _qemus(self) -> dict[str, Path]:
        """The VMs whose QEMU runs here: name -> run directory."""
        try:
            runs = sorted((self.config.run_dir / "vms").iterdir())
        except FileNotFoundError:
            return {}
        return {
            run.name: run
            for run in runs
            if run.is_dir() and process.running_pid(_run_paths(run)) is not None
        }

    async def _power_off(self, name: str, run: Path, reason: str) -> None:
        try:
            await asyncio.wait_for(self.service.stop(name, reason=reason), FENCE_STOP_TIMEOUT_S)
            return
        except (ThinvisorError, TimeoutError) as exc:
            log.warning("vm %s: fencing: %s; killing its QEMU", name, exc)
        paths = _run_paths(run)
        pid = process.running_pid(paths)
        if pid is not None:
            process.record_stop(paths, "stop", reason)
            process.kill(pid)
            self.service.emit("vm.powered_off", name, reason)

    # Never twice

    async def fence_foreign(self, ours: Collection[str] = ()) -> list[str]:
        """Kill every QEMU running here whose VM directory names another host as its
        owner (another host took the VM over); ``ours``, the names this host's own VMs
        are known by, need no look. The VMs killed."""
        killed = []
        for name, paths, owner in await asyncio.to_thread(self._foreign, set(ours)):
            reason = f"killed: host {owner} took the VM over, and it must not run twice"
            try:
                async with self.service.inventory.lock(name, timeout=0):
                    pid = process.running_pid(paths)
                    if pid is None or owner_of(paths.vm_dir) != owner:
                        continue
                    process.record_stop(paths, "stop", reason)
                    process.kill(pid)
                    await process.wait_gone(paths, pid, 10)
            except Busy:
                continue  # an operation holds it (a migration leaving): it settles it
            log.error("vm %s: %s", name, reason)
            self.events.emit("vm.fenced", reason, object=f"vm/{name}", data={"owner": owner})
            await self._tidy(paths)
            killed.append(name)
        return killed

    def _foreign(self, ours: set[str]) -> list[tuple[str, VmPaths, str]]:
        """The QEMUs running here for VM directories of other hosts (blocking)."""
        candidates = [n for n in self._qemus() if n not in ours]
        if not candidates:
            return []
        # VMs on their way here run before their directory names this host.
        skip = set(arriving(self.config.state_dir))
        found = []
        for name in candidates:
            if name in skip or self.service.inventory.find(name) is not None:
                continue
            run = self.config.run_dir / "vms" / name
            for ds in self.config.all_datastores():
                vm_dir = ds.path / name
                owner = owner_of(vm_dir)
                if owner and owner != self.host_id and (vm_dir / CONFIG_NAME).is_file():
                    found.append((name, VmPaths(vm_dir, run), owner))
                    break
        return found

    async def _tidy(self, paths: VmPaths) -> None:
        """Its switch ports and cgroups, as for any VM whose QEMU ended."""
        try:
            spec = load_spec(paths.config)
            await self.service.vm_gone(spec)
        except ThinvisorError as exc:
            log.warning("vm %s: tidying up after it failed: %s", paths.vm_dir.name, exc)

    # Taking a VM over

    async def recover(self, vm: str, datastore: str, *, start: bool = True) -> VmInfo:
        """Take over the VM directory ``<datastore>/<vm>`` of another host, and start
        the VM when ``start``. The caller knows that host can no longer write."""
        try:
            check_name(vm)
        except ValueError as exc:
            raise InvalidArgument("vm", str(exc)) from None
        check_not_in_maintenance(self.config.state_dir, f"vm {vm!r}: cannot recover here")
        ds = self.config.datastore(datastore)
        vm_dir = ds.path / vm
        if not (vm_dir / CONFIG_NAME).is_file():
            raise NotFound(f"datastore {ds.name} holds no vm {vm!r}")
        inventory = self.service.inventory
        async with inventory.lock(vm):
            if inventory.owns(vm_dir):
                raise AlreadyExists(f"vm {vm!r} on datastore {ds.name} is this host's already")
            if inventory.find(vm) is not None:
                raise AlreadyExists(f"vm {vm!r} already exists on this host")
            previous = owner_of(vm_dir)
            set_owner(vm_dir, self.host_id)  # the one step that moves it here
        log.warning("vm %s: taken over from host %s", vm, previous)
        self.service.emit(
            "vm.recovered", vm, f"taken over from host {previous} (HA)", previous_owner=previous
        )
        if start:
            await self.service.start(vm)
        return await self.service.get_vm(vm)
