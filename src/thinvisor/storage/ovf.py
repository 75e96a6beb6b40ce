"""OVF packages: descriptors, manifests and OVA archives, written and read.

Pure OVF code over plain dataclasses: no VMs, no QEMU. ``OvfSystem`` is one virtual
system as a descriptor describes it, in thinvisor's device words (buses ``virtio``,
``scsi``, ``ide``; NIC models ``virtio``, ``e1000``, ``rtl8139``).

Descriptors are written in the OVF 1.x envelope namespace, which VMware and VirtualBox
both read, and parsed from OVF 1.x and 2.0. What thinvisor needs beyond OVF (machine
type, direct kernel boot, the exact bus of every disk) goes into a section of its own,
marked ``ovf:required="false"`` so that other products may ignore it.

Packages come from outside: descriptors are parsed with defusedxml, OVA members are
checked before anything is read, and every problem with the input is an
``InvalidArgument`` on ``"ovf"`` (the descriptor) or on the package (``"ova"``, or
``"ovf"`` for a directory) with a one-line reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import defusedxml  # type: ignore[import-untyped]
import defusedxml.ElementTree  # type: ignore[import-untyped]

from thinvisor.errors import AlreadyExists, InvalidArgument
from thinvisor.fs import fsync_dir

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
OVF2_NS = "http://schemas.dmtf.org/ovf/envelope/2"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
TV_NS = "urn:thinvisor:ovf:1"
VMDK_STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
VIRTUAL_SYSTEM_TYPE = "vmx-07"  # hardware version 7: what every VMware product since 2008 runs
# Hidden temporary names (an OVA being written) start so; crash leftovers are swept.
PARTIAL_PREFIX = ".export-"

DESCRIPTOR_MAX = 16 << 20
MANIFEST_MAX = 1 << 20
_CHUNK = 1 << 20
_USTAR_SIZE_MAX = (8 << 30) - 1  # 11 octal digits

for _prefix, _uri in (("ovf", OVF_NS), ("rasd", RASD_NS), ("vssd", VSSD_NS), ("tv", TV_NS)):
    ET.register_namespace(_prefix, _uri)

# CIM_ResourceAllocationSettingData.ResourceType values.
RT_CPU = 3
RT_MEMORY = 4
RT_IDE = 5
RT_SCSI = 6
RT_NIC = 10
RT_CDROM = 15
RT_DVD = 16
RT_DISK = 17
RT_OTHER_STORAGE = 20  # SATA (AHCI), NVMe and others, told apart by ResourceSubType

_NIC_SUBTYPES = {"virtio": "VirtioNet", "e1000": "E1000", "rtl8139": "RTL8139"}
_SCSI_UNITS = [u for u in range(16) if u != 7]  # unit 7 is the controller's own
_IDE_UNITS = [0, 1]


class Interrupted(Exception):
    """A blocking OVA read or write was asked to stop (its task was cancelled)."""


# The package's parts


@dataclass(frozen=True)
class OvfFile:
    """A file of the package (``References/File``); ``href`` is its name in the package."""

    id: str
    href: str
    size: int | None = None


@dataclass(frozen=True)
class OvfDisk:
    """A virtual disk: the file holding it, its size, the bus it sits on."""

    id: str  # ovf:diskId
    name: str
    file: OvfFile
    capacity: int  # bytes
    bus: str = "virtio"
    populated_size: int | None = None
    format: str = VMDK_STREAM_OPTIMIZED


@dataclass(frozen=True)
class OvfNic:
    name: str
    model: str = "virtio"
    network: str = "user"
    mac: str | None = None
    connected: bool = True


@dataclass(frozen=True)
class OvfKernel:
    """Direct kernel boot, from thinvisor's section: the files and the command line."""

    kernel: OvfFile
    initrd: OvfFile | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class OvfSystem:
    """One virtual system (a VM) of an OVF package."""

    name: str
    vcpus: int = 1
    memory_mib: int = 256
    disks: tuple[OvfDisk, ...] = ()
    nics: tuple[OvfNic, ...] = ()
    cdrom_bus: str | None = None  # None: no CD-ROM drive
    # Set from thinvisor's own section; other producers leave them unset.
    thinvisor: bool = False
    machine: str | None = None
    kernel: OvfKernel | None = None
    boot_order: tuple[str, ...] = ()
    # "efi" when the producer says the guest needs UEFI firmware (VMware's firmware key).
    firmware: str | None = None

    def files(self) -> list[OvfFile]:
        """The package files this system uses: disks, then kernel and initrd."""
        files = [d.file for d in self.disks]
        if self.kernel is not None:
            files.append(self.kernel.kernel)
            if self.kernel.initrd is not None:
                files.append(self.kernel.initrd)
        return files


# Mapping OVF's device vocabulary to thinvisor's


def controller_bus(resource_type: int, subtype: str) -> str:
    """The thinvisor bus for disks on a controller: SCSI -> ``scsi``, IDE and SATA ->
    ``ide``, virtio -> ``virtio``. What cannot be identified (NVMe, ...) gets ``ide``,
    for which every guest has a driver."""
    sub = subtype.lower()
    if "virtio" in sub:
        return "scsi" if "scsi" in sub else "virtio"
    if resource_type == RT_SCSI:
        return "scsi"
    return "ide"


