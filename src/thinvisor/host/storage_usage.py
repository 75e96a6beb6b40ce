"""How much space VMs take: per disk, per VM and per datastore.

A disk's *provisioned* size is its virtual size, what the guest sees. Its *used* bytes
are the bytes allocated on disk to the files of its backing chain that belong to the VM:
those in the VM's own directory, and the disk's active file when it lies in no VM's
directory. A backing file in another VM's directory (a linked clone's base, in its
template) or in no VM's directory (a base image shared by several VMs) is listed but not
counted. A disk is *thick* when its active file has at least its virtual size allocated,
*thin* otherwise.

A VM's used bytes are those of every file in its directory (disks, kernel, logs, a
suspended state) plus its own disk files kept elsewhere. qemu-img runs in subprocesses
and file walks in worker threads: nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import ImageError
from thinvisor.host.inventory import VmEntry
from thinvisor.model.vm import DiskSpec
from thinvisor.storage.datastore import Datastore, DatastoreVm, allocated_bytes
from thinvisor.storage.disk import ImageInfo, Images

if TYPE_CHECKING:
    from thinvisor.host.service import HostService

log = logging.getLogger(__name__)

Provisioning = Literal["thin", "thick"]


class ChainFile(BaseModel):
    """One file of a disk's backing chain."""

    path: str
    format: str
    virtual_size_bytes: int
    allocated_bytes: int
    datastore: str | None = Field(description="the datastore it lies in, if any")
    vm: str | None = Field(description="the VM whose directory holds it, if any")
    counted: bool = Field(description="whether it counts toward this VM's used bytes")


class DiskStorage(BaseModel):
    """A VM disk's space: its active file, its size, and its chain (top first)."""

    name: str
    path: str = Field(description="the active file, the top of the chain")
    datastore: str | None
    format: str
    virtual_size_bytes: int | None = Field(description="provisioned: the size the guest sees")
    used_bytes: int = Field(description="allocated bytes of the chain files that are the VM's")
    provisioning: Provisioning | None
    chain: list[ChainFile]
    error: str | None = Field(default=None, description="why the image could not be read")


class VmStorage(BaseModel):
    """A VM's space: its disks, and its totals."""

    name: str
    datastore: str
    vm_dir: str
    disks: list[DiskStorage]
    provisioned_bytes: int = Field(description="the virtual sizes of its disks")
    used_bytes: int = Field(
        description="bytes allocated to its files: its directory, and its disks elsewhere"
    )


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


@dataclass(frozen=True)
class Places:
    """Where the host's datastores and VM directories are, symbolic links resolved."""

    datastores: tuple[tuple[Path, str], ...]
    vm_dirs: tuple[tuple[Path, str], ...]

    def datastore_of(self, path: Path) -> str | None:
        real = _real(path)
        return next((name for root, name in self.datastores if real.is_relative_to(root)), None)

    def owner_of(self, path: Path) -> str | None:
        """The VM whose directory holds ``path``."""
        real = _real(path)
        return next((name for vm_dir, name in self.vm_dirs if real.is_relative_to(vm_dir)), None)


def places(datastores: list[DatastoreConfig], entries: list[VmEntry]) -> Places:
    """Blocking: it resolves every path."""
    return Places(
        tuple((_real(d.path), d.name) for d in datastores),
        tuple((_real(e.paths.vm_dir), e.name) for e in entries),
    )


async def _places(config: HostConfig, entries: list[VmEntry]) -> Places:
    datastores = await asyncio.to_thread(config.all_datastores)
    return await asyncio.to_thread(places, datastores, entries)


def _chain_files(where: Places, vm: str, chain: list[ImageInfo], top: Path) -> list[ChainFile]:
    files = []
    for i, info in enumerate(chain):
        path = Path(info.filename) if info.filename else top
        owner = where.owner_of(path)
        counted = owner == vm or (owner is None and i == 0)
        files.append(
            ChainFile(
                path=str(path),
                format=info.format,
                virtual_size_bytes=info.virtual_size,
                allocated_bytes=info.actual_size,
                datastore=where.datastore_of(path),
                vm=owner,
                counted=counted,
            )
        )
    return files


