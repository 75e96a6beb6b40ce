"""The QEMU command line for a VM: a pure function of its spec, its paths and the accelerator.

Conventions the rest of the engine relies on (QMP commands address devices and block
nodes by these names):

- a disk ``<d>`` is the block nodes ``<d>-file`` (protocol) and ``<d>-fmt`` (format) and
  the device ``<d>``; the CD-ROM is the device ``cdrom0`` (nodes ``cdrom0-file`` and
  ``cdrom0-fmt`` while an ISO is in it); a NIC ``<n>`` is the netdev ``<n>-net`` and the
  device ``<n>``; a serial port ``<s>`` is the chardev ``<s>``; the SCSI controller is
  ``scsi0``, the VGA card ``video0``. QMP commands that take a disk's guest device
  (``block_set_io_throttle``) name it by ``disk_device_path``: a virtio-blk-pci keeps
  its block backend in its ``virtio-backend`` child.
- virtio disks and NICs sit in fixed PCI slots kept in the spec (``slot``, 1 to 15;
  slot 0 is the SCSI controller's): on q35 slot n is the root port ``rp<n>`` (all 16
  exist from boot, so empty ones take hot-added devices), on pc and microvm it is a fixed
  address on the root bus. The same spec always gives the same guest hardware, which a
  saved state needs to be restored; ``pci_placement`` tells hot-add where a slot is.
- the memory balloon (``resources.balloon``) is the device ``balloon0``, at a fixed
  root-bus address outside the slots (``BALLOON_ADDR``): on q35 ``pcie.0`` 1e.0, clear of
  the root ports (auto-placed from 01.0 or 02.0 up) and of the ICH9 functions at 1f; on
  pc and microvm the address just above slot 15.
- ``-machine mem-merge`` follows ``resources.page_sharing``: QEMU marks guest RAM
  mergeable for KSM.
- QEMU is never told to daemonize: the caller detaches the process itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from thinvisor.errors import InvalidArgument
from thinvisor.host.engine.accel import AccelChoice
from thinvisor.host.engine.paths import VmPaths
from thinvisor.model.vm import (
    PCI_SLOT_MAX,
    USER_NETWORK,
    CdromSpec,
    DiskSpec,
    FirmwareBoot,
    KernelBoot,
    MachineType,
    VmSpec,
)

#: Root ports of a q35 VM (one per PCI slot), all there from boot.
ROOT_PORTS = PCI_SLOT_MAX + 1
CDROM_ID = "cdrom0"
BALLOON_ID = "balloon0"
SCSI_ID = "scsi0"
VGA_ID = "video0"
NIC_DEVICES = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

# Root bus addresses: q35 has its host bridge at 00.0 and VGA at 01.0; pc its host bridge,
# PIIX3 and VGA at 00.0 to 02.0; microvm nothing. Slot n is at _SLOT_BASE + n on pc and
# microvm.
_SLOT_BASE: dict[MachineType, int] = {"pc": 3, "microvm": 1}
_VGA_ADDR: dict[MachineType, str] = {"q35": "0x1", "pc": "0x2"}
_ROOT_BUS: dict[MachineType, str] = {"q35": "pcie.0", "pc": "pci.0", "microvm": "pcie.0"}
BALLOON_ADDR: dict[MachineType, str] = {
    "q35": "0x1e",
    "pc": hex(_SLOT_BASE["pc"] + PCI_SLOT_MAX + 1),
    "microvm": hex(_SLOT_BASE["microvm"] + PCI_SLOT_MAX + 1),
}
# Where IDE devices can go; the CD-ROM takes its place first, disks take the rest in order.
_IDE_POSITIONS: dict[MachineType, list[str]] = {
    "pc": ["bus=ide.0,unit=0", "bus=ide.0,unit=1", "bus=ide.1,unit=0", "bus=ide.1,unit=1"],
    "q35": [f"bus=ide.{n}" for n in range(6)],
    "microvm": [],
}
_IDE_CDROM: dict[MachineType, str] = {"pc": "bus=ide.1,unit=0", "q35": "bus=ide.2"}


def escape_option(value: str | Path) -> str:
    """A value for a QEMU ``key=value,...`` option: commas doubled, as QEMU expects."""
    return str(value).replace(",", ",,")


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _options(head: str, **opts: str | int | None) -> str:
    """``head,key=value,...`` with the None values left out (keys use '_' for '-')."""
    parts = [head] + [f"{k.replace('_', '-')}={v}" for k, v in opts.items() if v is not None]
    return ",".join(parts)


def _vga(spec: VmSpec) -> bool:
    return spec.graphics.kind == "vnc" and spec.machine != "microvm"


def _needs_scsi(spec: VmSpec) -> bool:
    cdrom = spec.cdrom is not None and spec.cdrom.bus == "scsi"
    return cdrom or any(d.bus == "scsi" for d in spec.disks)


def pci_placement(machine: MachineType, slot: int) -> dict[str, str]:
    """Where the device in PCI slot ``slot`` goes: ``bus`` (and ``addr``) properties."""
    if machine == "q35":
        return {"bus": f"rp{slot}"}
    return {"bus": _ROOT_BUS[machine], "addr": hex(_SLOT_BASE[machine] + slot)}


def _placement(spec: VmSpec, slot: int | None) -> str:
    assert slot is not None, "with_pci_slots gives every PCI device a slot"
    return ",".join(f"{k}={v}" for k, v in pci_placement(spec.machine, slot).items())


def _machine(spec: VmSpec, accel: AccelChoice) -> list[str]:
    machine = "microvm,pcie=on,rtc=on" if spec.machine == "microvm" else spec.machine
    merge = "on" if spec.resources.page_sharing else "off"
    argv = ["-machine", f"{machine},accel={accel.name},mem-merge={merge}"]
    if accel.name == "kvm":
        argv += ["-cpu", "host"]
    return argv


def _base(
    spec: VmSpec, paths: VmPaths, accel: AccelChoice, incoming: bool, paused: bool = False
) -> list[str]:
    argv = [
        *("-name", f"{spec.name},debug-threads=on", "-uuid", spec.uuid),
        *("-nodefaults", "-no-user-config"),
        *_machine(spec, accel),
        *("-m", str(spec.memory_mib), "-smp", str(spec.vcpus), "-display", "none"),
        *("-pidfile", str(paths.pidfile)),
        *("-qmp", f"unix:{escape_option(paths.qmp_socket)},server=on,wait=off"),
        *("-sandbox", SANDBOX, "-msg", "timestamp=on", "-rtc", "base=utc"),
    ]
    if incoming:
        argv += ["-incoming", "defer"]
    if paused:  # the vCPUs wait for ``cont`` (a live migration's destination, until it commits)
        argv += ["-S"]
    return argv


def _kernel_boot(spec: VmSpec, boot: KernelBoot, paths: VmPaths, tsc_khz: int | None) -> list[str]:
    argv = ["-kernel", str(paths.resolve(boot.kernel))]
    if boot.initrd is not None:
        argv += ["-initrd", str(paths.resolve(boot.initrd))]
    cmdline = boot.cmdline
    if spec.machine == "microvm" and tsc_khz is not None:
        # Without it microvm hangs now and then calibrating the TSC (no HPET, no PM timer).
        cmdline = f"{cmdline} tsc_early_khz={tsc_khz}".lstrip()
    if cmdline:
        argv += ["-append", cmdline]
    return argv


def _boot_indexes(spec: VmSpec) -> dict[str, int]:
    """Device id -> bootindex, in the order of ``spec.boot.order`` (firmware boot only)."""
    if not isinstance(spec.boot, FirmwareBoot):
        return {}
    ids = {
        "disk": spec.disks[0].name if spec.disks else None,
        "cdrom": CDROM_ID if spec.cdrom is not None else None,
        "network": spec.nics[0].name if spec.nics else None,
    }
    present = [ids[device] for device in spec.boot.order if ids[device] is not None]
    return {device_id: n for n, device_id in enumerate(present, start=1) if device_id}


def disk_nodes(disk: DiskSpec, paths: VmPaths) -> list[dict[str, Any]]:
    """The block nodes of a disk, protocol first: ``-blockdev`` or QMP ``blockdev-add``."""
    ro = {"read-only": True} if disk.readonly else {}
    file_node = {
        "driver": "file",
        "node-name": f"{disk.name}-file",
        "filename": str(paths.resolve(disk.path)),
        "cache": {"direct": False},
        "discard": "unmap",
        **ro,
    }
    fmt_node = {
        "driver": disk.format,
        "node-name": f"{disk.name}-fmt",
        "file": f"{disk.name}-file",
        "discard": "unmap",
        **ro,
    }
    return [file_node, fmt_node]


def disk_device_path(disk: DiskSpec) -> str:
    """The guest device that holds a disk's block backend, for QMP's ``id`` arguments:
    the disk's device, or for virtio the QOM path of its virtio-blk child (QEMU 7.2
    refuses the virtio-blk-pci proxy: "Device does not have a block device backend")."""
    if disk.bus == "virtio":
        return f"/machine/peripheral/{disk.name}/virtio-backend"
    return disk.name


def cdrom_nodes(path: str, paths: VmPaths) -> list[dict[str, Any]]:
    """The block nodes of an ISO in the CD-ROM drive, protocol first."""
    return [
        {
            "driver": "file",
            "node-name": f"{CDROM_ID}-file",
            "filename": str(paths.resolve(path)),
            "read-only": True,
        },
        {
            "driver": "raw",
            "node-name": f"{CDROM_ID}-fmt",
            "file": f"{CDROM_ID}-file",
            "read-only": True,
        },
    ]


def _blockdevs(nodes: list[dict[str, Any]]) -> list[str]:
    # The JSON form: file names with commas need no escaping.
    return [arg for node in nodes for arg in ("-blockdev", _json(node))]


def _ide_positions(spec: VmSpec) -> tuple[str | None, list[str]]:
    """The CD-ROM's IDE position (if it is on IDE) and one position per IDE disk."""
    free = list(_IDE_POSITIONS[spec.machine])
    cdrom = None
    if spec.cdrom is not None and spec.cdrom.bus == "ide":
        cdrom = _IDE_CDROM[spec.machine]
        free.remove(cdrom)
    ide_disks = [d.name for d in spec.disks if d.bus == "ide"]
    if len(ide_disks) > len(free):
        raise InvalidArgument(
            "disks",
            f"too many IDE devices: machine {spec.machine!r} has room for {len(free)} "
            f"IDE disks{' beside the CD-ROM' if cdrom else ''}, {len(ide_disks)} given",
        )
    return cdrom, free[: len(ide_disks)]


