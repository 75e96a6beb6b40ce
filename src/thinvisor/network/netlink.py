"""Bridges and TAP devices over netlink (pyroute2): the switch as the kernel sees it.

Every function opens its own netlink socket in the calling process's network namespace.
pyroute2's ``NetlinkError`` never leaves this module: it becomes a thinvisor error with
``raise ... from exc``. A call that fails removes what it created, so that no
half-built bridge or TAP remains.
"""

from __future__ import annotations

import errno
import hashlib
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from thinvisor.errors import BackendError, Busy, InvalidArgument, NotFound
from thinvisor.network.model import (
    IFNAMSIZ,
    VLAN_MAX,
    VLAN_TRUNK,
    VLAN_UNTAGGED,
    SwitchSpec,
)

TAP_PREFIX = "tv"
_TAP_HASH_CHARS = 12  # 48 bits: "tv" + 12 = 14 characters, under IFNAMSIZ
_TAP_NAME_RE = re.compile(rf"{TAP_PREFIX}[0-9a-f]{{{_TAP_HASH_CHARS}}}")
_DEFAULT_PVID = 1  # the bridge's default_pvid: untagged traffic rides VLAN 1


@dataclass(frozen=True)
class PortVlan:
    """One VLAN a bridge port carries."""

    vid: int
    pvid: bool
    untagged: bool


def tap_name(vm_uuid: str, nic_name: str) -> str:
    """The TAP device of one VM NIC: ``tv`` and a hash of both, the same on every start."""
    digest = hashlib.sha256(f"{vm_uuid.lower()}/{nic_name}".encode()).hexdigest()
    name = TAP_PREFIX + digest[:_TAP_HASH_CHARS]
    assert len(name) <= IFNAMSIZ
    return name


@contextmanager
def _netlink(action: str) -> Iterator[Any]:
    """An IPRoute socket; netlink errors during ``action`` become thinvisor errors."""
    try:
        with IPRoute() as ip:
            yield ip
    except NetlinkError as exc:
        if exc.code == errno.EOPNOTSUPP:
            raise BackendError(f"{action}: not supported by this kernel ({exc})") from exc
        if exc.code == errno.EPERM:
            raise BackendError(f"{action}: not permitted (needs CAP_NET_ADMIN)") from exc
        raise BackendError(f"{action}: {exc}") from exc


def _link(ip: Any, name: str) -> Any | None:
    links = ip.get_links(ifname=name)
    return links[0] if links else None


def _kind(link: Any) -> str | None:
    kind = link.get(("linkinfo", "kind"))
    return str(kind) if kind is not None else None


def _name_of(ip: Any, index: int) -> str:
    links = ip.get_links(index)
    return str(links[0].get("ifname")) if links else f"#{index}"


def _check_uplink(ip: Any, spec: SwitchSpec, bridge: int | None) -> Any:
    """The uplink's link message; refuse one that is missing or serves another bridge."""
    assert spec.uplink is not None
    link = _link(ip, spec.uplink)
    if link is None:
        raise InvalidArgument("uplink", f"no interface {spec.uplink!r} on this host")
    if _kind(link) in ("bridge", "tun"):
        raise InvalidArgument("uplink", f"{spec.uplink!r} is a {_kind(link)}, not a host NIC")
    master = link.get("master")
    if master and master != bridge:
        owner = _name_of(ip, master)
        raise InvalidArgument("uplink", f"{spec.uplink!r} is already a port of {owner!r}")
    return link


def ensure_switch(spec: SwitchSpec) -> bool:
    """Create the switch's bridge, or bring an existing one to ``spec``.

    Sets the MTU and the uplink, turns VLAN filtering on where the kernel has it, and
    brings the bridge up. Returns True when the bridge filters VLANs itself; False when
    the kernel lacks bridge VLAN filtering (the caller isolates port groups another way)
    or ``spec`` does not want it. On any failure a bridge this call created is deleted
    again and the uplink's MTU restored.
    """
    bridge = spec.bridge_name
    with _netlink(f"switch {spec.name!r}") as ip:
        existing = _link(ip, bridge)
        if existing is not None and _kind(existing) != "bridge":
            raise InvalidArgument("bridge", f"{bridge!r} exists and is not a bridge")
        index = existing["index"] if existing is not None else None
        uplink = _check_uplink(ip, spec, index) if spec.uplink else None
        try:
            index, filtering = _configure_bridge(ip, spec, existing)
            if uplink is not None:
                _attach_uplink(ip, spec, uplink, index, filtering)
        except BaseException:
            if existing is None:
                _delete_quietly(ip, bridge)
            if uplink is not None:
                _restore_mtu(ip, uplink)
            raise
        return filtering


