"""Moving disks between datastores and changing their provisioning (``HostService``).

A stopped VM's disk is copied with qemu-img; a running VM's is mirrored by QEMU
(``blockdev-mirror`` in write-blocking mode, so that once the job is ready the copy
stays identical to what the guest writes) and QEMU switches to the copy without the
guest noticing. Either way the disk's current state becomes one image in
``<datastore>/<vm>/``: a chain is flattened, and snapshots keep their frozen files where
they are. ``vm.toml`` names the new file before the old one is removed.

Provisioning: *thick* allocates every block up front (``preallocation=full``), *thin*
only what was written. Converting rewrites the image beside the old one and renames it
over it, for a stopped VM's disk that is a single image (no snapshots or base below).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from thinvisor.errors import InsufficientResources, InvalidArgument, NotFound, QemuError
from thinvisor.host.chains import real
from thinvisor.host.engine import blocks
from thinvisor.host.engine.qmp import Monitor
from thinvisor.host.inventory import VmEntry, save_spec
from thinvisor.host.snapshots import LIVE, _delete, _empty_trash, repair, spec_path
from thinvisor.host.state import Action
from thinvisor.host.tasks import Progress
from thinvisor.model.base import StrictModel
from thinvisor.model.vm import DiskSpec, VmSpec
from thinvisor.storage.datastore import free_bytes
from thinvisor.storage.snapshots import SnapshotTree, save_tree

if TYPE_CHECKING:
    from thinvisor.host.service import HostService

Provisioning = Literal["thin", "thick"]


class DiskMove(StrictModel):
    datastore: str = Field(description="the datastore the disk moves to")


class DiskProvisioning(StrictModel):
    provisioning: Provisioning = Field(description="thick: every block allocated up front")


def _disk(spec: VmSpec, name: str) -> DiskSpec:
    disk = spec.disk(name)
    if disk is None:
        raise NotFound(f"vm {spec.name!r} has no disk {name!r}")
    return disk


def _new_file(tree: SnapshotTree, directory: Path, disk: DiskSpec) -> Path:
    """A free ``<disk>-NNNNNN.<format>`` in ``directory`` (counted in the tree)."""
    while True:
        candidate = directory / f"{disk.name}-{tree.next_file:06d}.{disk.format}"
        tree.next_file += 1
        if not os.path.lexists(candidate):
            return candidate


def _with_disk(spec: VmSpec, disk: DiskSpec) -> VmSpec:
    return spec.model_copy(
        update={"disks": [disk if d.name == disk.name else d for d in spec.disks]}
    )


def _report(progress: Progress | None, message: str) -> blocks.JobReport:
    def report(done: int, total: int) -> None:
        if progress is not None and total:
            progress.update(100 * done // total, message)

    return report


async def _needed(service: HostService, path: Path) -> int:
    return sum(i.actual_size for i in await service.images.chain(path))


async def _check_free(directory: Path, needed: int, what: str) -> None:
    free = await asyncio.to_thread(free_bytes, directory)
    if free is not None and needed > free:
        raise InsufficientResources(f"{what} has {free} bytes free; {needed} are needed")


# --- Moving ---------------------------------------------------------------------------


async def move_disk(
    service: HostService, name: str, disk_name: str, datastore: str, progress: Progress | None
) -> DiskSpec:
    """Move a disk's current state to ``datastore`` (live when the VM runs)."""
    async with service.inventory.lock(name):
        entry, spec, state = await service._locked_state(name, Action.MOVE_DISK)
        tree = await repair(service, entry, spec, state)
        disk = _disk(spec, disk_name)
        target_ds = service.config.datastore(datastore)
        active = entry.paths.resolve(disk.path)
        if service.inventory.datastore_of(active) == target_ds:
            raise InvalidArgument("datastore", f"disk {disk_name} lies in {datastore} already")
        live = state in LIVE
        if live and disk.readonly:
            raise InvalidArgument("disk", "a read-only disk moves while the VM is stopped")
        directory = target_ds.path / name
        await _check_free(
            target_ds.path, await _needed(service, active), f"datastore {datastore!r}"
        )
        directory.mkdir(parents=True, exist_ok=True)
        target = _new_file(tree, directory, disk)
        save_tree(entry.paths.vm_dir, tree)
        moved = disk.model_copy(update={"path": spec_path(entry.paths, target)})
        if live:
            await _mirror(service, entry, spec, disk, target, moved, progress)
        else:
            await _copy(service, entry, spec, active, target, moved, progress)
        tree.trash.append(disk.path)
        _empty_trash(entry.paths, _with_disk(spec, moved), tree)
        save_tree(entry.paths.vm_dir, tree)
        service.emit(
            "vm.disk_moved",
            name,
            f"disk {disk_name} moved to datastore {datastore}",
            disk=disk_name,
            datastore=datastore,
        )
        return moved


