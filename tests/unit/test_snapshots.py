"""Snapshot trees and their crash repair, on stopped VMs (qemu-img, no QEMU)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    InvalidConfig,
    InvalidState,
    NotFound,
)
from thinvisor.host.clones import CloneRequest
from thinvisor.host.engine.accel import AccelChoice
from thinvisor.host.hostinfo import HostFacts
from thinvisor.host.inventory import save_spec
from thinvisor.host.service import CreateOptions, HostService, NewDisk
from thinvisor.host.snapshots import repair
from thinvisor.host.state import PowerState
from thinvisor.model import VmSpec
from thinvisor.storage.snapshots import (
    Snapshot,
    SnapshotCreate,
    SnapshotTree,
    load_tree,
    save_tree,
    snapshot_dir,
)


@pytest.fixture
def service(tmp_path: Path) -> HostService:
    config = HostConfig(
        qemu_binary=str(tmp_path / "no-qemu-in-unit-tests"),
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        state_dir=tmp_path / "state",
        datastores=[DatastoreConfig(name="ds1", path=tmp_path / "ds1")],
    )
    facts = HostFacts(cpus=4, memory_total_mib=8192, memory_available_mib=4096, cpu_model="test")
    return HostService(config, accel=lambda: AccelChoice("tcg", "test"), facts=lambda: facts)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make_vm(service: HostService, name: str = "vm1") -> Path:
    spec = VmSpec.model_validate({"name": name, "memory_mib": 64})
    info = run(service.create_vm(spec, CreateOptions(new_disks=[NewDisk(size=1 << 20)])))
    return info.paths.vm_dir


def spec_of(service: HostService, name: str = "vm1") -> VmSpec:
    return service.inventory.get_valid(name)[1]


def snap(service: HostService, name: str, vm: str = "vm1") -> Snapshot:
    result: Snapshot = run(service.take_snapshot(vm, SnapshotCreate(name=name, memory=False)))
    return result


def test_tree_lookup_by_id_and_name() -> None:
    tree = SnapshotTree(
        snapshots=[
            Snapshot(id=1, name="base", created="t"),
            Snapshot(id=2, name="x", created="t", parent=1),
            Snapshot(id=3, name="x", created="t", parent=None),
        ]
    )
    assert tree.find("vm", "1").name == "base"
    assert tree.find("vm", "base").id == 1
    with pytest.raises(InvalidArgument, match="several"):
        tree.find("vm", "x")
    with pytest.raises(NotFound):
        tree.find("vm", "nope")
    with pytest.raises(AlreadyExists):
        tree.check_name("x", 1)  # 2 is a child of 1
    tree.check_name("x", 2)  # no child of 2 has it
    assert [s.id for s in tree.path_to(2)] == [1, 2]


@pytest.mark.parametrize("name", ["", "   ", "a\x00b", "x" * 81])
def test_snapshot_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        SnapshotCreate(name=name)


def test_an_unreadable_tree_is_invalid_config(tmp_path: Path) -> None:
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / "tree.toml").write_text("snapshots = 3\n")
    with pytest.raises(InvalidConfig, match=r"tree\.toml"):
        load_tree(tmp_path)


def test_take_revert_delete_on_a_stopped_vm(service: HostService) -> None:
    vm_dir = make_vm(service)
    s1 = snap(service, "s1")
    assert spec_of(service).disks[0].path == "disk0-000001.qcow2"
    assert s1.disks == {"disk0": "disk0.qcow2"}
    s2 = snap(service, "s2")
    assert s2.parent == s1.id
    run(service.revert_snapshot("vm1", "s1"))
    tree = load_tree(vm_dir)
    assert tree.current == s1.id
    # The overlay of the abandoned state went; s2's frozen file stays.
    assert not (vm_dir / "disk0-000002.qcow2").exists()
    assert (vm_dir / "disk0-000001.qcow2").exists()
    assert spec_of(service).disks[0].path == "disk0-000003.qcow2"
    run(service.delete_snapshot("vm1", "s1"))
    tree = load_tree(vm_dir)
    assert [s.name for s in tree.snapshots] == ["s2"] and tree.snapshots[0].parent is None
    assert tree.current is None
    assert not (vm_dir / "disk0.qcow2").exists()
    assert not snapshot_dir(vm_dir, s1.id).exists()
    info = run(service.images.info(vm_dir / spec_of(service).disks[0].path))
    assert info.backing_file is None  # s1's data was merged into the current file


def test_repair_drops_a_snapshot_that_never_reached_vm_toml(service: HostService) -> None:
    vm_dir = make_vm(service)
    before = spec_of(service)
    snap(service, "s1")
    # As if the agent died after writing the tree but before vm.toml.
    entry = service.inventory.get("vm1")
    save_spec(entry.paths, before)
    tree = run(repair(service, entry, before, PowerState.STOPPED))
    assert tree.snapshots == [] and tree.current is None
    assert not snapshot_dir(vm_dir, 1).exists()
    assert not (vm_dir / "disk0-000001.qcow2").exists()  # the orphan overlay
    assert (vm_dir / "disk0.qcow2").exists()


def test_repair_empties_the_trash_but_keeps_what_is_used(service: HostService) -> None:
    vm_dir = make_vm(service)
    snap(service, "s1")
    tree = load_tree(vm_dir)
    (vm_dir / "stale.qcow2").write_bytes(b"x")
    tree.trash = ["stale.qcow2", "disk0.qcow2", "disk0-000001.qcow2"]
    save_tree(vm_dir, tree)
    entry = service.inventory.get("vm1")
    repaired = run(repair(service, entry, spec_of(service), PowerState.STOPPED))
    assert repaired.trash == []
    assert not (vm_dir / "stale.qcow2").exists()
    assert (vm_dir / "disk0.qcow2").exists() and (vm_dir / "disk0-000001.qcow2").exists()


def test_repair_finds_the_current_snapshot_from_the_disks(service: HostService) -> None:
    vm_dir = make_vm(service)
    snap(service, "s1")
    snap(service, "s2")
    tree = load_tree(vm_dir)
    tree.current = 1  # a revert to s2 committed vm.toml, not yet the tree
    save_tree(vm_dir, tree)
    entry = service.inventory.get("vm1")
    assert run(repair(service, entry, spec_of(service), PowerState.STOPPED)).current == 2


def test_templates_refuse_power_and_disk_changes(service: HostService) -> None:
    make_vm(service)
    run(service.set_template("vm1", True))
    with pytest.raises(InvalidState, match="template"):
        run(service.start("vm1"))
    with pytest.raises(InvalidState, match="template"):
        run(service.take_snapshot("vm1", SnapshotCreate(name="s")))
    with pytest.raises(InvalidState):
        run(service.set_template("vm1", True))
    clone = run(service.clone_vm("vm1", CloneRequest(name="c1", linked=True)))
    assert clone.spec is not None and not clone.spec.template
    with pytest.raises(Busy, match="linked clone"):
        run(service.set_template("vm1", False))
    with pytest.raises(Busy, match="linked clone"):
        run(service.delete_vm("vm1"))
    run(service.delete_vm("c1"))
    run(service.set_template("vm1", False))
    run(service.delete_vm("vm1"))
