"""The generated command lines start under the real QEMU, with every device where expected.

No guest OS is needed: firmware boot sits in SeaBIOS on empty disks, and kernel boot
loads a stub that halts in its real-mode setup code. Paths are short (unix sockets have
107 bytes) and hold commas, to prove the escaping.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from thinvisor.host.engine.accel import AccelChoice
from thinvisor.host.engine.argv import ROOT_PORTS, build_argv, pci_placement
from thinvisor.host.engine.paths import VmPaths
from thinvisor.model.vm import VmSpec, parse_spec

pytestmark = [
    pytest.mark.functional,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]

TCG = AccelChoice("tcg", "configured")
START_TIMEOUT_S = 10.0


def stub_kernel(path: Path) -> None:
    """A Linux boot-protocol 2.02 image whose real-mode entry is ``cli; hlt; jmp $-3``."""
    image = bytearray(1536)
    image[0x1F1] = 1  # one setup sector after the boot sector
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x200:0x202] = b"\xeb\x7e"  # the entry point: jmp short 0x280
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x0202).to_bytes(2, "little")
    image[0x211] = 0x01  # LOADED_HIGH
    image[0x280:0x284] = b"\xfa\xf4\xeb\xfd"
    path.write_bytes(bytes(image))


@pytest.fixture
def paths() -> Iterator[VmPaths]:
    top = Path(tempfile.mkdtemp(prefix="tv", dir="/tmp"))
    vm_paths = VmPaths(top / "v,m", top / "r,1")
    vm_paths.logs_dir.mkdir(parents=True)
    vm_paths.run_dir.mkdir()
    for name in ("a,b.raw", "c.raw", "d.raw", "e.raw", "x.iso"):
        image = str(vm_paths.vm_dir / name)
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", image, "1M"], check=True)
    image = str(vm_paths.vm_dir / "q.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "1M"], check=True)
    stub_kernel(vm_paths.vm_dir / "kernel")
    yield vm_paths
    shutil.rmtree(top, ignore_errors=True)


@dataclass
class Qemu:
    process: subprocess.Popen[bytes]
    paths: VmPaths
    log: Path

    def qmp(self, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
        """Run QMP commands in order, then ``quit``; their answers."""
        return asyncio.run(self._qmp(commands))

    async def _qmp(self, commands: tuple[tuple[str, dict[str, Any] | None], ...]) -> list[Any]:
        client = QMPClient("argv-test")
        await client.connect(str(self.paths.qmp_socket))
        try:
            return [await client.execute(name, args) for name, args in commands]
        finally:
            await client.execute("quit")
            with contextlib.suppress(EOFError):  # QEMU may close the socket first
                await client.disconnect()


@pytest.fixture
def start(paths: VmPaths) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def run(argv: list[str]) -> Qemu:
        log = paths.logs_dir / "qemu.log"
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
        started.append(process)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not paths.qmp_socket.exists():
            if process.poll() is not None:
                pytest.fail(f"QEMU exited ({process.returncode}): {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no QMP socket after {START_TIMEOUT_S} s: {log.read_text()}")
            time.sleep(0.05)
        return Qemu(process, paths, log)

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def bus_of(qemu_answer: str) -> str:
    """The last part of a ``parent_bus`` path: ``rp1``, ``pci.0``, ``ide.2``, ``scsi0.0``."""
    return qemu_answer.rsplit("/", 1)[-1]


def placement(device_ids: list[str]) -> list[tuple[str, dict[str, Any] | None]]:
    return [
        ("qom-get", {"path": f"/machine/peripheral/{i}", "property": "parent_bus"})
        for i in device_ids
    ]


def blocks(answer: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """query-block: device id -> the inserted medium (None when empty)."""
    out = {}
    for block in answer:
        qdev = block["qdev"].removeprefix("/machine/peripheral/").removesuffix("/virtio-backend")
        out[qdev] = block.get("inserted")
    return out


def root_bus_ids(answer: list[dict[str, Any]]) -> set[str]:
    return {d["qdev_id"] for d in answer[0]["devices"] if d.get("qdev_id")}


def spec(**fields: Any) -> VmSpec:
    return parse_spec({"name": "argvtest", "memory_mib": 64, **fields})


def test_pc_every_bus(paths: VmPaths, start: Any) -> None:
    vm = spec(
        machine="pc",
        disks=[
            {"name": "d0", "path": "a,b.raw", "format": "raw", "bus": "ide"},
            {"name": "d1", "path": "q.qcow2", "bus": "virtio"},
            {"name": "d2", "path": "c.raw", "format": "raw", "bus": "scsi", "readonly": True},
            {"name": "d3", "path": "d.raw", "format": "raw", "bus": "ide"},
        ],
        cdrom={"bus": "ide"},
        nics=[{"name": "n0", "mac": "52:54:00:12:34:01", "model": "e1000"}],
        serials=[{"name": "serial0"}, {"name": "serial1"}],
        parallel={},
    )
    qemu = start(build_argv(vm, paths, TCG))
    # Sockets and files under directories whose names hold commas: the escaping works.
    assert paths.pidfile.read_text().strip() == str(qemu.process.pid)
    assert eventually(paths.vnc_socket.is_socket)  # VNC starts after QMP listens
    assert paths.serial_socket("serial1").is_socket()
    assert paths.parallel_log.exists()
    iso = str(paths.vm_dir / "x.iso")
    status, block, *where, pci, chardevs, _, after, unit = qemu.qmp(
        ("query-status", None),
        ("query-block", None),
        *placement(["d0", "d1", "d2", "d3", "scsi0", "n0", "cdrom0"]),
        ("query-pci", None),
        ("query-chardev", None),
        ("blockdev-change-medium", {"id": "cdrom0", "filename": iso, "format": "raw"}),
        ("query-block", None),
        ("qom-get", {"path": "/machine/peripheral/d3", "property": "unit"}),
    )
    assert status["status"] == "running"
    media = blocks(block)
    assert media["cdrom0"] is None
    assert media["d0"] is not None
    assert media["d0"]["node-name"] == "d0-fmt"
    assert media["d0"]["file"] == str(paths.vm_dir / "a,b.raw")
    assert media["d1"] is not None
    assert media["d1"]["drv"] == "qcow2"
    assert media["d2"] is not None
    assert media["d2"]["ro"] is True
    assert [bus_of(w) for w in where] == [
        "ide.0",
        "pci.0",
        "scsi0.0",
        "ide.0",
        "pci.0",
        "pci.0",
        "ide.1",
    ]
    assert unit == 1
    assert {"d1", "scsi0", "n0", "video0"} <= root_bus_ids(pci)
    opened = {c["label"]: c["frontend-open"] for c in chardevs}
    assert opened["serial0"] and opened["serial1"] and opened["parallel0"]
    inserted = blocks(after)["cdrom0"]
    assert inserted is not None
    assert inserted["file"] == iso


def test_q35_root_ports_and_scsi_cdrom(paths: VmPaths, start: Any) -> None:
    vm = spec(
        disks=[
            {"name": "d0", "path": "a,b.raw", "format": "raw"},
            {"name": "d1", "path": "c.raw", "format": "raw", "bus": "scsi"},
            {"name": "d2", "path": "d.raw", "format": "raw", "bus": "ide"},
        ],
        cdrom={"path": "x.iso", "bus": "scsi"},
        nics=[
            {"name": "n0", "mac": "52:54:00:12:34:01"},
            {"name": "n1", "mac": "52:54:00:12:34:02", "model": "rtl8139"},
        ],
        boot={"kind": "firmware", "order": ["cdrom", "disk", "network"]},
    )
    free = vm.with_pci_slots().free_pci_slot()
    assert free == 4
    qemu = start(build_argv(vm, paths, TCG))
    status, block, *where, pci, _, _ = qemu.qmp(
        ("query-status", None),
        ("query-block", None),
        *placement(["scsi0", "d0", "n0", "n1", "d1", "d2", "cdrom0"]),
        ("query-pci", None),
        ("netdev_add", {"type": "user", "id": "hot-net"}),
        (
            "device_add",
            {
                "driver": "virtio-net-pci",
                "id": "hot",
                "netdev": "hot-net",
                **pci_placement("q35", free),
            },
        ),
    )
    assert status["status"] == "running"
    assert [bus_of(w) for w in where] == ["rp0", "rp1", "rp2", "rp3", "scsi0.0", "ide.0", "scsi0.0"]
    assert {f"rp{n}" for n in range(ROOT_PORTS)} | {"video0", "balloon0"} == root_bus_ids(pci)
    cdrom = blocks(block)["cdrom0"]
    assert cdrom is not None
    assert (cdrom["node-name"], cdrom["ro"]) == ("cdrom0-fmt", True)


def test_q35_ide_cdrom_kernel_boot_incoming(paths: VmPaths, start: Any) -> None:
    vm = spec(
        disks=[
            {"name": f"d{n}", "path": f"{x}.raw", "format": "raw", "bus": "ide"}
            for n, x in enumerate("cde")
        ],
        cdrom={},
        boot={"kind": "kernel", "kernel": "kernel", "cmdline": "console=ttyS0"},
        graphics={"kind": "none"},
    )
    qemu = start(build_argv(vm, paths, TCG, incoming=True))
    status, *where, change = qemu.qmp(
        ("query-status", None),
        *placement(["d0", "d1", "d2", "cdrom0"]),
        (
            "blockdev-change-medium",
            {"id": "cdrom0", "filename": str(paths.vm_dir / "x.iso"), "format": "raw"},
        ),
    )
    assert status["status"] == "inmigrate"
    assert [bus_of(w) for w in where] == ["ide.0", "ide.1", "ide.3", "ide.2"]
    assert change == {}


def test_microvm(paths: VmPaths, start: Any) -> None:
    vm = spec(
        machine="microvm",
        boot={"kind": "kernel", "kernel": "kernel", "cmdline": "console=ttyS0"},
        disks=[{"name": "d0", "path": "a,b.raw", "format": "raw"}],
        nics=[{"name": "n0", "mac": "52:54:00:12:34:01"}],
        serials=[{"name": "serial0"}, {"name": "serial1"}],
        parallel={},
    )
    qemu = start(build_argv(vm, paths, TCG, tsc_khz=2_000_000))
    status, *where, pci, chardevs = qemu.qmp(
        ("query-status", None),
        *placement(["d0", "n0"]),
        ("query-pci", None),
        ("query-chardev", None),
    )
    assert status["status"] == "running"
    assert [bus_of(w) for w in where] == ["pcie.0", "pcie.0"]
    assert root_bus_ids(pci) == {"d0", "n0", "balloon0"}
    opened = {c["label"]: c["frontend-open"] for c in chardevs}
    assert opened["serial0"] and opened["serial1"] and opened["parallel0"]
