"""The fake provider: in-memory hosts, for tests of the center itself.

A fake host lives in a registry of this module keyed by its ``Connection.address``
(``fake://lab1``, say), so that every provider opened on that address (the center's, a
test's) sees the same host. Tests make hosts with ``fake_host()`` and drive them with
the ``FakeHost`` helpers: ``add_vm``, ``remove_vm``, ``set_power`` (a change made on the
host behind the center's back), ``set_reachable(False)`` (the host stops answering),
``fail_migrations`` and ``slow_migrations`` (how live migrations from the host go),
``crash``, ``isolate`` and ``restore`` (for high availability, below),
``fail_imports`` (how VMs moved in from another kind of host go).

Moving a stopped VM to another kind of host (``TRANSFER``): a fake VM's disks are
strings held in memory (``FakeVm.disks``); ``export_vm`` writes each to a file and
``import_vm`` reads them back, so a VM imported from files that are gone fails.

High availability: every fake host "writes" a heartbeat on each of its datastores, and
fake hosts with a datastore of the same name share it (as they do for live migration),
so ``datastore_heartbeats`` lists every registered fake host having it. A heartbeat's
age is counted on the hosts' ``clock`` (``time.monotonic`` unless a test gives its own):
0 while the host writes, the time since it stopped once it ``crash``-ed. An ``isolate``-d
host stops answering but goes on writing. ``recover`` moves a VM from the fake host that
holds it on the shared datastore to this one, keeping its id, and starts it.

The fake is honest where the center relies on a peer's behaviour: credentials and the
pinned fingerprint are checked on every call, power actions follow the same state
machine as a thinvisor host (a refused action changes nothing), templates cannot be
started, only stopped VMs are cloned, reconfigured or deleted, only running ones migrated
(to a fake host that issued a ticket for them, keeping their id). Every change, made through
a provider or by a helper, reaches every connected provider: its ``events()`` streams
yield every change since ``connect()``, one stream after another missing nothing in
between (as the thinvisor provider resumes its agent's stream), so that nothing is lost
between a snapshot and the stream that follows it.

Hosts are plain data guarded by a lock: tests may drive them from any thread while
providers run in an event loop of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from thinvisor.errors import (
    AlreadyExists,
    Busy,
    CertificateMismatch,
    CredentialsRefused,
    InvalidArgument,
    InvalidState,
    NotFound,
    ThinvisorError,
    Unreachable,
    Unsupported,
)
from thinvisor.providers.base import (
    Capability,
    ChangeEvent,
    ChangeKind,
    Connection,
    ConsoleEndpoint,
    ConsoleKind,
    CreateVm,
    DatastoreRecord,
    ExportedDisk,
    ExportedVm,
    HeartbeatRecord,
    HostRecord,
    InventorySnapshot,
    MigrationOptions,
    MigrationProgress,
    MigrationTicket,
    NetworkRecord,
    PowerAction,
    PowerState,
    Provider,
    Reconfigure,
    SnapshotRecord,
    VmRecord,
)

VERSION = "1.0"

S = PowerState
#: Each action: the states it is allowed in, and the state it leaves (None: unchanged).
TRANSITIONS: dict[PowerAction, tuple[frozenset[PowerState], PowerState | None]] = {
    PowerAction.START: (frozenset({S.STOPPED, S.SUSPENDED}), S.RUNNING),
    PowerAction.STOP: (frozenset({S.RUNNING, S.PAUSED, S.SUSPENDED}), S.STOPPED),
    PowerAction.SHUTDOWN: (frozenset({S.RUNNING}), S.STOPPED),
    PowerAction.RESET: (frozenset({S.RUNNING, S.PAUSED}), None),
    PowerAction.PAUSE: (frozenset({S.RUNNING}), S.PAUSED),
    PowerAction.RESUME: (frozenset({S.PAUSED, S.SUSPENDED}), S.RUNNING),
    PowerAction.SUSPEND: (frozenset({S.RUNNING, S.PAUSED}), S.SUSPENDED),
}
#: States in which a VM may be deleted (its process is gone).
DELETABLE = frozenset({S.STOPPED, S.SUSPENDED})

#: Changes queued for a provider that reads none before they are dropped (``RESYNC``).
MAX_PENDING = 10_000
#: The steps in which a migration reports its progress.
MIGRATION_STEPS = 4
#: The port a fake host's tickets name (nothing listens: the fake moves VMs in memory).
MIGRATION_PORT = 49152

_ids = itertools.count(1)


def _next_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


@dataclass
class FakeSnapshot:
    record: SnapshotRecord
    power_state: PowerState
    """The VM's state when taken: a memory snapshot reverts to it, a disk one to stopped."""


