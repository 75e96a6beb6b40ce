"""A VM's NICs: add, remove, reconnect, move to another port group, shape.

On a running VM a NIC is hot-plugged (its TAP handed to QEMU over QMP), unplugged with
the guest's cooperation, and its virtual cable plugged or unplugged with ``set_link``.
Each action changes ``vm.toml`` only once QEMU has done its part.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from thinvisor.errors import InvalidArgument, NotFound, QemuError
from thinvisor.host.engine.argv import NIC_DEVICES, pci_placement
from thinvisor.host.engine.qmp import Monitor
from thinvisor.host.inventory import VmEntry, save_spec
from thinvisor.host.state import Action, PowerState
from thinvisor.model.create import NewNicSpec, NicUpdate
from thinvisor.model.vm import USER_NETWORK, NicSpec, VmSpec, validate
from thinvisor.network.netlink import link_exists, tap_name

if TYPE_CHECKING:
    from thinvisor.host.service import HostService

_HOTPLUG_MODELS = ("virtio",)  # PCIe hot-plug on q35's root ports: virtio-net only


def nic_of(vm: str, spec: VmSpec, nic_name: str) -> NicSpec:
    nic = next((n for n in spec.nics if n.name == nic_name), None)
    if nic is None:
        raise NotFound(f"vm {vm!r} has no NIC {nic_name!r}")
    return nic


def nic_info(service: HostService, spec: VmSpec, nic: NicSpec, running: bool) -> dict[str, Any]:
    """A NIC as callers see it: its settings, its TAP while running, its DHCP address."""
    tap = tap_name(spec.uuid, nic.name) if nic.network != USER_NETWORK else None
    return {
        **nic.model_dump(mode="json"),
        "tap": tap if running and tap and link_exists(tap) else None,
        "ip": service.network.lease_of(nic.mac) if nic.network != USER_NETWORK else None,
    }


async def list_nics(service: HostService, name: str) -> list[dict[str, Any]]:
    entry, spec = service.inventory.get_valid(name)
    state, _, _ = await service.state_of(entry)
    running = state in (PowerState.RUNNING, PowerState.PAUSED)
    # Netlink (is the TAP there?) is blocking: off the event loop.
    return await asyncio.to_thread(
        lambda: [nic_info(service, spec, nic, running) for nic in spec.nics]
    )


async def add_nic(service: HostService, name: str, new: NewNicSpec) -> NicSpec:
    """Add a NIC (a new MAC unless given); hot-plugged when the VM runs."""
    async with service.inventory.lock(name):
        entry, spec, state = await service._locked_state(name, Action.ADD_NIC)
        running = state is PowerState.RUNNING
        if running and new.model not in _HOTPLUG_MODELS:
            raise InvalidArgument("model", "only virtio NICs can be added to a running VM")
        if running and new.network == USER_NETWORK:
            raise InvalidArgument("network", "user networking cannot be hot-plugged")
        if new.network != USER_NETWORK:
            service.network.lookup(new.network)
        data = {
            "name": spec.next_device_name("net"),
            "mac": new.mac or service.new_mac(),
            **new.model_dump(exclude={"mac"}),
        }
        nic = validate(NicSpec, data)
        updated = validate(VmSpec, {**spec.model_dump(), "nics": [*spec.model_dump()["nics"], nic]})
        service._with_macs(updated.model_copy(update={"nics": [nic]}))
        updated = updated.with_pci_slots()
        nic = updated.nics[-1]
        if running:
            await _hotplug(service, entry, updated, nic)
        save_spec(entry.paths, updated)
        service.emit("vm.nic_added", name, f"NIC {nic.name} added on {nic.network}", nic=nic.name)
    return nic


async def _hotplug(service: HostService, entry: VmEntry, spec: VmSpec, nic: NicSpec) -> None:
    assert nic.slot is not None
    fd = await service.network.open_nic(spec, nic)
    netdev = f"{nic.name}-net"
    device = {
        "driver": NIC_DEVICES[nic.model],
        "id": nic.name,
        "netdev": netdev,
        "mac": nic.mac,
        **pci_placement(spec.machine, nic.slot),
    }
    try:
        async with Monitor(entry.name, entry.paths.qmp_socket) as mon:
            await mon.netdev_add_tap_fd(netdev, fd)
            try:
                await mon.device_add(device)
                if not nic.connected:
                    await mon.set_link(nic.name, up=False)
            except QemuError:
                await mon.netdev_del(netdev)
                raise
    except BaseException:
        await service.network.nic_gone(spec, nic)
        raise
    finally:
        os.close(fd)  # QEMU holds its own copy now (or none, after a failure)


async def remove_nic(service: HostService, name: str, nic_name: str) -> None:
    """Remove a NIC; on a running VM the guest is asked to release the device first."""
    async with service.inventory.lock(name):
        entry, spec, state = await service._locked_state(name, Action.REMOVE_NIC)
        nic = nic_of(name, spec, nic_name)
        if state is PowerState.RUNNING:
            if nic.model not in _HOTPLUG_MODELS or nic.network == USER_NETWORK:
                raise InvalidArgument("nic", f"{nic.name} cannot be removed while the VM runs")
            async with Monitor(name, entry.paths.qmp_socket) as mon:
                await mon.device_del(nic.name)
                await mon.netdev_del(f"{nic.name}-net")
            await service.network.nic_gone(spec, nic)
        updated = spec.model_copy(update={"nics": [n for n in spec.nics if n is not nic]})
        save_spec(entry.paths, updated)
        service.emit("vm.nic_removed", name, f"NIC {nic.name} removed", nic=nic.name)


async def update_nic(service: HostService, name: str, nic_name: str, change: NicUpdate) -> NicSpec:
    """Plug or unplug the cable, move to another port group, change shaping; at once on a
    running VM."""
    async with service.inventory.lock(name):
        entry, spec, state = await service._locked_state(name, Action.CHANGE_NIC)
        nic = nic_of(name, spec, nic_name)
        fields = change.model_dump(include=change.model_fields_set)
        updated_nic = validate(NicSpec, {**nic.model_dump(), **fields})
        live = state in (PowerState.RUNNING, PowerState.PAUSED)
        if updated_nic.network != nic.network:
            if USER_NETWORK in (updated_nic.network, nic.network) and live:
                raise InvalidArgument(
                    "network", "cannot move to or from user networking while running"
                )
            if updated_nic.network != USER_NETWORK:
                service.network.lookup(updated_nic.network)
        moved = (updated_nic.network, updated_nic.shaping) != (nic.network, nic.shaping)
        if live and nic.network != USER_NETWORK and moved:
            await service.network.rewire_nic(spec, updated_nic)
        if live and updated_nic.connected != nic.connected:
            async with Monitor(name, entry.paths.qmp_socket) as mon:
                await mon.set_link(nic.name, up=updated_nic.connected)
        nics = [updated_nic if n is nic else n for n in spec.nics]
        save_spec(entry.paths, spec.model_copy(update={"nics": nics}))
        changed = ", ".join(sorted(change.model_fields_set)) or "nothing"
        service.emit("vm.nic_changed", name, f"NIC {nic.name}: {changed} changed", nic=nic.name)
    return updated_nic
