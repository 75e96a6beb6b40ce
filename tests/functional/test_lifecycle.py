"""The VM lifecycle on real QEMU with the appliance guest, checked from the guest's side."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from thinvisor.console.serial import SerialConsole
from thinvisor.errors import InvalidState
from thinvisor.host.engine.qmp import Monitor
from thinvisor.host.inventory import Inventory
from thinvisor.host.service import HostService, NewDisk
from thinvisor.model import VmSpec

from .hostenv import READY, TestHost

pytestmark = pytest.mark.functional


def vm_spec(name: str) -> VmSpec:
    return VmSpec(name=name)


def guest(host: TestHost, name: str, command: str, timeout: float = 60) -> tuple[int, str]:
    """Run a shell command in the guest over its serial console."""
    sock = Inventory(host.config).get(name).paths.serial_socket("serial0")

    async def go() -> tuple[int, str]:
        async with SerialConsole(sock) as console:
            return await console.run(command, timeout)

    return host.run(go())


def test_boots_to_the_ready_line(host: TestHost) -> None:
    host.cli("vm", "create", "vm1", "--appliance", "--memory", "128", "--start")
    log = host.wait_ready("vm1")
    uptime = float(READY.search(log).group(1))  # type: ignore[union-attr]
    assert uptime > 0
    shown = host.show("vm1")
    assert shown["state"] == "running"
    assert shown["pid"] == host.pid("vm1")
    status, out = guest(host, "vm1", "cat /proc/cmdline")
    assert status == 0 and "console=ttyS0" in out
    # The graphical console: QEMU's VNC server greets on the VM's private socket.
    vnc = Inventory(host.config).get("vm1").paths.vnc_socket
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(vnc))
        assert conn.recv(12) == b"RFB 003.008\n"


def test_hard_power_off(host: TestHost) -> None:
    host.create("vm1")
    host.wait_ready("vm1")
    pid = host.pid("vm1")
    assert pid is not None
    host.cli("vm", "stop", "vm1")
    shown = host.show("vm1")
    assert shown["state"] == "stopped"
    assert shown["stop_reason"] == "powered off by user"
    assert host.pid("vm1") is None
    assert b"THINVISOR-APPLIANCE-POWEROFF" not in host.serial_log("vm1")


def test_acpi_shutdown_is_a_clean_guest_poweroff(host: TestHost) -> None:
    host.create("vm1")
    host.wait_ready("vm1")
    out = host.cli("vm", "shutdown", "vm1", "--timeout", "90").stdout
    assert "stopped" in out
    # The guest's own poweroff ran: acpid saw the power button and powered off.
    assert b"THINVISOR-APPLIANCE-POWEROFF" in host.serial_log("vm1")
    shown = host.show("vm1")
    assert shown["state"] == "stopped"
    assert "did not shut down" not in shown["stop_reason"]


def test_reset_reboots_the_guest(host: TestHost) -> None:
    host.create("vm1")
    host.wait_ready("vm1")
    guest(host, "vm1", "echo before-reset > /tmp/marker")
    host.cli("vm", "reset", "vm1")
    host.wait_ready("vm1", count=2)
    status, _ = guest(host, "vm1", "test -e /tmp/marker")
    assert status == 1  # tmpfs is empty again: the guest really rebooted
    assert host.show("vm1")["state"] == "running"


def test_pause_and_resume(host: TestHost) -> None:
    host.create("vm1")
    host.wait_ready("vm1")
    host.cli("vm", "pause", "vm1")
    shown = host.show("vm1")
    assert (shown["state"], shown["qemu_status"]) == ("paused", "paused")
    # A paused guest does not answer on its console.
    sock = Inventory(host.config).get("vm1").paths.serial_socket("serial0")

    async def unanswered() -> None:
        async with SerialConsole(sock) as console:
            with pytest.raises(TimeoutError):
                await console.run("echo alive", timeout=3)

    host.run(unanswered())
    wrong = host.cli("vm", "pause", "vm1", check=False)
    assert wrong.returncode != 0
    assert wrong.stderr.strip() == "error: vm 'vm1': cannot pause while paused"
    host.cli("vm", "resume", "vm1")
    assert host.show("vm1")["state"] == "running"
    assert guest(host, "vm1", "echo alive") == (0, "alive\n")


def test_suspend_to_disk_and_resume_keeps_guest_state(host: TestHost) -> None:
    host.create("vm1")
    host.wait_ready("vm1")
    guest(host, "vm1", "echo kept-across-suspend-$((6*7)) > /tmp/value")
    host.cli("vm", "suspend", "vm1")
    shown = host.show("vm1")
    assert shown["state"] == "suspended"
    assert host.pid("vm1") is None
    state_file = Path(shown["vm_dir"]) / "suspend.state"
    assert state_file.stat().st_size > 0
    host.cli("vm", "resume", "vm1")
    assert host.show("vm1")["state"] == "running"
    assert not state_file.exists()
    assert guest(host, "vm1", "cat /tmp/value") == (0, "kept-across-suspend-42\n")
    # Resumed, not rebooted: still one ready line.
    assert len(READY.findall(host.serial_log("vm1"))) == 1


def test_hot_added_disk_appears_in_the_guest_and_is_writable(host: TestHost) -> None:
    host.create("vm1")
    host.wait_ready("vm1")
    disk = host.run(host.service.add_disk("vm1", NewDisk(size=64 << 20)))
    assert disk.name == "disk0"
    guest(host, "vm1", "for i in $(seq 50); do [ -e /sys/block/vda ] && break; sleep 0.2; done")
    assert guest(host, "vm1", "cat /sys/block/vda/size") == (0, f"{(64 << 20) // 512}\n")
    write = "echo thinvisor-disk-ok | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null"
    assert guest(host, "vm1", write)[0] == 0
    assert guest(host, "vm1", "dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 18") == (
        0,
        "thinvisor-disk-ok\n",
    )
    # The next boot has it too: the configuration was updated.
    assert [d.name for d in host.run(host.service.get_vm("vm1")).spec.disks] == ["disk0"]


def test_hot_add_then_remove_a_second_disk(host: TestHost) -> None:
    host.create("vm1", disk_mib=32)
    host.wait_ready("vm1")
    host.cli("vm", "disk", "add", "vm1", "--size", "16M")
    wait = "for i in $(seq 50); do [ -e /sys/block/vdb ] && break; sleep 0.2; done; ls /sys/block"
    assert "vdb" in guest(host, "vm1", wait)[1]
    host.cli("vm", "disk", "remove", "vm1", "disk1")
    gone = "for i in $(seq 50); do [ -e /sys/block/vdb ] || break; sleep 0.2; done; ls /sys/block"
    assert "vdb" not in guest(host, "vm1", gone)[1]
    assert [d["name"] for d in host.show("vm1")["spec"]["disks"]] == ["disk0"]


def make_iso(directory: Path, label: str) -> Path:
    content = directory / "iso-content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from the CD\n")
    iso = directory / f"{label.lower()}.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-quiet", "-V", label, "-o", str(iso), str(content)],
        check=True,
        capture_output=True,
    )
    return iso


def test_cdrom_insert_and_eject_are_seen_by_the_guest(host: TestHost) -> None:
    iso = make_iso(host.datastore, "TVMEDIA")
    host.create("vm1")
    host.wait_ready("vm1")
    read_label = "dd if=/dev/sr0 bs=2048 skip=16 count=1 2>/dev/null | head -c 48 | tail -c 8"
    status, _ = guest(host, "vm1", "dd if=/dev/sr0 bs=2048 count=1 of=/dev/null 2>/dev/null")
    assert status != 0  # empty drive
    host.cli("vm", "cdrom", "insert", "vm1", str(iso))
    assert guest(host, "vm1", read_label) == (0, "TVMEDIA ")
    host.cli("vm", "cdrom", "eject", "vm1")
    status, _ = guest(host, "vm1", "dd if=/dev/sr0 bs=2048 count=1 of=/dev/null 2>/dev/null")
    assert status != 0
    assert host.show("vm1")["spec"]["cdrom"]["path"] is None


def test_a_new_process_reattaches_reads_the_console_and_stops(host: TestHost) -> None:
    host.cli("vm", "create", "vm1", "--appliance", "--memory", "128")
    host.cli("vm", "start", "vm1")  # this process ends; QEMU runs on
    host.wait_ready("vm1")
    # A fresh thinvisor process finds it...
    assert host.show("vm1")["state"] == "running"
    # ...reads and writes its console...
    out = host.cli("vm", "console", "vm1", input="echo reattached-$((40+2))\n").stdout
    assert "reattached-42" in out
    # ...and can stop it.
    host.cli("vm", "stop", "vm1")
    assert host.show("vm1")["state"] == "stopped"


def test_kill_9_of_qemu_is_detected_and_reported(host: TestHost) -> None:
    host.create("vm1")
    host.wait_ready("vm1")
    pid = host.pid("vm1")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if host.pid("vm1") is None:
            break
        asyncio.run(asyncio.sleep(0.05))
    shown = host.show("vm1")
    assert shown["state"] == "stopped"
    assert f"QEMU (pid {pid}) ended abruptly" in shown["stop_reason"]
    listed = host.cli("vm", "list").stdout
    assert "ended abruptly" in listed
    # Nothing was lost: the console log and the disks are still there, and it starts again.
    assert READY.search(host.serial_log("vm1"))
    host.cli("vm", "start", "vm1")
    host.wait_ready("vm1", count=2)


def test_actions_in_the_wrong_state_are_refused_on_a_running_vm(host: TestHost) -> None:
    host.create("vm1")
    with pytest.raises(InvalidState):
        host.run(host.service.start("vm1"))
    refused = host.cli("vm", "delete", "vm1", check=False)
    assert refused.returncode == 1
    assert refused.stderr == "error: vm 'vm1': cannot delete while running\n"
    assert host.show("vm1")["state"] == "running"


def test_suspend_and_resume_after_a_hot_add(host: TestHost) -> None:
    # The saved state only restores into the same hardware: the hot-added disk must come
    # back in the PCI slot it was plugged into, not where a fresh boot would put it.
    host.create("vm1", disk_mib=16, nics=[host.service.new_nic(vm_spec("vm1")).model_dump()])
    host.wait_ready("vm1")
    host.cli("vm", "disk", "add", "vm1", "--size", "8M")
    wait = "for i in $(seq 50); do [ -e /sys/block/vdb ] && break; sleep 0.2; done"
    guest(host, "vm1", wait)
    guest(host, "vm1", "echo before > /tmp/value")
    host.cli("vm", "suspend", "vm1")
    host.cli("vm", "resume", "vm1")
    assert host.show("vm1")["state"] == "running"
    assert guest(host, "vm1", "cat /tmp/value; cat /sys/block/vdb/size") == (0, "before\n16384\n")
    # And a fresh boot gives the same hardware too.
    host.cli("vm", "stop", "vm1")
    host.cli("vm", "start", "vm1")
    host.wait_ready("vm1", count=2)
    assert guest(host, "vm1", "cat /sys/block/vdb/size") == (0, "16384\n")


def test_a_busy_qmp_socket_does_not_break_the_listing(host: TestHost) -> None:
    # QEMU serves one QMP client at a time: while another holds it, a listing still
    # answers, with the run state unknown, instead of failing as a whole.
    host.create("vm1")
    host.create("vm2", start=False)
    sock = Inventory(host.config).get("vm1").paths.qmp_socket

    async def listing_while_held() -> list[tuple[str, str, str | None]]:
        async with Monitor("vm1", sock):
            service = HostService(host.config)
            service.status_timeout_s = 1
            return [(v.name, v.state, v.qemu_status) for v in await service.list_vms()]

    assert host.run(listing_while_held()) == [
        ("vm1", "running", "unknown"),
        ("vm2", "stopped", None),
    ]
    assert host.show("vm1")["qemu_status"] == "running"  # once free, known again