def nic_model(subtype: str) -> str:
    """The thinvisor NIC model for a ResourceSubType: virtio and E1000 (e1000e too) map
    to themselves, RTL8139 too; what thinvisor lacks (PCNet32, VmxNet3, ...) becomes
    ``e1000``, for which every guest has a driver."""
    sub = subtype.lower().replace("-", "").replace("_", "")
    if "virtio" in sub:
        return "virtio"
    if "rtl8139" in sub:
        return "rtl8139"
    return "e1000"


# Building a descriptor


def _q(ns: str, name: str) -> str:
    return f"{{{ns}}}{name}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    el.text = text
    return el


def build_descriptor(system: OvfSystem) -> bytes:
    """The OVF 1.x descriptor of ``system`` (UTF-8 XML)."""
    # OVF elements go unprefixed under a default namespace, as VMware and VirtualBox
    # write them: ElementTree cannot give a default namespace to the qualified ovf:
    # attributes as well, so the declaration is set by hand on the root.
    root = ET.Element("Envelope", {"xmlns": OVF_NS, _q(OVF_NS, "version"): "1.0"})
    references = _sub(root, "References")
    for f in system.files():
        attrib = {_q(OVF_NS, "href"): f.href, _q(OVF_NS, "id"): f.id}
        if f.size is not None:
            attrib[_q(OVF_NS, "size")] = str(f.size)
        _sub(references, "File", **attrib)
    if system.disks:
        _disk_section(root, system.disks)
    if system.nics:
        _network_section(root, system.nics)
    vs = _sub(root, "VirtualSystem", **{_q(OVF_NS, "id"): system.name})
    _sub(vs, "Info", "A virtual machine")
    _sub(vs, "Name", system.name)
    os_section = _sub(vs, "OperatingSystemSection", **{_q(OVF_NS, "id"): "1"})
    _sub(os_section, "Info", "The kind of installed guest operating system")
    _sub(os_section, "Description", "Other")
    _hardware_section(vs, system)
    _thinvisor_section(vs, system)
    ET.indent(root)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True)) + b"\n"


def _disk_section(root: ET.Element, disks: Iterable[OvfDisk]) -> None:
    section = _sub(root, "DiskSection")
    _sub(section, "Info", "Virtual disk information")
    for d in disks:
        attrib = {
            _q(OVF_NS, "capacity"): str(d.capacity),
            _q(OVF_NS, "diskId"): d.id,
            _q(OVF_NS, "fileRef"): d.file.id,
            _q(OVF_NS, "format"): d.format,
        }
        if d.populated_size is not None:
            attrib[_q(OVF_NS, "populatedSize")] = str(d.populated_size)
        _sub(section, "Disk", **attrib)


def _network_section(root: ET.Element, nics: Iterable[OvfNic]) -> None:
    section = _sub(root, "NetworkSection")
    _sub(section, "Info", "The list of logical networks")
    for network in dict.fromkeys(n.network for n in nics):
        net = _sub(section, "Network", **{_q(OVF_NS, "name"): network})
        _sub(net, "Description", f"The {network} network")


class _Hardware:
    """Writes the items of a VirtualHardwareSection, adding controllers as devices need
    them (SCSI: 15 units each; IDE: 2)."""

    def __init__(self, section: ET.Element):
        self.section = section
        self.next_id = 1
        self.slots: dict[str, list[tuple[str, int]]] = {"scsi": [], "ide": []}
        self.controllers = {"scsi": 0, "ide": 0}

    def item(self, fields: Mapping[str, str | int]) -> str:
        instance = str(self.next_id)
        self.next_id += 1
        item = _sub(self.section, "Item")
        # The RASD schema orders its elements alphabetically; VMware validates that.
        for key, value in sorted({**fields, "InstanceID": instance}.items()):
            _sub(item, _q(RASD_NS, key), str(value))
        return instance

    def slot(self, family: str) -> tuple[str, int]:
        """(controller InstanceID, address) for the next device on a ``family`` bus."""
        if not self.slots[family]:
            n = self.controllers[family]
            self.controllers[family] += 1
            kind = {"scsi": ("SCSI", RT_SCSI, "lsilogic"), "ide": ("IDE", RT_IDE, "PIIX4")}
            label, rtype, subtype = kind[family]
            controller = self.item(
                {
                    "Address": n,
                    "Description": f"{label} Controller",
                    "ElementName": f"{label} controller {n}",
                    "ResourceSubType": subtype,
                    "ResourceType": rtype,
                }
            )
            units = _SCSI_UNITS if family == "scsi" else _IDE_UNITS
            self.slots[family] = [(controller, u) for u in units]
        return self.slots[family].pop(0)


def _family(bus: str) -> str:
    """The OVF controller a thinvisor bus is written as: IDE stays IDE, the rest SCSI."""
    return "ide" if bus == "ide" else "scsi"


