"""VmSpec validation: every kind of bad input gets one clear error naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from thinvisor.errors import InvalidArgument
from thinvisor.model import VmSpec, parse_spec

MAC = "02:74:76:00:00:01"


def spec(**fields: Any) -> dict[str, Any]:
    return {"name": "vm1", **fields}


def error_of(data: dict[str, Any]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        parse_spec(data)
    return info.value


def test_defaults_are_a_valid_vm() -> None:
    vm = parse_spec(spec())
    assert vm.vcpus == 1 and vm.memory_mib == 256 and vm.machine == "q35"
    assert [s.name for s in vm.serials] == ["serial0"]
    assert vm.boot.kind == "firmware"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must not be empty"),
        ("x" * 65, "at most 64"),
        ("a/b", "'/'"),
        ("a..b", "'..'"),
        ("..", "'..'"),
        (".hidden", "starting with a letter or digit"),
        ("sp ace", "only letters"),
    ],
)
def test_bad_names(name: str, reason: str) -> None:
    err = error_of(spec(name=name))
    assert err.field == "name"
    assert reason in err.reason


def test_longest_name_is_accepted() -> None:
    assert parse_spec(spec(name="a" * 64)).name == "a" * 64


def test_memory_below_minimum() -> None:
    err = error_of(spec(memory_mib=31))
    assert err.field == "memory_mib"
    assert "32" in err.reason


def test_memory_minimum_is_accepted() -> None:
    assert parse_spec(spec(memory_mib=32)).memory_mib == 32


@pytest.mark.parametrize("vcpus", [0, -1, 256])
def test_vcpus_out_of_range(vcpus: int) -> None:
    assert error_of(spec(vcpus=vcpus)).field == "vcpus"


def test_unknown_top_level_field() -> None:
    err = error_of(spec(colour="blue"))
    assert (err.field, err.reason) == ("colour", "unknown field")


def test_unknown_nested_field_is_named_with_its_path() -> None:
    err = error_of(spec(disks=[{"name": "disk0", "path": "d.qcow2", "speed": 3}]))
    assert err.field == "disks.0.speed"
    assert err.reason == "unknown field"


def test_missing_kernel_for_kernel_boot() -> None:
    err = error_of(spec(boot={"kind": "kernel"}))
    assert err.field == "boot.kernel"


def test_unknown_boot_kind() -> None:
    assert error_of(spec(boot={"kind": "pxe"})).field == "boot"


def test_boot_order_must_not_repeat() -> None:
    err = error_of(spec(boot={"kind": "firmware", "order": ["disk", "disk"]}))
    assert err.field == "boot.order"


@pytest.mark.parametrize(
    ("field", "value"),
    [("bus", "floppy"), ("format", "vmdk"), ("name", "Disk 0"), ("path", "")],
)
def test_bad_disk_fields(field: str, value: str) -> None:
    disk = {"name": "disk0", "path": "d.qcow2", field: value}
    assert error_of(spec(disks=[disk])).field == f"disks.0.{field}"


def test_duplicate_device_names() -> None:
    disks = [{"name": "disk0", "path": "a"}, {"name": "disk0", "path": "b"}]
    err = error_of(spec(disks=disks))
    assert "disk0" in err.reason


@pytest.mark.parametrize("mac", ["02:74:76:00:00", "zz:74:76:00:00:01", "03:00:00:00:00:01"])
def test_bad_mac(mac: str) -> None:
    assert error_of(spec(nics=[{"name": "net0", "mac": mac}])).field == "nics.0.mac"


def test_duplicate_macs() -> None:
    nics = [{"name": "net0", "mac": MAC}, {"name": "net1", "mac": MAC.upper()}]
    assert "MAC" in error_of(spec(nics=nics)).reason


def test_microvm_needs_kernel_boot_and_virtio() -> None:
    assert "kernel boot" in error_of(spec(machine="microvm")).reason
    boot = {"kind": "kernel", "kernel": "k"}
    disks = [{"name": "disk0", "path": "d", "bus": "ide"}]
    assert "virtio" in error_of(spec(machine="microvm", boot=boot, disks=disks)).reason


def test_bad_uuid() -> None:
    assert error_of(spec(uuid="not-a-uuid")).field == "uuid"


def test_next_device_name_skips_taken_names() -> None:
    vm = VmSpec.model_validate(
        spec(disks=[{"name": "disk0", "path": "a"}, {"name": "disk2", "path": "b"}])
    )
    assert vm.next_device_name("disk") == "disk1"
    assert vm.next_device_name("net") == "net0"
