"""Service checks that need no QEMU: creation, validation against the host, gating."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import AlreadyExists, InvalidArgument, InvalidConfig, InvalidState, NotFound
from thinvisor.host.engine.accel import AccelChoice
from thinvisor.host.hostinfo import HostFacts
from thinvisor.host.service import CreateOptions, HostService, NewDisk
from thinvisor.model import VmSpec


@pytest.fixture
def service(tmp_path: Path) -> HostService:
    config = HostConfig(
        qemu_binary=str(tmp_path / "no-qemu-in-unit-tests"),
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        state_dir=tmp_path / "state",
        datastores=[
            DatastoreConfig(name="ds1", path=tmp_path / "ds1"),
            DatastoreConfig(name="ds2", path=tmp_path / "ds2"),
        ],
    )
    facts = HostFacts(cpus=4, memory_total_mib=8192, memory_available_mib=4096, cpu_model="test")
    return HostService(config, accel=lambda: AccelChoice("tcg", "test"), facts=lambda: facts)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def vm(**fields: Any) -> VmSpec:
    return VmSpec.model_validate({"name": "vm1", **fields})


def listing(service: HostService) -> list[tuple[str, str]]:
    return [(v.name, v.state) for v in run(service.list_vms())]


def datastore_contents(service: HostService) -> list[str]:
    found = []
    for ds in service.config.datastores:
        if ds.path.exists():
            found += sorted(p.name for p in ds.path.iterdir())
    return found


def test_create_writes_vm_toml_and_lists_stopped(service: HostService) -> None:
    info = run(service.create_vm(vm(memory_mib=128)))
    assert info.state == "stopped"
    assert info.paths.config.is_file()
    assert 'name = "vm1"' in info.paths.config.read_text()
    assert listing(service) == [("vm1", "stopped")]


def test_create_in_a_named_datastore(service: HostService) -> None:
    info = run(service.create_vm(vm(), CreateOptions(datastore="ds2")))
    assert info.datastore == "ds2"
    assert info.paths.vm_dir.parent == service.config.datastores[1].path


def test_unknown_datastore(service: HostService) -> None:
    with pytest.raises(NotFound):
        run(service.create_vm(vm(), CreateOptions(datastore="nope")))


def test_duplicate_name_is_refused_across_datastores(service: HostService) -> None:
    run(service.create_vm(vm(memory_mib=64)))
    with pytest.raises(AlreadyExists):
        run(service.create_vm(vm(memory_mib=128), CreateOptions(datastore="ds2")))
    assert run(service.get_vm("vm1")).spec.memory_mib == 64
    assert datastore_contents(service) == ["vm1"]


def test_memory_above_host_free_memory(service: HostService) -> None:
    with pytest.raises(InvalidArgument) as info:
        run(service.create_vm(vm(memory_mib=4097)))
    assert info.value.field == "memory_mib"
    assert "4096" in str(info.value)
    assert datastore_contents(service) == []


def test_vcpus_above_host_cpus(service: HostService) -> None:
    with pytest.raises(InvalidArgument) as info:
        run(service.create_vm(vm(vcpus=5)))
    assert info.value.field == "vcpus"
    assert datastore_contents(service) == []


def test_missing_disk_path(service: HostService) -> None:
    with pytest.raises(InvalidArgument) as info:
        run(service.create_vm(vm(disks=[{"name": "disk0", "path": "nope.qcow2"}])))
    assert info.value.field == "disks.disk0.path"
    assert "does not exist" in str(info.value)
    assert datastore_contents(service) == []


def test_disk_outside_the_datastores(service: HostService, tmp_path: Path) -> None:
    outside = tmp_path / "outside.qcow2"
    outside.write_bytes(b"")
    with pytest.raises(InvalidArgument) as info:
        run(service.create_vm(vm(disks=[{"name": "disk0", "path": str(outside)}])))
    assert "outside" in str(info.value)
    assert datastore_contents(service) == []


def test_disk_escaping_with_dotdot(service: HostService, tmp_path: Path) -> None:
    (tmp_path / "secret.img").write_bytes(b"")
    disks = [{"name": "disk0", "path": "../../secret.img"}]
    with pytest.raises(InvalidArgument) as info:
        run(service.create_vm(vm(disks=disks)))
    assert "outside" in str(info.value)


def test_iso_in_another_datastore_is_fine(service: HostService) -> None:
    iso_dir = service.config.datastores[1].path / "iso"
    iso_dir.mkdir(parents=True)
    (iso_dir / "boot.iso").write_bytes(b"\0" * 2048)
    info = run(service.create_vm(vm(cdrom={"path": str(iso_dir / "boot.iso")})))
    assert info.spec.cdrom.path == str(iso_dir / "boot.iso")


def test_missing_iso(service: HostService) -> None:
    with pytest.raises(InvalidArgument) as info:
        run(service.create_vm(vm(cdrom={"path": "/nonexistent.iso"})))
    assert info.value.field == "cdrom.path"


def test_unknown_network(service: HostService) -> None:
    nics = [{"name": "net0", "mac": "02:74:76:00:00:01", "network": "dmz"}]
    with pytest.raises(InvalidArgument) as info:
        run(service.create_vm(vm(nics=nics)))
    assert info.value.field == "nics.net0.network"


def test_mac_already_used_on_the_host(service: HostService) -> None:
    nics = [{"name": "net0", "mac": "02:74:76:00:00:01"}]
    run(service.create_vm(vm(nics=nics)))
    with pytest.raises(InvalidArgument) as info:
        run(service.create_vm(vm(name="vm2", nics=nics)))
    assert info.value.field == "nics.net0.mac"


def test_new_macs_are_unique_and_prefixed(service: HostService) -> None:
    spec = vm()
    macs = {service.new_mac() for _ in range(50)}
    assert len(macs) == 50
    assert all(m.startswith("02:74:76:") for m in macs)
    assert service.new_nic(spec).name == "net0"


def test_corrupt_vm_toml_is_listed_invalid_and_others_still_work(service: HostService) -> None:
    run(service.create_vm(vm(name="good")))
    bad = run(service.create_vm(vm(name="bad")))
    bad.paths.config.write_text("name = 'bad'\nvcpus = [unclosed\n")
    assert listing(service) == [("bad", "invalid"), ("good", "stopped")]
    info = run(service.get_vm("bad"))
    assert info.error is not None and "vm.toml" in info.error
    with pytest.raises(InvalidConfig):
        run(service.start("bad"))
    assert run(service.get_vm("good")).state == "stopped"


def test_vm_toml_with_a_bad_value_is_invalid(service: HostService) -> None:
    info = run(service.create_vm(vm()))
    info.paths.config.write_text('name = "vm1"\nmemory_mib = 1\n')
    shown = run(service.get_vm("vm1"))
    assert shown.state == "invalid"
    assert "memory_mib" in (shown.error or "")


def test_vm_toml_edited_in_place_is_read_again(service: HostService) -> None:
    # vm.toml documents are kept between looks; an edit of the file, even one that
    # keeps its inode and size (an editor writing in place), is seen at the next look.
    info = run(service.create_vm(vm(memory_mib=128)))
    assert run(service.get_vm("vm1")).spec.memory_mib == 128
    text = info.paths.config.read_text()
    with info.paths.config.open("r+") as f:
        f.write(text.replace("memory_mib = 128", "memory_mib = 256"))
    assert run(service.get_vm("vm1")).spec.memory_mib == 256


def test_specs_read_from_the_inventory_are_independent(service: HostService) -> None:
    run(service.create_vm(vm(memory_mib=128)))
    first = service.inventory.get("vm1").spec
    assert first is not None
    first.memory_mib = 512
    again = service.inventory.get("vm1").spec
    assert again is not None and again.memory_mib == 128


def test_invalid_vm_can_be_deleted(service: HostService) -> None:
    info = run(service.create_vm(vm()))
    info.paths.config.write_text("garbage = \n")
    run(service.delete_vm("vm1"))
    assert listing(service) == []


@pytest.mark.parametrize("action", ["pause", "resume", "reset", "shutdown", "suspend", "stop"])
def test_actions_in_the_wrong_state_change_nothing(service: HostService, action: str) -> None:
    info = run(service.create_vm(vm()))
    before = info.paths.config.read_bytes()
    with pytest.raises(InvalidState) as err:
        run(getattr(service, action)("vm1"))
    assert "while stopped" in str(err.value)
    assert info.paths.config.read_bytes() == before
    assert run(service.get_vm("vm1")).state == "stopped"


def test_unknown_vm(service: HostService) -> None:
    with pytest.raises(NotFound):
        run(service.start("ghost"))


def test_delete_removes_the_directory(service: HostService) -> None:
    info = run(service.create_vm(vm()))
    run(service.delete_vm("vm1"))
    assert not info.paths.vm_dir.exists()
    assert datastore_contents(service) == []


def test_create_with_new_and_imported_disks(service: HostService, tmp_path: Path) -> None:
    ds = service.config.datastores[0].path
    ds.mkdir(parents=True)
    source = ds / "base.raw"
    source.write_bytes(b"\1" * 1024 * 1024)
    options = CreateOptions(new_disks=[NewDisk(size=64 << 20), NewDisk(source=source)])
    info = run(service.create_vm(vm(), options))
    assert [(d.name, d.path) for d in info.spec.disks] == [
        ("disk0", "disk0.qcow2"),
        ("disk1", "disk1.qcow2"),
    ]
    image = run(service.images.info(info.paths.vm_dir / "disk0.qcow2"))
    assert (image.format, image.virtual_size) == ("qcow2", 64 << 20)


def test_failed_disk_import_leaves_nothing(service: HostService, tmp_path: Path) -> None:
    options = CreateOptions(new_disks=[NewDisk(size=1 << 20), NewDisk(source=tmp_path / "x")])
    with pytest.raises(InvalidArgument):
        run(service.create_vm(vm(), options))
    assert datastore_contents(service) == []


def test_stopped_vm_disk_add_resize_remove(service: HostService) -> None:
    info = run(service.create_vm(vm()))
    disk = run(service.add_disk("vm1", NewDisk(size=32 << 20)))
    path = info.paths.vm_dir / disk.path
    assert path.exists()
    run(service.resize_disk("vm1", disk.name, 64 << 20))
    assert run(service.images.info(path)).virtual_size == 64 << 20
    with pytest.raises(InvalidArgument):
        run(service.resize_disk("vm1", disk.name, 1 << 20))
    run(service.remove_disk("vm1", disk.name))
    assert not path.exists()
    assert run(service.get_vm("vm1")).spec.disks == []


def test_cdrom_needs_a_drive(service: HostService) -> None:
    run(service.create_vm(vm()))
    with pytest.raises(InvalidArgument) as info:
        run(service.eject_cdrom("vm1"))
    assert info.value.field == "cdrom"


def test_no_files_are_world_writable(service: HostService) -> None:
    info = run(service.create_vm(vm()))
    mode = os.stat(info.paths.config).st_mode
    assert not mode & 0o002


def test_leftovers_of_a_crash_are_never_listed_and_are_swept(service: HostService) -> None:
    ds = service.config.datastores[0].path
    for leftover in (".vm1.creating-abc123", ".vm2.deleting-0f0f0f0f"):
        (ds / leftover).mkdir(parents=True)
        (ds / leftover / "vm.toml").write_text('name = "x"\n')
    assert listing(service) == []
    run(service.create_vm(vm(name="vm3")))
    assert datastore_contents(service) == ["vm3"]


def test_a_partial_suspend_file_is_dropped_at_start(service: HostService) -> None:
    info = run(service.create_vm(vm(memory_mib=64)))
    partial = info.paths.vm_dir / "suspend.state.partial"
    partial.write_bytes(b"half a state")
    assert run(service.get_vm("vm1")).state == "stopped"
    # The start itself is refused (the host has too little memory), after the sweep.
    service._facts = lambda: HostFacts(
        cpus=4, memory_total_mib=64, memory_available_mib=32, cpu_model="test"
    )
    with pytest.raises(InvalidArgument):
        run(service.start("vm1"))
    assert not partial.exists()