@dataclass
class FakeVm:
    """A VM of a fake host: its record's fields, and its snapshots."""

    id: str
    name: str
    power_state: PowerState = PowerState.STOPPED
    cpus: int = 1
    memory_mib: int = 256
    template: bool = False
    datastores: tuple[str, ...] = ("datastore1",)
    networks: tuple[str, ...] = ()
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    snapshots: dict[str, FakeSnapshot] = field(default_factory=dict)
    current_snapshot: str | None = None
    disks: tuple[str, ...] = ()
    """The contents of its disks (none unless a test or an import gave some)."""
    reserved_cpu_mhz: int = 0
    reserved_memory_mib: int = 0

    def record(self) -> VmRecord:
        return VmRecord(
            id=self.id,
            name=self.name,
            power_state=self.power_state,
            cpus=self.cpus,
            memory_mib=self.memory_mib,
            template=self.template,
            datastores=self.datastores,
            networks=self.networks,
            uuid=self.uuid,
            reserved_cpu_mhz=self.reserved_cpu_mhz,
            reserved_memory_mib=self.reserved_memory_mib,
        )


class _Feed:
    """A provider's subscription to its host's changes, from ``connect()`` until
    ``close()`` or the host goes away: a queue in the provider's event loop, read by one
    ``events()`` stream after another, so that nothing is missed between them."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[ChangeEvent | ThinvisorError | None] = asyncio.Queue()
        self.ended = False

    def put(self, item: ChangeEvent | ThinvisorError | None) -> None:
        """Queue ``item`` (an event, the error that ended the feed, or None: closed), from
        any thread."""
        if item is None or isinstance(item, ThinvisorError):
            self.ended = True
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._deliver(item)
        elif not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(self._deliver, item)

    def _deliver(self, item: ChangeEvent | ThinvisorError | None) -> None:
        if isinstance(item, ChangeEvent) and self.queue.qsize() >= MAX_PENDING:
            # Nobody reads: forget what is queued, and say so.
            while not self.queue.empty():
                self.queue.get_nowait()
            message = f"{self.host.address}: changes were dropped"
            self.queue.put_nowait(ChangeEvent(ChangeKind.RESYNC, message))
        self.queue.put_nowait(item)


@dataclass
class FakeHost:
    """A fake host: what it holds, who it lets in, and whether it answers."""

    address: str
    name: str
    username: str | None = "admin"
    password: str | None = "secret"
    fingerprint: str | None = None
    """The fingerprint of its certificate; None: it has no TLS, nothing to pin."""
    cpus: int = 8
    memory_mib: int = 32768
    core_mhz: int = 2000
    cpu_load: float | None = None
    maintenance: bool = False
    reachable: bool = True
    migration_error: ThinvisorError | None = None
    """What every migration from this host fails with (``fail_migrations``); None: none."""
    migration_s: float = 0.0
    """How long a migration from this host takes (``slow_migrations``)."""
    import_error: ThinvisorError | None = None
    """What every ``import_vm`` on this host fails with (``fail_imports``); None: none."""
    vms: dict[str, FakeVm] = field(default_factory=dict)
    datastores: list[DatastoreRecord] = field(
        default_factory=lambda: [DatastoreRecord("datastore1", "datastore1", 1 << 40, 1 << 39)]
    )
    networks: list[NetworkRecord] = field(
        default_factory=lambda: [NetworkRecord("network1", "network1")]
    )
    host_id: str = field(default_factory=lambda: f"fake-{uuid.uuid4().hex[:12]}")
    """Its own id, as a thinvisor agent's: what its heartbeats are known by."""
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    """The clock its heartbeats' ages are counted on."""
    writing: bool = True
    """Whether it writes its datastore heartbeats (``crash`` stops it)."""
    stopped_writing: float | None = None
    """When it stopped writing them, on ``clock``."""
    fenced: bool = False
    """What the next ``ha_heartbeat`` says (as a host that powered its VMs off says once)."""
    center_timeout_s: float | None = None
    """The timeout the center's last HA heartbeat gave; None: none came yet."""
    center_heartbeats: int = 0
    """How many HA heartbeats the center sent."""
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _feeds: list[_Feed] = field(default_factory=list, repr=False)

    # --- What providers see ---

    def record(self) -> HostRecord:
        return HostRecord(
            name=self.name,
            vendor="fake",
            version=VERSION,
            cpus=self.cpus,
            memory_mib=self.memory_mib,
            maintenance=self.maintenance,
            host_id=self.host_id,
            core_mhz=self.core_mhz,
            cpu_load=self.cpu_load,
        )

    def has_datastore(self, name: str) -> bool:
        return any(d.name == name for d in self.datastores)

    def heartbeat(self, now: float) -> HeartbeatRecord:
        """Its heartbeat on any of its datastores, as a host whose clock says ``now``
        sees it."""
        with self.lock:
            if self.writing or self.stopped_writing is None:
                return HeartbeatRecord(self.host_id, int(now), 0.0)
            stopped = self.stopped_writing
            return HeartbeatRecord(self.host_id, int(stopped), max(0.0, now - stopped))

    @property
    def templates(self) -> list[FakeVm]:
        return [vm for vm in self.vms.values() if vm.template]

    def vm(self, vm_id: str) -> FakeVm:
        """The VM ``vm_id``; ``NotFound`` if there is none."""
        try:
            return self.vms[vm_id]
        except KeyError:
            raise NotFound(f"{self.address}: no vm with id {vm_id!r}") from None

    def vm_named(self, name: str) -> FakeVm:
        """The VM called ``name``; ``NotFound`` if there is none."""
        for vm in self.vms.values():
            if vm.name == name:
                return vm
        raise NotFound(f"{self.address}: no vm named {name!r}")

    # --- Helpers for tests: changes made on the host itself ---

    def add_vm(
        self,
        name: str,
        *,
        power_state: PowerState = PowerState.STOPPED,
        cpus: int = 1,
        memory_mib: int = 256,
        template: bool = False,
        datastores: tuple[str, ...] = ("datastore1",),
        networks: tuple[str, ...] = (),
        vm_id: str | None = None,
    ) -> FakeVm:
        """Put a VM on the host (as if made there); its id is ``vm-N`` unless given."""
        with self.lock:
            if any(vm.name == name for vm in self.vms.values()):
                raise AlreadyExists(f"{self.address}: a vm named {name!r} exists")
            vm = FakeVm(
                id=vm_id or _next_id("vm"),
                name=name,
                power_state=power_state,
                cpus=cpus,
                memory_mib=memory_mib,
                template=template,
                datastores=datastores,
                networks=networks,
            )
            self.vms[vm.id] = vm
            self.emit_vm(vm, "vm.created", f"{name}: created")
            return vm

    def remove_vm(self, vm_id: str) -> None:
        """Remove a VM (as if deleted on the host), in whatever state it is."""
        with self.lock:
            vm = self.vm(vm_id)
            del self.vms[vm_id]
            self.emit(
                ChangeEvent(
                    ChangeKind.VM_REMOVED, f"{vm.name}: deleted", vm_id, None, None, "vm.deleted"
                )
            )

    def set_power(self, vm_id: str, state: PowerState) -> FakeVm:
        """Put a VM in ``state`` at once (a change behind the center's back)."""
        with self.lock:
            vm = self.vm(vm_id)
            vm.power_state = state
            self.emit_vm(vm, f"vm.{state.value}", f"{vm.name}: now {state.value}")
            return vm

    def set_reachable(self, reachable: bool) -> None:
        """Make the host answer, or not: unreachable, every call raises ``Unreachable``
        and every event stream ends with it."""
        with self.lock:
            self.reachable = reachable
            if not reachable:
                self.end_feeds(Unreachable(f"{self.address}: the host does not answer"))

    def crash(self) -> None:
        """The host dies: it stops answering and writing its datastore heartbeats, and
        its VMs are off (as after a power loss, said to no one: nobody hears it)."""
        with self.lock:
            self.set_reachable(False)
            self.writing = False
            self.stopped_writing = self.clock()
            for vm in self.vms.values():
                if vm.power_state in (PowerState.RUNNING, PowerState.PAUSED):
                    vm.power_state = PowerState.STOPPED

    def isolate(self) -> None:
        """The host is cut off from the center only: it stops answering, and goes on
        writing its datastore heartbeats (its VMs run on)."""
        self.set_reachable(False)

    def restore(self) -> None:
        """The host is back (after ``crash`` or ``isolate``): it answers and writes its
        heartbeats again."""
        with self.lock:
            self.writing = True
            self.stopped_writing = None
            self.set_reachable(True)

    def fail_migrations(self, error: ThinvisorError | None) -> None:
        """Make every migration from this host fail with ``error`` once its memory is
        copied, the VM still running here (None: migrations succeed again)."""
        self.migration_error = error

    def fail_imports(self, error: ThinvisorError | None) -> None:
        """Make every VM import into this host fail with ``error``, once its files are
        read (None: imports succeed again)."""
        self.import_error = error

    def slow_migrations(self, seconds: float) -> None:
        """Make every migration from this host take ``seconds`` (to cancel one, say)."""
        self.migration_s = seconds

    # --- Events ---

    def emit(self, event: ChangeEvent) -> None:
        """Hand ``event`` to every provider following the host."""
        with self.lock:
            for feed in self._feeds:
                feed.put(event)

    def emit_vm(self, vm: FakeVm, peer_kind: str, message: str, user: str | None = None) -> None:
        self.emit(
            ChangeEvent(ChangeKind.VM_CHANGED, message, vm.id, vm.record(), None, peer_kind, user)
        )

    def follow(self) -> _Feed:
        """A new feed of the host's changes, in the running event loop."""
        feed = _Feed(self)
        with self.lock:
            self._feeds.append(feed)
        return feed

    def end_feed(self, feed: _Feed, item: ThinvisorError | None = None) -> None:
        """Stop ``feed``; its reader gets ``item`` (None: the end)."""
        with self.lock, contextlib.suppress(ValueError):
            self._feeds.remove(feed)
        feed.put(item)

    def end_feeds(self, error: ThinvisorError) -> None:
        """Stop every feed with ``error`` (the host went away)."""
        with self.lock:
            for feed in list(self._feeds):
                self.end_feed(feed, error)


