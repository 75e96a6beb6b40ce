"""libvirt's XML and numbers, read and written: pure functions of the libvirt provider.

Nothing here talks to libvirt; the constants come from libvirt-python.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from xml.sax.saxutils import escape, quoteattr

import libvirt

from thinvisor.errors import InvalidArgument, ProviderError
from thinvisor.providers.base import CreateVm, ExportedVm, PowerState, SnapshotRecord

#: Domain types a new domain may get, best first, where the host's domains show none.
VIRT_TYPE_PREFERENCE = ("kvm", "qemu", "xen")
_WILDCARDS = ("", "0.0.0.0", "::")

_UNITS = {
    "b": 1, "bytes": 1, "kb": 1000, "k": 1024, "kib": 1024, "mb": 1000**2, "m": 1024**2,
    "mib": 1024**2, "gb": 1000**3, "g": 1024**3, "gib": 1024**3, "tb": 1000**4,
    "t": 1024**4, "tib": 1024**4,
}  # fmt: skip


# --- A domain's definition ------------------------------------------------------------


def memory_mib(domain: ET.Element) -> int:
    """The domain's (maximum) memory, from ``<memory unit=...>`` (KiB by default)."""
    element = domain.find("memory")
    if element is None or not element.text:
        return 0
    return int(element.text) * _UNITS[element.get("unit", "KiB").lower()] // 1024**2


def vcpus(domain: ET.Element) -> int:
    """The domain's vCPUs now (``current`` where fewer than the maximum are plugged)."""
    element = domain.find("vcpu")
    if element is None or not element.text:
        return 1
    return int(element.get("current") or element.text)


@dataclass(frozen=True)
class Disk:
    """One ``<disk>`` of a domain: where its data is, and whether the domain writes it."""

    target: str
    device: str
    path: str | None
    pool: str | None = None
    volume: str | None = None
    writable: bool = True


def disks(domain: ET.Element) -> list[Disk]:
    """The domain's disks, CD-ROMs and floppies, with their sources."""
    found = []
    for disk in domain.findall("devices/disk"):
        source = disk.find("source")
        attrs = source.attrib if source is not None else {}
        target = disk.find("target")
        found.append(
            Disk(
                target=target.get("dev", "") if target is not None else "",
                device=disk.get("device", "disk"),
                path=attrs.get("file") or attrs.get("dev"),
                pool=attrs.get("pool"),
                volume=attrs.get("volume"),
                writable=disk.find("readonly") is None and disk.find("shareable") is None,
            )
        )
    return found


def own_disks(domain: ET.Element) -> list[Disk]:
    """The disks that belong to this domain alone: writable hard disks with a source."""
    return [d for d in disks(domain) if d.device == "disk" and d.writable and (d.path or d.volume)]


def nic_networks(domain: ET.Element) -> tuple[tuple[str, str], ...]:
    """``(type, name)`` of each NIC's network: ``("network", "default")``, ``("bridge",
    "br0")`` or ``("direct", "eth0")``, in order, each once."""
    found: list[tuple[str, str]] = []
    for nic in domain.findall("devices/interface"):
        source = nic.find("source")
        if source is None:
            continue
        kind = nic.get("type", "")
        name = source.get("network") if kind == "network" else None
        name = name or source.get("bridge") or source.get("dev")
        if name and (kind, name) not in found:
            found.append((kind, name))
    return tuple(found)


def bridges(domain: ET.Element) -> set[str]:
    """The bridges the domain's NICs join directly (not through a libvirt network)."""
    return {name for kind, name in nic_networks(domain) if kind == "bridge"}


def pool_datastores(domain: ET.Element, pool_targets: dict[str, str]) -> tuple[str, ...]:
    """The names of the pools holding the domain's disks (``pool_targets``: each pool's
    target directory to its name)."""
    names: list[str] = []
    for disk in disks(domain):
        name = disk.pool
        if name is None and disk.path:
            name = pool_targets.get(str(PurePosixPath(disk.path).parent))
        if name and name not in names:
            names.append(name)
    return tuple(names)


def pool_target(pool: ET.Element) -> str | None:
    """A storage pool's target directory, without a trailing slash."""
    path = pool.findtext("target/path")
    return (path.rstrip("/") or "/") if path else None


_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.RUNNING,  # still on, shutting down
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}


def power_state(state: int, managed_save: bool) -> PowerState:
    """thinvisor's power state for libvirt's domain state (and whether a shut off
    domain has a managed save image to resume from)."""
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return PowerState.SUSPENDED if managed_save else PowerState.STOPPED
    return _STATES.get(state, PowerState.UNKNOWN)