def _disk_device(spec: VmSpec, disk: DiskSpec, ide_free: list[str], index: int | None) -> str:
    drive = f"{disk.name}-fmt"
    if disk.bus == "virtio":
        dev = f"virtio-blk-pci,{_placement(spec, disk.slot)}"
        return _options(dev, drive=drive, id=disk.name, bootindex=index)
    if disk.bus == "scsi":
        return _options(f"scsi-hd,bus={SCSI_ID}.0", drive=drive, id=disk.name, bootindex=index)
    if disk.readonly:
        # QEMU 7.2 refuses it: "Block node is read-only" (ide-hd has no read-only mode).
        raise InvalidArgument(f"disks.{disk.name}.readonly", "an IDE disk cannot be read-only")
    return _options(f"ide-hd,{ide_free.pop(0)}", drive=drive, id=disk.name, bootindex=index)


def _storage(spec: VmSpec, paths: VmPaths, boot: dict[str, int]) -> list[str]:
    cdrom_pos, ide_free = _ide_positions(spec)
    argv: list[str] = []
    if _needs_scsi(spec):
        argv += ["-device", f"virtio-scsi-pci,id={SCSI_ID},{_placement(spec, 0)}"]
    for disk in spec.disks:
        argv += _blockdevs(disk_nodes(disk, paths))
        argv += ["-device", _disk_device(spec, disk, ide_free, boot.get(disk.name))]
    if spec.cdrom is not None:
        argv += _cdrom(spec.cdrom, paths, cdrom_pos, boot.get(CDROM_ID))
    return argv


