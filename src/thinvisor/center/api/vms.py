"""``/vms``: every VM of every host, found, powered, created, cloned, changed, deleted and
snapshotted through the center.

Operations answer 202 with a task (``/tasks/{id}``) once they are checked: the VM exists,
the user may do it there, its host is connected (else 409 ``disconnected``) and its
provider can (else 409 ``unsupported``). Power actions need the power permission on the
VM; creating, cloning, changing, deleting and snapshots need configure; a migration
needs configure on the VM and on the host it goes to.

Placement has its say (409 ``insufficient_resources``, naming why): a VM created in a
cluster goes to the host it chooses; a stopped VM powered on where its host cannot take
it is moved first; a migration onto a host that breaks a rule of the VM's or lacks room
is refused unless ``force``; nothing goes to a host in maintenance mode.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.api.tasks import ACCEPTED, accepted_task
from thinvisor.auth import Permission, User
from thinvisor.center.agent import CenterAgent
from thinvisor.center.api.access import (
    Caller,
    NodeRef,
    center_of,
    check,
    in_thread,
    node_of,
    row_out,
    visible_ids,
)
from thinvisor.center.inventory import Node, VmRow
from thinvisor.center.models import NodeKind
from thinvisor.errors import InvalidArgument
from thinvisor.model.base import StrictModel
from thinvisor.providers.base import (
    CreateVm,
    MemoryCopyChoice,
    MigrationOptions,
    PowerAction,
    PowerState,
    Reconfigure,
)

router = APIRouter(prefix="/vms", tags=["vms"], responses=ERROR_RESPONSES)


class VmOut(BaseModel):
    id: int
    name: str
    path: str
    host_id: int
    host: str
    ext_id: str
    """The host's own id for the VM."""
    power_state: str
    last_power_state: str | None
    """The power state when last known (while the host is disconnected: ``unknown`` above)."""
    cpus: int
    memory_mib: int
    template: bool
    uuid: str | None
    datastores: list[str]
    networks: list[str]
    reserved_cpu_mhz: int = Field(description="CPU it reserves of its host while it runs")
    reserved_memory_mib: int = Field(description="memory it reserves of its host while it runs")


class VmCreateIn(StrictModel):
    host: NodeRef
    """The host to create it on, or a cluster (placement chooses a host in it): its id,
    or its path."""
    name: str
    template: NodeRef | None = None
    """A template on the same host to create it from: its id, or its path."""
    cpus: int | None = Field(default=None, ge=1, description="default: 1, or the template's")
    memory_mib: int | None = Field(
        default=None, ge=1, description="default: 256, or the template's"
    )
    disk_mib: int | None = Field(default=None, ge=1)
    network: str | None = None
    """A network of the host for one NIC."""


class CloneIn(StrictModel):
    name: str


class VmChange(StrictModel):
    cpus: int | None = Field(default=None, ge=1)
    memory_mib: int | None = Field(default=None, ge=1)


class MigrateIn(StrictModel):
    host: NodeRef
    """The host to move it to: its id, or its path."""
    datastore: str | None = None
    """The destination's datastore for its disks where they must be copied (the
    destination does not see them where they are); default: its default one."""
    downtime_ms: int = Field(
        default=300, ge=10, le=10_000, description="the longest pause of the VM when it switches"
    )
    auto_converge: bool = True
    """Slow the VM's CPUs down where its memory changes faster than it is copied."""
    bandwidth_mib_s: int | None = Field(
        default=None, ge=1, le=100_000, description="the most the copy may use; default: no limit"
    )
    memory_copy: MemoryCopyChoice = Field(
        default="auto",
        description="live: memory copied as the VM runs; paused: the VM paused for the whole "
        "copy; auto: live where the host copies it safely (thinvisor: KVM, or QEMU 9.0 and "
        "later)",
    )
    force: bool = Field(
        default=False,
        description="move it even where placement refuses it: a rule of the VM's broken "
        "there, or too little room (the host still admits it or not)",
    )


class SnapshotIn(StrictModel):
    name: str


class SnapshotOut(BaseModel):
    id: str
    name: str
    parent: str | None
    current: bool
    memory: bool
    created: str | None


def vm_out(vm: VmRow) -> VmOut:
    return row_out(VmOut, vm, host=vm.host_name)


