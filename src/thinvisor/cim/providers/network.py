"""Virtual Ethernet Switch (DSP1097) and Ethernet Port Resource Virtualization (DSP1050).

The host's switches (Linux bridges), their ports and the VMs' NICs, read from the same
service calls as the REST API (``NetworkService.list_switches``, the VMs' specs).

Conventions:

- A switch is a ``TV_ComputerSystem`` (DSP1097 models a virtual switch as a computer
  system; CIM 2.49 has no class of its own for one) named ``thinvisor:switch:<name>``,
  its name in ElementName, Dedicated Switch (5) and Ethernet Switch (38), its bridge in
  OtherIdentifyingInfo. Its power is not managed: RequestStateChange answers 1.
  It is hosted by the host (``TV_HostedDependency``) and defined by a
  ``TV_VirtualEthernetSwitchSettingData`` (InstanceID ``thinvisor:switch:<name>``,
  ``TV_SettingsDefineState`` and ``TV_ElementSettingData``) whose VLANConnection lists
  the VLAN ids of its access port groups (a trunk port group carries every VLAN).
  EnabledState is 2 while the bridge exists in the kernel, else 3 with an Error status.
- A switch's ports (``TV_SystemDevice``) are ``TV_EthernetPort`` instances keyed by
  the interface on the bridge: the TAP of each NIC of a running VM, and the uplink.
  A TAP's PVID is its port group's VLAN (1-4094; NULL when untagged or trunk);
  its EnabledState is 3 while the NIC's virtual cable is unplugged.
- Each NIC of a VM is a ``TV_EthernetPort`` of the VM's ``TV_ComputerSystem``
  (``TV_SystemDevice``): DeviceID the NIC's name, PermanentAddress its MAC as twelve
  hex digits, EnabledState 2 while the VM runs (or is paused) with the cable plugged
  in, else 3. Its state is described by its RASD (``TV_SettingsDefineState`` to the
  ``TV_EthernetPortAllocationSettingData`` that ``virtualization`` provides), it is
  allocated from the network pool (``TV_ElementAllocatedFromPool``), and while the VM
  runs it is connected to its switch port (``TV_DeviceConnection``).
- DSP1097's central instances are the switches, DSP1050's the network resource pool;
  System Virtualization references both.

Instances of classes that ``virtualization`` and ``hardware`` already provide (the
switches among ``TV_ComputerSystem``, and ``TV_HostedDependency``, ``TV_SystemDevice``,
``TV_SettingsDefineState``, ``TV_ElementSettingData``) come from ``extensions``: the
registry joins them to their owners' providers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pywbem import CIMInstance, CIMInstanceName

from thinvisor.cim.provider import CIMV2, CimContext, InstanceProvider
from thinvisor.cim.providers.base import (
    FunctionProvider,
    host_path,
    make_association,
    make_instance,
    pool_path,
    vm_path,
)
from thinvisor.cim.providers.interop import SYSTEM_VIRTUALIZATION, Profile, ProfileSupport
from thinvisor.cim.providers.virtualization import service_of, valid_vms
from thinvisor.host.service import VmInfo
from thinvisor.host.state import PowerState
from thinvisor.model.vm import NicSpec, VmSpec

SWITCH_CLASS = "TV_ComputerSystem"
SWITCH_SETTINGS_CLASS = "TV_VirtualEthernetSwitchSettingData"
PORT_CLASS = "TV_EthernetPort"
NIC_RASD_CLASS = "TV_EthernetPortAllocationSettingData"

VIRTUAL_ETHERNET_SWITCH = Profile("DSP1097", "Virtual Ethernet Switch", "1.0.0")
ETHERNET_PORT_RESOURCE_VIRTUALIZATION = Profile(
    "DSP1050", "Ethernet Port Resource Virtualization", "1.0.0"
)

_SWITCH, _ETHERNET_SWITCH = 5, 38  # CIM_ComputerSystem.Dedicated
_ETHERNET = 2  # CIM_NetworkPort.LinkTechnology
_VEB = 2  # CIM_VirtualEthernetSwitchSettingData.EVBMode: a bridge that reflects nothing
_ENABLED, _DISABLED, _NOT_APPLICABLE = 2, 3, 12
_OK, _ERROR, _STOPPED = 2, 6, 10  # OperationalStatus
_HEALTH_OK, _HEALTH_MAJOR = 5, 20
_VLAN_MIN, _VLAN_MAX = 1, 4094  # access VLANs; 0 is untagged, 4095 trunk
_LIVE_STATES = (PowerState.RUNNING, PowerState.PAUSED)  # QEMU holds the NICs' TAPs


# Paths


def switch_name(switch: str) -> str:
    """The ``Name`` of a switch's ``TV_ComputerSystem``."""
    return f"thinvisor:switch:{switch}"