def _cdrom(cdrom: CdromSpec, paths: VmPaths, ide_pos: str | None, index: int | None) -> list[str]:
    argv: list[str] = []
    drive = None
    if cdrom.path is not None:
        argv += _blockdevs(cdrom_nodes(cdrom.path, paths))
        drive = f"{CDROM_ID}-fmt"
    # Empty, the device has no drive: QMP blockdev-change-medium id=cdrom0 inserts one.
    bus = ide_pos if cdrom.bus == "ide" else f"bus={SCSI_ID}.0"
    dev = _options(f"{cdrom.bus}-cd", drive=drive, id=CDROM_ID)
    return [*argv, "-device", _options(f"{dev},{bus}", bootindex=index)]


def _nics(spec: VmSpec, boot: dict[str, int], tap_fds: Mapping[str, int]) -> list[str]:
    argv: list[str] = []
    for nic in spec.nics:
        netdev = f"{nic.name}-net"
        if nic.network == USER_NETWORK:
            argv += ["-netdev", f"user,id={netdev}"]
        elif nic.name in tap_fds:
            # The TAP is made by thinvisor and inherited as a descriptor: QEMU needs no
            # privileges and no helper scripts (spawn=deny forbids them anyway).
            argv += ["-netdev", f"tap,id={netdev},fd={tap_fds[nic.name]}"]
        else:
            raise InvalidArgument(
                f"nics.{nic.name}.network", f"no TAP prepared for port group {nic.network!r}"
            )
        dev = _options(
            f"{NIC_DEVICES[nic.model]},{_placement(spec, nic.slot)}",
            netdev=netdev,
            mac=nic.mac,
            id=nic.name,
            bootindex=boot.get(nic.name),
        )
        argv += ["-device", dev]
    return argv


