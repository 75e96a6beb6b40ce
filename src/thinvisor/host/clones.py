"""Clones, templates and deploying from templates (``HostService`` calls these).

A full clone copies the source's disks (their current state, or a snapshot's), each
chain flattened into one image; a linked clone gets a qcow2 overlay on the source's
frozen files instead, so it takes almost no space and the source's files are never
written again. A clone has its own name, UUID and MAC addresses.

What may be cloned: a stopped VM's current state, any VM's snapshot (running or not,
since frozen files do not change), and a template. A linked clone of a VM's current
state needs frozen files: thinvisor takes a snapshot of the stopped source first (named
after the clone), as vCenter does. A template's files are frozen already: a template is
never powered on and its disks never change, and it cannot become a VM again while
linked clones read its files.

Guest customization writes a NoCloud seed (``cidata.iso``) into the new VM's directory
and attaches it as a read-only disk named ``cidata``, as cloud-init expects.
"""

from __future__ import annotations

import asyncio
import errno
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from thinvisor.errors import Busy, InsufficientResources, InvalidArgument, InvalidState
from thinvisor.host import snapshots
from thinvisor.host.chains import own_files, real, users_of
from thinvisor.host.engine.paths import VmPaths
from thinvisor.host.inventory import VmEntry, save_spec
from thinvisor.host.state import Action, PowerState
from thinvisor.host.tasks import Progress
from thinvisor.model.base import StrictModel
from thinvisor.model.customization import Customization
from thinvisor.model.vm import DiskSpec, KernelBoot, VmName, VmSpec, validate
from thinvisor.storage.cidata import seed_files, write_seed
from thinvisor.storage.datastore import free_bytes
from thinvisor.storage.snapshots import SnapshotCreate

if TYPE_CHECKING:
    from thinvisor.host.service import HostService, VmInfo

SEED_DISK = "cidata"
SEED_FILE = "cidata.iso"


class CloneRequest(StrictModel):
    """A clone of a VM or of one of its snapshots (and deploying from a template)."""

    name: VmName
    snapshot: str | None = Field(default=None, description="a snapshot's id or unique name")
    linked: bool = Field(default=False, description="a qcow2 overlay on the source's files")
    datastore: str | None = Field(default=None, description="default: the source's")
    customization: Customization | None = None
    power_on: bool = False


@dataclass
class _Source:
    """What a clone is made from: a configuration and, per disk, the file to copy."""

    entry: VmEntry
    spec: VmSpec
    files: dict[str, Path]  # disk name -> the image (top of its chain) to copy or link


async def clone_vm(
    service: HostService, source: str, req: CloneRequest, progress: Progress | None = None
) -> VmInfo:
    """Create ``req.name`` as a clone of ``source``; power it on if asked."""
    async with service.inventory.lock(source):
        src = await _source(service, source, req)
        datastore = req.datastore or src.entry.datastore
        service.config.datastore(datastore)  # NotFound before any work
        if not req.linked:
            await _check_space(service, src, datastore)
        spec = _clone_spec(service, src.spec, req.name)
        builder = _Builder(service, src, req, progress)
        from thinvisor.host.service import CreateOptions

        info = await service.create_vm(
            spec, CreateOptions(datastore=datastore, build=builder.build)
        )
    kind = "linked clone" if req.linked else "full clone"
    service.emit("vm.cloned", req.name, f"{kind} of {source}", source=source)
    if req.power_on:
        info = await service.start(req.name)
    return info


async def deploy(
    service: HostService, template: str, req: CloneRequest, progress: Progress | None = None
) -> VmInfo:
    """A new VM from a template (a full or linked clone, customized when asked)."""
    _, spec = service.inventory.get_valid(template)
    if not spec.template:
        raise InvalidArgument("template", f"vm {template!r} is not a template")
    return await clone_vm(service, template, req, progress)


async def _source(service: HostService, name: str, req: CloneRequest) -> _Source:
    action = Action.CLONE_SNAPSHOT if req.snapshot is not None else Action.CLONE
    entry, spec, state = await service._locked_state(name, action)
    tree = await snapshots.repair(service, entry, spec, state)
    if req.snapshot is not None:
        snap = tree.find(name, req.snapshot)
    elif req.linked and not spec.template:
        # The current state must be frozen before anything can sit on it.
        request = SnapshotCreate(
            name=f"linked clone {req.name}",
            description=f"the base of linked clone {req.name}",
            memory=False,
        )
        snap = await snapshots.take_locked(service, entry, spec, PowerState.STOPPED, request)
    else:
        files = {d.name: entry.paths.resolve(d.path) for d in spec.disks}
        return _Source(entry, spec, files)
    old = snapshots.snapshot_spec(entry, snap)
    files = {d.name: entry.paths.resolve(snap.disks.get(d.name, d.path)) for d in old.disks}
    return _Source(entry, old, files)


async def _check_space(service: HostService, src: _Source, datastore: str) -> None:
    """Refuse a full clone that cannot fit, before copying a byte.

    The estimate is the space the source's chains take: a compressed or very sparse
    image may still outgrow it, and then the copy fails and is removed.
    """
    needed = 0
    for path in src.files.values():
        needed += sum(i.actual_size for i in await service.images.chain(path))
    free = await asyncio.to_thread(free_bytes, service.config.datastore(datastore).path)
    if free is not None and needed > free:
        raise InsufficientResources(
            f"datastore {datastore!r} has {free} bytes free; the clone needs about {needed}"
        )


