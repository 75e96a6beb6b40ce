"""Virtual networking: switches (Linux bridges), port groups (VLANs) and one TAP per NIC.

``model`` is pure data, ``store`` keeps it in ``network.toml``, ``netlink`` makes the
kernel match it.
"""

from thinvisor.network.model import NetworkConfig, PortGroupSpec, SwitchSpec, bridge_name_for
from thinvisor.network.netlink import (
    PortVlan,
    bridge_ports,
    delete_switch,
    delete_tap,
    ensure_switch,
    list_taps,
    port_vlans,
    set_link,
    tap_name,
)
from thinvisor.network.store import NetworkStore

__all__ = [
    "NetworkConfig",
    "NetworkStore",
    "PortGroupSpec",
    "PortVlan",
    "SwitchSpec",
    "bridge_name_for",
    "bridge_ports",
    "delete_switch",
    "delete_tap",
    "ensure_switch",
    "list_taps",
    "port_vlans",
    "set_link",
    "tap_name",
]
