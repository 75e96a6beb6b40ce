"""OVF/OVA export and import: VMs exchanged with VMware, VirtualBox and other thinvisor
hosts.

Export writes a stopped VM (or a template) as one ``.ova`` in a datastore: its disks as
stream-optimized VMDKs converted by qemu-img, a descriptor, a SHA-256 manifest and, for
a VM booting a kernel directly, its kernel and initrd. Import reads an ``.ova`` or an
``.ovf`` directory from a datastore into a new VM: the manifest is checked first, the
descriptor mapped onto a ``VmSpec``, the disks converted to qcow2 by ``create_vm``.

Neither leaves anything behind when it fails or is cancelled. Work files live in hidden
``.import-*`` / ``.export-*`` entries at the top of a datastore; ``sweep_imports``
removes what a crash left there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from thinvisor.errors import AlreadyExists, ImageError, InvalidArgument
from thinvisor.host.inventory import VmEntry
from thinvisor.host.state import Action
from thinvisor.host.tasks import Progress
from thinvisor.model.create import NewDiskSpec
from thinvisor.model.vm import USER_NETWORK, KernelBoot, VmSpec, check_name, validate
from thinvisor.storage import ovf
from thinvisor.storage.datastore import check_writable
from thinvisor.storage.disk import _qemu_img

if TYPE_CHECKING:
    from thinvisor.host.service import CreateOptions, HostService, VmInfo

log = logging.getLogger(__name__)

IMPORT_PREFIX = ".import-"
EXPORT_PREFIX = ovf.PARTIAL_PREFIX
# A VMDK thinvisor converts from: one self-contained sparse file, nothing it points to.
_VMDK_TYPES = ("streamOptimized", "monolithicSparse")
_CONVERT_SHARE = 80  # percent of an export's progress spent converting disks
_EXTRACT_SHARE = 50  # percent of an import's progress spent reading the package

T = TypeVar("T")


# Progress and blocking work


def _report(progress: Progress | None, percent: float, message: str | None = None) -> None:
    if progress is not None:
        progress.update(int(percent), message)


class _Meter:
    """Turns bytes counted in a worker thread into task progress, reported on the event
    loop only when the whole percentage changes."""

    def __init__(
        self, progress: Progress | None, span: tuple[float, float], total: int, message: str
    ):
        self.progress = progress
        self.start, self.end = span
        self.total = max(total, 1)
        self.message = message
        self.done = 0
        self.shown = -1
        self.loop = asyncio.get_running_loop()

    def __call__(self, count: int) -> None:
        self.done += count
        share = min(self.done / self.total, 1.0)
        percent = int(self.start + (self.end - self.start) * share)
        if self.progress is not None and percent != self.shown:
            self.shown = percent
            self.loop.call_soon_threadsafe(self.progress.update, percent, self.message)


async def _in_thread(work: Callable[[threading.Event], T]) -> T:
    """Run blocking ``work(stop)`` in a worker thread. When the caller is cancelled, ask
    the work to stop and wait until it has, so that nothing it writes outlives the task."""
    stop = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(work, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_imports(datastore_paths: Iterable[Path]) -> list[Path]:
    """Remove what imports and exports cut short by a crash left at the top of the
    datastores (hidden ``.import-*`` directories, ``.export-*`` files and directories).
    Blocking; call it when no import or export runs, at agent start."""
    removed: list[Path] = []
    for root in datastore_paths:
        if not root.is_dir():
            continue
        for leftover in root.iterdir():
            if leftover.name.startswith((IMPORT_PREFIX, EXPORT_PREFIX)):
                _remove(leftover)
                removed.append(leftover)
    if removed:
        log.info("removed leftovers of interrupted imports and exports: %s", removed)
    return removed


# Export


def _export_target(service: HostService, dest: Path) -> Path:
    """``dest`` if an OVA may be written there: a new ``.ova`` in a datastore."""
    if not dest.is_absolute():
        raise InvalidArgument("dest", "must be an absolute path")
    if dest.suffix.lower() != ".ova":
        raise InvalidArgument("dest", f"{dest.name} does not end in .ova")
    datastore = service.inventory.datastore_of(dest)
    if datastore is None:
        raise InvalidArgument("dest", f"{dest} is outside the host's datastores")
    # Not into a VM's directory, which only VM actions write (as the file browser).
    check_writable(datastore.path, dest)
    if dest.parent.exists() and not dest.parent.is_dir():
        raise InvalidArgument("dest", f"{dest.parent} is not a directory")
    if dest.exists() or dest.is_symlink():
        raise AlreadyExists(f"{dest} already exists")
    return dest


async def export_ova(
    service: HostService, name: str, dest: Path, progress: Progress | None = None
) -> Path:
    """Export the stopped VM (or template) ``name`` to the new OVA ``dest``, a path in one
    of the host's datastores. Returns ``dest``."""
    dest = _export_target(service, dest)
    datastore = service.inventory.datastore_of(dest)
    assert datastore is not None
    async with service.inventory.lock(name):
        entry, spec, _ = await service._locked_state(name, Action.EXPORT)
        # A missing directory is made, as an upload's would be.
        await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=EXPORT_PREFIX, dir=datastore.path))
        try:
            system, files = await _export_files(service, entry, spec, work, progress)
            members = await _in_thread(lambda stop: _ova_members(spec.name, system, files, stop))
            total = sum(path.stat().st_size for _, path in files)
            meter = _Meter(progress, (_CONVERT_SHARE, 100), total, "writing the OVA")
            await _write(dest, members, meter)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
    service.emit("vm.exported", name, f"exported to {dest}", path=str(dest))
    return dest


