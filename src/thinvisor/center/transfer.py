"""Moving a stopped VM between hosts of two provider kinds (a thinvisor host and a libvirt
host, say), through the center's machine.

Live migration needs both ends to speak one protocol; a stopped VM needs only its files.
The source's provider exports the VM (``Provider.export_vm``: each disk flattened into
one qcow2 image, its kernel and initrd) into a staging directory under the center's
state directory, the destination's provider makes a stopped VM from them
(``Provider.import_vm``), and only once the destination has it is the VM deleted on the
source. A failure before that leaves the VM where it was, as it was (whatever the
destination made is removed by its provider); the staging directory is removed in every
case.

The two kinds know the VM by different ids (a thinvisor VM's name, a libvirt domain's
UUID): the VM's inventory row moves as a live-migrated VM's does (``Inventory.move_vm``),
taking the destination's id for it, so that it keeps its inventory id, its tags, the
grants on it, its HA priority and its rules.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinvisor.center import service as center
from thinvisor.center.inventory import HostRow, VmRow
from thinvisor.errors import InvalidArgument, NotFound, ProviderError, ThinvisorError
from thinvisor.fs import private_dir
from thinvisor.host.tasks import Progress, Task
from thinvisor.providers.base import (
    Capability,
    MigrationOptions,
    PowerState,
    Provider,
    VmRecord,
)

#: The task's progress at each step: exported, imported, deleted on the source.
EXPORTED, IMPORTED, REMOVED = 45, 85, 95
#: The directory under the center's state directory that holds the staging directories.
STAGING = "transfers"


@dataclass(frozen=True)
class Transfer:
    """A transfer that passed its checks."""

    vm: VmRow
    source: HostRow
    destination: HostRow
    source_provider: Provider
    target: Provider
    datastore: str | None


async def crosses_kinds(service: center.CenterService, vm_id: int, host_id: int) -> bool:
    """Whether moving the VM to ``host_id`` is a transfer: the VM is stopped (not a
    template) and the host is of another provider kind than the VM's. Whatever is
    wrong (no such VM or host) is left to the caller's checks."""
    try:
        vm = await asyncio.to_thread(service.inventory.vm, vm_id)
        destination = await asyncio.to_thread(service.inventory.host, host_id)
        source = await asyncio.to_thread(service.inventory.host, vm.host_id)
    except NotFound:
        return False
    stopped = vm.power_state == PowerState.STOPPED and not vm.template
    return stopped and destination.provider != source.provider


async def plan(
    service: center.CenterService,
    vm_id: int,
    host_id: int,
    options: MigrationOptions,
    *,
    force: bool,
) -> Transfer:
    """The transfer of the stopped VM to ``host_id``, once both providers can transfer,
    the destination takes VMs (not in maintenance mode), has the datastore asked for,
    and (unless ``force``) placement lets it take the VM."""
    vm = await asyncio.to_thread(service.inventory.vm, vm_id)
    destination = await asyncio.to_thread(service.inventory.host, host_id)
    source = await asyncio.to_thread(service.inventory.host, vm.host_id)
    source_provider = service.syncs.get(source.id).provider()
    target = service.syncs.get(destination.id).provider()
    source_provider.require(Capability.TRANSFER)
    target.require(Capability.TRANSFER)
    service._check_takes_vms(destination)
    if options.datastore is not None:
        stores = await asyncio.to_thread(service.inventory.datastores, destination.id)
        if options.datastore not in {d.name for d in stores}:
            raise InvalidArgument(
                "datastore", f"{destination.path} has no datastore {options.datastore!r}"
            )
    if not force:
        await service._check_placement(vm, destination, live=False)
    return Transfer(vm, source, destination, source_provider, target, options.datastore)


async def submit(service: center.CenterService, transfer: Transfer, user: str | None) -> Task:
    """The task ``vm.migrate`` that carries ``transfer`` out (not cancellable: a copy
    half made is not worth keeping, and the source is untouched until the end)."""
    vm = transfer.vm
    await asyncio.to_thread(service.inventory.begin_move, vm.id, transfer.destination.id)

    async def work(progress: Progress) -> dict[str, Any]:
        return await run(service, transfer, progress, user)

    try:
        return service.tasks.submit("vm.migrate", vm.path, user, work)
    except BaseException:
        service.inventory.end_move(vm.id)
        raise


async def run(
    service: center.CenterService, transfer: Transfer, progress: Progress, user: str | None
) -> dict[str, Any]:
    """Export, import, delete on the source; then the inventory follows."""
    vm, source, destination = transfer.vm, transfer.source, transfer.destination
    root = await asyncio.to_thread(private_dir, staging_root(service))
    staging = root / uuid.uuid4().hex
    try:
        await asyncio.to_thread(private_dir, staging)
        progress.update(2, f"exporting {vm.name} from {source.name}")
        exported = await transfer.source_provider.export_vm(vm.ext_id, staging)
        sizes = sum(d.path.stat().st_size for d in exported.disks)
        progress.update(EXPORTED, f"importing {vm.name} into {destination.name}")
        record = await transfer.target.import_vm(exported, transfer.datastore)
        progress.update(IMPORTED, f"deleting {vm.name} on {source.name}")
        await _remove_source(transfer, record)
        progress.update(REMOVED, f"{vm.name} is on {destination.name}")
        async with service._hosts_held(source.id, destination.id):
            row = await asyncio.to_thread(_replace_row, service, transfer, record)
    finally:
        service.inventory.end_move(vm.id)
        await asyncio.to_thread(shutil.rmtree, staging, True)
        await service._resync(source.id, destination.id)
    result = {
        "vm": center.vm_dict(row),
        "source": vm.path,
        "destination": destination.path,
        "mode": "transfer",
        "live": False,
        "disks": len(exported.disks),
        "kernel": exported.kernel is not None,
        "transferred_bytes": sizes,
    }
    service.events.emit(
        "vm.migrated",
        f"vm {vm.name} moved from {source.name} ({source.provider}) to {destination.name}"
        f" ({destination.provider}), its files copied",
        object=f"host/{destination.name}/vm/{row.name}",
        user=user,
        data={"from": vm.path, "to": row.path, "vm_id": row.id, **result},
    )
    return result


def staging_root(service: center.CenterService) -> Path:
    """Where transfers stage their files: beside the center's event log, in its state
    directory."""
    return service.events.path.parent / STAGING


async def _remove_source(transfer: Transfer, record: VmRecord) -> None:
    """Delete the VM on the source, now that the destination has it. Should that fail,
    the VM is on both hosts: the error says so (the copy is kept, being complete)."""
    try:
        await transfer.source_provider.delete(transfer.vm.ext_id)
    except ThinvisorError as exc:
        raise ProviderError(
            f"vm {transfer.vm.name} was copied to {transfer.destination.path} (as"
            f" {record.name}) but not deleted on {transfer.source.path}: {exc}"
        ) from exc


def _replace_row(service: center.CenterService, transfer: Transfer, record: VmRecord) -> VmRow:
    """The VM's row, moved to the destination under the id it has there, and updated to
    what the destination says of it."""
    inventory = service.inventory
    inventory.move_vm(transfer.vm.id, transfer.destination.id, ext_id=record.id)
    return inventory.apply_vm(transfer.destination.id, record)