class FakeEventStream:
    """A provider's changes as an async iterator: what its feed queued since the last
    stream (or since ``connect()``), then what comes."""

    def __init__(self, provider: FakeProvider) -> None:
        self._error: ThinvisorError | None = None
        self._feed: _Feed | None = None
        try:
            self._feed = provider.feed()
        except ThinvisorError as exc:  # raised on iteration, as a generator would
            self._error = exc

    def __aiter__(self) -> FakeEventStream:
        return self

    async def __anext__(self) -> ChangeEvent:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._feed is None:
            raise StopAsyncIteration
        item = await self._feed.queue.get()
        if isinstance(item, ChangeEvent):
            return item
        self._feed = None
        if item is None:
            raise StopAsyncIteration
        raise item

    async def aclose(self) -> None:
        """End this stream; the provider's feed goes on for the next one."""
        self._feed = None


@dataclass(frozen=True)
class _Incoming:
    """A VM a fake host is ready to receive: what its ticket let in."""

    id: str
    destination: str
    """The address of the receiving host."""
    name: str
    mode: str
    datastore: str | None
    """Where its disks go in ``mirror`` mode."""


_hosts: dict[str, FakeHost] = {}
_hosts_lock = threading.Lock()
_incoming: dict[str, _Incoming] = {}  # by token; guarded by _hosts_lock