async def _write(dest: Path, members: list[ovf.Member], meter: _Meter) -> None:
    """Write the OVA in a worker thread; cancelled, even just after, leaves no ``dest``."""
    written = threading.Event()

    def write(stop: threading.Event) -> None:
        ovf.write_ova(dest, members, stop=stop, on_bytes=meter)
        written.set()

    try:
        await _in_thread(write)
    except BaseException:
        if written.is_set():  # write_ova never replaces a file: this one is ours
            dest.unlink(missing_ok=True)
        raise


async def _export_files(
    service: HostService, entry: VmEntry, spec: VmSpec, work: Path, progress: Progress | None
) -> tuple[ovf.OvfSystem, list[tuple[str, Path]]]:
    """The VM as an ``OvfSystem``, and the files of its package (name, path)."""
    sources = [entry.paths.resolve(d.path) for d in spec.disks]
    sizes = [(await service.images.info(path)).virtual_size for path in sources]
    total, done = sum(sizes), 0
    disks: list[ovf.OvfDisk] = []
    files: list[tuple[str, Path]] = []
    for n, (disk, source, size) in enumerate(zip(spec.disks, sources, sizes, strict=True), 1):
        report = _disk_meter(progress, f"converting disk {disk.name}", done, size, total)
        target = work / f"{spec.name}-{disk.name}.vmdk"
        adapter = "ide" if disk.bus == "ide" else "lsilogic"  # the controller it is written on
        await service.images.convert(
            source,
            target,
            "vmdk",
            options=["subformat=streamOptimized", f"adapter_type={adapter}"],
            # Never probed: a raw disk's guest may have written any header into it.
            source_format=disk.format,
            progress=report,
        )
        done += size
        file = ovf.OvfFile(f"file{n}", target.name, target.stat().st_size)
        populated = await _populated_size(service, target)
        disks.append(ovf.OvfDisk(f"vmdisk{n}", disk.name, file, size, disk.bus, populated))
        files.append((target.name, target))
    kernel = _kernel_files(entry, spec, files)
    system = ovf.OvfSystem(
        name=spec.name,
        vcpus=spec.vcpus,
        memory_mib=spec.memory_mib,
        disks=tuple(disks),
        nics=tuple(ovf.OvfNic(n.name, n.model, n.network, n.mac, n.connected) for n in spec.nics),
        cdrom_bus=spec.cdrom.bus if spec.cdrom is not None else None,
        thinvisor=True,
        machine=spec.machine,
        kernel=kernel,
        boot_order=() if isinstance(spec.boot, KernelBoot) else tuple(spec.boot.order),
    )
    return system, files


def _disk_meter(
    progress: Progress | None, message: str, done: int, size: int, total: int
) -> Callable[[float], None]:
    """The progress callback of one disk's conversion (``percent`` of that disk)."""

    def report(percent: float) -> None:
        share = (done + size * percent / 100) / total if total else 1.0
        _report(progress, _CONVERT_SHARE * share, message)

    return report


def _kernel_files(
    entry: VmEntry, spec: VmSpec, files: list[tuple[str, Path]]
) -> ovf.OvfKernel | None:
    """A kernel-booting VM's kernel and initrd as package files ``<vm>-vmlinuz`` and
    ``<vm>-initrd.img`` (the names thinvisor gives them in a VM), appended to ``files``."""
    boot = spec.boot
    if not isinstance(boot, KernelBoot):
        return None
    found: list[ovf.OvfFile] = []
    for member, path in (("vmlinuz", boot.kernel), ("initrd.img", boot.initrd)):
        if path is None:
            continue
        source = entry.paths.resolve(path)
        name = f"{spec.name}-{member}"
        found.append(ovf.OvfFile(f"file{len(files) + 1}", name, source.stat().st_size))
        files.append((name, source))
    return ovf.OvfKernel(found[0], found[1] if len(found) > 1 else None, boot.cmdline)