# --- Consoles -------------------------------------------------------------------------


def vnc_address(domain: ET.Element, uri_host: str | None) -> tuple[str, int] | None:
    """Where the running domain's VNC server listens, if on an address (an address of
    all interfaces means the host's own: ``uri_host``, loopback for a local URI)."""
    graphics = domain.find("devices/graphics[@type='vnc']")
    if graphics is None or int(graphics.get("port", "-1")) <= 0:
        return None
    listen = graphics.find("listen")
    if listen is not None and listen.get("type") in ("socket", "none"):
        return None
    address = graphics.get("listen") or (listen.get("address") if listen is not None else None)
    if address is None or address in _WILDCARDS:
        address = uri_host or "127.0.0.1"
    return address, int(graphics.get("port", "-1"))


def serial_url(domain: ET.Element, uri_host: str | None) -> str | None:
    """The URL of the domain's serial port where it is a TCP server (``telnet://`` or
    ``tcp://``)."""
    serial = domain.find("devices/serial[@type='tcp']")
    source = serial.find("source") if serial is not None else None
    if serial is None or source is None or source.get("mode", "connect") != "bind":
        return None
    protocol = serial.find("protocol")
    scheme = "telnet" if protocol is not None and protocol.get("type") == "telnet" else "tcp"
    host = source.get("host") or ""
    if host in _WILDCARDS:
        host = uri_host or "127.0.0.1"
    return f"{scheme}://{url_host(host)}:{source.get('service')}"


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


# --- New domains and clones -----------------------------------------------------------


def virt_type(capabilities: str, used: list[str]) -> tuple[str, str]:
    """The domain type and architecture for a new domain: of the types the host offers
    for full virtualization on its own architecture, the one most of its domains use
    (``used``), else the first of ``VIRT_TYPE_PREFERENCE``, else the first offered."""
    caps = ET.fromstring(capabilities)
    arch = caps.findtext("host/cpu/arch") or "x86_64"
    offered = [
        d.get("type", "")
        for guest in caps.findall("guest")
        if guest.findtext("os_type") == "hvm"
        for a in guest.findall("arch")
        if a.get("name") == arch
        for d in a.findall("domain")
    ]
    if not offered:
        raise ProviderError(f"the host offers no full virtualization for {arch}")
    for kind, _ in Counter(t for t in used if t in offered).most_common(1):
        return kind, arch
    preferred = [t for t in VIRT_TYPE_PREFERENCE if t in offered]
    return (preferred or offered)[0], arch


def new_domain_xml(
    spec: CreateVm, kind: str, arch: str, disk: str | None, nic: tuple[str, str] | None
) -> str:
    """The definition of a new domain: ACPI, a serial console, a VNC display, and the
    disk (a qcow2 file) and NIC (``(type, source)``: a network or a bridge) given."""
    devices = []
    if disk is not None:
        devices.append(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file={quoteattr(disk)}/><target dev='vda' bus='virtio'/></disk>"
        )
    if nic is not None:
        source = "network" if nic[0] == "network" else "bridge"
        devices.append(
            f"<interface type={quoteattr(nic[0])}><source {source}={quoteattr(nic[1])}/>"
            "<model type='virtio'/></interface>"
        )
    devices += ["<serial type='pty'/>", "<console type='pty'/>", "<graphics type='vnc'/>"]
    return (
        f"<domain type={quoteattr(kind)}><name>{escape(spec.name)}</name>"
        f"<memory unit='MiB'>{spec.memory_mib}</memory><vcpu>{spec.cpus}</vcpu>"
        f"<os><type arch={quoteattr(arch)}>hvm</type><boot dev='hd'/></os>"
        "<features><acpi/><apic/></features><clock offset='utc'/>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>"
        f"<on_crash>destroy</on_crash><devices>{''.join(devices)}</devices></domain>"
    )


def kernel_boot(domain: ET.Element) -> tuple[str | None, str | None, str | None]:
    """``(kernel, initrd, cmdline)`` of a domain's direct kernel boot (all None: none)."""
    kernel = domain.findtext("os/kernel") or None
    if kernel is None:
        return None, None, None
    return kernel, domain.findtext("os/initrd") or None, domain.findtext("os/cmdline") or ""