def _serials(spec: VmSpec, paths: VmPaths) -> list[str]:
    argv: list[str] = []
    for n, serial in enumerate(spec.serials):
        sock = escape_option(paths.serial_socket(serial.name))
        logfile = escape_option(paths.serial_log(serial.name))
        chardev = f"socket,id={serial.name},path={sock},server=on,wait=off"
        argv += ["-chardev", f"{chardev},logfile={logfile},logappend=on"]
        if spec.machine == "microvm" and n > 0:
            # microvm builds one ISA serial port and silently drops further -serial.
            argv += ["-device", f"isa-serial,chardev={serial.name},index={n}"]
        else:
            argv += ["-serial", f"chardev:{serial.name}"]
    return argv


def _parallel(spec: VmSpec, paths: VmPaths) -> list[str]:
    if spec.parallel is None or not spec.parallel.enabled:
        return []
    argv = ["-chardev", f"file,id=parallel0,path={escape_option(paths.parallel_log)}"]
    if spec.machine == "microvm":
        # microvm ignores -parallel; the ISA device works.
        return [*argv, "-device", "isa-parallel,chardev=parallel0"]
    return [*argv, "-parallel", "chardev:parallel0"]


def _graphics(spec: VmSpec, paths: VmPaths) -> list[str]:
    if not _vga(spec):
        return []
    vga = _options("VGA", id=VGA_ID, bus=_ROOT_BUS[spec.machine], addr=_VGA_ADDR[spec.machine])
    return ["-vnc", f"unix:{escape_option(paths.vnc_socket)}", "-device", vga]


def _balloon(spec: VmSpec) -> list[str]:
    if not spec.resources.balloon:
        return []
    # deflate-on-oom: a guest about to run out of memory takes pages back from the
    # balloon rather than kill its processes. free-page-reporting: the guest hands its
    # free pages (2 MiB blocks, after 2 s) back to the host without any ballooning.
    dev = _options(
        "virtio-balloon-pci",
        id=BALLOON_ID,
        bus=_ROOT_BUS[spec.machine],
        addr=BALLOON_ADDR[spec.machine],
        deflate_on_oom="on",
        free_page_reporting="on",
    )
    return ["-device", dev]


def _root_port_devices(spec: VmSpec) -> list[str]:
    if spec.machine != "q35":
        return []
    argv: list[str] = []
    for n in range(ROOT_PORTS):
        port = _options("pcie-root-port", id=f"rp{n}", chassis=n + 1, slot=n + 1, bus="pcie.0")
        argv += ["-device", port]
    return argv


def build_argv(
    spec: VmSpec,
    paths: VmPaths,
    accel: AccelChoice,
    *,
    qemu_binary: str = "qemu-system-x86_64",
    incoming: bool = False,
    paused: bool = False,
    tsc_khz: int | None = None,
    tap_fds: Mapping[str, int] | None = None,
) -> list[str]:
    """The full QEMU command line for ``spec``; raises ``InvalidArgument`` for what QEMU
    cannot build (too many IDE or PCI devices, an unknown network)."""
    spec = spec.with_pci_slots()
    boot = _boot_indexes(spec)
    argv = [qemu_binary, *_base(spec, paths, accel, incoming, paused)]
    if isinstance(spec.boot, KernelBoot):
        argv += _kernel_boot(spec, spec.boot, paths, tsc_khz)
    argv += _graphics(spec, paths)  # first, so VGA gets the first free slot (00:01.0 / 00:02.0)
    argv += _root_port_devices(spec)
    argv += _storage(spec, paths, boot)
    argv += _nics(spec, boot, tap_fds or {})
    argv += _balloon(spec)
    argv += _serials(spec, paths)
    argv += _parallel(spec, paths)
    return argv