async def _populated_size(service: HostService, vmdk: Path) -> int:
    """Bytes of the disk that hold data (OVF's populatedSize)."""
    out = await _qemu_img(service.images.binary, "map", "--output=json", "-f", "vmdk", str(vmdk))
    return sum(int(e["length"]) for e in json.loads(out) if e.get("data"))


def _ova_members(
    name: str, system: ovf.OvfSystem, files: list[tuple[str, Path]], stop: threading.Event
) -> list[ovf.Member]:
    """The OVA's members in the order OVF requires: descriptor, manifest, files
    (blocking: every file is read once for its digest)."""
    descriptor = ovf.build_descriptor(system)
    digests = {f"{name}.ovf": _sha256(descriptor)}
    digests.update({member: ovf.file_digest(path, "SHA256", stop) for member, path in files})
    manifest = ovf.manifest_text(digests)
    return [(f"{name}.ovf", descriptor), (f"{name}.mf", manifest), *files]


def _sha256(data: bytes) -> str:
    h = ovf.new_hash("SHA256")
    h.update(data)
    return str(h.hexdigest())


# Import


def _source_package(service: HostService, source: Path) -> ovf.Package:
    if not source.is_absolute():
        raise InvalidArgument("source", "must be an absolute path")
    if not source.exists():
        raise InvalidArgument("source", f"{source} does not exist")
    if service.inventory.datastore_of(source) is None:
        raise InvalidArgument("source", f"{source} is outside the host's datastores")
    return ovf.open_package(source)


async def import_ovf(
    service: HostService,
    source: Path,
    *,
    name: str | None = None,
    datastore: str | None = None,
    network: str = USER_NETWORK,
    progress: Progress | None = None,
) -> VmInfo:
    """Import an OVF package (an ``.ova``, an ``.ovf`` file, or a directory holding one,
    in a datastore) as a new VM, every NIC on ``network``. Returns the new VM."""
    target = service.config.datastore(datastore)
    if network != USER_NETWORK:
        await asyncio.to_thread(service.network.lookup, network)
    package = await asyncio.to_thread(_source_package, service, source)
    try:
        target.path.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=IMPORT_PREFIX, dir=target.path))
        try:
            info = await _import(service, package, work, name, target.name, network, progress)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
    finally:
        package.close()
    service.emit("vm.imported", info.name, f"imported from {source}", source=str(source))
    return info


async def _import(
    service: HostService,
    package: ovf.Package,
    work: Path,
    name: str | None,
    datastore: str,
    network: str,
    progress: Progress | None,
) -> VmInfo:
    _report(progress, 0, "reading the descriptor")
    descriptor, manifest = await asyncio.to_thread(_read_head, package)
    system = ovf.parse_descriptor(descriptor)
    spec = _vm_spec(service, system, name, network)
    if service.inventory.find(spec.name) is not None:
        raise AlreadyExists(f"vm {spec.name!r} already exists")
    service._check_resources(spec)
    service.network.check_networks(spec)
    wanted = [f.href for f in system.files()]
    total = await asyncio.to_thread(package.read_size, wanted, manifest)
    meter = _Meter(progress, (0, _EXTRACT_SHARE), total, "checking and extracting files")
    paths = await _in_thread(
        lambda stop: package.fetch(wanted, manifest, work, stop=stop, on_bytes=meter)
    )
    new_disks = [
        await _new_disk(service, package.field, disk, paths[disk.file.href])
        for disk in system.disks
    ]
    _report(progress, _EXTRACT_SHARE, "converting the disks to qcow2")
    options = _create_options(datastore, new_disks, system.kernel, paths)
    return await service.create_vm(spec, options)


def _read_head(package: ovf.Package) -> tuple[bytes, dict[str, ovf.Digest] | None]:
    """The descriptor, checked against the manifest, and the manifest (blocking)."""
    raw = package.read_manifest()
    manifest = ovf.parse_manifest(raw, package.field) if raw is not None else None
    descriptor = package.read_descriptor()
    ovf.check_descriptor(package, manifest, descriptor)
    return descriptor, manifest


