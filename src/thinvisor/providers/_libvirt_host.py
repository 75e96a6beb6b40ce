"""What the libvirt provider does on one open connection: blocking calls, run by the
provider in worker threads. libvirt's own errors pass through (the provider translates
them); errors that libvirt would not name well are raised here as thinvisor's."""

from __future__ import annotations

import contextlib
import shutil
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libvirt

from thinvisor.errors import AlreadyExists, InvalidArgument, InvalidState, NotFound, Unsupported
from thinvisor.providers import _libvirt_xml as lx
from thinvisor.providers.base import (
    ConsoleEndpoint,
    ConsoleKind,
    CreateVm,
    DatastoreRecord,
    ExportedDisk,
    ExportedVm,
    HostRecord,
    InventorySnapshot,
    NetworkRecord,
    PowerAction,
    PowerState,
    Reconfigure,
    SnapshotRecord,
    VmRecord,
)

FILE_POOL_TYPES = ("dir", "fs", "netfs")  # pools whose volumes are files: qcow2 fits
DEFAULT_POOL = "default"
MISSING = frozenset(
    {
        libvirt.VIR_ERR_NO_DOMAIN,
        libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
        libvirt.VIR_ERR_NO_STORAGE_VOL,
        libvirt.VIR_ERR_NO_STORAGE_POOL,
        libvirt.VIR_ERR_NO_NETWORK,
    }
)

_UNDEFINE_ALL = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)
_CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG
_INACTIVE_XML = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
_ACTIVE_POOLS = libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE

S = PowerState
#: The power states each action is allowed in.
POWER_ALLOWED: dict[PowerAction, frozenset[PowerState]] = {
    PowerAction.START: frozenset({S.STOPPED, S.SUSPENDED}),
    PowerAction.STOP: frozenset({S.RUNNING, S.PAUSED, S.SUSPENDED, S.UNKNOWN}),
    PowerAction.SHUTDOWN: frozenset({S.RUNNING}),
    PowerAction.RESET: frozenset({S.RUNNING, S.PAUSED}),
    PowerAction.PAUSE: frozenset({S.RUNNING}),
    PowerAction.RESUME: frozenset({S.PAUSED, S.SUSPENDED}),
    PowerAction.SUSPEND: frozenset({S.RUNNING, S.PAUSED}),
}


def _start(domain: Any) -> None:
    """Start a stopped domain (from its managed save image where it has one), or wake
    one suspended to RAM."""
    if domain.isActive():
        domain.pMWakeup(0)
    else:
        domain.create()


def _resume(domain: Any) -> None:
    if domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        domain.resume()
    else:
        _start(domain)


def _power_off(domain: Any) -> None:
    """Pull the plug; a suspended domain's saved state is dropped."""
    if domain.isActive():
        domain.destroy()
    elif domain.hasManagedSaveImage(0):
        domain.managedSaveRemove(0)


#: How libvirt does each action.
POWER_CALLS: dict[PowerAction, Callable[[Any], object]] = {
    PowerAction.START: _start,
    PowerAction.STOP: _power_off,
    PowerAction.SHUTDOWN: lambda d: d.shutdown(),
    PowerAction.RESET: lambda d: d.reset(0),
    PowerAction.PAUSE: lambda d: d.suspend(),
    PowerAction.RESUME: _resume,
    PowerAction.SUSPEND: lambda d: d.managedSave(0),
}


class CpuMeter:
    """How busy a host's CPUs were between two readings of their cumulative times
    (``virConnect.getCPUStats``: nanoseconds of kernel, user, idle and iowait)."""

    def __init__(self) -> None:
        self._before: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def update(self, times: dict[str, int]) -> float | None:
        """The load since the last reading, 0 to 1; None for the first (or a host whose
        counters went back: it restarted)."""
        busy = times.get("kernel", 0) + times.get("user", 0)
        total = busy + times.get("idle", 0) + times.get("iowait", 0)
        with self._lock:
            before, self._before = self._before, (busy, total)
        if before is None or total <= before[1] or busy < before[0]:
            return None
        return min(1.0, (busy - before[0]) / (total - before[1]))


