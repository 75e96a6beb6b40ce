"""``/networks``: virtual switches and port groups; ``/vms/{vm}/nics``: a VM's NICs.
Routes parse, authorise, translate."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from thinvisor.api.auth import agent_of, require
from thinvisor.api.errors import ERROR_RESPONSES
from thinvisor.auth import Permission, User
from thinvisor.host.networking import NetworkService
from thinvisor.host.service import HostService
from thinvisor.model.base import StrictModel
from thinvisor.model.create import NewNicSpec, NicUpdate
from thinvisor.model.vm import NicSpec
from thinvisor.network.model import (
    VLAN_TRUNK,
    VLAN_UNTAGGED,
    NatSpec,
    PortGroupSpec,
    SwitchName,
    SwitchSpec,
)

router = APIRouter(tags=["networks"], responses=ERROR_RESPONSES)

Reader = Annotated[User, Depends(require(Permission.READ))]
Configurer = Annotated[User, Depends(require(Permission.CONFIGURE))]

_VLAN_DOC = "0 untagged, 1-4094 one tagged VLAN, 4095 trunk (every VLAN, tagged)"


class PortOut(BaseModel):
    """A VM NIC on a port group."""

    vm: str
    nic: str
    mac: str
    tap: str | None = Field(description="the NIC's TAP device while the VM runs")


class SwitchPortGroupOut(BaseModel):
    name: str
    vlan: int = Field(description=_VLAN_DOC)
    ports: list[PortOut]


class PortGroupOut(SwitchPortGroupOut):
    switch: str


class LeaseOut(BaseModel):
    mac: str
    ip: str
    hostname: str | None
    expiry: int = Field(description="Unix time; 0 for a lease that never expires")


class DhcpOut(BaseModel):
    pid: int | None = Field(description="dnsmasq's process id; null when it is not running")
    range: list[str] = Field(description="the first and the last address of the pool")
    leases: list[LeaseOut]


class SwitchOut(BaseModel):
    name: str
    bridge: str
    mtu: int
    uplink: str | None
    vlan_filtering: bool
    nat: NatSpec | None
    port_groups: list[SwitchPortGroupOut]
    present: bool = Field(description="whether the bridge exists in the kernel")
    vlan_enforcement: Literal["bridge", "nftables", "none"] = Field(
        description="who keeps the VLANs apart: the bridge itself, nftables rules, or nobody"
    )
    dhcp: DhcpOut | None = Field(description="a NAT switch's DHCP server, if it has one")


class PortGroupCreate(PortGroupSpec):
    """A new port group on the switch ``switch``."""

    switch: SwitchName


class PortGroupUpdate(StrictModel):
    vlan: int = Field(ge=VLAN_UNTAGGED, le=VLAN_TRUNK, description=_VLAN_DOC)


class NicOut(NicSpec):
    """A VM NIC: its settings, its TAP while the VM runs, the address DHCP gave it."""

    tap: str | None = Field(description="the TAP device while the VM runs")
    ip: str | None = Field(description="the address a NAT switch's DHCP leased to the MAC")


def _service(request: Request) -> HostService:
    return agent_of(request).service


def _network(request: Request) -> NetworkService:
    return _service(request).network


async def _group(request: Request, name: str) -> PortGroupOut:
    """The port group a path names; ``NotFound`` when there is none."""
    return PortGroupOut.model_validate(await _network(request).get_port_group(name))


# Switches


@router.get("/networks/switches", response_model=list[SwitchOut])
async def list_switches(request: Request, user: Reader) -> list[SwitchOut]:
    return [SwitchOut.model_validate(s) for s in await _network(request).list_switches()]


@router.post("/networks/switches", status_code=201, response_model=SwitchOut)
async def create_switch(body: SwitchSpec, request: Request, user: Configurer) -> SwitchOut:
    """Create a switch: its bridge, its uplink or NAT and DHCP, and its port groups."""
    return SwitchOut.model_validate(await _network(request).create_switch(body))


@router.get("/networks/switches/{name}", response_model=SwitchOut)
async def get_switch(name: str, request: Request, user: Reader) -> SwitchOut:
    return SwitchOut.model_validate(await _network(request).get_switch(name))


@router.delete("/networks/switches/{name}", status_code=204, response_class=Response)
async def delete_switch(name: str, request: Request, user: Configurer) -> Response:
    """Delete a switch and its port groups (refused while a VM's NIC is on one)."""
    await _network(request).delete_switch(name)
    return Response(status_code=204)


# Port groups


@router.get("/networks/portgroups", response_model=list[PortGroupOut])
async def list_port_groups(request: Request, user: Reader) -> list[PortGroupOut]:
    return [PortGroupOut.model_validate(g) for g in await _network(request).list_port_groups()]


@router.post("/networks/portgroups", status_code=201, response_model=PortGroupOut)
async def create_port_group(
    body: PortGroupCreate, request: Request, user: Configurer
) -> PortGroupOut:
    """Add a port group to a switch; port group names are unique on the host."""
    group = PortGroupSpec.model_validate(body.model_dump(exclude={"switch"}))
    return PortGroupOut.model_validate(
        await _network(request).create_port_group(body.switch, group)
    )


@router.get("/networks/portgroups/{name}", response_model=PortGroupOut)
async def get_port_group(name: str, request: Request, user: Reader) -> PortGroupOut:
    return await _group(request, name)


@router.patch("/networks/portgroups/{name}", response_model=PortGroupOut)
async def update_port_group(
    name: str, body: PortGroupUpdate, request: Request, user: Configurer
) -> PortGroupOut:
    """Change a port group's VLAN; the running NICs on it move at once."""
    await _group(request, name)
    return PortGroupOut.model_validate(await _network(request).update_port_group(name, body.vlan))


@router.delete("/networks/portgroups/{name}", status_code=204, response_class=Response)
async def delete_port_group(name: str, request: Request, user: Configurer) -> Response:
    """Delete a port group (refused while a VM's NIC is on it)."""
    await _group(request, name)
    await _network(request).delete_port_group(name)
    return Response(status_code=204)


# A VM's NICs


def _vm(request: Request, vm: str) -> str:
    return _service(request).resolve(vm)


@router.get("/vms/{vm}/nics", response_model=list[NicOut])
async def list_nics(vm: str, request: Request, user: Reader) -> list[NicOut]:
    nics: list[dict[str, Any]] = await _service(request).list_nics(_vm(request, vm))
    return [NicOut.model_validate(n) for n in nics]


@router.post("/vms/{vm}/nics", status_code=201, response_model=NicSpec)
async def add_nic(vm: str, body: NewNicSpec, request: Request, user: Configurer) -> NicSpec:
    """Add a NIC (a new MAC unless given); hot-plugged while the VM runs."""
    return await _service(request).add_nic(_vm(request, vm), body)


@router.patch("/vms/{vm}/nics/{nic}", response_model=NicSpec)
async def update_nic(
    vm: str, nic: str, body: NicUpdate, request: Request, user: Configurer
) -> NicSpec:
    """Plug or unplug the virtual cable, move to another port group, change the shaping
    (``null`` removes it); at once on a running VM. Only the fields given change."""
    return await _service(request).update_nic(_vm(request, vm), nic, body)


@router.delete("/vms/{vm}/nics/{nic}", status_code=204, response_class=Response)
async def remove_nic(vm: str, nic: str, request: Request, user: Configurer) -> Response:
    """Remove a NIC; on a running VM the guest is asked to release it first."""
    await _service(request).remove_nic(_vm(request, vm), nic)
    return Response(status_code=204)