async def disk_storage(
    images: Images, where: Places, entry: VmEntry, disk: DiskSpec
) -> DiskStorage:
    """One disk's space; an image that cannot be read is reported with its error."""
    path = entry.paths.resolve(disk.path)
    datastore = await asyncio.to_thread(where.datastore_of, path)
    try:
        chain = await images.chain(path)
    except ImageError as exc:
        return DiskStorage(
            name=disk.name, path=str(path), datastore=datastore, format=disk.format,
            virtual_size_bytes=None, used_bytes=0, provisioning=None, chain=[], error=str(exc),
        )  # fmt: skip
    files = await asyncio.to_thread(_chain_files, where, entry.name, chain, path)
    top = chain[0]
    return DiskStorage(
        name=disk.name,
        path=str(path),
        datastore=datastore,
        format=top.format,
        virtual_size_bytes=top.virtual_size,
        used_bytes=sum(f.allocated_bytes for f in files if f.counted),
        provisioning="thick" if top.actual_size >= top.virtual_size else "thin",
        chain=files,
    )


async def vm_storage(service: HostService, name: str) -> VmStorage:
    """The space of the VM ``name``: per disk, and in total."""
    entry, spec = await asyncio.to_thread(service.inventory.get_valid, name)
    entries = await asyncio.to_thread(service.inventory.entries)
    where = await _places(service.config, entries)
    disks = [await disk_storage(service.images, where, entry, d) for d in spec.disks]
    in_dir = await asyncio.to_thread(allocated_bytes, entry.paths.vm_dir)
    # The VM's own files outside its directory (its directory's are counted whole).
    elsewhere = {
        f.path: f.allocated_bytes
        for d in disks
        for f in d.chain
        if f.counted and f.vm != entry.name
    }
    provisioned = {d.path: d.virtual_size_bytes or 0 for d in disks}
    return VmStorage(
        name=entry.name,
        datastore=entry.datastore,
        vm_dir=str(entry.paths.vm_dir),
        disks=disks,
        provisioned_bytes=sum(provisioned.values()),
        used_bytes=in_dir + sum(elsewhere.values()),
    )


# Per datastore


@dataclass(frozen=True)
class VmFiles:
    """Where one VM's files are and what they take."""

    name: str
    vm_dir: Path  # resolved
    dir_bytes: int
    disks: dict[Path, int]  # active file (resolved) -> virtual size
    elsewhere: dict[Path, int]  # active files in no VM's directory -> allocated bytes


async def vm_files(images: Images, where: Places, entry: VmEntry) -> VmFiles:
    """A VM's directory and disks; a disk whose image cannot be read is left out."""
    vm_dir = _real(entry.paths.vm_dir)
    dir_bytes = await asyncio.to_thread(allocated_bytes, vm_dir)
    disks: dict[Path, int] = {}
    elsewhere: dict[Path, int] = {}
    for disk in entry.spec.disks if entry.spec else []:
        path = _real(entry.paths.resolve(disk.path))
        try:
            disks[path] = (await images.info(path)).virtual_size
        except ImageError as exc:
            log.warning("vm %s: disk %s cannot be read: %s", entry.name, disk.name, exc)
            continue
        if await asyncio.to_thread(where.owner_of, path) is None:
            elsewhere[path] = await asyncio.to_thread(allocated_bytes, path)
    return VmFiles(entry.name, vm_dir, dir_bytes, disks, elsewhere)


def with_vm_usage(info: Datastore, root: Path, vms: list[VmFiles]) -> Datastore:
    """``info`` with its VMs' space: vm_used_bytes, provisioned_bytes and vms."""
    if not info.accessible:
        return info
    root = _real(root)
    provisioned: dict[Path, int] = {}
    listed: list[DatastoreVm] = []
    in_dirs = 0
    for vm in vms:
        disks = {p: size for p, size in vm.disks.items() if p.is_relative_to(root)}
        provisioned.update(disks)  # a file two VMs share counts once
        here = vm.vm_dir.is_relative_to(root)
        used = sum(size for p, size in vm.elsewhere.items() if p.is_relative_to(root))
        if here:
            in_dirs += vm.dir_bytes
            used += vm.dir_bytes
        if here or disks:
            listed.append(
                DatastoreVm(name=vm.name, provisioned_bytes=sum(disks.values()), used_bytes=used)
            )
    return info.model_copy(
        update={
            "vm_used_bytes": in_dirs,
            "provisioned_bytes": sum(provisioned.values()),
            "vms": listed,
        }
    )


async def all_vm_files(service: HostService) -> list[VmFiles]:
    """Every VM's files (qemu-img asked once per disk)."""
    entries = await asyncio.to_thread(service.inventory.entries)
    where = await _places(service.config, entries)
    return [await vm_files(service.images, where, e) for e in entries]