def _hardware_section(vs: ET.Element, system: OvfSystem) -> None:
    section = _sub(vs, "VirtualHardwareSection")
    _sub(section, "Info", "Virtual hardware requirements")
    sys_el = _sub(section, "System")
    _sub(sys_el, _q(VSSD_NS, "ElementName"), "Virtual Hardware Family")
    _sub(sys_el, _q(VSSD_NS, "InstanceID"), "0")
    _sub(sys_el, _q(VSSD_NS, "VirtualSystemIdentifier"), system.name)
    _sub(sys_el, _q(VSSD_NS, "VirtualSystemType"), VIRTUAL_SYSTEM_TYPE)
    hw = _Hardware(section)
    hw.item(
        {
            "AllocationUnits": "hertz * 10^6",
            "Description": "Number of virtual CPUs",
            "ElementName": f"{system.vcpus} virtual CPU(s)",
            "ResourceType": RT_CPU,
            "VirtualQuantity": system.vcpus,
        }
    )
    hw.item(
        {
            "AllocationUnits": "byte * 2^20",
            "Description": "Memory Size",
            "ElementName": f"{system.memory_mib}MB of memory",
            "ResourceType": RT_MEMORY,
            "VirtualQuantity": system.memory_mib,
        }
    )
    for disk in system.disks:
        parent, unit = hw.slot(_family(disk.bus))
        hw.item(
            {
                "AddressOnParent": unit,
                "ElementName": disk.name,
                "HostResource": f"ovf:/disk/{disk.id}",
                "Parent": parent,
                "ResourceType": RT_DISK,
            }
        )
    if system.cdrom_bus is not None:
        parent, unit = hw.slot(_family(system.cdrom_bus))
        cdrom: dict[str, str | int] = {"AddressOnParent": unit, "Parent": parent}
        hw.item(
            {
                **cdrom,
                "AutomaticAllocation": "false",
                "ElementName": "CD-ROM 1",
                "ResourceType": RT_CDROM,
            }
        )
    for nic in system.nics:
        fields: dict[str, str | int] = {
            "AutomaticAllocation": "true" if nic.connected else "false",
            "Connection": nic.network,
            "ElementName": nic.name,
            "ResourceSubType": _NIC_SUBTYPES.get(nic.model, nic.model),
            "ResourceType": RT_NIC,
        }
        hw.item({**fields, "Address": nic.mac} if nic.mac else fields)


def _thinvisor_section(vs: ET.Element, system: OvfSystem) -> None:
    section = _sub(vs, _q(TV_NS, "Thinvisor"), **{_q(OVF_NS, "required"): "false"})
    _sub(section, "Info", "thinvisor settings: machine type, boot, the bus of each device")
    if system.machine is not None:
        _sub(section, _q(TV_NS, "Machine"), system.machine)
    if system.kernel is not None:
        k = system.kernel
        files = {"kernel": k.kernel.id, **({"initrd": k.initrd.id} if k.initrd else {})}
        boot = _sub(section, _q(TV_NS, "KernelBoot"), **files)
        _sub(boot, _q(TV_NS, "CommandLine"), k.cmdline)
    elif system.boot_order:
        _sub(section, _q(TV_NS, "FirmwareBoot"), order=" ".join(system.boot_order))
    for disk in system.disks:
        _sub(section, _q(TV_NS, "Disk"), diskId=disk.id, bus=disk.bus)
    if system.cdrom_bus is not None:
        _sub(section, _q(TV_NS, "CdromDrive"), bus=system.cdrom_bus)


# Parsing a descriptor


def _bad(reason: str) -> InvalidArgument:
    return InvalidArgument("ovf", reason)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class _Envelope:
    """A parsed descriptor and its OVF namespace (1.x or 2.0)."""

    def __init__(self, root: ET.Element):
        if _local(root.tag) != "Envelope":
            raise _bad(f"the root element is {_local(root.tag)}, not an OVF Envelope")
        ns = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
        if ns not in (OVF_NS, OVF2_NS):
            raise _bad(f"unknown envelope namespace {ns!r}; OVF 1.x and 2.0 are read")
        self.root = root
        self.ns = ns

    def tag(self, name: str) -> str:
        return _q(self.ns, name)

    def attr(self, el: ET.Element, name: str) -> str | None:
        """An ovf: attribute (some producers leave attributes unqualified)."""
        value = el.get(_q(self.ns, name))
        return value if value is not None else el.get(name)

    def required(self, el: ET.Element, name: str, what: str) -> str:
        value = self.attr(el, name)
        if not value:
            raise _bad(f"{what} has no ovf:{name}")
        return value


