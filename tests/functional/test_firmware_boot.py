"""Firmware boot (SeaBIOS) from a disk and from a CD-ROM, with the appliance on real media.

The appliance is put on a SYSLINUX disk image and an ISOLINUX CD image, each adding its
own marker to the kernel command line (``tvboot=disk``, ``tvboot=cdrom``), so the guest's
``/proc/cmdline`` says which medium the firmware booted.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from thinvisor.appliance import Appliance
from thinvisor.console.serial import SerialConsole
from thinvisor.host.inventory import Inventory
from thinvisor.host.service import CreateOptions, NewDisk
from thinvisor.model import VmSpec

from .bootimages import make_boot_disk, make_boot_iso, missing_tools
from .hostenv import TestHost

pytestmark = pytest.mark.functional

DISK_MARKER = "tvboot=disk"
CDROM_MARKER = "tvboot=cdrom"
# The appliance's kernel has no AHCI driver: on q35 its CD-ROM must sit on virtio-scsi.
CDROM_BUS = {"q35": "scsi", "pc": "ide"}


@dataclass(frozen=True)
class Media:
    """A bootable disk image and a bootable ISO, each marking the command line it boots."""

    disk: Path
    iso: Path


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, appliance: Appliance) -> Media:
    """The boot media, built once for the module."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"cannot build boot media, missing: {', '.join(missing)}")
    directory = tmp_path_factory.mktemp("media")
    disk_cmdline = f"{appliance.cmdline} {DISK_MARKER}"
    cdrom_cmdline = f"{appliance.cmdline} {CDROM_MARKER}"
    return Media(
        disk=make_boot_disk(directory, appliance, cmdline=disk_cmdline),
        iso=make_boot_iso(directory, appliance, cmdline=cdrom_cmdline),
    )


def into_datastore(host: TestHost, image: Path) -> Path:
    """A copy of ``image`` in the host's datastore, where VMs may refer to it."""
    target = host.datastore / image.name
    shutil.copyfile(image, target)
    return target


def guest(host: TestHost, name: str, command: str, timeout: float = 60) -> tuple[int, str]:
    """Run a shell command in the guest over its serial console."""
    sock = Inventory(host.config).get(name).paths.serial_socket("serial0")

    async def go() -> tuple[int, str]:
        async with SerialConsole(sock) as console:
            return await console.run(command, timeout)

    result: tuple[int, str] = host.run(go())
    return result


def booted_marker(host: TestHost, name: str) -> str:
    """Which medium the running guest was booted from, by its kernel command line."""
    host.wait_ready(name)
    status, cmdline = guest(host, name, "cat /proc/cmdline")
    assert status == 0
    markers = [m for m in (DISK_MARKER, CDROM_MARKER) if m in cmdline.split()]
    assert len(markers) == 1, f"expected one boot marker in {cmdline!r}"
    return markers[0]


def create_firmware_vm(
    host: TestHost,
    name: str,
    *,
    machine: str,
    order: list[str],
    disk: Path | None = None,
    iso: Path | None = None,
) -> None:
    """Create and start a firmware-booting VM through the service: ``disk`` imported as
    its first disk, ``iso`` in its CD-ROM drive."""
    fields: dict[str, Any] = {
        "name": name,
        "machine": machine,
        "memory_mib": 128,
        "boot": {"kind": "firmware", "order": order},
        "cdrom": {"path": str(iso) if iso else None, "bus": CDROM_BUS[machine]},
    }
    new_disks = [NewDisk(source=disk, format="raw")] if disk else []
    spec = VmSpec.model_validate(fields)
    host.run(host.service.create_vm(spec, CreateOptions(new_disks=new_disks)))
    host.run(host.service.start(name))


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_boots_from_an_imported_disk(host: TestHost, media: Media, machine: str) -> None:
    image = into_datastore(host, media.disk)
    host.cli(
        *("vm", "create", "vm1", "--machine", machine, "--memory", "128", "--no-nic"),
        *("--import-disk", str(image), "--disk-format", "raw", "--start"),
    )
    spec = host.show("vm1")["spec"]
    assert spec["boot"] == {"kind": "firmware", "order": ["disk", "cdrom"]}
    assert [(d["name"], d["format"]) for d in spec["disks"]] == [("disk0", "raw")]
    assert booted_marker(host, "vm1") == DISK_MARKER
    # The guest sees the disk it booted from: SYSLINUX's FAT boot sector on vda.
    status, out = guest(host, "vm1", "dd if=/dev/vda bs=1 skip=3 count=8 2>/dev/null")
    assert (status, out) == (0, "SYSLINUX")


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_boots_from_the_cdrom(host: TestHost, media: Media, machine: str) -> None:
    iso = into_datastore(host, media.iso)
    create_firmware_vm(host, "vm1", machine=machine, order=["cdrom", "disk"], iso=iso)
    assert booted_marker(host, "vm1") == CDROM_MARKER
    # The guest reads the CD it booted from (volume label at byte 40 of sector 16).
    read_label = "dd if=/dev/sr0 bs=2048 skip=16 count=1 2>/dev/null | head -c 46 | tail -c 6"
    assert guest(host, "vm1", read_label) == (0, "TVBOOT")


@pytest.mark.parametrize("machine", ["q35", "pc"])
@pytest.mark.parametrize(
    ("order", "expected"),
    [(["disk", "cdrom"], DISK_MARKER), (["cdrom", "disk"], CDROM_MARKER)],
    ids=["disk-first", "cdrom-first"],
)
def test_boot_order_is_honoured(
    host: TestHost, media: Media, machine: str, order: list[str], expected: str
) -> None:
    disk, iso = into_datastore(host, media.disk), into_datastore(host, media.iso)
    create_firmware_vm(host, "vm1", machine=machine, order=order, disk=disk, iso=iso)
    assert booted_marker(host, "vm1") == expected
