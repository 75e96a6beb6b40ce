"""``/vms``: every VM action of the host, over REST. Routes parse, authorise, translate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from thinvisor.api.auth import agent_of, require
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.api.tasks import ACCEPTED, accepted
from thinvisor.auth import Permission, User
from thinvisor.host.service import HostService, VmInfo
from thinvisor.host.tasks import Progress
from thinvisor.model.base import StrictModel
from thinvisor.model.create import NewDiskSpec, VmCreate
from thinvisor.model.vm import CdromSpec, DiskSpec, VmSpec, VmUpdate

router = APIRouter(prefix="/vms", tags=["vms"], responses=ERROR_RESPONSES)

Reader = Annotated[User, Depends(require(Permission.READ))]
Powerer = Annotated[User, Depends(require(Permission.POWER))]
Configurer = Annotated[User, Depends(require(Permission.CONFIGURE))]


class VmOut(BaseModel):
    name: str
    uuid: str | None
    datastore: str
    state: str = Field(description="stopped, running, paused, suspended, or invalid")
    error: str | None = Field(description="why an invalid VM's vm.toml cannot be read")
    pid: int | None
    qemu_status: str | None
    stop_reason: str | None
    vm_dir: str
    spec: VmSpec | None


class DiskResize(StrictModel):
    size: int = Field(gt=0, description="the new size in bytes (disks only grow)")


class CdromInsert(StrictModel):
    path: str = Field(description="an ISO image inside a datastore")


def vm_out(info: VmInfo) -> VmOut:
    return VmOut(
        name=info.name,
        uuid=info.spec.uuid if info.spec else None,
        datastore=info.datastore,
        state=info.state,
        error=info.error,
        pid=info.pid,
        qemu_status=info.qemu_status,
        stop_reason=info.stop_reason,
        vm_dir=str(info.paths.vm_dir),
        spec=info.spec,
    )


def service_of(request: Request) -> HostService:
    return agent_of(request).service


def vm_name(request: Request, vm: str) -> str:
    """The name of the VM a path gives by name or UUID."""
    return service_of(request).resolve(vm)


@router.get("", response_model=list[VmOut])
async def list_vms(request: Request, user: Reader) -> list[VmOut]:
    return [vm_out(v) for v in await service_of(request).list_vms()]


@router.post("", status_code=202, response_model=None, responses=ACCEPTED)
async def create_vm(body: VmCreate, request: Request, user: Configurer) -> JSONResponse:
    """Create a VM (copying any source images): a task whose result is the VM."""
    service = service_of(request)

    async def work(progress: Progress) -> VmOut:
        progress.update(0, "creating disks and configuration")
        return vm_out(await service.create_from(body))

    return accepted(request, "vm.create", f"vm/{body.name}", user, work)


@router.get("/{vm}", response_model=VmOut)
async def get_vm(vm: str, request: Request, user: Reader) -> VmOut:
    return vm_out(await service_of(request).get_vm(vm_name(request, vm)))


@router.patch("/{vm}", response_model=VmOut)
async def update_vm(vm: str, body: VmUpdate, request: Request, user: Configurer) -> VmOut:
    """Change a stopped VM's settings; only the fields given change."""
    return vm_out(await service_of(request).update_vm(vm_name(request, vm), body))


@router.delete("/{vm}", status_code=204, response_class=Response)
async def delete_vm(vm: str, request: Request, user: Configurer) -> Response:
    await service_of(request).delete_vm(vm_name(request, vm))
    return Response(status_code=204)


def _power(action: str, doc: str) -> None:
    async def endpoint(vm: str, request: Request, user: Powerer) -> VmOut:
        service = service_of(request)
        return vm_out(await getattr(service, action)(vm_name(request, vm)))

    endpoint.__doc__ = doc
    router.post(f"/{{vm}}/{action}", response_model=VmOut, name=f"{action}_vm")(endpoint)


_power("start", "Power on (a suspended VM resumes from its saved state).")
_power("stop", "Power off at once.")
_power("reset", "Press the reset button.")
_power("pause", "Pause the vCPUs.")


def _power_task(action: str, doc: str) -> None:
    async def endpoint(
        vm: str,
        request: Request,
        user: Powerer,
        timeout: Annotated[float | None, Query(gt=0, le=3600)] = None,
    ) -> JSONResponse:
        service = service_of(request)
        name = vm_name(request, vm)

        async def work(progress: Progress) -> VmOut:
            kwargs: dict[str, Any] = {"timeout": timeout} if action == "shutdown" else {}
            return vm_out(await getattr(service, action)(name, **kwargs))

        return accepted(request, f"vm.{action}", f"vm/{name}", user, work)

    endpoint.__doc__ = doc
    router.post(
        f"/{{vm}}/{action}",
        status_code=202,
        response_model=None,
        responses=ACCEPTED,
        name=f"{action}_vm",
    )(endpoint)


_power_task("shutdown", "ACPI shutdown; a hard power off after `timeout` seconds (a task).")
_power_task("suspend", "Save memory and device state to disk and stop (a task).")
_power_task("resume", "Continue a paused VM, or restore a suspended one (a task).")


@router.get("/{vm}/disks", response_model=list[DiskSpec])
async def list_disks(vm: str, request: Request, user: Reader) -> list[DiskSpec]:
    _, spec = service_of(request).inventory.get_valid(vm_name(request, vm))
    return spec.disks


@router.post("/{vm}/disks", status_code=202, response_model=None, responses=ACCEPTED)
async def add_disk(vm: str, body: NewDiskSpec, request: Request, user: Configurer) -> JSONResponse:
    """Add a new or imported disk; hot-plugged while the VM runs (a task: imports take time)."""
    service = service_of(request)
    name = vm_name(request, vm)

    async def work(progress: Progress) -> DiskSpec:
        return await service.add_disk(name, body)

    return accepted(request, "vm.add_disk", f"vm/{name}", user, work)


@router.delete("/{vm}/disks/{disk}", status_code=204, response_class=Response)
async def remove_disk(
    vm: str, disk: str, request: Request, user: Configurer, keep_file: bool = False
) -> Response:
    await service_of(request).remove_disk(vm_name(request, vm), disk, keep_file=keep_file)
    return Response(status_code=204)


@router.post("/{vm}/disks/{disk}/resize", status_code=202, response_model=None, responses=ACCEPTED)
async def resize_disk(
    vm: str, disk: str, body: DiskResize, request: Request, user: Configurer
) -> JSONResponse:
    """Grow a disk, online while the VM runs (a task, as every disk operation)."""
    service = service_of(request)
    name = vm_name(request, vm)

    async def work(progress: Progress) -> DiskSpec:
        return await service.resize_disk(name, disk, body.size)

    return accepted(request, "vm.resize_disk", f"vm/{name}", user, work)


@router.put("/{vm}/cdrom", response_model=CdromSpec)
async def insert_cdrom(vm: str, body: CdromInsert, request: Request, user: Configurer) -> CdromSpec:
    return await service_of(request).insert_cdrom(vm_name(request, vm), Path(body.path))


@router.delete("/{vm}/cdrom", response_model=CdromSpec)
async def eject_cdrom(vm: str, request: Request, user: Configurer) -> CdromSpec:
    return await service_of(request).eject_cdrom(vm_name(request, vm))