async def _copy(
    service: HostService,
    entry: VmEntry,
    spec: VmSpec,
    active: Path,
    target: Path,
    moved: DiskSpec,
    progress: Progress | None,
) -> None:
    def report(percent: float) -> None:
        if progress is not None:
            progress.update(int(percent), f"copying disk {moved.name}")

    await service.images.convert(active, target, moved.format, progress=report)
    try:
        save_spec(entry.paths, _with_disk(spec, moved))
    except BaseException:
        _delete(target)
        raise


async def _mirror(
    service: HostService,
    entry: VmEntry,
    spec: VmSpec,
    disk: DiskSpec,
    target: Path,
    moved: DiskSpec,
    progress: Progress | None,
) -> None:
    size = (await service.images.info(entry.paths.resolve(disk.path))).virtual_size
    await service.images.create(target, disk.format, size)
    await service.isolation.grant(spec, entry.paths, target, writable=True)
    node = f"{disk.name}-om{int(time.monotonic() * 1000)}"
    job_id = f"mirror-{disk.name}-{int(time.monotonic() * 1000)}"
    sock = entry.paths.qmp_socket
    committed = False
    try:
        async with Monitor(entry.name, sock) as mon:
            old = await blocks.chain_nodes(mon, disk.name)
            await mon.blockdev_add(
                {
                    "driver": disk.format,
                    "node-name": node,
                    "file": {"driver": "file", "filename": str(target)},
                    "discard": "unmap",
                }
            )
            await mon.execute(
                "blockdev-mirror",
                {
                    "job-id": job_id,
                    "device": old[0].name,
                    "target": node,
                    "sync": "full",
                    "copy-mode": "write-blocking",
                    "auto-dismiss": False,
                },
            )

        async def commit() -> None:
            # Ready: the copy is whole and every guest write now reaches both. From
            # here on the copy is the disk, whatever happens to the job or the agent.
            nonlocal committed
            save_spec(entry.paths, _with_disk(spec, moved))
            committed = True

        await blocks.run_job(
            entry.name,
            sock,
            job_id,
            _report(progress, f"mirroring disk {disk.name}"),
            on_ready=commit,
        )
    except BaseException:
        if not committed:
            async with Monitor(entry.name, sock) as mon:
                present = {n["node-name"] for n in await mon.command("query-named-block-nodes")}
                if node in present:
                    with contextlib.suppress(QemuError):
                        await mon.blockdev_del(node)
            _delete(target)
        raise
    async with Monitor(entry.name, sock) as mon:
        await blocks.delete_own_nodes(mon, disk.name, [n.name for n in old])


# --- Provisioning ---------------------------------------------------------------------


async def set_provisioning(
    service: HostService,
    name: str,
    disk_name: str,
    provisioning: Provisioning,
    progress: Progress | None,
) -> DiskSpec:
    """Rewrite a stopped VM's disk thick (every block allocated) or thin."""
    async with service.inventory.lock(name):
        entry, spec, state = await service._locked_state(name, Action.CONVERT_DISK)
        tree = await repair(service, entry, spec, state)
        disk = _disk(spec, disk_name)
        active = entry.paths.resolve(disk.path)
        info = await service.images.info(active)
        if info.backing_file is not None or real(active) in {
            real(entry.paths.resolve(f)) for f in tree.frozen_files()
        }:
            raise InvalidArgument(
                "disk",
                f"disk {disk_name} has snapshots or a base image; delete the snapshots "
                "or move the disk (which makes it one image) first",
            )
        if provisioning == "thick":
            await _check_free(active.parent, info.virtual_size, "the disk's datastore")
        work = _new_file(tree, active.parent, disk)
        save_tree(entry.paths.vm_dir, tree)

        def report(percent: float) -> None:
            if progress is not None:
                progress.update(int(percent), f"rewriting disk {disk_name} {provisioning}")

        options = ["preallocation=full"] if provisioning == "thick" else []
        await service.images.convert(
            active, work, disk.format, options=options, source_format=disk.format, progress=report
        )
        await asyncio.to_thread(os.replace, work, active)
        service.emit(
            "vm.disk_provisioning",
            name,
            f"disk {disk_name} is now {provisioning}",
            disk=disk_name,
            provisioning=provisioning,
        )
        return disk
