"""Snapshots, clones, templates, OVA exchange and disk moves, over REST.

Every operation that copies or merges data is a task (202); reading the snapshot tree
and marking templates answer at once. Routes parse, authorise and translate only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from thinvisor.api.auth import require
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.api.tasks import ACCEPTED, accepted
from thinvisor.api.vms import VmOut, service_of, vm_name, vm_out
from thinvisor.auth import Permission, User
from thinvisor.host.clones import CloneRequest
from thinvisor.host.diskops import DiskMove, DiskProvisioning
from thinvisor.host.service import HostService
from thinvisor.host.tasks import Progress
from thinvisor.model.base import StrictModel
from thinvisor.model.vm import DiskSpec, VmName
from thinvisor.storage.datastore import safe_path
from thinvisor.storage.snapshots import Snapshot, SnapshotCreate, SnapshotTree

router = APIRouter(prefix="/vms", tags=["storage"], responses=ERROR_RESPONSES)

Reader = Annotated[User, Depends(require(Permission.READ))]
Configurer = Annotated[User, Depends(require(Permission.CONFIGURE))]


class SnapshotOut(BaseModel):
    id: int
    name: str
    description: str
    created: str
    parent: int | None
    children: list[int]
    memory: bool = Field(description="reverting resumes the VM as it ran")
    power_state: str = Field(description="the VM's power state when it was taken")
    current: bool = Field(description="the VM's current state descends from it")
    disks: dict[str, str] = Field(description="disk name -> the file the snapshot froze")


class SnapshotsOut(BaseModel):
    current: int | None
    snapshots: list[SnapshotOut]


class TemplateMark(StrictModel):
    template: bool = Field(description="true: mark as a template; false: make it a VM again")


class ExportRequest(StrictModel):
    datastore: str
    path: str = Field(description="the .ova to write, relative to the datastore")


class ImportRequest(StrictModel):
    datastore: str = Field(description="where the .ova or .ovf directory lies")
    path: str = Field(description="relative to that datastore")
    name: VmName | None = Field(default=None, description="default: the OVF's name")
    target_datastore: str | None = Field(default=None, description="where the VM goes")
    network: str = Field(default="user", description="the port group for every NIC")


def snapshot_out(tree: SnapshotTree, snap: Snapshot) -> SnapshotOut:
    return SnapshotOut(
        **snap.model_dump(),
        children=[c.id for c in tree.children(snap.id)],
        current=tree.current == snap.id,
    )


def snapshots_out(tree: SnapshotTree) -> SnapshotsOut:
    return SnapshotsOut(
        current=tree.current, snapshots=[snapshot_out(tree, s) for s in tree.snapshots]
    )


def _datastore_path(service: HostService, datastore: str, relpath: str) -> Path:
    """A path a client names inside a datastore (nothing outside it can be named)."""
    return safe_path(service.config.datastore(datastore).path, relpath)


# --- Snapshots ------------------------------------------------------------------------


@router.get("/{vm}/snapshots", response_model=SnapshotsOut)
async def list_snapshots(vm: str, request: Request, user: Reader) -> SnapshotsOut:
    """The VM's snapshot tree: each snapshot with its parent and children."""
    return snapshots_out(await service_of(request).list_snapshots(vm_name(request, vm)))


@router.get("/{vm}/snapshots/{snapshot}", response_model=SnapshotOut)
async def get_snapshot(vm: str, snapshot: str, request: Request, user: Reader) -> SnapshotOut:
    """One snapshot, by id or by its name when unique."""
    name = vm_name(request, vm)
    tree = await service_of(request).list_snapshots(name)
    return snapshot_out(tree, tree.find(name, snapshot))


@router.post("/{vm}/snapshots", status_code=202, response_model=None, responses=ACCEPTED)
async def take_snapshot(
    vm: str, body: SnapshotCreate, request: Request, user: Configurer
) -> JSONResponse:
    """Take a snapshot (with the memory state of a running VM when `memory`): a task."""
    service = service_of(request)
    name = vm_name(request, vm)

    async def work(progress: Progress) -> SnapshotOut:
        snap = await service.take_snapshot(name, body, progress)
        return snapshot_out(await service.list_snapshots(name), snap)

    return accepted(request, "vm.snapshot", f"vm/{name}", user, work)


@router.post(
    "/{vm}/snapshots/{snapshot}/revert", status_code=202, response_model=None, responses=ACCEPTED
)
async def revert_snapshot(
    vm: str, snapshot: str, request: Request, user: Configurer
) -> JSONResponse:
    """Go back to a snapshot (the VM runs again when it has memory): a task."""
    service = service_of(request)
    name = vm_name(request, vm)

    async def work(progress: Progress) -> VmOut:
        await service.revert_snapshot(name, snapshot, progress)
        return vm_out(await service.get_vm(name))

    return accepted(request, "vm.revert_snapshot", f"vm/{name}", user, work)