class Host:
    """The operations on one open connection ``conn`` (a ``libvirt.virConnect``) to the
    host at the URI ``address``."""

    def __init__(self, conn: Any, address: str) -> None:
        self.conn = conn
        self.address = address

    # Reading

    def host(self) -> HostRecord:
        _, memory, cpus, mhz, *_ = self.conn.getInfo()
        kind = self.conn.getType()
        versions = lx.version(self.conn.getLibVersion()), lx.version(self.conn.getVersion())
        return HostRecord(
            name=self.conn.getHostname(),
            vendor=f"libvirt/{kind.lower()}",
            version=f"{versions[0]} ({kind} {versions[1]})",
            cpus=int(cpus),
            memory_mib=int(memory),
            core_mhz=max(0, int(mhz)),
        )

    def domain(self, vm_id: str) -> Any:
        """The domain whose UUID is ``vm_id``."""
        try:
            uuid.UUID(vm_id)
        except ValueError:
            raise NotFound(f"{self.address}: no domain with UUID {vm_id!r}") from None
        return self.conn.lookupByUUIDString(vm_id)

    def vm(self, vm_id: str) -> VmRecord:
        return self.record(self.domain(vm_id))

    def record(self, domain: Any, root: ET.Element | None = None, pools: Any = None) -> VmRecord:
        """The domain as a record (``root``: its XML, if read already; ``pools``: the
        host's pool targets, if known)."""
        root = ET.fromstring(domain.XMLDesc(0)) if root is None else root
        return VmRecord(
            id=domain.UUIDString(),
            name=domain.name(),
            power_state=self.power_state(domain),
            cpus=lx.vcpus(root),
            memory_mib=lx.memory_mib(root),
            datastores=lx.pool_datastores(root, self.pool_targets() if pools is None else pools),
            networks=tuple(name for _, name in lx.nic_networks(root)),
            uuid=domain.UUIDString(),
        )

    @staticmethod
    def power_state(domain: Any) -> PowerState:
        state = domain.state()[0]
        saved = state == libvirt.VIR_DOMAIN_SHUTOFF and bool(domain.hasManagedSaveImage(0))
        return lx.power_state(state, saved)

    def pool_targets(self) -> dict[str, str]:
        """Each storage pool's target directory, to the pool's name."""
        targets = {}
        for pool in self.conn.listAllStoragePools(0):
            path = lx.pool_target(ET.fromstring(pool.XMLDesc(0)))
            if path:
                targets[path] = pool.name()
        return targets

    def cpu_times(self) -> dict[str, int] | None:
        """The host's cumulative CPU times, all CPUs together; None where its driver
        does not say."""
        try:
            times: dict[str, int] = self.conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS)
        except libvirt.libvirtError:
            return None
        return times

    def inventory(self) -> InventorySnapshot:
        pools = self.pool_targets()
        domains = [(d, ET.fromstring(d.XMLDesc(0))) for d in self.conn.listAllDomains(0)]
        bridges = set().union(*(lx.bridges(root) for _, root in domains))
        return InventorySnapshot(
            host=self.host(),
            vms=tuple(self.record(d, root, pools) for d, root in domains),
            datastores=self.datastores(),
            networks=self.networks(bridges),
        )

    def datastores(self) -> tuple[DatastoreRecord, ...]:
        found = []
        for pool in self.conn.listAllStoragePools(0):
            _, capacity, _, free = pool.info() if pool.isActive() else (0, None, 0, None)
            found.append(DatastoreRecord(pool.UUIDString(), pool.name(), capacity, free))
        return tuple(found)

    def networks(self, bridges: set[str]) -> tuple[NetworkRecord, ...]:
        """The libvirt networks, and the bridges that domains join directly."""
        found = [NetworkRecord(n.UUIDString(), n.name()) for n in self.conn.listAllNetworks(0)]
        found += [NetworkRecord(f"bridge:{b}", b) for b in sorted(bridges)]
        return tuple(found)

    def definitions(self) -> list[ET.Element]:
        """Every domain's persistent definition."""
        return [ET.fromstring(d.XMLDesc(_INACTIVE_XML)) for d in self.conn.listAllDomains(0)]

    # Power

    def power(self, vm_id: str, action: PowerAction) -> VmRecord:
        domain = self.domain(vm_id)
        state = self.power_state(domain)
        if state not in POWER_ALLOWED[action]:
            raise InvalidState(domain.name(), state.value, action.value)
        POWER_CALLS[action](domain)
        return self.record(domain)

    def stopped(self, vm_id: str, action: str) -> Any:
        """The domain ``vm_id``, which must be stopped (with no saved state)."""
        domain = self.domain(vm_id)
        state = self.power_state(domain)
        if state != PowerState.STOPPED:
            raise InvalidState(domain.name(), state.value, action)
        return domain

    def name_free(self, name: str) -> None:
        """Raise ``AlreadyExists`` if a domain is named ``name``."""
        try:
            self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise
        raise AlreadyExists(f"{self.address}: a domain named {name!r} exists")

    # Creating, deleting, reconfiguring

    def create(self, spec: CreateVm) -> VmRecord:
        self.name_free(spec.name)
        nic = self.nic(spec.network) if spec.network else None
        used = [root.get("type", "") for root in self.definitions()]
        kind, arch = lx.virt_type(self.conn.getCapabilities(), used)
        volume = None
        if spec.disk_mib:
            xml = lx.volume_xml(f"{spec.name}.qcow2", spec.disk_mib * 1024**2, "qcow2")
            volume = self.disk_pool().createXML(xml, 0)
        try:
            disk = volume.path() if volume is not None else None
            domain = self.conn.defineXML(lx.new_domain_xml(spec, kind, arch, disk, nic))
        except BaseException:
            if volume is not None:
                volume.delete(0)
            raise
        return self.record(domain)

    def nic(self, network: str) -> tuple[str, str]:
        """How a new NIC joins ``network``: a libvirt network, else a bridge in use."""
        try:
            self.conn.networkLookupByName(network)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                raise
        else:
            return ("network", network)
        if any(network in lx.bridges(root) for root in self.definitions()):
            return ("bridge", network)
        raise InvalidArgument("network", f"{network!r} is no libvirt network or bridge in use")

    def disk_pool(self) -> Any:
        """Where new disks go: the active file pool ``default``, else the first by name."""
        pools = {
            pool.name(): pool
            for pool in self.conn.listAllStoragePools(_ACTIVE_POOLS)
            if ET.fromstring(pool.XMLDesc(0)).get("type") in FILE_POOL_TYPES
        }
        if not pools:
            raise InvalidArgument("disk_mib", "the host has no active directory storage pool")
        return pools.get(DEFAULT_POOL) or pools[min(pools)]

    def delete(self, vm_id: str) -> None:
        """Undefine a stopped domain with all its metadata, and delete the volumes of
        its own disks that no other domain uses."""
        domain = self.domain(vm_id)
        if domain.isActive():
            raise InvalidState(domain.name(), self.power_state(domain).value, "delete")
        root = ET.fromstring(domain.XMLDesc(_INACTIVE_XML))
        volumes = [v for d in lx.own_disks(root) if (v := self.volume_of(d)) is not None]
        domain.undefineFlags(_UNDEFINE_ALL)
        in_use = {d.path for root in self.definitions() for d in lx.disks(root) if d.path}
        for volume in volumes:
            if volume.path() not in in_use:
                volume.delete(0)

    def volume_of(self, disk: lx.Disk) -> Any:
        """The pool volume holding ``disk``, or None where it is no pool's."""
        try:
            if disk.pool and disk.volume:
                pool = self.conn.storagePoolLookupByName(disk.pool)
                return pool.storageVolLookupByName(disk.volume)
            return self.conn.storageVolLookupByPath(disk.path)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in MISSING:
                return None
            raise

    def reconfigure(self, vm_id: str, change: Reconfigure) -> VmRecord:
        domain = self.stopped(vm_id, "reconfigure")
        if change.cpus is not None:
            # The maximum first when growing, the count first when shrinking.
            flags = [libvirt.VIR_DOMAIN_VCPU_MAXIMUM, 0]
            if change.cpus < domain.vcpusFlags(_CONFIG | libvirt.VIR_DOMAIN_VCPU_MAXIMUM):
                flags.reverse()
            for flag in flags:
                domain.setVcpusFlags(change.cpus, _CONFIG | flag)
        if change.memory_mib is not None:
            kib = change.memory_mib * 1024
            # A lower maximum lowers the current size with it.
            domain.setMemoryFlags(kib, _CONFIG | libvirt.VIR_DOMAIN_MEM_MAXIMUM)
            domain.setMemoryFlags(kib, _CONFIG)
        return self.record(domain)

    def clone(self, vm_id: str, name: str) -> VmRecord:
        """A new stopped domain ``name`` with copies of the stopped source's own disks."""
        source = self.stopped(vm_id, "clone")
        self.name_free(name)
        xml = source.XMLDesc(_INACTIVE_XML)
        copies: list[Any] = []
        try:
            sources = {
                disk.target: self.copy_volume(disk, source.name(), name, copies)
                for disk in lx.own_disks(ET.fromstring(xml))
            }
            domain = self.conn.defineXML(lx.clone_xml(xml, name, sources))
        except BaseException:
            for volume in copies:
                with contextlib.suppress(libvirt.libvirtError):
                    volume.delete(0)
            raise
        return self.record(domain)

    def copy_volume(self, disk: lx.Disk, source: str, clone: str, copies: list[Any]) -> str:
        """Copy a disk's volume in its pool for the clone (kept in ``copies``); the
        copy's path."""
        volume = self.volume_of(disk)
        if volume is None:
            raise InvalidArgument(
                "vm", f"disk {disk.target} ({disk.path}) is in no storage pool: cannot copy it"
            )
        root = ET.fromstring(volume.XMLDesc(0))
        fmt = root.find("target/format")
        xml = lx.volume_xml(
            lx.clone_volume_name(volume.name(), source, clone),
            int(root.findtext("capacity") or 0),
            fmt.get("type", "raw") if fmt is not None else "raw",
        )
        copy = volume.storagePoolLookupByVolume().createXMLFrom(xml, volume, 0)
        copies.append(copy)
        return str(copy.path())

    # Snapshots

    def snapshots(self, vm_id: str) -> list[SnapshotRecord]:
        return [self.snapshot_record(s) for s in self.domain(vm_id).listAllSnapshots(0)]

    @staticmethod
    def snapshot_record(snapshot: Any) -> SnapshotRecord:
        return lx.snapshot_record(snapshot.getXMLDesc(0), bool(snapshot.isCurrent(0)))

    def create_snapshot(self, vm_id: str, name: str) -> SnapshotRecord:
        domain = self.domain(vm_id)
        if name in domain.snapshotListNames(0):
            raise AlreadyExists(f"{self.address}: domain {domain.name()!r} has a snapshot {name!r}")
        return self.snapshot_record(domain.snapshotCreateXML(lx.snapshot_xml(name), 0))

    def revert_snapshot(self, vm_id: str, snapshot_id: str) -> SnapshotRecord:
        domain = self.domain(vm_id)
        snapshot = domain.snapshotLookupByName(snapshot_id, 0)
        domain.revertToSnapshot(snapshot, 0)
        return self.snapshot_record(snapshot)

    def delete_snapshot(self, vm_id: str, snapshot_id: str) -> None:
        self.domain(vm_id).snapshotLookupByName(snapshot_id, 0).delete(0)

    # Consoles

    def console(self, vm_id: str, kind: ConsoleKind) -> ConsoleEndpoint:
        domain = self.domain(vm_id)
        if not domain.isActive():
            state = self.power_state(domain).value
            raise InvalidState(domain.name(), state, f"open a {kind.value} console")
        root = ET.fromstring(domain.XMLDesc(0))
        uri_host = urlsplit(self.address).hostname
        if kind == ConsoleKind.VNC:
            where = lx.vnc_address(root, uri_host)
            if where is not None:
                return ConsoleEndpoint(kind, f"vnc://{lx.url_host(where[0])}:{where[1]}")
            reason = "has no VNC display listening on an address"
        else:
            url = lx.serial_url(root, uri_host)
            if url is not None:
                return ConsoleEndpoint(kind, url)
            reason = (
                "has no serial port listening on TCP (a pty is reached only through"
                " libvirt's console stream)"
            )
        raise Unsupported(f"{self.address}: domain {domain.name()!r} {reason}")

    # Moving a stopped VM to another kind of host

    def export_files(self, vm_id: str, directory: Path) -> ExportedVm:
        """The stopped domain's own disks (pool volumes) and kernel boot files copied
        into ``directory`` as they are (the provider flattens the disks). Its NICs,
        CD-ROMs and snapshots do not move: one with snapshots is refused."""
        domain = self.stopped(vm_id, "export")
        name = domain.name()
        if domain.snapshotNum(0):
            raise Unsupported(f"{self.address}: domain {name!r} has snapshots: delete them first")
        root = ET.fromstring(domain.XMLDesc(_INACTIVE_XML))
        disks = []
        for disk in lx.own_disks(root):
            volume = self.volume_of(disk)
            if volume is None:
                raise Unsupported(
                    f"{self.address}: disk {disk.target} of {name!r} ({disk.path})"
                    " is in no storage pool: it cannot be read remotely"
                )
            target = directory / f"{disk.target}.orig"
            self.download(volume, target)
            disks.append(ExportedDisk(disk.target, target, format="raw"))
        kernel, initrd, cmdline = lx.kernel_boot(root)
        return ExportedVm(
            name=name,
            cpus=lx.vcpus(root),
            memory_mib=lx.memory_mib(root),
            disks=tuple(disks),
            kernel=self.boot_file(name, kernel, directory / "vmlinuz"),
            initrd=self.boot_file(name, initrd, directory / "initrd.img"),
            cmdline=cmdline,
        )

    def download(self, volume: Any, target: Path) -> None:
        """A volume's bytes, streamed from libvirt into the new file ``target``."""
        stream = self.conn.newStream(0)
        with target.open("xb") as out:
            volume.download(stream, 0, 0, 0)
            try:
                stream.recvAll(lambda _stream, data, f: f.write(data), out)
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                raise

    def upload(self, volume: Any, source: Path) -> None:
        """The local file ``source`` streamed into ``volume`` (as large as it)."""
        stream = self.conn.newStream(0)
        volume.upload(stream, 0, source.stat().st_size, 0)
        with source.open("rb") as f:
            try:
                stream.sendAll(lambda _stream, size, f: f.read(size), f)
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                raise

    def boot_file(self, vm: str, path: str | None, target: Path) -> Path | None:
        """A kernel or initrd copied to ``target``: from its pool volume, else read here
        where libvirt runs on this machine (``qemu:///...``); None for no file."""
        if path is None:
            return None
        try:
            self.download(self.conn.storageVolLookupByPath(path), target)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in MISSING:
                raise
            if urlsplit(self.address).hostname not in (None, "", "localhost"):
                raise Unsupported(
                    f"{self.address}: {path} (boot file of {vm!r}) is in no storage pool:"
                    " it cannot be read remotely"
                ) from None
            shutil.copyfile(path, target)
        return target

    def import_files(self, exported: ExportedVm, datastore: str | None) -> VmRecord:
        """A stopped domain made from ``exported``: its disks, kernel and initrd uploaded
        into new volumes of the pool ``datastore`` (None: where new disks go), which are
        deleted again if it fails."""
        self.name_free(exported.name)
        pool = self.conn.storagePoolLookupByName(datastore) if datastore else self.disk_pool()
        used = [root.get("type", "") for root in self.definitions()]
        kind, arch = lx.virt_type(self.conn.getCapabilities(), used)
        made: list[Any] = []
        # A tag of this import in the volumes' names: kernel and initrd volumes outlive
        # their domain (``delete`` removes its disks only), so a name may come again.
        stem = f"{exported.name}-{uuid.uuid4().hex[:8]}"
        try:
            disks = [
                self.uploaded(pool, f"{stem}-{d.name}.qcow2", d.path, made) for d in exported.disks
            ]
            boot = tuple(
                None if local is None else self.uploaded(pool, f"{stem}-{n}", local, made)
                for n, local in (("vmlinuz", exported.kernel), ("initrd.img", exported.initrd))
            )
            pool.refresh(0)  # libvirt sees the uploaded images' formats
            xml = lx.imported_domain_xml(exported, kind, arch, disks, (boot[0], boot[1]))
            domain = self.conn.defineXML(xml)
        except BaseException:
            for volume in made:
                with contextlib.suppress(libvirt.libvirtError):
                    volume.delete(0)
            raise
        return self.record(domain)

    def uploaded(self, pool: Any, name: str, source: Path, made: list[Any]) -> str:
        """The path of a new volume ``name`` holding ``source``'s bytes (listed in
        ``made``); made raw and exactly as large, so that the bytes are the image."""
        size = source.stat().st_size
        xml = lx.volume_xml(name, size, "raw")
        volume = pool.createXML(xml, 0)
        made.append(volume)
        self.upload(volume, source)
        return str(volume.path())
