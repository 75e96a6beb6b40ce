"""The small interface every provider implements, and the records it speaks in.

A provider is the center's driver for one managed host: a thinvisor agent, anything
libvirt reaches, a vCenter or ESXi, or an in-memory fake. It is a thin facade: it
translates the peer's API into these records and the peer's faults into thinvisor's
errors (``raise ... from exc``), and holds no inventory of its own.

What a provider can do is said by its ``capabilities``, never by a method that fails
half way: the center checks the flag before it calls, and a call without the flag
raises ``Unsupported`` naming the capability (``Provider.require``).

Identifiers: ``VmRecord.id`` is the peer's own stable id for the VM (a thinvisor VM's
name, a libvirt domain's UUID, a vSphere managed object id); the center keys its
inventory on (host, id) so that a rename on the peer is seen as a rename.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal

from thinvisor.errors import Unsupported


class Capability(StrEnum):
    EVENTS = "events"
    """``events()`` streams changes as they happen (else the center refreshes by polling)."""
    POWER = "power"
    """``power()``: start, stop (hard), shutdown (guest), reset."""
    SUSPEND = "suspend"
    """``power()``: pause, resume (and suspend where the peer has it)."""
    CREATE = "create"
    """``create()`` a VM from scratch."""
    TEMPLATES = "templates"
    """``create()`` from a template the host holds (``CreateVm.template``)."""
    DELETE = "delete"
    """``delete()`` a VM and its disks."""
    RECONFIGURE = "reconfigure"
    """``reconfigure()`` CPUs and memory of a stopped VM."""
    CLONE = "clone"
    """``clone()`` a stopped VM (or template) on the same host."""
    SNAPSHOT = "snapshot"
    """``snapshots()``, ``create_snapshot()``, ``revert_snapshot()``, ``delete_snapshot()``."""
    CONSOLE = "console"
    """``console()``: where a VM's serial or graphical console is reached."""
    MAINTENANCE = "maintenance"
    """``set_maintenance()`` on the host."""
    MIGRATE = "migrate"
    """Live-migrate a running VM to another host of the same provider kind:
    ``migration_spec()``, ``prepare_incoming()`` (on the destination), ``migrate()``."""
    HA = "ha"
    """High availability: ``ha_heartbeat()`` (the center's heartbeat, which arms the host's
    self-fencing), ``datastore_heartbeats()`` (every host's heartbeat on a shared
    datastore) and ``recover()`` (take a dead host's VM over and start it)."""
    TRANSFER = "transfer"
    """Move a stopped VM to a host of another provider kind through the center's
    machine: ``export_vm()`` (its disks flattened to qcow2, its boot files) and
    ``import_vm()`` (a stopped VM made from them)."""


class PowerState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    UNKNOWN = "unknown"
    """The center cannot know (the host is disconnected), or the peer said something else."""


class PowerAction(StrEnum):
    START = "start"
    STOP = "stop"
    """Power off at once, as pulling the plug."""
    SHUTDOWN = "shutdown"
    """Ask the guest to shut down (ACPI); returns once asked, not once off."""
    RESET = "reset"
    PAUSE = "pause"
    RESUME = "resume"
    SUSPEND = "suspend"


#: Actions that need ``Capability.SUSPEND`` rather than ``Capability.POWER``.
SUSPEND_ACTIONS = frozenset({PowerAction.PAUSE, PowerAction.RESUME, PowerAction.SUSPEND})


class ConsoleKind(StrEnum):
    SERIAL = "serial"
    VNC = "vnc"


@dataclass(frozen=True)
class HostRecord:
    """The host as its peer describes it."""

    name: str
    """The peer's own name for the host (its hostname, or vSphere's host name)."""
    vendor: str
    """``thinvisor``, ``libvirt/<driver>`` (``libvirt/qemu``), ``vsphere`` or ``fake``."""
    version: str
    cpus: int
    memory_mib: int
    maintenance: bool = False
    host_id: str | None = None
    """The peer's own id for the host where it has one (a thinvisor agent's: what its
    datastore heartbeat files and its VMs' owner files are named)."""
    core_mhz: int = 0
    """One core's clock, the unit of CPU reservations; 0: the peer does not say."""
    cpu_load: float | None = None
    """How busy all its CPUs are, 0 (idle) to 1 (all busy); None: not known."""
    reserved_cpu_mhz: int = 0
    reserved_memory_mib: int = 0
    """What the host keeps for itself, that its VMs may not reserve or use."""