def _clone_spec(service: HostService, spec: VmSpec, name: str) -> VmSpec:
    nics = []
    for nic in spec.nics:
        nics.append(nic.model_copy(update={"mac": service.new_mac()}).model_dump())
        # new_mac avoids the host's MACs; a clone's second NIC must avoid its first's.
        while len({n["mac"] for n in nics}) < len(nics):
            nics[-1]["mac"] = service.new_mac()
    data = {
        **spec.model_dump(),
        "name": name,
        "uuid": str(uuid.uuid4()),
        "nics": nics,
        "template": False,
        "autostart": False,
    }
    return validate(VmSpec, data)


class _Builder:
    """Fills the new VM's hidden directory: copies or overlays, files, the seed."""

    def __init__(
        self, service: HostService, src: _Source, req: CloneRequest, progress: Progress | None
    ) -> None:
        self.service = service
        self.src = src
        self.req = req
        self.progress = progress

    async def build(self, paths: VmPaths, spec: VmSpec) -> VmSpec:
        (paths.vm_dir / "logs").mkdir()
        spec = await self._files(paths, spec)
        disks = [d for d in spec.disks if not (self.req.customization and d.name == SEED_DISK)]
        copied = []
        for n, disk in enumerate(disks):
            copied.append(await self._disk(paths, disk, n, len(disks)))
        spec = spec.model_copy(update={"disks": copied})
        if self.req.customization is not None:
            spec = await self._seed(paths, spec, self.req.customization)
        return spec

    async def _files(self, paths: VmPaths, spec: VmSpec) -> VmSpec:
        """Copy the files the spec names inside the source's directory (kernel, initrd,
        an ISO in the CD-ROM); files elsewhere are shared."""
        src_dir = self.src.entry.paths.vm_dir

        async def copy(name: str | None) -> None:
            if name and not Path(name).is_absolute():
                await copy_file(src_dir / name, paths.vm_dir / name)

        if isinstance(spec.boot, KernelBoot):
            await copy(spec.boot.kernel)
            await copy(spec.boot.initrd)
        if spec.cdrom is not None:
            await copy(spec.cdrom.path)
        return spec

    async def _disk(self, paths: VmPaths, disk: DiskSpec, n: int, total: int) -> DiskSpec:
        source = self.src.files[disk.name]
        if disk.readonly and not Path(disk.path).is_absolute():
            await copy_file(source, paths.vm_dir / disk.path)
            return disk
        if disk.readonly:
            return disk  # a shared read-only image stays shared
        images = self.service.images
        if self.req.linked:
            target = paths.vm_dir / f"{disk.name}.qcow2"
            await images.create_overlay(target, _backing(paths, source), disk.format)
            return disk.model_copy(update={"path": target.name, "format": "qcow2"})
        target = paths.vm_dir / f"{disk.name}.{disk.format}"

        def report(percent: float) -> None:
            if self.progress is not None:
                done = int((n + percent / 100) * 100 / total)
                self.progress.update(done, f"copying disk {disk.name}")

        await images.convert(source, target, disk.format, progress=report)
        return disk.model_copy(update={"path": target.name})

    async def _seed(self, paths: VmPaths, spec: VmSpec, custom: Customization) -> VmSpec:
        files = seed_files(custom, instance_id=spec.uuid, macs=[n.mac for n in spec.nics])
        await asyncio.to_thread(write_seed, files, paths.vm_dir / SEED_FILE)
        seed = DiskSpec(name=SEED_DISK, path=SEED_FILE, format="raw", readonly=True)
        return spec.model_copy(update={"disks": [*spec.disks, seed]})


async def copy_file(source: Path, target: Path) -> None:
    """Copy a file in a worker thread; a full datastore is InsufficientResources."""
    try:
        await asyncio.to_thread(shutil.copyfile, source, target)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientResources(f"the datastore is full: copying {source.name}") from exc
        raise


def _backing(paths: VmPaths, base: Path) -> str:
    """How a linked clone names its base: relative within one datastore (the clone's
    directory is hidden while it is built, then renamed next to it), else absolute."""
    clone_parent = paths.vm_dir.parent
    if base.parent.parent == clone_parent:
        return f"../{base.parent.name}/{base.name}"
    return str(base)


# --- Templates ------------------------------------------------------------------------


async def set_template(service: HostService, name: str, template: bool) -> VmInfo:
    """Mark a stopped VM as a template, or make a template a VM again."""
    async with service.inventory.lock(name):
        entry, spec, _ = await service._locked_state(name, Action.MARK_TEMPLATE)
        if spec.template == template:
            state = "a template" if template else "not a template"
            raise InvalidState(name, state, "mark as " + ("a template" if template else "a VM"))
        if not template:
            files = {real(p) for p in own_files(entry, spec)}
            users = await users_of(service, files, exclude=name)
            if users:
                raise Busy(f"template {name!r} is the base of linked clone {users[0]!r}")
        save_spec(entry.paths, spec.model_copy(update={"template": template}))
        verb = "marked as a template" if template else "converted to a VM"
        service.emit("vm.template_changed", name, verb, template=template)
    return await service.get_vm(name)