def switch_path(switch: str, namespace: str = CIMV2) -> CIMInstanceName:
    keys = {"CreationClassName": SWITCH_CLASS, "Name": switch_name(switch)}
    return CIMInstanceName(SWITCH_CLASS, keys, namespace=namespace)


def switch_settings_path(switch: str, namespace: str = CIMV2) -> CIMInstanceName:
    keys = {"InstanceID": switch_name(switch)}
    return CIMInstanceName(SWITCH_SETTINGS_CLASS, keys, namespace=namespace)


def port_path(system: CIMInstanceName, device_id: str) -> CIMInstanceName:
    """The path of the ``TV_EthernetPort`` ``device_id`` of ``system`` (a VM or a switch)."""
    keys = {
        "SystemCreationClassName": system.classname,
        "SystemName": system["Name"],
        "CreationClassName": PORT_CLASS,
        "DeviceID": device_id,
    }
    return CIMInstanceName(PORT_CLASS, keys, namespace=system.namespace)


def nic_rasd_path(spec: VmSpec, nic: NicSpec, namespace: str = CIMV2) -> CIMInstanceName:
    """The path of a NIC's RASD, as ``virtualization`` keys it: ``thinvisor:<uuid>:<nic>``."""
    keys = {"InstanceID": f"thinvisor:{spec.uuid}:{nic.name}"}
    return CIMInstanceName(NIC_RASD_CLASS, keys, namespace=namespace)


def mac_digits(mac: str) -> str:
    """A MAC as DSP1050 writes it: twelve hex digits, no separators."""
    return mac.replace(":", "").replace("-", "").upper()


# What the host has, read once per provider call


@dataclass(frozen=True)
class Plug:
    """A VM NIC plugged into a switch: the switch and the NIC's TAP."""

    switch: dict[str, Any]
    tap: str


@dataclass(frozen=True)
class Network:
    """The VMs (with valid specs) and the switches, as the service reports them."""

    vms: list[tuple[VmInfo, VmSpec]]
    switches: list[dict[str, Any]]

    @cached_property
    def plugs(self) -> dict[tuple[str, str], Plug]:
        """The NICs of running VMs on a switch, by VM name and NIC name."""
        found: dict[tuple[str, str], Plug] = {}
        for switch in self.switches:
            for group in switch["port_groups"]:
                for port in group["ports"]:
                    if port.get("tap"):
                        found[(port["vm"], port["nic"])] = Plug(switch, port["tap"])
        return found

    def nic(self, vm: str, nic: str) -> NicSpec | None:
        for info, spec in self.vms:
            if info.name == vm:
                return next((n for n in spec.nics if n.name == nic), None)
        return None


async def read_network(ctx: CimContext) -> Network:
    vms = await valid_vms(ctx)
    return Network(vms, await service_of(ctx).network.list_switches())


# Instances


def switch_system(ctx: CimContext, switch: dict[str, Any]) -> CIMInstance:
    present = bool(switch.get("present"))
    return make_instance(
        ctx.repository,
        SWITCH_CLASS,
        {
            "Name": switch_name(switch["name"]),
            "NameFormat": "Other",
            "ElementName": switch["name"],
            "Caption": "Virtual Ethernet switch",
            "Description": _switch_description(switch),
            "Dedicated": [_SWITCH, _ETHERNET_SWITCH],
            "EnabledState": _ENABLED if present else _DISABLED,
            "RequestedState": _NOT_APPLICABLE,
            "EnabledDefault": _ENABLED,
            "AvailableRequestedStates": [],
            "HealthState": _HEALTH_OK if present else _HEALTH_MAJOR,
            "OperationalStatus": [_OK if present else _ERROR],
            "OtherIdentifyingInfo": [switch["bridge"]],
            "IdentifyingDescriptions": ["thinvisor:bridge"],
        },
        ctx.namespace,
    )


