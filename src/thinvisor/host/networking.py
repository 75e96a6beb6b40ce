"""The host's virtual networking as actions: switches, port groups, and VM NIC ports.

``network.toml`` (the store) says what should exist; this module makes the kernel
(bridges, TAPs, nftables, tc) and dnsmasq match it, and undoes its own partial work when
a step fails, so that a refused change leaves nothing behind.

VLANs: a bridge filters VLANs itself where the kernel has bridge VLAN filtering. Where
it does not, port groups with a VLAN id are kept apart by nftables rules on the bridge
(``vlan_enforcement = "nftables"``): guests on one VLAN reach each other and nothing
else, but tagged frames do not leave through the uplink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thinvisor.config import HostConfig
from thinvisor.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from thinvisor.host.engine import process
from thinvisor.host.inventory import Inventory
from thinvisor.model.vm import USER_NETWORK, NicSpec, VmSpec
from thinvisor.network import netlink, nftables, shaping
from thinvisor.network.dnsmasq import Dnsmasq
from thinvisor.network.model import (
    VLAN_MAX,
    NetworkConfig,
    PortGroupSpec,
    SwitchSpec,
)
from thinvisor.network.store import NetworkStore
from thinvisor.network.tap import open_tap

log = logging.getLogger(__name__)

Emit = Callable[..., None]


@dataclass(frozen=True)
class NicPort:
    """A VM NIC on a port group, and its TAP while the VM runs."""

    vm: str
    vm_uuid: str
    nic: NicSpec
    running: bool

    @property
    def tap(self) -> str:
        return netlink.tap_name(self.vm_uuid, self.nic.name)


class NetworkService:
    """Switches, port groups and the TAPs of running VMs."""

    def __init__(self, config: HostConfig, inventory: Inventory, emit: Emit | None = None):
        self.config = config
        self.inventory = inventory
        self.store = NetworkStore(config.state_dir / "network.toml")
        self.dnsmasq = Dnsmasq(config.run_dir, config.state_dir)
        self._emit = emit
        # One network change at a time: a VM start opening a TAP on a port group and
        # that port group's removal must not interleave.
        self._lock = asyncio.Lock()

    def emit(self, kind: str, obj: str, message: str, **data: Any) -> None:
        log.info("%s: %s", obj, message)
        if self._emit is not None:
            self._emit(kind, obj, message, **data)

    # Views

    def nic_ports(self) -> list[NicPort]:
        """Every NIC of every defined VM that is on a port group (not user networking)."""
        ports: list[NicPort] = []
        for entry in self.inventory.entries():
            if entry.spec is None:
                continue
            running = process.running_pid(entry.paths) is not None
            for nic in entry.spec.nics:
                if nic.network != USER_NETWORK:
                    ports.append(NicPort(entry.name, entry.spec.uuid, nic, running))
        return ports

    def _ports_on(self, groups: set[str]) -> list[NicPort]:
        return [p for p in self.nic_ports() if p.nic.network in groups]

    def lookup(self, network: str, field: str = "network") -> tuple[SwitchSpec, PortGroupSpec]:
        """The port group ``network`` and its switch; ``InvalidArgument`` when there is none."""
        found = self.store.load().port_group(network)
        if found is None:
            raise InvalidArgument(field, f"no port group {network!r} on this host")
        return found

    def check_networks(self, spec: VmSpec) -> None:
        """Refuse a VM whose NICs name port groups that do not exist."""
        config = self.store.load()
        for nic in spec.nics:
            if nic.network != USER_NETWORK and config.port_group(nic.network) is None:
                reason = f"no port group {nic.network!r} on this host"
                raise InvalidArgument(f"nics.{nic.name}.network", reason)

    def switch_info(self, spec: SwitchSpec, ports: list[NicPort] | None = None) -> dict[str, Any]:
        """A switch as callers see it: its spec, its kernel state and who uses it."""
        ports = self.nic_ports() if ports is None else ports
        present = netlink.link_exists(spec.bridge_name)
        groups = []
        for group in spec.port_groups:
            members = [p for p in ports if p.nic.network == group.name]
            groups.append({**group.model_dump(mode="json"), "ports": [_port(p) for p in members]})
        info: dict[str, Any] = {
            **spec.model_dump(mode="json"),
            "port_groups": groups,
            "present": present,
            "vlan_enforcement": self._enforcement(spec, present),
            "dhcp": None,
        }
        if spec.nat is not None and spec.nat.dhcp:
            leases = [lease.__dict__ for lease in self.dnsmasq.leases(spec.name)]
            info["dhcp"] = {
                "pid": self.dnsmasq.running(spec.name),
                "range": [str(a) for a in spec.nat.dhcp_range],
                "leases": [{**lease, "ip": str(lease["ip"])} for lease in leases],
            }
        return info

    def _enforcement(self, spec: SwitchSpec, present: bool) -> str:
        if not spec.vlan_filtering:
            return "none"
        if present and netlink.bridge_filters_vlans(spec.bridge_name):
            return "bridge"
        return "nftables"

    # pyroute2's synchronous socket cannot run on the event loop's thread: every call that
    # reaches netlink goes through a worker thread.

    async def list_switches(self) -> list[dict[str, Any]]:
        def infos() -> list[dict[str, Any]]:
            ports = self.nic_ports()
            return [self.switch_info(s, ports) for s in self.store.switches()]

        return await asyncio.to_thread(infos)

    async def get_switch(self, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(lambda: self.switch_info(self.store.get(name)))

    async def list_port_groups(self) -> list[dict[str, Any]]:
        return self.port_groups()

    def port_groups(self) -> list[dict[str, Any]]:
        ports = self.nic_ports()
        return [
            {
                **group.model_dump(mode="json"),
                "switch": switch.name,
                "ports": [_port(p) for p in ports if p.nic.network == group.name],
            }
            for switch in self.store.switches()
            for group in switch.port_groups
        ]

    async def get_port_group(self, name: str) -> dict[str, Any]:
        for group in self.port_groups():
            if group["name"] == name:
                return group
        raise NotFound(f"port group {name!r} not found")

    def lease_of(self, mac: str) -> str | None:
        """The address dnsmasq leased to ``mac`` on any NAT switch, if any."""
        for switch in self.store.switches():
            if switch.nat is None:
                continue
            for lease in self.dnsmasq.leases(switch.name):
                if lease.mac == mac:
                    return str(lease.ip)
        return None

    # Switches

    async def create_switch(self, spec: SwitchSpec) -> dict[str, Any]:
        """Build the switch in the kernel, then record it; on failure undo the kernel part."""
        async with self._lock:
            config = self.store.load()
            if config.switch(spec.name) is not None:
                raise AlreadyExists(f"switch {spec.name!r} already exists")
            # Validates names, bridges, uplinks and port groups against the whole host.
            self.store.check_new_switch(config, spec)
            if await asyncio.to_thread(netlink.link_exists, spec.bridge_name):
                raise InvalidArgument("bridge", f"an interface {spec.bridge_name!r} exists")
            try:
                await asyncio.to_thread(self._realize, spec)
                self.store.add_switch(spec)
            except BaseException:
                await asyncio.to_thread(self._unrealize, spec)
                raise
        self.emit("network.switch_created", f"switch/{spec.name}", "switch created")
        return await self.get_switch(spec.name)

    def _realize(self, spec: SwitchSpec) -> None:
        """Make the kernel and dnsmasq match ``spec`` (idempotent)."""
        netlink.ensure_switch(spec)
        if spec.nat is not None:
            netlink.set_address(spec.bridge_name, spec.nat.address)
            nftables.apply_nat(spec.name, spec.bridge_name, spec.nat.address.network)
            dhcp = spec.nat.dhcp_range if spec.nat.dhcp else None
            self.dnsmasq.ensure(spec.name, spec.bridge_name, spec.nat.address, dhcp)

    def _unrealize(self, spec: SwitchSpec) -> None:
        """Remove what ``_realize`` made; quiet about what is already gone."""
        self.dnsmasq.stop(spec.name)
        nftables.remove_nat(spec.name)
        nftables.remove_vlan_isolation(spec.name)
        netlink.delete_switch(spec.bridge_name, force=True)

    async def delete_switch(self, name: str) -> None:
        """Remove a switch; refused while any VM's NIC is on one of its port groups."""
        async with self._lock:
            spec = self.store.get(name)
            users = self._ports_on({g.name for g in spec.port_groups})
            if users:
                raise Busy(f"switch {name!r} is in use by {_users(users)}")
            await asyncio.to_thread(self._unrealize, spec)
            self.store.remove_switch(name)
        self.emit("network.switch_deleted", f"switch/{name}", "switch deleted")

    # Port groups

    async def create_port_group(self, switch: str, group: PortGroupSpec) -> dict[str, Any]:
        async with self._lock:
            self.store.add_port_group(switch, group)
        self.emit(
            "network.portgroup_created",
            f"portgroup/{group.name}",
            f"port group created on switch {switch!r} with VLAN {group.vlan}",
        )
        return await self.get_port_group(group.name)

    async def update_port_group(self, name: str, vlan: int) -> dict[str, Any]:
        """Change a port group's VLAN; the running NICs on it move at once."""
        async with self._lock:
            switch, _ = self.lookup(name, "name")
            self.store.set_port_group_vlan(name, vlan)
            switch = self.store.get(switch.name)
            await asyncio.to_thread(self._rejoin, switch)
        self.emit("network.portgroup_changed", f"portgroup/{name}", f"VLAN set to {vlan}")
        return await self.get_port_group(name)

    async def delete_port_group(self, name: str) -> None:
        """Remove a port group; refused while any VM's NIC is on it."""
        async with self._lock:
            switch, _ = self.lookup(name, "name")
            users = self._ports_on({name})
            if users:
                raise Busy(f"port group {name!r} is in use by {_users(users)}")
            self.store.remove_port_group(switch.name, name)
        self.emit("network.portgroup_deleted", f"portgroup/{name}", "port group deleted")

    # VM NIC ports

    async def open_nics(self, spec: VmSpec) -> dict[str, int]:
        """Create and wire the TAPs of a VM about to start: NIC name -> owning descriptor.

        The caller hands the descriptors to QEMU and closes its copies. On failure every
        descriptor opened so far is closed, which removes its TAP.
        """
        fds: dict[str, int] = {}
        try:
            for nic in spec.nics:
                if nic.network != USER_NETWORK:
                    fds[nic.name] = await self.open_nic(spec, nic)
        except BaseException:
            close_fds(fds)
            raise
        return fds

    async def open_nic(self, spec: VmSpec, nic: NicSpec) -> int:
        """Create one NIC's TAP and join it to its port group; return the owning fd."""
        async with self._lock:
            switch, group = self.lookup(nic.network, f"nics.{nic.name}.network")
            tap = netlink.tap_name(spec.uuid, nic.name)
            fd = await asyncio.to_thread(open_tap, tap)
            try:
                await asyncio.to_thread(self._wire, switch, group.vlan, tap, nic)
            except BaseException:
                os.close(fd)
                await asyncio.to_thread(_drop_ifb, tap)
                raise
            return fd

    def _wire(self, switch: SwitchSpec, vlan: int, tap: str, nic: NicSpec) -> None:
        """Isolation first (so a new port never talks to the wrong VLAN), then the port."""
        self._apply_isolation(switch, self._live_ports(switch), extra={tap: vlan})
        netlink.attach_port(tap, switch, vlan)
        shaping.apply_shaping(tap, nic.shaping)

    def _live_ports(self, switch: SwitchSpec) -> list[tuple[NicPort, int]]:
        """The running NICs on ``switch`` whose TAP exists, each with its VLAN id."""
        vlans = {g.name: g.vlan for g in switch.port_groups}
        return [
            (p, vlans[p.nic.network])
            for p in self.nic_ports()
            if p.running and p.nic.network in vlans and netlink.link_exists(p.tap)
        ]

    def _apply_isolation(
        self,
        switch: SwitchSpec,
        live: list[tuple[NicPort, int]],
        extra: dict[str, int] | None = None,
    ) -> None:
        """The nftables VLAN rules of ``switch`` for the ``live`` ports (and ``extra``)."""
        if not switch.vlan_filtering or netlink.bridge_filters_vlans(switch.bridge_name):
            nftables.remove_vlan_isolation(switch.name)
            return
        members = {p.tap: vlan for p, vlan in live} | (extra or {})
        groups: dict[int, list[str]] = {}
        for tap, vlan in sorted(members.items()):
            if 0 < vlan <= VLAN_MAX:  # untagged and trunk ports share the native segment
                groups.setdefault(vlan, []).append(tap)
        nftables.apply_vlan_isolation(switch.name, groups)

    def _rejoin(self, switch: SwitchSpec) -> None:
        """Bring every running TAP on ``switch`` to its port group's VLAN and shaping."""
        live = self._live_ports(switch)
        self._apply_isolation(switch, live)
        for port, vlan in live:
            netlink.attach_port(port.tap, switch, vlan)
            shaping.apply_shaping(port.tap, port.nic.shaping)

    async def rewire_nic(self, spec: VmSpec, nic: NicSpec) -> None:
        """Move a running NIC's TAP to ``nic``'s port group and shaping."""
        async with self._lock:
            switch, group = self.lookup(nic.network, "network")
            tap = netlink.tap_name(spec.uuid, nic.name)
            if not await asyncio.to_thread(netlink.link_exists, tap):
                raise NotFound(f"the TAP {tap!r} of NIC {nic.name!r} does not exist")
            await asyncio.to_thread(self._wire, switch, group.vlan, tap, nic)
            # The switch it left keeps no rule for it.
            for other in self.store.switches():
                if other.name != switch.name:
                    live = await asyncio.to_thread(self._live_ports, other)
                    await asyncio.to_thread(self._apply_isolation, other, live)

    async def nic_gone(self, spec: VmSpec, nic: NicSpec) -> None:
        """Tidy up after a NIC's TAP went away (its IFB); the kernel removed the TAP."""
        await asyncio.to_thread(_drop_ifb, netlink.tap_name(spec.uuid, nic.name))

    async def vm_stopped(self, spec: VmSpec) -> None:
        """Tidy up after a VM's QEMU ended: its TAPs are gone, their IFBs go too."""
        for nic in spec.nics:
            if nic.network != USER_NETWORK:
                await self.nic_gone(spec, nic)

    # After a restart or a crash

    async def reconcile(self) -> dict[str, Any]:
        """Make the kernel match ``network.toml`` and the running VMs again.

        Rebuilds missing bridges (after a host reboot), re-adopts or restarts dnsmasq,
        re-joins running VMs' TAPs to their port groups, and removes what belongs to no
        switch or VM: nftables tables, dnsmasq instances, IFB devices.
        """
        async with self._lock:
            report = await asyncio.to_thread(self._reconcile)
        if any(report[k] for k in ("removed", "restarted", "failed")):
            self.emit("network.reconciled", "host", _summary(report), **report)
        return report

    def _reconcile(self) -> dict[str, Any]:
        config = self.store.load()
        report: dict[str, Any] = {"adopted": [], "restarted": [], "removed": [], "failed": []}
        before = self.dnsmasq.instances()
        for switch in config.switches:
            try:
                self._realize(switch)
                self._rejoin(switch)
            except Exception as exc:  # one broken switch must not stop the others
                log.exception("switch %s", switch.name)
                report["failed"].append(f"switch {switch.name}: {exc}")
                continue
            pid = self.dnsmasq.running(switch.name)
            if pid is not None:
                key = "adopted" if before.get(switch.name) == pid else "restarted"
                report[key].append(f"dnsmasq {switch.name} (pid {pid})")
        report["removed"] += self._remove_strays(config)
        return report

    def _remove_strays(self, config: NetworkConfig) -> list[str]:
        removed: list[str] = []
        names = {s.name for s in config.switches}
        for switch in self.dnsmasq.instances():
            if switch not in names:
                self.dnsmasq.stop(switch)
                removed.append(f"dnsmasq {switch}")
        for family, table in nftables.thinvisor_tables():
            if _table_switch(table) not in names:
                nftables.remove_table(family, table)
                removed.append(f"nftables table {family} {table}")
        taps = {p.tap for p in self.nic_ports() if p.running}
        for ifb in shaping.stale_ifbs(taps):
            shaping.delete_ifb(ifb)
            removed.append(f"IFB {ifb}")
        for tap in netlink.list_taps():
            # A persistent TAP named as thinvisor names them is a leftover of an older
            # thinvisor (its TAPs now die with their QEMU); others are not ours to touch.
            ours = netlink.is_tap_name(tap)
            if ours and tap not in taps and netlink.tap_is_persistent(tap):
                netlink.delete_tap(tap)
                removed.append(f"TAP {tap}")
        return removed

    async def supervise(self) -> list[str]:
        """Restart the dnsmasq of any NAT switch whose instance died; their names."""
        restarted: list[str] = []
        for switch in self.store.switches():
            if switch.nat is None or self.dnsmasq.running(switch.name) is not None:
                continue
            async with self._lock:
                try:
                    await asyncio.to_thread(self._realize, switch)
                except Exception as exc:
                    log.warning("switch %s: cannot restart dnsmasq: %s", switch.name, exc)
                    continue
            restarted.append(switch.name)
            self.emit("network.dnsmasq_restarted", f"switch/{switch.name}", "dnsmasq restarted")
        return restarted


def _drop_ifb(tap: str) -> None:
    try:
        shaping.delete_ifb(shaping.ifb_name(tap))
    except Exception as exc:  # best effort; reconciliation at the next start catches it
        log.warning("cannot delete the IFB of %s: %s", tap, exc)


def close_fds(fds: dict[str, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)


def _port(p: NicPort) -> dict[str, Any]:
    return {"vm": p.vm, "nic": p.nic.name, "mac": p.nic.mac, "tap": p.tap if p.running else None}


def _users(ports: list[NicPort]) -> str:
    return ", ".join(sorted({f"{p.vm}/{p.nic.name}" for p in ports}))


def _table_switch(table: str) -> str:
    for prefix in ("thinvisor-vlan-", "thinvisor-nat-"):
        if table.startswith(prefix):
            return table[len(prefix) :]
    return table


def _summary(report: dict[str, Any]) -> str:
    parts = [f"{k}: {', '.join(v)}" for k, v in report.items() if v]
    return "network reconciled; " + "; ".join(parts)
