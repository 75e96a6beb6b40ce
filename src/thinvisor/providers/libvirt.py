"""The libvirt provider: any host libvirt reaches, through libvirt-python.

``Connection.address`` is a libvirt URI (``qemu:///system``, ``qemu+ssh://root@kvm1/system``,
``xen://``, ...). With a username or password the connection is opened with
``openAuth``, which answers libvirt's questions for them (SASL, libssh2); without, with
``open``. Fingerprints do not apply: libvirt's transports check their own (TLS
certificates, SSH host keys), and ``Connection.fingerprint`` is ignored.

Records: ``VmRecord.id`` is the domain's UUID, so a rename on the host is a rename here.
Power states: running, blocked and shutting down are ``RUNNING``; paused ``PAUSED``; shut
off ``STOPPED``, or ``SUSPENDED`` when a managed save image waits; pmsuspended
``SUSPENDED``; crashed and the rest ``UNKNOWN``. ``SUSPEND`` is a managed save, which
``START`` or ``RESUME`` restores and ``STOP`` drops. A VM's datastores are the storage
pools holding its disks (a pool holds the files of its target directory), its networks
the libvirt networks (or, for bridged NICs, the bridges) of its interfaces; the
inventory lists those bridges as networks too (id ``bridge:<name>``).

Rules where libvirt leaves a choice:

- ``create`` defines a domain of the virtualization type most of the host's domains use
  (so a host that runs its guests under TCG gets TCG), else the best the host offers
  (kvm before qemu), for the host's architecture, with ACPI, a serial console on a pty
  and a VNC display (listening where the host's configuration says). Its disk is a
  blank qcow2 volume in the pool named ``default`` if that is an active directory pool,
  else in the first active directory pool by name. ``network`` names a libvirt network,
  or a bridge the host's domains already use.
- ``delete`` refuses a running domain; it undefines the domain with its managed save
  image, snapshot and checkpoint metadata and NVRAM, then deletes its writable disks that
  are volumes of a pool and that no other domain uses. Files outside pools are kept.
- ``clone`` copies every writable disk (each must be a pool volume) in its pool with
  ``storageVolCreateXMLFrom``; read-only and shareable disks are shared. The clone gets
  a new name, UUID, MAC addresses and NVRAM.
- Snapshots are libvirt's default: internal (qcow2) snapshots, with the memory of a
  running domain. ``SnapshotRecord.id`` is the snapshot's name.
- Consoles: VNC where the running domain has a VNC display on an address
  (``vnc://host:port``); serial where its serial port is a TCP server (``telnet://`` or
  ``tcp://``). A serial console on a pty is reached only through libvirt's console
  stream, not at an address: ``Unsupported``, as is a VNC display on a unix socket.

libvirt's API blocks, so every call runs in a worker thread. Events need an event loop
registered with libvirt before connections are opened, once per process: this module
runs libvirt's own (``virEventRegisterDefaultImpl``) in one daemon thread. libvirtaio's
adapter would tie libvirt to one asyncio loop, while providers call libvirt from worker
threads and live in several loops, and its handle and timer callbacks are not thread
safe; libvirt's own loop is. Each connection registers for lifecycle events (defined,
undefined, started, stopped, ...) as it opens, so that ``events()`` streams every change
from ``connect()`` on: what came before the iterator waits in a backlog (past
``BACKLOG_MAX`` changes, a single ``RESYNC`` replaces it). The callbacks hand each change
to the loop of each iterator; the connection's close callback ends them with
``Unreachable``. Keepalive probes (every 5 s, 3 missed) find a dead peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import libvirt

from thinvisor.errors import (
    AlreadyExists,
    CredentialsRefused,
    InvalidArgument,
    InvalidState,
    NotFound,
    ProviderError,
    ThinvisorError,
    Unreachable,
    Unsupported,
)
from thinvisor.providers import _libvirt_xml as lx
from thinvisor.providers._libvirt_host import MISSING, CpuMeter, Host
from thinvisor.providers.base import (
    SUSPEND_ACTIONS,
    Capability,
    ChangeEvent,
    ChangeKind,
    Connection,
    ConsoleEndpoint,
    ConsoleKind,
    CreateVm,
    ExportedDisk,
    ExportedVm,
    HostRecord,
    InventorySnapshot,
    PowerAction,
    Provider,
    Reconfigure,
    SnapshotRecord,
    VmRecord,
)
from thinvisor.storage.disk import Images

T = TypeVar("T")

KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3
BACKLOG_MAX = 1000


# --- libvirt's event loop, one per process --------------------------------------------


class _EventLoop:
    """libvirt's own event loop, registered once per process (libvirt takes only one,
    before connections are opened) and run by a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            libvirt.registerErrorHandler(lambda *_: None, None)  # errors raise; none printed
            libvirt.virEventRegisterDefaultImpl()
            self._thread = threading.Thread(target=self._run, name="libvirt-events", daemon=True)
            self._thread.start()

    @staticmethod
    def _run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()


