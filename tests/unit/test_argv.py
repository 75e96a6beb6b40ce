"""The QEMU command line: every convention the rest of the engine relies on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from thinvisor.errors import InvalidArgument
from thinvisor.host.engine.accel import AccelChoice
from thinvisor.host.engine.argv import (
    BALLOON_ID,
    ROOT_PORTS,
    build_argv,
    escape_option,
    pci_placement,
)
from thinvisor.host.engine.paths import VmPaths
from thinvisor.model.vm import PCI_SLOT_MAX, MachineType, VmSpec, parse_spec

PATHS = VmPaths(Path("/ds/web,1"), Path("/run/tv/vms/web,1"))
TCG = AccelChoice("tcg", "configured")
KVM = AccelChoice("kvm", "works")
UUID = "0f6cbd4a-95c3-4b7f-a4a3-0e8f2b3c5d6e"
KERNEL = {"kind": "kernel", "kernel": "vmlinuz", "initrd": "/images/initrd", "cmdline": "quiet"}


def make_spec(**fields: Any) -> VmSpec:
    return parse_spec({"name": "web", "uuid": UUID, **fields})


def disk(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "path": f"{name}.qcow2", **fields}


def nic(name: str, n: int = 1, **fields: Any) -> dict[str, Any]:
    return {"name": name, "mac": f"52:54:00:00:00:{n:02x}", **fields}


def argv_of(spec: VmSpec, accel: AccelChoice = TCG, **kwargs: Any) -> list[str]:
    return build_argv(spec, PATHS, accel, **kwargs)


def values(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``, in order."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def value(argv: list[str], flag: str) -> str:
    found = values(argv, flag)
    assert len(found) == 1, f"{flag}: {found}"
    return found[0]


def devices(argv: list[str], driver: str) -> list[str]:
    return [d for d in values(argv, "-device") if d.split(",")[0] == driver]


def device(argv: list[str], device_id: str) -> str:
    found = [d for d in values(argv, "-device") if f",id={device_id}," in f"{d},"]
    assert len(found) == 1, f"{device_id}: {found}"
    return found[0]


def props(dev: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in dev.split(",")[1:])


def blockdevs(argv: list[str]) -> dict[str, dict[str, Any]]:
    nodes = [json.loads(v) for v in values(argv, "-blockdev")]
    return {node["node-name"]: node for node in nodes}


# --- always there ---------------------------------------------------------------------


def test_fixed_options() -> None:
    argv = argv_of(make_spec(memory_mib=512, vcpus=2))
    assert argv[0] == "qemu-system-x86_64"
    assert value(argv, "-name") == "web,debug-threads=on"
    assert value(argv, "-uuid") == UUID
    assert {"-nodefaults", "-no-user-config"} <= set(argv)
    assert value(argv, "-m") == "512"
    assert value(argv, "-smp") == "2"
    assert value(argv, "-display") == "none"
    assert value(argv, "-pidfile") == "/run/tv/vms/web,1/qemu.pid"
    assert value(argv, "-qmp") == "unix:/run/tv/vms/web,,1/qmp.sock,server=on,wait=off"
    assert value(argv, "-sandbox") == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    )
    assert value(argv, "-msg") == "timestamp=on"
    assert value(argv, "-rtc") == "base=utc"
    assert "-daemonize" not in argv
    assert "-incoming" not in argv


def test_qemu_binary() -> None:
    assert argv_of(make_spec(), qemu_binary="/opt/qemu/bin/qemu")[0] == "/opt/qemu/bin/qemu"


def test_incoming_is_deferred() -> None:
    assert value(argv_of(make_spec(), incoming=True), "-incoming") == "defer"


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_tcg_machine_has_no_cpu(machine: str) -> None:
    argv = argv_of(make_spec(machine=machine))
    assert value(argv, "-machine") == f"{machine},accel=tcg,mem-merge=on"
    assert "-cpu" not in argv


def test_kvm_uses_the_host_cpu() -> None:
    argv = argv_of(make_spec(), KVM)
    assert value(argv, "-machine") == "q35,accel=kvm,mem-merge=on"
    assert value(argv, "-cpu") == "host"


def test_microvm_machine() -> None:
    argv = argv_of(make_spec(machine="microvm", boot=KERNEL))
    assert value(argv, "-machine") == "microvm,pcie=on,rtc=on,accel=tcg,mem-merge=on"


def test_pure() -> None:
    spec = make_spec(disks=[disk("d0")], nics=[nic("n0")])
    assert argv_of(spec) == argv_of(spec)


def test_escape_option() -> None:
    assert escape_option("/a,b,,c") == "/a,,b,,,,c"
    assert escape_option(Path("/plain")) == "/plain"


# --- boot -----------------------------------------------------------------------------


def test_kernel_boot_resolves_paths() -> None:
    argv = argv_of(make_spec(boot=KERNEL))
    assert value(argv, "-kernel") == "/ds/web,1/vmlinuz"
    assert value(argv, "-initrd") == "/images/initrd"
    assert value(argv, "-append") == "quiet"


def test_kernel_boot_without_initrd_or_cmdline() -> None:
    argv = argv_of(make_spec(boot={"kind": "kernel", "kernel": "/k"}))
    assert "-initrd" not in argv
    assert "-append" not in argv


def test_microvm_gets_the_tsc_frequency() -> None:
    argv = argv_of(make_spec(machine="microvm", boot=KERNEL), tsc_khz=2300000)
    assert value(argv, "-append") == "quiet tsc_early_khz=2300000"
    bare = make_spec(machine="microvm", boot={"kind": "kernel", "kernel": "/k"})
    assert value(argv_of(bare, tsc_khz=1000), "-append") == "tsc_early_khz=1000"
    assert value(argv_of(make_spec(machine="microvm", boot=KERNEL)), "-append") == "quiet"


def test_tsc_frequency_only_for_microvm() -> None:
    assert value(argv_of(make_spec(boot=KERNEL), tsc_khz=2300000), "-append") == "quiet"


def test_kernel_boot_sets_no_bootindex() -> None:
    argv = argv_of(make_spec(boot=KERNEL, disks=[disk("d0")], nics=[nic("n0")]))
    assert not [d for d in values(argv, "-device") if "bootindex" in d]


def test_firmware_boot_order() -> None:
    spec = make_spec(
        boot={"kind": "firmware", "order": ["cdrom", "network", "disk"]},
        disks=[disk("d0"), disk("d1")],
        cdrom={"path": "x.iso"},
        nics=[nic("n0", 1), nic("n1", 2)],
    )
    argv = argv_of(spec)
    assert "-kernel" not in argv
    assert props(device(argv, "cdrom0"))["bootindex"] == "1"
    assert props(device(argv, "n0"))["bootindex"] == "2"
    assert props(device(argv, "d0"))["bootindex"] == "3"
    assert "bootindex" not in props(device(argv, "d1"))
    assert "bootindex" not in props(device(argv, "n1"))


def test_boot_order_skips_missing_devices() -> None:
    spec = make_spec(boot={"kind": "firmware", "order": ["cdrom", "disk"]}, disks=[disk("d0")])
    assert props(device(argv_of(spec), "d0"))["bootindex"] == "1"


# --- disks ----------------------------------------------------------------------------


def test_disk_block_nodes() -> None:
    argv = argv_of(make_spec(disks=[disk("d0"), disk("d1", path="/x/a,b.img", format="raw")]))
    nodes = blockdevs(argv)
    assert nodes["d0-file"] == {
        "driver": "file",
        "node-name": "d0-file",
        "filename": "/ds/web,1/d0.qcow2",
        "cache": {"direct": False},
        "discard": "unmap",
    }
    assert nodes["d0-fmt"] == {
        "driver": "qcow2",
        "node-name": "d0-fmt",
        "file": "d0-file",
        "discard": "unmap",
    }
    assert nodes["d1-file"]["filename"] == "/x/a,b.img"  # JSON: no escaping needed
    assert nodes["d1-fmt"]["driver"] == "raw"
    assert all(v.startswith("{") for v in values(argv, "-blockdev"))


def test_readonly_disk() -> None:
    nodes = blockdevs(argv_of(make_spec(disks=[disk("d0", readonly=True)])))
    assert nodes["d0-file"]["read-only"] is True
    assert nodes["d0-fmt"]["read-only"] is True


def test_virtio_disk() -> None:
    argv = argv_of(make_spec(disks=[disk("d0")]))
    assert device(argv, "d0") == "virtio-blk-pci,bus=rp1,drive=d0-fmt,id=d0,bootindex=1"


def test_scsi_disks_share_one_controller() -> None:
    spec = make_spec(disks=[disk("d0", bus="scsi"), disk("d1", bus="scsi")], cdrom={"bus": "scsi"})
    argv = argv_of(spec)
    assert devices(argv, "virtio-scsi-pci") == ["virtio-scsi-pci,id=scsi0,bus=rp0"]
    assert device(argv, "d0") == "scsi-hd,bus=scsi0.0,drive=d0-fmt,id=d0,bootindex=1"
    assert device(argv, "d1") == "scsi-hd,bus=scsi0.0,drive=d1-fmt,id=d1"


def test_scsi_cdrom_alone_creates_the_controller() -> None:
    argv = argv_of(make_spec(cdrom={"bus": "scsi"}))
    assert devices(argv, "virtio-scsi-pci") == ["virtio-scsi-pci,id=scsi0,bus=rp0"]


def test_no_scsi_controller_without_scsi() -> None:
    argv = argv_of(make_spec(disks=[disk("d0")], cdrom={}))
    assert devices(argv, "virtio-scsi-pci") == []


def test_pc_ide_disks_around_the_cdrom() -> None:
    spec = make_spec(
        machine="pc", disks=[disk(f"d{n}", bus="ide") for n in range(3)], cdrom={"bus": "ide"}
    )
    argv = argv_of(spec)
    assert props(device(argv, "cdrom0"))["bus"] == "ide.1"
    assert props(device(argv, "cdrom0"))["unit"] == "0"
    positions = [
        (props(device(argv, f"d{n}"))["bus"], props(device(argv, f"d{n}"))["unit"])
        for n in range(3)
    ]
    assert positions == [("ide.0", "0"), ("ide.0", "1"), ("ide.1", "1")]
    assert device(argv, "d0").startswith("ide-hd,bus=ide.0,unit=0,drive=d0-fmt,id=d0")


def test_pc_ide_without_cdrom_has_four_places() -> None:
    spec = make_spec(machine="pc", disks=[disk(f"d{n}", bus="ide") for n in range(4)])
    assert props(device(argv_of(spec), "d2")) == {
        "bus": "ide.1",
        "unit": "0",
        "drive": "d2-fmt",
        "id": "d2",
    }


def test_q35_ide_disks_around_the_cdrom() -> None:
    spec = make_spec(disks=[disk(f"d{n}", bus="ide") for n in range(5)], cdrom={})
    argv = argv_of(spec)
    assert props(device(argv, "cdrom0"))["bus"] == "ide.2"
    assert [props(device(argv, f"d{n}"))["bus"] for n in range(5)] == [
        "ide.0",
        "ide.1",
        "ide.3",
        "ide.4",
        "ide.5",
    ]
    assert "unit" not in props(device(argv, "d0"))


@pytest.mark.parametrize(("machine", "room"), [("pc", 3), ("q35", 5)])
def test_too_many_ide_disks(machine: str, room: int) -> None:
    spec = make_spec(
        machine=machine, disks=[disk(f"d{n}", bus="ide") for n in range(room + 1)], cdrom={}
    )
    with pytest.raises(InvalidArgument) as info:
        argv_of(spec)
    assert info.value.field == "disks"


def test_ide_disk_cannot_be_readonly() -> None:
    with pytest.raises(InvalidArgument) as info:
        argv_of(make_spec(disks=[disk("d0", bus="ide", readonly=True)]))
    assert info.value.field == "disks.d0.readonly"


# --- CD-ROM ---------------------------------------------------------------------------


def test_cdrom_with_iso() -> None:
    argv = argv_of(make_spec(cdrom={"path": "boot.iso"}))
    nodes = blockdevs(argv)
    assert nodes["cdrom0-file"] == {
        "driver": "file",
        "node-name": "cdrom0-file",
        "filename": "/ds/web,1/boot.iso",
        "read-only": True,
    }
    assert nodes["cdrom0-fmt"] == {
        "driver": "raw",
        "node-name": "cdrom0-fmt",
        "file": "cdrom0-file",
        "read-only": True,
    }
    assert device(argv, "cdrom0") == "ide-cd,drive=cdrom0-fmt,id=cdrom0,bus=ide.2,bootindex=1"


def test_empty_cdrom_has_no_drive() -> None:
    argv = argv_of(make_spec(machine="pc", cdrom={}, boot={"kind": "firmware", "order": ["disk"]}))
    assert blockdevs(argv) == {}
    assert device(argv, "cdrom0") == "ide-cd,id=cdrom0,bus=ide.1,unit=0"


def test_scsi_cdrom() -> None:
    argv = argv_of(make_spec(cdrom={"path": "/i.iso", "bus": "scsi"}))
    assert device(argv, "cdrom0") == "scsi-cd,drive=cdrom0-fmt,id=cdrom0,bus=scsi0.0,bootindex=1"
    empty = argv_of(make_spec(cdrom={"bus": "scsi"}))
    assert device(empty, "cdrom0") == "scsi-cd,id=cdrom0,bus=scsi0.0,bootindex=1"


# --- NICs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "driver"), [("virtio", "virtio-net-pci"), ("e1000", "e1000"), ("rtl8139", "rtl8139")]
)
def test_user_network_nic(model: str, driver: str) -> None:
    argv = argv_of(make_spec(machine="pc", nics=[nic("n0", model=model)]))
    assert value(argv, "-netdev") == "user,id=n0-net"
    assert device(argv, "n0") == (
        f"{driver},bus=pci.0,addr=0x4,netdev=n0-net,mac=52:54:00:00:00:01,id=n0"
    )


def test_port_group_nic_uses_the_tap_descriptor() -> None:
    spec = make_spec(machine="pc", nics=[nic("n0", network="lan")])
    argv = argv_of(spec, tap_fds={"n0": 7})
    assert value(argv, "-netdev") == "tap,id=n0-net,fd=7"
    assert device(argv, "n0").startswith("virtio-net-pci,bus=pci.0,addr=0x4,netdev=n0-net,")


def test_port_group_nic_without_a_tap() -> None:
    with pytest.raises(InvalidArgument) as info:
        argv_of(make_spec(nics=[nic("n0", network="lan")]))
    assert info.value.field == "nics.n0.network"
    assert "no TAP prepared" in info.value.reason


# --- serial, parallel, graphics -------------------------------------------------------


def test_serial_ports_in_order() -> None:
    argv = argv_of(make_spec(serials=[{"name": "serial0"}, {"name": "ttyb"}]))
    assert values(argv, "-chardev") == [
        "socket,id=serial0,path=/run/tv/vms/web,,1/serial0.sock,server=on,wait=off,"
        "logfile=/ds/web,,1/logs/serial0.log,logappend=on",
        "socket,id=ttyb,path=/run/tv/vms/web,,1/ttyb.sock,server=on,wait=off,"
        "logfile=/ds/web,,1/logs/ttyb.log,logappend=on",
    ]
    assert values(argv, "-serial") == ["chardev:serial0", "chardev:ttyb"]


def test_no_serial_ports() -> None:
    argv = argv_of(make_spec(serials=[]))
    assert "-serial" not in argv
    assert "-chardev" not in argv


def test_microvm_extra_serial_ports_are_isa_devices() -> None:
    spec = make_spec(machine="microvm", boot=KERNEL, serials=[{"name": "s0"}, {"name": "s1"}])
    argv = argv_of(spec)
    assert values(argv, "-serial") == ["chardev:s0"]
    assert devices(argv, "isa-serial") == ["isa-serial,chardev=s1,index=1"]


def test_parallel_port() -> None:
    argv = argv_of(make_spec(parallel={}))
    assert values(argv, "-chardev")[-1] == "file,id=parallel0,path=/ds/web,,1/logs/parallel0.log"
    assert value(argv, "-parallel") == "chardev:parallel0"


@pytest.mark.parametrize("parallel", [None, {"enabled": False}])
def test_no_parallel_port(parallel: dict[str, bool] | None) -> None:
    argv = argv_of(make_spec(parallel=parallel))
    assert "-parallel" not in argv
    assert "parallel0" not in " ".join(argv)


def test_microvm_parallel_port_is_an_isa_device() -> None:
    argv = argv_of(make_spec(machine="microvm", boot=KERNEL, parallel={}))
    assert "-parallel" not in argv
    assert devices(argv, "isa-parallel") == ["isa-parallel,chardev=parallel0"]


@pytest.mark.parametrize(("machine", "bus"), [("q35", "pcie.0,addr=0x1"), ("pc", "pci.0,addr=0x2")])
def test_vnc(machine: str, bus: str) -> None:
    argv = argv_of(make_spec(machine=machine))
    assert value(argv, "-vnc") == "unix:/run/tv/vms/web,,1/vnc.sock"
    assert devices(argv, "VGA") == [f"VGA,id=video0,bus={bus}"]
    assert value(argv, "-display") == "none"


def test_no_graphics() -> None:
    argv = argv_of(make_spec(graphics={"kind": "none"}))
    assert "-vnc" not in argv
    assert devices(argv, "VGA") == []
    assert value(argv, "-display") == "none"


def test_microvm_has_no_graphics() -> None:
    argv = argv_of(make_spec(machine="microvm", boot=KERNEL))
    assert "-vnc" not in argv
    assert devices(argv, "VGA") == []


# --- PCI placement --------------------------------------------------------------------


def q35_full() -> VmSpec:
    return make_spec(
        disks=[disk("d0"), disk("d1", bus="scsi"), disk("d2"), disk("d3", bus="ide")],
        nics=[nic("n0", 1), nic("n1", 2, model="e1000")],
    )


def test_q35_root_ports() -> None:
    argv = argv_of(q35_full())
    ports = devices(argv, "pcie-root-port")
    assert len(ports) == ROOT_PORTS == 16
    assert [props(p)["id"] for p in ports] == [f"rp{n}" for n in range(ROOT_PORTS)]
    assert all(props(p)["bus"] == "pcie.0" for p in ports)
    pairs = {(props(p)["chassis"], props(p)["slot"]) for p in ports}
    assert len(pairs) == len(ports)


def test_q35_each_pci_device_on_its_own_port() -> None:
    argv = argv_of(q35_full())
    buses = [props(device(argv, i))["bus"] for i in ("scsi0", "d0", "d2", "n0", "n1")]
    assert buses == ["rp0", "rp1", "rp2", "rp3", "rp4"]
    assert props(device(argv, "d3"))["bus"] == "ide.0"  # not PCI


def test_q35_root_ports_come_before_their_devices() -> None:
    argv = argv_of(q35_full())
    devs = values(argv, "-device")
    last_port = max(i for i, d in enumerate(devs) if d.startswith("pcie-root-port"))
    assert all(not d.startswith(("virtio", "e1000")) for d in devs[:last_port])


def test_slots_kept_in_the_spec_decide_the_placement() -> None:
    # A disk hot-added into slot 1 keeps it, even though it comes after the others.
    spec = make_spec(disks=[disk("d0", slot=2), disk("d1", slot=1)], nics=[nic("n0")])
    argv = argv_of(spec)
    assert [props(device(argv, i))["bus"] for i in ("d0", "d1", "n0")] == ["rp2", "rp1", "rp3"]


def test_the_same_spec_always_gives_the_same_hardware() -> None:
    spec = q35_full()
    assert argv_of(spec) == argv_of(spec.with_pci_slots())


def test_pc_devices_on_pci0_at_fixed_addresses() -> None:
    spec = make_spec(machine="pc", disks=[disk("d0"), disk("d1", bus="scsi")], nics=[nic("n0")])
    argv = argv_of(spec)
    assert devices(argv, "pcie-root-port") == []
    placed = {
        i: (props(device(argv, i))["bus"], props(device(argv, i))["addr"])
        for i in ("scsi0", "d0", "n0")
    }
    assert placed == {"scsi0": ("pci.0", "0x3"), "d0": ("pci.0", "0x4"), "n0": ("pci.0", "0x5")}
    assert pci_placement("pc", 7) == {"bus": "pci.0", "addr": "0xa"}


def test_microvm_devices_on_pcie0() -> None:
    spec = make_spec(machine="microvm", boot=KERNEL, disks=[disk("d0")], nics=[nic("n0")])
    argv = argv_of(spec)
    assert devices(argv, "pcie-root-port") == []
    assert {props(device(argv, i))["bus"] for i in ("d0", "n0")} == {"pcie.0"}


def test_q35_placement_is_a_root_port() -> None:
    assert pci_placement("q35", 5) == {"bus": "rp5"}


@pytest.mark.parametrize("machine", ["q35", "pc", "microvm"])
def test_pci_slots_run_out(machine: str) -> None:
    boot = KERNEL if machine == "microvm" else {"kind": "firmware"}
    nics = [nic(f"n{n}", n + 1) for n in range(15)]
    argv_of(make_spec(machine=machine, boot=boot, nics=nics))
    nics.append(nic("extra", 250))
    with pytest.raises(InvalidArgument) as info:
        argv_of(make_spec(machine=machine, boot=boot, nics=nics))
    assert info.value.field == "nics"
    assert "too many PCI devices" in info.value.reason


# --- memory: page sharing and the balloon ---------------------------------------------


@pytest.mark.parametrize(("sharing", "merge"), [(True, "on"), (False, "off")])
def test_page_sharing_is_mem_merge(sharing: bool, merge: str) -> None:
    argv = argv_of(make_spec(resources={"page_sharing": sharing}))
    assert value(argv, "-machine") == f"q35,accel=tcg,mem-merge={merge}"


def test_balloon_device() -> None:
    balloon = device(argv_of(make_spec()), BALLOON_ID)
    assert balloon.split(",")[0] == "virtio-balloon-pci"
    assert props(balloon) == {
        "id": BALLOON_ID,
        "bus": "pcie.0",
        "addr": "0x1e",
        "deflate-on-oom": "on",
        "free-page-reporting": "on",
    }


def test_no_balloon_when_off() -> None:
    argv = argv_of(make_spec(resources={"balloon": False}))
    assert devices(argv, "virtio-balloon-pci") == []


def full_spec(machine: str, **fields: Any) -> VmSpec:
    """Every PCI slot taken: a SCSI controller, then disks and NICs in slots 1 to 15."""
    boot = KERNEL if machine == "microvm" else {"kind": "firmware"}
    disks = [disk("s0", bus="scsi")] if machine != "microvm" else []
    disks += [disk(f"d{n}") for n in range(7)]
    nics = [nic(f"n{n}", n + 1) for n in range(PCI_SLOT_MAX - 7)]
    return make_spec(machine=machine, boot=boot, disks=disks, nics=nics, **fields)


@pytest.mark.parametrize(
    ("machine", "bus", "addr"),
    [("q35", "pcie.0", "0x1e"), ("pc", "pci.0", "0x13"), ("microvm", "pcie.0", "0x11")],
)
def test_balloon_sits_outside_the_slots(machine: MachineType, bus: str, addr: str) -> None:
    argv = argv_of(full_spec(machine))
    balloon = props(device(argv, BALLOON_ID))
    assert (balloon["bus"], balloon["addr"]) == (bus, addr)
    taken = [pci_placement(machine, n) for n in range(PCI_SLOT_MAX + 1)]
    assert {"bus": bus, "addr": addr} not in taken
    others = [props(d) for d in values(argv, "-device") if f",id={BALLOON_ID}," not in f"{d},"]
    assert all((p.get("bus"), p.get("addr")) != (bus, addr) for p in others)


@pytest.mark.parametrize("machine", ["q35", "pc", "microvm"])
def test_balloon_place_does_not_depend_on_the_rest(machine: str) -> None:
    bare = make_spec(machine=machine, boot=KERNEL, graphics={"kind": "none"})
    full = full_spec(machine)
    assert device(argv_of(bare), BALLOON_ID) == device(argv_of(full), BALLOON_ID)
