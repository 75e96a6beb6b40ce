"""Virtual switches and port groups: what ``network.toml`` holds.

Pure data, no I/O. A switch is a Linux bridge; a port group is a VLAN setting that a
VM NIC's TAP gets when it joins the bridge.
"""

from __future__ import annotations

import re
from typing import Annotated, Self

from pydantic import AfterValidator, Field, model_validator

from thinvisor.model.vm import StrictModel, check_name

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
    if not _IFNAME_RE.match(value):
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


class SwitchSpec(StrictModel):
    """A virtual switch: a Linux bridge, optionally with a host interface as its uplink."""

    name: SwitchName
    # The bridge device; derived from the name when not given.
    bridge: IfName | None = None
    mtu: int = Field(default=1500, ge=MTU_MIN, le=MTU_MAX)
    uplink: IfName | None = None
    vlan_filtering: bool = True
    port_groups: list[PortGroupSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.bridge is None:
            # Assigning would re-run this validator (validate_assignment); set it directly.
            object.__setattr__(self, "bridge", bridge_name_for(self.name))
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
    """Every virtual switch of the host. Stored as ``<state_dir>/network.toml``."""

    switches: list[SwitchSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        for what, values in (
            ("switch names", [s.name for s in self.switches]),
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