_EVENT_LOOP = _EventLoop()


# --- Errors ---------------------------------------------------------------------------

_LOST = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
    }
)
_REFUSED = frozenset(
    {libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED, libvirt.VIR_ERR_AUTH_UNAVAILABLE}
)
_EXISTING = frozenset({libvirt.VIR_ERR_DOM_EXIST, libvirt.VIR_ERR_STORAGE_VOL_EXIST})
_TRANSPORTS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})


def error_text(exc: libvirt.libvirtError) -> str:
    """libvirt's message for ``exc``, on one line."""
    return " ".join(str(exc.get_error_message() or exc).split())


def translate(
    exc: libvirt.libvirtError,
    address: str,
    vm: str | None = None,
    action: str | None = None,
    *,
    connecting: bool = False,
) -> ThinvisorError:
    """thinvisor's error for a libvirt error met at ``address`` while acting on the
    domain ``vm`` (or the host) to ``action``, or while ``connecting``."""
    code, origin = exc.get_error_code(), exc.get_error_domain()
    subject = f"domain {vm!r}" if vm else "cannot connect" if connecting else "host"
    message = f"{address}: {subject}: {error_text(exc)}"
    if code in _REFUSED or (connecting and code == libvirt.VIR_ERR_ACCESS_DENIED):
        return CredentialsRefused(message)
    lost = code in _LOST or (origin in _TRANSPORTS and code == libvirt.VIR_ERR_INTERNAL_ERROR)
    if connecting or lost:
        return Unreachable(message)
    if code in MISSING:
        return NotFound(message)
    if code in _EXISTING:
        return AlreadyExists(message)
    if code == libvirt.VIR_ERR_OPERATION_INVALID and vm and action:
        return InvalidState(vm, f"in its present state ({error_text(exc)})", action)
    return ProviderError(message)


# --- Event streams --------------------------------------------------------------------


@dataclass(frozen=True)
class _Lifecycle:
    vm_id: str
    name: str
    event: int
    detail: int


_Item = _Lifecycle | ChangeEvent | Exception | None


@dataclass(eq=False)
class _Stream:
    """One ``events()`` iterator: its loop and queue, and the connection it follows."""

    loop: asyncio.AbstractEventLoop
    conn: Any = None
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)

    def put(self, item: _Item) -> None:
        """Hand ``item`` to the iterator, from any thread."""
        with contextlib.suppress(RuntimeError):  # its loop is closed: nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "an error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "the host closed it",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "no keepalive answer",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed here",
}


# --- The provider ---------------------------------------------------------------------


