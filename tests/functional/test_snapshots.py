"""Snapshots on real QEMU with the appliance guest: with and without memory, running and
stopped, and deleting a snapshot in the middle of a chain."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from thinvisor.errors import AlreadyExists, NotFound
from thinvisor.host.inventory import Inventory
from thinvisor.storage.snapshots import SnapshotCreate, load_tree

from .hostenv import TestHost

pytestmark = pytest.mark.functional

BLOCK = 4096


def sh(host: TestHost, name: str, command: str, timeout: float = 60) -> str:
    """Run a shell command in the guest over its serial console; return its output."""
    return host.sh(name, command, timeout)


def write_disk(host: TestHost, name: str, text: str, block: int = 0) -> None:
    """Write ``text`` at ``block`` of the guest's data disk, past the guest's cache."""
    sh(host, name, f"printf '%s' '{text}' | dd of=/dev/vda bs={BLOCK} seek={block} conv=fsync")


def read_disk(host: TestHost, name: str, size: int, block: int = 0) -> str:
    command = f"dd if=/dev/vda bs={BLOCK} skip={block} count=1 2>/dev/null | head -c {size}"
    return sh(host, name, command + " | tr -d '\\000'").strip()


def snap(host: TestHost, name: str, snap_name: str, memory: bool = False) -> int:
    request = SnapshotCreate(name=snap_name, memory=memory)
    return int(host.run(host.service.take_snapshot(name, request)).id)


def chain_files(host: TestHost, name: str) -> list[Path]:
    """Every image of the VM: the active files and the snapshots' frozen files."""
    entry = Inventory(host.config).get(name)
    assert entry.spec is not None
    tree = load_tree(entry.paths.vm_dir)
    files = [entry.paths.resolve(d.path) for d in entry.spec.disks]
    return files + [entry.paths.resolve(f) for s in tree.snapshots for f in s.disks.values()]


def qemu_img_check(path: Path) -> None:
    out = subprocess.run(
        ["qemu-img", "check", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, f"qemu-img check {path}: {out.stderr}"
    assert json.loads(out.stdout).get("corruptions", 0) == 0


def test_memory_snapshot_of_a_running_vm_reverts_to_the_running_state(host: TestHost) -> None:
    host.create("vm1", disk_mib=16)
    host.wait_ready("vm1")
    sh(host, "vm1", "echo before > /root/mark")
    write_disk(host, "vm1", "DISK-BEFORE")
    snap(host, "vm1", "s1", memory=True)
    assert host.show("vm1")["state"] == "running"
    sh(host, "vm1", "echo after > /root/mark")
    write_disk(host, "vm1", "DISK-AFTER!")
    assert read_disk(host, "vm1", 11) == "DISK-AFTER!"

    host.run(host.service.revert_snapshot("vm1", "s1"))

    assert host.show("vm1")["state"] == "running"
    assert sh(host, "vm1", "cat /root/mark").strip() == "before"
    # Read past the page cache: the disk itself is back as it was.
    out = sh(host, "vm1", "dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | head -c 11")
    assert out.strip() == "DISK-BEFORE"
    for path in chain_files(host, "vm1"):
        qemu_img_check(path)


def test_snapshot_of_a_stopped_vm_without_memory(host: TestHost) -> None:
    host.create("vm1", disk_mib=16)
    host.wait_ready("vm1")
    write_disk(host, "vm1", "STATE-A")
    host.run(host.service.stop("vm1"))
    snap(host, "vm1", "a")
    host.run(host.service.start("vm1"))
    host.wait_ready("vm1", count=2)
    write_disk(host, "vm1", "STATE-B")
    host.run(host.service.stop("vm1"))

    host.run(host.service.revert_snapshot("vm1", "a"))

    assert host.show("vm1")["state"] == "stopped"
    host.run(host.service.start("vm1"))
    host.wait_ready("vm1", count=3)
    assert read_disk(host, "vm1", 7) == "STATE-A"
    with pytest.raises(NotFound):
        host.run(host.service.revert_snapshot("vm1", "no-such-snapshot"))
    with pytest.raises(NotFound):
        host.run(host.service.delete_snapshot("vm1", "77"))
    assert host.show("vm1")["state"] == "running"
    # "b" under "a"; back at "a", a second "b" would be its sibling: refused.
    snap(host, "vm1", "b")
    host.run(host.service.revert_snapshot("vm1", "a"))
    with pytest.raises(AlreadyExists):
        snap(host, "vm1", "b")
    tree = host.run(host.service.list_snapshots("vm1"))
    assert [(s.name, s.parent) for s in tree.snapshots] == [("a", None), ("b", 1)]


def test_deleting_a_middle_snapshot_keeps_the_chain_whole(host: TestHost) -> None:
    host.create("vm1", disk_mib=16)
    host.wait_ready("vm1")
    # v1, v2, v3 go to blocks 0..2 as the snapshots s1, s2, s3 are taken (running, no
    # memory); each later snapshot sees all earlier blocks.
    for n in (1, 2, 3):
        write_disk(host, "vm1", f"VERSION-{n}", block=n - 1)
        write_disk(host, "vm1", f"HEAD-{n}", block=8)
        snap(host, "vm1", f"s{n}")
    write_disk(host, "vm1", "HEAD-4", block=8)

    # The VM runs on s3's overlay: s2's frozen file sits inside QEMU's chain.
    host.run(host.service.delete_snapshot("vm1", "s2"))

    tree = host.run(host.service.list_snapshots("vm1"))
    assert [s.name for s in tree.snapshots] == ["s1", "s3"]
    s1, s3 = tree.snapshots
    assert s3.parent == s1.id and tree.current == s3.id
    for path in chain_files(host, "vm1"):
        qemu_img_check(path)
    assert read_disk(host, "vm1", 6, block=8) == "HEAD-4"
    assert read_disk(host, "vm1", 9, block=1) == "VERSION-2"

    host.run(host.service.revert_snapshot("vm1", "s3"))
    host.run(host.service.start("vm1"))
    host.wait_ready("vm1", count=2)
    assert [read_disk(host, "vm1", 9, block=b) for b in (0, 1, 2)] == [
        "VERSION-1",
        "VERSION-2",
        "VERSION-3",
    ]
    assert read_disk(host, "vm1", 6, block=8) == "HEAD-3"

    host.run(host.service.revert_snapshot("vm1", "s1"))
    host.run(host.service.start("vm1"))
    host.wait_ready("vm1", count=3)
    assert read_disk(host, "vm1", 9, block=0) == "VERSION-1"
    assert read_disk(host, "vm1", 9, block=1) == ""
    assert read_disk(host, "vm1", 6, block=8) == "HEAD-1"
    for path in chain_files(host, "vm1"):
        qemu_img_check(path)