@router.get("", response_model=list[VmOut])
async def list_vms(
    request: Request,
    user: Caller,
    host: Annotated[str | None, Query(description="only this host's: its id or path")] = None,
    name: Annotated[str | None, Query(description="a name, or a pattern with * and ?")] = None,
    template: Annotated[bool | None, Query(description="only templates, or only VMs")] = None,
    power_state: PowerState | None = None,
) -> list[VmOut]:
    """The VMs (and templates) of every host that the user may read, by path."""
    agent = center_of(request)

    def read() -> list[VmOut]:
        host_id = None if host is None else _host_node(agent, user, _query_ref(host)).id
        if name is not None:
            found = agent.inventory.find_vms(name)
            found = [v for v in found if host_id in (None, v.host_id)]
            found = [v for v in found if template in (None, v.template)]
        else:
            found = agent.inventory.vms(host_id, template)
        visible = visible_ids(agent, user)
        return [
            vm_out(v)
            for v in found
            if (visible is None or v.id in visible) and power_state in (None, v.power_state)
        ]

    return await in_thread(read)


def _query_ref(text: str) -> NodeRef:
    """An object named in a query string: digits are an id, else a path."""
    return int(text) if text.isdecimal() else text


def _host_node(agent: CenterAgent, user: User, ref: NodeRef, *, cluster: bool = False) -> Node:
    """The host a request names (or, with ``cluster``, the cluster)."""
    node = node_of(agent, user, ref, "host")
    if node.kind == NodeKind.CLUSTER and cluster:
        return node
    if node.kind != NodeKind.HOST:
        wanted = "a host or a cluster" if cluster else "a host"
        raise InvalidArgument("host", f"{node.kind} {node.path} is not {wanted}")
    return node


@router.get("/{vm_id}", response_model=VmOut)
async def get_vm(vm_id: int, request: Request, user: Caller) -> VmOut:
    return vm_out(await _vm(request, user, vm_id, Permission.READ))


async def _vm(request: Request, user: User, vm_id: int, permission: Permission) -> VmRow:
    """The VM (``NotFound`` first, and for a VM the user does not see), if the user has
    ``permission`` on it."""
    agent = center_of(request)

    def read() -> VmRow:
        vm = agent.inventory.vm(vm_id)
        check(agent, user, vm_id, permission, absent=f"no vm with id {vm_id}")
        return vm

    return await in_thread(read)


@router.post("/{vm_id}/power/{action}", status_code=202, response_model=None, responses=ACCEPTED)
async def power(vm_id: int, action: PowerAction, request: Request, user: Caller) -> JSONResponse:
    """start, stop (power off), shutdown (ask the guest), reset, pause, resume, suspend."""
    await _vm(request, user, vm_id, Permission.POWER)
    task = await center_of(request).service.power(vm_id, action, user=user.name)
    return accepted_task(task)


@router.post("", status_code=202, response_model=None, responses=ACCEPTED)
async def create_vm(body: VmCreateIn, request: Request, user: Caller) -> JSONResponse:
    """A new VM on a host, or on the host placement chooses in a cluster: from scratch,
    or from a template on that host (in a cluster: on the template's host)."""
    agent = center_of(request)

    def prepare() -> tuple[Node, CreateVm, int | None]:
        where = _host_node(agent, user, body.host, cluster=True)
        check(agent, user, where.id, Permission.CONFIGURE)
        template = None if body.template is None else _template(agent, user, body.template)
        spec = CreateVm(
            name=body.name,
            cpus=body.cpus or (template.cpus if template else 1),
            memory_mib=body.memory_mib or (template.memory_mib if template else 256),
            disk_mib=body.disk_mib,
            network=body.network,
        )
        return where, spec, None if template is None else template.id

    where, spec, template_id = await in_thread(prepare)
    service = agent.service
    if where.kind == NodeKind.CLUSTER:
        task = await service.create_vm_in_cluster(
            where.id, spec, template_id=template_id, user=user.name
        )
    else:
        task = await service.create_vm(where.id, spec, template_id=template_id, user=user.name)
    return accepted_task(task)


def _template(agent: CenterAgent, user: User, ref: NodeRef) -> VmRow:
    node = node_of(agent, user, ref, "template")
    if node.kind != NodeKind.VM:
        raise InvalidArgument("template", f"{node.kind} {node.path} is not a template")
    check(agent, user, node.id, Permission.READ)
    return agent.inventory.vm(node.id)