def _configure_bridge(ip: Any, spec: SwitchSpec, existing: Any | None) -> tuple[int, bool]:
    if existing is None:
        filtering = spec.vlan_filtering
        try:
            _add_bridge(ip, spec.bridge_name, filtering)
        except NetlinkError as exc:
            # The kernel refuses IFLA_BR_VLAN_FILTERING altogether (even 0) when built
            # without CONFIG_BRIDGE_VLAN_FILTERING: a plain bridge then.
            if exc.code != errno.EOPNOTSUPP or not filtering:
                raise
            filtering = False
            _add_bridge(ip, spec.bridge_name, filtering)
        index = int(ip.link_lookup(ifname=spec.bridge_name)[0])
    else:
        index = int(existing["index"])
        current = existing.get(("linkinfo", "data", "br_vlan_filtering"))
        filtering = bool(current) if current is not None else False
        if current is not None and bool(current) != spec.vlan_filtering:
            filtering = _set_filtering(ip, index, spec.vlan_filtering)
    ip.link("set", index=index, mtu=spec.mtu, state="up")
    return index, filtering


def _set_filtering(ip: Any, index: int, on: bool) -> bool:
    """Turn an existing bridge's VLAN filtering on or off; whether it now filters."""
    try:
        ip.link("set", index=index, kind="bridge", br_vlan_filtering=int(on))
    except NetlinkError as exc:
        # As in _configure_bridge: a kernel without VLAN filtering keeps a plain bridge.
        if exc.code != errno.EOPNOTSUPP or not on:
            raise
        return False
    return on


def _add_bridge(ip: Any, name: str, vlan_filtering: bool) -> None:
    vlan = {"br_vlan_filtering": 1} if vlan_filtering else {}
    ip.link("add", ifname=name, kind="bridge", **vlan)


def bridge_filters_vlans(bridge: str) -> bool:
    """Whether ``bridge`` exists and does VLAN filtering itself."""
    with _netlink(f"bridge {bridge!r}") as ip:
        link = _link(ip, bridge)
        if link is None or _kind(link) != "bridge":
            return False
        return bool(link.get(("linkinfo", "data", "br_vlan_filtering")))


def _attach_uplink(ip: Any, spec: SwitchSpec, uplink: Any, bridge: int, filtering: bool) -> None:
    index = uplink["index"]
    ip.link("set", index=index, mtu=spec.mtu)
    ip.link("set", index=index, master=bridge, state="up")
    if filtering:
        # The uplink is a trunk: native (untagged) traffic on VLAN 1, all others tagged.
        ip.vlan_filter("add", index=index, vlan_info={"vid": f"{_DEFAULT_PVID + 1}-{VLAN_MAX}"})


def _restore_mtu(ip: Any, uplink: Any) -> None:
    with suppress(NetlinkError):  # best effort while already failing
        ip.link("set", index=uplink["index"], mtu=uplink.get("mtu"))


def _delete_quietly(ip: Any, name: str) -> None:
    with suppress(NetlinkError):  # best effort while already failing
        ip.link("del", ifname=name)


def delete_switch(bridge: str, force: bool = False) -> bool:
    """Delete a bridge; its uplink is released. Refused (``Busy``) while TAPs use it.

    Returns False when the bridge does not exist (nothing to do).
    """
    with _netlink(f"delete bridge {bridge!r}") as ip:
        link = _link(ip, bridge)
        if link is None:
            return False
        if _kind(link) != "bridge":
            raise InvalidArgument("bridge", f"{bridge!r} is not a bridge")
        taps = [p for p in _ports(ip, link["index"]) if p[1] == "tun"]
        if taps and not force:
            names = ", ".join(sorted(n for n, _ in taps))
            raise Busy(f"bridge {bridge!r} still has VM ports: {names}")
        ip.link("del", index=link["index"])
        return True


def _ports(ip: Any, bridge: int) -> list[tuple[str, str | None]]:
    return [(str(p.get("ifname")), _kind(p)) for p in ip.get_links(master=bridge)]


def bridge_ports(bridge: str) -> list[str]:
    """The names of the interfaces enslaved to ``bridge``, sorted."""
    with _netlink(f"list ports of {bridge!r}") as ip:
        link = _link(ip, bridge)
        if link is None:
            raise NotFound(f"bridge {bridge!r} not found")
        return sorted(name for name, _ in _ports(ip, link["index"]))


def attach_port(name: str, switch: SwitchSpec, vlan: int, *, up: bool = True) -> int:
    """Join the existing interface ``name`` (a VM's TAP) to the switch's bridge with the
    port group's ``vlan``; return its index. Idempotent: an agent re-adopting a running
    VM calls it again."""
    with _netlink(f"port {name!r}") as ip:
        bridge = _link(ip, switch.bridge_name)
        if bridge is None or _kind(bridge) != "bridge":
            raise NotFound(f"bridge {switch.bridge_name!r} of switch {switch.name!r} not found")
        link = _link(ip, name)
        if link is None:
            raise NotFound(f"interface {name!r} not found")
        index = int(link["index"])
        if link.get("master") != bridge["index"]:
            ip.link("set", index=index, mtu=switch.mtu, master=bridge["index"])
        if bridge.get(("linkinfo", "data", "br_vlan_filtering")):
            _reset_port_vlans(ip, index)
            _set_port_vlans(ip, index, vlan)
        ip.link("set", index=index, state="up" if up else "down")
        return index


