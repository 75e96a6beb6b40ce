"""The appliance builds reproducibly and boots in raw QEMU (TCG), q35 and pc."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from thinvisor.appliance import Appliance, build_appliance, find_appliance

from .serialconsole import TIMEOUT, SerialConsole

pytestmark = pytest.mark.functional

READY = re.compile(rb"THINVISOR-APPLIANCE-READY uptime=(\d+\.\d+)")
POWEROFF = b"THINVISOR-APPLIANCE-POWEROFF"
# What operators and the density benchmark give an appliance VM.
SMALLEST_MIB = 64


class Guest:
    """One QEMU process booting the appliance, with its serial console and QMP socket."""

    def __init__(
        self, appliance: Appliance, machine: str, extra: Sequence[str], memory_mib: int = 128
    ) -> None:
        # Unix socket paths are limited to 107 bytes: keep the run directory short.
        self.dir = Path(tempfile.mkdtemp(prefix="tva-", dir="/tmp"))
        self.serial_log = self.dir / "serial.log"
        self.qmp_path = self.dir / "qmp"
        self.argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-M", machine, "-m", str(memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(appliance.kernel), "-initrd", str(appliance.initrd),
            "-append", appliance.cmdline,
            "-chardev", f"socket,id=ser0,path={self.dir}/serial,server=on,wait=off,"
            f"logfile={self.serial_log}",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.console = SerialConsole(self.dir / "serial", self.serial_log, self._check_alive)

    def start(self) -> None:
        with (self.dir / "qemu.err").open("wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stderr=err)
        self.console.connect(TIMEOUT)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            err = (self.dir / "qemu.err").read_text(errors="replace")
            raise AssertionError(f"QEMU exited with {self.proc.returncode}: {err}")

    def log(self) -> bytes:
        return self.console.log()

    def wait_for(self, pattern: re.Pattern[bytes], start: int = 0) -> re.Match[bytes]:
        return self.console.wait_for(pattern, start)

    def run(self, command: str, *, timeout: float = TIMEOUT) -> str:
        return self.console.run(command, timeout=timeout)

    def send(self, text: str) -> None:
        self.console.send(text)

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        async def execute() -> Any:
            client = QMPClient(self.dir.name)
            await client.connect(str(self.qmp_path))
            try:
                return await client.execute(command, arguments)
            finally:
                await client.disconnect()

        return asyncio.run(execute())

    def wait_exit(self) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=TIMEOUT)

    def kill(self) -> None:
        self.console.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def boot(appliance: Appliance) -> Iterator[Any]:
    """Start a guest and wait for its ready line; every guest is killed at teardown."""
    guests: list[Guest] = []

    def start(machine: str = "q35", extra: Sequence[str] = (), memory_mib: int = 128) -> Guest:
        guest = Guest(appliance, machine, extra, memory_mib)
        guests.append(guest)
        guest.start()
        guest.wait_for(READY)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.kill()


def test_builds_are_reproducible_and_cached(appliance: Appliance, tmp_path: Path) -> None:
    again = build_appliance(tmp_path, force=True)
    assert again.version == appliance.version
    assert again.cmdline == appliance.cmdline
    assert again.initrd.read_bytes() == appliance.initrd.read_bytes()
    assert again.kernel.read_bytes() == appliance.kernel.read_bytes()
    inode = again.initrd.stat().st_ino
    reused = build_appliance(tmp_path)
    assert reused == again
    assert reused.initrd.stat().st_ino == inode  # not rebuilt
    assert find_appliance(tmp_path) == again
    assert not [p for p in (tmp_path / "appliance").iterdir() if p.name.startswith(".build-")]


def test_q35_shell_and_power_button(boot: Any) -> None:
    guest = boot("q35")
    assert READY.search(guest.serial_log.read_bytes())
    assert guest.run("echo $((6*7))").strip() == "42"
    assert guest.run("hostname").strip() == "appliance"
    modules = guest.run("cut -d' ' -f1 /proc/modules")
    for name in ("virtio_pci", "virtio_blk", "virtio_net", "button", "evdev"):
        assert name in modules.split()
    # PID 1 starts a new shell when this one exits.
    guest.send("exit\n")
    assert guest.run("echo $((2*21))").strip() == "42"
    guest.qmp("system_powerdown")
    guest.wait_for(re.compile(re.escape(POWEROFF)))
    assert guest.wait_exit() == 0


def test_boots_in_64_mib(boot: Any) -> None:
    # Debian's bzImage as packaged needs 67 MiB before its first line; repacked, plus the
    # command line that keeps tracefs and kmem accounting small, it fits in 64.
    guest = boot("q35", memory_mib=SMALLEST_MIB)
    total_kib = int(guest.run("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert total_kib < SMALLEST_MIB * 1024
    assert guest.run("echo $((6*7))").strip() == "42"


def test_dhcp_lease_on_user_network(boot: Any) -> None:
    nic = ["-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0"]
    guest = boot("q35", nic)
    deadline = time.monotonic() + TIMEOUT
    while "inet 10.0.2.15/24" not in (addr := guest.run("ip -4 addr show dev eth0")):
        assert time.monotonic() < deadline, addr
        time.sleep(1)
    # restrict=on keeps the guest off the host's network; slirp then offers no router.
    assert "lease of 10.0.2.15 obtained" in guest.run("cat /var/log/udhcpc.log")


def test_q35_disks_cdrom_and_pci_hotplug(boot: Any, tmp_path: Path) -> None:
    disk, extra = tmp_path / "disk.raw", tmp_path / "extra.raw"
    for path in (disk, extra):
        path.write_bytes(b"\0" * (1 << 20))
    guest = boot(
        "q35",
        [
            "-drive", f"if=none,id=d0,file={disk},format=raw",
            "-device", "virtio-blk-pci,drive=d0",
            "-device", "virtio-scsi-pci,id=scsi0",
            "-drive", "if=none,id=cd0,media=cdrom",
            "-device", "scsi-cd,bus=scsi0.0,drive=cd0",
            "-device", "pcie-root-port,id=rp1,chassis=1,slot=1",
        ],
    )  # fmt: skip
    assert guest.run("echo /dev/vd* /dev/sr*").split() == ["/dev/vda", "/dev/sr0"]
    guest.qmp(
        "blockdev-add",
        {"node-name": "hot0", "driver": "raw", "file": {"driver": "file", "filename": str(extra)}},
    )
    guest.qmp("device_add", {"driver": "virtio-blk-pci", "drive": "hot0", "bus": "rp1", "id": "h"})
    deadline = time.monotonic() + TIMEOUT
    while "/dev/vdb" not in (found := guest.run("echo /dev/vd*")):
        assert time.monotonic() < deadline, found
        time.sleep(1)


def test_pc_boots_with_ide_cdrom(boot: Any) -> None:
    guest = boot("pc", ["-drive", "if=ide,index=2,media=cdrom"])
    assert guest.run("echo $((6*7))").strip() == "42"
    assert guest.run("echo /dev/sr*").split() == ["/dev/sr0"]