@router.post("/{vm_id}/clone", status_code=202, response_model=None, responses=ACCEPTED)
async def clone_vm(vm_id: int, body: CloneIn, request: Request, user: Caller) -> JSONResponse:
    """A copy of a stopped VM or a template, on its host."""
    vm = await _vm(request, user, vm_id, Permission.CONFIGURE)
    agent = center_of(request)
    await in_thread(check, agent, user, vm.host_id, Permission.CONFIGURE)
    return accepted_task(await agent.service.clone_vm(vm_id, body.name, user=user.name))


@router.patch("/{vm_id}", status_code=202, response_model=None, responses=ACCEPTED)
async def reconfigure_vm(
    vm_id: int, body: VmChange, request: Request, user: Caller
) -> JSONResponse:
    """Change the CPUs and memory of a stopped VM."""
    if body.cpus is None and body.memory_mib is None:
        raise InvalidArgument("body", "give cpus, memory_mib or both")
    await _vm(request, user, vm_id, Permission.CONFIGURE)
    change = Reconfigure(cpus=body.cpus, memory_mib=body.memory_mib)
    task = await center_of(request).service.reconfigure_vm(vm_id, change, user=user.name)
    return accepted_task(task)


@router.delete("/{vm_id}", status_code=202, response_model=None, responses=ACCEPTED)
async def delete_vm(vm_id: int, request: Request, user: Caller) -> JSONResponse:
    """Delete a stopped VM and its disks on its host."""
    await _vm(request, user, vm_id, Permission.CONFIGURE)
    return accepted_task(await center_of(request).service.delete_vm(vm_id, user=user.name))


@router.post("/{vm_id}/migrate", status_code=202, response_model=None, responses=ACCEPTED)
async def migrate_vm(vm_id: int, body: MigrateIn, request: Request, user: Caller) -> JSONResponse:
    """Migrate a VM to another host of the same provider kind: live if it runs, cold (its
    files moved) if it is stopped. The task may be cancelled (``POST /tasks/{id}/cancel``)
    until the VM switches over; the VM then stays where it was."""
    await _vm(request, user, vm_id, Permission.CONFIGURE)
    agent = center_of(request)

    def destination() -> Node:
        host = _host_node(agent, user, body.host)
        check(agent, user, host.id, Permission.CONFIGURE)
        return host

    host = await in_thread(destination)
    options = MigrationOptions(
        downtime_ms=body.downtime_ms,
        auto_converge=body.auto_converge,
        bandwidth_mib_s=body.bandwidth_mib_s,
        memory_copy=body.memory_copy,
        datastore=body.datastore,
    )
    task = await agent.service.migrate_vm(vm_id, host.id, options, force=body.force, user=user.name)
    return accepted_task(task)


@router.get("/{vm_id}/snapshots", response_model=list[SnapshotOut])
async def list_snapshots(vm_id: int, request: Request, user: Caller) -> list[SnapshotOut]:
    """The VM's snapshots, as its host has them now."""
    await _vm(request, user, vm_id, Permission.READ)
    found = await center_of(request).service.snapshots(vm_id)
    return [SnapshotOut.model_validate(s.__dict__) for s in found]


@router.post("/{vm_id}/snapshots", status_code=202, response_model=None, responses=ACCEPTED)
async def create_snapshot(
    vm_id: int, body: SnapshotIn, request: Request, user: Caller
) -> JSONResponse:
    await _vm(request, user, vm_id, Permission.CONFIGURE)
    task = await center_of(request).service.create_snapshot(vm_id, body.name, user=user.name)
    return accepted_task(task)


@router.post(
    "/{vm_id}/snapshots/{snapshot_id}/revert",
    status_code=202,
    response_model=None,
    responses=ACCEPTED,
)
async def revert_snapshot(
    vm_id: int, snapshot_id: str, request: Request, user: Caller
) -> JSONResponse:
    await _vm(request, user, vm_id, Permission.CONFIGURE)
    service = center_of(request).service
    return accepted_task(await service.revert_snapshot(vm_id, snapshot_id, user=user.name))


@router.delete(
    "/{vm_id}/snapshots/{snapshot_id}", status_code=202, response_model=None, responses=ACCEPTED
)
async def delete_snapshot(
    vm_id: int, snapshot_id: str, request: Request, user: Caller
) -> JSONResponse:
    await _vm(request, user, vm_id, Permission.CONFIGURE)
    service = center_of(request).service
    return accepted_task(await service.delete_snapshot(vm_id, snapshot_id, user=user.name))
