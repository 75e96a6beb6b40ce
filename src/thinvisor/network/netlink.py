"""Bridges and TAP devices over netlink (pyroute2): the switch as the kernel sees it.

Every function opens its own netlink socket in the calling process's network namespace.
pyroute2's ``NetlinkError`` never leaves this module: it becomes a thinvisor error with
``raise ... from exc``. A call that fails removes what it created, so that no
half-built bridge or TAP remains.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from thinvisor.errors import AlreadyExists, BackendError, Busy, InvalidArgument, NotFound
from thinvisor.network.model import (
    IFNAMSIZ,
    VLAN_MAX,
    VLAN_TRUNK,
    VLAN_UNTAGGED,
    SwitchSpec,
    check_ifname,
)

TAP_PREFIX = "tv"
_TAP_HASH_CHARS = 12  # 48 bits: "tv" + 12 = 14 characters, under IFNAMSIZ
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


def ensure_switch(spec: SwitchSpec) -> None:
    """Create the switch's bridge, or bring an existing one to ``spec``.

    Sets VLAN filtering, the MTU and the uplink, and brings the bridge up. On any failure
    a bridge this call created is deleted again and the uplink's MTU restored.
    """
    bridge = spec.bridge_name
    with _netlink(f"switch {spec.name!r}") as ip:
        existing = _link(ip, bridge)
        if existing is not None and _kind(existing) != "bridge":
            raise InvalidArgument("bridge", f"{bridge!r} exists and is not a bridge")
        index = existing["index"] if existing is not None else None
        uplink = _check_uplink(ip, spec, index) if spec.uplink else None
        try:
            index = _configure_bridge(ip, spec, existing)
            if uplink is not None:
                _attach_uplink(ip, spec, uplink, index)
        except BaseException:
            if existing is None:
                _delete_quietly(ip, bridge)
            if uplink is not None:
                _restore_mtu(ip, uplink)
            raise


def _configure_bridge(ip: Any, spec: SwitchSpec, existing: Any | None) -> int:
    # The kernel refuses IFLA_BR_VLAN_FILTERING altogether (even 0) when built without
    # CONFIG_BRIDGE_VLAN_FILTERING, so the attribute is only sent when it is wanted.
    vlan = {"br_vlan_filtering": 1} if spec.vlan_filtering else {}
    if existing is None:
        try:
            ip.link("add", ifname=spec.bridge_name, kind="bridge", **vlan)
        except NetlinkError as exc:
            if exc.code == errno.EOPNOTSUPP and spec.vlan_filtering:
                raise BackendError(
                    f"switch {spec.name!r}: this kernel's bridges have no VLAN filtering "
                    "(CONFIG_BRIDGE_VLAN_FILTERING); use vlan_filtering = false"
                ) from exc
            raise
        index = int(ip.link_lookup(ifname=spec.bridge_name)[0])
    else:
        index = int(existing["index"])
        current = existing.get(("linkinfo", "data", "br_vlan_filtering"))
        if bool(current) != spec.vlan_filtering:
            filtering = int(spec.vlan_filtering)
            ip.link("set", index=index, kind="bridge", br_vlan_filtering=filtering)
    ip.link("set", index=index, mtu=spec.mtu, state="up")
    return index


def _attach_uplink(ip: Any, spec: SwitchSpec, uplink: Any, bridge: int) -> None:
    index = uplink["index"]
    ip.link("set", index=index, mtu=spec.mtu)
    ip.link("set", index=index, master=bridge, state="up")
    if spec.vlan_filtering:
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


def create_tap(name: str, switch: SwitchSpec, portgroup: str, mtu: int | None = None) -> int:
    """Create a persistent TAP owned by root, join it to ``portgroup``; return its index.

    Refuses an unknown port group, a missing bridge and a name already taken; a TAP
    that cannot be fully set up is removed again.
    """
    try:
        check_ifname(name)
    except ValueError as exc:
        raise InvalidArgument("tap", str(exc)) from None
    group = switch.port_group(portgroup)
    if group is None:
        reason = f"no port group {portgroup!r} on switch {switch.name!r}"
        raise InvalidArgument("port_group", reason)
    with _netlink(f"TAP {name!r}") as ip:
        bridge = _link(ip, switch.bridge_name)
        if bridge is None or _kind(bridge) != "bridge":
            raise NotFound(f"bridge {switch.bridge_name!r} of switch {switch.name!r} not found")
        if _link(ip, name) is not None:
            # Creating an existing persistent TAP would silently reuse it: refuse instead.
            raise AlreadyExists(f"interface {name!r} already exists")
        ifr = {"no_pi": True, "one_queue": False, "vnet_hdr": False, "multi_queue": False}
        ip.link("add", ifname=name, kind="tuntap", mode="tap", uid=0, gid=0, ifr=ifr)
        try:
            index = int(ip.link_lookup(ifname=name)[0])
            ip.link("set", index=index, mtu=mtu or switch.mtu, master=bridge["index"])
            if switch.vlan_filtering:
                _set_port_vlans(ip, index, group.vlan)
            ip.link("set", index=index, state="up")
        except BaseException:
            _delete_quietly(ip, name)
            raise
        return index


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
        found: list[PortVlan] = []
        for msg in ip.get_vlans():
            if msg.get("index") != link["index"]:
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
