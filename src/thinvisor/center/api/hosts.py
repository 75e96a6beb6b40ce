"""``/hosts``: registering managed hosts of any provider, listing and removing them,
maintenance mode; ``/clusters/{id}/balance``: evening out a cluster's hosts.

Registering connects first: an unreachable address, a certificate that is not the pinned
one (the answer names the fingerprint the host presented) and refused credentials are
400s naming the field to fix, and nothing is written. Adding and removing hosts needs the
admin permission on the parent (or the host); reconnecting one, and putting it in or out
of maintenance mode, needs configure on it; balancing a cluster needs configure on it.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.api.tasks import ACCEPTED, accepted_task
from thinvisor.auth import Permission, User
from thinvisor.center.api.access import (
    Caller,
    NodeRef,
    center_of,
    check,
    in_thread,
    parent_of,
    row_out,
    visible_ids,
)
from thinvisor.center.inventory import HostRow
from thinvisor.center.models import NodeKind
from thinvisor.errors import NotFound
from thinvisor.model.base import StrictModel

# No prefix: this module serves ``/hosts`` and a cluster's ``/clusters/{id}/balance``.
router = APIRouter(tags=["hosts"], responses=ERROR_RESPONSES)


class HostIn(StrictModel):
    parent: NodeRef
    """The datacenter, folder or cluster to put it in: its id, or its path."""
    provider: str = Field(description="thinvisor, libvirt, vsphere or fake")
    address: str = Field(
        description="thinvisor: https://HOST:8443; libvirt: a URI; vsphere: https://VCENTER"
    )
    username: str | None = None
    password: str | None = None
    fingerprint: str | None = Field(
        default=None, description="the SHA-256 fingerprint of the host's TLS certificate"
    )
    name: str | None = Field(default=None, description="default: the name the host gives")


class HostOut(BaseModel):
    id: int
    name: str
    path: str
    parent_id: int | None
    provider: str
    address: str
    username: str | None
    fingerprint: str | None
    state: str
    error: str | None
    last_seen: datetime | None
    vendor: str | None
    version: str | None
    cpus: int | None
    memory_mib: int | None
    maintenance: bool
    core_mhz: int = Field(description="one core's clock, the unit of CPU reservations; 0: unknown")
    cpu_load: float | None = Field(
        description="how busy its CPUs were at the last sync, 0 to 1; null: not known"
    )
    reserved_cpu_mhz: int = Field(description="CPU the host keeps for itself")
    reserved_memory_mib: int = Field(description="memory the host keeps for itself")


def host_out(row: HostRow) -> HostOut:
    return row_out(HostOut, row)


@router.get("/hosts", response_model=list[HostOut])
async def list_hosts(request: Request, user: Caller) -> list[HostOut]:
    """Every host the user may read, by path."""
    agent = center_of(request)

    def read() -> list[HostOut]:
        visible = visible_ids(agent, user)
        return [host_out(h) for h in agent.inventory.hosts() if visible is None or h.id in visible]

    return await in_thread(read)


@router.post("/hosts", status_code=201, response_model=HostOut)
async def add_host(body: HostIn, request: Request, user: Caller) -> HostOut:
    """Connect to a host, register it and follow it from now on."""
    agent = center_of(request)

    def parent_id() -> int:
        return parent_of(agent, user, body.parent, Permission.ADMIN).id

    row = await agent.service.add_host(
        parent_id=await in_thread(parent_id),
        provider=body.provider,
        address=body.address,
        username=body.username,
        password=body.password,
        fingerprint=body.fingerprint,
        name=body.name,
        user=user.name,
    )
    return host_out(row)


@router.get("/hosts/{host_id}", response_model=HostOut)
async def get_host(host_id: int, request: Request, user: Caller) -> HostOut:
    agent = center_of(request)

    def read() -> HostOut:
        check(agent, user, host_id, Permission.READ)
        return host_out(agent.inventory.host(host_id))

    return await in_thread(read)


@router.delete("/hosts/{host_id}", status_code=204, response_class=Response)
async def remove_host(host_id: int, request: Request, user: Caller) -> Response:
    """Stop managing a host: it and its VMs leave the inventory; nothing on it changes."""
    agent = center_of(request)
    await in_thread(_check_host, request, user, host_id, Permission.ADMIN)
    await agent.service.remove_host(host_id, user=user.name)
    return Response(status_code=204)


@router.post("/hosts/{host_id}/reconnect", response_model=HostOut)
async def reconnect_host(host_id: int, request: Request, user: Caller) -> HostOut:
    """Drop the connection to a host and connect again now (a full resync)."""
    agent = center_of(request)
    await in_thread(_check_host, request, user, host_id, Permission.CONFIGURE)
    return host_out(await agent.service.reconnect_host(host_id))


class MaintenanceIn(StrictModel):
    maintenance: bool = Field(description="true: enter maintenance mode; false: leave it")
    wait: bool = Field(
        default=False,
        description="entering: if some running VMs cannot move yet, keep trying until they "
        "can or are stopped (false: refuse at once, naming them)",
    )


@router.post(
    "/hosts/{host_id}/maintenance", status_code=202, response_model=None, responses=ACCEPTED
)
async def set_maintenance(
    host_id: int, body: MaintenanceIn, request: Request, user: Caller
) -> JSONResponse:
    """Enter maintenance mode (the host's running VMs are live-migrated to the other hosts
    of its cluster first; its stopped VMs stay) or leave it. The task's result says what
    moved where; entering may be cancelled until the host is in maintenance mode."""
    agent = center_of(request)
    await in_thread(_check_host, request, user, host_id, Permission.CONFIGURE)
    task = await agent.service.set_maintenance(
        host_id, body.maintenance, wait=body.wait, user=user.name
    )
    return accepted_task(task)


@router.post(
    "/clusters/{cluster_id}/balance",
    status_code=202,
    response_model=None,
    responses=ACCEPTED,
    tags=["clusters"],
)
async def balance_cluster(cluster_id: int, request: Request, user: Caller) -> JSONResponse:
    """One pass of the balancer over a cluster: live migrations that repair broken
    anti-affinity rules, then even out its hosts' memory use. The task's result lists
    the moves."""
    agent = center_of(request)

    def authorize() -> None:
        node = agent.inventory.get(cluster_id)
        check(agent, user, node.id, Permission.CONFIGURE, absent=f"no cluster with id {node.id}")
        if node.kind != NodeKind.CLUSTER:
            raise NotFound(f"no cluster with id {cluster_id}")

    await in_thread(authorize)
    return accepted_task(await agent.service.balance_cluster(cluster_id, user=user.name))


def _check_host(request: Request, user: User, host_id: int, permission: Permission) -> None:
    """The permission on the host (after ``NotFound`` if it is no host, or one the user
    does not see)."""
    agent = center_of(request)
    agent.inventory.host(host_id)
    check(agent, user, host_id, permission, absent=f"no host with id {host_id}")