def _parse_xml(data: bytes) -> ET.Element:
    try:
        root: ET.Element = defusedxml.ElementTree.fromstring(
            data, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except defusedxml.DefusedXmlException as exc:
        raise _bad(f"refused XML: {exc}") from exc
    except (ET.ParseError, ValueError) as exc:
        raise _bad(f"malformed XML: {exc}") from exc
    return root


def parse_descriptor(data: bytes) -> OvfSystem:
    """The one virtual system an OVF descriptor describes; ``InvalidArgument("ovf", ...)``
    when the XML is malformed or holds something thinvisor cannot map."""
    env = _Envelope(_parse_xml(data))
    files = _references(env)
    disks = _disk_section_of(env, files)
    systems = list(env.root.iter(env.tag("VirtualSystem")))
    if not systems:
        raise _bad("the descriptor has no VirtualSystem")
    if len(systems) > 1:
        raise _bad(f"the descriptor holds {len(systems)} virtual systems; import one VM at a time")
    vs = systems[0]
    name_el = vs.find(env.tag("Name"))
    name = (name_el.text or "").strip() if name_el is not None else ""
    name = name or env.required(vs, "id", "the VirtualSystem")
    hardware = vs.find(env.tag("VirtualHardwareSection"))
    if hardware is None:
        raise _bad(f"VirtualSystem {name!r} has no VirtualHardwareSection")
    system = _Items(env, disks).read(hardware, name)
    system = dataclasses.replace(system, firmware=_firmware(vs, hardware))
    section = vs.find(_q(TV_NS, "Thinvisor"))
    return system if section is None else _with_thinvisor(system, section, files)


def _references(env: _Envelope) -> dict[str, OvfFile]:
    files: dict[str, OvfFile] = {}
    refs = env.root.find(env.tag("References"))
    for el in refs.findall(env.tag("File")) if refs is not None else []:
        file_id = env.required(el, "id", "a References/File")
        href = env.required(el, "href", f"file {file_id}")
        check_member_name(href, "ovf")
        if (env.attr(el, "compression") or "identity") != "identity":
            raise _bad(f"file {href} is compressed (ovf:compression); it is not supported")
        if env.attr(el, "chunkSize"):
            raise _bad(f"file {href} is split into chunks (ovf:chunkSize); it is not supported")
        size = env.attr(el, "size")
        size_bytes = _integer(size, f"file {href} size") if size else None
        files[file_id] = OvfFile(file_id, href, size_bytes)
    return files


@dataclass(frozen=True)
class _DiskEntry:
    file: OvfFile
    capacity: int
    populated_size: int | None
    format: str


def _disk_section_of(env: _Envelope, files: Mapping[str, OvfFile]) -> dict[str, _DiskEntry]:
    disks: dict[str, _DiskEntry] = {}
    section = env.root.find(env.tag("DiskSection"))
    for el in section.findall(env.tag("Disk")) if section is not None else []:
        disk_id = env.required(el, "diskId", "a DiskSection/Disk")
        ref = env.attr(el, "fileRef")
        if not ref:
            raise _bad(f"disk {disk_id} has no file (ovf:fileRef); empty disks are not imported")
        if ref not in files:
            raise _bad(f"disk {disk_id} refers to file {ref!r}, which References does not list")
        units = env.attr(el, "capacityAllocationUnits") or "byte"
        capacity = _integer(env.required(el, "capacity", f"disk {disk_id}"), f"disk {disk_id}")
        populated = env.attr(el, "populatedSize")
        disks[disk_id] = _DiskEntry(
            files[ref],
            capacity * _unit_bytes(units, f"disk {disk_id}"),
            _integer(populated, f"disk {disk_id} populatedSize") if populated else None,
            env.attr(el, "format") or "",
        )
    return disks


_UNIT_RE = re.compile(r"^byte\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?$", re.IGNORECASE)
_UNIT_NAMES = {
    "bytes": 1,
    "kilobytes": 1 << 10,
    "kb": 1 << 10,
    "megabytes": 1 << 20,
    "mb": 1 << 20,
    "gigabytes": 1 << 30,
    "gb": 1 << 30,
    "terabytes": 1 << 40,
    "tb": 1 << 40,
}


def _unit_bytes(units: str, what: str) -> int:
    """Bytes per unit of ``byte * 2^20``-style programmatic units (or MegaBytes, GB...)."""
    text = units.strip()
    m = _UNIT_RE.match(text)
    if m:
        return int(m.group(1)) ** int(m.group(2)) if m.group(1) else 1
    if text.lower() in _UNIT_NAMES:
        return _UNIT_NAMES[text.lower()]
    raise _bad(f"{what}: unknown allocation units {units!r}")


def _integer(text: str, what: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise _bad(f"{what}: {text!r} is not a whole number") from None
    if value < 0:
        raise _bad(f"{what}: must not be negative")
    return value


class _Items:
    """Reads the items of a VirtualHardwareSection (OVF 1.x ``Item``; OVF 2.0 also
    ``StorageItem`` and ``EthernetPortItem``), by the local names of their fields."""

    ITEM_TAGS = ("Item", "StorageItem", "EthernetPortItem")

    def __init__(self, env: _Envelope, disks: Mapping[str, _DiskEntry]):
        self.env = env
        self.disks = disks
        self.configuration = _default_configuration(env)

    def fields(self, hardware: ET.Element) -> list[dict[str, str]]:
        found = []
        for el in hardware:
            if _local(el.tag) not in self.ITEM_TAGS or not self._applies(el):
                continue
            found.append({_local(c.tag): (c.text or "").strip() for c in el})
        return found

    def _applies(self, el: ET.Element) -> bool:
        # Bounds (min/max) are not values; items of another deployment option do not apply.
        if (self.env.attr(el, "bound") or "normal") != "normal":
            return False
        configs = (self.env.attr(el, "configuration") or "").split()
        return not configs or self.configuration in configs

    def read(self, hardware: ET.Element, name: str) -> OvfSystem:
        items = self.fields(hardware)
        buses = {
            i.get("InstanceID", ""): controller_bus(_rtype(i), i.get("ResourceSubType", ""))
            for i in items
            if _rtype(i) in (RT_IDE, RT_SCSI, RT_OTHER_STORAGE)
        }
        vcpus, memory_mib, cdrom = 1, 256, None
        disks: list[OvfDisk] = []
        nics: list[OvfNic] = []
        for item in items:
            rtype = _rtype(item)
            if rtype == RT_CPU:
                vcpus = _integer(item.get("VirtualQuantity", ""), "the CPU item")
            elif rtype == RT_MEMORY:
                memory_mib = _memory_mib(item)
            elif rtype == RT_DISK:
                disks.append(self._disk(item, buses.get(item.get("Parent", ""), "ide"), disks))
            elif rtype in (RT_CDROM, RT_DVD) and cdrom is None:
                cdrom = buses.get(item.get("Parent", ""), "ide")
            elif rtype == RT_NIC:
                nics.append(_nic(item))
        return OvfSystem(
            name=name,
            vcpus=vcpus,
            memory_mib=memory_mib,
            disks=tuple(disks),
            nics=tuple(nics),
            cdrom_bus=cdrom,
        )

    def _disk(self, item: Mapping[str, str], bus: str, seen: list[OvfDisk]) -> OvfDisk:
        label = item.get("ElementName") or f"disk item {item.get('InstanceID', '?')}"
        resource = item.get("HostResource", "")
        m = re.match(r"^(?:ovf:)?/disk/(.+)$", resource)
        if not m:
            raise _bad(f"{label}: HostResource {resource!r} does not name a disk (ovf:/disk/id)")
        entry = self.disks.get(m.group(1))
        if entry is None:
            raise _bad(f"{label} refers to disk {m.group(1)!r}, which DiskSection does not list")
        if any(d.id == m.group(1) for d in seen):
            raise _bad(f"disk {m.group(1)} is attached twice")
        return OvfDisk(
            id=m.group(1),
            name=label,
            file=entry.file,
            capacity=entry.capacity,
            bus=bus,
            populated_size=entry.populated_size,
            format=entry.format,
        )


def _rtype(item: Mapping[str, str]) -> int:
    try:
        return int(item.get("ResourceType", ""))
    except ValueError:
        return 0


def _memory_mib(item: Mapping[str, str]) -> int:
    quantity = _integer(item.get("VirtualQuantity", ""), "the memory item")
    unit = _unit_bytes(item.get("AllocationUnits") or "byte * 2^20", "the memory item")
    return -(-quantity * unit // (1 << 20))  # whole MiB, rounded up


_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")


def _nic(item: Mapping[str, str]) -> OvfNic:
    address = item.get("Address", "").lower()
    mac = None
    if _MAC_RE.match(address):
        digits = re.sub("[:-]", "", address)
        mac = ":".join(digits[i : i + 2] for i in range(0, 12, 2))
    return OvfNic(
        name=item.get("ElementName", ""),
        model=nic_model(item.get("ResourceSubType", "")),
        network=item.get("Connection", ""),
        mac=mac,
        connected=item.get("AutomaticAllocation", "true").lower() != "false",
    )


def _default_configuration(env: _Envelope) -> str | None:
    section = env.root.find(env.tag("DeploymentOptionSection"))
    if section is None:
        return None
    configs = section.findall(env.tag("Configuration"))
    chosen = [c for c in configs if (env.attr(c, "default") or "").lower() == "true"]
    return env.attr((chosen or configs)[0], "id") if configs else None


def _firmware(vs: ET.Element, hardware: ET.Element) -> str | None:
    """The firmware the guest needs, "efi" or "bios", where the producer says: VMware in a
    ``vmw:Config`` key, VirtualBox in its machine section's ``Firmware`` element."""
    found = None
    for el in hardware:
        attrs = {_local(k): v for k, v in el.attrib.items()}
        if _local(el.tag) == "Config" and attrs.get("key") == "firmware":
            found = attrs.get("value")
    for el in vs.iter():
        if _local(el.tag) == "Firmware" and el.get("type"):
            found = el.get("type")
    if not found:
        return None
    return "efi" if found.lower().startswith("efi") else found.lower()


def _with_thinvisor(
    system: OvfSystem, section: ET.Element, files: Mapping[str, OvfFile]
) -> OvfSystem:
    """``system`` with what thinvisor's own section restores."""

    def file(file_id: str | None, what: str) -> OvfFile:
        if not file_id or file_id not in files:
            raise _bad(f"the thinvisor section's {what} refers to a file References lacks")
        return files[file_id]

    machine = section.findtext(_q(TV_NS, "Machine"))
    kernel = None
    boot = section.find(_q(TV_NS, "KernelBoot"))
    if boot is not None:
        initrd = boot.get("initrd")
        kernel = OvfKernel(
            kernel=file(boot.get("kernel"), "kernel"),
            initrd=file(initrd, "initrd") if initrd else None,
            cmdline=boot.findtext(_q(TV_NS, "CommandLine")) or "",
        )
    firmware = section.find(_q(TV_NS, "FirmwareBoot"))
    order = tuple((firmware.get("order") or "").split()) if firmware is not None else ()
    buses = {d.get("diskId"): d.get("bus") for d in section.findall(_q(TV_NS, "Disk"))}
    disks = tuple(dataclasses.replace(d, bus=buses.get(d.id) or d.bus) for d in system.disks)
    cdrom_bus = system.cdrom_bus
    cdrom = section.find(_q(TV_NS, "CdromDrive"))
    if cdrom is not None and cdrom_bus is not None:
        cdrom_bus = cdrom.get("bus") or cdrom_bus
    return dataclasses.replace(
        system,
        thinvisor=True,
        machine=machine.strip() if machine else None,
        kernel=kernel,
        boot_order=order,
        disks=disks,
        cdrom_bus=cdrom_bus,
    )


# Manifests


@dataclass(frozen=True)
class Digest:
    algorithm: str  # "SHA1", "SHA256" or "SHA512"
    hex: str


_MF_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)$")
_HEX_LENGTH = {"SHA1": 40, "SHA256": 64, "SHA512": 128}


def manifest_text(digests: Mapping[str, str]) -> bytes:
    """A manifest of SHA-256 digests (file name -> hex), one ``SHA256(name)= hex`` line each."""
    return "".join(f"SHA256({name})= {hex_}\n" for name, hex_ in digests.items()).encode()


def parse_manifest(data: bytes, field: str) -> dict[str, Digest]:
    """File name -> digest, from VMware's ``SHA256(name)= hex`` or VirtualBox's
    ``SHA1 (name) = hex`` lines."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(field, "the manifest is not UTF-8 text") from None
    found: dict[str, Digest] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MF_LINE.match(line.strip())
        if not m or len(m.group(3)) != _HEX_LENGTH[m.group(1)]:
            raise InvalidArgument(field, f"manifest line {number} is not 'SHA256(name)= digest'")
        name = m.group(2).strip()
        if name in found:
            raise InvalidArgument(field, f"the manifest lists {name} twice")
        found[name] = Digest(m.group(1), m.group(3).lower())
    return found


def new_hash(algorithm: str) -> Any:
    return hashlib.new(algorithm.lower())


def check_digest(manifest: Mapping[str, Digest], name: str, actual: str, field: str) -> None:
    """Raise ``InvalidArgument`` unless ``actual`` (hex) is the manifest's digest of ``name``."""
    if manifest[name].hex != actual.lower():
        raise InvalidArgument(
            field, f"checksum mismatch for {name}: its {manifest[name].algorithm} differs"
        )


def file_digest(path: Path, algorithm: str, stop: threading.Event | None = None) -> str:
    """The hex digest of a file, read in chunks (blocking)."""
    h = new_hash(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            _check_stop(stop)
            h.update(chunk)
    return str(h.hexdigest())


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Interrupted("stopped")


# Packages: an OVA, or a directory holding an .ovf


OnBytes = Callable[[int], None]


def check_member_name(name: str, field: str, what: str = "file") -> str:
    """``name`` if it is a plain file name (no directory, not absolute, no '..')."""
    if name.startswith(("/", "\\")):
        raise InvalidArgument(field, f"{what} {name!r} is an absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise InvalidArgument(field, f"{what} {name!r} leads out of the package ('..')")
    if not name or name == "." or any(c in name for c in "/\\\0"):
        raise InvalidArgument(field, f"{what} {name!r} is not a plain file name")
    return name


def open_package(path: Path) -> Package:
    """An ``.ova`` file, an ``.ovf`` file (its directory holds the rest), or a directory
    holding exactly one ``.ovf``."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".ovf" and p.is_file())
        if len(found) != 1:
            what = "no .ovf file" if not found else f"{len(found)} .ovf files"
            raise InvalidArgument("ovf", f"{path} holds {what}; exactly one is imported")
        return DirectoryPackage(found[0])
    if not path.is_file():
        raise InvalidArgument("source", f"{path} does not exist")
    if path.suffix.lower() == ".ova":
        return OvaPackage(path)
    if path.suffix.lower() == ".ovf":
        return DirectoryPackage(path)
    raise InvalidArgument("source", f"{path.name} is not an .ova or .ovf file or a directory")


def _manifest_name(descriptor_name: str) -> str:
    return descriptor_name[: -len(".ovf")] + ".mf"


def _check_listed(manifest: Mapping[str, Digest] | None, names: Iterable[str], field: str) -> None:
    for name in names:
        if manifest is not None and name not in manifest:
            raise InvalidArgument(field, f"the manifest does not list {name}")


_KINDS = (
    (tarfile.TarInfo.issym, "a symbolic link"),
    (tarfile.TarInfo.islnk, "a hard link"),
    (tarfile.TarInfo.isdir, "a directory"),
    (tarfile.TarInfo.ischr, "a character device"),
    (tarfile.TarInfo.isblk, "a block device"),
    (tarfile.TarInfo.isfifo, "a FIFO"),
)


def _member_name(info: tarfile.TarInfo) -> str:
    """The checked name of an OVA member: a regular file with a plain name."""
    name = check_member_name(info.name.removeprefix("./"), "ova", "member")
    if not info.isreg():
        kind = next((k for test, k in _KINDS if test(info)), "not a regular file")
        raise InvalidArgument("ova", f"member {info.name!r} is {kind}; an OVA holds files only")
    return name


class OvaPackage:
    """An OVA opened for reading. Opening checks every member (plain files with plain
    names, the descriptor first) before anything is read."""

    field = "ova"

    def __init__(self, path: Path):
        self.path = path
        try:
            self._tar = tarfile.open(path, "r:")  # noqa: SIM115 (closed by close())
        except (tarfile.TarError, OSError) as exc:
            raise InvalidArgument("ova", f"{path.name} is not a tar archive: {exc}") from exc
        try:
            self.members = self._checked_members()
        except BaseException:
            self._tar.close()
            raise
        self.descriptor_name = next(iter(self.members))

    def _checked_members(self) -> dict[str, tarfile.TarInfo]:
        try:
            infos = self._tar.getmembers()
        except tarfile.TarError as exc:
            raise InvalidArgument("ova", f"{self.path.name} is damaged: {exc}") from exc
        members: dict[str, tarfile.TarInfo] = {}
        for info in infos:
            name = _member_name(info)
            if name in members:
                raise InvalidArgument("ova", f"member {name!r} appears twice")
            members[name] = info
        if not members or not next(iter(members)).lower().endswith(".ovf"):
            raise InvalidArgument("ova", "the first member must be the .ovf descriptor")
        return members

    def __enter__(self) -> OvaPackage:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._tar.close()

    def _read(self, name: str, limit: int, what: str) -> bytes:
        info = self.members[name]
        if info.size > limit:
            raise InvalidArgument("ova", f"{what} {name} is larger than {limit >> 20} MiB")
        stream = self._tar.extractfile(info)
        assert stream is not None  # a regular file, checked on opening
        return stream.read()

    def read_descriptor(self) -> bytes:
        return self._read(self.descriptor_name, DESCRIPTOR_MAX, "the descriptor")

    def read_manifest(self) -> bytes | None:
        name = _manifest_name(self.descriptor_name)
        if name not in self.members:
            return None
        return self._read(name, MANIFEST_MAX, "the manifest")

    def fetch(
        self,
        wanted: Sequence[str],
        manifest: Mapping[str, Digest] | None,
        work: Path,
        stop: threading.Event | None = None,
        on_bytes: OnBytes | None = None,
    ) -> dict[str, Path]:
        """Extract the ``wanted`` members into ``work``, checking every member the
        manifest lists (the descriptor excepted: check it before parsing it)."""
        _check_listed(manifest, wanted, "ova")
        listed = set(manifest or ()) - {self.descriptor_name}
        for name in [*wanted, *sorted(listed)]:
            if name not in self.members:
                raise InvalidArgument("ova", f"{name} is missing from the OVA")
        extracted: dict[str, Path] = {}
        for name, info in self.members.items():  # in archive order: one pass over the file
            if name not in wanted and name not in listed:
                continue
            algorithm = manifest[name].algorithm if manifest and name in manifest else None
            target = work / name if name in wanted else None
            actual = self._copy(info, target, algorithm, stop, on_bytes)
            if manifest is not None and actual is not None:
                check_digest(manifest, name, actual, "ova")
            if target is not None:
                extracted[name] = target
        return extracted

    def _copy(
        self,
        info: tarfile.TarInfo,
        target: Path | None,
        algorithm: str | None,
        stop: threading.Event | None,
        on_bytes: OnBytes | None,
    ) -> str | None:
        stream = self._tar.extractfile(info)
        assert stream is not None
        h = new_hash(algorithm) if algorithm else None
        with stream, target.open("xb") if target else nullcontext() as out:
            while chunk := stream.read(_CHUNK):
                _check_stop(stop)
                if h is not None:
                    h.update(chunk)
                if out is not None:
                    out.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        return str(h.hexdigest()) if h is not None else None

    def read_size(self, wanted: Iterable[str], manifest: Mapping[str, Digest] | None) -> int:
        """The bytes ``fetch`` reads: the wanted members and those the manifest lists."""
        names = (set(wanted) | set(manifest or ())) - {self.descriptor_name}
        return sum(self.members[n].size for n in names if n in self.members)


class DirectoryPackage:
    """An ``.ovf`` and the files beside it (an exported OVF directory)."""

    field = "ovf"

    def __init__(self, descriptor: Path):
        self.directory = descriptor.parent
        self.descriptor_name = descriptor.name

    def close(self) -> None:
        pass

    def _file(self, name: str) -> Path:
        path = self.directory / check_member_name(name, "ovf")
        if not path.is_file():
            raise InvalidArgument("ovf", f"{name} is missing from {self.directory}")
        if not path.resolve().is_relative_to(self.directory.resolve()):
            raise InvalidArgument("ovf", f"{name} is a link out of {self.directory}")
        return path

    def _read(self, path: Path, limit: int, what: str) -> bytes:
        if path.stat().st_size > limit:
            raise InvalidArgument("ovf", f"{what} {path.name} is larger than {limit >> 20} MiB")
        return path.read_bytes()

    def read_descriptor(self) -> bytes:
        return self._read(self._file(self.descriptor_name), DESCRIPTOR_MAX, "the descriptor")

    def read_manifest(self) -> bytes | None:
        path = self.directory / _manifest_name(self.descriptor_name)
        return self._read(path, MANIFEST_MAX, "the manifest") if path.is_file() else None

    def fetch(
        self,
        wanted: Sequence[str],
        manifest: Mapping[str, Digest] | None,
        work: Path,
        stop: threading.Event | None = None,
        on_bytes: OnBytes | None = None,
    ) -> dict[str, Path]:
        """The ``wanted`` files where they are, after checking every file the manifest
        lists (the descriptor excepted)."""
        _check_listed(manifest, wanted, "ovf")
        found = {name: self._file(name) for name in wanted}
        for name, digest in (manifest or {}).items():
            if name == self.descriptor_name:
                continue
            path = self._file(name)
            check_digest(manifest or {}, name, file_digest(path, digest.algorithm, stop), "ovf")
            if on_bytes is not None:
                on_bytes(path.stat().st_size)
        return found

    def read_size(self, wanted: Iterable[str], manifest: Mapping[str, Digest] | None) -> int:
        """The bytes ``fetch`` reads: the files the manifest lists (the others stay unread)."""
        names = set(manifest or ()) - {self.descriptor_name}
        return sum(self._file(n).stat().st_size for n in names)


Package = OvaPackage | DirectoryPackage


def check_descriptor(package: Package, manifest: Mapping[str, Digest] | None, data: bytes) -> None:
    """Check the descriptor's bytes against the manifest (when there is one)."""
    if manifest is None:
        return
    name = package.descriptor_name
    _check_listed(manifest, [name], package.field)
    h = new_hash(manifest[name].algorithm)
    h.update(data)
    check_digest(manifest, name, str(h.hexdigest()), package.field)


# Writing an OVA


class _CountingReader:
    """A file read by tarfile, counting bytes and honouring a stop request."""

    def __init__(self, f: IO[bytes], stop: threading.Event | None, on_bytes: OnBytes | None):
        self.f = f
        self.stop = stop
        self.on_bytes = on_bytes

    def read(self, size: int = -1) -> bytes:
        _check_stop(self.stop)
        data = self.f.read(size)
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        return data


Member = tuple[str, bytes | Path]


def write_ova(
    dest: Path,
    members: Sequence[Member],
    *,
    stop: threading.Event | None = None,
    on_bytes: OnBytes | None = None,
) -> None:
    """Write the OVA ``dest`` from ``members`` (name, bytes or a file), in the order
    given: the ``.ovf`` first, then the ``.mf``, then the files. ustar format (a member
    of 8 GiB or more gets GNU tar's large size field). Written to a hidden temporary file
    next to ``dest``, fsynced, then moved into place; never replaces an existing file."""
    if not members or not members[0][0].endswith(".ovf"):
        raise ValueError("the first member of an OVA is its .ovf descriptor")
    fd, tmp_name = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=f"-{dest.name}", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            ustar = tarfile.USTAR_FORMAT
            with tarfile.TarFile(fileobj=f, mode="w", format=ustar, copybufsize=_CHUNK) as tar:
                for name, content in members:
                    _add_member(tar, name, content, stop, on_bytes)
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def _add_member(
    tar: tarfile.TarFile,
    name: str,
    content: bytes | Path,
    stop: threading.Event | None,
    on_bytes: OnBytes | None,
) -> None:
    info = tarfile.TarInfo(check_member_name(name, "ova"))
    info.mode = 0o644
    info.mtime = int(time.time())
    if isinstance(content, bytes):
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
        return
    info.size = content.stat().st_size
    tar.format = tarfile.GNU_FORMAT if info.size > _USTAR_SIZE_MAX else tarfile.USTAR_FORMAT
    try:
        with content.open("rb") as f:
            tar.addfile(info, _CountingReader(f, stop, on_bytes))
    finally:
        tar.format = tarfile.USTAR_FORMAT


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest`` unless ``dest`` exists (a hard link refuses to replace)."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise AlreadyExists(f"{dest} already exists") from None
    except OSError:  # a file system without hard links
        if dest.exists():
            raise AlreadyExists(f"{dest} already exists") from None
        tmp.rename(dest)
        return
    tmp.unlink()
