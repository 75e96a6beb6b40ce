"""Clones and templates on real QEMU with the appliance guest."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import Busy, InsufficientResources, InvalidState
from thinvisor.host.clones import CloneRequest
from thinvisor.host.inventory import Inventory
from thinvisor.host.service import HostService
from thinvisor.model.customization import Customization
from thinvisor.storage.snapshots import SnapshotCreate

from .hostenv import TestHost
from .test_snapshots import read_disk, sh, write_disk

pytestmark = pytest.mark.functional


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vm_files(host: TestHost, name: str) -> dict[str, str]:
    """Every image file in a VM's directory, with its digest."""
    vm_dir = Inventory(host.config).get(name).paths.vm_dir
    return {p.name: digest(p) for p in sorted(vm_dir.glob("*.qcow2"))}


def test_linked_clone_boots_and_leaves_its_parent_untouched(host: TestHost) -> None:
    host.create("parent", disk_mib=16)
    host.wait_ready("parent")
    write_disk(host, "parent", "PARENT-DATA")
    host.run(host.service.stop("parent"))
    parent = host.show("parent")["spec"]

    host.run(host.service.clone_vm("parent", CloneRequest(name="child", linked=True)))
    before = vm_files(host, "parent")
    child = host.show("child")["spec"]
    assert child["uuid"] != parent["uuid"]
    # The child's disk is an overlay on the parent's frozen file, not a copy.
    child_disk = Inventory(host.config).get("child").paths.resolve(child["disks"][0]["path"])
    info = host.run(host.service.images.info(child_disk))
    assert info.backing_file is not None and "parent" in info.backing_file

    host.run(host.service.start("child"))
    host.wait_ready("child")
    assert read_disk(host, "child", 11) == "PARENT-DATA"
    write_disk(host, "child", "CHILD-DATA!")
    assert read_disk(host, "child", 11) == "CHILD-DATA!"
    host.run(host.service.stop("child"))

    assert vm_files(host, "parent") == before
    with pytest.raises(Busy):
        host.run(host.service.delete_vm("parent"))
    host.run(host.service.start("parent"))
    host.wait_ready("parent", count=2)
    assert read_disk(host, "parent", 11) == "PARENT-DATA"


def test_full_clone_survives_the_deletion_of_its_source(host: TestHost) -> None:
    host.create("source", disk_mib=16)
    host.wait_ready("source")
    write_disk(host, "source", "SOURCE-DATA")
    # A running VM's current state cannot be cloned; a snapshot of it can.
    with pytest.raises(InvalidState):
        host.run(host.service.clone_vm("source", CloneRequest(name="copy")))
    host.run(host.service.take_snapshot("source", SnapshotCreate(name="s1", memory=False)))
    host.run(host.service.clone_vm("source", CloneRequest(name="copy", snapshot="s1")))
    host.run(host.service.stop("source"))
    host.run(host.service.delete_vm("source"))

    copy_dir = Inventory(host.config).get("copy").paths.vm_dir
    info = host.run(host.service.images.info(copy_dir / "disk0.qcow2"))
    assert info.backing_file is None
    host.run(host.service.start("copy"))
    host.wait_ready("copy")
    assert read_disk(host, "copy", 11) == "SOURCE-DATA"


def test_deploy_from_a_template_with_a_hostname(host: TestHost) -> None:
    host.create(
        "tpl",
        start=False,
        disk_mib=8,
        nics=[{"name": "net0", "mac": "02:74:76:aa:00:01", "network": "user"}],
    )
    host.run(host.service.set_template("tpl", True))
    with pytest.raises(InvalidState):
        host.run(host.service.start("tpl"))
    request = CloneRequest(
        name="web1",
        linked=True,
        customization=Customization(hostname="web-01"),
        power_on=True,
    )
    host.run(host.service.deploy("tpl", request))
    host.wait_ready("web1")
    assert sh(host, "web1", "hostname").strip() == "web-01"
    assert host.show("web1")["spec"]["nics"][0]["mac"] != "02:74:76:aa:00:01"
    # A template with a linked clone stays a template.
    with pytest.raises(Busy):
        host.run(host.service.set_template("tpl", False))


def _compressed_disk(host: TestHost, path: Path, mib: int) -> None:
    """Replace ``path`` with a qcow2 whose clusters are compressed: small on disk, large
    once copied."""
    raw = host.root / "pattern.raw"
    line = b"thinvisor fills this disk with text that compresses well\n"
    raw.write_bytes((line * ((mib << 20) // len(line) + 1))[: mib << 20])
    path.unlink()
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


def test_a_full_datastore_during_a_clone_leaves_no_partial_files(host: TestHost) -> None:
    small = host.root / "small"
    small.mkdir()
    # Room for the kernel and initrd and a few MiB, not for the 64 MiB disk.
    room = host.appliance.kernel.stat().st_size + host.appliance.initrd.stat().st_size
    size = f"size={(room >> 20) + 8}m"
    subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(small)], check=True)
    try:
        config = host.config.model_copy(
            update={
                "datastores": [
                    *host.config.datastores,
                    DatastoreConfig(name="small", path=small),
                ]
            }
        )
        service = HostService(HostConfig.model_validate(config.model_dump()))
        host.create("big", start=False, disk_mib=64)
        disk = Inventory(host.config).get("big").paths.vm_dir / "disk0.qcow2"
        _compressed_disk(host, disk, 64)

        # The space check passes (the source is small on disk); the copy runs out.
        with pytest.raises(InsufficientResources, match="is full"):
            host.run(service.clone_vm("big", CloneRequest(name="bigcopy", datastore="small")))

        assert list(small.iterdir()) == []
        assert Inventory(config).find("bigcopy") is None
    finally:
        subprocess.run(["umount", str(small)], check=True)
