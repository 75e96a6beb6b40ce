"""The CLI's contract: bad input is one line on stderr, a non-zero exit, and no change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .clienv import host_env, tv


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return host_env(tmp_path)


def datastore(env: dict[str, str]) -> list[str]:
    ds = Path(env["THINVISOR_CONFIG"]).parent / "ds"
    return sorted(p.name for p in ds.iterdir()) if ds.exists() else []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["a/b"], "error: name: must not contain '/' or '..'\n"),
        (["a..b"], "error: name: must not contain '/' or '..'\n"),
        (["x" * 65], "error: name: must be at most 64 characters\n"),
        (
            ["vm1", "--memory", "16"],
            "error: memory_mib: Input should be greater than or equal to 32\n",
        ),
        (["vm1", "--memory", "lots"], "error: memory: 'lots' is not a size like 512M or 10G\n"),
        (["vm1", "--vcpus", "999"], "error: vcpus: Input should be less than or equal to 255\n"),
        (
            ["vm1", "--machine", "isapc"],
            "error: machine: Input should be 'q35', 'pc' or 'microvm'\n",
        ),
        (["vm1", "--disk", "1G", "--disk-bus", "usb"], None),
        (
            ["vm1", "--disk", "1G", "--disk-format", "vmdk"],
            "error: format: Input should be 'qcow2' or 'raw'\n",
        ),
        (["vm1", "--kernel", "/nonexistent"], "error: kernel: /nonexistent does not exist\n"),
        (["vm1", "--disk", "10Q"], "error: disk: '10Q' is not a size like 512M or 10G\n"),
        (
            ["vm1", "--cdrom", "/nonexistent.iso"],
            "error: cdrom.path: /nonexistent.iso does not exist\n",
        ),
        (["vm1", "--nic", "dmz"], "error: nics.net0.network: no port group 'dmz' on this host\n"),
        (
            ["vm1", "--import-disk", "/etc/hostname"],
            "error: disk: /etc/hostname is outside the host's datastores\n",
        ),
    ],
)
def test_bad_create_input(env: dict[str, str], args: list[str], message: str | None) -> None:
    err = tv(env, "vm", "create", *args, code=1)
    assert err.count("\n") == 1 and err.startswith("error: ")
    if message is not None:
        assert err == message
    assert datastore(env) == []


def test_memory_above_the_hosts_free_memory(env: dict[str, str]) -> None:
    err = tv(env, "vm", "create", "vm1", "--memory", "64T", code=1)
    assert err.startswith("error: memory_mib: ") and "free" in err
    assert datastore(env) == []


def test_duplicate_name(env: dict[str, str]) -> None:
    tv(env, "vm", "create", "vm1", "--memory", "64")
    assert tv(env, "vm", "create", "vm1", code=1) == "error: vm 'vm1' already exists\n"
    shown = json.loads(tv(env, "vm", "show", "vm1", "--json"))
    assert shown["spec"]["memory_mib"] == 64


def test_unknown_field_in_a_spec_file(env: dict[str, str], tmp_path: Path) -> None:
    spec = tmp_path / "vm.toml"
    spec.write_text('name = "x"\nmemory_mib = 64\ncolour = "blue"\n')
    err = tv(env, "vm", "create", "vm1", "--from-file", str(spec), code=1)
    assert err == "error: colour: unknown field\n"
    assert datastore(env) == []


def test_spec_file_is_taken_whole(env: dict[str, str], tmp_path: Path) -> None:
    spec = tmp_path / "vm.toml"
    spec.write_text('name = "ignored"\nmemory_mib = 48\nvcpus = 2\nmachine = "pc"\n')
    tv(env, "vm", "create", "vm1", "--from-file", str(spec))
    shown = json.loads(tv(env, "vm", "show", "vm1", "--json"))
    assert (shown["name"], shown["spec"]["memory_mib"], shown["spec"]["machine"]) == (
        "vm1",
        48,
        "pc",
    )


def test_list_and_show(env: dict[str, str]) -> None:
    tv(env, "vm", "create", "vm1", "--memory", "64")
    tv(env, "vm", "create", "vm2", "--memory", "1G", "--vcpus", "2", "--no-nic", "--no-cdrom")
    listed = json.loads(tv(env, "vm", "list", "--json"))
    assert [(v["name"], v["state"]) for v in listed] == [("vm1", "stopped"), ("vm2", "stopped")]
    assert listed[1]["spec"]["memory_mib"] == 1024
    assert listed[1]["spec"]["nics"] == [] and listed[1]["spec"]["cdrom"] is None
    mac = listed[0]["spec"]["nics"][0]["mac"]
    assert mac.startswith("02:74:76:")
    table = tv(env, "vm", "list")
    assert "vm1" in table and "stopped" in table
    assert "02:74:76" in tv(env, "vm", "show", "vm1")


def test_corrupt_vm_toml_is_listed_invalid(env: dict[str, str]) -> None:
    tv(env, "vm", "create", "vm1", "--memory", "64")
    tv(env, "vm", "create", "vm2", "--memory", "64")
    vm_toml = Path(env["THINVISOR_CONFIG"]).parent / "ds" / "vm1" / "vm.toml"
    vm_toml.write_text("[[[ not toml")
    listed = json.loads(tv(env, "vm", "list", "--json"))
    assert [(v["name"], v["state"]) for v in listed] == [("vm1", "invalid"), ("vm2", "stopped")]
    assert "vm.toml" in listed[0]["error"]
    assert tv(env, "vm", "start", "vm1", code=1).startswith("error: vm 'vm1' is invalid: vm.toml")


def test_wrong_state_and_unknown_vm(env: dict[str, str]) -> None:
    tv(env, "vm", "create", "vm1", "--memory", "64")
    assert tv(env, "vm", "pause", "vm1", code=1) == "error: vm 'vm1': cannot pause while stopped\n"
    assert tv(env, "vm", "start", "ghost", code=1) == "error: vm 'ghost' does not exist\n"
    assert tv(env, "vm", "console", "vm1", code=1) == (
        "error: vm 'vm1': cannot attach the console while stopped\n"
    )


def test_disk_commands_on_a_stopped_vm(env: dict[str, str]) -> None:
    tv(env, "vm", "create", "vm1", "--memory", "64", "--disk", "16M")
    assert "added disk1" in tv(env, "vm", "disk", "add", "vm1", "--size", "8M", "--format", "raw")
    assert "disk1 is now 16M" in tv(env, "vm", "disk", "resize", "vm1", "disk1", "+8M")
    err = tv(env, "vm", "disk", "resize", "vm1", "disk1", "1M", code=1)
    assert err.startswith("error: size: shrinking is not supported")
    assert tv(env, "vm", "disk", "add", "vm1", "--size", "8M", "--bus", "usb", code=1) == (
        "error: bus: Input should be 'virtio', 'scsi' or 'ide'\n"
    )
    tv(env, "vm", "disk", "remove", "vm1", "disk1")
    shown = json.loads(tv(env, "vm", "show", "vm1", "--json"))
    assert [d["name"] for d in shown["spec"]["disks"]] == ["disk0"]
    assert tv(env, "vm", "disk", "remove", "vm1", "disk9", code=1) == (
        "error: vm 'vm1' has no disk 'disk9'\n"
    )


def test_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text('accel = "fast"\n')
    err = tv({"THINVISOR_CONFIG": str(config)}, "vm", "list", code=1)
    assert err.startswith("error: config: ") and "accel" in err


def test_delete(env: dict[str, str]) -> None:
    tv(env, "vm", "create", "vm1", "--memory", "64", "--disk", "8M")
    assert tv(env, "vm", "delete", "vm1") == "vm1: deleted\n"
    assert datastore(env) == []


def test_boot_order(env: dict[str, str]) -> None:
    tv(env, "vm", "create", "vm1", "--memory", "64", "--boot-order", "cdrom,disk")
    shown = json.loads(tv(env, "vm", "show", "vm1", "--json"))
    assert shown["spec"]["boot"] == {"kind": "firmware", "order": ["cdrom", "disk"]}
    err = tv(env, "vm", "create", "vm2", "--boot-order", "floppy", code=1)
    assert err.startswith("error: boot.order.0: Input should be 'disk', 'cdrom' or 'network'")
    err = tv(env, "vm", "create", "vm2", "--boot-order", "disk,disk", code=1)
    assert err == "error: boot.order: must not repeat a device\n"
    err = tv(env, "vm", "create", "vm2", "--kernel", "/k", "--boot-order", "disk", code=1)
    assert err == "error: boot-order: applies to firmware boot, not a kernel\n"


def test_set_changes_a_stopped_vm(env: dict[str, str]) -> None:
    tv(env, "vm", "create", "vm1", "--memory", "64")
    tv(
        env,
        "vm",
        "set",
        "vm1",
        "--memory",
        "96",
        "--vcpus",
        "2",
        "--autostart",
        "--autostart-order",
        "3",
    )
    spec = json.loads(tv(env, "vm", "show", "vm1", "--json"))["spec"]
    assert (spec["memory_mib"], spec["vcpus"], spec["autostart"], spec["autostart_order"]) == (
        96,
        2,
        True,
        3,
    )
    assert tv(env, "vm", "set", "vm1", code=1) == (
        "error: settings: give at least one option to change\n"
    )
    assert tv(env, "vm", "set", "vm1", "--memory", "8", code=1) == (
        "error: memory_mib: Input should be greater than or equal to 32\n"
    )
    tv(env, "vm", "set", "vm1", "--no-autostart")
    assert json.loads(tv(env, "vm", "show", "vm1", "--json"))["spec"]["autostart"] is False


def test_tables_print_macs_and_fingerprints_literally() -> None:
    # rich would turn ":ab:" into an emoji and "[...]" into markup by default.
    from thinvisor.cli import common

    con = common.console()
    with con.capture() as captured:
        con.print("02:ab:76:ab:00:01 AF:85:7E:AB:67")
    assert captured.get().strip() == "02:ab:76:ab:00:01 AF:85:7E:AB:67"


def test_resources_of_a_stopped_vm(env: dict[str, str]) -> None:
    tv(env, "vm", "create", "vm1", "--memory", "256", "--disk", "64M")
    tv(env, "vm", "resources", "vm1", "--cpu-shares", "high", "--memory-limit", "128")
    shown = json.loads(tv(env, "vm", "resources", "vm1", "--json"))
    assert (shown["cpu_shares"], shown["memory_limit_mib"], shown["cpu_limit_mhz"]) == (
        "high",
        128,
        None,
    )
    assert "cpu shares" in tv(env, "vm", "resources", "vm1")
    # A limit below the reservation, shares out of range: one line, nothing changed.
    assert tv(env, "vm", "resources", "vm1", "--memory-reservation", "200", code=1) == (
        "error: resources: memory_limit_mib must not be below memory_reservation_mib\n"
    )
    assert tv(env, "vm", "resources", "vm1", "--cpu-shares", "0", code=1).startswith(
        "error: cpu_shares:"
    )
    assert json.loads(tv(env, "vm", "resources", "vm1", "--json")) == shown
    tv(env, "vm", "resources", "vm1", "--memory-limit", "0")
    assert json.loads(tv(env, "vm", "resources", "vm1", "--json"))["memory_limit_mib"] is None
    # Disk limits are kept in the spec; a balloon needs a running VM.
    assert "iops_total 500" in tv(env, "vm", "disk", "limits", "vm1", "disk0", "--iops", "500")
    disk = json.loads(tv(env, "vm", "show", "vm1", "--json"))["spec"]["disks"][0]
    assert disk["limits"]["iops_total"] == 500
    assert tv(
        env, "vm", "disk", "limits", "vm1", "disk0", "--iops", "5", "--iops-read", "1", code=1
    )
    assert "stopped" in tv(env, "vm", "balloon", "vm1", "128", code=1)
