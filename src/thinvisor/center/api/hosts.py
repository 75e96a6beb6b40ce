"""``/hosts``: registering managed hosts of any provider, listing and removing them.

Registering connects first: an unreachable address, a certificate that is not the pinned
one (the answer names the fingerprint the host presented) and refused credentials are
400s naming the field to fix, and nothing is written. Adding and removing hosts needs the
admin permission on the parent (or the host); reconnecting one needs configure on it.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from thinvisor.api.errors import ERROR_RESPONSES
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
from thinvisor.model.base import StrictModel

router = APIRouter(prefix="/hosts", tags=["hosts"], responses=ERROR_RESPONSES)


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


def host_out(row: HostRow) -> HostOut:
    return row_out(HostOut, row)


@router.get("", response_model=list[HostOut])
async def list_hosts(request: Request, user: Caller) -> list[HostOut]:
    """Every host the user may read, by path."""
    agent = center_of(request)

    def read() -> list[HostOut]:
        visible = visible_ids(agent, user)
        return [host_out(h) for h in agent.inventory.hosts() if visible is None or h.id in visible]

    return await in_thread(read)


@router.post("", status_code=201, response_model=HostOut)
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


@router.get("/{host_id}", response_model=HostOut)
async def get_host(host_id: int, request: Request, user: Caller) -> HostOut:
    agent = center_of(request)

    def read() -> HostOut:
        check(agent, user, host_id, Permission.READ)
        return host_out(agent.inventory.host(host_id))

    return await in_thread(read)


@router.delete("/{host_id}", status_code=204, response_class=Response)
async def remove_host(host_id: int, request: Request, user: Caller) -> Response:
    """Stop managing a host: it and its VMs leave the inventory; nothing on it changes."""
    agent = center_of(request)
    await in_thread(_check_host, request, user, host_id, Permission.ADMIN)
    await agent.service.remove_host(host_id, user=user.name)
    return Response(status_code=204)


@router.post("/{host_id}/reconnect", response_model=HostOut)
async def reconnect_host(host_id: int, request: Request, user: Caller) -> HostOut:
    """Drop the connection to a host and connect again now (a full resync)."""
    agent = center_of(request)
    await in_thread(_check_host, request, user, host_id, Permission.CONFIGURE)
    return host_out(await agent.service.reconnect_host(host_id))


def _check_host(request: Request, user: User, host_id: int, permission: Permission) -> None:
    """The permission on the host (after ``NotFound`` if it is no host, or one the user
    does not see)."""
    agent = center_of(request)
    agent.inventory.host(host_id)
    check(agent, user, host_id, permission, absent=f"no host with id {host_id}")