def _switch_description(switch: dict[str, Any]) -> str:
    parts = [f"Linux bridge {switch['bridge']}"]
    if switch.get("uplink"):
        parts.append(f"uplink {switch['uplink']}")
    nat = switch.get("nat")
    if nat:
        parts.append(f"NAT from {nat['address']}")
    if not switch.get("present"):
        parts.append("the bridge is missing from the kernel")
    return ", ".join(parts)


def switch_settings(ctx: CimContext, switch: dict[str, Any]) -> CIMInstance:
    vlans = sorted({g["vlan"] for g in switch["port_groups"] if _is_access(g["vlan"])})
    return make_instance(
        ctx.repository,
        SWITCH_SETTINGS_CLASS,
        {
            "InstanceID": switch_name(switch["name"]),
            "ElementName": switch["name"],
            "Caption": "Virtual Ethernet switch settings",
            "VirtualSystemIdentifier": switch["name"],
            "VLANConnection": [str(vlan) for vlan in vlans],
            "AssociatedResourcePool": [pool_path("network", ctx.namespace).to_wbem_uri()],
            "EVBMode": _VEB,
        },
        ctx.namespace,
    )


def _is_access(vlan: int) -> bool:
    return _VLAN_MIN <= vlan <= _VLAN_MAX


def switch_ports(ctx: CimContext, switch: dict[str, Any], net: Network) -> list[CIMInstance]:
    """The uplink (if any) and the TAP of each running VM's NIC on ``switch``."""
    found = [] if not switch.get("uplink") else [_uplink_port(ctx, switch)]
    for group in switch["port_groups"]:
        for port in group["ports"]:
            if port.get("tap"):
                nic = net.nic(port["vm"], port["nic"])
                found.append(_nic_switch_port(ctx, switch, group, port, nic))
    return found


def _switch_port(
    ctx: CimContext, switch: dict[str, Any], device_id: str, enabled: bool, **props: Any
) -> CIMInstance:
    path = port_path(switch_path(switch["name"], ctx.namespace), device_id)
    return make_instance(
        ctx.repository,
        PORT_CLASS,
        {
            **path.keybindings,
            "Name": device_id,
            "LinkTechnology": _ETHERNET,
            "ActiveMaximumTransmissionUnit": switch["mtu"],
            "EnabledState": _ENABLED if enabled else _DISABLED,
            "RequestedState": _NOT_APPLICABLE,
            "EnabledDefault": _ENABLED,
            "HealthState": _HEALTH_OK,
            "OperationalStatus": [_OK if enabled else _STOPPED],
            **props,
        },
        ctx.namespace,
    )


def _uplink_port(ctx: CimContext, switch: dict[str, Any]) -> CIMInstance:
    uplink = switch["uplink"]
    return _switch_port(
        ctx,
        switch,
        uplink,
        bool(switch.get("present")),
        ElementName=f"uplink {uplink}",
        Caption="Switch uplink",
        Description=f"the uplink of switch {switch['name']}: host interface {uplink}",
        OtherIdentifyingInfo=[uplink],
        IdentifyingDescriptions=["thinvisor:uplink"],
    )


def _nic_switch_port(
    ctx: CimContext,
    switch: dict[str, Any],
    group: dict[str, Any],
    port: dict[str, Any],
    nic: NicSpec | None,
) -> CIMInstance:
    vlan = int(group["vlan"])
    return _switch_port(
        ctx,
        switch,
        port["tap"],
        nic is None or nic.connected,
        ElementName=f"{port['vm']}/{port['nic']}",
        Caption="Switch port",
        Description=f"port group {group['name']} ({_vlan_text(vlan)}): "
        f"NIC {port['nic']} of VM {port['vm']}",
        PVID=vlan if _is_access(vlan) else None,
        OtherIdentifyingInfo=[group["name"], port["vm"], port["nic"]],
        IdentifyingDescriptions=["thinvisor:portgroup", "thinvisor:vm", "thinvisor:nic"],
    )


