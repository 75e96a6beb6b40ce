"""Datastores added at runtime: validation, persistence, overlap, the lock, the refusal
to remove one a VM uses; the space VMs take, per datastore, per VM and per disk; the
filesystem of a datastore from mountinfo. qemu-img makes real images; no QEMU runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest

from thinvisor.config import DatastoreConfig, HostConfig
from thinvisor.errors import AlreadyExists, Busy, InvalidArgument, InvalidConfig, NotFound
from thinvisor.host.engine.accel import AccelChoice
from thinvisor.host.hostinfo import HostFacts
from thinvisor.host.inventory import Inventory, save_spec
from thinvisor.host.service import CreateOptions, HostService, NewDisk
from thinvisor.host.storage_usage import vm_storage
from thinvisor.model import VmSpec
from thinvisor.model.vm import DiskSpec
from thinvisor.storage import datastore as storage
from thinvisor.storage.registry import DatastoreRegistry


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make_config(tmp_path: Path) -> HostConfig:
    return HostConfig(
        qemu_binary=str(tmp_path / "no-qemu-in-unit-tests"),
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        datastores=[DatastoreConfig(name="local", path=tmp_path / "local")],
    )


@pytest.fixture
def config(tmp_path: Path) -> HostConfig:
    (tmp_path / "local").mkdir()
    for name in ("nfs1", "nfs2"):
        (tmp_path / "mnt" / name).mkdir(parents=True)
    return make_config(tmp_path)


@pytest.fixture
def registry(config: HostConfig) -> DatastoreRegistry:
    return DatastoreRegistry(config)


@pytest.fixture
def service(config: HostConfig) -> HostService:
    facts = HostFacts(cpus=4, memory_total_mib=8192, memory_available_mib=4096, cpu_model="test")
    return HostService(config, accel=lambda: AccelChoice("tcg", "test"), facts=lambda: facts)


def names(config: HostConfig) -> list[str]:
    return [d.name for d in config.all_datastores()]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def create_vm(service: HostService, name: str, datastore: str, **fields: Any) -> Path:
    """A stopped VM; its directory."""
    options = CreateOptions(datastore=datastore, new_disks=fields.pop("new_disks", []))
    spec = VmSpec.model_validate({"name": name, "memory_mib": 128, **fields})
    return Path(run(service.create_vm(spec, options)).paths.vm_dir)


def set_disks(service: HostService, name: str, disks: list[dict[str, Any]]) -> None:
    """Give a VM disks whose files are already in place, as a hand-edited vm.toml would."""
    entry, spec = service.inventory.get_valid(name)
    updated = spec.model_copy(update={"disks": [DiskSpec.model_validate(d) for d in disks]})
    save_spec(entry.paths, updated)


# Adding


def test_add_is_kept_and_seen_by_every_config(config: HostConfig, tmp_path: Path) -> None:
    added = DatastoreRegistry(config).add("nfs1", tmp_path / "mnt" / "nfs1")
    assert added == DatastoreConfig(name="nfs1", path=tmp_path / "mnt" / "nfs1")
    assert names(config) == ["local", "nfs1"]
    assert config.datastores == [config.default_datastore]  # host.toml's stay as they are
    # Another process's configuration (a CLI command, the test fixtures) sees it too.
    other = make_config(tmp_path)
    assert other.datastore("nfs1").path == tmp_path / "mnt" / "nfs1"
    stored = tomllib.loads((tmp_path / "state" / "datastores.toml").read_text())
    assert stored == {"datastores": [{"name": "nfs1", "path": str(tmp_path / "mnt" / "nfs1")}]}
    assert not [p for p in (tmp_path / "mnt" / "nfs1").iterdir()]  # the probe is gone


@pytest.mark.parametrize(
    ("name", "path", "field", "reason"),
    [
        ("bad/name", "/tmp", "name", "must not contain '/' or '..'"),
        ("-x", "/tmp", "name", "may contain only letters"),
        ("ok", "relative/dir", "path", "must be an absolute path"),
        ("ok", "{tmp}/mnt/nfs1/../nfs2", "path", "must not contain '..'"),
        ("ok", "{tmp}/missing", "path", "does not exist"),
        ("ok", "{tmp}/file", "path", "is not a directory"),
        ("ok", "{tmp}/local/iso", "path", "lies inside datastore 'local'"),
        ("ok", "{tmp}", "path", "contains datastore 'local'"),
        ("ok", "{tmp}/link", "path", "is the directory of datastore 'local'"),
        ("ok", "{tmp}/state/sub", "path", "overlaps the host's state directory"),
        ("ok", "{tmp}/run", "path", "overlaps the host's run directory"),
    ],
)
def test_add_refusals(
    registry: DatastoreRegistry, tmp_path: Path, name: str, path: str, field: str, reason: str
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "local" / "iso").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "local")
    (tmp_path / "state" / "sub").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    with pytest.raises(InvalidArgument) as caught:
        registry.add(name, path.format(tmp=tmp_path))
    assert caught.value.field == field
    assert reason in caught.value.reason
    assert registry.added() == []


def test_add_refuses_an_unwritable_directory(registry: DatastoreRegistry, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/proc")  # root may write anywhere but in a kernel's filesystem
    else:
        target = tmp_path / "mnt" / "nfs1"
        target.chmod(0o500)
    with pytest.raises(InvalidArgument, match="not writable") as caught:
        registry.add("ro", target)
    assert caught.value.field == "path"
    assert registry.added() == []


def test_add_refuses_taken_names_and_overlap_with_added_ones(
    registry: DatastoreRegistry, tmp_path: Path
) -> None:
    with pytest.raises(AlreadyExists, match="datastore 'local' already exists"):
        registry.add("local", tmp_path / "mnt" / "nfs1")
    registry.add("nfs1", tmp_path / "mnt" / "nfs1")
    with pytest.raises(AlreadyExists, match="datastore 'nfs1' already exists"):
        registry.add("nfs1", tmp_path / "mnt" / "nfs2")
    (tmp_path / "mnt" / "nfs1" / "sub").mkdir()
    with pytest.raises(InvalidArgument, match="lies inside datastore 'nfs1'"):
        registry.add("sub", tmp_path / "mnt" / "nfs1" / "sub")
    with pytest.raises(InvalidArgument, match="contains datastore 'nfs1'"):
        registry.add("mnt", tmp_path / "mnt")
    assert [d.name for d in registry.added()] == ["nfs1"]


def test_concurrent_adds_are_all_kept(config: HostConfig, tmp_path: Path) -> None:
    paths = [tmp_path / "many" / f"ds{i}" for i in range(12)]
    for path in paths:
        path.mkdir(parents=True)
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            # Each thread with its own registry, as the agent and a CLI command would be.
            DatastoreRegistry(make_config(tmp_path)).add(f"ds{i}", paths[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(names(config)) == sorted(["local", *(f"ds{i}" for i in range(12))])


def test_the_lock_is_shared_with_other_processes(registry: DatastoreRegistry) -> None:
    # A second holder (another process, or here another descriptor) waits, then gives up.
    second = DatastoreRegistry(registry.config)
    with (
        registry.locked(),
        pytest.raises(Busy, match="being changed by another process"),
        second.locked(timeout=0.2),
    ):
        pass


def test_a_corrupt_file_is_reported(config: HostConfig) -> None:
    config.state_dir.mkdir(parents=True)
    config.added_datastores_file.write_text("datastores = 3\n")
    with pytest.raises(InvalidConfig, match=r"datastores\.toml"):
        config.all_datastores()


def test_host_toml_takes_precedence_over_an_added_name(config: HostConfig, tmp_path: Path) -> None:
    config.state_dir.mkdir(parents=True)
    config.added_datastores_file.write_text(
        f'[[datastores]]\nname = "local"\npath = "{tmp_path / "mnt" / "nfs1"}"\n'
    )
    assert [(d.name, d.path) for d in config.all_datastores()] == [("local", tmp_path / "local")]


# Removing


def test_remove_forgets_but_keeps_the_files(registry: DatastoreRegistry, tmp_path: Path) -> None:
    root = tmp_path / "mnt" / "nfs1"
    registry.add("nfs1", root)
    (root / "iso").mkdir()
    (root / "iso" / "boot.iso").write_bytes(b"iso")
    assert registry.remove("nfs1").name == "nfs1"
    assert names(registry.config) == ["local"]
    assert (root / "iso" / "boot.iso").read_bytes() == b"iso"
    with pytest.raises(NotFound, match="datastore 'nfs1' does not exist"):
        registry.remove("nfs1")


def test_remove_refuses_host_toml_datastores(registry: DatastoreRegistry) -> None:
    with pytest.raises(InvalidArgument, match=r"defined in host\.toml") as caught:
        registry.remove("local")
    assert caught.value.field == "name"


def test_inventory_and_creation_use_added_datastores(service: HostService, tmp_path: Path) -> None:
    run(service.datastores.add_datastore("nfs1", tmp_path / "mnt" / "nfs1"))
    vm_dir = create_vm(service, "vm1", "nfs1", new_disks=[NewDisk(size=8 << 20)])
    assert vm_dir == tmp_path / "mnt" / "nfs1" / "vm1"
    found = Inventory(make_config(tmp_path)).get("vm1")
    assert (found.datastore, found.paths.vm_dir) == ("nfs1", vm_dir)
    assert Inventory(service.config).datastore_of(vm_dir / "disk0.qcow2") is not None


def test_remove_is_refused_while_a_vm_lives_there(service: HostService, tmp_path: Path) -> None:
    run(service.datastores.add_datastore("nfs1", tmp_path / "mnt" / "nfs1"))
    create_vm(service, "web1", "nfs1")
    with pytest.raises(Busy, match=r"vm 'web1': its directory is there"):
        run(service.datastores.remove_datastore("nfs1"))
    assert names(service.config) == ["local", "nfs1"]
    run(service.delete_vm("web1"))
    run(service.datastores.remove_datastore("nfs1"))
    assert names(service.config) == ["local"]


@pytest.mark.parametrize("use", ["disk", "backing", "cdrom", "kernel", "initrd"])
def test_remove_is_refused_while_a_vm_uses_a_file_there(
    service: HostService, tmp_path: Path, use: str
) -> None:
    root = tmp_path / "mnt" / "nfs1"
    run(service.datastores.add_datastore("nfs1", root))
    qemu_img("create", "-q", "-f", "qcow2", str(root / "base.qcow2"), "16M")
    (root / "boot.iso").write_bytes(b"iso")
    (root / "vmlinuz").write_bytes(b"kernel")
    (root / "initrd.img").write_bytes(b"initrd")
    local = tmp_path / "local"
    (local / "vmlinuz").write_bytes(b"kernel")
    kernel = {"kind": "kernel", "kernel": str(root / "vmlinuz")}
    initrd = {
        "kind": "kernel",
        "kernel": str(local / "vmlinuz"),
        "initrd": str(root / "initrd.img"),
    }
    fields: dict[str, Any] = {
        "disk": {"disks": [{"name": "disk0", "path": str(root / "base.qcow2")}]},
        "cdrom": {"cdrom": {"path": str(root / "boot.iso")}},
        "kernel": {"boot": kernel},
        "initrd": {"boot": initrd},
    }.get(use, {})
    if use == "backing":  # a linked clone in another datastore, its base here
        overlay = local / "clone.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", str(root / "base.qcow2"), "-F", "qcow2",
                 str(overlay))  # fmt: skip
        fields = {"disks": [{"name": "disk0", "path": str(overlay)}]}
    create_vm(service, "user1", "local", **fields)
    with pytest.raises(Busy, match=r"datastore 'nfs1' is in use \(vm 'user1': ") as caught:
        run(service.datastores.remove_datastore("nfs1"))
    expected = {
        "disk": "disk disk0",
        "backing": "a backing file of disk disk0",
        "cdrom": "its CD-ROM ISO",
        "kernel": "its kernel",
        "initrd": "its initrd",
    }[use]
    assert expected in str(caught.value)
    assert names(service.config) == ["local", "nfs1"]
    run(service.delete_vm("user1"))
    run(service.datastores.remove_datastore("nfs1"))
    assert (root / "base.qcow2").exists()


def test_a_missing_backing_file_still_counts(service: HostService, tmp_path: Path) -> None:
    """A backing file that cannot be opened (its share unmounted, say) is still a use."""
    root = tmp_path / "mnt" / "nfs1"
    run(service.datastores.add_datastore("nfs1", root))
    qemu_img("create", "-q", "-f", "qcow2", str(root / "base.qcow2"), "16M")
    overlay = tmp_path / "local" / "clone.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(root / "base.qcow2"), "-F", "qcow2",
             str(overlay))  # fmt: skip
    create_vm(service, "user1", "local", disks=[{"name": "disk0", "path": str(overlay)}])
    (root / "base.qcow2").rename(root / "moved.qcow2")
    with pytest.raises(Busy, match="a backing file of disk disk0"):
        run(service.datastores.remove_datastore("nfs1"))


# Space


def test_space_per_datastore_and_per_vm(service: HostService, tmp_path: Path) -> None:
    root = tmp_path / "mnt" / "nfs1"
    run(service.datastores.add_datastore("nfs1", root))
    create_vm(service, "a", "nfs1", new_disks=[NewDisk(size=32 << 20), NewDisk(size=16 << 20)])
    qemu_img("create", "-q", "-f", "raw", str(root / "shared.raw"), "8M")
    shared = {"name": "disk0", "path": str(root / "shared.raw"), "format": "raw"}
    create_vm(service, "b", "local", disks=[shared])
    create_vm(service, "c", "local", disks=[shared])
    stores = {d.name: d for d in run(service.datastores.list_datastores())}
    nfs1, local = stores["nfs1"], stores["local"]
    assert (nfs1.origin, local.origin) == ("added", "host.toml")
    # The shared raw disk counts once for the datastore, for each VM it belongs to.
    assert nfs1.provisioned_bytes == (32 + 16 + 8) << 20
    vms = {v.name: v for v in nfs1.vms}
    assert set(vms) == {"a", "b", "c"}
    assert vms["a"].provisioned_bytes == 48 << 20
    assert vms["b"].provisioned_bytes == vms["c"].provisioned_bytes == 8 << 20
    a_dir = storage.allocated_bytes(root / "a")
    assert vms["a"].used_bytes == a_dir > 0
    assert nfs1.vm_used_bytes == a_dir  # VM directories only
    assert local.provisioned_bytes == 0
    assert {v.name for v in local.vms} == {"b", "c"}
    again = run(service.datastores.get_datastore("nfs1"))
    assert again.model_dump(exclude={"free_bytes"}) == nfs1.model_dump(exclude={"free_bytes"})
    assert nfs1.filesystem and nfs1.shared is False and nfs1.capacity_bytes


def test_vm_storage_of_a_linked_clone(service: HostService, tmp_path: Path) -> None:
    base_dir = create_vm(service, "tmpl", "local", new_disks=[NewDisk(size=32 << 20)])
    base = base_dir / "disk0.qcow2"
    clone_dir = create_vm(service, "clone", "local")
    overlay = clone_dir / "disk0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    raw = clone_dir / "thick.raw"
    qemu_img("create", "-q", "-f", "raw", "-o", "preallocation=full", str(raw), "4M")
    disks = [
        {"name": "disk0", "path": "disk0.qcow2"},
        {"name": "disk1", "path": "thick.raw", "format": "raw"},
    ]
    set_disks(service, "clone", disks)
    found = run(vm_storage(service, "clone"))
    assert (found.name, found.datastore, found.vm_dir) == ("clone", "local", str(clone_dir))
    disk0, disk1 = found.disks
    assert (disk0.path, disk0.datastore, disk0.format) == (str(overlay), "local", "qcow2")
    assert disk0.virtual_size_bytes == 32 << 20
    assert disk0.provisioning == "thin"
    assert [(f.path, f.vm, f.counted) for f in disk0.chain] == [
        (str(overlay), "clone", True),
        (str(base), "tmpl", False),  # the template's: listed, not counted
    ]
    assert disk0.used_bytes == disk0.chain[0].allocated_bytes == storage.allocated_bytes(overlay)
    assert (disk1.format, disk1.provisioning, disk1.virtual_size_bytes) == ("raw", "thick", 4 << 20)
    assert disk1.used_bytes >= 4 << 20
    assert found.provisioned_bytes == (32 + 4) << 20
    assert found.used_bytes == storage.allocated_bytes(clone_dir)
    # The template's own view counts its base.
    tmpl = run(vm_storage(service, "tmpl"))
    assert tmpl.disks[0].chain[0].counted and tmpl.disks[0].used_bytes > 0


def test_vm_storage_counts_its_disks_outside_its_directory(
    service: HostService, tmp_path: Path
) -> None:
    image = tmp_path / "local" / "images" / "data.qcow2"
    image.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(image), "64M")
    vm_dir = create_vm(service, "vm1", "local", disks=[{"name": "disk0", "path": str(image)}])
    found = run(vm_storage(service, "vm1"))
    [disk] = found.disks
    assert disk.chain[0].vm is None and disk.chain[0].counted
    assert found.used_bytes == storage.allocated_bytes(vm_dir) + storage.allocated_bytes(image)
    image.unlink()
    broken = run(vm_storage(service, "vm1")).disks[0]
    assert broken.error and broken.virtual_size_bytes is None and broken.chain == []
    with pytest.raises(NotFound):
        run(vm_storage(service, "nope"))


# Filesystems


MOUNTINFO = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "60 27 0:50 / /mnt/nfs rw,relatime shared:7 master:2 - nfs4 filer:/export/vms rw,vers=4.2\n"
    r"61 27 0:51 / /mnt/my\040share rw - cifs //srv/share rw"
    "\n"
    "62 60 0:52 / /mnt/nfs/local rw - tmpfs tmpfs rw\n"
)


def test_mountinfo(tmp_path: Path) -> None:
    mounts = storage.parse_mountinfo(MOUNTINFO)
    assert [(str(m.mount_point), m.fstype, m.source) for m in mounts][2:4] == [
        ("/mnt/nfs", "nfs4", "filer:/export/vms"),
        ("/mnt/my share", "cifs", "//srv/share"),
    ]
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    nfs = storage.mount_of(Path("/mnt/nfs/vms/a"), info)
    assert nfs is not None and (nfs.fstype, nfs.shared) == ("nfs4", True)
    cifs = storage.mount_of(Path("/mnt/my share"), info)
    assert cifs is not None and cifs.shared
    inner = storage.mount_of(Path("/mnt/nfs/local/x"), info)
    assert inner is not None and (inner.fstype, inner.shared) == ("tmpfs", False)
    root = storage.mount_of(Path("/srv"), info)
    assert root is not None and (root.fstype, root.shared) == ("ext4", False)


def test_the_real_mount_of_a_datastore(tmp_path: Path) -> None:
    info = storage.datastore_space("x", tmp_path, "added")
    mount = storage.mount_of(tmp_path)
    assert mount is not None
    assert (info.filesystem, info.mount_source, info.origin) == (
        mount.fstype,
        mount.source,
        "added",
    )
    assert info.vm_used_bytes is None and info.accessible