@dataclass(frozen=True)
class VmRecord:
    id: str
    name: str
    power_state: PowerState
    cpus: int
    memory_mib: int
    template: bool = False
    datastores: tuple[str, ...] = ()
    """Names of the datastores (storage pools) holding the VM's disks."""
    networks: tuple[str, ...] = ()
    """Names of the networks (port groups, libvirt networks or bridges) of its NICs."""
    uuid: str | None = None
    """The VM's SMBIOS UUID, where the peer reports one."""
    reserved_cpu_mhz: int = 0
    reserved_memory_mib: int = 0
    """What the VM reserves of its host (guaranteed while it runs), where the peer says."""


@dataclass(frozen=True)
class DatastoreRecord:
    id: str
    name: str
    capacity_bytes: int | None = None
    free_bytes: int | None = None


@dataclass(frozen=True)
class NetworkRecord:
    id: str
    name: str


@dataclass(frozen=True)
class InventorySnapshot:
    """Everything a host holds, at one moment."""

    host: HostRecord
    vms: tuple[VmRecord, ...] = ()
    datastores: tuple[DatastoreRecord, ...] = ()
    networks: tuple[NetworkRecord, ...] = ()


class ChangeKind(StrEnum):
    VM_CHANGED = "vm.changed"
    """A VM was created or changed: ``vm`` holds it as it is now."""
    VM_REMOVED = "vm.removed"
    """A VM is gone: ``vm_id`` names it."""
    HOST_CHANGED = "host.changed"
    """The host itself changed (maintenance, say): ``host`` holds it."""
    RESYNC = "resync"
    """The provider may have missed changes: the center takes a full snapshot again."""


@dataclass(frozen=True)
class ChangeEvent:
    kind: ChangeKind
    message: str
    """One line for the center's merged event list, as the peer said it where it did."""
    vm_id: str | None = None
    vm: VmRecord | None = None
    host: HostRecord | None = None
    peer_kind: str | None = None
    """The peer's own name for what happened (``vm.started``, ``VmPoweredOnEvent``, ...)."""
    user: str | None = None


@dataclass(frozen=True)
class CreateVm:
    """A VM to create: from scratch, or from ``template`` (a template on the same host)."""

    name: str
    cpus: int = 1
    memory_mib: int = 256
    disk_mib: int | None = None
    """A blank system disk of this size; None: none (or the template's disks)."""
    template: str | None = None
    """The template's ``VmRecord.id``: its disks are cloned, and the new VM gets ``cpus``
    and ``memory_mib`` (the center passes the template's own where the operator gave none)."""
    network: str | None = None
    """A network of the host for one NIC; None: no NIC (or the template's)."""


@dataclass(frozen=True)
class Reconfigure:
    """Changes to a stopped VM; ``None`` keeps a value."""

    cpus: int | None = None
    memory_mib: int | None = None


@dataclass(frozen=True)
class SnapshotRecord:
    id: str
    name: str
    parent: str | None = None
    current: bool = False
    memory: bool = False
    created: str | None = None
    """ISO 8601, where the peer says."""


@dataclass(frozen=True)
class ConsoleEndpoint:
    """Where a console is reached; the center brokers it for its clients."""

    kind: ConsoleKind
    url: str
    """``wss://...`` for a WebSocket (thinvisor), ``vnc://host:port`` for a plain VNC
    server (libvirt), a vSphere WebMKS ticket URL, ..."""
    headers: dict[str, str] = field(default_factory=dict)
    """What the client must send with it (an ``Authorization`` header, say)."""
    fingerprint: str | None = None
    """The SHA-256 fingerprint the endpoint's TLS certificate must have, where it has one."""


@dataclass(frozen=True)
class Connection:
    """How to reach one host; what each field means depends on the provider."""

    address: str
    """thinvisor: ``https://host:8443``; libvirt: a URI (``qemu+ssh://...``,
    ``qemu:///system``); vsphere: ``https://vcenter`` or ``host:port``; fake: any name."""
    username: str | None = None
    password: str | None = None
    """A password, or for thinvisor an API token (``tv_...``) the center keeps instead."""
    fingerprint: str | None = None
    """The SHA-256 fingerprint of the host's TLS certificate, pinned (``AA:BB:...``)."""


#: How a running VM's memory is copied when it moves (``MigrationOptions.memory_copy``).
MemoryCopyChoice = Literal["auto", "live", "paused"]