def _vlan_text(vlan: int) -> str:
    if _is_access(vlan):
        return f"VLAN {vlan}"
    return "untagged" if vlan < _VLAN_MIN else "trunk"


def vm_ports(ctx: CimContext, info: VmInfo, spec: VmSpec, net: Network) -> list[CIMInstance]:
    """The VM's NICs as its Ethernet ports (DSP1050)."""
    return [
        _vm_port(ctx, info, spec, nic, net.plugs.get((info.name, nic.name))) for nic in spec.nics
    ]


def _vm_port(
    ctx: CimContext, info: VmInfo, spec: VmSpec, nic: NicSpec, plug: Plug | None
) -> CIMInstance:
    enabled = info.state in _LIVE_STATES and nic.connected
    path = port_path(vm_path(spec.uuid, ctx.namespace), nic.name)
    identities = [("thinvisor:network", nic.network)]
    if plug is not None:
        identities.append(("thinvisor:tap", plug.tap))
    return make_instance(
        ctx.repository,
        PORT_CLASS,
        {
            **path.keybindings,
            "Name": nic.name,
            "ElementName": nic.name,
            "Caption": "Virtual Ethernet adapter",
            "Description": f"{nic.model} NIC of VM {spec.name} on {nic.network}",
            "PermanentAddress": mac_digits(nic.mac),
            "NetworkAddresses": [mac_digits(nic.mac)],
            "LinkTechnology": _ETHERNET,
            "EnabledState": _ENABLED if enabled else _DISABLED,
            "RequestedState": _NOT_APPLICABLE,
            "EnabledDefault": _ENABLED,
            "HealthState": _HEALTH_OK,
            "OperationalStatus": [_OK if enabled else _STOPPED],
            "IdentifyingDescriptions": [kind for kind, _ in identities],
            "OtherIdentifyingInfo": [value for _, value in identities],
        },
        ctx.namespace,
    )


# Instance builders


async def _switches(ctx: CimContext) -> list[CIMInstance]:
    return [switch_system(ctx, s) for s in (await read_network(ctx)).switches]


async def _switch_settings(ctx: CimContext) -> list[CIMInstance]:
    return [switch_settings(ctx, s) for s in (await read_network(ctx)).switches]


async def _ports(ctx: CimContext) -> list[CIMInstance]:
    net = await read_network(ctx)
    return [
        *(p for s in net.switches for p in switch_ports(ctx, s, net)),
        *(p for info, spec in net.vms for p in vm_ports(ctx, info, spec, net)),
    ]


def _assoc(ctx: CimContext, classname: str, **refs: CIMInstanceName) -> CIMInstance:
    return make_association(ctx.repository, classname, ctx.namespace, **refs)


async def _hosted_switches(ctx: CimContext) -> list[CIMInstance]:
    host = host_path(ctx.namespace)
    return [
        _assoc(
            ctx,
            "TV_HostedDependency",
            Antecedent=host,
            Dependent=switch_path(s["name"], ctx.namespace),
        )
        for s in (await read_network(ctx)).switches
    ]


async def _system_devices(ctx: CimContext) -> list[CIMInstance]:
    net = await read_network(ctx)
    found = []
    for switch in net.switches:
        system = switch_path(switch["name"], ctx.namespace)
        for port in switch_ports(ctx, switch, net):
            found.append(
                _assoc(ctx, "TV_SystemDevice", GroupComponent=system, PartComponent=port.path)
            )
    for info, spec in net.vms:
        system = vm_path(spec.uuid, ctx.namespace)
        for port in vm_ports(ctx, info, spec, net):
            found.append(
                _assoc(ctx, "TV_SystemDevice", GroupComponent=system, PartComponent=port.path)
            )
    return found