def fake_host(
    address: str,
    *,
    name: str | None = None,
    username: str | None = "admin",
    password: str | None = "secret",
    fingerprint: str | None = None,
    vms: Iterable[str] = (),
    templates: Iterable[str] = (),
    cpus: int = 8,
    memory_mib: int = 32768,
) -> FakeHost:
    """A new fake host at ``address`` (replacing one there), holding stopped ``vms`` and
    ``templates`` of these names; with ``username`` None it takes no credentials."""
    host = FakeHost(
        address=address,
        name=name or address.partition("://")[2] or address,
        username=username,
        password=password,
        fingerprint=fingerprint.upper() if fingerprint else None,
        cpus=cpus,
        memory_mib=memory_mib,
    )
    for vm in vms:
        host.add_vm(vm)
    for template in templates:
        host.add_vm(template, template=True)
    with _hosts_lock:
        old = _hosts.pop(address, None)
        _hosts[address] = host
    if old is not None:
        old.end_feeds(Unreachable(f"{address}: the host was replaced"))
    return host


def remove_fake_host(address: str) -> None:
    """Take the host at ``address`` away: providers on it find nothing there any more."""
    with _hosts_lock:
        host = _hosts.pop(address, None)
    if host is not None:
        host.set_reachable(False)


def get_fake_host(address: str) -> FakeHost:
    """The fake host at ``address``; ``NotFound`` if there is none."""
    with _hosts_lock:
        try:
            return _hosts[address]
        except KeyError:
            raise NotFound(f"no fake host at {address}") from None