@router.delete(
    "/{vm}/snapshots/{snapshot}", status_code=202, response_model=None, responses=ACCEPTED
)
async def delete_snapshot(
    vm: str, snapshot: str, request: Request, user: Configurer
) -> JSONResponse:
    """Delete a snapshot, merging its data into what depends on it: a task."""
    service = service_of(request)
    name = vm_name(request, vm)

    async def work(progress: Progress) -> SnapshotOut:
        snap = await service.delete_snapshot(name, snapshot, progress)
        return SnapshotOut(**snap.model_dump(), children=[], current=False)

    return accepted(request, "vm.delete_snapshot", f"vm/{name}", user, work)


# --- Clones and templates -------------------------------------------------------------


def _clone_route(path: str, method: str, doc: str) -> None:
    async def endpoint(
        vm: str, body: CloneRequest, request: Request, user: Configurer
    ) -> JSONResponse:
        service = service_of(request)
        name = vm_name(request, vm)

        async def work(progress: Progress) -> VmOut:
            return vm_out(await getattr(service, method)(name, body, progress))

        return accepted(request, f"vm.{path}", f"vm/{body.name}", user, work)

    endpoint.__doc__ = doc
    router.post(
        f"/{{vm}}/{path}",
        status_code=202,
        response_model=None,
        responses=ACCEPTED,
        name=f"{path}_vm",
    )(endpoint)


_clone_route(
    "clone",
    "clone_vm",
    "A full or linked clone of a stopped VM, a template, or any VM's snapshot (a task).",
)
_clone_route(
    "deploy",
    "deploy",
    "A new VM from a template, customized through a NoCloud seed when asked (a task).",
)


@router.put("/{vm}/template", response_model=VmOut)
async def mark_template(vm: str, body: TemplateMark, request: Request, user: Configurer) -> VmOut:
    """Mark a stopped VM as a template (never powered on), or make it a VM again."""
    return vm_out(await service_of(request).set_template(vm_name(request, vm), body.template))


# --- Disks ----------------------------------------------------------------------------


@router.post("/{vm}/disks/{disk}/move", status_code=202, response_model=None, responses=ACCEPTED)
async def move_disk(
    vm: str, disk: str, body: DiskMove, request: Request, user: Configurer
) -> JSONResponse:
    """Move a disk to another datastore; mirrored live while the VM runs (a task)."""
    service = service_of(request)
    name = vm_name(request, vm)

    async def work(progress: Progress) -> DiskSpec:
        return await service.move_disk(name, disk, body.datastore, progress)

    return accepted(request, "vm.move_disk", f"vm/{name}", user, work)


@router.post(
    "/{vm}/disks/{disk}/provisioning", status_code=202, response_model=None, responses=ACCEPTED
)
async def set_provisioning(
    vm: str, disk: str, body: DiskProvisioning, request: Request, user: Configurer
) -> JSONResponse:
    """Rewrite a stopped VM's disk thick (all blocks allocated) or thin (a task)."""
    service = service_of(request)
    name = vm_name(request, vm)

    async def work(progress: Progress) -> DiskSpec:
        return await service.set_provisioning(name, disk, body.provisioning, progress)

    return accepted(request, "vm.disk_provisioning", f"vm/{name}", user, work)


# --- OVF / OVA ------------------------------------------------------------------------


@router.post("/{vm}/export", status_code=202, response_model=None, responses=ACCEPTED)
async def export_vm(
    vm: str, body: ExportRequest, request: Request, user: Configurer
) -> JSONResponse:
    """Export a stopped VM as an .ova into a datastore (download it from there): a task."""
    service = service_of(request)
    name = vm_name(request, vm)
    dest = _datastore_path(service, body.datastore, body.path)

    async def work(progress: Progress) -> dict[str, str]:
        written = await service.export_ova(name, dest, progress)
        return {"datastore": body.datastore, "path": body.path, "file": str(written)}

    return accepted(request, "vm.export", f"vm/{name}", user, work)


@router.post("/import", status_code=202, response_model=None, responses=ACCEPTED)
async def import_vm(body: ImportRequest, request: Request, user: Configurer) -> JSONResponse:
    """Create a VM from an .ova file or an .ovf directory in a datastore: a task."""
    service = service_of(request)
    source = _datastore_path(service, body.datastore, body.path)

    async def work(progress: Progress) -> VmOut:
        info = await service.import_ovf(
            source,
            name=body.name,
            datastore=body.target_datastore,
            network=body.network,
            progress=progress,
        )
        return vm_out(info)

    return accepted(request, "vm.import", f"vm/{body.name or source.name}", user, work)