def _switch_to_settings(classname: str) -> Callable[[CimContext], Awaitable[list[CIMInstance]]]:
    async def build(ctx: CimContext) -> list[CIMInstance]:
        return [
            _assoc(
                ctx,
                classname,
                ManagedElement=switch_path(s["name"], ctx.namespace),
                SettingData=switch_settings_path(s["name"], ctx.namespace),
            )
            for s in (await read_network(ctx)).switches
        ]

    return build


async def _settings_define_state(ctx: CimContext) -> list[CIMInstance]:
    """Each switch's settings, and each VM NIC's RASD."""
    found = await _switch_to_settings("TV_SettingsDefineState")(ctx)
    for _, spec in await valid_vms(ctx):
        vm = vm_path(spec.uuid, ctx.namespace)
        for nic in spec.nics:
            found.append(
                _assoc(
                    ctx,
                    "TV_SettingsDefineState",
                    ManagedElement=port_path(vm, nic.name),
                    SettingData=nic_rasd_path(spec, nic, ctx.namespace),
                )
            )
    return found


async def _allocated_from_pool(ctx: CimContext) -> list[CIMInstance]:
    pool = pool_path("network", ctx.namespace)
    return [
        _assoc(
            ctx,
            "TV_ElementAllocatedFromPool",
            Antecedent=pool,
            Dependent=port_path(vm_path(spec.uuid, ctx.namespace), nic.name),
        )
        for _, spec in await valid_vms(ctx)
        for nic in spec.nics
    ]


async def _device_connections(ctx: CimContext) -> list[CIMInstance]:
    """A running VM's NIC and its port on the switch: the TAP that joins them."""
    net = await read_network(ctx)
    uuids = {info.name: spec.uuid for info, spec in net.vms}
    found = []
    for (vm, nic), plug in net.plugs.items():
        if vm not in uuids:
            continue
        switch_port = port_path(switch_path(plug.switch["name"], ctx.namespace), plug.tap)
        vm_port = port_path(vm_path(uuids[vm], ctx.namespace), nic)
        found.append(_assoc(ctx, "TV_DeviceConnection", Antecedent=switch_port, Dependent=vm_port))
    return found


# Central instances


async def _central_switches(ctx: CimContext) -> list[CIMInstanceName]:
    if ctx.agent is None:
        return []
    switches = await ctx.agent.service.network.list_switches()
    return [switch_path(s["name"], CIMV2) for s in switches]


async def _central_pools(ctx: CimContext) -> list[CIMInstanceName]:
    return [pool_path("network", CIMV2)]


def profiles() -> list[ProfileSupport]:
    """DSP1097 and DSP1050, for Profile Registration; System Virtualization scopes both."""
    return [
        ProfileSupport(VIRTUAL_ETHERNET_SWITCH, _central_switches, SYSTEM_VIRTUALIZATION),
        ProfileSupport(
            ETHERNET_PORT_RESOURCE_VIRTUALIZATION, _central_pools, SYSTEM_VIRTUALIZATION
        ),
    ]


def providers() -> list[InstanceProvider]:
    """The providers of the classes only this module has instances of."""
    return [
        FunctionProvider(SWITCH_SETTINGS_CLASS, CIMV2, _switch_settings),
        FunctionProvider(PORT_CLASS, CIMV2, _ports),
        FunctionProvider("TV_ElementAllocatedFromPool", CIMV2, _allocated_from_pool),
        FunctionProvider("TV_DeviceConnection", CIMV2, _device_connections),
    ]


def extensions() -> list[InstanceProvider]:
    """This module's instances of association classes other modules provide."""
    return [
        FunctionProvider(SWITCH_CLASS, CIMV2, _switches),
        FunctionProvider("TV_HostedDependency", CIMV2, _hosted_switches),
        FunctionProvider("TV_SystemDevice", CIMV2, _system_devices),
        FunctionProvider("TV_SettingsDefineState", CIMV2, _settings_define_state),
        FunctionProvider(
            "TV_ElementSettingData", CIMV2, _switch_to_settings("TV_ElementSettingData")
        ),
    ]