@dataclass(frozen=True)
class MigrationOptions:
    """How a VM is live-migrated."""

    downtime_ms: int = 300
    """The longest pause of the VM that the switch-over may take."""
    auto_converge: bool = True
    """Slow the VM's CPUs down where its memory changes faster than it is copied."""
    bandwidth_mib_s: int | None = None
    """The most the copy may use (None: as much as it gets)."""
    memory_copy: MemoryCopyChoice = "auto"
    """live: memory copied as the VM runs; paused: the VM paused for the whole copy;
    auto: live where the host's hypervisor copies it safely (thinvisor: KVM, or QEMU 9.0
    and later), paused elsewhere. Providers that only copy live ignore it."""
    datastore: str | None = None
    """The destination's datastore for the VM's disks where they must be copied there
    (the destination does not see them at the same paths); None: its default one."""
    live: bool = True
    """A running VM, moved as it runs; False: a stopped VM, its files moved (cold)."""


@dataclass(frozen=True)
class MigrationTicket:
    """What the destination hands out for one incoming VM, and the source needs to send it."""

    id: str
    token: str = field(repr=False)
    """The secret that lets the source in, once."""
    address: str
    """The destination's host name or IP address, as the source reaches it."""
    port: int
    fingerprint: str
    """The SHA-256 fingerprint of the destination's migration endpoint's certificate."""
    mode: str
    """``shared`` (the destination sees the VM's disks where they are) or ``mirror`` (the
    disks are copied along with the memory)."""


@dataclass(frozen=True)
class HeartbeatRecord:
    """One host's heartbeat on a shared datastore, as the host asked sees it."""

    host_id: str
    """The writer's ``HostRecord.host_id``."""
    seq: int
    """The writer's count, growing with each write."""
    age_s: float
    """Seconds since it was last written, by the clock of the host asked."""


@dataclass(frozen=True)
class ExportedDisk:
    """One disk of an exported VM: a single image, no backing chain."""

    name: str
    path: Path
    """The image on the center's machine."""
    format: str = "qcow2"


@dataclass(frozen=True)
class ExportedVm:
    """A stopped VM as ``export_vm`` wrote it into a directory on the center's machine."""

    name: str
    cpus: int
    memory_mib: int
    disks: tuple[ExportedDisk, ...] = ()
    kernel: Path | None = None
    """The kernel for direct kernel boot; None: the VM boots through its firmware."""
    initrd: Path | None = None
    cmdline: str | None = None


#: Reports how far a migration is: a percentage and what it is doing.
MigrationProgress = Callable[[int, str], None]


