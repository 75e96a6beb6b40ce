"""Virtual switches and port groups: what ``network.toml`` holds.

Pure data, no I/O. A switch is a Linux bridge; a port group is a VLAN setting that a
VM NIC's TAP gets when it joins the bridge.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Interface
from typing import Annotated, Self

from pydantic import AfterValidator, Field, field_validator, model_validator

from thinvisor.model.base import StrictModel
from thinvisor.model.vm import USER_NETWORK, check_name

IFNAMSIZ = 15  # Linux interface names: at most 15 characters (16 with the NUL)
BRIDGE_PREFIX = "tvbr-"
VLAN_UNTAGGED = 0
VLAN_MAX = 4094
VLAN_TRUNK = 4095
MTU_MIN = 68
MTU_MAX = 9000
# What the kernel accepts as an interface name, kept to the characters iproute2 users type.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$")


def check_ifname(value: str) -> str:
    """Validate a Linux interface name; raise ``ValueError`` with the reason."""
    if not _IFNAME_RE.fullmatch(value):
        raise ValueError(
            f"must be 1 to {IFNAMSIZ} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def bridge_name_for(switch: str) -> str:
    """The bridge device of a switch named ``switch``: ``tvbr-<name>`` when it fits."""
    name = f"{BRIDGE_PREFIX}{switch}"
    if len(name) > IFNAMSIZ:
        raise ValueError(
            f"switch name longer than {IFNAMSIZ - len(BRIDGE_PREFIX)} characters: "
            "give the bridge name explicitly"
        )
    return name


SwitchName = Annotated[str, AfterValidator(check_name)]
IfName = Annotated[str, AfterValidator(check_ifname)]


class PortGroupSpec(StrictModel):
    """A named VLAN setting on a switch: 0 untagged, 1-4094 one tagged VLAN, 4095 trunk."""

    name: SwitchName
    vlan: int = Field(default=VLAN_UNTAGGED, ge=VLAN_UNTAGGED, le=VLAN_TRUNK)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == USER_NETWORK:
            raise ValueError(f"{USER_NETWORK!r} is reserved for QEMU's user networking")
        return value


class NatSpec(StrictModel):
    """A NAT switch's host side, as libvirt's ``default`` network: the host's address on
    the bridge, DHCP and DNS for guests (dnsmasq), masquerading out of the host."""

    address: IPv4Interface = Field(description="the host's address and prefix, e.g. 10.0.5.1/24")
    dhcp: bool = True
    # The DHCP pool; by default every address of the subnet but the host's.
    dhcp_start: IPv4Address | None = None
    dhcp_end: IPv4Address | None = None

    @model_validator(mode="after")
    def _pool(self) -> Self:
        net = self.address.network
        if net.prefixlen > 30:
            raise ValueError("the subnet must hold at least two guest addresses (/30 or wider)")
        if self.address.ip in (net.network_address, net.broadcast_address):
            raise ValueError(f"{self.address.ip} is not a host address of {net}")
        start, end = self.dhcp_range
        for field, value in (("dhcp_start", start), ("dhcp_end", end)):
            if value not in net or value in (net.network_address, net.broadcast_address):
                raise ValueError(f"{field} {value} is not a host address of {net}")
        if start > end:
            raise ValueError("dhcp_start must not be after dhcp_end")
        if start <= self.address.ip <= end:
            raise ValueError(f"the DHCP pool must not hold the host's address {self.address.ip}")
        return self

    @property
    def dhcp_range(self) -> tuple[IPv4Address, IPv4Address]:
        """The DHCP pool: the addresses above the host's, or below it when it is last."""
        net, ip = self.address.network, self.address.ip
        first, last = net.network_address + 1, net.broadcast_address - 1
        default = (ip + 1, last) if ip < last else (first, ip - 1)
        return (self.dhcp_start or default[0], self.dhcp_end or default[1])


class SwitchSpec(StrictModel):
    """A virtual switch: a Linux bridge, optionally with a host interface as its uplink."""

    name: SwitchName
    # The bridge device; derived from the name when not given.
    bridge: IfName | None = None
    mtu: int = Field(default=1500, ge=MTU_MIN, le=MTU_MAX)
    uplink: IfName | None = None
    vlan_filtering: bool = True
    nat: NatSpec | None = None
    port_groups: list[PortGroupSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.bridge is None:
            # Assigning would re-run this validator (validate_assignment); set it directly.
            object.__setattr__(self, "bridge", bridge_name_for(self.name))
        if self.nat is not None and self.uplink is not None:
            raise ValueError("a NAT switch has no uplink: its traffic leaves through the host")
        if self.uplink is not None and self.uplink == self.bridge:
            raise ValueError("the uplink must not be the switch's own bridge")
        names = [p.name for p in self.port_groups]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"port group names must be unique, repeated: {', '.join(dupes)}")
        if not self.vlan_filtering and any(p.vlan != VLAN_UNTAGGED for p in self.port_groups):
            raise ValueError("port groups with a VLAN need vlan_filtering")
        return self

    @property
    def bridge_name(self) -> str:
        """The bridge device name (always set once validated)."""
        assert self.bridge is not None
        return self.bridge

    def port_group(self, name: str) -> PortGroupSpec | None:
        return next((p for p in self.port_groups if p.name == name), None)


class NetworkConfig(StrictModel):
    """Every virtual switch of the host. Stored as ``<state_dir>/network.toml``.

    Port group names are unique on the host, as on ESXi: a VM NIC names its port group.
    """

    switches: list[SwitchSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        groups = [p.name for s in self.switches for p in s.port_groups]
        for what, values in (
            ("switch names", [s.name for s in self.switches]),
            ("port group names", groups),
            ("bridge names", [s.bridge_name for s in self.switches]),
            ("uplinks", [s.uplink for s in self.switches if s.uplink is not None]),
        ):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"{what} must be unique, repeated: {', '.join(dupes)}")
        bridges = {s.bridge_name for s in self.switches}
        taken = sorted(s.uplink for s in self.switches if s.uplink in bridges)
        if taken:
            raise ValueError(f"an uplink must not be a switch's bridge: {', '.join(taken)}")
        return self

    def switch(self, name: str) -> SwitchSpec | None:
        return next((s for s in self.switches if s.name == name), None)

    def port_group(self, name: str) -> tuple[SwitchSpec, PortGroupSpec] | None:
        """The port group called ``name`` (names are unique on a host) and its switch."""
        for switch in self.switches:
            group = switch.port_group(name)
            if group is not None:
                return switch, group
        return None