def imported_domain_xml(
    vm: ExportedVm,
    kind: str,
    arch: str,
    disks: list[str],
    boot: tuple[str | None, str | None],
) -> str:
    """The definition of a domain made from an exported VM: its qcow2 ``disks`` (files)
    on virtio (vda, vdb, ...), direct kernel boot from ``boot`` (kernel, initrd paths)
    where it has a kernel, else from the first disk; ACPI, a serial console, VNC."""
    if len(disks) > 26:
        raise InvalidArgument("disks", f"{len(disks)} disks: a domain takes at most 26 here")
    devices = [
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file={quoteattr(path)}/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/>"
        "</disk>"
        for i, path in enumerate(disks)
    ]
    devices += ["<serial type='pty'/>", "<console type='pty'/>", "<graphics type='vnc'/>"]
    kernel, initrd = boot
    loader = "<boot dev='hd'/>"
    if kernel is not None:
        loader = f"<kernel>{escape(kernel)}</kernel>"
        loader += f"<initrd>{escape(initrd)}</initrd>" if initrd else ""
        loader += f"<cmdline>{escape(vm.cmdline or '')}</cmdline>"
    return (
        f"<domain type={quoteattr(kind)}><name>{escape(vm.name)}</name>"
        f"<memory unit='MiB'>{vm.memory_mib}</memory><vcpu>{vm.cpus}</vcpu>"
        f"<os><type arch={quoteattr(arch)}>hvm</type>{loader}</os>"
        "<features><acpi/><apic/></features><clock offset='utc'/>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>"
        f"<on_crash>destroy</on_crash><devices>{''.join(devices)}</devices></domain>"
    )


def volume_xml(name: str, capacity_bytes: int, fmt: str) -> str:
    """A new storage volume of ``capacity_bytes`` in format ``fmt`` (qcow2, raw)."""
    return (
        f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{capacity_bytes}</capacity>"
        f"<target><format type={quoteattr(fmt)}/></target></volume>"
    )


def clone_xml(xml: str, name: str, sources: dict[str, str]) -> str:
    """A copy of a domain's definition under ``name``, without its UUID, MAC addresses
    and NVRAM path (libvirt makes new ones), each disk whose target is in ``sources``
    pointing at the file given there."""
    domain = ET.fromstring(xml)
    _child(domain, "name").text = name
    for element in domain.findall("uuid"):
        domain.remove(element)
    for nic in domain.iter("interface"):
        for mac in nic.findall("mac"):
            nic.remove(mac)
    for nvram in domain.findall("os/nvram"):
        nvram.text = None
    for disk in domain.findall("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev in sources:
            disk.set("type", "file")
            source = _child(disk, "source")
            source.attrib.clear()
            source.set("file", sources[dev])
    return ET.tostring(domain, encoding="unicode")


def _child(parent: ET.Element, tag: str) -> ET.Element:
    element = parent.find(tag)
    return element if element is not None else ET.SubElement(parent, tag)


def clone_volume_name(volume: str, source: str, clone: str) -> str:
    """The name of a cloned volume: the source domain's name in it replaced by the
    clone's, else the clone's name in front."""
    return volume.replace(source, clone, 1) if source in volume else f"{clone}-{volume}"


# --- Snapshots, events, versions ------------------------------------------------------


def snapshot_xml(name: str) -> str:
    """A new snapshot named ``name``, of libvirt's default kind (internal)."""
    return f"<domainsnapshot><name>{escape(name)}</name></domainsnapshot>"


def snapshot_record(xml: str, current: bool) -> SnapshotRecord:
    """A libvirt snapshot's description as a record (its id is its name)."""
    snap = ET.fromstring(xml)
    name = snap.findtext("name") or ""
    memory = snap.find("memory")
    created = snap.findtext("creationTime")
    return SnapshotRecord(
        id=name,
        name=name,
        parent=snap.findtext("parent/name"),
        current=current,
        memory=memory is not None and memory.get("snapshot", "no") != "no",
        created=datetime.fromtimestamp(int(created), UTC).isoformat() if created else None,
    )


_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


def event_name(event: int, detail: int) -> str:
    """``stopped.destroyed`` for libvirt's lifecycle event and its detail."""
    name = _EVENTS.get(event, f"event{event}")
    prefix = f"VIR_DOMAIN_EVENT_{name.upper()}_"
    details = [
        n.removeprefix(prefix).lower()
        for n in dir(libvirt)
        if n.startswith(prefix) and getattr(libvirt, n) == detail
    ]
    return f"{name}.{details[0]}" if details else name


def event_message(domain: str, name: str) -> str:
    """``domain web1 stopped (destroyed)`` for an event named ``stopped.destroyed``."""
    what, _, detail = name.partition(".")
    return f"domain {domain} {what}" + (f" ({detail.replace('_', ' ')})" if detail else "")


def version(number: int) -> str:
    """``9.0.0`` for libvirt's 9000000."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