def _create_options(
    datastore: str,
    new_disks: list[NewDiskSpec],
    kernel: ovf.OvfKernel | None,
    paths: Mapping[str, Path],
) -> CreateOptions:
    # Imported here: the service may import this module.
    from thinvisor.host.service import CreateOptions

    options = CreateOptions(datastore=datastore, new_disks=new_disks)
    if kernel is not None:
        options.kernel_source = paths[kernel.kernel.href]
        if kernel.initrd is not None:
            options.initrd_source = paths[kernel.initrd.href]
    return options


def _vm_name(system: ovf.OvfSystem, name: str | None) -> str:
    if name is not None:
        try:
            return check_name(name)
        except ValueError as exc:
            raise InvalidArgument("name", str(exc)) from None
    try:
        return check_name(system.name)
    except ValueError as exc:
        reason = f"the OVF's name {system.name!r} is not a valid VM name ({exc}); give a name"
        raise InvalidArgument("name", reason) from None


def _vm_spec(service: HostService, system: ovf.OvfSystem, name: str | None, network: str) -> VmSpec:
    """The new VM's spec (its disks come from ``create_vm``), validated as a whole."""
    if system.firmware == "efi":
        raise InvalidArgument(
            "ovf", "the VM needs UEFI firmware (firmware=efi); thinvisor VMs boot with BIOS"
        )
    data: dict[str, Any] = {
        "name": _vm_name(system, name),
        "vcpus": system.vcpus,
        "memory_mib": system.memory_mib,
        "machine": system.machine or "q35",
        "boot": _boot(system),
        "cdrom": {"bus": system.cdrom_bus} if system.cdrom_bus else None,
        "nics": _nics(service, system, network),
    }
    # The disks as they will be, so that the whole is checked before any work is done.
    probe = [{"name": f"disk{n}", "path": "-", "bus": d.bus} for n, d in enumerate(system.disks)]
    try:
        validate(VmSpec, {**data, "disks": probe})
    except InvalidArgument as exc:
        raise InvalidArgument("ovf", f"cannot be mapped to a VM: {exc}") from None
    return validate(VmSpec, data)


def _boot(system: ovf.OvfSystem) -> dict[str, Any]:
    if system.kernel is not None:
        return {
            "kind": "kernel",
            "kernel": "vmlinuz",
            "initrd": "initrd.img" if system.kernel.initrd else None,
            "cmdline": system.kernel.cmdline,
        }
    if system.boot_order:
        return {"kind": "firmware", "order": list(system.boot_order)}
    return {"kind": "firmware"}


def _nics(service: HostService, system: ovf.OvfSystem, network: str) -> list[dict[str, Any]]:
    """Every NIC on ``network``. A NIC keeps its MAC only when thinvisor wrote the OVF and
    no VM on this host has that MAC; any other gets a new one from the host, since a MAC
    from another product or host may well be in use on this network."""
    taken = service._macs_in_use()
    nics = []
    for n, nic in enumerate(system.nics):
        mac = nic.mac if system.thinvisor and nic.mac and nic.mac not in taken else None
        while mac is None or mac in taken:
            mac = service.new_mac()
        taken.add(mac)
        nics.append(
            {
                "name": f"net{n}",
                "model": nic.model,
                "mac": mac,
                "network": network,
                "connected": nic.connected,
            }
        )
    return nics


async def _new_disk(service: HostService, field: str, disk: ovf.OvfDisk, path: Path) -> NewDiskSpec:
    """The disk to create from ``path``, once it is known to be a self-contained VMDK."""
    virtual_size = await _check_vmdk(service, field, path)
    grow = disk.capacity if disk.capacity > virtual_size else None
    data = {"source": path, "format": "qcow2", "bus": disk.bus, "size": grow}
    return validate(NewDiskSpec, data)


async def _check_vmdk(service: HostService, field: str, path: Path) -> int:
    """The virtual size of ``path`` if it is one self-contained VMDK file. qemu-img is
    left to probe, as the conversion will: what it sees must be this VMDK and nothing
    else (no backing file, no extent in another file of the host)."""
    try:
        out = await _qemu_img(service.images.binary, "info", "--output=json", str(path))
        data = json.loads(out)
    except (ImageError, ValueError) as exc:
        raise InvalidArgument(field, f"disk file {path.name} cannot be read: {exc}") from exc
    if data.get("format") != "vmdk":
        raise InvalidArgument(field, f"disk file {path.name} is {data.get('format')}, not VMDK")
    details = data.get("format-specific", {}).get("data", {})
    extents = [e.get("filename") for e in details.get("extents", [])]
    own = data.get("backing-filename") is None and extents == [data.get("filename")]
    if details.get("create-type") not in _VMDK_TYPES or not own:
        raise InvalidArgument(field, f"disk file {path.name} is not a self-contained sparse VMDK")
    return int(data["virtual-size"])