class Provider(ABC):
    """One managed host. Every method may raise ``Unreachable`` (no answer),
    ``ProviderError`` (the peer failed), ``NotFound`` (no such VM or snapshot),
    ``InvalidState`` (not in this power state) or ``Unsupported`` (no capability)."""

    kind: ClassVar[str]
    capabilities: ClassVar[frozenset[Capability]]

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def require(self, capability: Capability, action: str | None = None) -> None:
        """Raise ``Unsupported`` unless this provider has ``capability``; ``action`` (a
        power action, say) is what the message says cannot be done, where it is given."""
        if capability not in self.capabilities:
            # The message names the capability too: it is what the support matrix lists.
            what = f"{action} VMs" if action else capability.value
            raise Unsupported(
                f"{self.connection.address} ({self.kind}): cannot {what}"
                f" (the {self.kind} provider has no {capability.value} capability)"
            )

    @abstractmethod
    async def connect(self) -> HostRecord:
        """Open the connection (checking the certificate and the credentials: raises
        ``Unreachable``, ``CertificateMismatch``, ``CredentialsRefused``)."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection; safe to call twice, and after a failed ``connect``."""

    @abstractmethod
    async def snapshot(self) -> InventorySnapshot:
        """The whole inventory of the host, now."""

    async def ping(self) -> None:
        """Raise ``Unreachable`` unless the host answers (cheaply) now."""
        await self.snapshot()

    def events(self) -> AsyncIterator[ChangeEvent]:
        """Changes as they happen, until the connection is lost (then ``Unreachable``)."""
        self.require(Capability.EVENTS)
        raise AssertionError("a provider with EVENTS overrides events()")

    async def power(self, vm_id: str, action: PowerAction) -> VmRecord:
        needed = Capability.SUSPEND if action in SUSPEND_ACTIONS else Capability.POWER
        self.require(needed, action.value)
        raise AssertionError("a provider with POWER overrides power()")

    async def create(self, spec: CreateVm) -> VmRecord:
        self.require(Capability.TEMPLATES if spec.template else Capability.CREATE)
        raise AssertionError("a provider with CREATE or TEMPLATES overrides create()")

    async def delete(self, vm_id: str) -> None:
        self.require(Capability.DELETE)
        raise AssertionError("a provider with DELETE overrides delete()")

    async def reconfigure(self, vm_id: str, change: Reconfigure) -> VmRecord:
        self.require(Capability.RECONFIGURE)
        raise AssertionError("a provider with RECONFIGURE overrides reconfigure()")

    async def clone(self, vm_id: str, name: str) -> VmRecord:
        self.require(Capability.CLONE)
        raise AssertionError("a provider with CLONE overrides clone()")

    async def snapshots(self, vm_id: str) -> list[SnapshotRecord]:
        self.require(Capability.SNAPSHOT)
        raise AssertionError("a provider with SNAPSHOT overrides snapshots()")

    async def create_snapshot(self, vm_id: str, name: str) -> SnapshotRecord:
        self.require(Capability.SNAPSHOT)
        raise AssertionError("a provider with SNAPSHOT overrides create_snapshot()")

    async def revert_snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotRecord:
        self.require(Capability.SNAPSHOT)
        raise AssertionError("a provider with SNAPSHOT overrides revert_snapshot()")

    async def delete_snapshot(self, vm_id: str, snapshot_id: str) -> None:
        self.require(Capability.SNAPSHOT)
        raise AssertionError("a provider with SNAPSHOT overrides delete_snapshot()")

    async def console(self, vm_id: str, kind: ConsoleKind) -> ConsoleEndpoint:
        self.require(Capability.CONSOLE)
        raise AssertionError("a provider with CONSOLE overrides console()")

    async def set_maintenance(self, on: bool) -> HostRecord:
        self.require(Capability.MAINTENANCE)
        raise AssertionError("a provider with MAINTENANCE overrides set_maintenance()")

    async def migration_spec(self, vm_id: str) -> dict[str, Any]:
        """The VM's configuration as the destination's ``prepare_incoming`` takes it."""
        self.require(Capability.MIGRATE)
        raise AssertionError("a provider with MIGRATE overrides migration_spec()")

    async def prepare_incoming(
        self, spec: dict[str, Any], options: MigrationOptions
    ) -> MigrationTicket:
        """Make this host ready to receive the VM ``spec`` (from another host's
        ``migration_spec``); the ticket the source's ``migrate`` needs. Bad input (a name
        taken here, a network missing) raises before anything is made."""
        self.require(Capability.MIGRATE)
        raise AssertionError("a provider with MIGRATE overrides prepare_incoming()")

    async def migrate(
        self,
        vm_id: str,
        ticket: MigrationTicket,
        options: MigrationOptions,
        progress: MigrationProgress | None = None,
    ) -> dict[str, Any]:
        """Move the running VM to the host that issued ``ticket``; what it took:
        ``{"vm", "mode", "downtime_ms", "total_ms", "transferred_bytes", "destination"}``.
        Once it returns, the VM runs there (with the same id) and is gone here; when it
        raises, or is cancelled, the VM still runs here."""
        self.require(Capability.MIGRATE)
        raise AssertionError("a provider with MIGRATE overrides migrate()")

    async def ha_heartbeat(self, timeout_s: float) -> bool:
        """The center's heartbeat: the host powers its VMs off once it hears nothing from
        the center and cannot write its datastore heartbeats for longer than
        ``timeout_s``. Whether it did so since the previous heartbeat."""
        self.require(Capability.HA)
        raise AssertionError("a provider with HA overrides ha_heartbeat()")

    async def datastore_heartbeats(self, datastore: str) -> list[HeartbeatRecord]:
        """Every host's heartbeat on the datastore named ``datastore``, as this host sees
        them (``NotFound`` if it has no such datastore)."""
        self.require(Capability.HA)
        raise AssertionError("a provider with HA overrides datastore_heartbeats()")

    async def recover(self, vm_name: str, datastore: str) -> VmRecord:
        """Take over the VM ``vm_name`` of another host from the shared ``datastore`` and
        start it here. Only once that host can no longer run it: this host does not
        check."""
        self.require(Capability.HA)
        raise AssertionError("a provider with HA overrides recover()")

    async def export_vm(self, vm_id: str, directory: Path) -> ExportedVm:
        """Write the stopped VM's disks (each one flattened qcow2 image) and boot files
        into ``directory`` on the center's machine; the VM itself stays as it is.
        ``InvalidState`` unless it is stopped, ``Unsupported`` for what cannot move."""
        self.require(Capability.TRANSFER)
        raise AssertionError("a provider with TRANSFER overrides export_vm()")

    async def import_vm(self, exported: ExportedVm, datastore: str | None) -> VmRecord:
        """A stopped VM made here from ``exported`` (its files copied in), in
        ``datastore`` (None: the host's default); nothing is left of it when it fails."""
        self.require(Capability.TRANSFER)
        raise AssertionError("a provider with TRANSFER overrides import_vm()")
