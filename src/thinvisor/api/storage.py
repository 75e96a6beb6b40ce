"""``/vms/{vm}/storage``: a VM's space, per disk and in total. Routes parse, authorise,
translate."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from thinvisor.api.auth import agent_of, require
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission, User
from thinvisor.host.storage_usage import VmStorage, vm_storage

router = APIRouter(tags=["storage"], responses=ERROR_RESPONSES)

Reader = Annotated[User, Depends(require(Permission.READ))]


@router.get("/vms/{vm}/storage", response_model=VmStorage)
async def get_vm_storage(vm: str, request: Request, user: Reader) -> VmStorage:
    """Each disk's active file, datastore, format, virtual size, allocated bytes,
    thin or thick provisioning and backing chain; the VM's provisioned and used bytes."""
    service = agent_of(request).service
    return await vm_storage(service, service.resolve(vm))
