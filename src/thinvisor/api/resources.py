"""``/vms/{vm}/resources``, disk I/O limits and the balloon: ESXi's resource controls,
changeable on a running VM. Routes parse, authorise, translate."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from thinvisor.api.auth import require
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.api.vms import VmOut, service_of, vm_name, vm_out
from thinvisor.auth import Permission, User
from thinvisor.errors import InvalidConfig
from thinvisor.model.base import StrictModel
from thinvisor.model.resources import DiskLimits, ResourceSpec, ResourceUpdate

router = APIRouter(prefix="/vms", tags=["resources"], responses=ERROR_RESPONSES)

Reader = Annotated[User, Depends(require(Permission.READ))]
Configurer = Annotated[User, Depends(require(Permission.CONFIGURE))]


class CgroupUse(BaseModel):
    cpu_seconds: float = Field(description="CPU time QEMU used since it started")
    cpu_throttled_seconds: float = Field(description="time the CPU limit held QEMU back")
    cpu_throttled_periods: int
    memory_bytes: int = Field(description="memory QEMU's cgroup holds now")


class ResourcesOut(BaseModel):
    resources: ResourceSpec
    enforced: bool = Field(description="whether the host's cgroups enforce them now")
    unavailable: str | None = Field(description="why the host has no resource controls")
    usage: CgroupUse | None = Field(description="what the running VM's cgroup has used")


class BalloonTarget(StrictModel):
    target_mib: int = Field(gt=0, description="the guest memory to leave the guest, in MiB")


@router.get("/{vm}/resources", response_model=ResourcesOut)
async def get_resources(vm: str, request: Request, user: Reader) -> ResourcesOut:
    service = service_of(request)
    info = await service.get_vm(vm_name(request, vm))
    if info.spec is None:
        raise InvalidConfig(f"vm {info.name!r} is invalid: {info.error}")
    used = await asyncio.to_thread(service.controls.usage, info.spec)
    usage = None
    if used is not None:
        usage = CgroupUse(
            cpu_seconds=used.cpu_ns / 1e9,
            cpu_throttled_seconds=used.throttled_ns / 1e9,
            cpu_throttled_periods=used.throttled_count,
            memory_bytes=used.memory_bytes,
        )
    return ResourcesOut(
        resources=info.spec.resources,
        enforced=usage is not None,
        unavailable=service.controls.unavailable,
        usage=usage,
    )


@router.patch("/{vm}/resources", response_model=VmOut)
async def set_resources(vm: str, body: ResourceUpdate, request: Request, user: Configurer) -> VmOut:
    """Change shares, reservations and limits; only the fields given change, at once on a
    running VM. A limit of 0 removes it."""
    return vm_out(await service_of(request).set_resources(vm_name(request, vm), body))


@router.put("/{vm}/disks/{disk}/limits", response_model=VmOut)
async def set_disk_limits(
    vm: str, disk: str, body: DiskLimits, request: Request, user: Configurer
) -> VmOut:
    """Set a disk's I/O limits (no fields: unlimited), at once on a running VM."""
    return vm_out(await service_of(request).set_limits(vm_name(request, vm), disks={disk: body}))


@router.put("/{vm}/balloon", response_model=VmOut)
async def set_balloon(vm: str, body: BalloonTarget, request: Request, user: Configurer) -> VmOut:
    """Inflate or deflate a running VM's balloon to leave the guest ``target_mib``."""
    name = vm_name(request, vm)
    return vm_out(await service_of(request).set_limits(name, balloon_mib=body.target_mib))
