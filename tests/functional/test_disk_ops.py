"""Disk operations on real QEMU with the appliance guest: live storage migration while the
guest writes, moving a stopped VM's disk, thin and thick provisioning, online growth."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import InvalidArgument
from thinvisor.host.inventory import Inventory
from thinvisor.host.service import HostService
from thinvisor.storage.snapshots import SnapshotCreate

from .hostenv import TestHost
from .test_snapshots import qemu_img_check, read_disk, sh, write_disk

pytestmark = pytest.mark.functional

SECTOR = 512
FILL = 0x5A  # the pattern of the bulk data written before the VM starts


def two_datastores(host: TestHost) -> HostService:
    """The test host's service with a second datastore, ``other``."""
    other = host.root / "other"
    other.mkdir()
    data = host.config.model_dump()
    data["datastores"].append(DatastoreConfig(name="other", path=other).model_dump())
    return HostService(HostConfig.model_validate(data))


def disk_file(host: TestHost, name: str) -> Path:
    entry = Inventory(host.config).get(name)
    assert entry.spec is not None
    return entry.paths.resolve(entry.spec.disks[0].path)


def qemu_io(path: Path, command: str) -> str:
    out = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "failed" not in out.stdout + out.stderr, out.stdout + out.stderr
    return out.stdout


def test_live_storage_migration_while_the_guest_writes(host: TestHost) -> None:
    service = two_datastores(host)
    host.create("vm1", start=False, disk_mib=64)
    source = disk_file(host, "vm1")
    # Bulk data, so that the mirror has something to copy while the guest writes.
    qemu_io(source, f"write -P {FILL:#x} 1M 56M")
    host.run(service.start("vm1"))
    host.wait_ready("vm1")
    # The guest numbers the sectors of its first MiB, one write at a time, until told to
    # stop; /tmp/count says how many it wrote (replaced by a rename, so that a reader never
    # sees it empty between truncation and write).
    sh(
        host,
        "vm1",
        "(i=0; while [ ! -e /tmp/stop ] && [ $i -lt 2048 ]; do "
        'echo "BLOCK-$i" | dd of=/dev/vda bs=512 seek=$i conv=fsync 2>/dev/null; '
        "i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; done) "
        ">/dev/null 2>&1 & true",
    )
    while int(sh(host, "vm1", "cat /tmp/count 2>/dev/null || echo 0").strip()) < 5:
        time.sleep(0.2)
    before = int(sh(host, "vm1", "cat /tmp/count").strip())

    moved = host.run(service.move_disk("vm1", "disk0", "other"))

    during = int(sh(host, "vm1", "cat /tmp/count").strip())
    sh(host, "vm1", "touch /tmp/stop; sleep 1")
    count = int(sh(host, "vm1", "cat /tmp/count").strip())
    assert during > before  # the guest wrote while its disk moved
    target = Path(moved.path)
    assert target.is_absolute() and target.is_relative_to(host.root / "other" / "vm1")
    assert not source.exists()
    host.run(service.stop("vm1"))
    qemu_img_check(target)
    raw = host.root / "check.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(target), str(raw)], check=True)
    data = raw.read_bytes()
    missing = [
        i
        for i in range(count)
        if not data[i * SECTOR : (i + 1) * SECTOR].startswith(f"BLOCK-{i}\n".encode())
    ]
    assert missing == []
    assert data[1 << 20 : 57 << 20] == bytes([FILL]) * (56 << 20)


def test_move_a_stopped_vms_disk_and_change_its_provisioning(host: TestHost) -> None:
    service = two_datastores(host)
    host.create("vm1", disk_mib=32)
    host.wait_ready("vm1")
    write_disk(host, "vm1", "KEEP-ME")
    host.run(service.stop("vm1"))
    path = disk_file(host, "vm1")

    host.run(service.set_provisioning("vm1", "disk0", "thick"))
    assert path.stat().st_blocks * 512 >= 32 << 20
    host.run(service.set_provisioning("vm1", "disk0", "thin"))
    assert path.stat().st_blocks * 512 < 8 << 20

    host.run(service.move_disk("vm1", "disk0", "other"))
    moved = disk_file(host, "vm1")
    assert moved.is_relative_to(host.root / "other") and not path.exists()
    with pytest.raises(InvalidArgument):
        host.run(service.move_disk("vm1", "disk0", "other"))

    # A disk with snapshots keeps them out of provisioning changes.
    host.run(service.take_snapshot("vm1", SnapshotCreate(name="s1")))
    with pytest.raises(InvalidArgument):
        host.run(service.set_provisioning("vm1", "disk0", "thick"))

    host.run(service.start("vm1"))
    host.wait_ready("vm1", count=2)
    assert read_disk(host, "vm1", 7) == "KEEP-ME"
    # Grown while running: the guest sees the new size.
    host.run(service.resize_disk("vm1", "disk0", 48 << 20))
    sectors = sh(host, "vm1", "cat /sys/block/vda/size").strip()
    assert int(sectors) * 512 == 48 << 20