class LibvirtProvider(Provider):
    """A host libvirt reaches, at the URI ``connection.address``."""

    kind: ClassVar[str] = "libvirt"
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.EVENTS,
            Capability.POWER,
            Capability.SUSPEND,
            Capability.CREATE,
            Capability.DELETE,
            Capability.RECONFIGURE,
            Capability.CLONE,
            Capability.SNAPSHOT,
            Capability.CONSOLE,
            Capability.TRANSFER,
        }
    )

    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self._conn: Any = None
        self._callback: int | None = None  # libvirt's id for the lifecycle callback
        self._streams: set[_Stream] = set()
        # Lifecycle events from connect() on that no iterator took yet; past
        # BACKLOG_MAX of them, the next iterator gets one RESYNC instead.
        self._backlog: list[_Lifecycle] = []
        self._overflowed = False
        # _lock guards the attributes above and is never held over a call to the host;
        # _opening is held while a connection is opened (which may take long).
        self._lock = threading.Lock()
        self._opening = threading.Lock()
        self._cpu = CpuMeter()  # the CPU load between two snapshots

    @property
    def address(self) -> str:
        return self.connection.address

    # Connecting

    async def connect(self) -> HostRecord:
        return await self._run(Host.host)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            self._retire(conn, None)  # its iterators end quietly

    def _retire(self, conn: Any, ending: Exception | None) -> None:
        """Close ``conn``, ending its event iterators with ``ending`` (None: quietly)."""
        with self._lock:
            streams = [s for s in self._streams if s.conn is conn]
            self._streams.difference_update(streams)
            callback, self._callback = self._callback, None
        for stream in streams:
            stream.put(ending)
        with contextlib.suppress(libvirt.libvirtError):
            if callback is not None:
                conn.domainEventDeregisterAny(callback)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _open(self) -> Any:
        """The open connection, opened (again) if there is none or it died; in a worker
        thread."""
        with self._opening:
            with self._lock:
                conn = self._conn
            if conn is not None:
                if _alive(conn):
                    return conn
                self._retire(conn, self._lost(libvirt.VIR_CONNECT_CLOSE_REASON_ERROR))
            _EVENT_LOOP.ensure()
            try:
                conn = self._open_connection()
            except libvirt.libvirtError as exc:
                raise translate(exc, self.address, connecting=True) from exc
            with contextlib.suppress(libvirt.libvirtError):  # drivers without keepalive
                conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
            conn.registerCloseCallback(self._on_closed, None)
            # From connect() on, so that nothing is missed before events() is called.
            callback = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
            with self._lock:
                self._conn, self._callback = conn, callback
            return conn

    def _open_connection(self) -> Any:
        if not self.address:
            raise InvalidArgument("address", "a libvirt URI is needed (qemu:///system, ...)")
        if self.connection.username is None and self.connection.password is None:
            return libvirt.open(self.address)
        asked = [
            libvirt.VIR_CRED_AUTHNAME,
            libvirt.VIR_CRED_PASSPHRASE,
            libvirt.VIR_CRED_NOECHOPROMPT,
        ]
        return libvirt.openAuth(self.address, [asked, self._answer, None], 0)

    def _answer(self, credentials: list[list[Any]], _opaque: object) -> int:
        """Answer libvirt's questions for credentials: the username and the password."""
        for credential in credentials:
            if credential[0] == libvirt.VIR_CRED_AUTHNAME:
                credential[4] = self.connection.username or ""
            elif credential[0] in (libvirt.VIR_CRED_PASSPHRASE, libvirt.VIR_CRED_NOECHOPROMPT):
                credential[4] = self.connection.password or ""
            else:
                return -1  # a question no stored credential answers
        return 0

    def _on_closed(self, conn: Any, reason: int, _opaque: object) -> None:
        """libvirt lost the connection ``conn``: its iterators raise ``Unreachable``
        (in libvirt's event thread)."""
        with self._lock:
            streams = [s for s in self._streams if s.conn is conn]
        for stream in streams:
            stream.put(self._lost(reason))

    def _on_lifecycle(
        self, conn: Any, domain: Any, event: int, detail: int, _opaque: object
    ) -> None:
        """libvirt's lifecycle callback, in its event thread: to the iterators following
        ``conn``, else to the backlog (the domain's UUID and name are known locally)."""
        item = _Lifecycle(domain.UUIDString(), domain.name(), event, detail)
        with self._lock:
            streams = [s for s in self._streams if s.conn is conn]
            if not streams and not self._overflowed:
                self._backlog.append(item)
                if len(self._backlog) > BACKLOG_MAX:  # a resync will tell it all
                    self._overflowed = True
                    self._backlog.clear()
        for stream in streams:
            stream.put(item)

    def _lost(self, reason: int) -> Unreachable:
        why = _CLOSE_REASONS.get(reason, f"reason {reason}")
        return Unreachable(f"{self.address}: the connection to libvirt was lost ({why})")

    async def _run(
        self,
        operation: Callable[..., T],
        *args: Any,
        vm: str | None = None,
        action: str | None = None,
    ) -> T:
        """``operation(host, *args)`` in a worker thread, libvirt's errors translated as
        met on the domain ``vm`` for ``action``."""

        def work() -> T:
            try:
                return operation(Host(self._open(), self.address), *args)
            except libvirt.libvirtError as exc:
                raise translate(exc, self.address, vm, action) from exc

        return await asyncio.to_thread(work)

    # Reading

    async def snapshot(self) -> InventorySnapshot:
        def read(host: Host) -> tuple[InventorySnapshot, dict[str, int] | None]:
            return host.inventory(), host.cpu_times()

        snap, times = await self._run(read)
        if times is None:
            return snap
        return replace(snap, host=replace(snap.host, cpu_load=self._cpu.update(times)))

    async def ping(self) -> None:
        await self._run(lambda host: host.conn.getLibVersion())

    # Events

    async def events(self) -> AsyncIterator[ChangeEvent]:
        """Lifecycle events of every domain from ``connect()`` on, until the connection
        is lost (then ``Unreachable``) or closed here (then the iteration ends)."""
        self.require(Capability.EVENTS)
        stream = _Stream(asyncio.get_running_loop())
        await self._run(self._subscribe, stream)
        try:
            while True:
                item = await stream.queue.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item if isinstance(item, ChangeEvent) else await self._change(item)
        finally:
            with self._lock:
                self._streams.discard(stream)

    def _subscribe(self, host: Host, stream: _Stream) -> None:
        """Follow ``host``'s connection, starting with the backlog."""
        stream.conn = host.conn
        with self._lock:
            if self._overflowed:
                message = f"{self.address}: more than {BACKLOG_MAX} events were not taken"
                stream.put(ChangeEvent(ChangeKind.RESYNC, message))
            for item in self._backlog:
                stream.put(item)
            self._backlog.clear()
            self._overflowed = False
            self._streams.add(stream)

    async def _change(self, item: _Lifecycle) -> ChangeEvent:
        """The change a lifecycle event says, with the domain as it is now."""
        kind = lx.event_name(item.event, item.detail)
        message = lx.event_message(item.name, kind)
        if item.event != libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
            try:
                vm = await self._run(Host.vm, item.vm_id, vm=item.name)
            except NotFound:
                pass  # gone since
            else:
                return ChangeEvent(ChangeKind.VM_CHANGED, message, item.vm_id, vm, peer_kind=kind)
        return ChangeEvent(ChangeKind.VM_REMOVED, message, item.vm_id, peer_kind=kind)

    # Actions

    async def power(self, vm_id: str, action: PowerAction) -> VmRecord:
        needs = Capability.SUSPEND if action in SUSPEND_ACTIONS else Capability.POWER
        return await self._on_vm(needs, Host.power, vm_id, action, action=action.value)

    async def create(self, spec: CreateVm) -> VmRecord:
        self.require(Capability.TEMPLATES if spec.template else Capability.CREATE)
        _check_spec(spec)
        return await self._run(Host.create, spec, vm=spec.name, action="create")

    async def delete(self, vm_id: str) -> None:
        await self._on_vm(Capability.DELETE, Host.delete, vm_id, action="delete")

    async def reconfigure(self, vm_id: str, change: Reconfigure) -> VmRecord:
        _at_least_one(("cpus", change.cpus), ("memory_mib", change.memory_mib))
        return await self._on_vm(
            Capability.RECONFIGURE, Host.reconfigure, vm_id, change, action="reconfigure"
        )

    async def clone(self, vm_id: str, name: str) -> VmRecord:
        _check_name("name", name)
        return await self._on_vm(Capability.CLONE, Host.clone, vm_id, name, action="clone")

    async def snapshots(self, vm_id: str) -> list[SnapshotRecord]:
        return await self._on_vm(Capability.SNAPSHOT, Host.snapshots, vm_id)

    async def create_snapshot(self, vm_id: str, name: str) -> SnapshotRecord:
        _check_name("name", name)
        return await self._on_vm(
            Capability.SNAPSHOT, Host.create_snapshot, vm_id, name, action="snapshot"
        )

    async def revert_snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotRecord:
        return await self._on_vm(
            Capability.SNAPSHOT, Host.revert_snapshot, vm_id, snapshot_id, action="revert"
        )

    async def delete_snapshot(self, vm_id: str, snapshot_id: str) -> None:
        await self._on_vm(
            Capability.SNAPSHOT,
            Host.delete_snapshot,
            vm_id,
            snapshot_id,
            action="delete a snapshot",
        )

    async def console(self, vm_id: str, kind: ConsoleKind) -> ConsoleEndpoint:
        return await self._on_vm(
            Capability.CONSOLE, Host.console, vm_id, kind, action="open a console"
        )

    async def export_vm(self, vm_id: str, directory: Path) -> ExportedVm:
        """The stopped domain's volumes (flattened to qcow2 here) and boot files."""
        self.require(Capability.TRANSFER)
        exported = await self._run(Host.export_files, vm_id, directory, vm=vm_id, action="export")
        disks = [await _flattened(exported.name, disk) for disk in exported.disks]
        return replace(exported, disks=tuple(disks))

    async def import_vm(self, exported: ExportedVm, datastore: str | None) -> VmRecord:
        self.require(Capability.TRANSFER)
        _check_name("name", exported.name)
        return await self._run(
            Host.import_files, exported, datastore, vm=exported.name, action="import"
        )

    async def _on_vm(
        self,
        needs: Capability,
        operation: Callable[..., T],
        vm_id: str,
        *args: Any,
        action: str | None = None,
    ) -> T:
        """``operation(host, vm_id, *args)``, once this provider is known to have the
        capability it ``needs``."""
        self.require(needs)
        return await self._run(operation, vm_id, *args, vm=vm_id, action=action)