def _reset_port_vlans(ip: Any, index: int) -> None:
    """Drop every VLAN of a port (joining the bridge gave it the default PVID)."""
    for entry in _vlan_entries(ip, index):
        with suppress(NetlinkError):
            ip.vlan_filter("del", index=index, vlan_info={"vid": entry.vid})


def _set_port_vlans(ip: Any, index: int, vlan: int) -> None:
    """Access port (1-4094), trunk (4095: 1-4094 tagged, no PVID) or untagged (0)."""
    if vlan == VLAN_UNTAGGED:
        info: dict[str, Any] = {"vid": _DEFAULT_PVID, "flags": ["pvid", "untagged"]}
        ip.vlan_filter("add", index=index, vlan_info=info)
        return
    try:
        ip.vlan_filter("del", index=index, vlan_info={"vid": _DEFAULT_PVID})
    except NetlinkError as exc:
        if exc.code != errno.ENOENT:
            raise
    if vlan == VLAN_TRUNK:
        ip.vlan_filter("add", index=index, vlan_info={"vid": f"1-{VLAN_MAX}"})
    else:
        ip.vlan_filter("add", index=index, vlan_info={"vid": vlan, "flags": ["pvid", "untagged"]})


def port_vlans(name: str) -> list[PortVlan]:
    """The VLANs a bridge port carries, by VLAN id (empty without VLAN filtering)."""
    with _netlink(f"VLANs of {name!r}") as ip:
        link = _link(ip, name)
        if link is None:
            raise NotFound(f"interface {name!r} not found")
        return _vlan_entries(ip, int(link["index"]))


def _vlan_entries(ip: Any, index: int) -> list[PortVlan]:
    found: list[PortVlan] = []
    for msg in ip.get_vlans():
        if msg.get("index") != index:
            continue
        for spec in msg.get_attrs("IFLA_AF_SPEC"):
            for entry in spec.get_attrs("IFLA_BRIDGE_VLAN_INFO"):
                flags = int(entry["flags"])
                found.append(PortVlan(int(entry["vid"]), bool(flags & 2), bool(flags & 4)))
    return sorted(found, key=lambda v: v.vid)


def delete_tap(name: str) -> bool:
    """Remove a TAP device; False when there is none. Refuses other kinds of interface."""
    with _netlink(f"delete TAP {name!r}") as ip:
        link = _link(ip, name)
        if link is None:
            return False
        if _kind(link) != "tun":
            raise InvalidArgument("tap", f"{name!r} is not a TAP device")
        ip.link("del", index=link["index"])
        return True


def is_tap_name(name: str) -> bool:
    """Whether ``name`` has the form of a thinvisor TAP (``tv`` and 12 hex digits)."""
    return _TAP_NAME_RE.fullmatch(name) is not None


def list_taps(prefix: str = TAP_PREFIX) -> list[str]:
    """The names of the TAP devices whose names start with ``prefix``, sorted."""
    with _netlink("list TAP devices") as ip:
        return sorted(
            str(link.get("ifname"))
            for link in ip.get_links()
            if _kind(link) == "tun" and str(link.get("ifname")).startswith(prefix)
        )


def set_link(name: str, up: bool) -> None:
    """Bring an interface up or down."""
    with _netlink(f"set {name!r} {'up' if up else 'down'}") as ip:
        link = _link(ip, name)
        if link is None:
            raise NotFound(f"interface {name!r} not found")
        ip.link("set", index=link["index"], state="up" if up else "down")


def set_address(name: str, address: IPv4Interface) -> None:
    """Give ``name`` exactly the IPv4 address ``address`` (others are removed)."""
    with _netlink(f"address of {name!r}") as ip:
        link = _link(ip, name)
        if link is None:
            raise NotFound(f"interface {name!r} not found")
        index = int(link["index"])
        present = False
        for msg in ip.get_addr(index=index, family=socket.AF_INET):
            mine = (msg.get("IFA_ADDRESS"), msg["prefixlen"])
            if mine == (str(address.ip), address.network.prefixlen):
                present = True
            else:
                ip.addr("del", index=index, address=mine[0], prefixlen=mine[1])
        if not present:
            ip.addr(
                "add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen
            )


def link_exists(name: str) -> bool:
    """Whether an interface called ``name`` exists."""
    with _netlink(f"interface {name!r}") as ip:
        return _link(ip, name) is not None


def tap_is_persistent(name: str) -> bool:
    """Whether the TAP ``name`` outlives its descriptors (made with ``ip tuntap`` or the
    like); thinvisor's own TAPs are not."""
    with _netlink(f"TAP {name!r}") as ip:
        link = _link(ip, name)
        if link is None or _kind(link) != "tun":
            return False
        data = link.get(("linkinfo", "data"))
        return bool(data.get("IFLA_TUN_PERSIST")) if data is not None else False
