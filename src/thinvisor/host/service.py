"""The host's actions on VMs, with state gating. CLI, REST and CIM all call these.

Every action takes the VM's lock, reads its state, refuses with ``InvalidState`` if the
state does not allow it, and only then acts. The configuration is on disk before QEMU
starts, and every change to it is written atomically.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from thinvisor.appliance import Appliance, build_appliance, find_appliance
from thinvisor.config import HostConfig
from thinvisor.errors import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    InvalidState,
    NotFound,
    QemuError,
)
from thinvisor.fs import fsync_dir
from thinvisor.host import admission, clones, diskops, hostinfo, memory, nics, ovf_io, snapshots
from thinvisor.host.chains import own_files, real, users_of
from thinvisor.host.context import current_user
from thinvisor.host.datastores import DatastoreService
from thinvisor.host.engine import blocks, process
from thinvisor.host.engine.accel import AccelChoice, choose_accel
from thinvisor.host.engine.argv import build_argv, disk_device_path, disk_nodes, pci_placement
from thinvisor.host.engine.paths import SUSPEND_STATE_NAME, VmPaths
from thinvisor.host.engine.qmp import Monitor
from thinvisor.host.events import EventLog
from thinvisor.host.inventory import (
    CREATING,
    DELETING,
    Inventory,
    VmEntry,
    save_spec,
    set_owner,
)
from thinvisor.host.isolation import Isolation
from thinvisor.host.maintenance import check_not_in_maintenance
from thinvisor.host.networking import NetworkService, close_fds
from thinvisor.host.resources import ResourceControls
from thinvisor.host.state import (
    Action,
    PowerState,
    check_allowed,
    check_template,
    power_state_of,
)
from thinvisor.host.tasks import Progress
from thinvisor.model.create import NewDiskSpec, NewNicSpec, NicUpdate, VmCreate
from thinvisor.model.resources import DiskLimits, ResourceUpdate
from thinvisor.model.vm import (
    CdromSpec,
    DiskSpec,
    KernelBoot,
    NicSpec,
    VmSpec,
    VmUpdate,
    invalid_argument,
    validate,
)
from thinvisor.storage.disk import Images
from thinvisor.storage.snapshots import Snapshot, SnapshotCreate, SnapshotTree

log = logging.getLogger(__name__)

MAC_PREFIX = "02:74:76"
PARTIAL_STATE = SUSPEND_STATE_NAME + ".partial"
QEMU_STATUS_UNKNOWN = (
    "unknown"  # QEMU runs, but did not say in which state  # locally administered, unicast: "tv"
)


@dataclass(frozen=True)
class VmInfo:
    """What a caller sees of a VM: its spec, state and where its files are."""

    name: str
    datastore: str
    state: str  # a PowerState value, or "invalid"
    spec: VmSpec | None
    paths: VmPaths
    error: str | None = None
    pid: int | None = None
    qemu_status: str | None = None
    stop_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return vm_info_dict(self)


NewDisk = NewDiskSpec


def vm_info_dict(v: Any) -> dict[str, Any]:
    """What ``--json`` prints of a VM, local (``VmInfo``) or remote alike."""
    return {
        "name": v.name,
        "datastore": v.datastore,
        "state": v.state,
        "error": v.error,
        "pid": v.pid,
        "qemu_status": v.qemu_status,
        "stop_reason": v.stop_reason,
        "vm_dir": str(v.paths.vm_dir),
        "serial_log": str(v.paths.serial_log("serial0")),
        "spec": v.spec.model_dump(mode="json") if v.spec else None,
    }


@dataclass
class CreateOptions:
    datastore: str | None = None
    new_disks: list[NewDisk] = field(default_factory=list)
    # Files copied into the VM's directory and referred to by the spec's boot section.
    kernel_source: Path | None = None
    initrd_source: Path | None = None
    # Fills the new VM's (hidden) directory instead of the above, and returns the spec
    # as it is to be saved: clones copy or link their source's files this way.
    build: Callable[[VmPaths, VmSpec], Awaitable[VmSpec]] | None = None


class HostService:
    """The host's VM actions."""

    def __init__(
        self,
        config: HostConfig,
        *,
        accel: Callable[[], AccelChoice] | None = None,
        facts: Callable[[], hostinfo.HostFacts] = hostinfo.host_facts,
        events: EventLog | None = None,
    ):
        self.config = config
        self.events = events
        # How long a state query waits for QEMU's QMP socket (one client at a time).
        self.status_timeout_s = 5.0
        self.inventory = Inventory(config)
        self.images = Images(config.qemu_img_binary)
        self._accel_fn = accel or (lambda: choose_accel(config.accel))
        self._facts = facts
        self.network = NetworkService(config, self.inventory, emit=self._emit_about)
        self.controls = ResourceControls(lambda: self._facts().core_mhz)
        self.isolation = Isolation(config, self.images)
        self.datastores = DatastoreService(self, emit=self._emit_about)

    def _emit_about(self, kind: str, obj: str, message: str, **data: Any) -> None:
        """Record an event about any object (a switch, a port group) for the current user."""
        if self.events is not None:
            self.events.emit(kind, message, object=obj, user=current_user.get(), data=data or None)

    def emit(self, kind: str, vm: str, message: str, **data: Any) -> None:
        """Record an event about ``vm`` on behalf of the current user (if there is a log)."""
        log.info("vm %s: %s", vm, message)
        if self.events is not None:
            self.events.emit(
                kind, message, object=f"vm/{vm}", user=current_user.get(), data=data or None
            )

    def accel(self) -> AccelChoice:
        """The accelerator VMs start with, and why."""
        return self._accel_fn()

    # Reading

    async def state_of(self, entry: VmEntry) -> tuple[PowerState, int | None, str | None]:
        """The VM's power state, QEMU's pid and QEMU's own run state."""
        pid = process.running_pid(entry.paths)
        if pid is None:
            suspended = entry.paths.suspend_state.exists()
            return (PowerState.SUSPENDED if suspended else PowerState.STOPPED), None, None
        try:
            async with Monitor(
                entry.name, entry.paths.qmp_socket, connect_timeout=self.status_timeout_s
            ) as mon:
                status = await mon.status()
        except QemuError:
            if process.running_pid(entry.paths) is None:  # it ended while we asked
                return await self.state_of(entry)
            raise
        return power_state_of(status), pid, status

    async def info(self, entry: VmEntry) -> VmInfo:
        if entry.spec is None:
            return VmInfo(entry.name, entry.datastore, "invalid", None, entry.paths, entry.error)
        try:
            state, pid, status = await self.state_of(entry)
        except QemuError as exc:
            # QEMU runs but its QMP socket is busy (it serves one client at a time) or
            # hung: report what is known rather than failing a whole listing.
            log.warning("vm %s: run state unknown: %s", entry.name, exc)
            pid = process.running_pid(entry.paths)
            state, status = PowerState.RUNNING, QEMU_STATUS_UNKNOWN
        reason = None
        if state in (PowerState.STOPPED, PowerState.SUSPENDED):
            reason = process.exit_reason(entry.paths)
        return VmInfo(
            entry.name,
            entry.datastore,
            state.value,
            entry.spec,
            entry.paths,
            pid=pid,
            qemu_status=status,
            stop_reason=reason,
        )

    async def list_vms(self) -> list[VmInfo]:
        return [await self.info(e) for e in self.inventory.entries()]

    async def get_vm(self, name: str) -> VmInfo:
        return await self.info(self.inventory.get(name))

    # Creating and deleting

    async def create_vm(self, spec: VmSpec, options: CreateOptions | None = None) -> VmInfo:
        """Create a VM directory with its disks and configuration, all or nothing."""
        options = options or CreateOptions()
        datastore = self.config.datastore(options.datastore)
        self._check_resources(spec)
        spec = self._with_macs(spec)
        async with self.inventory.lock(".inventory"):
            # No other create runs now: hidden leftovers are from a crash, finish them off.
            await asyncio.to_thread(self.inventory.sweep)
            if self.inventory.find(spec.name) is not None:
                raise AlreadyExists(f"vm {spec.name!r} already exists")
            final = self.inventory.paths(datastore, spec.name)
            if final.vm_dir.exists():  # another host's VM, on a datastore both share
                raise AlreadyExists(
                    f"vm {spec.name!r}: datastore {datastore.name} already holds a directory"
                    " of that name"
                )
            datastore.path.mkdir(parents=True, exist_ok=True)
            # Build the directory under a hidden name, then rename: a crash leaves
            # nothing that looks like a VM.
            staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}{CREATING}", dir=datastore.path))
            try:
                building = VmPaths(staging, final.run_dir)
                if options.build is not None:
                    spec = await options.build(building, spec)
                else:
                    spec = await self._populate(spec, options, building, final)
                spec = spec.with_pci_slots()
                self._check_paths(spec, building)
                save_spec(building, spec)
                set_owner(staging, self.inventory.host_id)
                fsync_dir(staging)
                staging.rename(final.vm_dir)
                fsync_dir(datastore.path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self.emit("vm.created", spec.name, f"created in datastore {datastore.name}")
        return await self.get_vm(spec.name)

    async def create_from(self, req: VmCreate) -> VmInfo:
        """Create a VM from a creation request (what the CLI and the API send)."""
        data = req.model_dump(exclude={"appliance", "disks", "nics", "datastore"})
        options = CreateOptions(datastore=req.datastore, new_disks=list(req.disks))
        if data["boot"] is None:
            del data["boot"]
        if req.appliance:
            image = await asyncio.to_thread(self.appliance)
            data["boot"] = {
                "kind": "kernel",
                "kernel": "vmlinuz",
                "initrd": "initrd.img",
                "cmdline": image.cmdline,
            }
            options.kernel_source, options.initrd_source = image.kernel, image.initrd
            if req.cdrom is not None and "bus" not in req.cdrom.model_fields_set:
                # The appliance's kernel has no AHCI driver: its CD-ROM sits on virtio-scsi.
                data["cdrom"]["bus"] = "scsi"
        spec = validate(VmSpec, data)
        nics: list[NicSpec] = []
        for new in req.nics:
            probe = spec.model_copy(update={"nics": nics})
            nic = {
                "name": probe.next_device_name("net"),
                "mac": new.mac or self.new_mac(),
                "model": new.model,
                "network": new.network,
                "connected": new.connected,
                "shaping": new.shaping.model_dump() if new.shaping else None,
            }
            nics.append(validate(NicSpec, nic))
        spec = validate(VmSpec, {**spec.model_dump(), "nics": [n.model_dump() for n in nics]})
        return await self.create_vm(spec, options)

    def appliance(self) -> Appliance:
        """The quick-start appliance, built into the cache the first time (blocking)."""
        return find_appliance(self.config.cache_dir) or build_appliance(self.config.cache_dir)

    async def _populate(
        self, spec: VmSpec, options: CreateOptions, building: VmPaths, final: VmPaths
    ) -> VmSpec:
        (building.vm_dir / "logs").mkdir()
        if options.kernel_source is not None:
            if not isinstance(spec.boot, KernelBoot):
                raise InvalidArgument("boot", "a kernel file needs kernel boot")
            boot = spec.boot.model_copy()
            boot.kernel = await _copy_in(
                options.kernel_source, building.vm_dir, "vmlinuz", "kernel"
            )
            if options.initrd_source is not None:
                boot.initrd = await _copy_in(
                    options.initrd_source, building.vm_dir, "initrd.img", "initrd"
                )
            spec = spec.model_copy(update={"boot": boot})
        disks = list(spec.disks)
        for new in options.new_disks:
            probe = spec.model_copy(update={"disks": disks})
            disks.append(await self._make_disk(probe, new, building.vm_dir))
        return VmSpec.model_validate(
            {**spec.model_dump(), "disks": [d.model_dump() for d in disks]}
        )

    async def _make_disk(self, spec: VmSpec, new: NewDisk, vm_dir: Path) -> DiskSpec:
        name = spec.next_device_name("disk")
        filename = f"{name}.{new.format}"
        target = vm_dir / filename
        if new.source is not None:
            source = self._existing_path(Path(new.source), "disk", vm_dir)
            await self.images.convert(source, target, new.format)
            if new.size is not None:
                info = await self.images.info(target)
                if new.size < info.virtual_size:
                    target.unlink()
                    raise InvalidArgument("size", "must not be smaller than the imported image")
                await self.images.resize(target, new.format, new.size)
        elif new.size is not None:
            await self.images.create(target, new.format, new.size)
        else:
            raise InvalidArgument("disk", "give a size or an image to import")
        return DiskSpec.model_validate(
            {"name": name, "path": filename, "format": new.format, "bus": new.bus}
        )

    def _existing_path(self, path: Path, field_name: str, vm_dir: Path | None = None) -> Path:
        """A file that exists inside a datastore (or the VM's own directory)."""
        full = path if path.is_absolute() or vm_dir is None else vm_dir / path
        if not full.is_file():
            raise InvalidArgument(field_name, f"{path} does not exist")
        inside_vm = vm_dir is not None and full.resolve().is_relative_to(vm_dir.resolve())
        if not inside_vm and self.inventory.datastore_of(full) is None:
            raise InvalidArgument(field_name, f"{path} is outside the host's datastores")
        return full

    def _check_paths(self, spec: VmSpec, paths: VmPaths) -> None:
        for disk in spec.disks:
            self._existing_path(Path(disk.path), f"disks.{disk.name}.path", paths.vm_dir)
        if spec.cdrom is not None and spec.cdrom.path:
            self._existing_path(Path(spec.cdrom.path), "cdrom.path", paths.vm_dir)
        if isinstance(spec.boot, KernelBoot):
            self._existing_path(Path(spec.boot.kernel), "boot.kernel", paths.vm_dir)
            if spec.boot.initrd:
                self._existing_path(Path(spec.boot.initrd), "boot.initrd", paths.vm_dir)
        self.network.check_networks(spec)

    def _check_resources(self, spec: VmSpec) -> None:
        facts = self._facts()
        if spec.vcpus > facts.cpus:
            raise InvalidArgument(
                "vcpus", f"{spec.vcpus} is more than the host's {facts.cpus} CPUs"
            )
        if spec.memory_mib > facts.memory_available_mib:
            raise InvalidArgument(
                "memory_mib",
                f"{spec.memory_mib} MiB is more than the host's free "
                f"{facts.memory_available_mib} MiB",
            )

    def _with_macs(self, spec: VmSpec) -> VmSpec:
        if not spec.nics:
            return spec
        taken = self._macs_in_use()
        for nic in spec.nics:
            if nic.mac in taken:
                raise InvalidArgument(
                    f"nics.{nic.name}.mac", f"{nic.mac} is already used on this host"
                )
            taken.add(nic.mac)
        return spec

    def _macs_in_use(self) -> set[str]:
        return {n.mac for e in self.inventory.entries() if e.spec for n in e.spec.nics}

    def new_mac(self) -> str:
        """A MAC address from thinvisor's prefix that no VM on this host uses."""
        taken = self._macs_in_use()
        while True:
            mac = MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))
            if mac not in taken:
                return mac

    def new_nic(self, spec: VmSpec, network: str = "user", model: str = "virtio") -> NicSpec:
        return NicSpec.model_validate(
            {
                "name": spec.next_device_name("net"),
                "mac": self.new_mac(),
                "network": network,
                "model": model,
            }
        )

    async def delete_vm(self, name: str) -> None:
        """Remove a VM and every file in its directory. Refused while it runs."""
        async with self.inventory.lock(name):
            entry = self.inventory.get(name)
            if entry.spec is not None:
                state, _, _ = await self.state_of(entry)
                check_allowed(name, state, Action.DELETE)
            elif process.running_pid(entry.paths) is not None:
                check_allowed(name, PowerState.RUNNING, Action.DELETE)
            if entry.spec is not None:
                files = {real(p) for p in own_files(entry, entry.spec)}
                users = await users_of(self, files, exclude=name)
                if users:
                    raise Busy(f"vm {name!r} is the base of linked clone {users[0]!r}")
            # Hide it first: a crash mid-delete leaves a hidden directory, not half a VM.
            doomed = entry.paths.vm_dir.with_name(f".{name}{DELETING}{secrets.token_hex(4)}")
            entry.paths.vm_dir.rename(doomed)
            fsync_dir(doomed.parent)
            await asyncio.to_thread(shutil.rmtree, doomed, True)
            shutil.rmtree(entry.paths.run_dir, ignore_errors=True)
        self.emit("vm.deleted", name, "deleted")

    async def update_vm(self, name: str, update: VmUpdate) -> VmInfo:
        """Change a stopped VM's settings; only the fields given change."""
        async with self.inventory.lock(name):
            entry, spec, _ = await self._locked_state(name, Action.RECONFIGURE)
            updated = update.apply(spec)
            self._check_resources(updated)
            self._check_paths(updated, entry.paths)
            save_spec(entry.paths, updated)
            changed = sorted(update.model_dump(exclude_unset=True))
            self.emit("vm.reconfigured", name, f"reconfigured: {', '.join(changed)}")
        return await self.get_vm(name)

    async def set_limits(
        self,
        name: str,
        *,
        disks: Mapping[str, DiskLimits | None] | None = None,
        balloon_mib: int | None = None,
    ) -> VmInfo:
        """Change disks' I/O limits (disk name -> limits; None or nothing set removes
        them) and the balloon's target, the guest memory in MiB.

        Disk limits are kept in the spec in every state and take effect at once while
        QEMU runs; the balloon target is not kept, and needs QEMU running (or paused).
        """
        changes = {
            d: None if lim is None or lim.is_unlimited() else lim
            for d, lim in (disks or {}).items()
        }
        async with self.inventory.lock(name):
            entry, spec = self.inventory.get_valid(name)
            unknown = sorted(set(changes) - {d.name for d in spec.disks})
            if unknown:
                raise NotFound(f"vm {name!r} has no disk {unknown[0]!r}")
            state, _, _ = await self.state_of(entry)
            live = state in (PowerState.RUNNING, PowerState.PAUSED)
            if balloon_mib is not None:
                if not live:
                    raise InvalidState(name, state.value, "set the balloon target")
                memory.check_balloon_target(spec, balloon_mib)
            if live:
                async with Monitor(name, entry.paths.qmp_socket) as mon:
                    for disk in spec.disks:
                        if disk.name in changes:
                            path = disk_device_path(disk)
                            await mon.block_set_io_throttle(path, changes[disk.name])
                    if balloon_mib is not None:
                        await mon.balloon(balloon_mib << 20)
            if changes:
                new_disks = [
                    d.model_copy(update={"limits": changes[d.name]}) if d.name in changes else d
                    for d in spec.disks
                ]
                save_spec(entry.paths, spec.model_copy(update={"disks": new_disks}))
            what = [f"disk {d} limits" for d in changes]
            what += [] if balloon_mib is None else [f"balloon target {balloon_mib} MiB"]
            self.emit("vm.reconfigured", name, f"reconfigured: {', '.join(what) or 'nothing'}")
        return await self.get_vm(name)

    async def set_resources(self, name: str, update: ResourceUpdate) -> VmInfo:
        """Change a VM's shares, reservations and limits, at once on a running VM.

        A larger reservation on a running VM must pass admission control; a new memory
        limit also brings a running guest's balloon down to it (or back up).
        """
        async with self.inventory.lock(name):
            entry, spec = self.inventory.get_valid(name)
            try:
                resources = update.apply(spec.resources)
            except ValidationError as exc:
                raise invalid_argument(exc, "resources.") from None
            new = validate(VmSpec, {**spec.model_dump(), "resources": resources.model_dump()})
            state, _, _ = await self.state_of(entry)
            live = state in (PowerState.RUNNING, PowerState.PAUSED)
            if live:
                self._admit(new)
                await asyncio.to_thread(self.controls.update, new)
                if (
                    resources.balloon
                    and resources.memory_limit_mib != spec.resources.memory_limit_mib
                ):
                    target = resources.memory_limit_mib or spec.memory_mib
                    async with Monitor(name, entry.paths.qmp_socket) as mon:
                        await mon.balloon(target << 20)
            save_spec(entry.paths, new)
            changed = ", ".join(sorted(update.model_fields_set)) or "nothing"
            self.emit("vm.reconfigured", name, f"resources changed: {changed}")
        return await self.get_vm(name)

    def resolve(self, ref: str) -> str:
        """A VM's name from its name or its UUID."""
        if self.inventory.find(ref) is not None:
            return ref
        for entry in self.inventory.entries():
            if entry.spec is not None and entry.spec.uuid == ref.lower():
                return entry.name
        raise NotFound(f"vm {ref!r} does not exist")

    # Power actions

    async def _locked_state(self, name: str, action: Action) -> tuple[VmEntry, VmSpec, PowerState]:
        entry, spec = self.inventory.get_valid(name)
        check_template(name, spec.template, action)
        state, _, _ = await self.state_of(entry)
        check_allowed(name, state, action)
        return entry, spec, state

    async def start(self, name: str) -> VmInfo:
        """Power on; a suspended VM resumes from its saved state."""
        async with self.inventory.lock(name):
            entry, spec, state = await self._locked_state(name, Action.START)
            if state is PowerState.SUSPENDED:
                await self._restore(entry, spec)
            else:
                # A suspend that crashed half-way leaves a partial state file: never valid.
                entry.paths.suspend_state.with_name(PARTIAL_STATE).unlink(missing_ok=True)
                self._check_resources(spec)
                self._check_paths(spec, entry.paths)
                placed = spec.with_pci_slots()
                if placed != spec:  # a hand-written vm.toml: keep the placement QEMU gets
                    save_spec(entry.paths, placed)
                await self._launch(entry, placed, incoming=False)
            self.emit(
                "vm.powered_on",
                name,
                "powered on"
                if state is PowerState.STOPPED
                else "powered on from its suspended state",
            )
        return await self.get_vm(name)

    async def _launch(
        self, entry: VmEntry, spec: VmSpec, *, incoming: bool, paused: bool = False
    ) -> None:
        # Every way QEMU starts comes here: power on, resume, a snapshot's memory, arrival.
        check_not_in_maintenance(self.config.state_dir, f"vm {spec.name!r}: cannot power on")
        self._admit(spec)
        accel = self.accel()
        log.info("vm %s: starting QEMU with %s (%s)", spec.name, accel.name, accel.reason)
        jail = await self.isolation.prepare(spec, entry.paths)
        cgroup_procs = await asyncio.to_thread(self.controls.prepare, spec)
        # The TAPs are made here and handed to QEMU as descriptors; ours are closed once
        # QEMU holds them, so each TAP lives exactly as long as its QEMU.
        try:
            taps = await self.network.open_nics(spec)
        except BaseException:
            await self.vm_gone(spec)
            raise
        try:
            argv = build_argv(
                spec,
                entry.paths,
                accel,
                qemu_binary=self.config.qemu_binary,
                incoming=incoming,
                paused=paused,
                tsc_khz=hostinfo.tsc_khz(),
                tap_fds=taps,
            )
            process.spawn(
                argv,
                entry.paths,
                pass_fds=list(taps.values()),
                cgroup_procs=cgroup_procs,
                jail=jail,
            )
        except BaseException:
            await self.vm_gone(spec)
            raise
        finally:
            close_fds(taps)
        try:
            await process.wait_started(entry.paths)
        except BaseException:
            await self.vm_gone(spec)
            raise
        unplugged = [nic.name for nic in spec.nics if not nic.connected]
        limited = [d for d in spec.disks if d.limits is not None and not d.limits.is_unlimited()]
        if not (unplugged or limited):
            return
        try:
            async with Monitor(spec.name, entry.paths.qmp_socket) as mon:
                for nic_name in unplugged:
                    await mon.set_link(nic_name, up=False)
                # Throttling belongs to the disk's device (its BlockBackend), so it holds
                # across snapshots and moves that swap the nodes underneath.
                for disk in limited:
                    await mon.block_set_io_throttle(disk_device_path(disk), disk.limits)
        except BaseException:
            # A VM running without the limits or cable state its spec asks for would be a
            # quiet lie: end it, and let the start fail.
            await self._force_off(entry, "its disk limits or NIC links could not be set")
            raise

    async def _restore(self, entry: VmEntry, spec: VmSpec) -> None:
        """Start QEMU waiting for state, load the suspend file, then run."""
        await self.load_state(
            entry, spec, entry.paths.suspend_state, keep=False, run=True,
            failure="restoring the suspended state failed",
        )  # fmt: skip

    async def load_state(
        self,
        entry: VmEntry,
        spec: VmSpec,
        state_file: Path,
        *,
        keep: bool,
        run: bool,
        failure: str,
    ) -> None:
        """Start QEMU on a saved state (a suspend's, or a snapshot's when ``keep``) and
        let the vCPUs run when ``run``; on failure QEMU is ended with ``failure``."""
        await self._launch(entry, spec, incoming=True)
        try:
            async with Monitor(spec.name, entry.paths.qmp_socket) as mon:
                fd = os.open(state_file, os.O_RDONLY)
                try:
                    await mon.incoming_from_fd(fd)
                finally:
                    os.close(fd)
                if not keep:
                    # The state lives in QEMU now. Drop the file before the guest runs,
                    # so that it can never be restored over newer disk contents.
                    state_file.unlink()
                    fsync_dir(state_file.parent)
                if run:
                    await mon.cont()
        except QemuError as exc:
            await self._force_off(entry, failure)
            raise QemuError(
                f"vm {spec.name!r}: {process.failure_detail(entry.paths, exc)}"
            ) from exc
        except BaseException:
            await self._force_off(entry, failure)
            raise

    async def stop(self, name: str, *, reason: str | None = None) -> VmInfo:
        """Hard power off (a suspended VM's saved state is discarded); ``reason`` is the
        stop reason the VM shows afterwards (default: the user's)."""
        async with self.inventory.lock(name):
            entry, _, state = await self._locked_state(name, Action.STOP)
            if state is PowerState.SUSPENDED:
                entry.paths.suspend_state.unlink()
                fsync_dir(entry.paths.vm_dir)
                self.emit("vm.powered_off", name, "powered off; its suspended state discarded")
            else:
                await self._force_off(entry, reason or "powered off by user")
                self.emit("vm.powered_off", name, reason or "powered off")
        return await self.get_vm(name)

    async def _force_off(self, entry: VmEntry, reason: str) -> None:
        pid = process.running_pid(entry.paths)
        if pid is None:
            return
        process.record_stop(entry.paths, "stop", reason)
        try:
            async with Monitor(entry.name, entry.paths.qmp_socket, connect_timeout=5) as mon:
                await mon.quit()
        except QemuError as exc:
            log.warning("vm %s: QMP quit failed (%s); terminating QEMU", entry.name, exc)
            process.kill(pid, signal.SIGTERM)
        if not await process.wait_gone(entry.paths, pid, 10):
            process.kill(pid)
            await process.wait_gone(entry.paths, pid, 10)
        if entry.spec is not None:
            await self.vm_gone(entry.spec)

    async def vm_gone(self, spec: VmSpec) -> None:
        """Tidy up after a VM's QEMU has ended: its switch ports, its cgroups."""
        await self.network.vm_stopped(spec)
        await asyncio.to_thread(self.controls.release, spec)

    def _admit(self, spec: VmSpec) -> None:
        """Refuse to start ``spec`` if its reservations do not fit (admission control)."""
        new = admission.reserved_by(spec.resources)
        if not (new.cpu_mhz or new.memory_mib):
            return
        running = [
            admission.reserved_by(e.spec.resources)
            for e in self.inventory.entries()
            if e.spec is not None and e.name != spec.name and process.running_pid(e.paths)
        ]
        facts, keep = self._facts(), self.config.reservations
        cap = admission.capacity(
            facts.cpus,
            facts.core_mhz,
            facts.memory_total_mib,
            host_cpu_mhz=keep.host_cpu_mhz,
            host_memory_mib=keep.host_memory_mib,
        )
        admission.check_admission(spec.name, new, running, cap)

    async def shutdown(self, name: str, timeout: float | None = None) -> VmInfo:
        """ACPI power button; a hard power off if the guest has not gone after ``timeout``."""
        timeout = self.config.shutdown_timeout_s if timeout is None else timeout
        async with self.inventory.lock(name):
            entry, _, _ = await self._locked_state(name, Action.SHUTDOWN)
            pid = process.running_pid(entry.paths)
            process.record_stop(entry.paths, "shutdown", "guest shut down at the user's request")
            async with Monitor(name, entry.paths.qmp_socket) as mon:
                await mon.system_powerdown()
            if pid is not None and not await process.wait_gone(entry.paths, pid, timeout):
                reason = f"guest did not shut down within {timeout:g} s; powered off"
                await self._force_off(entry, reason)
                self.emit("vm.powered_off", name, reason)
            else:
                if entry.spec is not None:
                    await self.vm_gone(entry.spec)
                self.emit("vm.powered_off", name, "guest shut down")
        return await self.get_vm(name)

    async def _simple(
        self, name: str, action: Action, verb: Callable[[Monitor], Any], event: tuple[str, str]
    ) -> VmInfo:
        async with self.inventory.lock(name):
            entry, _, _ = await self._locked_state(name, action)
            async with Monitor(name, entry.paths.qmp_socket) as mon:
                await verb(mon)
            self.emit(event[0], name, event[1])
        return await self.get_vm(name)

    async def reset(self, name: str) -> VmInfo:
        return await self._simple(
            name, Action.RESET, lambda m: m.system_reset(), ("vm.reset", "reset")
        )

    async def pause(self, name: str) -> VmInfo:
        return await self._simple(name, Action.PAUSE, lambda m: m.stop(), ("vm.paused", "paused"))

    async def resume(self, name: str) -> VmInfo:
        """Continue a paused VM, or restore a suspended one from its saved state."""
        async with self.inventory.lock(name):
            entry, spec, state = await self._locked_state(name, Action.RESUME)
            if state is PowerState.SUSPENDED:
                await self._restore(entry, spec)
                self.emit("vm.resumed", name, "resumed from its suspended state")
            else:
                async with Monitor(name, entry.paths.qmp_socket) as mon:
                    await mon.cont()
                self.emit("vm.resumed", name, "resumed")
        return await self.get_vm(name)

    async def suspend(self, name: str) -> VmInfo:
        """Save the VM's memory and device state to disk, then end QEMU."""
        async with self.inventory.lock(name):
            entry, spec, _ = await self._locked_state(name, Action.SUSPEND)
            pid = process.running_pid(entry.paths)
            final = entry.paths.suspend_state
            partial = final.with_name(PARTIAL_STATE)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                async with Monitor(name, entry.paths.qmp_socket) as mon:
                    await mon.stop()
                    try:
                        await mon.migrate_to_fd(fd)
                        await asyncio.to_thread(os.fsync, fd)
                    except BaseException:
                        await mon.cont()
                        raise
                    process.record_stop(entry.paths, "suspend", "suspended by user")
                    await mon.quit()
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
            if pid is not None:
                await process.wait_gone(entry.paths, pid, 30)
            await self.vm_gone(spec)
            # Only once QEMU is gone does the state file become the VM's truth.
            partial.rename(final)
            fsync_dir(final.parent)
            self.emit("vm.suspended", name, "suspended to disk")
        return await self.get_vm(name)

    # Disks and CD-ROM

    async def add_disk(self, name: str, new: NewDisk) -> DiskSpec:
        """Create (or import) a disk and attach it; hot-plugged when the VM runs."""
        async with self.inventory.lock(name):
            entry, spec, state = await self._locked_state(name, Action.ADD_DISK)
            if state is PowerState.RUNNING and new.bus != "virtio":
                raise InvalidArgument("bus", "only virtio disks can be added to a running VM")
            disk = await self._make_disk(spec, new, entry.paths.vm_dir)
            try:
                updated = validate(
                    VmSpec,
                    {
                        **spec.model_dump(),
                        "disks": [*[d.model_dump() for d in spec.disks], disk.model_dump()],
                    },
                )
                updated = updated.with_pci_slots()
                disk = updated.disks[-1]
                if state is PowerState.RUNNING:
                    await self._hotplug_disk(entry, updated, disk)
                save_spec(entry.paths, updated)
            except BaseException:
                entry.paths.resolve(disk.path).unlink(missing_ok=True)
                raise
            self.emit("vm.disk_added", name, f"disk {disk.name} added", disk=disk.name)
        return disk

    async def _hotplug_disk(self, entry: VmEntry, spec: VmSpec, disk: DiskSpec) -> None:
        file_node, fmt_node = disk_nodes(disk, entry.paths)
        writable = not disk.readonly
        await self.isolation.grant(
            spec, entry.paths, entry.paths.resolve(disk.path), writable=writable
        )
        assert disk.slot is not None
        device = {
            "driver": "virtio-blk-pci",
            "id": disk.name,
            "drive": fmt_node["node-name"],
            **pci_placement(spec.machine, disk.slot),
        }
        async with Monitor(entry.name, entry.paths.qmp_socket) as mon:
            await mon.blockdev_add(file_node)
            try:
                await mon.blockdev_add(fmt_node)
                try:
                    await mon.device_add(device)
                except QemuError:
                    await mon.blockdev_del(fmt_node["node-name"])
                    raise
            except QemuError:
                await mon.blockdev_del(file_node["node-name"])
                raise

    async def remove_disk(self, name: str, disk_name: str, *, keep_file: bool = False) -> None:
        async with self.inventory.lock(name):
            entry, spec, state = await self._locked_state(name, Action.REMOVE_DISK)
            disk = spec.disk(disk_name)
            if disk is None:
                raise NotFound(f"vm {name!r} has no disk {disk_name!r}")
            if state is PowerState.RUNNING:
                if disk.bus != "virtio":
                    raise InvalidArgument("disk", "only virtio disks can be removed while running")
                async with Monitor(name, entry.paths.qmp_socket) as mon:
                    chain = await blocks.chain_nodes(mon, disk.name)
                    await mon.device_del(disk.name)
                    await blocks.delete_own_nodes(mon, disk.name, [n.name for n in chain])
            updated = spec.model_copy(update={"disks": [d for d in spec.disks if d is not disk]})
            save_spec(entry.paths, updated)
            path = entry.paths.resolve(disk.path)
            if not keep_file and path.resolve().is_relative_to(entry.paths.vm_dir.resolve()):
                path.unlink(missing_ok=True)
            self.emit("vm.disk_removed", name, f"disk {disk.name} removed", disk=disk.name)

    async def resize_disk(self, name: str, disk_name: str, size: int) -> DiskSpec:
        """Grow a disk; online through QMP when QEMU has it open."""
        async with self.inventory.lock(name):
            entry, spec, state = await self._locked_state(name, Action.RESIZE_DISK)
            disk = spec.disk(disk_name)
            if disk is None:
                raise NotFound(f"vm {name!r} has no disk {disk_name!r}")
            path = entry.paths.resolve(disk.path)
            info = await self.images.info(path)
            if size < info.virtual_size:
                raise InvalidArgument(
                    "size", f"shrinking is not supported (now {info.virtual_size} bytes)"
                )
            if state is PowerState.STOPPED:
                await self.images.resize(path, disk.format, size)
            else:
                async with Monitor(name, entry.paths.qmp_socket) as mon:
                    await mon.block_resize(await blocks.top_node(mon, disk.name), size)
            self.emit(
                "vm.disk_resized",
                name,
                f"disk {disk.name} grown to {size} bytes",
                disk=disk.name,
                size=size,
            )
        return disk

    async def insert_cdrom(self, name: str, iso: Path) -> CdromSpec:
        async with self.inventory.lock(name):
            entry, spec, state = await self._locked_state(name, Action.CHANGE_CDROM)
            if spec.cdrom is None:
                raise InvalidArgument("cdrom", f"vm {name!r} has no CD-ROM drive")
            full = self._existing_path(iso, "iso", entry.paths.vm_dir)
            if state is not PowerState.STOPPED:
                await self.isolation.grant(spec, entry.paths, full, writable=False)
                async with Monitor(name, entry.paths.qmp_socket) as mon:
                    await mon.change_medium("cdrom0", str(full))
            cdrom = spec.cdrom.model_copy(update={"path": str(full)})
            save_spec(entry.paths, spec.model_copy(update={"cdrom": cdrom}))
            self.emit("vm.cdrom_changed", name, f"CD-ROM: {full} inserted", path=str(full))
        return cdrom

    async def eject_cdrom(self, name: str) -> CdromSpec:
        async with self.inventory.lock(name):
            entry, spec, state = await self._locked_state(name, Action.CHANGE_CDROM)
            if spec.cdrom is None:
                raise InvalidArgument("cdrom", f"vm {name!r} has no CD-ROM drive")
            if state is not PowerState.STOPPED:
                async with Monitor(name, entry.paths.qmp_socket) as mon:
                    await mon.eject("cdrom0")
            cdrom = spec.cdrom.model_copy(update={"path": None})
            save_spec(entry.paths, spec.model_copy(update={"cdrom": cdrom}))
            self.emit("vm.cdrom_changed", name, "CD-ROM ejected")
        return cdrom

    # Snapshots (the work is in thinvisor.host.snapshots)

    async def list_snapshots(self, name: str) -> SnapshotTree:
        return await snapshots.list_snapshots(self, name)

    async def take_snapshot(
        self, name: str, req: SnapshotCreate, progress: Progress | None = None
    ) -> Snapshot:
        return await snapshots.take_snapshot(self, name, req, progress)

    async def revert_snapshot(
        self, name: str, ref: str, progress: Progress | None = None
    ) -> Snapshot:
        return await snapshots.revert_snapshot(self, name, ref, progress)

    async def delete_snapshot(
        self, name: str, ref: str, progress: Progress | None = None
    ) -> Snapshot:
        return await snapshots.delete_snapshot(self, name, ref, progress)

    # Moving disks and their provisioning (the work is in thinvisor.host.diskops)

    async def move_disk(
        self, name: str, disk_name: str, datastore: str, progress: Progress | None = None
    ) -> DiskSpec:
        return await diskops.move_disk(self, name, disk_name, datastore, progress)

    async def set_provisioning(
        self,
        name: str,
        disk_name: str,
        provisioning: diskops.Provisioning,
        progress: Progress | None = None,
    ) -> DiskSpec:
        return await diskops.set_provisioning(self, name, disk_name, provisioning, progress)

    # OVF / OVA exchange (the work is in thinvisor.host.ovf_io)

    async def export_ova(self, name: str, dest: Path, progress: Progress | None = None) -> Path:
        return await ovf_io.export_ova(self, name, dest, progress)

    async def import_ovf(
        self,
        source: Path,
        *,
        name: str | None = None,
        datastore: str | None = None,
        network: str = "user",
        progress: Progress | None = None,
    ) -> VmInfo:
        return await ovf_io.import_ovf(
            self, source, name=name, datastore=datastore, network=network, progress=progress
        )

    # Clones and templates (the work is in thinvisor.host.clones)

    async def clone_vm(
        self, source: str, req: clones.CloneRequest, progress: Progress | None = None
    ) -> VmInfo:
        return await clones.clone_vm(self, source, req, progress)

    async def deploy(
        self, template: str, req: clones.CloneRequest, progress: Progress | None = None
    ) -> VmInfo:
        return await clones.deploy(self, template, req, progress)

    async def set_template(self, name: str, template: bool) -> VmInfo:
        return await clones.set_template(self, name, template)

    # NICs (the work is in thinvisor.host.nics)

    async def list_nics(self, name: str) -> list[dict[str, Any]]:
        return await nics.list_nics(self, name)

    async def add_nic(self, name: str, new: NewNicSpec) -> NicSpec:
        return await nics.add_nic(self, name, new)

    async def remove_nic(self, name: str, nic_name: str) -> None:
        await nics.remove_nic(self, name, nic_name)

    async def update_nic(self, name: str, nic_name: str, change: NicUpdate) -> NicSpec:
        return await nics.update_nic(self, name, nic_name, change)


async def _copy_in(source: Path, vm_dir: Path, name: str, field_name: str) -> str:
    if not source.is_file():
        raise InvalidArgument(field_name, f"{source} does not exist")
    await asyncio.to_thread(shutil.copyfile, source, vm_dir / name)
    return name