async def _flattened(vm: str, disk: ExportedDisk) -> ExportedDisk:
    """A downloaded volume converted into one qcow2 image next to it (an overlay, whose
    backing file did not come along, is refused)."""
    images = Images()
    info = await images.info(disk.path)
    if info.backing_file:
        raise Unsupported(
            f"domain {vm!r}: disk {disk.name} is an overlay on {info.backing_file}:"
            " flatten it (virsh blockpull) before it moves"
        )
    target = disk.path.with_name(f"{disk.name}.qcow2")
    await images.convert(disk.path, target, "qcow2", source_format=info.format)
    disk.path.unlink()
    return ExportedDisk(disk.name, target, "qcow2")


def _alive(conn: Any) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _check_name(field_name: str, name: str) -> None:
    if not name or "/" in name:
        raise InvalidArgument(field_name, f"{name!r} is no libvirt name (empty, or with '/')")


def _at_least_one(*values: tuple[str, int | None]) -> None:
    for name, value in values:
        if value is not None and value < 1:
            raise InvalidArgument(name, f"must be at least 1, not {value}")


def _check_spec(spec: CreateVm) -> None:
    """Refuse a new VM's impossible values before anything is made."""
    _check_name("name", spec.name)
    _at_least_one(("cpus", spec.cpus), ("memory_mib", spec.memory_mib), ("disk_mib", spec.disk_mib))


PROVIDER = LibvirtProvider