class FakeProvider(Provider):
    """A provider of the fake host at ``connection.address``."""

    kind: ClassVar[str] = "fake"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(Capability)

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self._feed: _Feed | None = None

    # --- Reaching the host ---

    def _host(self) -> FakeHost:
        """The host, after the checks a real peer makes on every request."""
        address = self.connection.address
        with _hosts_lock:
            host = _hosts.get(address)
        if host is None or not host.reachable:
            raise Unreachable(f"{address}: no answer (no fake host answers there)")
        pinned = self.connection.fingerprint
        if host.fingerprint and (pinned or "").upper() != host.fingerprint:
            raise CertificateMismatch(address, host.fingerprint, pinned)
        if host.username is not None and (
            self.connection.username != host.username or self.connection.password != host.password
        ):
            raise CredentialsRefused(f"{address}: user {self.connection.username!r} refused")
        return host

    def _user(self) -> str | None:
        return self.connection.username

    def feed(self) -> _Feed:
        """The provider's feed of changes, started now unless it runs already."""
        host = self._host()
        live = self._feed
        if live is None or live.ended or live.host is not host or live.loop.is_closed():
            live = self._feed = host.follow()
        return live

    async def connect(self) -> HostRecord:
        host = self._host()
        self.feed()  # changes from now on reach the first events() stream
        return host.record()

    async def close(self) -> None:
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.host.end_feed(feed)

    async def snapshot(self) -> InventorySnapshot:
        host = self._host()
        with host.lock:
            return InventorySnapshot(
                host=host.record(),
                vms=tuple(vm.record() for vm in host.vms.values()),
                datastores=tuple(host.datastores),
                networks=tuple(host.networks),
            )

    async def ping(self) -> None:
        self._host()

    def events(self) -> AsyncIterator[ChangeEvent]:
        """Every change since ``connect()`` or the end of the previous stream (else from
        this call on): nothing is missed between a snapshot and the stream. Call it in
        the event loop that iterates it."""
        return FakeEventStream(self)

    # --- Power ---

    async def power(self, vm_id: str, action: PowerAction) -> VmRecord:
        host = self._host()
        with host.lock:
            vm = host.vm(vm_id)
            allowed, after = TRANSITIONS[action]
            if vm.template:
                raise InvalidState(vm.name, "a template", action.value)
            if vm.power_state not in allowed:
                raise InvalidState(vm.name, vm.power_state.value, action.value)
            vm.power_state = after or vm.power_state
            host.emit_vm(vm, f"vm.{action.value}", f"{vm.name}: {action.value}", self._user())
            return vm.record()

    # --- Creating and removing ---

    async def create(self, spec: CreateVm) -> VmRecord:
        host = self._host()
        with host.lock:
            _check_new_name(host, spec.name)
            if spec.template is not None:
                vm = _from_template(host, spec)
            else:
                vm = _from_scratch(host, spec)
            host.vms[vm.id] = vm
            host.emit_vm(vm, "vm.created", f"{vm.name}: created", self._user())
            return vm.record()

    async def delete(self, vm_id: str) -> None:
        host = self._host()
        with host.lock:
            vm = host.vm(vm_id)
            if vm.power_state not in DELETABLE:
                raise InvalidState(vm.name, vm.power_state.value, "delete")
            del host.vms[vm_id]
            host.emit(
                ChangeEvent(
                    ChangeKind.VM_REMOVED,
                    f"{vm.name}: deleted",
                    vm_id,
                    peer_kind="vm.deleted",
                    user=self._user(),
                )
            )

    async def reconfigure(self, vm_id: str, change: Reconfigure) -> VmRecord:
        host = self._host()
        with host.lock:
            vm = host.vm(vm_id)
            if vm.power_state != PowerState.STOPPED:
                raise InvalidState(vm.name, vm.power_state.value, "reconfigure")
            vm.cpus = _cpus(change.cpus) if change.cpus is not None else vm.cpus
            if change.memory_mib is not None:
                vm.memory_mib = _memory(change.memory_mib)
            host.emit_vm(vm, "vm.reconfigured", f"{vm.name}: reconfigured", self._user())
            return vm.record()

    async def clone(self, vm_id: str, name: str) -> VmRecord:
        host = self._host()
        with host.lock:
            source = host.vm(vm_id)
            if source.power_state != PowerState.STOPPED:
                raise InvalidState(source.name, source.power_state.value, "clone")
            _check_new_name(host, name)
            vm = _copy(source, name)
            host.vms[vm.id] = vm
            host.emit_vm(vm, "vm.cloned", f"{name}: cloned from {source.name}", self._user())
            return vm.record()

    # --- Snapshots ---

    async def snapshots(self, vm_id: str) -> list[SnapshotRecord]:
        host = self._host()
        with host.lock:
            vm = host.vm(vm_id)
            return [_current(s.record, vm) for s in vm.snapshots.values()]

    async def create_snapshot(self, vm_id: str, name: str) -> SnapshotRecord:
        host = self._host()
        with host.lock:
            vm = host.vm(vm_id)
            if not name:
                raise InvalidArgument("name", "a snapshot needs a name")
            record = SnapshotRecord(
                id=_next_id("snapshot"),
                name=name,
                parent=vm.current_snapshot,
                memory=vm.power_state in (PowerState.RUNNING, PowerState.PAUSED),
                created=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            vm.snapshots[record.id] = FakeSnapshot(record, vm.power_state)
            vm.current_snapshot = record.id
            host.emit_vm(vm, "snapshot.created", f"{vm.name}: snapshot {name} taken", self._user())
            return _current(record, vm)

    async def revert_snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotRecord:
        host = self._host()
        with host.lock:
            vm = host.vm(vm_id)
            snap = _snapshot(vm, snapshot_id)
            vm.power_state = snap.power_state if snap.record.memory else PowerState.STOPPED
            vm.current_snapshot = snapshot_id
            message = f"{vm.name}: reverted to snapshot {snap.record.name}"
            host.emit_vm(vm, "snapshot.reverted", message, self._user())
            return _current(snap.record, vm)

    async def delete_snapshot(self, vm_id: str, snapshot_id: str) -> None:
        host = self._host()
        with host.lock:
            vm = host.vm(vm_id)
            gone = _snapshot(vm, snapshot_id).record
            del vm.snapshots[snapshot_id]
            for sid, snap in vm.snapshots.items():  # its children move up to its parent
                if snap.record.parent == snapshot_id:
                    vm.snapshots[sid] = replace(
                        snap, record=replace(snap.record, parent=gone.parent)
                    )
            if vm.current_snapshot == snapshot_id:
                vm.current_snapshot = gone.parent
            message = f"{vm.name}: snapshot {gone.name} deleted"
            host.emit_vm(vm, "snapshot.deleted", message, self._user())

    # --- Consoles and the host ---

    async def console(self, vm_id: str, kind: ConsoleKind) -> ConsoleEndpoint:
        host = self._host()
        with host.lock:
            vm = host.vm(vm_id)
        url = f"{self.connection.address}/vms/{vm.id}/console/{kind.value}"
        return ConsoleEndpoint(kind=kind, url=url, fingerprint=host.fingerprint)

    async def set_maintenance(self, on: bool) -> HostRecord:
        host = self._host()
        with host.lock:
            host.maintenance = on
            record = host.record()
            state = "entered" if on else "left"
            host.emit(
                ChangeEvent(
                    ChangeKind.HOST_CHANGED,
                    f"{host.name}: {state} maintenance mode",
                    host=record,
                    peer_kind="host.maintenance",
                    user=self._user(),
                )
            )
            return record

    # --- High availability ---

    async def ha_heartbeat(self, timeout_s: float) -> bool:
        host = self._host()
        with host.lock:
            host.center_timeout_s = timeout_s
            host.center_heartbeats += 1
            fenced, host.fenced = host.fenced, False
            return fenced

    async def datastore_heartbeats(self, datastore: str) -> list[HeartbeatRecord]:
        host = self._host()
        if not host.has_datastore(datastore):
            raise NotFound(f"datastore {datastore!r} does not exist")
        now = host.clock()
        with _hosts_lock:
            sharing = [h for h in _hosts.values() if h.has_datastore(datastore)]
        return sorted((h.heartbeat(now) for h in sharing), key=lambda b: b.host_id)

    async def recover(self, vm_name: str, datastore: str) -> VmRecord:
        host = self._host()
        with host.lock:
            if not host.has_datastore(datastore):
                raise NotFound(f"datastore {datastore!r} does not exist")
            if host.maintenance:
                raise Busy(f"vm {vm_name!r}: cannot recover here: the host is in maintenance mode")
            _check_new_name(host, vm_name)
        owner = _holder(vm_name, datastore, host)
        with _both_locked(owner, host):
            vm = owner.vm_named(vm_name)
            if vm.template:
                raise InvalidState(vm.name, "a template", "recover")
            _check_new_name(host, vm_name)
            del owner.vms[vm.id]
            vm.power_state = PowerState.RUNNING
            host.vms[vm.id] = vm
            message = f"{vm.name}: taken over by {host.name}"
            owner.emit(ChangeEvent(ChangeKind.VM_REMOVED, message, vm.id, peer_kind="vm.fenced"))
            said = f"{vm.name}: taken over from {owner.name} (HA)"
            host.emit_vm(vm, "vm.recovered", said, self._user())
            return vm.record()

    # --- Live migration ---

    # --- Moving a stopped VM to another kind of host ---

    async def export_vm(self, vm_id: str, directory: Path) -> ExportedVm:
        host = self._host()
        with host.lock:
            vm = host.vm(vm_id)
            if vm.template or vm.power_state != PowerState.STOPPED:
                state = "a template" if vm.template else vm.power_state.value
                raise InvalidState(vm.name, state, "export")
            if vm.snapshots:
                raise Unsupported(f"vm {vm.name!r} has snapshots: delete them before it moves")
            exported = ExportedVm(vm.name, vm.cpus, vm.memory_mib)
            contents = vm.disks
        disks = []
        for i, content in enumerate(contents):
            path = directory / f"disk{i}.qcow2"
            await asyncio.to_thread(path.write_text, content)
            disks.append(ExportedDisk(f"disk{i}", path))
        return replace(exported, disks=tuple(disks))

    async def import_vm(self, exported: ExportedVm, datastore: str | None) -> VmRecord:
        host = self._host()
        contents = [await asyncio.to_thread(d.path.read_text) for d in exported.disks]
        with host.lock:
            if host.import_error is not None:
                raise host.import_error
            _check_new_name(host, exported.name)
            if datastore is not None and not host.has_datastore(datastore):
                raise InvalidArgument("datastore", f"{host.address} has no datastore {datastore!r}")
            store = datastore or (host.datastores[0].name if host.datastores else None)
            vm = FakeVm(
                id=_next_id("vm"),
                name=exported.name,
                cpus=_cpus(exported.cpus),
                memory_mib=_memory(exported.memory_mib),
                datastores=(store,) if store else (),
                disks=tuple(contents),
            )
            host.vms[vm.id] = vm
            host.emit_vm(vm, "vm.created", f"{vm.name}: imported", self._user())
            return vm.record()

    async def migration_spec(self, vm_id: str) -> dict[str, Any]:
        host = self._host()
        with host.lock:
            vm = host.vm(vm_id)
            return {
                "id": vm.id,
                "name": vm.name,
                "cpus": vm.cpus,
                "memory_mib": vm.memory_mib,
                "datastores": list(vm.datastores),
                "networks": list(vm.networks),
            }

    async def prepare_incoming(
        self, spec: dict[str, Any], options: MigrationOptions
    ) -> MigrationTicket:
        host = self._host()
        with host.lock:
            _check_new_name(host, str(spec.get("name") or ""))
            for network in spec.get("networks", []):
                _network(host, network)
            mode, datastore = _migration_mode(host, spec, options)
        token = secrets.token_hex(16)
        incoming = _Incoming(_next_id("migration"), host.address, spec["name"], mode, datastore)
        with _hosts_lock:
            _incoming[token] = incoming
        return MigrationTicket(
            id=incoming.id,
            token=token,
            address=host.address,
            port=MIGRATION_PORT,
            fingerprint=host.fingerprint or "",
            mode=mode,
        )

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
            if vm.template or vm.power_state != PowerState.RUNNING:
                state = "a template" if vm.template else vm.power_state.value
                raise InvalidState(vm.name, state, "migrate")
        incoming = _take_ticket(ticket, vm.name)  # used once, whatever comes of it
        started = time.monotonic()
        await _copy_memory(source, progress)
        if source.migration_error is not None:
            raise source.migration_error
        with _destination(incoming) as destination, _both_locked(source, destination):
            switched = time.monotonic()
            moved = _switch_over(source, destination, vm_id, incoming, self._user())
            downtime_ms = (time.monotonic() - switched) * 1000
        return {
            "vm": moved.name,
            "mode": incoming.mode,
            "downtime_ms": downtime_ms,
            "total_ms": (time.monotonic() - started) * 1000,
            "transferred_bytes": moved.memory_mib << 20,
            "destination": ticket.address,
        }


def _holder(vm_name: str, datastore: str, taker: FakeHost) -> FakeHost:
    """The fake host other than ``taker`` whose VM ``vm_name`` lies on ``datastore``
    (one they share), whether it answers or not."""
    with _hosts_lock:
        hosts = [h for h in _hosts.values() if h is not taker and h.has_datastore(datastore)]
    for host in hosts:
        with host.lock:
            if any(v.name == vm_name and datastore in v.datastores for v in host.vms.values()):
                return host
    raise NotFound(f"datastore {datastore} holds no vm {vm_name!r}")


def _check_new_name(host: FakeHost, name: str) -> None:
    if not name:
        raise InvalidArgument("name", "a VM needs a name")
    if any(vm.name == name for vm in host.vms.values()):
        raise AlreadyExists(f"{host.address}: a vm named {name!r} exists")


def _cpus(value: int) -> int:
    if value < 1:
        raise InvalidArgument("cpus", f"must be at least 1, not {value}")
    return value


def _memory(value: int) -> int:
    if value < 1:
        raise InvalidArgument("memory_mib", f"must be at least 1, not {value}")
    return value


def _network(host: FakeHost, name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if not any(n.name == name for n in host.networks):
        raise InvalidArgument("network", f"{host.address} has no network {name!r}")
    return (name,)


def _from_scratch(host: FakeHost, spec: CreateVm) -> FakeVm:
    return FakeVm(
        id=_next_id("vm"),
        name=spec.name,
        cpus=_cpus(spec.cpus),
        memory_mib=_memory(spec.memory_mib),
        datastores=(host.datastores[0].name,) if host.datastores else (),
        networks=_network(host, spec.network),
    )


def _from_template(host: FakeHost, spec: CreateVm) -> FakeVm:
    assert spec.template is not None
    template = host.vm(spec.template)
    if not template.template:
        raise InvalidArgument("template", f"{template.name!r} is a VM, not a template")
    vm = _copy(template, spec.name)
    vm.cpus = _cpus(spec.cpus)
    vm.memory_mib = _memory(spec.memory_mib)
    if spec.network is not None:
        vm.networks = _network(host, spec.network)
    return vm


def _copy(source: FakeVm, name: str) -> FakeVm:
    """A new stopped VM with ``source``'s hardware and no snapshots."""
    return FakeVm(
        id=_next_id("vm"),
        name=name,
        cpus=source.cpus,
        memory_mib=source.memory_mib,
        datastores=source.datastores,
        networks=source.networks,
    )


def _snapshot(vm: FakeVm, snapshot_id: str) -> FakeSnapshot:
    try:
        return vm.snapshots[snapshot_id]
    except KeyError:
        raise NotFound(f"vm {vm.name!r}: no snapshot with id {snapshot_id!r}") from None


def _current(record: SnapshotRecord, vm: FakeVm) -> SnapshotRecord:
    return replace(record, current=record.id == vm.current_snapshot)


# --- Live migration's helpers ---------------------------------------------------------


def _migration_mode(
    host: FakeHost, spec: dict[str, Any], options: MigrationOptions
) -> tuple[str, str | None]:
    """``shared`` where ``host`` has every datastore of the VM (the same paths, for a fake),
    else ``mirror`` to ``options.datastore`` or the host's first one."""
    names = [d.name for d in host.datastores]
    if options.datastore is not None and options.datastore not in names:
        raise InvalidArgument("datastore", f"{host.address} has no datastore {options.datastore!r}")
    if all(d in names for d in spec.get("datastores", [])):
        return "shared", None
    if not names:
        raise InvalidArgument("datastore", f"{host.address} has no datastore for the disks")
    return "mirror", options.datastore or names[0]


def _take_ticket(ticket: MigrationTicket, name: str) -> _Incoming:
    """The incoming migration ``ticket`` stands for, for the VM ``name``; it is then
    forgotten (a ticket lets one VM in, once)."""
    with _hosts_lock:
        incoming = _incoming.get(ticket.token)
        if (
            incoming is None
            or (incoming.id, incoming.destination) != (ticket.id, ticket.address)
            or incoming.name != name
        ):
            raise InvalidArgument("ticket", f"{ticket.address} expects no vm {name!r} with it")
        del _incoming[ticket.token]
    return incoming


async def _copy_memory(source: FakeHost, progress: MigrationProgress | None) -> None:
    """What copying the memory looks like: ``MIGRATION_STEPS`` steps over ``migration_s``."""
    for step in range(MIGRATION_STEPS):
        if progress is not None:
            progress(step * 100 // MIGRATION_STEPS, f"copying memory ({step}/{MIGRATION_STEPS})")
        await asyncio.sleep(source.migration_s / MIGRATION_STEPS)


@contextlib.contextmanager
def _destination(incoming: _Incoming) -> Iterator[FakeHost]:
    """The host that is receiving, if it still answers."""
    with _hosts_lock:
        host = _hosts.get(incoming.destination)
    if host is None or not host.reachable:
        raise Unreachable(f"{incoming.destination}: the destination does not answer")
    yield host


@contextlib.contextmanager
def _both_locked(first: FakeHost, second: FakeHost) -> Iterator[None]:
    """Both hosts' locks, always taken in the same order (two migrations in opposite
    directions do not wait for each other forever)."""
    ordered = sorted((first, second), key=lambda h: h.address)
    with ordered[0].lock, ordered[1].lock:
        yield


def _switch_over(
    source: FakeHost, destination: FakeHost, vm_id: str, incoming: _Incoming, user: str | None
) -> FakeVm:
    """The VM stops here and runs there (same id, snapshots along), as both hosts say."""
    vm = source.vm(vm_id)
    if vm.power_state != PowerState.RUNNING:
        raise InvalidState(vm.name, vm.power_state.value, "migrate")
    _check_new_name(destination, vm.name)
    del source.vms[vm_id]
    if incoming.mode == "mirror" and incoming.datastore is not None:
        vm.datastores = (incoming.datastore,)
    destination.vms[vm_id] = vm
    source.emit(
        ChangeEvent(
            ChangeKind.VM_REMOVED,
            f"{vm.name}: migrated to {destination.name}",
            vm_id,
            peer_kind="vm.migrated",
            user=user,
        )
    )
    destination.emit_vm(vm, "vm.migrated", f"{vm.name}: migrated from {source.name}", user)
    return vm


PROVIDER = FakeProvider
